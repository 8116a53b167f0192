//! Loopback data path of the sim, driven by a hand-written split-ring driver.

mod sim_driver;

use std::time::Duration;

use backends::DeviceBackend;
use sim_driver::*;

const RX: usize = 0;
const TX: usize = 1;

/// Sends `pkts` on TX of the rig's pair 0 and checks each arrives whole on RX.
fn send_and_check(rig: &mut Rig, pkts: &[Vec<u8>], rx_segs: u16, rx_seg_len: u32) {
    let mrg = rig.features & F_MRG_RXBUF != 0;
    let mut rx_heads = Vec::new();
    for _ in 0..pkts.len() * if mrg { 8 } else { 1 } {
        rx_heads.push(rig.queues[RX].add_rx(rx_segs, rx_seg_len));
    }
    rig.queues[RX].submit(&rx_heads);
    let heads: Vec<u16> = pkts.iter().map(|p| rig.queues[TX].add_tx(p, 2)).collect();
    rig.queues[TX].submit(&heads);

    let tx_used = rig.queues[TX].wait_used(pkts.len() as u16);
    assert_eq!(tx_used, heads.iter().map(|&h| (h, 0)).collect::<Vec<_>>());

    let chain_cap = u32::from(rx_segs) * rx_seg_len;
    let mut next_rx = 0usize;
    for p in pkts {
        let nbuf = if mrg {
            p.len().div_ceil(chain_cap as usize)
        } else {
            1
        };
        let used = rig.queues[RX].wait_used(nbuf as u16);
        let mut got = Vec::new();
        for (k, (id, len)) in used.iter().enumerate() {
            assert_eq!(*id, rx_heads[next_rx + k], "RX chains are used in order");
            got.extend(rig.queues[RX].read_rx(*id, *len, rx_seg_len));
        }
        next_rx += nbuf;
        assert_bytes(
            &got,
            &expected_rx(p, nbuf as u16),
            &format!("packet of {} bytes", p.len()),
        );
    }
}

#[test]
fn packets_of_64_and_1500_bytes_arrive_intact() {
    let mut rig = Rig::new(1, F_VERSION_1, 256);
    let pkts = vec![packet(64, 1), packet(1500, 2), packet(64, 3)];
    send_and_check(&mut rig, &pkts, 1, 2048);
    let tx = rig.sim.queue_stats(TX).unwrap();
    let rx = rig.sim.queue_stats(RX).unwrap();
    assert_eq!((tx.packets, tx.bytes, tx.errors), (3, 1628, 0));
    assert_eq!((rx.packets, rx.bytes, rx.dropped), (3, 1628, 0));
}

#[test]
fn rx_chains_of_several_descriptors_are_filled_in_order() {
    let mut rig = Rig::new(1, F_VERSION_1, 256);
    send_and_check(&mut rig, &[packet(1500, 7)], 4, 512);
}

#[test]
fn mergeable_rx_buffers_span_several_chains() {
    let mut rig = Rig::new(1, F_VERSION_1 | F_MRG_RXBUF, 256);
    // 1512 bytes over 256-byte chains: 6 buffers, num_buffers = 6.
    send_and_check(
        &mut rig,
        &[packet(64, 9), packet(1500, 4), packet(1500, 5)],
        1,
        256,
    );
}

#[test]
fn merged_rx_chains_of_exactly_the_header_size_are_valid() {
    let mut rig = Rig::new(1, F_VERSION_1 | F_MRG_RXBUF, 256);
    // 12 + 20 bytes over 12-byte chains: 3 buffers, the first one only the
    // header.
    send_and_check(&mut rig, &[packet(20, 3)], 1, HDR as u32);
    assert!(!rig.sim.queue_stats(RX).unwrap().broken);
}

#[test]
fn without_mrg_a_packet_too_big_for_one_chain_is_dropped_and_counted() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    let rx_head = rig.queues[RX].add_rx(1, 256);
    rig.queues[RX].submit(&[rx_head]);
    let big = rig.queues[TX].add_tx(&packet(1500, 1), 1);
    rig.queues[TX].submit(&[big]);
    assert_eq!(rig.queues[TX].wait_used(1), vec![(big, 0)]);
    rig.sync(RX);
    assert_eq!(
        rig.queues[RX].used_idx(),
        0,
        "the RX chain was not consumed"
    );
    assert_eq!(rig.sim.queue_stats(RX).unwrap().dropped, 1);

    // The same RX chain still takes a packet that fits.
    let small = packet(64, 2);
    let h = rig.queues[TX].add_tx(&small, 1);
    rig.queues[TX].submit(&[h]);
    let used = rig.queues[RX].wait_used(1);
    assert_eq!(used, vec![(rx_head, 76)]);
    assert_bytes(
        &rig.queues[RX].read_rx(rx_head, 76, 256),
        &expected_rx(&small, 1),
        "rx",
    );
}

#[test]
fn two_queue_pairs_loop_back_independently() {
    let mut rig = Rig::new(2, F_VERSION_1 | F_MQ | F_MRG_RXBUF, 128);
    for (rx, tx, seed) in [(0usize, 1usize, 10u8), (2, 3, 20)] {
        let heads: Vec<u16> = (0..4).map(|_| rig.queues[rx].add_rx(1, 2048)).collect();
        rig.queues[rx].submit(&heads);
        let p = packet(1500, seed);
        let h = rig.queues[tx].add_tx(&p, 3);
        rig.queues[tx].submit(&[h]);
        let used = rig.queues[rx].wait_used(1);
        assert_eq!(used.len(), 1);
        let got = rig.queues[rx].read_rx(used[0].0, used[0].1, 2048);
        assert_bytes(&got, &expected_rx(&p, 1), &format!("pair of RX {rx}"));
    }
    assert_eq!(rig.sim.queue_stats(2).unwrap().packets, 1);
    assert_eq!(rig.sim.queue_stats(0).unwrap().packets, 1);
    assert!(rig.sim.queue_stats(4).is_none());
}

#[test]
fn tx_waits_for_rx_buffers_and_loses_nothing() {
    backpressure(F_VERSION_1 | F_EVENT_IDX);
    backpressure(F_VERSION_1);
    backpressure(F_VERSION_1 | F_MRG_RXBUF);
}

fn backpressure(features: u64) {
    let mut rig = Rig::new(1, features, 64);
    let pkts: Vec<Vec<u8>> = (0..5).map(|i| packet(64 + 100 * i, i as u8)).collect();
    let heads: Vec<u16> = pkts.iter().map(|p| rig.queues[TX].add_tx(p, 1)).collect();
    rig.queues[TX].submit(&heads);
    // Give the worker every chance to (wrongly) consume TX.
    std::thread::sleep(Duration::from_millis(50));
    rig.sync(TX);
    assert_eq!(rig.queues[TX].used_idx(), 0, "TX must wait for RX buffers");
    assert_eq!(rig.sim.vring_base(TX).unwrap(), 0);

    // Two RX buffers: exactly two packets go through, the rest keep waiting.
    let rx1: Vec<u16> = (0..2).map(|_| rig.queues[RX].add_rx(1, 2048)).collect();
    rig.queues[RX].submit(&rx1);
    assert_eq!(rig.queues[TX].wait_used(2).len(), 2);
    std::thread::sleep(Duration::from_millis(20));
    rig.sync(TX);
    assert_eq!(rig.queues[TX].used_idx(), 2);

    let rx2: Vec<u16> = (0..3).map(|_| rig.queues[RX].add_rx(1, 2048)).collect();
    rig.queues[RX].submit(&rx2);
    assert_eq!(rig.queues[TX].wait_used(3).len(), 3);
    let used = rig.queues[RX].wait_used(5);
    for ((id, len), p) in used.iter().zip(&pkts) {
        assert_bytes(
            &rig.queues[RX].read_rx(*id, *len, 2048),
            &expected_rx(p, 1),
            "rx",
        );
    }
}

#[test]
fn event_idx_suppresses_and_requests_interrupts() {
    let mut rig = Rig::new(1, F_VERSION_1 | F_EVENT_IDX, 64);
    // RX asks for an interrupt only once used idx passes 2 (the third entry).
    rig.queues[RX].set_used_event(2);
    rig.queues[TX].set_used_event(0);
    let rx: Vec<u16> = (0..4).map(|_| rig.queues[RX].add_rx(1, 2048)).collect();
    rig.queues[RX].submit(&rx);

    let h = rig.queues[TX].add_tx(&packet(64, 1), 1);
    rig.queues[TX].submit(&[h]);
    rig.queues[RX].wait_used(1);
    rig.sync(RX);
    assert!(
        rig.queues[TX].called(),
        "TX used_event 0 asks for the first completion"
    );
    assert!(
        !rig.queues[RX].called(),
        "RX used_event 2 suppresses the first one"
    );

    let h = rig.queues[TX].add_tx(&packet(64, 2), 1);
    rig.queues[TX].submit(&[h]);
    rig.queues[RX].wait_used(1);
    rig.sync(RX);
    assert!(!rig.queues[RX].called());
    assert!(
        !rig.queues[TX].called(),
        "TX used_event still 0: no second interrupt"
    );

    let h = rig.queues[TX].add_tx(&packet(64, 3), 1);
    rig.queues[TX].submit(&[h]);
    rig.queues[RX].wait_used(1);
    rig.sync(RX);
    assert!(
        rig.queues[RX].called(),
        "used idx 2 -> 3 crosses used_event 2"
    );

    // The device keeps avail_event current, so the driver is asked to kick.
    let h = rig.queues[TX].add_tx(&packet(64, 4), 1);
    let old = rig.queues[TX].ring.avail_idx;
    rig.queues[TX].push_avail(h);
    assert!(rig.queues[TX].publish(old), "avail_event asks for a kick");
    rig.queues[RX].wait_used(1);
}

#[test]
fn no_interrupt_flag_is_honoured_without_event_idx() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    rig.queues[RX].set_no_interrupt(true);
    let rx: Vec<u16> = (0..2).map(|_| rig.queues[RX].add_rx(1, 2048)).collect();
    rig.queues[RX].submit(&rx);
    let h = rig.queues[TX].add_tx(&packet(64, 1), 1);
    rig.queues[TX].submit(&[h]);
    rig.queues[RX].wait_used(1);
    rig.sync(RX);
    assert!(!rig.queues[RX].called());
    assert!(rig.queues[TX].called());

    rig.queues[RX].set_no_interrupt(false);
    let h = rig.queues[TX].add_tx(&packet(64, 2), 1);
    rig.queues[TX].submit(&[h]);
    rig.queues[RX].wait_used(1);
    rig.sync(RX);
    assert!(rig.queues[RX].called());
}

#[test]
fn indirect_tx_chain_is_read() {
    let mut rig = Rig::new(1, F_VERSION_1 | F_INDIRECT, 64);
    let rx = rig.queues[RX].add_rx(1, 2048);
    rig.queues[RX].submit(&[rx]);
    // Indirect table in descriptor 10's buffer: header + frame in two entries.
    let p = packet(300, 5);
    let q = &mut rig.queues[TX];
    let table = q.buf_addr(10);
    let data = q.buf_addr(11);
    use vm_memory::{Bytes, GuestAddress};
    q.mem().write_slice(&p, GuestAddress(data)).unwrap();
    let entries: [(u64, u32, u16, u16); 2] = [(data, 12, DESC_F_NEXT, 1), (data + 12, 300, 0, 0)];
    for (k, (a, l, f, n)) in entries.iter().enumerate() {
        let e = table + 16 * k as u64;
        q.mem().write_obj(a.to_le(), GuestAddress(e)).unwrap();
        q.mem().write_obj(l.to_le(), GuestAddress(e + 8)).unwrap();
        q.mem().write_obj(f.to_le(), GuestAddress(e + 12)).unwrap();
        q.mem().write_obj(n.to_le(), GuestAddress(e + 14)).unwrap();
    }
    q.write_desc(0, table, 32, DESC_F_INDIRECT, 0);
    q.submit(&[0]);
    let used = rig.queues[RX].wait_used(1);
    assert_bytes(
        &rig.queues[RX].read_rx(used[0].0, used[0].1, 2048),
        &expected_rx(&p, 1),
        "rx",
    );
}

#[test]
fn many_batches_wrap_the_rings_in_order() {
    for features in [F_VERSION_1 | F_EVENT_IDX | F_MRG_RXBUF, F_VERSION_1] {
        let mut rig = Rig::new(1, features, 64);
        let mut seed = 0u8;
        for batch in 0..40 {
            // At most 40 descriptors per batch on a 64-entry ring: the test
            // driver never reuses a descriptor that is still in flight.
            let n = 1 + batch % 20;
            let rx: Vec<u16> = (0..n).map(|_| rig.queues[RX].add_rx(1, 2048)).collect();
            rig.queues[RX].submit(&rx);
            let pkts: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    seed = seed.wrapping_add(1);
                    packet(60 + (usize::from(i) * 97) % 1441, seed)
                })
                .collect();
            let tx: Vec<u16> = pkts
                .iter()
                .map(|p| rig.queues[TX].add_tx(p, 1 + p.len() % 2))
                .collect();
            rig.queues[TX].submit(&tx);
            let used = rig.queues[RX].wait_used(n);
            for (k, ((id, len), p)) in used.iter().zip(&pkts).enumerate() {
                assert_eq!(*id, rx[k]);
                assert_bytes(
                    &rig.queues[RX].read_rx(*id, *len, 2048),
                    &expected_rx(p, 1),
                    "batch",
                );
            }
            assert_eq!(rig.queues[TX].wait_used(n).len(), usize::from(n));
        }
        rig.sim.suspend().unwrap();
        let total: u16 = (0..40u16).map(|b| 1 + b % 20).sum();
        assert_eq!(rig.sim.vring_base(TX).unwrap(), total);
        assert_eq!(rig.sim.vring_base(RX).unwrap(), total);
    }
}

#[test]
fn legacy_header_without_version_1_is_10_bytes() {
    let mut rig = Rig::new(1, 0, 64);
    let h = rig.queues[RX].add_rx(1, 2048);
    rig.queues[RX].submit(&[h]);
    let mut p = vec![0u8; 10 + 100];
    p[10..]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    let t = rig.queues[TX].add_tx(&p, 1);
    rig.queues[TX].submit(&[t]);
    let used = rig.queues[RX].wait_used(1);
    assert_eq!(used, vec![(h, 110)]);
    assert_bytes(&rig.queues[RX].read_rx(h, 110, 2048), &p, "legacy");
}

#[test]
fn one_eventfd_may_kick_both_queues() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    let shared = std::sync::Arc::clone(&rig.queues[TX].kick);
    rig.sim
        .set_vring_kick(RX, std::sync::Arc::clone(&shared))
        .unwrap();
    rig.queues[RX].kick = shared;
    for seed in 0..3 {
        let h = rig.queues[RX].add_rx(1, 2048);
        rig.queues[RX].submit(&[h]);
        let p = packet(64, seed);
        let t = rig.queues[TX].add_tx(&p, 1);
        rig.queues[TX].submit(&[t]);
        let used = rig.queues[RX].wait_used(1);
        assert_bytes(
            &rig.queues[RX].read_rx(used[0].0, used[0].1, 2048),
            &expected_rx(&p, 1),
            "shared kick",
        );
    }
}
