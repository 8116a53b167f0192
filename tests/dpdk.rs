//! DPDK testpmd's virtio-user (a VMM + guest driver nobody here wrote) as the
//! frontend against the daemon on the sim loopback. testpmd runs in `io`
//! mode with `--tx-first`: one burst per queue circulates TX -> sim loopback
//! -> RX -> TX for as long as it runs. Skipped (with a message) when
//! dpdk-testpmd is not installed; CI installs it.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::peers::testpmd_or_skip;
use testkit::qmp::{queue_info, u64_field};
use testkit::testpmd::{FinalStats, Testpmd};
use testkit::{Daemon, Qmp};

/// testpmd's default burst: --tx-first puts one burst per queue into
/// circulation, and without drops no more than that is ever in flight.
const BURST: u64 = 32;

/// testpmd (virtio-user, io forwarding, `--tx-first`) on the daemon's
/// socket with `queues` pairs, forwarding; `vdev_opts` go to the vdev.
fn guest_pmd(dir: &Path, socket: &Path, queues: u16, vdev_opts: &str) -> Testpmd {
    // Main and forwarding lcore on the last CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut pmd = Testpmd::virtio_user(socket)
        .dir(dir)
        .queues(queues)
        .cpu(cpus - 1)
        .tx_first()
        .vdev_opts(vdev_opts)
        .spawn();
    pmd.wait_forwarding();
    pmd
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

/// What a shadow-mode relay counted agrees with testpmd's final counts;
/// returns the relay's (RX, TX).
fn relayed_agrees(dev: &Value, s: &FinalStats) -> (u64, u64) {
    let (rx, tx) = relayed(dev);
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
    (rx, tx)
}

/// testpmd's own invariants for io mode on a loopback: nothing dropped, and
/// traffic actually flowed.
fn check_testpmd(s: &FinalStats) {
    assert_eq!(s.tx_dropped, 0, "{s:?}");
    assert_eq!(s.rx_dropped, 0, "{s:?}");
    assert!(s.rx >= 1000, "hardly any traffic: {s:?}");
    assert!(s.tx >= s.rx, "{s:?}");
}

#[test]
fn testpmd_passthrough() {
    if !testpmd_or_skip() {
        return;
    }
    let d = Daemon::spawn(&["--shadow", "off"]);
    let mut pmd = guest_pmd(d.dir.path(), &d.socket, 1, "");
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
    shadow_counters_agree(&[], "");
}

/// `--packed`: testpmd's virtio-user with `packed_vq=1`, the sim a
/// packed-ring device and the shadow rings packed too.
#[test]
fn testpmd_packed_shadow_counters_agree() {
    shadow_counters_agree(&["--packed"], ",packed_vq=1");
}

/// Two pairs in shadow mode from the start: what the relay counts agrees
/// with what testpmd counts.
fn shadow_counters_agree(flags: &[&str], vdev_opts: &str) {
    if !testpmd_or_skip() {
        return;
    }
    let mut args = vec!["--shadow", "on", "--queues", "2"];
    args.extend_from_slice(flags);
    let d = Daemon::spawn(&args);
    let mut pmd = guest_pmd(d.dir.path(), &d.socket, 2, vdev_opts);
    let mut q = Qmp::connect_ready(&d.qmp);
    let packed = !vdev_opts.is_empty();
    assert_eq!(q.query("net0")["packed"], packed);
    sleep(Duration::from_secs(2));
    let s = pmd.stop();
    check_testpmd(&s);
    let dev = q.query("net0");
    assert_eq!(dev["mode"], "shadow", "{dev}");
    relayed_agrees(&dev, &s);
    // The guest indexes the relay reports are its counts modulo 2^16:
    // the relay saw every buffer from index 0. (A packed ring's position
    // counts descriptors, not buffers.)
    if !packed {
        for qi in 0..4 {
            let e = queue_info(&dev, qi);
            assert_eq!(
                u64_field(e, "used_idx"),
                u64_field(e, "relayed") % 65536,
                "queue {qi}: {dev}"
            );
        }
    }
}

#[test]
fn testpmd_across_switches() {
    across_switches(&[], "");
}

/// Packed rings on both sides across 21 switches under traffic: the
/// guest's positions (with their wrap counters) go to the sim and come
/// back at every switch.
#[test]
fn testpmd_packed_across_switches() {
    across_switches(&["--packed"], ",packed_vq=1");
}

fn across_switches(flags: &[&str], vdev_opts: &str) {
    if !testpmd_or_skip() {
        return;
    }
    let mut args = vec!["--shadow", "off"];
    args.extend_from_slice(flags);
    let d = Daemon::spawn(&args);
    let mut pmd = guest_pmd(d.dir.path(), &d.socket, 1, vdev_opts);
    let mut q = Qmp::connect_ready(&d.qmp);
    assert_eq!(q.query("net0")["packed"], !vdev_opts.is_empty());
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
            pmd.log()
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
        let mut pmd = guest_pmd(d.dir.path(), &d.socket, 1, opts);
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

/// `--shadow on --packed` in front of a device without packed rings (a
/// second relay on the software NIC, without `--packed`): testpmd's
/// virtio-user negotiates `packed_vq=1` with the first relay, whose SVQs
/// relay its packed rings to split shadow rings; every packet counted by
/// testpmd went through both relays. Passthrough is refused meanwhile.
#[test]
fn testpmd_packed_guest_on_a_split_only_device() {
    if !testpmd_or_skip() {
        return;
    }
    let split = Daemon::spawn(&["--shadow", "on", "--queues", "2"]);
    let be = format!("vhost-user:{}", split.socket.display());
    let relay = Daemon::spawn(&[
        "--shadow",
        "on",
        "--packed",
        "--queues",
        "2",
        "--backend",
        &be,
    ]);
    let mut pmd = guest_pmd(relay.dir.path(), &relay.socket, 2, ",packed_vq=1");
    let mut q = Qmp::connect_ready(&relay.qmp);
    let mut qs = Qmp::connect_ready(&split.qmp);
    assert_eq!(q.query("net0")["packed"], true);
    assert_eq!(qs.query("net0")["packed"], false);
    let r = q.enable_shadow("net0", false);
    let err = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("only shadow mode relays them"), "{r}");
    sleep(Duration::from_secs(2));
    let s = pmd.stop();
    check_testpmd(&s);
    let dev = q.query("net0");
    assert_eq!(dev["mode"], "shadow", "{dev}");
    let (rx, tx) = relayed_agrees(&dev, &s);
    // The split device saw the same packets on its rings.
    let (srx, stx) = relayed(&qs.query("net0"));
    assert!(
        stx <= tx && tx <= stx + 2 * BURST,
        "split device TX {stx} vs {tx}"
    );
    assert!(
        rx <= srx && srx <= rx + 2 * BURST,
        "split device RX {srx} vs {rx}"
    );
}
