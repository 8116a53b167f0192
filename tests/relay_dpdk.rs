//! svq-relay between two DPDK testpmd processes (shared/PEERS.md):
//!
//! ```text
//! testpmd virtio-user (guest side) -> svq-relay --backend vhost-user:SOCK -> testpmd net_vhost (device side)
//! ```
//!
//! Both testpmds forward in `io` mode: the guest starts with `--tx-first`
//! (one burst of 32 per queue pair), the device sends every packet it
//! receives back on the same pair, so bursts circulate guest TX -> relay ->
//! device RX -> device TX -> relay -> guest RX -> guest TX for as long as the
//! test runs: traffic both ways through the relay.
//!
//! Counting: the guest is stopped first (SIGINT, final statistics), then the
//! relay is queried, then the device is stopped. A packet is counted by the
//! sender when the ring accepted it and by the receiver when it took it, so
//! the two ends of one direction agree up to what was in between at the
//! stop: at most the circulating bursts ([`SLACK`] per pair). The relay's
//! `relayed` counters (shadow mode) sit between the two ends of the same
//! direction, within the same slack.
//!
//! Skipped (with a message) when dpdk-testpmd is missing, failed when
//! SVQ_RELAY_REQUIRE_PEERS=1 (CI).

mod common;

use common::peers::{testpmd_or_skip, TESTPMD};

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::daemon::{signal, tempdir, wait_timeout};
use common::qmp::u64_field;
use common::{Daemon, Qmp};
use serde_json::{json, Value};

/// testpmd's default burst size.
const BURST: u64 = 32;
/// What may be between the two ends of one direction per queue pair when the
/// guest stops: the circulating burst (the guest's `--tx-first`) plus one
/// burst the restarted device may inject with its own `--tx-first`.
const SLACK: u64 = 2 * BURST;
/// Bound on every wait for a testpmd.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Two testpmds and the daemon share two cores: one scenario at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    rx: u64,
    tx: u64,
}

struct Pmd {
    child: Option<Child>,
    log: PathBuf,
    prefix: String,
    role: &'static str,
}

impl Pmd {
    /// The device: a net_vhost port listening on `sock`, forwarding each
    /// queue's RX back out on the same queue. `tx_first`: also inject one
    /// burst per queue when forwarding starts.
    fn device(dir: &Path, sock: &Path, pairs: u16, tx_first: bool) -> Pmd {
        let _ = std::fs::remove_file(sock);
        let vdev = format!("net_vhost0,iface={},queues={pairs}", sock.display());
        let p = Pmd::spawn("device", dir, "0@0,1@0", &vdev, pairs, tx_first);
        p.wait_log("forwards packets on");
        p
    }

    /// The device connecting to the daemon (`client=1`; net_vhost retries
    /// about once a second until the socket exists).
    fn device_client(dir: &Path, sock: &Path) -> Pmd {
        let vdev = format!("net_vhost0,iface={},queues=1,client=1", sock.display());
        Pmd::spawn("device", dir, "0@0,1@0", &vdev, 1, false)
    }

    /// The guest: virtio-user on the daemon's socket, with `--tx-first`.
    fn guest(dir: &Path, sock: &Path, pairs: u16) -> Pmd {
        let vdev = format!("net_virtio_user0,path={},queues={pairs}", sock.display());
        let p = Pmd::spawn("guest", dir, "0@1,1@1", &vdev, pairs, true);
        p.wait_log("forwards packets on");
        p
    }

    fn spawn(
        role: &'static str,
        dir: &Path,
        lcores: &str,
        vdev: &str,
        pairs: u16,
        tx_first: bool,
    ) -> Pmd {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "svqrel-{}-{}-{role}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
        let log = dir.join(format!("{prefix}.log"));
        let out = File::create(&log).unwrap();
        let q = pairs.to_string();
        // `timeout` bounds a testpmd the test never stops; its own process
        // group lets Drop kill testpmd with it (killing `timeout` alone
        // would leave testpmd running).
        let mut cmd = Command::new("timeout");
        cmd.process_group(0);
        cmd.args(["-s", "KILL", "300", TESTPMD])
            .args(["--lcores", lcores, "--no-huge", "-m", "256", "--no-pci"])
            .args(["--file-prefix", &prefix, "--vdev", vdev, "--"])
            .args(["--total-num-mbufs=8192", "--stats-period", "1"])
            .args(["--auto-start", "--forward-mode=io"])
            .arg(format!("--rxq={q}"))
            .arg(format!("--txq={q}"));
        if tx_first {
            cmd.arg("--tx-first");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn dpdk-testpmd");
        Pmd {
            child: Some(child),
            log,
            prefix,
            role,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + PEER_TIMEOUT;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{} testpmd: no {needle:?} within {PEER_TIMEOUT:?}:\n{}",
                self.role,
                self.log_text()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// Port counters from the latest periodic statistics screen.
    fn port_counts(&self) -> Counts {
        let log = self.log_text();
        Counts {
            rx: last_number(&log, "RX-packets:").unwrap_or(0),
            tx: last_number(&log, "TX-packets:").unwrap_or(0),
        }
    }

    /// Waits (bounded) until the port has received and sent `n` more
    /// packets than `from`.
    fn wait_traffic(&self, from: Counts, n: u64, what: &str) -> Counts {
        let deadline = Instant::now() + PEER_TIMEOUT;
        loop {
            let c = self.port_counts();
            if c.rx >= from.rx + n && c.tx >= from.tx + n {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} testpmd counters stuck at {c:?} (from {from:?})",
                self.role
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// SIGINT, bounded wait; the accumulated forward statistics.
    fn stop(&mut self) -> Counts {
        let Some(mut child) = self.child.take() else {
            return Counts::default();
        };
        signal(child.id(), libc::SIGINT);
        if wait_timeout(&mut child, PEER_TIMEOUT).is_none() {
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} testpmd did not exit on SIGINT:\n{}",
                self.role,
                self.log_text()
            );
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
        let log = self.log_text();
        let at = log
            .rfind("Accumulated forward statistics")
            .unwrap_or_else(|| panic!("{}: no final statistics:\n{log}", self.role));
        let block = &log[at..];
        Counts {
            rx: last_number(block, "RX-packets:").unwrap_or(0),
            tx: last_number(block, "TX-packets:").unwrap_or(0),
        }
    }
}

impl Pmd {
    /// SIGKILL, no statistics: a device that dies rather than exits.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal_group(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

impl Drop for Pmd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The whole group: `timeout` and testpmd.
            signal_group(c.id(), libc::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("---- {} testpmd log ----\n{}", self.role, self.log_text());
            }
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

/// Sends `sig` to the process group `pgid` (a child spawned as the leader
/// of its own group).
fn signal_group(pgid: u32, sig: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        // SAFETY: kill takes no pointers; a negative pid names the group our
        // unreaped child leads, so it cannot have been reused.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// The number after the last occurrence of `key`.
fn last_number(text: &str, key: &str) -> Option<u64> {
    let at = text.rfind(key)? + key.len();
    text[at..].split_whitespace().next()?.parse().ok()
}

/// The daemon relaying to the device socket `dev_sock`.
fn relay(dev_sock: &Path, extra: &[&str]) -> Daemon {
    let backend = format!("vhost-user:{}", dev_sock.display());
    let mut args = vec!["--backend", &backend];
    args.extend_from_slice(extra);
    Daemon::spawn(&args)
}

/// (RX relayed, TX relayed) summed over all queues; no queue has errors.
fn relayed(dev: &Value) -> Counts {
    let mut c = Counts::default();
    for q in dev["queues"].as_array().expect("queues") {
        assert_eq!(u64_field(q, "errors"), 0, "{dev}");
        assert!(q["broken"].is_null(), "{dev}");
        if u64_field(q, "index") & 1 == 0 {
            c.rx += u64_field(q, "relayed");
        } else {
            c.tx += u64_field(q, "relayed");
        }
    }
    c
}

/// `a` and `b` count the same packets, `b` up to `slack` behind or ahead.
fn close(what: &str, a: u64, b: u64, slack: u64) {
    assert!(
        a.abs_diff(b) <= slack,
        "{what}: {a} vs {b} differ by more than {slack}"
    );
}

/// Both directions: what one end sent, the other received.
fn check_ends(guest: Counts, device: Counts, pairs: u16) {
    let slack = SLACK * u64::from(pairs);
    assert!(
        guest.tx >= 1000 && guest.rx >= 1000,
        "hardly any traffic: guest {guest:?}"
    );
    assert!(
        device.rx <= guest.tx,
        "device RX {device:?} > guest TX {guest:?}"
    );
    close("guest TX vs device RX", guest.tx, device.rx, slack);
    close("device TX vs guest RX", device.tx, guest.rx, slack);
}

/// One run with the guest and device up from the start.
fn steady(mode: &str, pairs: u16) {
    steady_with(mode, pairs, &[]);
}

/// `steady` with more daemon arguments (`--poll`, `--cpu-affinity`).
fn steady_with(mode: &str, pairs: u16, extra: &[&str]) {
    let _g = serial();
    let dir = tempdir();
    let dev_sock = dir.path().join("dev.sock");
    let mut device = Pmd::device(dir.path(), &dev_sock, pairs, false);
    let q = pairs.to_string();
    let mut args = vec!["--shadow", mode, "--queues", &q];
    args.extend_from_slice(extra);
    let d = relay(&dev_sock, &args);
    let mut guest = Pmd::guest(dir.path(), &d.socket, pairs);
    device.wait_traffic(Counts::default(), 5000, "steady");
    let g = guest.stop();
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let dev = qmp.query("net0");
    let dv = device.stop();
    check_ends(g, dv, pairs);
    assert_eq!(dev["backend"], "vhost-user", "{dev}");
    let r = relayed(&dev);
    let slack = SLACK * u64::from(pairs);
    if mode == "on" {
        assert_eq!(dev["mode"], "shadow", "{dev}");
        close("relay TX vs guest TX", r.tx, g.tx, slack);
        close("relay TX vs device RX", r.tx, dv.rx, slack);
        close("relay RX vs device TX", r.rx, dv.tx, slack);
        close("relay RX vs guest RX", r.rx, g.rx, slack);
        // Every queue pair carried traffic (the device got every ring).
        for qi in dev["queues"].as_array().unwrap() {
            assert!(u64_field(qi, "relayed") > 0, "idle queue: {dev}");
        }
    } else {
        assert_eq!(dev["mode"], "passthrough", "{dev}");
        assert_eq!(r, Counts::default(), "passthrough relays nothing: {dev}");
    }
}

#[test]
fn parse_counters() {
    let log =
        "  RX-packets: 5  RX-missed: 0\n  TX-packets: 7\n  RX-packets: 115996  RX-dropped: 0\n";
    assert_eq!(last_number(log, "RX-packets:"), Some(115996));
    assert_eq!(last_number(log, "TX-packets:"), Some(7));
    assert_eq!(last_number(log, "nothing:"), None);
}

#[test]
fn relay_dpdk_passthrough() {
    if !testpmd_or_skip() {
        return;
    }
    steady("off", 1);
}

/// Four pairs in shadow: guest memory plus the shadow rings of eight queues
/// must fit DPDK's eight memory regions (one shared shadow area).
#[test]
fn relay_dpdk_shadow_four_pairs() {
    if !testpmd_or_skip() {
        return;
    }
    steady("on", 4);
}

/// A worker that always polls: testpmd virtio-user and net_vhost both
/// honour VRING_USED_F_NO_NOTIFY / VRING_AVAIL_F_NO_INTERRUPT, so nothing
/// but the worker's passes moves their packets.
#[test]
fn relay_dpdk_shadow_polling_always() {
    if !testpmd_or_skip() {
        return;
    }
    steady_with("on", 1, &["--poll", "always"]);
}

/// Adaptive polling on two pairs with their workers pinned, one per CPU:
/// the workers go to sleep and wake again as testpmd's bursts come and go.
#[test]
fn relay_dpdk_shadow_polling_adaptive_pinned() {
    if !testpmd_or_skip() {
        return;
    }
    steady_with(
        "on",
        2,
        &[
            "--poll",
            "adaptive",
            "--poll-budget-us",
            "20",
            "--cpu-affinity",
            "0-1",
        ],
    );
}

#[test]
fn relay_dpdk_across_switches() {
    if !testpmd_or_skip() {
        return;
    }
    across_switches(&[]);
}

/// Switching hands rings between a polling worker and the device: the guest
/// must not be left with NO_NOTIFY, nor a chain on a ring nobody polls.
#[test]
fn relay_dpdk_across_switches_polling() {
    if !testpmd_or_skip() {
        return;
    }
    across_switches(&["--poll", "adaptive"]);
}

fn across_switches(extra: &[&str]) {
    let _g = serial();
    let dir = tempdir();
    let dev_sock = dir.path().join("dev.sock");
    let mut device = Pmd::device(dir.path(), &dev_sock, 2, false);
    let mut args = vec!["--shadow", "off", "--queues", "2"];
    args.extend_from_slice(extra);
    let d = relay(&dev_sock, &args);
    let mut guest = Pmd::guest(dir.path(), &d.socket, 2);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let mut seen = device.wait_traffic(Counts::default(), 1000, "before switching");
    for i in 0..10 {
        let enable = i % 2 == 0;
        assert_eq!(
            qmp.enable_shadow("net0", enable),
            json!({"return": {}}),
            "switch {i}"
        );
        // Traffic flows in each mode before the next switch.
        seen = device.wait_traffic(seen, 200, &format!("after switch {i}"));
    }
    // Ends in passthrough after 5 round trips; once more to shadow, where
    // the relay counts.
    assert_eq!(qmp.enable_shadow("net0", true), json!({"return": {}}));
    let before = relayed(&qmp.query("net0"));
    device.wait_traffic(seen, 1000, "after the last switch");
    let g = guest.stop();
    let dev = qmp.query("net0");
    let dv = device.stop();
    assert_eq!(dev["mode"], "shadow", "{dev}");
    check_ends(g, dv, 2);
    let after = relayed(&dev);
    assert!(
        after.rx > before.rx && after.tx > before.tx,
        "relay counters did not move in shadow: {before:?} -> {after:?}"
    );
}

/// The device-side testpmd goes away under traffic (SIGINT, or SIGKILL in
/// half the rounds) and comes back on the same socket, ten times,
/// alternating shadow and passthrough: the relay
/// reconnects each time, the VMM is not disturbed, traffic resumes both ways. The restarted device injects a
/// burst of its own (`--tx-first`): testpmd drops whatever its queues hold
/// when forwarding starts, which may be the burst the guest had circulating.
#[test]
fn relay_dpdk_device_restart() {
    if !testpmd_or_skip() {
        return;
    }
    let _g = serial();
    let dir = tempdir();
    let dev_sock = dir.path().join("dev.sock");
    let mut device = Pmd::device(dir.path(), &dev_sock, 1, false);
    let d = relay(&dev_sock, &["--shadow", "on"]);
    let mut guest = Pmd::guest(dir.path(), &d.socket, 1);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    device.wait_traffic(Counts::default(), 1000, "first device");
    const ROUNDS: u64 = 10;
    for round in 0..ROUNDS {
        let mode = if round % 2 == 0 {
            "shadow"
        } else {
            "passthrough"
        };
        assert_eq!(
            qmp.enable_shadow("net0", mode == "shadow"),
            json!({"return": {}}),
            "round {round}"
        );
        // Rounds 2, 3 of every four kill the device instead of stopping it.
        if round % 4 >= 2 {
            device.kill();
        } else {
            let old = device.stop();
            assert!(old.rx >= 1000, "round {round}: {old:?}");
        }
        let before = relayed(&qmp.query("net0"));
        device = Pmd::device(dir.path(), &dev_sock, 1, true);
        device.wait_traffic(
            Counts::default(),
            1000,
            &format!("restarted device ({mode})"),
        );
        let dev = qmp.query("net0");
        assert_eq!(dev["mode"], mode, "{dev}");
        assert_eq!(dev["started"], true, "{dev}");
        let after = relayed(&dev);
        if mode == "shadow" {
            assert!(
                after.rx > before.rx + 500 && after.tx > before.tx + 500,
                "round {round}: relay counters {before:?} -> {after:?}"
            );
        } else {
            assert_eq!(after, before, "passthrough relays nothing");
        }
    }
    let g = guest.stop();
    device.stop();
    // The guest never saw a reset: one session, traffic throughout.
    let least = 1000 * (ROUNDS + 1);
    assert!(g.rx >= least && g.tx >= least, "{g:?}");
    assert!(
        !d.stderr().contains("ERROR"),
        "errors in the daemon log:\n{}",
        d.stderr()
    );
}

/// `--backend vhost-user-server:PATH`: the daemon listens and the device
/// (net_vhost `client=1`, like an OVS-DPDK `dpdkvhostuserclient` port)
/// connects; the daemon serves the VMM once the device is there.
#[test]
fn relay_dpdk_device_connects_to_the_daemon() {
    if !testpmd_or_skip() {
        return;
    }
    let _g = serial();
    let dir = tempdir();
    let dev_sock = dir.path().join("dev.sock");
    let work = tempdir();
    let args: Vec<String> = [
        "--socket-path",
        &work.path().join("vu.sock").display().to_string(),
        "--qmp",
        &work.path().join("qmp.sock").display().to_string(),
        "--backend",
        &format!("vhost-user-server:{}", dev_sock.display()),
        "--shadow",
        "on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let d = Daemon::spawn_custom(work, &args);
    let mut device = Pmd::device_client(dir.path(), &dev_sock);
    // The daemon opens its VMM socket only once the device is connected.
    d.wait_ready(true);
    // testpmd drops what its queues hold when forwarding starts: the guest's
    // burst must come after that.
    device.wait_log("forwards packets on");
    let mut guest = Pmd::guest(dir.path(), &d.socket, 1);
    device.wait_traffic(Counts::default(), 2000, "device connected to the daemon");
    let g = guest.stop();
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let dev = qmp.query("net0");
    let dv = device.stop();
    check_ends(g, dv, 1);
    let r = relayed(&dev);
    close("relay TX vs guest TX", r.tx, g.tx, SLACK);
    close("relay RX vs guest RX", r.rx, g.rx, SLACK);
}
