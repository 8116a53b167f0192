//! Packed rings: the SVQ as the device of a guest packed ring, relaying to a
//! packed or a split shadow ring. The guest driver and the packed device
//! are `testkit::packed_ring`, written apart from this crate.

use std::sync::Arc;

use iova::{AddrSpace, IovaTree};
use testkit::packed_ring::{
    PackedDevice, PackedRing, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, PACKED_F_AVAIL,
    PACKED_F_USED,
};
use testkit::ring::Seg;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, MmapRegion};

use super::harness::{
    self, FakeDevice, GuestDriver, LogRecorder, AVAIL_GPA, BUF_AREA, BUF_BASE, DESC_GPA,
    TABLE_AREA, TABLE_BASE, USED_GPA,
};
use super::{F_EVENT_IDX, F_INDIRECT, F_VERSION_1};
use crate::{RingIndexes, ShadowVirtqueue, SvqConfig, SvqError, F_RING_PACKED};

mod resubmit;

/// A chain as the device took it: buffer id (shadow head), ring slots and
/// `(iova, len, write)` segments.
#[derive(Clone, Debug)]
struct Took {
    id: u16,
    slots: u16,
    segs: Vec<(u64, u32, bool)>,
}

/// The device on the shadow ring, whichever its layout.
enum Device {
    Packed {
        ring: PackedDevice,
        region: Arc<MmapRegion>,
    },
    Split(FakeDevice),
}

fn host_offset(tree: &IovaTree, region: &MmapRegion, iova: u64) -> u64 {
    match tree.reverse(iova) {
        Some((AddrSpace::Host, hva)) => hva - region.as_ptr() as u64,
        other => panic!("IOVA {iova:#x} is not shadow memory: {other:?}"),
    }
}

impl Device {
    fn new(svq: &ShadowVirtqueue, packed: bool) -> Self {
        if !packed {
            return Device::Split(FakeDevice::new(svq));
        }
        let region = svq.shadow_memory();
        let base = region.as_ptr() as u64;
        let a = svq.shadow_ring_hva();
        let ring = PackedDevice::new(
            svq.config().shadow_size,
            a.desc - base,
            a.avail - base,
            a.used - base,
        );
        Device::Packed { ring, region }
    }

    fn take(&mut self, tree: &IovaTree) -> Vec<Took> {
        match self {
            Device::Packed { ring, region } => ring
                .take_all(&**region, &|iova| host_offset(tree, region, iova))
                .expect("the SVQ wrote a malformed packed shadow ring")
                .into_iter()
                .map(|t| Took {
                    id: t.id,
                    slots: t.slots,
                    segs: t.segs,
                })
                .collect(),
            Device::Split(d) => {
                d.take_all(tree);
                d.taken
                    .drain(..)
                    .map(|t| Took {
                        id: t.head,
                        slots: 1,
                        segs: t.segs,
                    })
                    .collect()
            }
        }
    }

    /// Write `len` bytes of `fill` into the chain's writable buffers and
    /// return it used.
    fn complete(&mut self, t: &Took, len: u32, fill: u8, mem: &GuestMemoryMmap, tree: &IovaTree) {
        let mut left = u64::from(len);
        for &(iova, l, w) in &t.segs {
            if !w || left == 0 {
                continue;
            }
            let n = left.min(u64::from(l));
            let gpa = FakeDevice::gpa(tree, iova);
            mem.write_slice(&vec![fill; n as usize], GuestAddress(gpa))
                .unwrap();
            left -= n;
        }
        self.push_used(t.id, len, t.slots);
    }

    fn push_used(&mut self, id: u16, len: u32, slots: u16) {
        match self {
            Device::Packed { ring, region } => ring.push_used(&**region, id, len, slots),
            Device::Split(d) => d.push_used(u32::from(id), len),
        }
    }
}

struct Fixture {
    mem: GuestMemoryMmap,
    tree: IovaTree,
    svq: ShadowVirtqueue,
    dev: Device,
    drv: PackedRing,
    log: LogRecorder,
}

impl Fixture {
    /// A packed guest ring of `q`, the shadow ring of `s` packed or split.
    fn new(q: u16, s: u16, shadow_packed: bool, features: u64) -> Self {
        Self::at(q, s, shadow_packed, features, 0x8000, 0x8000)
    }

    fn at(q: u16, s: u16, shadow_packed: bool, features: u64, avail: u16, used: u16) -> Self {
        let mem = harness::guest_memory();
        let mut tree = harness::guest_tree();
        let guest_features = F_VERSION_1 | F_RING_PACKED | features;
        let device_features =
            (guest_features & !F_RING_PACKED) | if shadow_packed { F_RING_PACKED } else { 0 };
        let cfg = SvqConfig {
            queue_size: q,
            shadow_size: s,
            guest_features,
            device_features,
        };
        let mut drv = PackedRing::new(
            &mem,
            q,
            GuestAddress(DESC_GPA),
            GuestAddress(AVAIL_GPA),
            GuestAddress(USED_GPA),
        );
        drv.event_idx = features & F_EVENT_IDX != 0;
        drv.start_at(avail, used);
        drv.written = Some(Vec::new());
        let start = RingIndexes { avail, used };
        let svq = ShadowVirtqueue::new(cfg, harness::guest_ring(), start).unwrap();
        harness::map_shadow(&mut tree, &svq);
        let dev = Device::new(&svq, shadow_packed);
        Fixture {
            mem,
            tree,
            svq,
            dev,
            drv,
            log: LogRecorder::default(),
        }
    }

    /// Buffers for the chain the driver adds next, in its id's area.
    fn segs(&self, lens: &[(u32, bool)]) -> Vec<Seg> {
        let id = self.drv.next_id().expect("no free id");
        GuestDriver::bufs_for(id, 0, lens)
            .iter()
            .map(|b| Seg {
                addr: GuestAddress(b.gpa),
                len: b.len,
                write: b.write,
            })
            .collect()
    }

    fn add(&mut self, lens: &[(u32, bool)], tag: u64) -> u16 {
        let segs = self.segs(lens);
        self.drv.add(&segs, tag).expect("guest ring full")
    }

    fn add_indirect(&mut self, lens: &[(u32, bool)], tag: u64) -> u16 {
        let segs = self.segs(lens);
        let id = self.drv.next_id().unwrap();
        let table = GuestAddress(TABLE_BASE + u64::from(id) * TABLE_AREA);
        self.drv
            .add_indirect(&segs, tag, table)
            .expect("guest ring full")
    }

    fn kick(&mut self) -> Result<bool, SvqError> {
        self.svq.handle_guest_kick(&self.mem, &self.tree)
    }

    fn call(&mut self) -> Result<crate::CallOutcome, SvqError> {
        self.svq
            .handle_device_call(&self.mem, &self.tree, &self.log)
    }

    fn take(&mut self) -> Vec<Took> {
        self.dev.take(&self.tree)
    }

    fn complete(&mut self, t: &Took, len: u32, fill: u8) {
        self.dev.complete(t, len, fill, &self.mem, &self.tree);
    }

    /// The guest's and the SVQ's positions agree.
    fn positions_agree(&self) {
        let p = self.svq.guest_position();
        assert_eq!(
            (p.avail, p.used),
            (self.drv.avail_position(), self.drv.used_position()),
            "SVQ vs guest driver positions"
        );
    }
}

const BOTH: [bool; 2] = [true, false];

/// Chains of one to three buffers, some indirect, completed in reverse
/// order with data, over many wraps of an 8-entry ring: every byte arrives,
/// every id comes back once with its length, positions and wrap counters
/// agree on both sides, and the log covers every write the guest sees.
#[test]
fn chains_round_trip_over_many_wraps() {
    for shadow_packed in BOTH {
        let mut f = Fixture::new(8, 8, shadow_packed, F_INDIRECT);
        let mut tag = 0u64;
        for round in 0..40u64 {
            let n = 1 + round % 3;
            let mut tags = Vec::new();
            for k in 0..n {
                let lens = [(20, false), (64, true), (32, true)];
                let lens = &lens[..1 + ((round + k) % 3) as usize];
                if (round + k) % 4 == 3 {
                    f.add_indirect(lens, tag);
                } else {
                    f.add(lens, tag);
                }
                tags.push(tag);
                tag += 1;
            }
            f.kick().unwrap();
            let taken = f.take();
            assert_eq!(taken.len(), n as usize, "round {round}");
            for t in taken.iter().rev() {
                let len = t.segs.iter().filter(|s| s.2).map(|s| s.1).sum::<u32>();
                f.complete(t, len, round as u8);
            }
            f.call().unwrap();
            let used = f
                .drv
                .pop_used()
                .expect("the SVQ wrote a bad used descriptor");
            let mut got: Vec<u64> = used.iter().map(|u| u.tag).collect();
            got.sort_unstable();
            assert_eq!(got, tags, "round {round} (shadow packed: {shadow_packed})");
            for u in &used {
                let w: u32 = u.segs.iter().filter(|s| s.write).map(|s| s.len).sum();
                assert_eq!(u.len, w);
                assert!(f.drv.read_written(u).iter().all(|&b| b == round as u8));
            }
            f.positions_agree();
        }
        for &(gpa, len) in f.drv.written.as_ref().unwrap() {
            assert!(f.log.covers(gpa, len), "{gpa:#x}+{len} not logged");
        }
        assert_eq!(f.svq.stats().relayed, tag);
    }
}

/// A shadow ring smaller than the guest's: chains wait for room and are
/// relayed in order as the device completes.
#[test]
fn chains_wait_for_room_on_a_small_shadow_ring() {
    for shadow_packed in BOTH {
        let mut f = Fixture::new(16, 4, shadow_packed, 0);
        for tag in 0..10 {
            f.add(&[(64, true)], tag);
        }
        f.kick().unwrap();
        let mut done = 0;
        while done < 10 {
            let taken = f.take();
            assert!(!taken.is_empty() && taken.len() <= 4);
            for t in &taken {
                f.complete(t, 64, 1);
            }
            done += taken.len();
            f.call().unwrap();
        }
        let used = f.drv.pop_used().unwrap();
        assert_eq!(
            used.iter().map(|u| u.tag).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        f.positions_agree();
    }
}

/// The guest's driver area decides interrupts: DISABLE none, ENABLE one
/// per call, and under EVENT_IDX DESC at the position asked for, in the
/// right lap.
#[test]
fn interrupts_follow_the_driver_area() {
    for shadow_packed in BOTH {
        let mut f = Fixture::new(8, 8, shadow_packed, F_EVENT_IDX);
        let relay_one = |f: &mut Fixture, tag| {
            f.add(&[(64, true)], tag);
            f.kick().unwrap();
            let t = f.take().pop().unwrap();
            f.complete(&t, 64, 0);
            let out = f.call().unwrap();
            f.drv.pop_used().unwrap();
            out.notify_guest
        };
        f.drv.set_driver_event(EVENT_DISABLE, 0);
        assert!(!relay_one(&mut f, 0), "DISABLE");
        f.drv.set_driver_event(EVENT_ENABLE, 0);
        assert!(relay_one(&mut f, 1), "ENABLE");
        // Used position is now 2 (wrap 1): ask for the one at 3.
        f.drv.set_driver_event(EVENT_DESC, 3 | 0x8000);
        assert!(!relay_one(&mut f, 2), "before the event");
        f.drv.set_driver_event(EVENT_DESC, 3 | 0x8000);
        assert!(relay_one(&mut f, 3), "at the event");
        // An event in the next lap is not reached by the next completion.
        f.drv.set_driver_event(EVENT_DESC, 4);
        assert!(!relay_one(&mut f, 4), "next lap");
    }
}

/// Kicks: the SVQ enables them in the device area when it takes the ring
/// (a polling device may have left DISABLE there), turns them off while a
/// worker polls and back on after, logging each write.
#[test]
fn kicks_follow_the_polling_worker() {
    for shadow_packed in BOTH {
        let mut f = Fixture::new(8, 8, shadow_packed, 0);
        f.mem
            .write_obj(EVENT_DISABLE.to_le(), GuestAddress(USED_GPA + 2))
            .unwrap();
        f.kick().unwrap();
        assert_eq!(f.drv.device_event().0, EVENT_ENABLE, "enabled at takeover");
        f.svq.flush_dirty(&f.log);
        assert!(f.log.covers(USED_GPA, 4));
        f.svq.suppress_notifications(&f.mem).unwrap();
        assert_eq!(f.drv.device_event().0, EVENT_DISABLE);
        // A chain added while kicks are off: request_notifications says
        // so, since no kick will come for it.
        f.add(&[(64, true)], 0);
        assert!(f.svq.request_notifications(&f.mem).unwrap());
        assert_eq!(f.drv.device_event().0, EVENT_ENABLE);
        f.call().unwrap();
        assert_eq!(f.take().len(), 1);
    }
}

/// Stop gives back what the device never took: the guest position goes
/// back over those chains (slots, wrap counter), and a device taking the
/// guest ring over from there finds exactly them.
#[test]
fn stop_rewinds_over_chains_the_device_never_took() {
    for shadow_packed in BOTH {
        // Start near the end of the ring so the rewind crosses a wrap.
        let start = 6 | 0x8000;
        let mut f = Fixture::at(8, 8, shadow_packed, 0, start, start);
        let first = f.add(&[(64, true)], 0);
        f.kick().unwrap();
        let taken = f.take();
        f.complete(&taken[0], 64, 7);
        f.call().unwrap();
        assert_eq!(f.drv.pop_used().unwrap()[0].head, first);
        let resume = f.svq.guest_position();
        let ids = [
            f.add(&[(16, false), (64, true)], 1),
            f.add(&[(64, true)], 2),
        ];
        f.kick().unwrap();
        let device_base = if shadow_packed { 1 | 0x8000 } else { 1 };
        let st = f.svq.stop(&f.mem, device_base).unwrap();
        assert_eq!(st.indexes, resume, "rewound over both chains");
        assert!(st.in_flight.is_empty());
        let mut pt = PackedDevice::new(8, DESC_GPA, AVAIL_GPA, USED_GPA);
        pt.start_at(st.indexes.avail, st.indexes.used);
        let again = pt.take_all(&f.mem, &|a| a).unwrap();
        assert_eq!(again.iter().map(|t| t.id).collect::<Vec<_>>(), ids);
        assert_eq!(again[0].slots, 2);
    }
}

/// Rejected guest rings break the queue with the error naming what is
/// wrong; the chains before the bad one still reach the device.
#[test]
fn malformed_guest_rings_break_the_queue() {
    type Corrupt = fn(&mut Fixture);
    type Expected = fn(&SvqError) -> bool;
    let cases: [(&str, Corrupt, Expected); 5] = [
        (
            "continuation not available",
            |f| {
                let (id, head, flags) = f
                    .drv
                    .add_deferred(&f.segs(&[(8, false), (64, true)]), 9)
                    .unwrap();
                let second = (head & 0x7fff) + 1;
                f.drv.write_desc(second, BUF_BASE, 64, id, 0x2);
                f.drv.write_flags(head & 0x7fff, flags);
            },
            |e| matches!(e, SvqError::PackedDescNotAvailable { .. }),
        ),
        (
            "buffer id out of range",
            |f| {
                let flags = f.drv.avail_flags_now();
                let pos = f.drv.avail_position() & 0x7fff;
                f.drv.write_desc(pos, BUF_BASE, 64, 200, flags | 0x2);
            },
            |e| matches!(e, SvqError::BadBufferId { id: 200, .. }),
        ),
        (
            "indirect with next",
            |f| {
                let flags = f.drv.avail_flags_now();
                let pos = f.drv.avail_position() & 0x7fff;
                f.drv.write_desc(pos, TABLE_BASE, 16, 1, flags | 0x4 | 0x1);
            },
            |e| matches!(e, SvqError::IndirectWithNext { .. }),
        ),
        (
            "chain that never ends",
            |f| {
                // Every slot available and chained on: the walk runs into
                // the head again (no longer available in the next lap).
                let flags = f.drv.avail_flags_now();
                for pos in 0..8 {
                    f.drv.write_desc(pos, BUF_BASE, 8, 0, flags | 0x1);
                }
            },
            |e| {
                matches!(
                    e,
                    SvqError::PackedDescNotAvailable { .. } | SvqError::ChainTooLong { .. }
                )
            },
        ),
        (
            "buffer outside guest memory",
            |f| {
                let flags = f.drv.avail_flags_now();
                let pos = f.drv.avail_position() & 0x7fff;
                f.drv.write_desc(pos, 0x4000_0000, 64, 0, flags | 0x2);
            },
            |e| matches!(e, SvqError::DescOutsideMemory { .. }),
        ),
    ];
    for shadow_packed in BOTH {
        for (what, corrupt, expected) in cases {
            let mut f = Fixture::new(8, 8, shadow_packed, F_INDIRECT);
            if what != "chain that never ends" {
                f.add(&[(64, true)], 0);
            }
            corrupt(&mut f);
            let e = f.kick().unwrap_err();
            assert!(expected(&e), "{what}: {e}");
            assert!(f.svq.is_broken());
            if what != "chain that never ends" {
                assert_eq!(f.take().len(), 1, "{what}: the good chain went on");
            }
        }
    }
}

/// A guest making an id available again while it is in flight breaks the
/// queue instead of completing two chains with one id.
#[test]
fn an_id_in_flight_twice_breaks_the_queue() {
    let mut f = Fixture::new(8, 8, true, 0);
    let id = f.add(&[(64, true)], 0);
    f.kick().unwrap();
    let flags = f.drv.avail_flags_now();
    let pos = f.drv.avail_position() & 0x7fff;
    f.drv
        .write_desc(pos, BUF_BASE + BUF_AREA, 64, id, flags | 0x2);
    assert_eq!(
        f.kick().unwrap_err(),
        SvqError::HeadAlreadyInFlight { head: id }
    );
}

/// IN_ORDER on packed rings: net_vhost writes one used descriptor for a
/// batch, naming its last chain, and moves its used position over every
/// slot of the batch; the SVQ completes all of them, in order, and both
/// rings carry on.
#[test]
fn an_in_order_batch_completes_every_chain_of_it() {
    let mut f = Fixture::new(8, 8, true, crate::F_IN_ORDER);
    for round in 0..5u64 {
        let tags: Vec<u64> = (0..3).map(|k| round * 3 + k).collect();
        for &t in &tags {
            let lens = [(16, false), (64, true)];
            f.add(&lens[(t % 2) as usize..], t);
        }
        f.kick().unwrap();
        let taken = f.take();
        assert_eq!(taken.len(), 3);
        let slots: u16 = taken.iter().map(|t| t.slots).sum();
        let Device::Packed { ring, region } = &mut f.dev else {
            unreachable!()
        };
        let ids: Vec<u16> = taken.iter().map(|t| t.id).collect();
        ring.push_used_batch(&**region, &ids, 64, slots);
        f.call().unwrap();
        let used = f.drv.pop_used().expect("bad used descriptor");
        assert_eq!(
            used.iter().map(|u| u.tag).collect::<Vec<_>>(),
            tags,
            "round {round}"
        );
        assert_eq!(used[2].len, 64);
        f.positions_agree();
    }
}

/// A packed shadow ring's device returning nonsense breaks the queue.
#[test]
fn a_used_id_not_in_flight_breaks_the_queue() {
    let mut f = Fixture::new(8, 8, true, 0);
    f.add(&[(64, true)], 0);
    f.kick().unwrap();
    let t = f.take().pop().unwrap();
    f.dev.push_used(t.id + 3, 64, 1);
    assert_eq!(
        f.call().unwrap_err(),
        SvqError::UsedIdNotInFlight {
            id: u32::from(t.id) + 3
        }
    );
}

/// The shadow ring's own descriptors carry the packed flags the device
/// needs: available in the first lap, never looking used.
#[test]
fn shadow_descriptors_are_available_in_their_lap() {
    let mut f = Fixture::new(8, 8, true, 0);
    f.add(&[(64, true)], 0);
    f.kick().unwrap();
    let Device::Packed { region, .. } = &f.dev else {
        unreachable!()
    };
    let base = region.as_ptr() as u64;
    let desc = f.svq.shadow_ring_hva().desc - base;
    let flags = testkit::packed_ring::RingMemory::load_u16(&**region, desc + 14);
    assert_eq!(flags & (PACKED_F_AVAIL | PACKED_F_USED), PACKED_F_AVAIL);
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        /// Guest adds a chain of 1..=3 buffers (indirect when asked).
        Add {
            bufs: u8,
            indirect: bool,
        },
        Kick,
        /// Device completes the `pick`th chain it holds.
        Complete {
            pick: usize,
        },
        Call,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..=3, any::<bool>()).prop_map(|(bufs, indirect)| Op::Add { bufs, indirect }),
            2 => Just(Op::Kick),
            3 => any::<usize>().prop_map(|pick| Op::Complete { pick }),
            2 => Just(Op::Call),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Random interleavings against the model "every chain the guest
        /// added completes exactly once, with the length the device
        /// reported, and the positions agree once everything is back".
        #[test]
        fn packed_relay_matches_the_model(
            ops in proptest::collection::vec(op(), 1..200),
            shadow_packed in any::<bool>(),
            small_shadow in any::<bool>(),
        ) {
            let s = if small_shadow { 4 } else { 8 };
            let mut f = Fixture::new(8, s, shadow_packed, F_INDIRECT);
            let mut held: Vec<Took> = Vec::new();
            let mut added = 0u64;
            let mut expected_len = std::collections::HashMap::new();
            let mut done = std::collections::HashSet::new();
            for op in ops {
                match op {
                    Op::Add { bufs, indirect } => {
                        let lens = &[(20, false), (64, true), (32, true)][..bufs as usize];
                        if f.drv.num_free() < if indirect { 1 } else { lens.len() } || f.drv.next_id().is_none() {
                            continue;
                        }
                        if indirect { f.add_indirect(lens, added); } else { f.add(lens, added); }
                        added += 1;
                    }
                    Op::Kick => { f.kick().unwrap(); }
                    Op::Complete { pick } => {
                        held.extend(f.take());
                        if held.is_empty() { continue; }
                        let t = held.remove(pick % held.len());
                        let w: u32 = t.segs.iter().filter(|s| s.2).map(|s| s.1).sum();
                        let len = w / 2;
                        f.complete(&t, len, 0x5a);
                        expected_len.insert((t.id, t.slots), len);
                    }
                    Op::Call => {
                        f.call().unwrap();
                        for u in f.drv.pop_used().expect("bad used descriptor") {
                            prop_assert!(done.insert(u.tag), "tag {} completed twice", u.tag);
                            let w: u32 = u.segs.iter().filter(|s| s.write).map(|s| s.len).sum();
                            prop_assert_eq!(u.len, w / 2);
                        }
                    }
                }
            }
            // Drain: everything comes back exactly once.
            for _ in 0..16 {
                f.kick().unwrap();
                held.extend(f.take());
                for t in held.drain(..) {
                    let w: u32 = t.segs.iter().filter(|s| s.2).map(|s| s.1).sum();
                    f.complete(&t, w / 2, 0x5a);
                }
                f.call().unwrap();
                for u in f.drv.pop_used().expect("bad used descriptor") {
                    prop_assert!(done.insert(u.tag), "tag {} completed twice", u.tag);
                }
            }
            prop_assert_eq!(done.len() as u64, added);
            f.positions_agree();
            for &(gpa, len) in f.drv.written.as_ref().unwrap() {
                prop_assert!(f.log.covers(gpa, len), "{:#x}+{} not logged", gpa, len);
            }
        }

        /// Whatever a hostile guest writes into its packed ring, the SVQ
        /// neither panics nor hands the device a malformed shadow ring or a
        /// buffer outside guest memory: it relays good chains and breaks
        /// the queue with a guest-side error on the first bad one.
        #[test]
        fn hostile_packed_rings_break_only_the_queue(
            writes in proptest::collection::vec(
                (0u16..8, prop_oneof![Just(BUF_BASE), Just(0x1F_FFF0u64), Just(u64::MAX - 8), any::<u64>()],
                 0u32..0x3000, 0u16..12, any::<u16>()),
                1..40),
            shadow_packed in any::<bool>(),
        ) {
            let mut f = Fixture::new(8, 8, shadow_packed, F_INDIRECT);
            for (i, (pos, addr, len, id, flags)) in writes.into_iter().enumerate() {
                f.drv.write_desc(pos, addr, len, id, flags);
                if i % 4 != 3 {
                    continue;
                }
                match f.kick() {
                    Ok(_) => {}
                    Err(e) => {
                        prop_assert!(!matches!(e, SvqError::ShadowAccess { .. } | SvqError::ShadowMemory(_)), "{e}");
                        prop_assert!(f.svq.is_broken());
                        prop_assert_eq!(f.kick().unwrap_err(), e);
                        return Ok(());
                    }
                }
                for t in f.take() {
                    for &(iova, l, _) in &t.segs {
                        if l > 0 {
                            let gpa = FakeDevice::gpa(&f.tree, iova);
                            prop_assert!(gpa + u64::from(l) <= harness::MEM_END);
                        }
                    }
                    f.dev.push_used(t.id, 0, t.slots);
                }
                if let Err(e) = f.call() {
                    prop_assert!(f.svq.is_broken(), "{e}");
                    return Ok(());
                }
            }
        }
    }
}
