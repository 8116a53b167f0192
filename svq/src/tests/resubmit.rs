//! Resubmission of in-flight heads after a restart, and the in-flight hook.

use std::sync::{Arc, Mutex};

use super::harness::{self, FakeDevice};
use super::Fixture;
use crate::{InflightLog, RingIndexes, ShadowVirtqueue, SvqError};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Popped(u16),
    Completing(u16),
    Completed(u16, u16),
    Returned(u16),
}

#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<Ev>>>);

impl Events {
    fn take(&self) -> Vec<Ev> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    fn push(&self, e: Ev) {
        self.0.lock().unwrap().push(e);
    }
}

impl InflightLog for Events {
    fn popped(&self, head: u16) {
        self.push(Ev::Popped(head));
    }
    fn completing(&self, head: u16) {
        self.push(Ev::Completing(head));
    }
    fn completed(&self, head: u16, used_idx: u16) {
        self.push(Ev::Completed(head, used_idx));
    }
    fn returned(&self, head: u16) {
        self.push(Ev::Returned(head));
    }
}

/// A new SVQ on the same guest memory and ring (the restarted daemon).
fn restart(f: &mut Fixture, start: RingIndexes, ev: &Events) {
    harness::unmap_shadow(&mut f.tree, &f.svq);
    let mut svq = ShadowVirtqueue::new(f.svq.config(), harness::guest_ring(), start).unwrap();
    svq.set_inflight_log(Box::new(ev.clone()));
    harness::map_shadow(&mut f.tree, &svq);
    f.dev = FakeDevice::new(&svq);
    f.svq = svq;
}

#[test]
fn heads_in_flight_at_a_restart_are_resubmitted_first_and_complete_once() {
    let ev = Events::default();
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.set_inflight_log(Box::new(ev.clone()));
    let a = f.add(&[(64, true)], false);
    let b = f.add(&[(20, false), (64, true)], false);
    let c = f.add(&[(30, false)], false);
    f.kick().unwrap();
    assert_eq!(f.dev.take_all(&f.tree), 3);
    assert_eq!(ev.take(), [Ev::Popped(a), Ev::Popped(b), Ev::Popped(c)]);
    // b completes; a and c stay with the device.
    let i = f
        .dev
        .taken
        .iter()
        .position(|t| t.writable() == 64 && t.segs.len() == 2);
    f.dev.complete(i.unwrap(), 10, 0x11, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(ev.take(), [Ev::Completing(b), Ev::Completed(b, 1)]);
    assert_eq!(f.used_heads(), [b]);
    // d is popped but the device never takes it: stop gives it back.
    let d = f.add(&[(40, true)], false);
    f.kick().unwrap();
    assert_eq!(ev.take(), [Ev::Popped(d)]);
    let st = f.svq.stop(&f.mem, f.dev.last_avail).unwrap();
    assert_eq!(ev.take(), [Ev::Returned(d)]);
    assert_eq!(st.in_flight, [a, c]);
    // Nothing in the stop state is needed by the new daemon but the guest
    // used idx and the heads: avail starts past the heads in flight.
    assert_eq!(st.indexes, RingIndexes { avail: 3, used: 1 });

    restart(&mut f, st.indexes, &ev);
    assert!(f.svq.resubmit(&st.in_flight, &f.mem, &f.tree).unwrap());
    assert_eq!(ev.take(), [Ev::Popped(a), Ev::Popped(c)]);
    f.kick().unwrap();
    assert_eq!(ev.take(), [Ev::Popped(d)]);
    assert_eq!(f.dev.take_all(&f.tree), 3);
    // Resubmitted in counter order, before the new avail entry, with the
    // guest's own buffers.
    let gpas: Vec<Vec<u64>> = f
        .dev
        .taken
        .iter()
        .map(|t| {
            t.segs
                .iter()
                .map(|s| FakeDevice::gpa(&f.tree, s.0))
                .collect()
        })
        .collect();
    let want: Vec<Vec<u64>> = [a, c, d]
        .iter()
        .map(|h| f.drv.outstanding[h].bufs.iter().map(|b| b.gpa).collect())
        .collect();
    assert_eq!(gpas, want);
    while !f.dev.taken.is_empty() {
        f.dev.complete(0, 0, 0, &f.mem, &f.tree);
    }
    f.call().unwrap();
    let used = f.used_heads();
    assert_eq!(used, [a, c, d]);
    assert!(
        f.drv.outstanding.is_empty(),
        "every chain completed exactly once"
    );
    assert_eq!(
        ev.take(),
        [
            Ev::Completing(a),
            Ev::Completed(a, 2),
            Ev::Completing(c),
            Ev::Completed(c, 3),
            Ev::Completing(d),
            Ev::Completed(d, 4),
        ]
    );
    assert_eq!(f.svq.stats().in_flight, 0);
}

#[test]
fn resubmit_refuses_bad_and_repeated_heads() {
    let mut f = Fixture::new(16, 16, 0, 0);
    assert!(matches!(
        f.svq.resubmit(&[16], &f.mem, &f.tree),
        Err(SvqError::BadHeadIndex { head: 16, .. })
    ));
    let mut f = Fixture::new(16, 16, 0, 0);
    // a is known only from the region.
    let a = f.add(&[(64, true)], false);
    f.drv.set_avail_idx(&f.mem, 0);
    assert!(matches!(
        f.svq.resubmit(&[a, a], &f.mem, &f.tree),
        Err(SvqError::HeadAlreadyInFlight { .. })
    ));
    assert!(f.svq.is_broken());
}

#[test]
fn resubmitted_chains_wait_for_room_in_order() {
    let mut f = Fixture::new(16, 2, 0, 0);
    let heads: Vec<u16> = (0..4).map(|_| f.add(&[(64, true)], false)).collect();
    f.drv.set_avail_idx(&f.mem, 0);
    f.svq = ShadowVirtqueue::new(
        f.svq.config(),
        harness::guest_ring(),
        RingIndexes { avail: 4, used: 0 },
    )
    .unwrap();
    harness::map_shadow(&mut f.tree, &f.svq);
    f.dev = FakeDevice::new(&f.svq);
    f.drv.set_avail_idx(&f.mem, 4);
    f.svq.resubmit(&heads, &f.mem, &f.tree).unwrap();
    let mut done = Vec::new();
    for _ in 0..4 {
        if f.dev.take_all(&f.tree) == 0 && f.dev.taken.is_empty() {
            break;
        }
        f.dev.complete(0, 0, 0, &f.mem, &f.tree);
        f.call().unwrap();
        done.extend(f.used_heads());
    }
    assert_eq!(done, heads);
}

/// A stop before the device took the resubmitted heads keeps them in
/// flight (not returned, avail not rewound over them): the avail ring
/// slots before the start index need not hold them.
#[test]
fn resubmitted_heads_the_device_never_took_stay_in_flight() {
    let ev = Events::default();
    let mut f = Fixture::new(16, 16, 0, 0);
    let a = f.add(&[(64, true)], false);
    let b = f.add(&[(64, true)], false);
    f.kick().unwrap();
    assert_eq!(f.dev.take_all(&f.tree), 2);
    // b completes first: avail slot 1 (b) is past the used idx, a in flight.
    let i = f.dev.taken.iter().position(|t| t.head == 1).unwrap();
    f.dev.complete(i, 0, 0, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(f.used_heads(), [b]);
    let start = RingIndexes { avail: 2, used: 1 };
    restart(&mut f, start, &ev);
    f.svq.resubmit(&[a], &f.mem, &f.tree).unwrap();
    let st = f.svq.stop(&f.mem, 0).unwrap();
    assert_eq!(st.in_flight, [a]);
    assert_eq!(st.indexes, start, "not rewound onto b's slot");
    assert_eq!(ev.take(), [Ev::Popped(a)], "not returned");
}
