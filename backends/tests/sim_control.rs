//! Control plane of the sim: suspend/resume and ring hand-over, IOTLB rules,
//! features, status, config space, and adversarial rings.

mod sim_driver;

use std::sync::Arc;
use std::time::Duration;

use backends::sim::{SimConfig, SimNet};
use backends::{BackendError, DeviceBackend, DmaRegion, VringAddrs};
use sim_driver::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const RX: usize = 0;
const TX: usize = 1;

fn loop_one(rig: &mut Rig, rx: usize, tx: usize, seed: u8) {
    let h = rig.queues[rx].add_rx(1, 2048);
    rig.queues[rx].submit(&[h]);
    let p = packet(64, seed);
    let t = rig.queues[tx].add_tx(&p, 1);
    rig.queues[tx].submit(&[t]);
    let used = rig.queues[rx].wait_used(1);
    assert_eq!(used, vec![(h, 76)]);
    assert_bytes(
        &rig.queues[rx].read_rx(h, 76, 2048),
        &expected_rx(&p, 1),
        "loop_one",
    );
    rig.queues[tx].wait_used(1);
}

#[test]
fn suspend_parks_rings_and_vring_base_is_exact() {
    let mut rig = Rig::new(1, F_VERSION_1 | F_EVENT_IDX, 64);
    loop_one(&mut rig, RX, TX, 1);
    loop_one(&mut rig, RX, TX, 2);
    rig.sim.suspend().unwrap();
    assert_eq!(rig.sim.vring_base(TX).unwrap(), 2);
    assert_eq!(rig.sim.vring_base(RX).unwrap(), 2);

    // Work offered while suspended stays untouched.
    let rxh = rig.queues[RX].add_rx(1, 2048);
    rig.queues[RX].submit(&[rxh]);
    let p = packet(1500, 3);
    let t = rig.queues[TX].add_tx(&p, 2);
    rig.queues[TX].submit(&[t]);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rig.sim.vring_base(TX).unwrap(), 2);
    assert_eq!(rig.queues[TX].used_idx(), 2);
    assert_eq!(rig.queues[RX].used_idx(), 2);

    // The kicks may have gone to someone else meanwhile: resume must still look.
    let _ = rig.queues[TX].kick.read();
    let _ = rig.queues[RX].kick.read();
    rig.sim.resume().unwrap();
    let used = rig.queues[RX].wait_used(1);
    assert_bytes(
        &rig.queues[RX].read_rx(used[0].0, used[0].1, 2048),
        &expected_rx(&p, 1),
        "after resume",
    );
    rig.queues[TX].wait_used(1);
    rig.sync(TX);
    assert_eq!(rig.sim.vring_base(TX).unwrap(), 3);
}

#[test]
fn rings_handed_over_at_a_base_continue_from_it() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    loop_one(&mut rig, RX, TX, 1);
    rig.sim.suspend().unwrap();
    let base_tx = rig.sim.vring_base(TX).unwrap();
    let base_rx = rig.sim.vring_base(RX).unwrap();
    assert_eq!((base_tx, base_rx), (1, 1));

    // New rings (as a relay's shadow rings would be) in fresh memory at a new
    // IOVA, starting where the old ones stopped plus an offset the relay chose.
    let region = memfd_region(2 * QUEUE_AREA as usize);
    let iova = 0x8000_0000;
    rig.sim
        .dma_map(DmaRegion {
            iova,
            memory: Arc::clone(&region),
            readonly: false,
        })
        .unwrap();
    let mem = driver_view(&region, iova);
    let mut nrx = DriverQueue::new(&mem, iova, 32, BUF);
    let mut ntx = DriverQueue::new(&mem, iova + QUEUE_AREA, 32, BUF);
    nrx.start_at(40_000);
    ntx.start_at(65_534); // wraps past 0 below
    for (q, d, base) in [(RX, &nrx, 40_000u16), (TX, &ntx, 65_534u16)] {
        rig.sim.set_vring_num(q, 32).unwrap();
        rig.sim.set_vring_addr(q, d.addrs()).unwrap();
        rig.sim.set_vring_base(q, base).unwrap();
        rig.sim.set_vring_kick(q, Arc::clone(&d.kick)).unwrap();
        rig.sim
            .set_vring_call(q, Some(Arc::clone(&d.call)))
            .unwrap();
    }
    let rxh: Vec<u16> = (0..3).map(|_| nrx.add_rx(1, 2048)).collect();
    nrx.submit(&rxh);
    let pkts: Vec<Vec<u8>> = (0..3).map(|i| packet(200 + i, i as u8)).collect();
    let th: Vec<u16> = pkts.iter().map(|p| ntx.add_tx(p, 1)).collect();
    // Published before resume: no kick needed.
    let old = ntx.ring.avail_idx;
    for &h in &th {
        ntx.push_avail(h);
    }
    ntx.publish(old);
    let _ = ntx.kick.read();
    rig.sim.resume().unwrap();
    let used = nrx.wait_used(3);
    for ((id, len), p) in used.iter().zip(&pkts) {
        assert_bytes(
            &nrx.read_rx(*id, *len, 2048),
            &expected_rx(p, 1),
            "handed-over ring",
        );
    }
    assert_eq!(ntx.wait_used(3).len(), 3);
    assert_eq!(ntx.used_idx(), 1, "65534 + 3 wraps to 1");
    rig.sim.suspend().unwrap();
    assert_eq!(rig.sim.vring_base(TX).unwrap(), 1);
    assert_eq!(rig.sim.vring_base(RX).unwrap(), 40_003);
}

#[test]
fn a_kick_eventfd_taken_back_while_suspended_is_never_read_again() {
    // A relay switching to shadow rings suspends the device and gives it
    // its own kick eventfd; the guest's one now belongs to the relay. A
    // guest kick arriving then must stay for the relay to read.
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    rig.sim.suspend().unwrap();
    // Let the worker go back to sleep watching the guest's eventfd.
    std::thread::sleep(Duration::from_millis(50));
    let relay_kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    rig.sim.set_vring_kick(TX, Arc::clone(&relay_kick)).unwrap();
    let guest_kick = Arc::clone(&rig.queues[TX].kick);
    guest_kick.write(1).unwrap();
    // Time for the sim's worker to wake on it (it watched that eventfd
    // until now) and act.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        guest_kick.read().ok(),
        Some(1),
        "the device consumed a kick that was no longer its own"
    );
    // The device works from the new eventfd once resumed.
    rig.sim.resume().unwrap();
    let h = rig.queues[RX].add_rx(1, 2048);
    rig.queues[RX].submit(&[h]);
    let tx = &mut rig.queues[TX];
    let head = tx.add_tx(&packet(60, 1), 1);
    tx.push_avail(head);
    tx.ring.publish();
    relay_kick.write(1).unwrap();
    assert_eq!(tx.wait_used(1), vec![(head, 0)]);
    assert_eq!(rig.queues[RX].wait_used(1), vec![(h, 72)]);
}

#[test]
fn ring_layout_cannot_change_under_a_running_queue() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    let a = rig.queues[TX].addrs();
    // Same values are accepted (QEMU re-sends them to toggle logging).
    rig.sim.set_vring_addr(TX, a).unwrap();
    rig.sim.set_vring_num(TX, 64).unwrap();
    let moved = VringAddrs {
        desc: a.desc + 0x1000,
        ..a
    };
    assert!(matches!(
        rig.sim.set_vring_addr(TX, moved),
        Err(BackendError::InvalidState { .. })
    ));
    assert!(matches!(
        rig.sim.set_vring_base(TX, 5),
        Err(BackendError::InvalidState { .. })
    ));
    assert!(matches!(
        rig.sim.set_vring_num(TX, 32),
        Err(BackendError::InvalidState { .. })
    ));
    rig.sim.set_vring_enable(TX, false).unwrap();
    rig.sim.set_vring_base(TX, 0).unwrap();
    rig.sim.set_vring_enable(TX, true).unwrap();
    loop_one(&mut rig, RX, TX, 1);
}

#[test]
fn vring_num_must_be_a_power_of_two_within_max() {
    let mut sim = SimNet::new(SimConfig {
        max_queue_size: 256,
        ..SimConfig::default()
    })
    .unwrap();
    assert_eq!(sim.max_queue_size(), 256);
    for bad in [0u16, 3, 100, 512] {
        assert!(
            matches!(
                sim.set_vring_num(0, bad),
                Err(BackendError::InvalidQueueSize(..))
            ),
            "{bad}"
        );
    }
    sim.set_vring_num(0, 256).unwrap();
    sim.set_vring_num(1, 1).unwrap();
    assert!(matches!(
        sim.set_vring_num(2, 64),
        Err(BackendError::InvalidQueue { index: 2, count: 2 })
    ));
    assert!(SimNet::new(SimConfig {
        max_queue_size: 1000,
        ..SimConfig::default()
    })
    .is_err());
    assert!(SimNet::new(SimConfig {
        queue_pairs: 0,
        ..SimConfig::default()
    })
    .is_err());
}

#[test]
fn iotlb_rejects_overlaps_and_out_of_range_maps() {
    let mut sim = SimNet::new(SimConfig::default()).unwrap();
    let r = sim.iova_range();
    assert_eq!((r.first, r.last), (0, (1 << 48) - 1));
    let region = |size| memfd_region(size);
    sim.dma_map(DmaRegion {
        iova: 0x10000,
        memory: region(0x4000),
        readonly: false,
    })
    .unwrap();
    for iova in [0xf000u64, 0x10000, 0x13000] {
        let e = sim.dma_map(DmaRegion {
            iova,
            memory: region(0x2000),
            readonly: false,
        });
        assert!(
            matches!(e, Err(BackendError::MappingOverlap { .. })),
            "{iova:#x}: {e:?}"
        );
    }
    let e = sim.dma_map(DmaRegion {
        iova: (1 << 48) - 0x1000,
        memory: region(0x2000),
        readonly: false,
    });
    assert!(
        matches!(e, Err(BackendError::IovaOutOfRange { .. })),
        "{e:?}"
    );
    let e = sim.dma_map(DmaRegion {
        iova: u64::MAX - 0xfff,
        memory: region(0x2000),
        readonly: false,
    });
    assert!(
        matches!(e, Err(BackendError::IovaOutOfRange { .. })),
        "{e:?}"
    );
    assert!(matches!(
        sim.dma_unmap(0x20000, 0x1000),
        Err(BackendError::NotMapped { .. })
    ));
    assert!(matches!(
        sim.dma_unmap(0x10000, 0x1000),
        Err(BackendError::NotMapped { .. })
    ));
    sim.dma_unmap(0x10000, 0x4000).unwrap();
    assert!(matches!(
        sim.dma_unmap(0x10000, 0x4000),
        Err(BackendError::NotMapped { .. })
    ));
    sim.dma_map(DmaRegion {
        iova: 0xf000,
        memory: region(0x2000),
        readonly: false,
    })
    .unwrap();
}

#[test]
fn features_status_and_config() {
    let mut sim = SimNet::new(SimConfig {
        queue_pairs: 2,
        mtu: 9000,
        ..SimConfig::default()
    })
    .unwrap();
    let f = sim.device_features();
    for bit in [32u32, 27, 5, 3, 16, 15, 29, 28, 22] {
        assert_ne!(f & (1 << bit), 0, "bit {bit} offered");
    }
    assert_eq!(f & (1 << 35), 0, "IN_ORDER never offered");
    assert!(
        matches!(sim.set_features(f | 1 << 35), Err(BackendError::UnsupportedFeatures(x)) if x == 1 << 35)
    );
    sim.set_features(f).unwrap();
    sim.set_status(1 | 2 | 8).unwrap();
    assert_eq!(sim.status(), 11);
    assert!(
        sim.set_features(f).is_err(),
        "features fixed after FEATURES_OK"
    );
    assert!(sim.set_status(1).is_err(), "bits are cleared only by reset");
    sim.set_status(0).unwrap();
    assert_eq!(sim.status(), 0);
    sim.set_features(F_VERSION_1).unwrap();

    assert_eq!(sim.config_size(), 12);
    let mut c = [0u8; 12];
    sim.get_config(0, &mut c).unwrap();
    assert_eq!(&c[0..6], &SimConfig::default().mac);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "LINK_UP");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    let mut two = [0u8; 2];
    sim.get_config(10, &mut two).unwrap();
    assert_eq!(u16::from_le_bytes(two), 9000);
    assert!(matches!(
        sim.get_config(11, &mut two),
        Err(BackendError::ConfigOutOfRange { .. })
    ));
    assert!(matches!(
        sim.get_config(u32::MAX, &mut two),
        Err(BackendError::ConfigOutOfRange { .. })
    ));
    sim.set_config(0, &[2, 0, 0, 0, 0, 9]).unwrap();
    sim.set_config(8, &[7, 7]).unwrap();
    sim.get_config(0, &mut c).unwrap();
    assert_eq!(&c[0..6], &[2, 0, 0, 0, 0, 9]);
    assert_eq!(
        u16::from_le_bytes([c[8], c[9]]),
        2,
        "max pairs is read-only"
    );
    assert!(sim.set_config(12, &[0]).is_err());
    assert_eq!(sim.kind(), "sim");
    assert_eq!(sim.num_queues(), 4);
}

#[test]
fn reset_keeps_mappings_and_clears_rings() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    loop_one(&mut rig, RX, TX, 1);
    rig.sim.set_status(0).unwrap();
    assert_eq!(rig.sim.vring_base(TX).unwrap(), 0);
    // Mapping survived: mapping it again overlaps.
    let again = rig.sim.dma_map(DmaRegion {
        iova: IOVA_BASE,
        memory: Arc::clone(&rig.region),
        readonly: false,
    });
    assert!(matches!(again, Err(BackendError::MappingOverlap { .. })));
    // Bring it up again on fresh rings in the same memory.
    rig.sim.set_features(F_VERSION_1).unwrap();
    rig.sim.set_status(1 | 2 | 8).unwrap();
    for q in 0..2 {
        let d = DriverQueue::new(&rig.mem, IOVA_BASE + q as u64 * QUEUE_AREA, 64, BUF);
        rig.sim.set_vring_num(q, 64).unwrap();
        rig.sim.set_vring_addr(q, d.addrs()).unwrap();
        rig.sim.set_vring_kick(q, Arc::clone(&d.kick)).unwrap();
        rig.sim
            .set_vring_call(q, Some(Arc::clone(&d.call)))
            .unwrap();
        rig.sim.set_vring_enable(q, true).unwrap();
        rig.queues[q] = d;
    }
    rig.sim.set_status(1 | 2 | 8 | 4).unwrap();
    loop_one(&mut rig, RX, TX, 2);
}

#[test]
fn rings_wait_for_driver_ok() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    rig.sim.set_status(0).unwrap();
    rig.sim.set_features(F_VERSION_1).unwrap();
    rig.sim.set_status(1 | 2 | 8).unwrap();
    for q in 0..2 {
        let d = &rig.queues[q];
        rig.sim.set_vring_num(q, 64).unwrap();
        rig.sim.set_vring_addr(q, d.addrs()).unwrap();
        rig.sim.set_vring_enable(q, true).unwrap();
    }
    // Fresh ring contents for the reset device.
    for q in 0..2 {
        rig.queues[q].renew();
    }
    let h = rig.queues[RX].add_rx(1, 2048);
    rig.queues[RX].submit(&[h]);
    let t = rig.queues[TX].add_tx(&packet(64, 1), 1);
    rig.queues[TX].submit(&[t]);
    std::thread::sleep(Duration::from_millis(20));
    rig.sync(TX);
    assert_eq!(rig.queues[TX].used_idx(), 0);
    rig.sim.set_status(1 | 2 | 8 | 4).unwrap();
    assert_eq!(rig.queues[RX].wait_used(1), vec![(h, 76)]);
}

/// Builds a TX chain with descriptor `bad` written by `f`, and checks that
/// TX of pair 0 breaks while pair 1 keeps looping packets.
fn adversarial_tx(f: impl FnOnce(&mut DriverQueue) -> u16) {
    let mut rig = Rig::new(2, F_VERSION_1 | F_MQ, 64);
    let h = rig.queues[RX].add_rx(1, 2048);
    rig.queues[RX].submit(&[h]);
    let head = f(&mut rig.queues[TX]);
    rig.queues[TX].submit(&[head]);
    // The broken queue is reported once the sim has looked at it.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !rig.sim.queue_stats(TX).unwrap().broken {
        assert!(
            std::time::Instant::now() < deadline,
            "TX never marked broken"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let st = rig.sim.queue_stats(TX).unwrap();
    assert!(st.errors >= 1);
    assert_eq!(
        rig.queues[TX].used_idx(),
        0,
        "the bad chain was not completed"
    );
    assert_eq!(
        rig.sim.vring_base(TX).unwrap(),
        0,
        "the bad chain was given back"
    );
    assert!(!rig.sim.queue_stats(RX).unwrap().broken);
    loop_one(&mut rig, 2, 3, 7);
    assert!(!rig.sim.queue_stats(3).unwrap().broken);

    // A relay that fixes the ring and restarts the queue gets it back.
    rig.sim.set_vring_enable(TX, false).unwrap();
    rig.queues[TX].renew();
    rig.sim.set_vring_base(TX, 0).unwrap();
    rig.sim.set_vring_enable(TX, true).unwrap();
    let t = rig.queues[TX].add_tx(&packet(64, 9), 1);
    rig.queues[TX].submit(&[t]);
    assert_eq!(rig.queues[RX].wait_used(1), vec![(h, 76)]);
    assert!(!rig.sim.queue_stats(TX).unwrap().broken);
}

#[test]
fn descriptor_loop_breaks_only_its_queue() {
    adversarial_tx(|q| {
        q.write_desc(0, q.buf_addr(0), 100, DESC_F_NEXT, 1);
        q.write_desc(1, q.buf_addr(1), 100, DESC_F_NEXT, 0);
        0
    });
}

#[test]
fn unmapped_buffer_breaks_only_its_queue() {
    adversarial_tx(|q| {
        q.write_desc(0, 0x7000_0000_0000 - 0x1000, 76, 0, 0);
        0
    });
}

#[test]
fn huge_length_breaks_only_its_queue() {
    adversarial_tx(|q| {
        q.write_desc(0, q.buf_addr(0), u32::MAX, 0, 0);
        0
    });
}

#[test]
fn next_index_out_of_range_breaks_only_its_queue() {
    adversarial_tx(|q| {
        q.write_desc(0, q.buf_addr(0), 12, DESC_F_NEXT, 500);
        0
    });
}

#[test]
fn head_index_out_of_range_breaks_only_its_queue() {
    adversarial_tx(|_| 64);
}

#[test]
fn nested_indirect_breaks_only_its_queue() {
    adversarial_tx(|q| {
        use vm_memory::{Bytes, GuestAddress};
        let table = q.buf_addr(5);
        // One entry that is itself indirect.
        q.mem()
            .write_obj(table.to_le(), GuestAddress(table))
            .unwrap();
        q.mem()
            .write_obj(16u32.to_le(), GuestAddress(table + 8))
            .unwrap();
        q.mem()
            .write_obj(DESC_F_INDIRECT.to_le(), GuestAddress(table + 12))
            .unwrap();
        q.write_desc(0, table, 16, DESC_F_INDIRECT, 0);
        0
    });
}

#[test]
fn avail_idx_running_ahead_breaks_only_its_queue() {
    adversarial_tx(|q| {
        // Claims 100 new entries on a 64-entry ring.
        q.ring.avail_idx = 99;
        q.add_tx(&packet(64, 1), 1)
    });
}

#[test]
fn unmapped_rx_buffer_breaks_rx_and_holds_tx() {
    let mut rig = Rig::new(2, F_VERSION_1 | F_MQ, 64);
    rig.queues[RX].write_desc(0, 0x10, 2048, DESC_F_WRITE, 0);
    rig.queues[RX].submit(&[0]);
    let t = rig.queues[TX].add_tx(&packet(64, 1), 1);
    rig.queues[TX].submit(&[t]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !rig.sim.queue_stats(RX).unwrap().broken {
        assert!(
            std::time::Instant::now() < deadline,
            "RX never marked broken"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    rig.sync(TX);
    assert_eq!(rig.queues[TX].used_idx(), 0, "TX is held, not lost");
    assert_eq!(rig.sim.vring_base(RX).unwrap(), 0);
    loop_one(&mut rig, 2, 3, 2);
}

/// RX chains posted by `post` leave no room for the virtio-net header: a
/// malformed ring, not a lack of room. RX breaks at the first packet
/// (nothing written, nothing used, the chains given back), TX is held, the
/// other pair keeps working, and a reconfigured RX takes the held packet.
fn rx_chain_without_room_for_header(
    features: u64,
    post: impl FnOnce(&mut DriverQueue) -> Vec<u16>,
) {
    use vm_memory::{Bytes, GuestAddress};
    let mut rig = Rig::new(2, features | F_MQ, 64);
    let q = &mut rig.queues[RX];
    let area = GuestAddress(q.buf_addr(0));
    q.mem()
        .write_slice(&[0xab; 2 * BUF as usize], area)
        .unwrap();
    let heads = post(q);
    q.submit(&heads);
    let p = packet(64, 1);
    let t = rig.queues[TX].add_tx(&p, 1);
    rig.queues[TX].submit(&[t]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !rig.sim.queue_stats(RX).unwrap().broken {
        assert!(
            std::time::Instant::now() < deadline,
            "RX never marked broken"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    rig.sync(TX);
    let rx = rig.sim.queue_stats(RX).unwrap();
    assert_eq!((rx.errors, rx.packets, rx.dropped), (1, 0, 0));
    assert_eq!(rig.queues[RX].used_idx(), 0, "no RX chain completed");
    assert_eq!(rig.sim.vring_base(RX).unwrap(), 0, "RX chains given back");
    assert_eq!(rig.queues[TX].used_idx(), 0, "TX is held, not lost");
    let mut back = vec![0u8; 2 * BUF as usize];
    rig.queues[RX].mem().read_slice(&mut back, area).unwrap();
    assert!(back.iter().all(|&b| b == 0xab), "RX buffers written");
    loop_one(&mut rig, 2, 3, 2);
    assert!(!rig.sim.queue_stats(3).unwrap().broken);

    // A relay that fixes the ring and restarts RX gets the held packet.
    rig.sim.set_vring_enable(RX, false).unwrap();
    rig.queues[RX].renew();
    rig.sim.set_vring_base(RX, 0).unwrap();
    rig.sim.set_vring_enable(RX, true).unwrap();
    let h = rig.queues[RX].add_rx(1, 2048);
    rig.queues[RX].submit(&[h]);
    assert_eq!(rig.queues[RX].wait_used(1), vec![(h, 76)]);
    assert_bytes(
        &rig.queues[RX].read_rx(h, 76, 2048),
        &expected_rx(&p, 1),
        "held packet",
    );
    assert_eq!(rig.queues[TX].wait_used(1), vec![(t, 0)]);
    assert!(!rig.sim.queue_stats(RX).unwrap().broken);
}

#[test]
fn read_only_rx_chain_breaks_rx_and_holds_tx() {
    rx_chain_without_room_for_header(F_VERSION_1, |q| {
        q.write_desc(0, q.buf_addr(0), 2048, 0, 0);
        vec![0]
    });
}

#[test]
fn rx_chain_shorter_than_the_header_is_not_merged() {
    // Without the check it would be gathered as a merged buffer in front of
    // the valid chain behind it.
    rx_chain_without_room_for_header(F_VERSION_1 | F_MRG_RXBUF, |q| {
        vec![q.add_rx(1, HDR as u32 - 1), q.add_rx(1, 2048)]
    });
}

#[test]
fn rings_outside_the_iotlb_hold_the_queue_until_mapped() {
    let mut rig = Rig::new(2, F_VERSION_1 | F_MQ, 64);
    rig.sim.set_vring_enable(TX, false).unwrap();
    rig.sim
        .set_vring_addr(
            TX,
            VringAddrs {
                desc: 0x1000,
                avail: 0x2000,
                used: 0x3000,
            },
        )
        .unwrap();
    rig.sim.set_vring_enable(TX, true).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !rig.sim.queue_stats(TX).unwrap().broken {
        assert!(
            std::time::Instant::now() < deadline,
            "TX never marked broken"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    loop_one(&mut rig, 2, 3, 3);
    // Mapping the ring areas later releases the queue (an empty ring: idle).
    let low = memfd_region(0x10000);
    rig.sim
        .dma_map(DmaRegion {
            iova: 0,
            memory: low,
            readonly: false,
        })
        .unwrap();
    while rig.sim.queue_stats(TX).unwrap().broken {
        assert!(std::time::Instant::now() < deadline, "TX never released");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rig.sim.vring_base(TX).unwrap(), 0);
    assert_eq!(rig.sim.queue_stats(TX).unwrap().errors, 1, "counted once");
}

#[test]
fn unmap_under_a_running_ring_stops_it_without_touching_memory() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    loop_one(&mut rig, RX, TX, 1);
    rig.sim.dma_unmap(IOVA_BASE, 2 * QUEUE_AREA).unwrap();
    let t = rig.queues[TX].add_tx(&packet(64, 2), 1);
    let h = rig.queues[RX].add_rx(1, 2048);
    rig.queues[RX].submit(&[h]);
    rig.queues[TX].submit(&[t]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !rig.sim.queue_stats(TX).unwrap().broken && !rig.sim.queue_stats(RX).unwrap().broken {
        assert!(
            std::time::Instant::now() < deadline,
            "never noticed the unmap"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    rig.sync(TX);
    assert_eq!(rig.queues[TX].used_idx(), 1);
    assert_eq!(rig.queues[RX].used_idx(), 1);
}

#[test]
fn readonly_mapping_is_never_written() {
    let mut sim = SimNet::new(SimConfig::default()).unwrap();
    sim.set_features(F_VERSION_1).unwrap();
    sim.set_status(1 | 2 | 8).unwrap();
    let region = memfd_region(2 * QUEUE_AREA as usize);
    let ro = memfd_region(0x10000);
    sim.dma_map(DmaRegion {
        iova: IOVA_BASE,
        memory: Arc::clone(&region),
        readonly: false,
    })
    .unwrap();
    let ro_iova = IOVA_BASE + 2 * QUEUE_AREA;
    sim.dma_map(DmaRegion {
        iova: ro_iova,
        memory: Arc::clone(&ro),
        readonly: true,
    })
    .unwrap();
    let mem = driver_view(&region, IOVA_BASE);
    let mut qs: Vec<DriverQueue> = (0..2)
        .map(|q| DriverQueue::new(&mem, IOVA_BASE + q * QUEUE_AREA, 64, BUF))
        .collect();
    for (q, d) in qs.iter().enumerate() {
        sim.set_vring_num(q, 64).unwrap();
        sim.set_vring_addr(q, d.addrs()).unwrap();
        sim.set_vring_kick(q, Arc::clone(&d.kick)).unwrap();
        sim.set_vring_enable(q, true).unwrap();
    }
    sim.set_status(15).unwrap();
    qs[0].write_desc(0, ro_iova, 2048, DESC_F_WRITE, 0);
    qs[0].submit(&[0]);
    let t = qs[1].add_tx(&packet(64, 1), 1);
    qs[1].submit(&[t]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !sim.queue_stats(RX).unwrap().broken {
        assert!(
            std::time::Instant::now() < deadline,
            "RX never marked broken"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut buf = vec![0u8; 0x10000];
    use vm_memory::{Bytes, GuestAddress};
    driver_view(&ro, 0)
        .read_slice(&mut buf, GuestAddress(0))
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn unconfigured_queues_stay_idle_and_threads_stop_on_drop() {
    let mut sim = SimNet::new(SimConfig {
        queue_pairs: 4,
        ..SimConfig::default()
    })
    .unwrap();
    sim.set_features(F_VERSION_1).unwrap();
    sim.set_status(15).unwrap();
    // A kick fd without rings, an enabled queue without addresses.
    let kick =
        Arc::new(vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
    sim.set_vring_kick(3, Arc::clone(&kick)).unwrap();
    kick.write(1).unwrap();
    sim.set_vring_enable(5, true).unwrap();
    sim.suspend().unwrap();
    sim.resume().unwrap();
    for q in 0..8 {
        assert_eq!(sim.vring_base(q).unwrap(), 0);
        let st = sim.queue_stats(q).unwrap();
        assert_eq!((st.packets, st.errors, st.broken), (0, 0, false));
    }
    drop(sim);
}

#[test]
fn a_queue_enabled_before_its_addresses_starts_when_they_arrive() {
    let mut rig = Rig::new(1, F_VERSION_1, 64);
    rig.sim.set_status(0).unwrap();
    rig.sim.set_features(F_VERSION_1).unwrap();
    rig.sim.set_status(15).unwrap();
    for q in 0..2 {
        rig.queues[q].renew();
        rig.sim.set_vring_enable(q, true).unwrap();
    }
    for q in 0..2 {
        rig.sim.set_vring_num(q, 64).unwrap();
        rig.sim.set_vring_addr(q, rig.queues[q].addrs()).unwrap();
        rig.sim.set_vring_base(q, 0).unwrap();
    }
    loop_one(&mut rig, RX, TX, 1);
}
