//! `VhostUserNet` against a device nobody here wrote: DPDK testpmd with a
//! net_vhost port in io forwarding mode, which sends every packet received on
//! its only port back out of the same port (our TX comes back on our RX).

mod sim_driver;
mod vhost_user_peer;

use std::sync::Arc;

use backends::vhost_user::{DirtyLogArea, VhostUserNet, VhostUserOptions};
use backends::{BackendError, DeviceBackend, DmaRegion, VringAddrs};
use sim_driver::*;
use vhost_user_peer::*;
use vm_memory::{Bytes, MmapRegion, VolatileMemory};

#[test]
fn traffic_comes_back_and_the_memory_table_changes_under_traffic() {
    if !testpmd_or_skip() {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("traffic");
    let sock = dir.0.join("vhost.sock");
    let mut pmd = device_pmd(&sock, &dir.0, 1);
    // IOVA 0 works: guest memory can be mapped at IOVA = GPA.
    let mut rig = VuRig::new(&sock, 0);
    assert_eq!(rig.dev.connection_generation(), 1);
    assert!(rig.dev.is_connected());
    println!(
        "testpmd net_vhost: relay features {:#x}, protocol features {:#x}",
        rig.dev.device_features(),
        rig.dev.protocol_features()
    );
    // DPDK offers IN_ORDER and RING_PACKED: both reach the relay (the
    // daemon decides whether the VMM sees them: --in-order, --packed);
    // PROTOCOL_FEATURES is plumbing between the relay and the device.
    let f = rig.dev.device_features();
    assert_ne!(f & virtio_features::F_IN_ORDER, 0, "{f:#x}");
    assert_ne!(f & virtio_features::F_RING_PACKED, 0, "{f:#x}");
    assert_eq!(f & virtio_features::F_PROTOCOL_FEATURES, 0, "{f:#x}");
    assert!(
        rig.dev.has_dirty_log(),
        "net_vhost offers LOG_ALL + LOG_SHMFD"
    );
    let mut cfg = [0u8; 12];
    rig.dev.get_config(0, &mut cfg).unwrap();
    assert_eq!(cfg[0] & 3, 2, "random MAC is unicast, locally administered");
    assert_eq!(
        &cfg[6..12],
        &[1, 0, 1, 0, 0xdc, 0x05],
        "link up, 1 pair, MTU 1500"
    );

    let mut sent = 0u64;
    let pkts = frames(&[64, 1500, 64, 1000], 1);
    rig.exchange(&pkts);
    sent += pkts.len() as u64;

    // Seven more regions appear and go away while both rings run (DPDK
    // re-translates running rings on SET_MEM_TABLE); eight is the most one
    // table holds.
    let extra: Vec<_> = (1..8u64)
        .map(|k| (k * 0x1000_0000, memfd_region(0x20_0000)))
        .collect();
    for (iova, mem) in &extra {
        rig.dev
            .dma_map(DmaRegion {
                iova: *iova,
                memory: Arc::clone(mem),
                readonly: false,
            })
            .unwrap();
    }
    let ninth = rig.dev.dma_map(DmaRegion {
        iova: 0xa000_0000,
        memory: memfd_region(0x1000),
        readonly: false,
    });
    assert!(matches!(ninth, Err(BackendError::Device(_))), "{ninth:?}");
    let pkts = frames(&[128; 8], 20);
    rig.exchange(&pkts);
    sent += pkts.len() as u64;
    for (iova, _) in &extra {
        rig.dev.dma_unmap(*iova, 0x20_0000).unwrap();
    }
    let pkts = frames(&[60, 1514], 40);
    rig.exchange(&pkts);
    sent += pkts.len() as u64;

    // More than a ring's worth, in batches, so indexes wrap the ring.
    for round in 0..6u8 {
        let pkts = frames(&[64; 64], round);
        rig.exchange(&pkts);
        sent += pkts.len() as u64;
    }

    drop(rig);
    let log = pmd.stop_log();
    assert_eq!(
        last_number(&log, "RX-packets:"),
        Some(sent),
        "testpmd's count\n{log}"
    );
    assert_eq!(
        last_number(&log, "TX-packets:"),
        Some(sent),
        "testpmd's count\n{log}"
    );
}

#[test]
fn suspend_and_vring_base_keep_the_ring_position() {
    if !testpmd_or_skip() {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("suspend");
    let sock = dir.0.join("vhost.sock");
    let _pmd = device_pmd(&sock, &dir.0, 1);
    let mut rig = VuRig::new(&sock, 0x4000_0000);
    rig.exchange(&frames(&[64; 5], 1));

    // Spare RX buffers stay posted across the suspend.
    let spare: Vec<u16> = (0..8).map(|_| rig.rx.add_rx(1, 2048)).collect();
    rig.rx.submit(&spare);

    rig.dev.suspend().unwrap();
    // Contract: base == next avail the device reads == used it published.
    let tx_base = rig.dev.vring_base(TX).unwrap();
    assert_eq!(tx_base, 5);
    assert_eq!(rig.tx.used_idx(), 5);
    let rx_base = rig.dev.vring_base(RX).unwrap();
    assert_eq!(rx_base, 5, "RX: 5 used, 8 still available");
    assert_eq!(rig.rx.used_idx(), 5);
    assert_eq!(rig.rx.ring.avail_idx, 13);

    // Packets queued while suspended go out after resume, into the spare
    // RX buffers.
    let pkts = frames(&[100, 200, 300], 7);
    let heads: Vec<u16> = pkts.iter().map(|p| rig.tx.add_tx(p, 1)).collect();
    rig.tx.submit(&heads);
    assert_eq!(
        rig.dev.vring_base(TX).unwrap(),
        5,
        "nothing runs while suspended"
    );
    rig.dev.resume().unwrap();
    let used = rig.tx.wait_used(3);
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), heads);
    rig.expect_rx(&spare[..3], &pkts);

    // vring_base on a running ring stops it (GET_VRING_BASE); it runs again
    // once enabled.
    let base = rig.dev.vring_base(TX).unwrap();
    assert_eq!(base, 8);
    let pkts = frames(&[64, 64], 9);
    let heads: Vec<u16> = pkts.iter().map(|p| rig.tx.add_tx(p, 1)).collect();
    rig.tx.submit(&heads);
    rig.dev.set_vring_enable(TX, true).unwrap();
    rig.tx.wait_used(2);
    rig.expect_rx(&spare[3..5], &pkts);

    // The hand-over the daemon does: disable, read the base, give the device
    // a fresh ring (other memory) starting at that base, enable.
    rig.dev.set_vring_enable(TX, false).unwrap();
    let base = rig.dev.vring_base(TX).unwrap();
    assert_eq!(base, 10);
    rig.dev.set_vring_base(TX, 0).unwrap(); // not running: allowed
    rig.tx.renew();
    rig.tx.start_at(base);
    rig.program(TX);
    assert!(matches!(
        rig.dev.set_vring_addr(
            TX,
            VringAddrs {
                desc: rig.tx.desc() + 0x1000,
                ..rig.tx.addrs()
            }
        ),
        Err(BackendError::InvalidState { .. })
    ));
    // The last three spare RX buffers are still posted: they come first.
    let pkts = frames(&[64, 1500, 64], 11);
    rig.send(&pkts);
    rig.expect_rx(&spare[5..8], &pkts);
    rig.exchange(&frames(&[64; 16], 12));
    assert_eq!(rig.dev.connection_generation(), 1);
}

#[test]
fn a_restarted_testpmd_is_reconnected_and_traffic_resumes() {
    if !testpmd_or_skip() {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("restart");
    let sock = dir.0.join("vhost.sock");
    let mut pmd = device_pmd(&sock, &dir.0, 1);
    let mut rig = VuRig::new(&sock, 0x4000_0000);
    let first = frames(&[64, 1500, 64], 1);
    rig.exchange(&first);

    let log = pmd.stop_log();
    assert_eq!(
        last_number(&log, "RX-packets:"),
        Some(first.len() as u64),
        "{log}"
    );
    wait_until("the backend to see the disconnect", || {
        !rig.dev.is_connected()
    });
    assert_eq!(rig.dev.connection_generation(), 1);

    // While the device is away, operations are recorded, not refused: the
    // daemon's VMM must not see errors.
    rig.dev
        .set_vring_call(RX, Some(Arc::clone(&rig.rx.call)))
        .unwrap();
    let spare: Vec<u16> = (0..4).map(|_| rig.rx.add_rx(1, 2048)).collect();
    rig.rx.submit(&spare);
    // A ring the dead device had is where its used index says.
    assert_eq!(rig.dev.vring_base(TX).unwrap(), 3);
    // Unless its memory is gone too: then the position is unknown, which
    // is the one typed "disconnected" error, until the caller sets a base.
    let size = rig.region.size() as u64;
    rig.dev.dma_unmap(rig.iova, size).unwrap();
    match rig.dev.vring_base(RX) {
        Err(BackendError::Device(m)) => assert!(m.starts_with("disconnected"), "{m}"),
        other => panic!("expected a disconnected error, got {other:?}"),
    }
    rig.dev
        .dma_map(DmaRegion {
            iova: rig.iova,
            memory: Arc::clone(&rig.region),
            readonly: false,
        })
        .unwrap();
    rig.dev.set_vring_base(RX, rig.rx.used_idx()).unwrap();

    let mut pmd = device_pmd(&sock, &dir.0, 1);
    wait_until("reconnection", || rig.dev.connection_generation() == 2);
    assert!(rig.dev.is_connected());

    // The rings restarted where their used indexes were: the RX buffers
    // posted during the outage are used first.
    let pkts = frames(&[64, 700, 1500, 64], 5);
    rig.send(&pkts);
    rig.expect_rx(&spare, &pkts);
    rig.exchange(&frames(&[64; 32], 9));

    // And the position reads back consistently after the reconnect.
    rig.dev.suspend().unwrap();
    assert_eq!(rig.dev.vring_base(TX).unwrap(), rig.tx.used_idx());
    assert_eq!(rig.dev.vring_base(RX).unwrap(), rig.rx.used_idx());
    rig.dev.resume().unwrap();
    rig.exchange(&frames(&[64], 3));

    drop(rig);
    let log = pmd.stop_log();
    assert_eq!(last_number(&log, "RX-packets:"), Some(4 + 32 + 1), "{log}");
}

#[test]
fn two_queue_pairs_and_stopping_one_ring_leaves_the_others_running() {
    if !testpmd_or_skip() {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("mq");
    let sock = dir.0.join("vhost.sock");
    let _pmd = device_pmd(&sock, &dir.0, 2);
    let mut rig = VuRig::with_pairs(&sock, 0, 2);
    rig.exchange_on(0, &frames(&[64, 1500], 1));
    rig.exchange_on(1, &frames(&[64, 1500], 2));

    // Stop and restart only pair 1's TX ring. In DPDK any GET_VRING_BASE
    // stops the whole device; the backend brings the other rings back.
    let b = rig.dev.vring_base(3).unwrap();
    assert_eq!(b, 2);
    rig.exchange_on(0, &frames(&[64; 4], 3));
    rig.dev.set_vring_enable(3, true).unwrap();
    rig.exchange_on(1, &frames(&[64; 4], 4));
    rig.exchange_on(0, &frames(&[64; 4], 5));

    rig.dev.suspend().unwrap();
    for q in 0..4 {
        let used = rig.queue(q).used_idx();
        assert_eq!(rig.dev.vring_base(q).unwrap(), used, "queue {q}");
    }
    rig.dev.resume().unwrap();
    rig.exchange_on(1, &frames(&[100; 8], 6));
    rig.exchange_on(0, &frames(&[100; 8], 7));
}

#[test]
fn a_reset_then_new_rings_bring_traffic_back() {
    if !testpmd_or_skip() {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("reset");
    let sock = dir.0.join("vhost.sock");
    let mut pmd = device_pmd(&sock, &dir.0, 1);
    let mut rig = VuRig::new(&sock, 0x4000_0000);
    rig.exchange(&frames(&[64; 7], 1));

    // What a guest reboot looks like from the daemon: reset, then the whole
    // set-up again with fresh rings at index 0. Mappings survive the reset.
    rig.dev.set_status(0).unwrap();
    assert_eq!(rig.dev.status(), 0);
    assert_eq!(rig.dev.vring_base(TX).unwrap(), 0, "ring state is reset");
    rig.dev.set_features(F_VERSION_1).unwrap();
    rig.dev.set_status(1 | 2 | 8).unwrap();
    rig.rx.renew();
    rig.tx.renew();
    rig.program(RX);
    rig.program(TX);
    rig.dev.set_status(1 | 2 | 8 | 4).unwrap();
    rig.exchange(&frames(&[64, 1500, 64], 2));
    assert_eq!(rig.dev.connection_generation(), 1);

    drop(rig);
    let log = pmd.stop_log();
    assert_eq!(last_number(&log, "RX-packets:"), Some(10), "{log}");
}

/// Whether the device marked the 4 KiB page holding `iova` in `log`.
fn dirty(log: &MmapRegion, iova: u64) -> bool {
    let page = iova >> 12;
    let byte: u8 = log
        .as_volatile_slice()
        .read_obj((page / 8) as usize)
        .unwrap();
    byte & (1 << (page % 8)) != 0
}

#[test]
fn the_device_logs_the_pages_it_writes_while_logging_is_on() {
    if !testpmd_or_skip() {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("log");
    let sock = dir.0.join("vhost.sock");
    let _pmd = device_pmd(&sock, &dir.0, 1);
    let mut rig = VuRig::new(&sock, 0x4000_0000);
    assert!(rig.dev.has_dirty_log());
    rig.exchange(&frames(&[64; 3], 1));

    // One bit per page up to the end of the test memory.
    let end = rig.iova + rig.region.size() as u64;
    let log = memfd_region(((end >> 12) / 8 + 1).next_multiple_of(4096) as usize);
    let (rx_used, tx_used) = (rig.rx.used(), rig.tx.used());
    rig.dev.set_vring_log_addr(RX, Some(rx_used)).unwrap();
    rig.dev.set_vring_log_addr(TX, Some(tx_used)).unwrap();
    rig.dev
        .set_dirty_log(Some(DirtyLogArea {
            memory: Arc::clone(&log),
        }))
        .unwrap();

    let heads = rig.exchange(&frames(&[64, 1500, 64, 200], 2));
    for h in &heads {
        let a = rig.rx.buf_addr(*h);
        assert!(dirty(&log, a), "RX buffer {h} at {a:#x} was written");
    }
    assert!(dirty(&log, rx_used), "RX used ring");
    assert!(dirty(&log, tx_used), "TX used ring");
    // The device only reads TX buffers and descriptor tables.
    let tx_bufs = rig.tx.buf_addr(0)..rig.tx.buf_addr(QSIZE - 1) + BUF;
    for a in tx_bufs.step_by(4096) {
        assert!(!dirty(&log, a), "TX buffer page {a:#x} is clean");
    }
    assert!(!dirty(&log, rig.rx.desc()) && !dirty(&log, rig.tx.desc()));

    // Logging off: nothing more is marked.
    rig.dev.set_dirty_log(None).unwrap();
    log.as_volatile_slice()
        .write_slice(&vec![0u8; log.size()], 0)
        .unwrap();
    rig.exchange(&frames(&[64, 1500], 3));
    let bytes = log.size();
    let mut all = vec![0u8; bytes];
    log.as_volatile_slice().read_slice(&mut all, 0).unwrap();
    assert!(
        all.iter().all(|b| *b == 0),
        "no page logged after logging stopped"
    );
}

#[test]
fn listening_for_a_device_that_connects_and_comes_back() {
    if !testpmd_or_skip() {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("client");
    let sock = dir.0.join("relay.sock");
    let mut pmd = client_pmd(&sock, &dir.0);
    let dev = VhostUserNet::connect_with(
        &sock,
        VhostUserOptions {
            listen: true,
            accept_timeout: PEER_TIMEOUT,
            ..VhostUserOptions::default()
        },
    )
    .expect("testpmd connects to the listening backend");
    let mut rig = VuRig::on(dev, 0x4000_0000, 1);
    pmd.wait_forwarding();
    rig.exchange(&frames(&[64, 1500, 64], 1));

    let log = pmd.stop_log();
    assert_eq!(last_number(&log, "RX-packets:"), Some(3), "{log}");
    wait_until("the backend to see the disconnect", || {
        !rig.dev.is_connected()
    });
    assert!(sock.exists(), "the backend keeps listening");
    let mut pmd = client_pmd(&sock, &dir.0);
    wait_until("the device to come back", || {
        rig.dev.connection_generation() == 2
    });
    pmd.wait_forwarding();
    rig.exchange(&frames(&[64; 16], 2));

    drop(rig);
    assert!(!sock.exists(), "the socket goes with the backend");
    let log = pmd.stop_log();
    assert_eq!(last_number(&log, "RX-packets:"), Some(16), "{log}");
}
