//! Packed rings and the in-flight log: chains are reported with copies of
//! their ring descriptors, and a fresh SVQ (a restarted daemon) resubmits
//! them from those copies, although used descriptors of other chains have
//! overwritten their ring slots since.

use std::sync::{Arc, Mutex};

use super::super::harness::{self, BUF_BASE, TABLE_BASE};
use super::super::F_INDIRECT;
use super::{Device, Fixture, BOTH};
use crate::packed::Pos;
use crate::{InflightLog, RingDesc, RingIndexes, ShadowVirtqueue, SvqError};

/// Keeps what the daemon's region keeps: each chain in flight by id with
/// its descriptors, in the order popped.
#[derive(Clone, Default)]
struct Copies(Arc<Mutex<Vec<Held>>>);

/// A chain's id and descriptors.
type Held = (u16, Vec<RingDesc>);

impl Copies {
    fn chains(&self) -> Vec<Held> {
        self.0.lock().unwrap().clone()
    }
    fn remove(&self, id: u16) {
        let mut v = self.0.lock().unwrap();
        let before = v.len();
        v.retain(|c| c.0 != id);
        assert_eq!(v.len() + 1, before, "id {id} was not in flight");
    }
}

impl InflightLog for Copies {
    fn popped(&self, head: u16) {
        panic!("head {head} of a packed ring reported without its descriptors");
    }
    fn popped_packed(&self, id: u16, descs: &[RingDesc]) {
        let mut v = self.0.lock().unwrap();
        // A resubmitted chain is already held (the region keeps its entry).
        if let Some(c) = v.iter().find(|c| c.0 == id) {
            assert_eq!(c.1, descs, "resubmitted from other copies");
            return;
        }
        v.push((id, descs.to_vec()));
    }
    fn completing(&self, _head: u16) {}
    fn completed(&self, head: u16, _used: u16) {
        self.remove(head);
    }
    fn returned(&self, head: u16) {
        self.remove(head);
    }
}

/// The daemon died: a new SVQ on the same guest memory and ring, started
/// where the region says (used position, avail past the chains in flight).
fn restart(f: &mut Fixture, shadow_packed: bool, log: &Copies) -> RingIndexes {
    let q = f.svq.config().queue_size;
    let slots: u16 = log.chains().iter().map(|c| c.1.len() as u16).sum();
    let used = f.drv.used_position();
    let start = RingIndexes {
        avail: Pos::decode(used).add(slots, q).encode(),
        used,
    };
    harness::unmap_shadow(&mut f.tree, &f.svq);
    let mut svq = ShadowVirtqueue::new(f.svq.config(), harness::guest_ring(), start).unwrap();
    svq.set_inflight_log(Box::new(log.clone()));
    harness::map_shadow(&mut f.tree, &svq);
    f.dev = Device::new(&svq, shadow_packed);
    f.svq = svq;
    start
}

fn copies(log: &Copies) -> Vec<Vec<RingDesc>> {
    log.chains().into_iter().map(|c| c.1).collect()
}

/// Four chains (one indirect) taken; the two younger complete first, so
/// their used descriptors land on the older chains' ring slots. A fresh SVQ
/// resubmits the older two from their copies, the device gets the guest's
/// buffers, and the driver sees every chain completed exactly once.
#[test]
fn chains_in_flight_are_resubmitted_from_their_copies() {
    for shadow_packed in BOTH {
        // Start near the end so the chains and the used writes wrap.
        let start = 6 | 0x8000;
        let mut f = Fixture::at(8, 8, shadow_packed, F_INDIRECT, start, start);
        let log = Copies::default();
        f.svq.set_inflight_log(Box::new(log.clone()));
        let a = f.add(&[(16, false), (64, true)], 0);
        let b = f.add(&[(64, true)], 1);
        let c = f.add_indirect(&[(8, false), (32, true), (32, true)], 2);
        let d = f.add(&[(64, true)], 3);
        f.kick().unwrap();
        let taken = f.take();
        assert_eq!(taken.len(), 4);
        let held = log.chains();
        assert_eq!(
            held.iter().map(|c| (c.0, c.1.len())).collect::<Vec<_>>(),
            [(a, 2), (b, 1), (c, 1), (d, 1)]
        );
        assert!(held[2].1[0].flags & 0x4 != 0, "the indirect descriptor");
        // d, then b: used descriptors at positions 6 and 7, a's slots.
        for t in taken
            .iter()
            .rev()
            .filter(|t| t.slots == 1 && t.segs.len() == 1)
        {
            f.complete(t, 64, 0xee);
        }
        f.call().unwrap();
        let used: Vec<u64> = f.drv.pop_used().unwrap().iter().map(|u| u.tag).collect();
        assert_eq!(used, [3, 1]);
        assert_eq!(log.chains().iter().map(|c| c.0).collect::<Vec<_>>(), [a, c]);

        let st = restart(&mut f, shadow_packed, &log);
        assert_eq!(st.avail, f.drv.avail_position(), "avail past a and c");
        assert!(f
            .svq
            .resubmit_packed(&copies(&log), &f.mem, &f.tree)
            .unwrap());
        let again = f.take();
        assert_eq!(again.len(), 2);
        for (round, t) in again.iter().enumerate() {
            let len = t.segs.iter().filter(|s| s.2).map(|s| s.1).sum::<u32>();
            f.complete(t, len, round as u8 + 1);
        }
        f.call().unwrap();
        let done = f.drv.pop_used().expect("each chain completed once");
        assert_eq!(done.iter().map(|u| u.tag).collect::<Vec<_>>(), [0, 2]);
        for (round, u) in done.iter().enumerate() {
            let w: u32 = u.segs.iter().filter(|s| s.write).map(|s| s.len).sum();
            assert_eq!(u.len, w);
            assert!(f.drv.read_written(u).iter().all(|&x| x == round as u8 + 1));
        }
        assert_eq!(f.drv.num_inflight(), 0);
        assert!(log.chains().is_empty());
        f.positions_agree();
        // The ring goes on as usual.
        f.add(&[(64, true)], 4);
        f.kick().unwrap();
        let t = f.take().pop().unwrap();
        f.complete(&t, 64, 9);
        f.call().unwrap();
        assert_eq!(f.drv.pop_used().unwrap()[0].tag, 4);
        f.positions_agree();
    }
}

/// A stop gives back what the device never took, resubmitted or not: the
/// log forgets it, nothing stays in flight.
#[test]
fn a_chain_the_device_never_took_is_returned() {
    let mut f = Fixture::new(8, 8, true, 0);
    let log = Copies::default();
    f.svq.set_inflight_log(Box::new(log.clone()));
    f.add(&[(64, true)], 0);
    f.kick().unwrap();
    assert_eq!(log.chains().len(), 1);
    let st = f.svq.stop(&f.mem, 0x8000).unwrap();
    assert!(st.in_flight.is_empty());
    assert!(log.chains().is_empty());
}

/// Copies are checked as ring descriptors are: each bad one breaks the
/// queue with the error naming it.
#[test]
fn resubmitted_copies_are_checked() {
    let w = |addr, len, id, flags| RingDesc {
        addr,
        len,
        id,
        flags,
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    type Expected = fn(&SvqError) -> bool;
    let cases: Vec<(&str, Vec<Vec<RingDesc>>, Expected)> = vec![
        ("no descriptor", vec![vec![]], |e| {
            matches!(e, SvqError::ResubmitChainMalformed { descs: 0, .. })
        }),
        (
            "last with NEXT",
            vec![vec![w(BUF_BASE, 64, 0, WRITE | NEXT)]],
            |e| matches!(e, SvqError::ResubmitChainMalformed { .. }),
        ),
        (
            "middle without NEXT",
            vec![vec![w(BUF_BASE, 8, 0, 0), w(BUF_BASE + 64, 8, 0, WRITE)]],
            |e| matches!(e, SvqError::ResubmitChainMalformed { .. }),
        ),
        (
            "outside guest memory",
            vec![vec![w(0x4000_0000, 64, 0, WRITE)]],
            |e| matches!(e, SvqError::DescOutsideMemory { .. }),
        ),
        (
            "readable after writable",
            vec![vec![
                w(BUF_BASE, 8, 0, WRITE | NEXT),
                w(BUF_BASE + 64, 8, 0, 0),
            ]],
            |e| matches!(e, SvqError::ReadableAfterWritable { .. }),
        ),
        (
            "id out of range",
            vec![vec![w(BUF_BASE, 64, 8, WRITE)]],
            |e| matches!(e, SvqError::BadBufferId { id: 8, .. }),
        ),
        (
            "id twice",
            vec![
                vec![w(BUF_BASE, 64, 1, WRITE)],
                vec![w(BUF_BASE, 64, 1, WRITE)],
            ],
            |e| matches!(e, SvqError::HeadAlreadyInFlight { head: 1 }),
        ),
        (
            "indirect table outside memory",
            vec![vec![w(0x4000_0000, 32, 0, INDIRECT)]],
            |e| matches!(e, SvqError::IndirectOutsideMemory { .. }),
        ),
        (
            "indirect with next",
            vec![vec![
                w(TABLE_BASE, 32, 0, INDIRECT | NEXT),
                w(BUF_BASE, 8, 0, WRITE),
            ]],
            |e| matches!(e, SvqError::IndirectWithNext { .. }),
        ),
        (
            "more slots than the positions leave",
            vec![
                vec![w(BUF_BASE, 8, 0, WRITE)],
                vec![w(BUF_BASE, 8, 1, WRITE)],
                vec![w(BUF_BASE, 8, 2, WRITE)],
            ],
            |e| matches!(e, SvqError::ResubmitChainMalformed { .. }),
        ),
    ];
    for shadow_packed in BOTH {
        for (what, chains, expected) in &cases {
            // Two slots in flight between used 0 and avail 2.
            let mut f = Fixture::at(8, 8, shadow_packed, F_INDIRECT, 0x8002, 0x8000);
            let e = f.svq.resubmit_packed(chains, &f.mem, &f.tree).unwrap_err();
            assert!(expected(&e), "{what}: {e}");
            assert!(f.svq.is_broken(), "{what}");
        }
    }
    // Each layout has its form of resubmission.
    let mut f = Fixture::at(8, 8, true, 0, 0x8001, 0x8000);
    assert!(matches!(
        f.svq.resubmit(&[0], &f.mem, &f.tree),
        Err(SvqError::ResubmitWrongLayout { guest_packed: true })
    ));
    let mut s = super::super::Fixture::new(8, 8, 0, 0);
    assert!(matches!(
        s.svq
            .resubmit_packed(&[vec![w(BUF_BASE, 8, 0, WRITE)]], &s.mem, &s.tree),
        Err(SvqError::ResubmitWrongLayout {
            guest_packed: false
        })
    ));
}

/// A stop right after a restart, before the device took the resubmitted
/// chains: they stay in flight (the guest ring no longer holds them where
/// a rewind would look), the avail position stays past them, and the next
/// SVQ resubmits them again; each completes once.
#[test]
fn resubmitted_chains_the_device_never_took_stay_in_flight() {
    for shadow_packed in BOTH {
        let mut f = Fixture::new(8, 8, shadow_packed, 0);
        let log = Copies::default();
        f.svq.set_inflight_log(Box::new(log.clone()));
        let a = f.add(&[(64, true)], 0);
        let b = f.add(&[(16, false), (64, true)], 1);
        let c = f.add(&[(64, true)], 2);
        f.kick().unwrap();
        let taken = f.take();
        // a completes; b and c stay with the device.
        f.complete(&taken[0], 64, 1);
        f.call().unwrap();
        assert_eq!(f.drv.pop_used().unwrap()[0].tag, 0);
        let st = restart(&mut f, shadow_packed, &log);
        f.svq
            .resubmit_packed(&copies(&log), &f.mem, &f.tree)
            .unwrap();
        // One more chain popped after the resubmitted ones: given back.
        let d = f.add(&[(64, true)], 3);
        f.kick().unwrap();
        let start = if shadow_packed { 0x8000 } else { 0 };
        let stopped = f.svq.stop(&f.mem, start).unwrap();
        assert_eq!(stopped.in_flight, [b, c], "shadow packed: {shadow_packed}");
        assert_eq!(stopped.indexes, st, "rewound over d only");
        assert_eq!(log.chains().iter().map(|c| c.0).collect::<Vec<_>>(), [b, c]);
        let _ = (a, d);
        // The next daemon: b and c again, then d from the ring.
        restart(&mut f, shadow_packed, &log);
        f.svq
            .resubmit_packed(&copies(&log), &f.mem, &f.tree)
            .unwrap();
        f.kick().unwrap();
        let again = f.take();
        assert_eq!(again.len(), 3);
        for t in &again {
            f.complete(t, 64, 2);
        }
        f.call().unwrap();
        let tags: Vec<u64> = f.drv.pop_used().unwrap().iter().map(|u| u.tag).collect();
        assert_eq!(tags, [1, 2, 3], "each once");
        assert_eq!(f.drv.num_inflight(), 0);
        assert!(log.chains().is_empty());
        f.positions_agree();
    }
}
