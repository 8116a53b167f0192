//! Random interleavings of guest adds, kicks, device takes and (out of
//! order) completions, device calls, and mode switches (stop, optionally a
//! passthrough phase on the guest ring, restart from the returned indexes).
//! Every guest chain must complete exactly once with the length the device
//! reported, and every byte the device wrote must be in the dirty log.

use std::collections::{HashMap, HashSet};

use iova::IovaTree;
use proptest::prelude::*;
use vm_memory::GuestMemoryMmap;

use super::harness::{
    self, FakeDevice, GuestDriver, LogRecorder, PassthroughDevice, BUF_AREA, BUF_BASE, USED_GPA,
};
use super::{F_EVENT_IDX, F_INDIRECT, F_VERSION_1};
use crate::shadow_ring::need_event;
use crate::{RingIndexes, ShadowVirtqueue, SvqConfig};

#[derive(Clone, Debug)]
enum Op {
    Add {
        bufs: Vec<(u16, bool)>,
        indirect: bool,
        offset: u16,
    },
    /// Guest: kick_prepare + notify if the SVQ asked for kicks.
    Kick,
    /// Worker thread: handle a pending guest kick and device call.
    Worker,
    /// Device: handle a kick (or keep processing while busy).
    Take,
    /// Device: going idle, re-enable notifications and re-check.
    DeviceIdle,
    Complete {
        pick: usize,
        frac: u8,
    },
    /// Guest: interrupt handler (only runs when interrupted).
    Collect,
    Switch {
        passthrough: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            prop::collection::vec((1u16..300, any::<bool>()), 1..=4),
            any::<bool>(),
            0u16..0x1400
        )
            .prop_map(|(bufs, indirect, offset)| Op::Add {
                bufs,
                indirect,
                offset
            }),
        3 => Just(Op::Kick),
        4 => Just(Op::Worker),
        2 => Just(Op::Take),
        2 => Just(Op::DeviceIdle),
        4 => (any::<usize>(), any::<u8>()).prop_map(|(pick, frac)| Op::Complete { pick, frac }),
        2 => Just(Op::Collect),
        1 => any::<bool>().prop_map(|passthrough| Op::Switch { passthrough }),
    ]
}

#[derive(Clone, Debug)]
struct Params {
    q: u16,
    s: u16,
    guest_event_idx: bool,
    device_event_idx: bool,
    device_indirect: bool,
}

fn params() -> impl Strategy<Value = Params> {
    (
        prop::sample::select(vec![4u16, 8, 16]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0usize..5,
    )
        .prop_map(|(q, ge, de, di, si)| {
            // Without INDIRECT_DESC the shadow ring must hold the longest
            // chain (4 buffers + a split across the region boundary).
            let sizes: &[u16] = if di { &[1, 2, 4, 8, 16] } else { &[8, 16] };
            Params {
                q,
                s: sizes[si % sizes.len()],
                guest_event_idx: ge,
                device_event_idx: de,
                device_indirect: di,
            }
        })
}

struct World {
    p: Params,
    mem: GuestMemoryMmap,
    tree: IovaTree,
    svq: ShadowVirtqueue,
    dev: FakeDevice,
    drv: GuestDriver,
    log: LogRecorder,
    /// Guest head -> used len the device (or passthrough) reported.
    device_done: HashMap<u16, u32>,
    /// Chain ids completed to the guest.
    completed: HashSet<u64>,
    written: Vec<(u64, u64)>,
    /// Used positions written by the SVQ (must be logged).
    svq_used_positions: Vec<u16>,
    passthrough_positions: HashSet<u16>,
    // Notification model: an event is only acted on when it was signalled.
    /// Guest avail idx at its last kick decision.
    guest_kick_old: u16,
    svq_kick_pending: bool,
    svq_call_pending: bool,
    device_kick_pending: bool,
    device_busy: bool,
    /// Device used idx at its last interrupt decision.
    device_irq_old: u16,
    guest_irq_pending: bool,
}

impl World {
    fn new(p: Params) -> Self {
        let mem = harness::guest_memory();
        let mut tree = harness::guest_tree();
        let svq = Self::new_svq(&p, RingIndexes::default());
        harness::map_shadow(&mut tree, &svq);
        let dev = FakeDevice::new(&svq);
        World {
            drv: GuestDriver::new(&mem, p.q),
            p,
            mem,
            tree,
            svq,
            dev,
            log: LogRecorder::default(),
            device_done: HashMap::new(),
            completed: HashSet::new(),
            written: Vec::new(),
            svq_used_positions: Vec::new(),
            passthrough_positions: HashSet::new(),
            guest_kick_old: 0,
            svq_kick_pending: false,
            svq_call_pending: false,
            device_kick_pending: false,
            device_busy: false,
            device_irq_old: 0,
            guest_irq_pending: false,
        }
    }

    fn new_svq(p: &Params, start: RingIndexes) -> ShadowVirtqueue {
        let gf = F_VERSION_1 | F_INDIRECT | if p.guest_event_idx { F_EVENT_IDX } else { 0 };
        let mut df = F_VERSION_1;
        if p.device_event_idx {
            df |= F_EVENT_IDX;
        }
        if p.device_indirect {
            df |= F_INDIRECT;
        }
        let cfg = SvqConfig {
            queue_size: p.q,
            shadow_size: p.s,
            guest_features: gf,
            device_features: df,
        };
        ShadowVirtqueue::new(cfg, harness::guest_ring(), start).unwrap()
    }

    fn guest_head_of(&self, t: &harness::Taken) -> u16 {
        let first = t.segs.iter().find(|s| s.1 > 0).expect("non-empty chain");
        let gpa = FakeDevice::gpa(&self.tree, first.0);
        ((gpa - BUF_BASE) / BUF_AREA) as u16
    }

    fn complete(&mut self, i: usize, frac: u8) {
        let t = &self.dev.taken[i];
        let len = (t.writable() * frac as u64 / 255) as u32;
        let head = self.guest_head_of(t);
        let t = self.dev.complete(i, len, frac, &self.mem, &self.tree);
        let _ = t;
        assert!(
            self.device_done.insert(head, len).is_none(),
            "device completed head {head} twice"
        );
    }

    fn call(&mut self) {
        let before = self.svq.stats().guest_used_idx;
        let out = self
            .svq
            .handle_device_call(&self.mem, &self.tree, &self.log)
            .unwrap();
        self.guest_irq_pending |= out.notify_guest;
        self.device_kick_pending |= out.kick_device;
        let after = self.svq.stats().guest_used_idx;
        let mut p = before;
        while p != after {
            self.svq_used_positions.push(p);
            p = p.wrapping_add(1);
        }
    }

    /// Guest kick_prepare/notify for everything added since the last one.
    fn guest_kick(&mut self) {
        let new = self.drv.avail_idx();
        let old = std::mem::replace(&mut self.guest_kick_old, new);
        let kick = if self.p.guest_event_idx {
            need_event(self.drv.avail_event(&self.mem), new, old)
        } else {
            self.drv.used_flags(&self.mem) & 1 == 0
        };
        self.svq_kick_pending |= kick;
    }

    fn worker(&mut self) {
        if std::mem::take(&mut self.svq_kick_pending) {
            let kick = self.svq.handle_guest_kick(&self.mem, &self.tree).unwrap();
            self.device_kick_pending |= kick;
        }
        if std::mem::take(&mut self.svq_call_pending) {
            self.call();
        }
    }

    /// Device kick handler: suppress kicks while busy, take everything.
    fn device_take(&mut self) {
        if std::mem::take(&mut self.device_kick_pending) || self.device_busy {
            self.device_busy = true;
            if !self.p.device_event_idx {
                self.dev.set_used_flags(1);
            }
            self.dev.take_all(&self.tree);
        }
    }

    /// Device going idle: re-enable kicks, then re-check the ring.
    fn device_idle(&mut self) {
        if !self.device_busy {
            return;
        }
        if self.p.device_event_idx {
            self.dev.set_avail_event(self.dev.last_avail);
        } else {
            self.dev.set_used_flags(0);
        }
        if self.dev.take_all(&self.tree) == 0 {
            self.device_busy = false;
        }
    }

    /// Device interrupt decision after writing used entries.
    fn device_irq(&mut self) {
        let new = self.dev.used_idx;
        let old = std::mem::replace(&mut self.device_irq_old, new);
        if new == old {
            return;
        }
        let irq = if self.p.device_event_idx {
            need_event(self.dev.used_event(), new, old)
        } else {
            self.dev.avail_flags() & 1 == 0
        };
        self.svq_call_pending |= irq;
    }

    /// Guest interrupt handler: collect, re-enable interrupts, re-check.
    fn guest_irq(&mut self) {
        if !std::mem::take(&mut self.guest_irq_pending) {
            return;
        }
        loop {
            self.collect();
            if self.p.guest_event_idx {
                self.drv.set_used_event(&self.mem, self.drv.last_used());
            }
            if self.drv.used_idx(&self.mem) == self.drv.last_used() {
                break;
            }
        }
    }

    fn collect(&mut self) {
        for (pos, head, len, o) in self.drv.collect(&self.mem) {
            assert!(
                self.completed.insert(o.id),
                "chain {} completed twice",
                o.id
            );
            let want = self.device_done.remove(&head);
            assert_eq!(want, Some(len), "head {head} at used position {pos}");
            assert!(len as u64 <= o.writable);
        }
    }

    fn switch(&mut self, passthrough: bool) {
        // Suspend: the device finishes what it took, the daemon calls once
        // more, then stops the SVQ at the device's vring base.
        while !self.dev.taken.is_empty() {
            self.complete(0, 255);
        }
        self.svq_kick_pending = false;
        self.svq_call_pending = false;
        self.call();
        let st = self.svq.stop(&self.mem, self.dev.last_avail).unwrap();
        assert!(st.in_flight.is_empty(), "in flight after suspend: {st:?}");
        let mut start = st.indexes;
        if passthrough {
            let mut pt = PassthroughDevice::new(self.p.q, start.avail, start.used);
            for (head, len) in pt.run(&self.mem) {
                assert!(self.device_done.insert(head, len).is_none());
                self.guest_irq_pending = true;
            }
            self.passthrough_positions.extend(pt.used_positions.iter());
            start = pt.indexes();
            assert_eq!(start.avail, start.used, "passthrough drained the ring");
        }
        harness::unmap_shadow(&mut self.tree, &self.svq);
        self.written.append(&mut self.dev.written);
        self.svq = Self::new_svq(&self.p, start);
        harness::map_shadow(&mut self.tree, &self.svq);
        self.dev = FakeDevice::new(&self.svq);
        self.device_kick_pending = false;
        self.device_busy = false;
        self.device_irq_old = 0;
        // The daemon runs one kick on a new SVQ to pick up what is there.
        self.svq_kick_pending = true;
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Add {
                bufs,
                indirect,
                offset,
            } => {
                let lens: Vec<(u32, bool)> = bufs.iter().map(|&(l, w)| (l as u32, w)).collect();
                let _ = self.drv.add(&self.mem, indirect, |h| {
                    GuestDriver::bufs_for(h, offset as u64, &lens)
                });
            }
            Op::Kick => self.guest_kick(),
            Op::Worker => self.worker(),
            Op::Take => self.device_take(),
            Op::DeviceIdle => self.device_idle(),
            Op::Complete { pick, frac } => {
                if !self.dev.taken.is_empty() {
                    let i = pick % self.dev.taken.len();
                    self.complete(i, frac);
                    self.device_irq();
                }
            }
            Op::Collect => self.guest_irq(),
            Op::Switch { passthrough } => self.switch(passthrough),
        }
        let st = self.svq.stats();
        assert!(st.broken.is_none(), "{:?}", st.broken);
    }

    /// Run everything to completion and check the invariants.
    fn finish(mut self) {
        // Only signalled events are acted on: a lost kick or interrupt
        // leaves chains outstanding and fails below.
        self.guest_kick();
        for _ in 0..200 {
            if self.drv.outstanding.is_empty() {
                break;
            }
            self.worker();
            self.device_take();
            while !self.dev.taken.is_empty() {
                self.complete(0, 200);
                self.device_irq();
            }
            self.device_idle();
            self.worker();
            self.guest_irq();
        }
        assert!(
            self.drv.outstanding.is_empty(),
            "chains never completed: {:?}, stats {:?}",
            self.drv.outstanding.keys().collect::<Vec<_>>(),
            self.svq.stats()
        );
        assert_eq!(self.completed.len() as u64, self.drv.next_id);
        assert!(self.device_done.is_empty());
        let st = self.svq.stats();
        assert_eq!((st.in_flight, st.parked), (0, 0));
        self.written.append(&mut self.dev.written);
        for &(gpa, len) in &self.written {
            assert!(self.log.covers(gpa, len), "write {gpa:#x}+{len} not logged");
        }
        let q = self.p.q as u64;
        for &pos in &self.svq_used_positions {
            assert!(!self.passthrough_positions.contains(&pos));
            assert!(self.log.covers(USED_GPA + 4 + 8 * (pos as u64 % q), 8));
        }
        if !self.svq_used_positions.is_empty() {
            assert!(self.log.covers(USED_GPA + 2, 2));
        }
    }
}

proptest! {
    // 256 cases by default; PROPTEST_CASES overrides.

    #[test]
    fn every_buffer_completes_exactly_once(p in params(), ops in prop::collection::vec(op(), 1..120)) {
        let mut w = World::new(p);
        for op in ops {
            w.apply(op);
        }
        w.finish();
    }
}
