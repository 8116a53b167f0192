//! svq-relay on the kernel's own vhost-vdpa: Linux 6.12 booted under QEMU
//! TCG, the software NIC served as a VDUSE device (`svq-vduse-net`), added
//! to the vDPA bus with iproute2's `vdpa` and bound to `vhost_vdpa`, and the
//! relay on `--backend vdpa:/dev/vhost-vdpa-0` with the project's test VMM
//! as its frontend.
//!
//! The host test builds the guest's initramfs (busybox, the vDPA modules,
//! `vdpa` and its libraries, the relay, the VDUSE server and this very test
//! binary), boots it and runs the `guest_*` tests of this binary inside the
//! guest, one command each; they are `#[ignore]`d so that they run only
//! there. Every packet the test VMM sends goes through the relay, the
//! kernel's vhost-vdpa and VDUSE, the sim, and back.

use std::path::Path;
use std::time::Duration;

use testkit::daemon::{bin, target_tmpdir, tempdir};
use testkit::migrate::{load_state, migration_proto, pages_of, save_state, Log};
use testkit::qemu::{assets, qemu_or_skip, Guest, GuestConfig, Initramfs, QemuVersion};
use testkit::{pump, Daemon, Qmp, Until, Vmm, VmmConfig};

/// The vDPA stack of Linux 6.12, in load order.
const VDPA_MODULES: &[&str] = &[
    "kernel/virt/lib/irqbypass.ko.xz",
    "kernel/drivers/vhost/vhost_iotlb.ko.xz",
    "kernel/drivers/vdpa/vdpa.ko.xz",
    "kernel/drivers/vhost/vhost.ko.xz",
    "kernel/drivers/vhost/vhost_vdpa.ko.xz",
    "kernel/drivers/vdpa/vdpa_user/vduse.ko.xz",
];

const DEV_ENV: &str = "SVQ_RELAY_VDPA_DEV";
const GUEST_TEST: &str = "/svq/deps/vdpa_kernel";

// --- inside the guest --------------------------------------------------------

fn device() -> String {
    std::env::var(DEV_ENV).unwrap_or_else(|_| {
        panic!("{DEV_ENV} unset: this test runs inside the guest that relay_on_the_kernels_vhost_vdpa boots")
    })
}

fn mode(qmp: &mut Qmp) -> String {
    qmp.query("net0")["mode"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

/// The relay's IOTLB messages, for the host side to find in what VDUSE saw.
fn print_iotlb(d: &Daemon) {
    for l in d.stderr().lines() {
        if let Some(at) = l.find("IOTLB ") {
            println!("GUEST-IOTLB {}", &l[at..]);
        }
    }
}

fn frames(vmm: &Vmm) -> u32 {
    vmm.pairs.iter().map(|p| p.next_seq).max().unwrap_or(0)
}

/// Sends 64 more frames per pair and waits for them all to come back.
fn pump_more(vmm: &mut Vmm, d: &Daemon, what: &str) {
    let n = frames(vmm) + 64;
    pump(&mut vmm.pairs, Until::Frames(n))
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", d.stderr()));
}

/// Every frame came back, the rings end where the VMM expects, the daemon
/// logged no error; then what the host side reads: the relay's IOTLB
/// messages and `GUEST-RESULT {tag} frames=N`.
fn finish(d: &Daemon, vmm: &mut Vmm, tag: &str) {
    for p in &vmm.pairs {
        assert!(p.quiescent(), "{}", p.describe());
        assert!(p.rx_received.iter().all(|&r| r), "{}", p.describe());
    }
    vmm.check_final_bases();
    assert!(!d.stderr().contains("ERROR"), "{}", d.stderr());
    print_iotlb(d);
    println!("GUEST-RESULT {tag} frames={}", frames(vmm));
}

/// The relay on the device with `flags`, a test VMM with `pairs` pairs
/// on it: traffic in the starting mode `start`, then through every switch
/// of `switches` (enable-shadow-vq on/off), checking the mode after each.
fn switches_under_traffic(flags: &[&str], start: &str, pairs: u16, switches: &[bool], tag: &str) {
    let backend = format!("vdpa:{}", device());
    let mut args = vec!["--backend", &backend];
    args.extend_from_slice(flags);
    let d = Daemon::spawn(&args);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(pairs));
    pump(&mut vmm.pairs, Until::Frames(128))
        .unwrap_or_else(|e| panic!("{start}: {e}\n{}", d.stderr()));
    assert_eq!(mode(&mut qmp), start);
    for (round, &on) in switches.iter().enumerate() {
        let r = qmp.enable_shadow("net0", on);
        assert!(
            r.get("return").is_some(),
            "enable-shadow-vq {on}: {r}\n{}",
            d.stderr()
        );
        let want = if on { "shadow" } else { "passthrough" };
        assert_eq!(mode(&mut qmp), want);
        pump_more(&mut vmm, &d, &format!("after switch {round} to {want}"));
    }
    finish(&d, &mut vmm, tag);
}

#[test]
#[ignore = "runs inside the VDUSE guest (relay_on_the_kernels_vhost_vdpa)"]
fn guest_passthrough_and_switches() {
    switches_under_traffic(&[], "passthrough", 1, &[true, false, true], "switches");
}

/// Two queue pairs (the VDUSE device offers MQ without a control queue:
/// 6.12 refuses CTRL_VQ), in passthrough and across a switch and back.
#[test]
#[ignore = "runs inside the VDUSE guest (relay_on_the_kernels_vhost_vdpa)"]
fn guest_two_pairs() {
    switches_under_traffic(
        &["--queues", "2"],
        "passthrough",
        2,
        &[true, false],
        "two-pairs",
    );
}

#[test]
#[ignore = "runs inside the VDUSE guest (relay_on_the_kernels_vhost_vdpa)"]
fn guest_shadow_from_the_start() {
    switches_under_traffic(&["--shadow", "on"], "shadow", 1, &[], "shadow");
}

#[test]
#[ignore = "runs inside the VDUSE guest (relay_on_the_kernels_vhost_vdpa)"]
fn guest_save_and_load_into_a_second_daemon() {
    let backend = format!("vdpa:{}", device());
    let mut src = Daemon::spawn(&["--backend", &backend]);
    let mut qmp = Qmp::connect_ready(&src.qmp);
    let mut vmm = Vmm::start_with(&src.socket, VmmConfig::default(), migration_proto());
    pump_more(&mut vmm, &src, "before");

    // Logging on, as a migration starts: the relay shadows the rings (the
    // device cannot log) and marks every page the device writes.
    let log = Log::new(vmm.mem.size);
    vmm.start_logging(&log);
    assert_eq!(mode(&mut qmp), "shadow");
    pump_more(&mut vmm, &src, "logging");

    // Stop with frames in flight, save, and let the device go: vhost-vdpa
    // has one owner at a time, so the source closes it before the
    // destination opens it.
    let bases = vmm.stop_with_frames_in_flight();
    let state = save_state(&vmm.fe).unwrap_or_else(|e| panic!("{e}\n{}", src.stderr()));
    let expected = pages_of(&vmm.written_ranges());
    vmm.record_written(false);
    let logged = log.pages();
    let missed: Vec<u64> = expected.difference(&logged).copied().collect();
    assert!(
        missed.is_empty(),
        "{} written pages not logged: {missed:x?}",
        missed.len()
    );
    assert!(
        !expected.is_empty(),
        "the device wrote nothing while logging"
    );
    assert!(!src.stderr().contains("ERROR"), "{}", src.stderr());
    print_iotlb(&src);
    src.terminate();

    let dst = Daemon::spawn(&["--backend", &backend]);
    vmm.move_to(&dst.socket);
    load_state(&vmm.fe, &state).unwrap_or_else(|e| panic!("{e}\n{}", dst.stderr()));
    for (q, &b) in bases.iter().enumerate() {
        vmm.restart_queue(q, b as u16)
            .unwrap_or_else(|e| panic!("restart queue {q} at {b}: {e}"));
    }
    pump_more(&mut vmm, &dst, "after the load");
    println!("pages logged: {}", logged.len());
    finish(&dst, &mut vmm, "migration");
}

// --- on the host ---------------------------------------------------------------

fn initramfs(path: &Path) {
    let a = assets().expect("assets");
    let mut fs = Initramfs::new();
    for m in VDPA_MODULES {
        fs = fs.module(&a.vdpa_modules.join(m));
    }
    let me = std::env::current_exe().expect("the test's own path");
    fs.program("bin/vdpa", Path::new("/sbin/vdpa"))
        .program("svq/svq-relay", bin())
        .program(
            "svq/svq-vduse-net",
            Path::new(env!("CARGO_BIN_EXE_svq-vduse-net")),
        )
        .program(GUEST_TEST, &me)
        .build(path);
}

/// Starts `svq-vduse-net` as device `name` with `queues` pairs, adds it to
/// the vDPA bus and returns its /dev/vhost-vdpa-N.
fn add_device(g: &mut Guest, name: &str, queues: u16) -> String {
    g.sh(&format!(
        "/svq/svq-vduse-net --name {name} --queues {queues} --log-level info \
         >/tmp/{name}.out 2>/tmp/{name}.err & echo $! >/tmp/{name}.pid"
    ));
    g.sh(&format!(
        "n=0; until grep -q ready /tmp/{name}.out; do n=$((n+1)); \
         [ $n -lt 300 ] || {{ cat /tmp/{name}.err; exit 1; }}; sleep 0.1; done"
    ));
    g.sh(&format!("vdpa dev add name {name} mgmtdev vduse"));
    let dev = g.sh(&format!(
        "n=0; until ls /sys/bus/vdpa/devices/{name}/ | grep -q vhost-vdpa; do \
         n=$((n+1)); [ $n -lt 300 ] || exit 1; sleep 0.1; done; \
         d=$(ls /sys/bus/vdpa/devices/{name}/ | grep vhost-vdpa); \
         until [ -e /dev/$d ]; do sleep 0.1; done; echo /dev/$d"
    ));
    dev.trim().to_string()
}

/// Takes device `name` off the bus and stops its server; returns what it
/// printed (its counters) and its log.
fn remove_device(g: &mut Guest, name: &str) -> (String, String) {
    g.sh(&format!("vdpa dev del {name}"));
    g.sh(&format!(
        "kill $(cat /tmp/{name}.pid); n=0; while kill -0 $(cat /tmp/{name}.pid) 2>/dev/null; do \
         n=$((n+1)); [ $n -lt 100 ] || exit 1; sleep 0.1; done"
    ));
    (
        g.sh(&format!("cat /tmp/{name}.out")),
        g.sh(&format!("cat /tmp/{name}.err")),
    )
}

/// Runs one `guest_*` test in the guest on `dev`; returns its output.
fn run_guest_test(g: &mut Guest, dev: &str, name: &str) -> String {
    let cmd = format!(
        "{DEV_ENV}={dev} {GUEST_TEST} --ignored --exact {name} --nocapture --test-threads=1 2>&1"
    );
    let (rc, out) = g.run(&cmd, Duration::from_secs(600));
    let vduse = g.sh("tail -n 30 /tmp/*.err");
    assert_eq!(
        rc, 0,
        "{name} failed in the guest:\n{out}\nVDUSE server:\n{vduse}"
    );
    assert!(out.contains("test result: ok. 1 passed"), "{name}:\n{out}");
    out
}

/// `key N` from the VDUSE server's counters line.
fn counter(text: &str, line_has: &str, key: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains(line_has))
        .unwrap_or_else(|| panic!("no line with {line_has:?} in:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == key)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    words[at + 1].trim_end_matches([',', ')']).parse().unwrap()
}

#[test]
fn relay_on_the_kernels_vhost_vdpa() {
    if !qemu_or_skip() {
        return;
    }
    if !Path::new("/sbin/vdpa").exists() {
        testkit::peers::missing_peer("iproute2's vdpa (package iproute2) not installed");
        return;
    }
    let a = assets().expect("assets");
    let initrd = target_tmpdir().join(format!("svq-vdpa-initramfs.{}.cpio", std::process::id()));
    initramfs(&initrd);
    let dir = tempdir();
    let cfg = GuestConfig {
        qemu: QemuVersion::V10,
        mem_mb: 1024,
        ..GuestConfig::default()
    };
    let mut g = Guest::boot(dir.path(), &a.vdpa_kernel, &initrd, &cfg, None);
    g.wait_ready();
    let _ = std::fs::remove_file(&initrd);
    let lsmod = g.sh("cat /proc/modules | cut -d' ' -f1");
    for m in ["vduse", "vhost_vdpa", "vdpa"] {
        assert!(
            lsmod.lines().any(|l| l == m),
            "{m} not loaded:\n{lsmod}\n{}",
            g.console()
        );
    }

    let dev = add_device(&mut g, "vduse0", 1);
    let shown = g.sh("vdpa dev show vduse0");
    assert!(shown.contains("vduse0"), "{shown}");

    let mut results = Vec::new();
    let mut iotlb = Vec::new();
    for t in [
        "guest_passthrough_and_switches",
        "guest_shadow_from_the_start",
        "guest_save_and_load_into_a_second_daemon",
    ] {
        let out = run_guest_test(&mut g, &dev, t);
        // With --nocapture the harness's "test NAME ... " can share the line.
        let tagged = |tag: &'static str| {
            out.lines()
                .filter_map(move |l| l.find(tag).map(|at| l[at + tag.len()..].trim().to_string()))
        };
        results.extend(tagged("GUEST-RESULT "));
        iotlb.extend(tagged("GUEST-IOTLB "));
    }
    assert_eq!(results.len(), 3, "{results:?}");

    // Off the bus, then stopped: the server prints its counters.
    let (out, log) = remove_device(&mut g, "vduse0");
    eprintln!("{}\n{out}", results.join("\n"));
    // Every frame the test VMM sent went through the device and back.
    let sent: u64 = results
        .iter()
        .map(|r| {
            let f = r
                .split_whitespace()
                .find_map(|w| w.strip_prefix("frames="))
                .unwrap();
            f.parse::<u64>().unwrap()
        })
        .sum();
    let tx = counter(&out, "queue 1 (tx)", "packets");
    let rx = counter(&out, "queue 0 (rx)", "packets");
    // Looped back whole: every byte sent came back.
    assert_eq!(
        counter(&out, "queue 1 (tx)", "bytes"),
        counter(&out, "queue 0 (rx)", "bytes"),
        "{out}"
    );
    assert!(
        tx >= sent && rx >= sent,
        "device saw tx {tx} rx {rx} of {sent} frames:\n{out}"
    );
    // Every mapping the relay sent reached the device through the kernel,
    // and every one it took back was taken from the device. (A batch that
    // re-sends a mapping unchanged, after a reset, changes nothing for the
    // device: ranges are compared, not messages.)
    let mut updates = 0;
    for msg in &iotlb {
        // "IOTLB UPDATE asid 0 0x0..=0x1ffffff"
        let w: Vec<&str> = msg.split_whitespace().collect();
        let (kind, range) = (w[1], w[4]);
        let seen = |l: &str| {
            let l = l.trim_end();
            if kind == "UPDATE" {
                l.contains(&format!("vduse] mapped {range} "))
            } else {
                l.ends_with(&format!("vduse] unmapped {range}"))
            }
        };
        updates += usize::from(kind == "UPDATE");
        assert!(
            log.lines().any(seen),
            "the relay sent {msg:?}, the device never saw it:\n{log}"
        );
    }
    // Guest memory (passthrough), shadow areas, two daemons at least.
    assert!(updates >= 4, "{iotlb:?}");
    let maps = counter(&out, "requests", "maps");
    let unmaps = counter(&out, "requests", "unmaps");
    assert_eq!(maps, unmaps, "every mapping taken back at the end:\n{out}");
    assert_eq!(counter(&out, "requests", "(failed"), 0, "{out}\n{log}");
    assert!(!log.contains("ERROR"), "{log}");

    // A second device, two queue pairs: every queue carried its pair's
    // frames.
    let dev = add_device(&mut g, "vduse1", 2);
    let out = run_guest_test(&mut g, &dev, "guest_two_pairs");
    let (counters, log) = remove_device(&mut g, "vduse1");
    let line = out
        .lines()
        .find_map(|l| l.find("GUEST-RESULT ").map(|at| l[at..].to_string()));
    let frames: u64 = line
        .as_deref()
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("frames=")))
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("no result:\n{out}"));
    for q in 0..4 {
        let dir = if q % 2 == 0 { "rx" } else { "tx" };
        let p = counter(&counters, &format!("queue {q} ({dir})"), "packets");
        assert!(
            p >= frames,
            "queue {q}: {p} of {frames} frames:\n{counters}"
        );
    }
    assert_eq!(
        counter(&counters, "requests", "(failed"),
        0,
        "{counters}\n{log}"
    );
    assert!(!log.contains("ERROR"), "{log}");
}
