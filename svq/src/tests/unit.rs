//! One test per rule of the SVQ: relaying, translation, indirect tables,
//! parking, notification decisions, stop and restart.

use vm_memory::{Bytes, GuestAddress};

use super::harness::{FakeDevice, GuestDriver, BUF_AREA, BUF_BASE, REGION_B, USED_GPA};
use super::{Fixture, F_EVENT_IDX, F_INDIRECT};
use crate::{RingIndexes, SvqError, SUPPORTED_FEATURES};

#[test]
fn supported_features_are_the_ring_features_only() {
    assert_eq!(
        SUPPORTED_FEATURES,
        (1 << 32) | (1 << 27) | (1 << 29) | (1 << 28) | (1 << 34) | (1 << 35),
        "VERSION_1, ANY_LAYOUT, EVENT_IDX, INDIRECT_DESC, RING_PACKED, IN_ORDER"
    );
}

#[test]
fn shadow_memory_is_memfd_backed_page_aligned_and_holds_the_rings() {
    let f = Fixture::new(256, 64, 0, F_INDIRECT);
    let m = f.svq.shadow_memory();
    assert!(m.file_offset().is_some(), "memfd backed");
    assert_eq!(m.as_ptr() as u64 % 4096, 0);
    assert_eq!(m.size() % 4096, 0);
    let a = f.svq.shadow_ring_hva();
    let base = m.as_ptr() as u64;
    for (hva, len) in [
        (a.desc, 16 * 64),
        (a.avail, 6 + 2 * 64),
        (a.used, 6 + 8 * 64),
    ] {
        assert_eq!(hva % 4096, 0);
        assert!(hva >= base && hva + len <= base + m.size() as u64);
    }
    let l = f.svq.shadow_layout();
    assert_eq!(l.indirect_tables, 4);
    assert_eq!(l.table_entries, 512);
    assert!(l.table_offset(4) <= m.size());
}

#[test]
fn relays_a_chain_and_logs_what_the_device_wrote() {
    let mut f = Fixture::new(16, 16, 0, 0);
    let head = f.add(&[(100, false), (300, true), (200, true)], false);
    let bufs = f.drv.outstanding[&head].bufs.clone();
    assert!(f.kick().unwrap(), "device did not suppress kicks");
    assert_eq!(f.dev.take_all(&f.tree), 1);
    let t = f.dev.taken[0].clone();
    // Same buffers, as IOVAs (the tree places guest memory at 4 GiB).
    assert_eq!(t.segs.len(), 3);
    for (s, b) in t.segs.iter().zip(&bufs) {
        assert_eq!(FakeDevice::gpa(&f.tree, s.0), b.gpa);
        assert_ne!(s.0, b.gpa);
        assert_eq!((s.1, s.2), (b.len, b.write));
    }
    f.dev.complete(0, 350, 0xab, &f.mem, &f.tree);
    let out = f.call().unwrap();
    assert!(out.notify_guest);
    assert!(!out.kick_device);
    let used = f.drv.collect(&f.mem);
    assert_eq!(used.len(), 1);
    assert_eq!((used[0].1, used[0].2), (head, 350));
    // The bytes the device wrote landed in the guest buffers.
    let mut data = vec![0u8; 500];
    f.mem
        .read_slice(&mut data, GuestAddress(bufs[1].gpa))
        .unwrap();
    assert!(data[..350].iter().all(|&b| b == 0xab));
    assert!(data[350..].iter().all(|&b| b == 0));
    // Logged: the 300 + 50 bytes written, the used entry, the used idx.
    assert!(f.log.covers(bufs[1].gpa, 300));
    assert!(f.log.covers(bufs[2].gpa, 50));
    assert!(!f.log.covers(bufs[2].gpa + 50, 1));
    assert!(!f.log.covers(bufs[0].gpa, 1), "readable buffer not dirty");
    assert!(f.log.covers(USED_GPA + 4, 8));
    assert!(f.log.covers(USED_GPA + 2, 2));
    let st = f.svq.stats();
    assert_eq!((st.relayed, st.bytes_written, st.in_flight), (1, 350, 0));
    assert_eq!((st.guest_avail_idx, st.guest_used_idx), (1, 1));
    assert_eq!((st.shadow_avail_idx, st.shadow_used_idx), (1, 1));
}

#[test]
fn used_log_address_is_the_one_given() {
    let mut f = Fixture::new(16, 16, 0, 0);
    let mut ring = super::harness::guest_ring();
    ring.used_log = 0x18_0000;
    f.svq = crate::ShadowVirtqueue::new(f.svq.config(), ring, RingIndexes::default()).unwrap();
    super::harness::map_shadow(&mut f.tree, &f.svq);
    f.dev = FakeDevice::new(&f.svq);
    f.add(&[(64, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    f.call().unwrap();
    assert!(f.log.covers(0x18_0000 + 4, 8));
    assert!(f.log.covers(0x18_0000 + 2, 2));
    assert!(!f.log.covers(USED_GPA + 4, 8));
}

#[test]
fn buffer_across_two_mappings_becomes_two_descriptors() {
    let mut f = Fixture::new(16, 16, 0, 0);
    // Head 0's area starts at BUF_BASE; place the buffer over the boundary.
    let gpa = REGION_B.0 - 0x100;
    f.drv
        .add(&f.mem, false, |_| {
            vec![super::harness::Buf {
                gpa,
                len: 0x300,
                write: true,
            }]
        })
        .unwrap();
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    let t = &f.dev.taken[0];
    assert_eq!(t.segs.len(), 2);
    assert_eq!(FakeDevice::gpa(&f.tree, t.segs[0].0), gpa);
    assert_eq!(t.segs[0].1, 0x100);
    assert_eq!(FakeDevice::gpa(&f.tree, t.segs[1].0), REGION_B.0);
    assert_eq!(t.segs[1].1, 0x200);
    f.dev.complete(0, 0x180, 7, &f.mem, &f.tree);
    f.call().unwrap();
    assert!(f.log.covers(gpa, 0x180));
    assert_eq!(f.drv.collect(&f.mem)[0].2, 0x180);
}

#[test]
fn guest_indirect_chain_is_relayed_direct() {
    let mut f = Fixture::new(16, 16, F_INDIRECT, 0);
    let head = f.add(&[(10, false), (20, true), (30, true)], true);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    assert!(!f.dev.taken[0].indirect);
    assert_eq!(f.dev.taken[0].segs.len(), 3);
    f.dev.complete(0, 50, 1, &f.mem, &f.tree);
    f.call().unwrap();
    let u = f.drv.collect(&f.mem);
    assert_eq!((u[0].1, u[0].2), (head, 50));
}

#[test]
fn full_shadow_ring_parks_fifo_and_retries_on_completion() {
    let mut f = Fixture::new(16, 2, 0, 0);
    let h: Vec<u16> = (0..4).map(|_| f.add(&[(8, true)], false)).collect();
    assert!(f.kick().unwrap());
    let st = f.svq.stats();
    assert_eq!((st.in_flight, st.parked, st.guest_avail_idx), (2, 1, 3));
    assert_eq!(f.dev.take_all(&f.tree), 2);
    // Out of order: complete the second first.
    f.dev.complete(1, 8, 1, &f.mem, &f.tree);
    let out = f.call().unwrap();
    assert!(out.kick_device, "parked chain published");
    assert_eq!(
        f.svq.stats().parked,
        1,
        "next chain popped and parked again"
    );
    f.dev.take_all(&f.tree);
    while !f.dev.taken.is_empty() || f.svq.stats().in_flight > 0 {
        f.dev.take_all(&f.tree);
        f.dev.complete(0, 4, 1, &f.mem, &f.tree);
        f.call().unwrap();
    }
    let mut got: Vec<(u16, u32)> = Vec::new();
    got.extend(f.drv.collect(&f.mem).iter().map(|u| (u.1, u.2)));
    assert_eq!(got[0], (h[1], 8));
    got.sort_unstable();
    assert_eq!(got, vec![(h[0], 4), (h[1], 8), (h[2], 4), (h[3], 4)]);
    let st = f.svq.stats();
    assert_eq!((st.in_flight, st.parked, st.relayed), (0, 0, 4));
}

#[test]
fn chain_longer_than_shadow_ring_goes_indirect() {
    let mut f = Fixture::new(16, 2, 0, F_INDIRECT);
    let lens: Vec<(u32, bool)> = (0..5).map(|i| (16, i >= 2)).collect();
    let head = f.add(&lens, false);
    assert!(f.kick().unwrap());
    f.dev.take_all(&f.tree);
    let t = f.dev.taken[0].clone();
    assert!(t.indirect);
    assert_eq!(t.segs.len(), 5);
    assert_eq!(t.writable(), 48);
    // A short chain still fits beside it.
    let h2 = f.add(&[(4, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    assert!(!f.dev.taken[1].indirect);
    f.dev.complete(0, 48, 2, &f.mem, &f.tree);
    f.dev.complete(0, 4, 2, &f.mem, &f.tree);
    f.call().unwrap();
    let mut u: Vec<(u16, u32)> = f.drv.collect(&f.mem).iter().map(|u| (u.1, u.2)).collect();
    u.sort_unstable();
    assert_eq!(u, vec![(head, 48), (h2, 4)]);
}

#[test]
fn indirect_pool_exhaustion_parks_until_a_table_returns() {
    let mut f = Fixture::new(16, 8, 0, F_INDIRECT);
    let lens: Vec<(u32, bool)> = (0..9).map(|_| (8, true)).collect();
    // 9 descriptors per chain: only one such chain fits the guest ring at a
    // time, so use guest indirect chains to post five of them.
    for _ in 0..5 {
        f.add(&lens, true);
    }
    f.kick().unwrap();
    let st = f.svq.stats();
    assert_eq!((st.in_flight, st.parked), (4, 1), "four tables in the pool");
    f.dev.take_all(&f.tree);
    f.dev.complete(2, 72, 1, &f.mem, &f.tree);
    let out = f.call().unwrap();
    assert!(out.kick_device);
    assert_eq!(f.svq.stats().parked, 0);
    f.dev.take_all(&f.tree);
    while !f.dev.taken.is_empty() {
        f.dev.complete(0, 1, 1, &f.mem, &f.tree);
    }
    f.call().unwrap();
    assert_eq!(f.drv.collect(&f.mem).len(), 5);
}

#[test]
fn device_no_notify_suppresses_kick() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.dev.set_used_flags(1); // VRING_USED_F_NO_NOTIFY
    f.add(&[(8, true)], false);
    assert!(!f.kick().unwrap());
    assert_eq!(f.dev.take_all(&f.tree), 1, "published anyway");
    f.dev.set_used_flags(0);
    f.add(&[(8, true)], false);
    assert!(f.kick().unwrap());
}

#[test]
fn device_avail_event_decides_kick_and_svq_sets_used_event() {
    let mut f = Fixture::new(16, 16, 0, F_EVENT_IDX);
    // Device wants a kick once avail idx passes 2 (i.e. reaches 3).
    f.dev.set_avail_event(2);
    f.add(&[(8, true)], false);
    assert!(!f.kick().unwrap(), "0 -> 1 does not cross 2");
    f.add(&[(8, true)], false);
    assert!(!f.kick().unwrap(), "1 -> 2 does not cross 2");
    f.add(&[(8, true)], false);
    assert!(f.kick().unwrap(), "2 -> 3 crosses 2");
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(f.dev.used_event(), 1, "interrupt at the next used entry");
    assert_eq!(f.dev.avail_flags(), 0);
}

#[test]
fn guest_no_interrupt_suppresses_notify() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.drv.set_avail_flags(&f.mem, 1); // VRING_AVAIL_F_NO_INTERRUPT
    f.add(&[(8, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    let out = f.call().unwrap();
    assert!(!out.notify_guest);
    assert_eq!(f.drv.collect(&f.mem).len(), 1, "used entry written anyway");
    // A call with nothing completed never notifies.
    f.drv.set_avail_flags(&f.mem, 0);
    assert!(!f.call().unwrap().notify_guest);
}

#[test]
fn guest_used_event_decides_notify_and_avail_event_is_written() {
    let mut f = Fixture::new(16, 16, F_EVENT_IDX, 0);
    f.drv.set_used_event(&f.mem, 1); // interrupt when used idx passes 1
    for _ in 0..3 {
        f.add(&[(8, true)], false);
    }
    f.kick().unwrap();
    assert_eq!(f.drv.avail_event(&f.mem), 3, "kick me for the next chain");
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    assert!(!f.call().unwrap().notify_guest, "0 -> 1 does not pass 1");
    f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    assert!(f.call().unwrap().notify_guest, "1 -> 3 passes 1");
    // avail_event was reported to the dirty log.
    assert!(f.log.covers(USED_GPA + 4 + 8 * 16, 2));
}

#[test]
fn stop_rewinds_untaken_and_parked_chains() {
    let mut f = Fixture::new(16, 2, 0, 0);
    for _ in 0..4 {
        f.add(&[(8, true)], false);
    }
    f.kick().unwrap();
    // Device takes only the first; completes it; the second is published
    // but not taken; the third parked.
    f.dev.take_all(&f.tree);
    let _ = f.dev.taken.pop();
    f.dev.last_avail = 1;
    f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    f.call().unwrap();
    // The completion made room: chain 2 was published, chain 3 popped and parked.
    assert_eq!(f.svq.stats().guest_avail_idx, 4);
    assert_eq!(f.svq.stats().parked, 1);
    let st = f.svq.stop(&f.mem, f.dev.last_avail).unwrap();
    assert_eq!(st.indexes, RingIndexes { avail: 1, used: 1 });
    assert!(st.in_flight.is_empty());
    assert_eq!(f.kick(), Err(SvqError::Stopped));
    assert_eq!(f.svq.stop(&f.mem, 0), Err(SvqError::Stopped));
}

#[test]
fn stop_reports_chains_the_device_kept() {
    let mut f = Fixture::new(16, 16, 0, 0);
    let h0 = f.add(&[(8, true)], false);
    let h1 = f.add(&[(8, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    let st = f.svq.stop(&f.mem, 2).unwrap();
    assert_eq!(st.indexes, RingIndexes { avail: 2, used: 0 });
    assert_eq!(st.in_flight, vec![h0, h1]);
}

#[test]
fn stop_rejects_an_impossible_device_base_and_can_be_retried() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.add(&[(8, true)], false);
    f.add(&[(8, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    f.call().unwrap();
    // Slot 0 was completed, so the device cannot claim it never took it.
    assert!(matches!(
        f.svq.stop(&f.mem, 0),
        Err(SvqError::InvalidDeviceBase { .. })
    ));
    assert!(matches!(
        f.svq.stop(&f.mem, 3),
        Err(SvqError::InvalidDeviceBase { .. })
    ));
    let st = f.svq.stop(&f.mem, 1).unwrap();
    assert_eq!(st.indexes, RingIndexes { avail: 1, used: 1 });
}

#[test]
fn starts_from_given_indexes_across_wraparound() {
    let start = RingIndexes {
        avail: 65534,
        used: 65534,
    };
    let mut f = Fixture::with_start(16, 4, 0, 0, start);
    let heads: Vec<u16> = (0..4).map(|_| f.add(&[(8, true)], false)).collect();
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    while !f.dev.taken.is_empty() {
        f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    }
    f.call().unwrap();
    let u = f.drv.collect(&f.mem);
    assert_eq!(u.iter().map(|u| u.1).collect::<Vec<_>>(), heads);
    assert_eq!(u[0].0, 65534);
    let st = f.svq.stats();
    assert_eq!((st.guest_avail_idx, st.guest_used_idx), (2, 2));
}

#[test]
fn switch_to_passthrough_and_back_loses_nothing() {
    let mut f = Fixture::new(16, 2, 0, 0);
    let mut heads = Vec::new();
    for _ in 0..5 {
        heads.push(f.add(&[(8, true)], false));
    }
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 3, 1, &f.mem, &f.tree);
    f.dev.complete(0, 3, 1, &f.mem, &f.tree);
    f.call().unwrap();
    // Two more published by the call; device suspended before taking them.
    let st = f.svq.stop(&f.mem, f.dev.last_avail).unwrap();
    assert!(st.in_flight.is_empty());
    let mut pt = super::harness::PassthroughDevice::new(16, st.indexes.avail, st.indexes.used);
    let done = pt.run(&f.mem);
    assert_eq!(done.len(), 3);
    let mut all = f.used_heads();
    all.sort_unstable();
    heads.sort_unstable();
    assert_eq!(all, heads);
    // And back to shadow from the passthrough device's indexes.
    let _ = (BUF_AREA, BUF_BASE);
}

#[test]
fn svq_can_move_to_a_worker_thread() {
    fn send<T: Send>() {}
    send::<crate::ShadowVirtqueue>();
}

#[test]
fn zero_length_buffers_are_left_out_of_the_shadow_chain() {
    let mut f = Fixture::new(16, 16, 0, 0);
    let head = f.add(&[(0, false), (32, true), (0, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    assert_eq!(f.dev.taken[0].segs.len(), 1);
    assert_eq!(f.dev.taken[0].segs[0].1, 32);
    f.dev.complete(0, 32, 1, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(f.drv.collect(&f.mem)[0].1, head);
}

#[test]
fn chain_of_only_empty_buffers_still_reaches_the_device() {
    let mut f = Fixture::new(16, 16, 0, 0);
    let head = f.add(&[(0, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    assert_eq!(f.dev.taken[0].segs, vec![(0, 0, true)]);
    f.dev.complete(0, 0, 1, &f.mem, &f.tree);
    f.call().unwrap();
    let u = f.drv.collect(&f.mem);
    assert_eq!((u[0].1, u[0].2), (head, 0));
}

#[test]
fn min_writable_is_off_by_default_and_counts_every_writable_byte() {
    // Default: a chain the device may only read is relayed as it is.
    let mut f = Fixture::new(16, 16, 0, 0);
    assert_eq!(f.svq.min_writable(), 0);
    f.add(&[(64, false)], false);
    assert!(f.kick().unwrap());
    assert_eq!(f.dev.take_all(&f.tree), 1);

    // Exactly the minimum, split over two descriptors behind a readable
    // one, passes and is relayed whole.
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.set_min_writable(12);
    assert_eq!(f.svq.min_writable(), 12);
    let head = f.add(&[(64, false), (5, true), (7, true)], false);
    assert!(f.kick().unwrap());
    assert_eq!(f.dev.take_all(&f.tree), 1);
    let segs: Vec<(u32, bool)> = f.dev.taken[0].segs.iter().map(|s| (s.1, s.2)).collect();
    assert_eq!(segs, vec![(64, false), (5, true), (7, true)]);
    f.dev.complete(0, 12, 0x5a, &f.mem, &f.tree);
    f.call().unwrap();
    let u = f.drv.collect(&f.mem);
    assert_eq!((u[0].1, u[0].2), (head, 12));
    assert!(!f.svq.is_broken());
}

/// Rough cost of the relay (guest pop → shadow → used → guest), for the
/// README; prints, asserts nothing about time. Run with
/// `cargo test -p svq --release -- --ignored --nocapture relay_cost`.
#[test]
#[ignore]
fn relay_cost() {
    let mut f = Fixture::new(256, 256, 0, 0);
    let rounds = 20_000u32;
    let batch = 32;
    let mut in_svq = std::time::Duration::ZERO;
    let t0 = std::time::Instant::now();
    for _ in 0..rounds {
        for _ in 0..batch {
            f.add(&[(64, true)], false);
        }
        let t = std::time::Instant::now();
        f.kick().unwrap();
        in_svq += t.elapsed();
        f.dev.take_all(&f.tree);
        for i in 0..batch {
            let t = &f.dev.taken[i];
            f.dev.push_used(t.head as u32, 64);
        }
        f.dev.taken.clear();
        let marks = std::cell::Cell::new(0u64);
        let log = |_gpa: u64, len: u64| marks.set(marks.get() + len);
        let t = std::time::Instant::now();
        f.svq.handle_device_call(&f.mem, &f.tree, &log).unwrap();
        in_svq += t.elapsed();
        assert_eq!(marks.get(), 64 * batch as u64 + 10 * batch as u64);
        f.drv.collect(&f.mem);
    }
    let total = t0.elapsed();
    // Same loop without the SVQ: driver + fake device on the guest ring.
    let mut pt = super::harness::PassthroughDevice::new(256, 0, 0);
    let mut drv = GuestDriver::new(&f.mem, 256);
    let t1 = std::time::Instant::now();
    for _ in 0..rounds {
        for _ in 0..batch {
            drv.add(&f.mem, false, |h| {
                GuestDriver::bufs_for(h, 0, &[(64, true)])
            });
        }
        pt.run(&f.mem);
        drv.collect(&f.mem);
    }
    let base = t1.elapsed();
    let n = (rounds as usize * batch) as f64;
    println!(
        "inside the SVQ calls: {:.0} ns/descriptor; with SVQ: {:.0} ns/descriptor; harness alone: {:.0} ns/descriptor",
        in_svq.as_nanos() as f64 / n,
        total.as_nanos() as f64 / n,
        base.as_nanos() as f64 / n
    );
}

/// A polling device that had the guest ring in passthrough leaves
/// VRING_USED_F_NO_NOTIFY in its used flags (DPDK net_vhost does). The SVQ
/// taking the ring over does not poll: its first pass must clear the flag
/// (and log the write), or a driver honouring it never kicks again and new
/// chains wait for an unrelated device call.
#[test]
fn takeover_clears_no_notify_left_by_a_polling_device() {
    let start = RingIndexes { avail: 7, used: 7 };
    let mut f = Fixture::with_start(16, 16, 0, 0, start);
    f.drv.set_avail_idx(&f.mem, 7);
    f.mem
        .write_obj(u16::to_le(1), GuestAddress(USED_GPA)) // NO_NOTIFY
        .unwrap();
    // The take-over pass, with nothing available yet.
    let kick = f
        .svq
        .handle_guest_kick_logged(&f.mem, &f.tree, &f.log)
        .unwrap();
    assert!(!kick);
    assert_eq!(f.drv.used_flags(&f.mem), 0, "the guest must kick again");
    assert!(f.log.covers(USED_GPA, 2), "the flags write is logged");
    // A chain added after that comes with a kick and is relayed.
    f.add(&[(8, true)], false);
    assert!(f.kick().unwrap());
    assert_eq!(f.dev.take_all(&f.tree), 1);
}

/// Under EVENT_IDX the driver ignores the used flags: the SVQ asks for
/// kicks through avail_event only and leaves the flags alone.
#[test]
fn takeover_with_event_idx_asks_through_avail_event() {
    let start = RingIndexes { avail: 7, used: 7 };
    let mut f = Fixture::with_start(16, 16, F_EVENT_IDX, 0, start);
    f.drv.set_avail_idx(&f.mem, 7);
    f.mem
        .write_obj(u16::to_le(1), GuestAddress(USED_GPA))
        .unwrap();
    f.kick().unwrap();
    assert_eq!(f.drv.used_flags(&f.mem), 1);
    assert_eq!(f.drv.avail_event(&f.mem), 7);
}

/// Used entries are logged once per call as ranges (as the kernel's vhost
/// does): a batch that wraps around the end of the used ring logs both
/// pieces and nothing beyond them.
#[test]
fn a_batch_of_completions_across_the_ring_end_logs_both_pieces() {
    let start = RingIndexes {
        avail: 14,
        used: 14,
    };
    let mut f = Fixture::with_start(16, 16, 0, 0, start);
    f.drv.set_avail_idx(&f.mem, 14);
    for _ in 0..4 {
        f.add(&[(64, true)], false);
    }
    f.kick().unwrap();
    assert_eq!(f.dev.take_all(&f.tree), 4);
    for _ in 0..4 {
        f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    }
    f.call().unwrap();
    assert_eq!(f.drv.collect(&f.mem).len(), 4);
    let entry = |slot: u64| USED_GPA + 4 + 8 * slot;
    assert!(f.log.covers(entry(14), 16), "slots 14 and 15");
    assert!(f.log.covers(entry(0), 16), "slots 0 and 1");
    assert!(!f.log.covers(entry(2), 1), "slot 2 was not written");
    assert!(!f.log.covers(entry(13), 1), "slot 13 was not written");
    assert!(f.log.covers(USED_GPA + 2, 2), "used idx");
}
