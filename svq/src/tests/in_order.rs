//! VIRTIO_F_IN_ORDER: used entries reach the guest in the order it made
//! chains available, and an IN_ORDER device's batched used entry completes
//! every chain before the one it names.

use super::{Fixture, F_INDIRECT};
use crate::{SvqError, F_IN_ORDER};

/// (head, len) of the guest used entries from `from` to the used idx.
fn guest_used(f: &mut Fixture, from: u16) -> Vec<(u16, u32)> {
    let to = f.drv.used_idx(&f.mem);
    f.drv
        .collect(&f.mem)
        .into_iter()
        .map(|(pos, head, len, _)| {
            assert!(pos.wrapping_sub(from) < to.wrapping_sub(from).max(1));
            (head, len)
        })
        .collect()
}

/// The guest has IN_ORDER, the device completes out of order: chains the
/// device finished early wait for the older ones, then all go out in the
/// guest's order with their own lengths.
#[test]
fn used_entries_reach_the_guest_in_its_order() {
    let mut f = Fixture::new(8, 8, F_IN_ORDER, 0);
    let heads: Vec<u16> = (0..3).map(|_| f.add(&[(64, true)], false)).collect();
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    // Newest first: nothing may reach the guest yet.
    f.dev.complete(2, 30, 3, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(
        f.drv.used_idx(&f.mem),
        0,
        "a chain went out before an older one"
    );
    assert_eq!(f.svq.stats().relayed, 0);
    f.dev.complete(0, 10, 1, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(guest_used(&mut f, 0), vec![(heads[0], 10)]);
    f.dev.complete(0, 20, 2, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(guest_used(&mut f, 1), vec![(heads[1], 20), (heads[2], 30)]);
    assert_eq!(f.svq.stats().relayed, 3);
}

/// Toward a device with IN_ORDER the shadow ring is laid out in order:
/// chains on consecutive descriptors, heads in ring order, wrapping.
#[test]
fn shadow_chains_use_descriptors_in_ring_order() {
    let mut f = Fixture::new(8, 8, F_IN_ORDER, F_IN_ORDER);
    let mut expected_head = 0u16;
    for round in 0..6 {
        let n = 1 + round % 3;
        let bufs: Vec<(u32, bool)> = (0..n).map(|_| (16, true)).collect();
        f.add(&bufs, false);
        f.kick().unwrap();
        f.dev.take_all(&f.tree);
        let t = f.dev.taken.last().unwrap().clone();
        assert_eq!(t.head, expected_head, "round {round}");
        assert_eq!(t.segs.len(), n as usize);
        expected_head = (expected_head + n) % 8;
        f.dev.complete(0, 16, 0, &f.mem, &f.tree);
        f.call().unwrap();
        f.drv.collect(&f.mem);
    }
}

/// An IN_ORDER device writes one used entry for a batch, naming its last
/// chain, and moves the used idx by the batch: every chain of the batch
/// completes, in order, the unnamed ones with length 0 and all their
/// writable bytes logged (what they hold is not said).
#[test]
fn a_batched_used_entry_completes_every_older_chain() {
    let mut f = Fixture::new(8, 8, F_IN_ORDER, F_IN_ORDER | F_INDIRECT);
    let heads: Vec<u16> = (0..4).map(|i| f.add(&[(64, true)], i == 2)).collect();
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    let last = f.dev.taken[3].head;
    let bufs: Vec<_> = heads.iter().map(|h| f.drv.outstanding[h].bufs[0]).collect();
    f.dev.push_used_batch(u32::from(last), 40, 4);
    f.call().unwrap();
    assert_eq!(
        guest_used(&mut f, 0),
        vec![(heads[0], 0), (heads[1], 0), (heads[2], 0), (heads[3], 40)]
    );
    for b in &bufs[..3] {
        assert!(
            f.log.covers(b.gpa, u64::from(b.len)),
            "unnamed chain's buffer not logged"
        );
    }
    assert!(f.log.covers(bufs[3].gpa, 40));
    // The ring goes on after the batch.
    let h = f.add(&[(64, true)], false);
    f.kick().unwrap();
    f.dev.taken.clear();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 8, 0, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(guest_used(&mut f, 4), vec![(h, 8)]);
}

/// A batch whose used idx does not cover it is the device's error.
#[test]
fn a_batch_past_the_used_idx_breaks_the_queue() {
    let mut f = Fixture::new(8, 8, F_IN_ORDER, F_IN_ORDER);
    for _ in 0..3 {
        f.add(&[(64, true)], false);
    }
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    let last = f.dev.taken[2].head;
    f.dev.push_used(u32::from(last), 8);
    assert_eq!(
        f.call().unwrap_err(),
        SvqError::BatchPastUsedIdx { batch: 3, ready: 1 }
    );
}

/// Stop with chains done but waiting for an older one: the guest has not
/// seen them, so they are reported in flight with the older one.
#[test]
fn stop_reports_chains_held_back_for_order() {
    let mut f = Fixture::new(8, 8, F_IN_ORDER, 0);
    let heads: Vec<u16> = (0..2).map(|_| f.add(&[(64, true)], false)).collect();
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(1, 8, 0, &f.mem, &f.tree);
    f.call().unwrap();
    let st = f.svq.stop(&f.mem, 2).unwrap();
    assert_eq!(st.in_flight, heads);
}
