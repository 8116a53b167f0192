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

use std::path::Path;

use serde_json::{json, Value};
use testkit::daemon::tempdir;
use testkit::peers::testpmd_or_skip;
use testkit::qmp::u64_field;
use testkit::testpmd::{serial, Counts, Testpmd};
use testkit::{Daemon, Qmp};

/// testpmd's default burst size.
const BURST: u64 = 32;
/// What may be between the two ends of one direction per queue pair when the
/// guest stops: the circulating burst (the guest's `--tx-first`) plus one
/// burst the restarted device may inject with its own `--tx-first`.
const SLACK: u64 = 2 * BURST;

/// The device: a net_vhost port listening on `sock` (main and forwarding
/// lcore on CPU 0), forwarding each queue's RX back out on the same queue.
/// `tx_first`: also inject one burst per queue when forwarding starts.
fn device_pmd(dir: &Path, sock: &Path, pairs: u16, tx_first: bool) -> Testpmd {
    let b = Testpmd::vhost(sock).dir(dir).queues(pairs).cpu(0);
    let mut p = if tx_first { b.tx_first() } else { b }.spawn();
    p.wait_forwarding();
    p
}

/// The device connecting to the daemon (`client=1`; net_vhost retries
/// about once a second until the socket exists).
fn device_client_pmd(dir: &Path, sock: &Path) -> Testpmd {
    Testpmd::vhost_client(sock).dir(dir).cpu(0).spawn()
}

/// The guest: virtio-user on the daemon's socket (lcores on CPU 1), with
/// `--tx-first`; packed rings (`packed_vq=1`) when the daemon offers them
/// (`extra` has `--packed`).
fn guest_pmd(dir: &Path, sock: &Path, pairs: u16, extra: &[&str]) -> Testpmd {
    let opts = if extra.contains(&"--packed") {
        ",packed_vq=1"
    } else {
        ""
    };
    let mut p = Testpmd::virtio_user(sock)
        .dir(dir)
        .queues(pairs)
        .cpu(1)
        .tx_first()
        .vdev_opts(opts)
        .spawn();
    p.wait_forwarding();
    p
}

/// SIGINT; the accumulated forward statistics.
fn stop(p: &mut Testpmd) -> Counts {
    let s = p.stop();
    Counts { rx: s.rx, tx: s.tx }
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

/// The guest negotiated packed rings and IN_ORDER exactly when the relay
/// offered them (`--packed`, `--in-order` in `extra`).
fn negotiated_as_offered(running: &Value, extra: &[&str]) {
    assert_eq!(running["packed"], extra.contains(&"--packed"), "{running}");
    let in_order = extra.contains(&"--in-order");
    assert_eq!(running["in_order"], in_order, "{running}");
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
    let mut device = device_pmd(dir.path(), &dev_sock, pairs, false);
    let q = pairs.to_string();
    let mut args = vec!["--shadow", mode, "--queues", &q];
    args.extend_from_slice(extra);
    let d = relay(&dev_sock, &args);
    let mut guest = guest_pmd(dir.path(), &d.socket, pairs, extra);
    device.wait_traffic(Counts::default(), 5000, "steady");
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let running = qmp.query("net0");
    negotiated_as_offered(&running, extra);
    let g = stop(&mut guest);
    let dev = qmp.query("net0");
    let dv = stop(&mut device);
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
fn relay_dpdk_passthrough() {
    if !testpmd_or_skip() {
        return;
    }
    steady("off", 1);
}

/// `--in-order`: testpmd virtio-user acks IN_ORDER (its default when
/// offered) and relies on it (it reclaims buffers by position); in shadow
/// mode the SVQ gives used entries back in its order and keeps the shadow
/// ring in order toward net_vhost, across ten switches under traffic.
#[test]
fn relay_dpdk_in_order_across_switches() {
    if !testpmd_or_skip() {
        return;
    }
    across_switches(&["--in-order"]);
}

/// IN_ORDER on packed rings in shadow mode on two pairs: net_vhost then
/// writes one used descriptor per batch of dequeued chains, naming the last
/// (DPDK's `vhost_shadow_dequeue_batch_packed_inorder`); the SVQ completes
/// the whole batch. Every packet counted at both ends and by the relay.
#[test]
fn relay_dpdk_in_order_packed_shadow() {
    if !testpmd_or_skip() {
        return;
    }
    steady_with("on", 2, &["--in-order", "--packed"]);
}

/// `--packed`: testpmd virtio-user with `packed_vq=1` through the relay to
/// net_vhost (both speak packed rings), the device on the guest's own
/// packed rings: traffic both ways.
#[test]
fn relay_dpdk_packed_passthrough() {
    if !testpmd_or_skip() {
        return;
    }
    steady_with("off", 1, &["--packed"]);
}

/// Packed rings in shadow mode on two pairs: the SVQ is the device of the
/// guest's packed rings and the driver of packed shadow rings net_vhost
/// works on; every packet is counted by the relay and both ends.
#[test]
fn relay_dpdk_packed_shadow() {
    if !testpmd_or_skip() {
        return;
    }
    steady_with("on", 2, &["--packed"]);
}

/// Packed rings across ten switches under traffic: the positions and wrap
/// counters go from net_vhost to the SVQ and back each time.
#[test]
fn relay_dpdk_packed_across_switches() {
    if !testpmd_or_skip() {
        return;
    }
    across_switches(&["--packed"]);
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
    let mut device = device_pmd(dir.path(), &dev_sock, 2, false);
    let mut args = vec!["--shadow", "off", "--queues", "2"];
    args.extend_from_slice(extra);
    let d = relay(&dev_sock, &args);
    let mut guest = guest_pmd(dir.path(), &d.socket, 2, extra);
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
    let running = qmp.query("net0");
    negotiated_as_offered(&running, extra);
    let before = relayed(&running);
    device.wait_traffic(seen, 1000, "after the last switch");
    let g = stop(&mut guest);
    let dev = qmp.query("net0");
    let dv = stop(&mut device);
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
    let mut device = device_pmd(dir.path(), &dev_sock, 1, false);
    let d = relay(&dev_sock, &["--shadow", "on"]);
    let mut guest = guest_pmd(dir.path(), &d.socket, 1, &[]);
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
            let old = stop(&mut device);
            assert!(old.rx >= 1000, "round {round}: {old:?}");
        }
        let before = relayed(&qmp.query("net0"));
        device = device_pmd(dir.path(), &dev_sock, 1, true);
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
    let g = stop(&mut guest);
    stop(&mut device);
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
    let mut device = device_client_pmd(dir.path(), &dev_sock);
    // The daemon opens its VMM socket only once the device is connected.
    d.wait_ready(true);
    // testpmd drops what its queues hold when forwarding starts: the guest's
    // burst must come after that.
    device.wait_forwarding();
    let mut guest = guest_pmd(dir.path(), &d.socket, 1, &[]);
    device.wait_traffic(Counts::default(), 2000, "device connected to the daemon");
    let g = stop(&mut guest);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let dev = qmp.query("net0");
    let dv = stop(&mut device);
    check_ends(g, dv, 1);
    let r = relayed(&dev);
    close("relay TX vs guest TX", r.tx, g.tx, SLACK);
    close("relay RX vs guest RX", r.rx, g.rx, SLACK);
}
