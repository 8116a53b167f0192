//! Real QEMU guests (Linux 6.1 under TCG) on svq-relay: pings through the
//! relay to DPDK testpmd and through the software NIC to a network
//! namespace, in passthrough, in shadow and while QMP switches the mode,
//! with QEMU 7.2 and 10; multiqueue; live migration between two daemons.
//! Each asserts what the guest saw: ping replies, interface counters.
//! Skipped when QEMU, busybox or the guest assets are missing, failed then
//! under SVQ_RELAY_REQUIRE_PEERS.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use testkit::qemu::{parse_ping, EchoPmd, Guest, GuestConfig, QemuVersion, PEER_IP};
use testkit::{peers, Daemon, Qmp};

/// One guest scenario at a time: two TCG guests and their busy-polling
/// testpmds on two cores starve each other's rings long enough for testpmd
/// to drop frames it cannot place, which is the machine's limit, not the
/// relay's.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

fn ready() -> bool {
    testkit::qemu::qemu_or_skip() && peers::testpmd_or_skip()
}

/// A network namespace holding a bridge with the peer address
/// (10.0.2.2/24); the software NIC's tap interfaces join the bridge, so
/// the guest pings the namespace, and a migrated guest reaches it through
/// the destination daemon's tap.
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl NetNs {
    /// The namespace of this test binary (created once).
    fn shared() -> Option<&'static NetNs> {
        static NS: OnceLock<Option<NetNs>> = OnceLock::new();
        NS.get_or_init(|| {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if !root || !std::path::Path::new("/dev/net/tun").exists() {
                return None;
            }
            remove_stale_namespaces();
            let name = format!("svqns{}", std::process::id());
            ip(&["netns", "add", &name]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            ip(&["-n", &name, "link", "add", "br0", "type", "bridge"]);
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{PEER_IP}/24"),
                "dev",
                "br0",
            ]);
            ip(&["-n", &name, "link", "set", "br0", "up"]);
            Some(NetNs { name })
        })
        .as_ref()
    }

    fn attach(&self, ifname: &str) {
        let sys = format!("/sys/class/net/{ifname}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(&sys).exists() {
            assert!(Instant::now() < deadline, "tap {ifname} never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        ip(&["link", "set", "dev", ifname, "netns", &self.name]);
        ip(&["-n", &self.name, "link", "set", ifname, "master", "br0"]);
        ip(&["-n", &self.name, "link", "set", ifname, "up"]);
    }
}

fn tap_ready() -> Option<&'static NetNs> {
    if !testkit::qemu::qemu_or_skip() {
        return None;
    }
    let ns = NetNs::shared();
    if ns.is_none() {
        peers::missing_peer(
            "cannot create tap devices and namespaces (root and /dev/net/tun needed)",
        );
    }
    ns
}

/// Namespaces left by test binaries that are gone (a static is never
/// dropped, so each binary's namespace outlives it until the next run).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if let Some(pid) = name.strip_prefix("svqns") {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

/// A daemon on `--backend tap:IF` with IF joined to `ns`'s bridge.
fn tap_daemon(flags: &[&str], ns: &NetNs) -> (Daemon, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let ifname = format!(
        "svqg{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    );
    let be = format!("tap:{ifname}");
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["--backend", &be]);
    let d = Daemon::spawn(&args);
    ns.attach(&ifname);
    (d, ifname)
}

/// `ping -c N -i INTERVAL` from the guest; returns the summary.
fn ping(g: &mut Guest, count: u32, interval: &str) -> testkit::qemu::PingStats {
    let (_, out) = g.run(
        &format!("ping -c {count} -i {interval} -W 5 {PEER_IP}"),
        Duration::from_secs(300),
    );
    parse_ping(&out).unwrap_or_else(|| panic!("no ping summary in:\n{out}"))
}

fn assert_no_loss(what: &str, s: testkit::qemu::PingStats, count: u32) {
    // busybox's adaptive mode (-A) may send one request past the count.
    assert!(
        s.sent == count || s.sent == count + 1,
        "{what}: sent {} of {count}",
        s.sent
    );
    assert_eq!(
        s.received, s.sent,
        "{what}: {} of {} pings answered",
        s.received, s.sent
    );
}

/// Baseline: the guest pings testpmd directly, no relay.
#[test]
fn guest_pings_testpmd_directly() {
    let _one = one_at_a_time();
    if !ready() {
        return;
    }
    let dir = testkit::daemon::tempdir();
    let pmd = EchoPmd::spawn(dir.path(), "pmd", 1);
    let mut g = Guest::start(dir.path(), &pmd.sock, &GuestConfig::default());
    g.wait_ready();
    let s = ping(&mut g, 20, "0.05");
    assert_no_loss("direct", s, 20);
}

/// svq-relay on `pmd` (a vhost-user device) with `flags`.
fn relay_daemon(pmd: &EchoPmd, flags: &[&str]) -> Daemon {
    let backend = format!("vhost-user:{}", pmd.sock.display());
    let mut args = flags.to_vec();
    args.extend(["--backend", &backend]);
    Daemon::spawn(&args)
}

/// The guest pings testpmd through svq-relay, in the given mode, then
/// while QMP switches the mode back and forth under a fast ping stream.
fn relay_to_testpmd(qemu: QemuVersion, shadow: &str, switches: u32) {
    if !ready() {
        return;
    }
    let pmd_dir = testkit::daemon::tempdir();
    let pmd = EchoPmd::spawn(pmd_dir.path(), "pmd", 1);
    let d = relay_daemon(&pmd, &["--shadow", shadow]);
    pings_through(qemu, &d, shadow, switches);
}

/// The software NIC on a tap interface in a namespace the test made.
fn tap_nic(qemu: QemuVersion, shadow: &str, switches: u32) {
    tap_nic_with(qemu, shadow, switches, &[]);
}

fn tap_nic_with(qemu: QemuVersion, shadow: &str, switches: u32, extra: &[&str]) {
    let Some(ns) = tap_ready() else {
        return;
    };
    let mut args = vec!["--shadow", shadow];
    args.extend_from_slice(extra);
    let (d, _ifname) = tap_daemon(&args, ns);
    pings_through_with(qemu, &d, shadow, switches, extra.contains(&"--packed"));
}

fn pings_through(qemu: QemuVersion, d: &Daemon, shadow: &str, switches: u32) {
    pings_through_with(qemu, d, shadow, switches, false);
}

/// `pings_through` with `packed=on` on the guest's NIC when `packed`.
fn pings_through_with(qemu: QemuVersion, d: &Daemon, shadow: &str, switches: u32, packed: bool) {
    let cfg = GuestConfig {
        qemu,
        packed,
        ..Default::default()
    };
    let mut g = Guest::start(d.dir.path(), &d.socket, &cfg);
    g.wait_ready();
    let mut q = Qmp::connect_ready(&d.qmp);
    let want = if shadow == "on" {
        "shadow"
    } else {
        "passthrough"
    };
    let running = q.query("net0");
    assert_eq!(running["mode"], want);
    assert_eq!(running["packed"], packed, "{running}");
    assert_no_loss(shadow, ping(&mut g, 20, "0.05"), 20);
    let tx_before = g.counter("eth0", "tx_packets");
    if switches > 0 {
        // Two background streams in the guest while the mode flips: pings
        // every 10 ms, and 1400-byte pings back to back (-A) as bulk.
        g.sh(&format!(
            "ping -c 400 -i 0.01 -W 5 {PEER_IP} > /tmp/ping.out 2>&1 & echo $! > /tmp/ping.pid; \
             ping -A -c 3000 -s 1400 -W 5 {PEER_IP} > /tmp/bulk.out 2>&1 & echo $! > /tmp/bulk.pid"
        ));
        let mut enable = shadow != "on";
        for _ in 0..switches {
            assert_eq!(
                q.enable_shadow("net0", enable),
                serde_json::json!({"return": {}})
            );
            enable = !enable;
            std::thread::sleep(Duration::from_millis(150));
        }
        for (file, count) in [("ping", 400), ("bulk", 3000)] {
            g.sh(&format!(
                "while kill -0 $(cat /tmp/{file}.pid) 2>/dev/null; do sleep 0.2; done"
            ));
            let out = g.sh(&format!("cat /tmp/{file}.out"));
            let s = parse_ping(&out).unwrap_or_else(|| panic!("no summary:\n{out}"));
            // The relay completes every buffer it took across a switch
            // (tests/switching.rs counts them frame by frame); what a
            // device does with a frame while its ring is being moved is
            // its own: testpmd drops one it cannot place, and on two
            // contended cores the move can take long enough for that.
            // Zero is what a quiet machine shows; allow one per switch.
            assert!(
                s.sent >= count && s.received + switches >= s.sent,
                "{file} across {switches} switches: {} of {} pings answered",
                s.received,
                s.sent
            );
        }
        let tx = g.counter("eth0", "tx_packets") - tx_before;
        assert!(tx >= 3400, "guest counted {tx} transmitted packets");
        let rx_bytes = g.counter("eth0", "rx_bytes");
        assert!(
            rx_bytes >= 3000 * 1400,
            "guest received only {rx_bytes} bytes"
        );
    }
    let log = d.stderr();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "the daemon logged errors: {errors:#?}");
}

#[test]
fn qemu7_tap_passthrough_and_switching() {
    let _one = one_at_a_time();
    tap_nic(QemuVersion::V7, "off", 10);
}

#[test]
fn qemu10_tap_shadow() {
    let _one = one_at_a_time();
    tap_nic(QemuVersion::V10, "on", 0);
}

/// Linux's virtio-net under EVENT_IDX against an adaptive polling worker:
/// kicks and interrupts suppressed through avail_event and used_event
/// while it polls, asked for again before it sleeps (pings 10 ms apart
/// outlast the budget, so it sleeps and wakes for each), and a ring handed
/// back to the software NIC at every switch.
#[test]
fn qemu10_tap_shadow_adaptive_polling_and_switching() {
    let _one = one_at_a_time();
    tap_nic_with(QemuVersion::V10, "on", 10, &["--poll", "adaptive"]);
}

/// Linux's packed-ring virtio-net driver against the software NIC as a
/// packed-ring device: in passthrough, then across ten switches under a
/// ping stream and bulk pings (shadow rings packed on both sides).
#[test]
fn qemu10_tap_packed_across_switches() {
    let _one = one_at_a_time();
    tap_nic_with(QemuVersion::V10, "off", 10, &["--packed"]);
}

/// `--shadow on --packed` on a device without packed rings: a QEMU 10
/// guest with `packed=on` pings through a relay whose SVQs relay its
/// packed rings to the split rings of a second relay (the software NIC on
/// the tap, without `--packed`, in passthrough: the sim works on the first
/// relay's split shadow rings).
#[test]
fn qemu10_packed_guest_on_a_split_only_device() {
    let _one = one_at_a_time();
    let Some(ns) = tap_ready() else {
        return;
    };
    let (split, _ifname) = tap_daemon(&["--shadow", "off"], ns);
    let be = format!("vhost-user:{}", split.socket.display());
    let relay = Daemon::spawn(&["--shadow", "on", "--packed", "--backend", &be]);
    pings_through_with(QemuVersion::V10, &relay, "on", 0, true);
    let mut qs = Qmp::connect_ready(&split.qmp);
    let dev = qs.query("net0");
    assert_eq!(dev["packed"], false, "{dev}");
    assert_eq!(dev["mode"], "passthrough", "{dev}");
}

#[test]
fn qemu7_relay_passthrough_and_switching() {
    let _one = one_at_a_time();
    relay_to_testpmd(QemuVersion::V7, "off", 10);
}

#[test]
fn qemu7_relay_shadow() {
    let _one = one_at_a_time();
    relay_to_testpmd(QemuVersion::V7, "on", 0);
}

#[test]
fn qemu10_relay_passthrough() {
    let _one = one_at_a_time();
    relay_to_testpmd(QemuVersion::V10, "off", 0);
}

/// `--packed`: QEMU's virtio-net with `packed=on` through the relay to
/// testpmd, in passthrough and then in shadow (the SVQ relays the guest's
/// packed rings to packed shadow rings). In each mode the VM is stopped and
/// continued between ping runs: QEMU takes each ring back with
/// GET_VRING_BASE and restarts it with SET_VRING_BASE carrying its packed
/// position (avail and used index with their wrap counters), which must
/// come back intact from the device, or from the SVQ; then back to
/// passthrough. No ping is lost anywhere.
#[test]
fn qemu10_relay_packed_across_vm_stops_and_switches() {
    let _one = one_at_a_time();
    if !ready() {
        return;
    }
    let pmd_dir = testkit::daemon::tempdir();
    let pmd = EchoPmd::spawn(pmd_dir.path(), "pmd", 1);
    let d = relay_daemon(&pmd, &["--shadow", "off", "--packed"]);
    let cfg = GuestConfig {
        qemu: QemuVersion::V10,
        packed: true,
        ..Default::default()
    };
    let mut g = Guest::start(d.dir.path(), &d.socket, &cfg);
    g.wait_ready();
    let mut q = Qmp::connect_ready(&d.qmp);
    let dev = q.query("net0");
    assert_eq!(dev["packed"], true, "QEMU negotiated packed rings: {dev}");
    assert_eq!(dev["mode"], "passthrough");
    assert_no_loss("packed", ping(&mut g, 20, "0.05"), 20);
    for mode in ["passthrough", "shadow"] {
        if mode == "shadow" {
            assert_eq!(
                q.enable_shadow("net0", true),
                serde_json::json!({"return": {}})
            );
            assert_no_loss("packed in shadow", ping(&mut g, 20, "0.05"), 20);
            let dev = q.query("net0");
            assert_eq!(dev["mode"], "shadow", "{dev}");
            assert!(u64_of(&dev["queues"][1]["relayed"]) >= 20, "{dev}");
        }
        for _ in 0..2 {
            g.qmp.execute("stop", serde_json::json!({}));
            // QEMU took the rings back: stopped, at the positions the
            // device (or the SVQ) reported (TX carried the pings: not 0).
            let stopped = q.query("net0");
            let queues = stopped["queues"].as_array().unwrap();
            assert!(queues.iter().all(|v| v["enabled"] == false), "{stopped}");
            assert_ne!(queues[1]["avail_idx"], 0, "{stopped}");
            g.qmp.execute("cont", serde_json::json!({}));
            let what = format!("packed after stop/cont in {mode}");
            assert_no_loss(&what, ping(&mut g, 20, "0.05"), 20);
        }
        assert_eq!(q.query("net0")["mode"], mode);
    }
    assert_eq!(
        q.enable_shadow("net0", false),
        serde_json::json!({"return": {}})
    );
    assert_no_loss("packed back in passthrough", ping(&mut g, 20, "0.05"), 20);
    let log = d.stderr();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "the daemon logged errors: {errors:#?}");
}

fn u64_of(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn qemu10_relay_shadow_and_switching() {
    let _one = one_at_a_time();
    relay_to_testpmd(QemuVersion::V10, "on", 10);
}

/// `queues=2`, `mq=on`, two vCPUs: the guest driver enables both pairs
/// (through QEMU's control queue, which turns into SET_VRING_ENABLE), and
/// pings pinned to each vCPU leave on each pair's TX queue (XPS).
fn multiqueue(qemu: QemuVersion, shadow: &str) {
    let Some(ns) = tap_ready() else {
        return;
    };
    let (d, _) = tap_daemon(&["--shadow", shadow, "--queues", "2"], ns);
    let cfg = GuestConfig {
        qemu,
        pairs: 2,
        cpus: 2,
        ..Default::default()
    };
    let mut g = Guest::start(d.dir.path(), &d.socket, &cfg);
    g.wait_ready();
    let mut q = Qmp::connect_ready(&d.qmp);
    let before = q.query("net0");
    g.sh(&format!(
        "for c in 0 1; do taskset -c $c ping -c 50 -i 0.02 -W 5 {PEER_IP} > /tmp/p$c.out 2>&1 & done; wait"
    ));
    for c in 0..2 {
        let out = g.sh(&format!("cat /tmp/p{c}.out"));
        let s = parse_ping(&out).unwrap_or_else(|| panic!("cpu {c}: no summary:\n{out}"));
        assert_no_loss(&format!("pinned to cpu {c}"), s, 50);
    }
    let after = q.query("net0");
    for tx in [1u64, 3] {
        let idx = |v: &serde_json::Value| {
            testkit::qmp::u64_field(testkit::qmp::queue_info(v, tx), "avail_idx")
        };
        assert!(
            idx(&after) >= idx(&before) + 40,
            "{shadow}: TX queue {tx} carried {} packets: {after}",
            idx(&after) - idx(&before)
        );
    }
}

#[test]
fn qemu7_multiqueue_shadow() {
    let _one = one_at_a_time();
    multiqueue(QemuVersion::V7, "on");
}

#[test]
fn qemu10_multiqueue_passthrough() {
    let _one = one_at_a_time();
    multiqueue(QemuVersion::V10, "off");
}

/// The RX interrupts the guest counted per queue pair (MSI-X only).
fn rx_irqs(g: &mut Guest) -> [u64; 2] {
    let irqs = g.interrupts();
    let get = |pair: usize| {
        irqs.iter()
            .filter(|(k, _)| k.ends_with(&format!("-input.{pair}")))
            .map(|(_, v)| *v)
            .sum()
    };
    [get(0), get(1)]
}

/// Two queue pairs relayed to a real two-queue vhost-user device (testpmd
/// icmpecho with `--rxq=2 --txq=2`, which answers on the queue it received
/// on): pings pinned to each vCPU leave on that pair's TX queue (XPS) and
/// come back on that pair's RX queue, in passthrough, then in shadow after
/// a QMP switch. What shows it: no ping lost on either CPU; with MSI-X
/// (QEMU 10) the guest's RX interrupt of each pair rose; in shadow the
/// daemon relayed at least the pings on each of the four queues.
fn multiqueue_relay(qemu: QemuVersion) {
    if !ready() {
        return;
    }
    let pmd_dir = testkit::daemon::tempdir();
    let pmd = EchoPmd::spawn(pmd_dir.path(), "pmd", 2);
    let d = relay_daemon(&pmd, &["--queues", "2", "--shadow", "off"]);
    let cfg = GuestConfig {
        qemu,
        pairs: 2,
        cpus: 2,
        ..Default::default()
    };
    let mut g = Guest::start(d.dir.path(), &d.socket, &cfg);
    g.wait_ready();
    let queues = g.sh("ls /sys/class/net/eth0/queues");
    for qn in ["rx-0", "rx-1", "tx-0", "tx-1"] {
        assert!(queues.contains(qn), "guest queues: {queues}");
    }
    let mut q = Qmp::connect_ready(&d.qmp);
    for shadow in [false, true] {
        let what = if shadow { "shadow" } else { "passthrough" };
        if shadow {
            assert_eq!(
                q.enable_shadow("net0", true),
                serde_json::json!({"return": {}})
            );
        }
        let dev = q.query("net0");
        assert_eq!(dev["mode"], what);
        let relayed = |dev: &serde_json::Value, i: u64| {
            testkit::qmp::u64_field(testkit::qmp::queue_info(dev, i), "relayed")
        };
        let relayed_before: Vec<u64> = (0..4).map(|i| relayed(&dev, i)).collect();
        let irqs_before = rx_irqs(&mut g);
        for cpu in 0..2 {
            let (_, out) = g.run(
                &format!("taskset -c {cpu} ping -c 20 -i 0.05 -W 5 {PEER_IP}"),
                Duration::from_secs(120),
            );
            let s = parse_ping(&out).unwrap_or_else(|| panic!("no ping summary:\n{out}"));
            assert_no_loss(&format!("{what}, pinned to cpu {cpu}"), s, 20);
        }
        let irqs = rx_irqs(&mut g);
        if qemu == QemuVersion::V10 {
            for pair in 0..2 {
                assert!(
                    irqs[pair] > irqs_before[pair],
                    "{what}: no RX interrupt on pair {pair} ({irqs_before:?} -> {irqs:?})"
                );
            }
        }
        if shadow {
            let dev = q.query("net0");
            for i in 0..4u64 {
                let n = relayed(&dev, i) - relayed_before[i as usize];
                assert!(n >= 20, "{what}: queue {i} relayed only {n}: {dev}");
            }
        }
    }
    let log = d.stderr();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "the daemon logged errors: {errors:#?}");
}

#[test]
fn qemu7_multiqueue_relay_to_testpmd() {
    let _one = one_at_a_time();
    multiqueue_relay(QemuVersion::V7);
}

#[test]
fn qemu10_multiqueue_relay_to_testpmd() {
    let _one = one_at_a_time();
    multiqueue_relay(QemuVersion::V10);
}

// --- live migration ---------------------------------------------------------

/// Where each side's vhost-user socket comes from.
enum Backend {
    /// QEMU straight to testpmd (the baseline).
    Direct,
    /// svq-relay with these flags in front of testpmd.
    Relay(&'static [&'static str]),
    /// svq-relay's software NIC on a tap interface in this namespace.
    Tap(&'static [&'static str], &'static NetNs),
    /// svq-relay with the first flags in front of a second svq-relay with
    /// the second flags, in front of testpmd.
    Chain(&'static [&'static str], &'static [&'static str]),
}

/// One side of a migration: its testpmd, maybe a daemon, and the QEMU.
struct Side {
    pmd: Option<EchoPmd>,
    daemon: Option<Daemon>,
    /// The second relay of a [`Backend::Chain`].
    inner: Option<Daemon>,
    /// The daemon's QMP, connected before the migration (events).
    qmp: Option<Qmp>,
    _dir: tempfile::TempDir,
}

fn side(name: &str, b: &Backend) -> (Side, std::path::PathBuf) {
    let dir = testkit::daemon::tempdir();
    let relay_to = |flags: &[&str], sock: &std::path::Path| {
        let mut args: Vec<&str> = flags.to_vec();
        let be = format!("vhost-user:{}", sock.display());
        args.extend(["--backend", &be]);
        Daemon::spawn(&args)
    };
    let mut inner = None;
    let (pmd, daemon, sock) = match b {
        Backend::Direct => {
            let pmd = EchoPmd::spawn(dir.path(), &format!("pmd{name}"), 1);
            let sock = pmd.sock.clone();
            (Some(pmd), None, sock)
        }
        Backend::Relay(flags) => {
            let pmd = EchoPmd::spawn(dir.path(), &format!("pmd{name}"), 1);
            let d = relay_to(flags, &pmd.sock);
            let s = d.socket.clone();
            (Some(pmd), Some(d), s)
        }
        Backend::Chain(front, back) => {
            let pmd = EchoPmd::spawn(dir.path(), &format!("pmd{name}"), 1);
            let i = relay_to(back, &pmd.sock);
            let d = relay_to(front, &i.socket);
            inner = Some(i);
            let s = d.socket.clone();
            (Some(pmd), Some(d), s)
        }
        Backend::Tap(flags, ns) => {
            let (d, _) = tap_daemon(flags, ns);
            let s = d.socket.clone();
            (None, Some(d), s)
        }
    };
    let qmp = daemon.as_ref().map(|d| Qmp::connect_ready(&d.qmp));
    (
        Side {
            pmd,
            daemon,
            inner,
            qmp,
            _dir: dir,
        },
        sock,
    )
}

/// Migrates a guest pinging every 50 ms from a QEMU on `b` to another;
/// returns QEMU's query-migrate and the ping summary read on the
/// destination. `postcopy`: switch to postcopy once the migration runs.
fn migrate_pinging(
    qemu: QemuVersion,
    b: &Backend,
    postcopy: bool,
) -> (serde_json::Value, testkit::qemu::PingStats, Side, Side) {
    migrate_pinging_with(qemu, b, postcopy, false)
}

/// `migrate_pinging`, with `packed=on` on both guests' NICs when `packed`.
fn migrate_pinging_with(
    qemu: QemuVersion,
    b: &Backend,
    postcopy: bool,
    packed: bool,
) -> (serde_json::Value, testkit::qemu::PingStats, Side, Side) {
    migrate_pinging_between(qemu, (b, b), postcopy, packed)
}

/// `migrate_pinging_with` from a QEMU on `b.0` to one on `b.1`.
fn migrate_pinging_between(
    qemu: QemuVersion,
    b: (&Backend, &Backend),
    postcopy: bool,
    packed: bool,
) -> (serde_json::Value, testkit::qemu::PingStats, Side, Side) {
    let (src_side, src_sock) = side("a", b.0);
    let (dst_side, dst_sock) = side("b", b.1);
    let gdir = testkit::daemon::tempdir();
    let src_dir = gdir.path().join("src");
    let dst_dir = gdir.path().join("dst");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let mig = format!("unix:{}", gdir.path().join("mig.sock").display());
    let mut src = Guest::start(
        &src_dir,
        &src_sock,
        &GuestConfig {
            qemu,
            packed,
            ..Default::default()
        },
    );
    src.wait_ready();
    let mut dst = Guest::start(
        &dst_dir,
        &dst_sock,
        &GuestConfig {
            qemu,
            incoming: Some(mig.clone()),
            packed,
            ..Default::default()
        },
    );
    assert_no_loss("before migration", ping(&mut src, 5, "0.05"), 5);
    if postcopy {
        for g in [&mut src, &mut dst] {
            g.qmp.execute(
                "migrate-set-capabilities",
                serde_json::json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
            );
        }
    }
    let count = 200;
    src.sh(&format!(
        "ping -c {count} -i 0.05 -W 5 {PEER_IP} > /tmp/mig.out 2>&1 & echo $! > /tmp/mig.pid"
    ));
    std::thread::sleep(Duration::from_secs(1));
    src.qmp.execute("migrate", serde_json::json!({"uri": mig}));
    if postcopy {
        std::thread::sleep(Duration::from_millis(200));
        src.qmp
            .execute("migrate-start-postcopy", serde_json::json!({}));
    }
    let m = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        src.qmp.wait_migrated(Duration::from_secs(120))
    }))
    .unwrap_or_else(|e| {
        let logs = |s: &Side| s.daemon.as_ref().map(|d| d.stderr()).unwrap_or_default();
        panic!(
            "{}\nsource QEMU: {}\ndestination QEMU: {}\nsource daemon:\n{}\ndestination daemon:\n{}",
            e.downcast_ref::<String>().cloned().unwrap_or_default(),
            std::fs::read_to_string(src_dir.join("qemu.err")).unwrap_or_default(),
            std::fs::read_to_string(dst_dir.join("qemu.err")).unwrap_or_default(),
            logs(&src_side),
            logs(&dst_side),
        )
    });
    dst.adopt_console_after_migration();
    dst.sh("while kill -0 $(cat /tmp/mig.pid) 2>/dev/null; do sleep 0.2; done");
    let out = dst.sh("cat /tmp/mig.out");
    let s = parse_ping(&out).unwrap_or_else(|| panic!("no ping summary:\n{out}"));
    assert_eq!(s.sent, count, "pings sent across the migration");
    (m, s, src_side, dst_side)
}

fn assert_clean(side: &Side, what: &str) {
    for d in side.daemon.iter().chain(&side.inner) {
        let log = d.stderr();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(
            errors.is_empty(),
            "{what}: the daemon logged errors: {errors:#?}"
        );
    }
}

/// Every ping answered across a migration between relays, except one the
/// source testpmd took from the guest's transmit ring after QEMU had
/// stopped its receive ring (QEMU stops the rings one at a time, receive
/// first): testpmd counts that echo as dropped. That is the device's stop
/// order, not the relay's doing, so it is allowed once, and only when
/// testpmd accounts for it.
fn assert_pings_across(
    m: &serde_json::Value,
    s: &testkit::qemu::PingStats,
    a: &mut Side,
    b: &mut Side,
    what: &str,
) {
    let dropped: Vec<u64> = [&mut *a, &mut *b]
        .into_iter()
        .map(|side| side.pmd.as_mut().map_or(0, |p| p.stop().tx_dropped))
        .collect();
    let (src_dropped, dst_dropped) = (dropped[0], dropped[1]);
    assert!(
        src_dropped <= 1 && dst_dropped == 0 && s.received + src_dropped as u32 == s.sent,
        "{what}: {} of {} pings answered across the migration, echoes testpmd dropped: \
         source {src_dropped}, destination {dst_dropped} ({m})",
        s.received,
        s.sent
    );
}

fn migration_between_relays(qemu: QemuVersion, flags: &'static [&'static str]) {
    if !ready() {
        return;
    }
    let (m, s, mut a, mut b) = migrate_pinging(qemu, &Backend::Relay(flags), false);
    assert_pings_across(&m, &s, &mut a, &mut b, &format!("{flags:?}"));
    assert_clean(&a, "source");
    assert_clean(&b, "destination");
}

/// The daemon logs dirty pages itself (shadow mode).
#[test]
fn qemu7_migration_between_relays_shadow() {
    let _one = one_at_a_time();
    migration_between_relays(QemuVersion::V7, &["--shadow", "on"]);
}

/// `--shadow auto`: testpmd logs dirty pages itself, the log is forwarded.
#[test]
fn qemu10_migration_between_relays_log_forwarded() {
    let _one = one_at_a_time();
    migration_between_relays(QemuVersion::V10, &["--shadow", "auto"]);
}

/// Packed rings migrate when the device logs by itself: QEMU 10 guests
/// with `packed=on`, testpmd logging, the log forwarded, no ping lost, and
/// the destination gets the packed positions QEMU migrated.
#[test]
fn qemu10_migration_between_relays_packed_log_forwarded() {
    let _one = one_at_a_time();
    packed_migration(&["--shadow", "off", "--packed"]);
}

/// Packed rings in shadow mode migrate with the relay's own dirty log:
/// every page the device wrote through the packed shadow rings and every
/// used descriptor and event area the SVQ wrote in the guest's rings.
#[test]
fn qemu10_migration_between_relays_packed_shadow() {
    let _one = one_at_a_time();
    packed_migration(&["--shadow", "on", "--packed"]);
}

fn packed_migration(flags: &'static [&'static str]) {
    if !ready() {
        return;
    }
    let (m, s, mut a, mut b) =
        migrate_pinging_with(QemuVersion::V10, &Backend::Relay(flags), false, true);
    assert_pings_across(&m, &s, &mut a, &mut b, &format!("packed ({flags:?})"));
    // QEMU 10 moved the relay's state too: packed ring records (positions
    // with their wrap counters), loaded by the destination.
    let log = b.daemon.as_ref().unwrap().stderr();
    assert!(log.contains("device state loaded"), "{log}");
    assert_clean(&a, "source");
    assert_clean(&b, "destination");
}

/// Heterogeneous hosts: a packed guest leaves a relay in passthrough on a
/// device with packed rings (testpmd) for a relay with `--shadow on
/// --packed` in front of a device without them (a second relay, without
/// `--packed`, on testpmd). The destination loads the packed positions,
/// stays in shadow mode although the source ran in passthrough, and relays
/// the packed rings to split ones; no ping is lost.
#[test]
fn qemu10_packed_migration_to_a_split_only_device() {
    let _one = one_at_a_time();
    if !ready() {
        return;
    }
    let src = Backend::Relay(&["--shadow", "off", "--packed"]);
    let dst = Backend::Chain(&["--shadow", "on", "--packed"], &["--shadow", "off"]);
    let (m, s, mut a, mut b) = migrate_pinging_between(QemuVersion::V10, (&src, &dst), false, true);
    // (The destination QEMU is gone by now; its relay's counters stay.)
    // Every ping after the switchover went through the destination's SVQs.
    let q = b.qmp.as_mut().unwrap().query("net0");
    assert_eq!(q["mode"], "shadow", "{q}");
    for qi in 0..2 {
        let relayed = testkit::qmp::u64_field(testkit::qmp::queue_info(&q, qi), "relayed");
        assert!(relayed >= 50, "queue {qi}: {q}");
    }
    assert_pings_across(&m, &s, &mut a, &mut b, "to a split-only device");
    let log = b.daemon.as_ref().unwrap().stderr();
    assert!(log.contains("device state loaded"), "{log}");
    assert!(log.contains("staying in shadow mode"), "{log}");
    assert_clean(&a, "source");
    assert_clean(&b, "destination");
}

/// The software NIC: `--shadow auto` switches to shadow for the migration
/// (the software device cannot log) and the daemon logs every page.
#[test]
fn qemu7_migration_on_the_software_nic() {
    let _one = one_at_a_time();
    migration_on_the_software_nic(QemuVersion::V7);
}

/// QEMU 10 also resets the device (RESET_DEVICE) and transfers the device
/// state through SET_DEVICE_STATE_FD.
#[test]
fn qemu10_migration_on_the_software_nic() {
    let _one = one_at_a_time();
    migration_on_the_software_nic(QemuVersion::V10);
}

/// The same with packed rings: the daemon logs the pages of the guest's
/// packed rings (used descriptors written in the descriptor ring, the
/// device area) and of the buffers, and moves the positions with their
/// wrap counters to the destination's software NIC.
#[test]
fn qemu10_migration_on_the_software_nic_packed() {
    let _one = one_at_a_time();
    migration_on_the_software_nic_with(QemuVersion::V10, &["--shadow", "auto", "--packed"]);
}

fn migration_on_the_software_nic(qemu: QemuVersion) {
    migration_on_the_software_nic_with(qemu, &["--shadow", "auto"]);
}

fn migration_on_the_software_nic_with(qemu: QemuVersion, flags: &'static [&'static str]) {
    let Some(ns) = tap_ready() else {
        return;
    };
    let packed = flags.contains(&"--packed");
    let (m, s, mut a, b) = migrate_pinging_with(qemu, &Backend::Tap(flags, ns), false, packed);
    assert_eq!(
        s.received, s.sent,
        "{} of {} pings answered ({m})",
        s.received, s.sent
    );
    let ev = a
        .qmp
        .as_mut()
        .unwrap()
        .wait_event("SHADOW_VQ_CHANGED", Duration::from_secs(5))
        .expect("the source never went to shadow for dirty logging");
    assert_eq!(ev["data"]["enabled"], true, "{ev}");
    assert_clean(&a, "source");
    assert_clean(&b, "destination");
}

/// Postcopy with the VMM that defined it, on the software NIC (the only
/// backend whose memory accesses the daemon's userfaultfd sees), where the
/// host supports it.
#[test]
fn qemu10_postcopy_on_the_software_nic() {
    let _one = one_at_a_time();
    let Some(ns) = tap_ready() else {
        return;
    };
    if let Err(why) = svq_relay::migration::userfaultfd::offer() {
        eprintln!("skipping: postcopy: {why}");
        return;
    }
    let (m, s, a, b) = migrate_pinging(
        QemuVersion::V10,
        &Backend::Tap(&["--shadow", "auto"], ns),
        true,
    );
    assert_eq!(s.received, s.sent, "postcopy: pings lost ({m})");
    // The destination daemon went through ADVISE .. END.
    let log = b.daemon.as_ref().unwrap().stderr();
    for step in ["postcopy advised", "postcopy ended"] {
        assert!(
            log.contains(step),
            "destination never logged {step:?}:\n{log}"
        );
    }
    assert_clean(&a, "source");
    assert_clean(&b, "destination");
}

#[test]
fn qemu10_tap_passthrough() {
    let _one = one_at_a_time();
    tap_nic(QemuVersion::V10, "off", 0);
}

// --- migration downtime -------------------------------------------------------

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Not a test: the migration downtime benchmark (scripts/bench-downtime.sh).
/// The same guest migrates with testpmd as QEMU's back-end directly, and
/// through svq-relay in passthrough with the log forwarded to testpmd
/// (`--shadow auto`) and in shadow (`--shadow on`), interleaved over
/// ROUNDS rounds; prints QEMU's downtime and total-time medians.
#[test]
#[ignore]
fn downtime_table() {
    let _one = one_at_a_time();
    if !ready() {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let qemu = match std::env::var("QEMU").as_deref() {
        Ok("10") => QemuVersion::V10,
        _ => QemuVersion::V7,
    };
    let configs: [(&str, Backend); 3] = [
        ("direct (testpmd)", Backend::Direct),
        (
            "relay passthrough, log forwarded",
            Backend::Relay(&["--shadow", "auto"]),
        ),
        ("relay shadow", Backend::Relay(&["--shadow", "on"])),
    ];
    let mut down: Vec<Vec<u64>> = vec![Vec::new(); configs.len()];
    let mut total: Vec<Vec<u64>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for (i, (name, b)) in configs.iter().enumerate() {
            let (m, s, _a, _b) = migrate_pinging(qemu, b, false);
            let (d, t) = (
                m["downtime"].as_u64().unwrap(),
                m["total-time"].as_u64().unwrap(),
            );
            eprintln!(
                "round {round} {name}: downtime {d} ms, total {t} ms, pings {}/{}",
                s.received, s.sent
            );
            down[i].push(d);
            total[i].push(t);
        }
    }
    let base = median(&mut down[0].clone()).max(1);
    println!(
        "\n| {qemu:?}, {rounds} rounds | downtime (median) | vs direct | total-time (median) |"
    );
    println!("|---|---|---|---|");
    for (i, (name, _)) in configs.iter().enumerate() {
        let d = median(&mut down[i]);
        let t = median(&mut total[i]);
        println!(
            "| {name} | {d} ms | {:+} ms | {t} ms |",
            d as i64 - base as i64
        );
    }
}
