//! Multiqueue corner cases a real VMM produces: the maximum of 16 pairs, a
//! guest that does not negotiate MQ on a multiqueue device, and a guest that
//! starts only some of the queue pairs (QEMU starts curr_queue_pairs only).

use serde_json::json;
use testkit::vmm::connect_stream;
use testkit::{pump, Daemon, Qmp, Until, Vmm, VmmConfig};

#[test]
fn sixteen_pairs_shadow() {
    testkit::scenario::loopback("on", 16, testkit::DriverOpts::default(), 200);
}

/// Sets up the first `started` pairs only, pushes traffic, switches to
/// shadow and back under traffic, and checks the bases of those pairs.
fn partial(device_pairs: u16, guest_pairs: u16, started: u16) {
    let d = Daemon::spawn(&["--shadow", "off", "--queues", &device_pairs.to_string()]);
    let mut vmm = Vmm::negotiate(connect_stream(&d.socket), VmmConfig::pairs(guest_pairs));
    assert_eq!(vmm.queue_num, 2 * device_pairs as u64, "GET_QUEUE_NUM");
    vmm.set_mem_table().expect("SET_MEM_TABLE");
    for q in 0..2 * started as usize {
        vmm.setup_queue(q)
            .unwrap_or_else(|e| panic!("queue {q}: {e}"));
    }
    let active = started as usize;
    pump(&mut vmm.pairs[..active], Until::Frames(300))
        .unwrap_or_else(|e| panic!("passthrough: {e}"));
    let mut q = Qmp::connect_ready(&d.qmp);
    let dev = q.query("net0");
    assert_eq!(dev["started"], true, "{dev}");
    for (i, enable) in [true, false, true].into_iter().enumerate() {
        assert_eq!(
            q.enable_shadow("net0", enable),
            json!({"return": {}}),
            "switch {i} with {started} of {device_pairs} pairs started"
        );
        let target = 300 * (i as u32 + 2);
        pump(&mut vmm.pairs[..active], Until::Frames(target))
            .unwrap_or_else(|e| panic!("after switch {i}: {e}"));
    }
    let dev = q.query("net0");
    assert_eq!(dev["mode"], "shadow", "{dev}");
    let bases: Vec<u32> = (0..2 * active)
        .map(|qi| {
            vmm.fe_enable_off(qi);
            vmm.get_vring_base(qi)
        })
        .collect();
    for p in &vmm.pairs[..active] {
        assert_eq!(
            bases[2 * p.pair as usize] as u16,
            p.rx.ring.last_used,
            "pair {} RX",
            p.pair
        );
        assert_eq!(
            bases[2 * p.pair as usize + 1] as u16,
            p.tx.ring.avail_idx,
            "pair {} TX",
            p.pair
        );
    }
}

#[test]
fn guest_without_mq_on_a_four_pair_device() {
    partial(4, 1, 1);
}

#[test]
fn guest_starting_two_of_four_pairs() {
    partial(4, 4, 2);
}
