//! INFLIGHT_SHMFD end to end (issue 4), real binaries over real sockets: in
//! shadow mode the daemon records every guest head it popped in the region
//! the VMM got with GET_INFLIGHT_FD and clears it on completion; after the
//! daemon is SIGKILLed, a new daemon given the same region (SET_INFLIGHT_FD)
//! and the used idx as vring base resubmits the heads that were in flight,
//! and every frame and receive buffer completes exactly once (the test
//! driver fails on a duplicate or unknown used entry, and on loss the
//! traffic stalls and fails the pump).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use testkit::migrate::migration_proto;
use testkit::{pump, Daemon, Until, Vmm, VmmConfig};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Bytes, GuestAddress};

/// One queue's part: 16-byte header, 16 bytes per descriptor, rounded up to
/// 64 bytes (QEMU vhost-user.rst "Inflight I/O tracking", as allocated).
fn stride(queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).div_ceil(64) * 64
}

/// Heads marked in flight in queue `q`'s part of the region.
fn heads_in_flight(file: &File, q: usize, queue_size: u16) -> Vec<u16> {
    let base = q as u64 * stride(queue_size);
    let mut hdr = [0u8; 16];
    file.read_exact_at(&mut hdr, base).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 1, "region version");
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), queue_size);
    (0..queue_size)
        .filter(|&h| {
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, base + 16 + 16 * u64::from(h))
                .unwrap();
            b[0] != 0
        })
        .collect()
}

fn used_idx(vmm: &Vmm, q: usize) -> u16 {
    let p = &vmm.pairs[q / 2];
    let r = if q.is_multiple_of(2) {
        &p.rx.ring
    } else {
        &p.tx.ring
    };
    let v: u16 = r.mem().read_obj(GuestAddress(r.used.0 + 2)).unwrap();
    u16::from_le(v)
}

/// The region matches what the driver has outstanding: every RX buffer it
/// posted is in flight, no TX frame is (all were sent and completed).
fn wait_region_matches_driver(vmm: &Vmm, file: &File, size: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rx = heads_in_flight(file, 0, size);
        let tx = heads_in_flight(file, 1, size);
        let want_rx = vmm.pairs[0].rx.ring.num_inflight();
        if rx.len() == want_rx && tx.is_empty() && want_rx > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "region: rx {} in flight (driver has {want_rx} posted), tx {:?}",
            rx.len(),
            tx
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_restarted_daemon_resubmits_what_was_in_flight_exactly_once() {
    let mut d1 = Daemon::spawn(&["--shadow", "on"]);
    let cfg = VmmConfig::default();
    let size = cfg.ring_size;
    let mut vmm = Vmm::negotiate_with(
        testkit::vmm::connect_stream(&d1.socket),
        cfg,
        migration_proto(),
    );
    vmm.set_mem_table().expect("SET_MEM_TABLE");
    // QEMU's order: the region before the rings start.
    let (reply, region) = vmm
        .fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 2, size))
        .expect("GET_INFLIGHT_FD");
    vmm.fe
        .set_inflight_fd(&reply, region.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    for q in 0..2 {
        vmm.setup_queue(q)
            .unwrap_or_else(|e| panic!("set up queue {q}: {e}"));
    }
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap_or_else(|e| panic!("before: {e}"));
    // Recording: the posted receive buffers wait at the device, in flight.
    wait_region_matches_driver(&vmm, &region, size);
    let rx_before = heads_in_flight(&region, 0, size);

    // The daemon dies with them; frames the guest sends meanwhile wait on
    // the avail ring.
    let mut child = d1.child.take().unwrap();
    child.kill().unwrap();
    assert!(testkit::daemon::wait_timeout(&mut child, Duration::from_secs(10)).is_some());
    let queued = vmm.pairs[0].send(8);
    assert!(queued > 0);
    assert_eq!(
        heads_in_flight(&region, 0, size),
        rx_before,
        "nobody wrote the region"
    );

    // A new daemon, same region, rings restarted at the guest used idx.
    let d2 = Daemon::spawn(&["--shadow", "on"]);
    vmm.move_to(&d2.socket);
    vmm.fe
        .set_inflight_fd(&reply, region.as_raw_fd())
        .expect("SET_INFLIGHT_FD on the new daemon");
    for q in 0..2 {
        let base = used_idx(&vmm, q);
        vmm.restart_queue(q, base)
            .unwrap_or_else(|e| panic!("restart queue {q}: {e}"));
    }
    pump(&mut vmm.pairs, Until::Frames(300)).unwrap_or_else(|e| panic!("after: {e}"));
    let log = d2.stderr();
    assert!(
        log.contains(&format!(
            "queue 0: resubmitting {} heads in flight",
            rx_before.len()
        )),
        "{log}"
    );
    wait_region_matches_driver(&vmm, &region, size);
    // Every frame, including those queued while no daemon ran, arrived once
    // and every TX buffer came back once.
    let p = &vmm.pairs[0];
    assert_eq!(p.n_rx_received, u64::from(p.next_seq));
    assert_eq!(p.n_tx_completed, u64::from(p.next_seq));
    assert!(p.rx_received.iter().all(|&r| r));
}
