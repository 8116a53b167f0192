//! DPDK testpmd's virtio-user (a VMM + guest driver nobody here wrote) as the
//! frontend against the daemon on the sim loopback. testpmd runs in `io`
//! mode with `--tx-first`: one burst per queue circulates TX -> sim loopback
//! -> RX -> TX for as long as it runs. Skipped (with a message) when
//! dpdk-testpmd is not installed; CI installs it.

mod common;

use common::peers::{testpmd_or_skip, TESTPMD};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::daemon::{signal, wait_timeout};
use common::qmp::{queue_info, u64_field};
use common::{Daemon, Qmp};
use serde_json::{json, Value};

/// testpmd's default burst: --tx-first puts one burst per queue into
/// circulation, and without drops no more than that is ever in flight.
const BURST: u64 = 32;

struct TestPmd {
    child: Option<Child>,
    log: PathBuf,
    prefix: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct FwdStats {
    rx: u64,
    rx_dropped: u64,
    tx: u64,
    tx_dropped: u64,
}

impl TestPmd {
    /// Starts testpmd on `socket` with `queues` queue pairs and waits
    /// (bounded) until it forwards.
    fn start(dir: &Path, socket: &Path, queues: u16) -> TestPmd {
        TestPmd::start_with(dir, socket, queues, "")
    }

    /// `vdev_opts` is appended to the virtio-user vdev arguments.
    fn start_with(dir: &Path, socket: &Path, queues: u16, vdev_opts: &str) -> TestPmd {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "svqt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let log = dir.join(format!("{prefix}.log"));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        // Main and forwarding lcore on the last CPU.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu = cpus - 1;
        let q = queues.to_string();
        let child = Command::new(TESTPMD)
            .args([
                "--lcores",
                &format!("0@{cpu},1@{cpu}"),
                "--no-huge",
                "-m",
                "256",
                "--no-pci",
                "--file-prefix",
                &prefix,
                "--vdev",
                &format!(
                    "net_virtio_user0,path={},queues={q}{vdev_opts}",
                    socket.display()
                ),
                "--",
                "--total-num-mbufs=8192",
                "--stats-period",
                "1",
                "--auto-start",
                "--forward-mode=io",
                "--tx-first",
                &format!("--rxq={q}"),
                &format!("--txq={q}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn dpdk-testpmd");
        let mut t = TestPmd {
            child: Some(child),
            log,
            prefix,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if t.log_text().contains("start packet forwarding") {
                break;
            }
            if let Some(st) = t.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("testpmd exited early ({st}):\n{}", t.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "testpmd did not start forwarding:\n{}",
                t.log_text()
            );
            sleep(Duration::from_millis(50));
        }
        t
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGINT (testpmd prints its final statistics), bounded wait; returns
    /// the accumulated forward statistics.
    fn stop(&mut self) -> FwdStats {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGINT);
        let st = wait_timeout(&mut child, Duration::from_secs(30));
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("testpmd did not exit on SIGINT:\n{}", self.log_text());
        }
        let log = self.log_text();
        parse_stats(&log).unwrap_or_else(|| panic!("no final statistics in testpmd output:\n{log}"))
    }
}

impl Drop for TestPmd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

/// The "Accumulated forward statistics for all ports" block of testpmd's
/// final output.
fn parse_stats(log: &str) -> Option<FwdStats> {
    let at = log.rfind("Accumulated forward statistics")?;
    let block = &log[at..];
    let num = |key: &str| -> Option<u64> {
        let i = block.find(key)? + key.len();
        block[i..].split_whitespace().next()?.parse().ok()
    };
    Some(FwdStats {
        rx: num("RX-packets:")?,
        rx_dropped: num("RX-dropped:")?,
        tx: num("TX-packets:")?,
        tx_dropped: num("TX-dropped:")?,
    })
}

/// (sum of RX relayed, sum of TX relayed) over all queues.
fn relayed(dev: &Value) -> (u64, u64) {
    let mut rx = 0;
    let mut tx = 0;
    for q in dev["queues"].as_array().expect("queues") {
        let r = u64_field(q, "relayed");
        if u64_field(q, "index") & 1 == 0 {
            rx += r;
        } else {
            tx += r;
        }
        assert_eq!(u64_field(q, "errors"), 0, "{dev}");
        assert!(q["broken"].is_null(), "{dev}");
    }
    (rx, tx)
}

/// testpmd's own invariants for io mode on a loopback: nothing dropped, and
/// traffic actually flowed.
fn check_testpmd(s: &FwdStats) {
    assert_eq!(s.tx_dropped, 0, "{s:?}");
    assert_eq!(s.rx_dropped, 0, "{s:?}");
    assert!(s.rx >= 1000, "hardly any traffic: {s:?}");
    assert!(s.tx >= s.rx, "{s:?}");
}

#[test]
fn parse_testpmd_statistics() {
    let log = "  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++\n  \
               RX-packets: 115996         RX-dropped: 0             RX-total: 115996\n  \
               TX-packets: 116028         TX-dropped: 3             TX-total: 116031\n";
    let s = parse_stats(log).unwrap();
    assert_eq!(
        (s.rx, s.rx_dropped, s.tx, s.tx_dropped),
        (115996, 0, 116028, 3)
    );
    assert!(parse_stats("nothing").is_none());
}

#[test]
fn testpmd_passthrough() {
    if !testpmd_or_skip() {
        return;
    }
    let d = Daemon::spawn(&["--shadow", "off"]);
    let mut pmd = TestPmd::start(d.dir.path(), &d.socket, 1);
    sleep(Duration::from_secs(2));
    let s = pmd.stop();
    check_testpmd(&s);
    let mut q = Qmp::connect_ready(&d.qmp);
    let dev = q.query("net0");
    assert_eq!(dev["mode"], "passthrough", "{dev}");
    assert_eq!(relayed(&dev), (0, 0), "passthrough relays nothing: {dev}");
}

#[test]
fn testpmd_shadow_counters_agree() {
    if !testpmd_or_skip() {
        return;
    }
    let d = Daemon::spawn(&["--shadow", "on", "--queues", "2"]);
    let mut pmd = TestPmd::start(d.dir.path(), &d.socket, 2);
    sleep(Duration::from_secs(2));
    let s = pmd.stop();
    check_testpmd(&s);
    let mut q = Qmp::connect_ready(&d.qmp);
    let dev = q.query("net0");
    assert_eq!(dev["mode"], "shadow", "{dev}");
    let (rx, tx) = relayed(&dev);
    // Every TX buffer the relay completed was one testpmd counted as sent;
    // only the circulating bursts may have been left in flight at the stop.
    assert!(
        tx <= s.tx && s.tx <= tx + 2 * BURST,
        "relay TX {tx} vs testpmd {s:?}"
    );
    // The loopback returns every TX packet on RX; testpmd may not have
    // picked up the last ones before it stopped.
    assert!(rx <= tx, "relay RX {rx} > TX {tx}");
    assert!(
        s.rx <= rx && rx <= s.rx + 2 * BURST,
        "relay RX {rx} vs testpmd {s:?}"
    );
    // The guest indexes the relay reports are its counts modulo 2^16:
    // the relay saw every buffer from index 0.
    for qi in 0..4 {
        let e = queue_info(&dev, qi);
        assert_eq!(
            u64_field(e, "used_idx"),
            u64_field(e, "relayed") % 65536,
            "queue {qi}: {dev}"
        );
    }
}

#[test]
fn testpmd_across_switches() {
    if !testpmd_or_skip() {
        return;
    }
    let d = Daemon::spawn(&["--shadow", "off"]);
    let mut pmd = TestPmd::start(d.dir.path(), &d.socket, 1);
    let mut q = Qmp::connect_ready(&d.qmp);
    sleep(Duration::from_millis(500));
    let switches = 21;
    for i in 0..switches {
        let enable = i % 2 == 0;
        assert_eq!(
            q.enable_shadow("net0", enable),
            json!({"return": {}}),
            "switch {i}"
        );
        // Pacing only: let the circulating burst go round in each mode.
        sleep(Duration::from_millis(50));
    }
    // Ends in shadow: traffic must still be moving through the relay.
    let (rx1, tx1) = relayed(&q.query("net0"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (rx2, tx2) = relayed(&q.query("net0"));
        if rx2 > rx1 + 1000 && tx2 > tx1 + 1000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "traffic stopped after {switches} switches: relayed rx {rx1}->{rx2} tx {tx1}->{tx2}\n{}",
            pmd.log_text()
        );
        sleep(Duration::from_millis(100));
    }
    assert_eq!(q.enable_shadow("net0", false), json!({"return": {}}));
    sleep(Duration::from_millis(300));
    let s = pmd.stop();
    check_testpmd(&s);
    let dev = q.query("net0");
    assert_eq!(dev["mode"], "passthrough", "{dev}");
    let (rx, tx) = relayed(&dev);
    assert!(tx <= s.tx, "relay TX {tx} vs testpmd {s:?}");
    assert!(rx <= s.rx + BURST, "relay RX {rx} vs testpmd {s:?}");
}

/// A second testpmd after the first one quit (a VMM restart with a real
/// peer), with virtio-user's in-order and mergeable buffers switched off.
#[test]
fn testpmd_restart_shadow() {
    if !testpmd_or_skip() {
        return;
    }
    let d = Daemon::spawn(&["--shadow", "on"]);
    let mut total_tx = 0;
    for (round, opts) in ["", ",in_order=0,mrg_rxbuf=0"].into_iter().enumerate() {
        let mut pmd = TestPmd::start_with(d.dir.path(), &d.socket, 1, opts);
        sleep(Duration::from_secs(1));
        let s = pmd.stop();
        check_testpmd(&s);
        total_tx += s.tx;
        let mut q = Qmp::connect_ready(&d.qmp);
        let dev = q.query("net0");
        let (rx, tx) = relayed(&dev);
        // Counters are cumulative over the daemon's lifetime.
        assert!(
            tx <= total_tx && total_tx <= tx + BURST * (round as u64 + 1),
            "round {round}: relay TX {tx} vs testpmd total {total_tx}"
        );
        assert!(rx <= tx, "round {round}: {dev}");
    }
}
