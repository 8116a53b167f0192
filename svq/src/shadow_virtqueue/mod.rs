//! One shadow virtqueue: guest ring → shadow ring → guest used ring, for
//! any pairing of ring layouts (`Relay<G, S>`; the public
//! [`ShadowVirtqueue`] in `api.rs` picks the pairing from the features).

use std::collections::VecDeque;
use std::sync::Arc;

use iova::{AddrSpace, IovaTree, Mapping, Segment};
use vm_memory::{GuestMemoryMmap, MmapRegion};

use crate::chain_table::{Chain, InFlightTable};
use crate::guest::GuestSeg;
use crate::layouts::{ChainHead, GuestQueue, ShadowQueue};
use crate::memory::{ShadowLayout, ShadowMem};
use crate::shadow_ring::ShadowSeg;
use crate::{
    CallOutcome, DirtyLog, GuestRing, InflightLog, RingDesc, RingIndexes, ShadowRingAddrs,
    StopState, SvqConfig, SvqError, SvqStats, F_EVENT_IDX, F_INDIRECT_DESC, F_IN_ORDER,
};
use in_order::InOrder;

const LOG: &str = "svq";

mod api;
mod in_order;
mod resubmit;

pub use api::{ShadowVirtqueue, Svq};

/// Where [`Relay::take_chain`] finds the chain.
#[derive(Clone, Copy)]
pub(super) enum ChainSource<'a> {
    /// At the guest's next avail position.
    Ring,
    /// A resubmitted split-ring head.
    Head(u16),
    /// A resubmitted packed-ring chain, from the copies of its descriptors.
    Copy(&'a [RingDesc]),
}

pub(crate) struct Relay<G, S> {
    cfg: SvqConfig,
    guest: G,
    shadow: S,
    inflight: InFlightTable,
    /// Popped chains waiting for room on the shadow ring, oldest first.
    parked: VecDeque<Chain>,
    /// Guest heads popped and not yet returned, to catch a guest re-posting
    /// a head that is still in flight.
    guest_busy: Vec<bool>,
    device_indirect: bool,
    broken: Option<SvqError>,
    stopped: bool,
    /// Device-writable bytes every guest chain must offer (0: no check).
    min_writable: u32,
    seq: u64,
    relayed: u64,
    bytes_written: u64,
    errors: u64,
    // Scratch buffers reused across chains.
    guest_segs: Vec<GuestSeg>,
    iova_segs: Vec<Segment>,
    /// The guest mapping the last buffer translated through, valid for one
    /// handler call only (the tree is borrowed immutably for the call, and
    /// may change between calls): reset by `relay`.
    last_map: Option<Mapping>,
    /// The chain being popped and placed. Placing it swaps its vectors with
    /// the in-flight slot's, so no chain is moved or allocated per
    /// descriptor.
    cur: Chain,
    /// Told of every head popped, completed or given back (INFLIGHT_SHMFD).
    inflight_log: Option<Box<dyn InflightLog>>,
    /// Scratch for `stop`: the chains the device never took.
    not_taken: Vec<(u16, u16)>,
    /// IN_ORDER on either side: the chains in the order they were placed.
    ordered: Option<InOrder>,
}

impl<G: GuestQueue, S: ShadowQueue> Relay<G, S> {
    pub(crate) fn build(
        cfg: SvqConfig,
        guest: GuestRing,
        start: RingIndexes,
        memory: Option<Arc<MmapRegion>>,
    ) -> Result<Self, SvqError> {
        let s = cfg.shadow_size;
        if s == 0 || !s.is_power_of_two() || s > 32768 {
            return Err(SvqError::InvalidShadowSize(s));
        }
        let guest_event_idx = cfg.guest_features & F_EVENT_IDX != 0;
        let device_event_idx = cfg.device_features & F_EVENT_IDX != 0;
        let device_indirect = cfg.device_features & F_INDIRECT_DESC != 0;
        let guest_side = G::new(cfg.queue_size, guest, start, guest_event_idx)?;
        let layout = ShadowLayout::new(s, cfg.queue_size, device_indirect);
        let device_in_order = cfg.device_features & F_IN_ORDER != 0;
        let mut shadow = S::new(layout, device_event_idx, device_in_order)?;
        if let Some(m) = memory {
            shadow.use_memory(ShadowMem::from_region(m, layout.total)?)?;
        }
        log::debug!(
            target: LOG,
            "new SVQ: queue size {} shadow size {} start avail {} used {} shadow memory {:#x} bytes",
            cfg.queue_size, s, start.avail, start.used, layout.total
        );
        Ok(Relay {
            cfg,
            guest: guest_side,
            shadow,
            inflight: InFlightTable::new(s),
            parked: VecDeque::new(),
            guest_busy: vec![false; cfg.queue_size as usize],
            device_indirect,
            broken: None,
            stopped: false,
            min_writable: 0,
            seq: 0,
            relayed: 0,
            bytes_written: 0,
            errors: 0,
            guest_segs: Vec::new(),
            iova_segs: Vec::new(),
            last_map: None,
            cur: Chain::default(),
            inflight_log: None,
            not_taken: Vec::new(),
            ordered: InOrder::new(
                cfg.guest_features & F_IN_ORDER != 0,
                cfg.device_features & F_IN_ORDER != 0,
            ),
        })
    }

    fn usable(&self) -> Result<(), SvqError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.stopped {
            return Err(SvqError::Stopped);
        }
        Ok(())
    }

    fn fail<T>(&mut self, e: SvqError) -> Result<T, SvqError> {
        log::error!(target: LOG, "shadow virtqueue broken: {e}");
        self.errors += 1;
        self.broken = Some(e.clone());
        Err(e)
    }

    fn device_call(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
        log: &dyn DirtyLog,
    ) -> Result<CallOutcome, SvqError> {
        let v = self.guest.view(mem)?;
        let old_used = self.guest.next_used();
        let r = self.consume_used(&v, log);
        // The guest used entries written, once per call as the kernel's
        // vhost logs them, also when a bad entry stopped the loop after
        // some completions.
        self.guest.log_used_since(old_used, log);
        r?;
        let notify_guest = self.guest.should_notify(&v, old_used)?;
        let kick_device = self.relay(mem, &v, iova)?;
        Ok(CallOutcome {
            notify_guest,
            kick_device,
        })
    }

    /// Complete every used entry the device published, re-arming until
    /// none arrives meanwhile.
    fn consume_used(&mut self, v: &G::View<'_>, log: &dyn DirtyLog) -> Result<(), SvqError> {
        loop {
            let ready = self.shadow.used_pending(self.inflight.len())?;
            let mut left = ready;
            while left > 0 {
                let n = self.complete_one(v, log)?;
                // A split ring's used idx counts every entry of a batch.
                if S::PENDING_IS_EXACT && n > left {
                    return Err(SvqError::BatchPastUsedIdx { batch: n, ready });
                }
                left = left.saturating_sub(n);
            }
            if (S::PENDING_IS_EXACT || ready == 0) && !self.shadow.rearm()? {
                return Ok(());
            }
        }
    }

    /// Complete the next used entry; returns how many entries it stood for
    /// (more than 1 for an IN_ORDER device's batch).
    fn complete_one(&mut self, v: &G::View<'_>, log: &dyn DirtyLog) -> Result<u16, SvqError> {
        let (id, len) = self.shadow.pop_used();
        let size = self.cfg.shadow_size;
        if id >= size as u32 {
            return Err(SvqError::BadUsedId {
                id,
                shadow_size: size,
            });
        }
        let max = match self.inflight.get(id) {
            Some(e) => e.writable_len,
            None => return Err(SvqError::UsedIdNotInFlight { id }),
        };
        // Nothing can have been written to a chain without writable
        // buffers, whatever the length says: DPDK's packed dequeue leaves
        // the driver's descriptor length in the first used entry of a
        // batch.
        let len = if max == 0 { 0 } else { len };
        if len as u64 > max {
            return Err(SvqError::UsedLenTooBig { id, len, max });
        }
        if self.ordered.is_some() {
            return self.complete_in_order(v, log, id as u16, len);
        }
        let (guest_head, slots) = self.retire(id as u16, Some(len), log)?;
        self.give_back(v, guest_head, slots, len);
        Ok(1)
    }

    /// Take chain `id` off the shadow ring, `len` bytes written (None: not
    /// said, as for the chains an IN_ORDER batch completes without naming
    /// them: all their writable bytes are logged). Returns its guest head
    /// and slots.
    #[inline(always)]
    fn retire(
        &mut self,
        id: u16,
        len: Option<u32>,
        log: &dyn DirtyLog,
    ) -> Result<(u16, u16), SvqError> {
        // The chain is read in place in its slot: no move, no allocation.
        let Some(chain) = self.inflight.remove(u32::from(id)) else {
            return Err(SvqError::UsedIdNotInFlight { id: u32::from(id) });
        };
        self.shadow.free_chain(id, chain.ndescs, chain.table);
        // Written data first, so the log never lags the used entry that
        // makes it visible to the guest.
        let mut left = len.map_or(chain.writable_len, u64::from);
        for &(gpa, seg_len) in &chain.writable {
            if left == 0 {
                break;
            }
            let n = left.min(seg_len as u64);
            if n > 0 {
                log.mark(gpa, n);
            }
            left -= n;
        }
        Ok((chain.guest_head, chain.guest_slots))
    }

    /// Write the guest's used entry for `guest_head`.
    #[inline(always)]
    fn give_back(&mut self, v: &G::View<'_>, guest_head: u16, slots: u16, len: u32) {
        if let Some(l) = &self.inflight_log {
            l.completing(guest_head);
        }
        self.guest.add_used(v, guest_head, len, slots);
        if let Some(l) = &self.inflight_log {
            l.completed(guest_head, self.guest.next_used());
        }
        if let Some(b) = self.guest_busy.get_mut(guest_head as usize) {
            *b = false;
        }
        self.relayed += 1;
        self.bytes_written += len as u64;
    }

    /// Place parked chains, then pop new guest chains until the guest ring
    /// is empty or the shadow ring full; publish. Returns whether to kick.
    fn relay(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &G::View<'_>,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        self.last_map = None;
        let r = self.relay_inner(mem, v, iova);
        self.last_map = None;
        // Publish what was placed even when a later chain failed, so the
        // good ones are not held back from the device.
        let kick = self.shadow.publish()?;
        r.map(|()| kick)
    }

    fn relay_inner(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &G::View<'_>,
        iova: &IovaTree,
    ) -> Result<(), SvqError> {
        while let Some(chain) = self.parked.pop_front() {
            self.cur = chain;
            if !self.place_cur(iova)? {
                self.parked.push_front(std::mem::take(&mut self.cur));
                return Ok(());
            }
        }
        loop {
            let pending = self.guest.pending(v)?;
            for _ in 0..pending {
                self.pop(mem, v, iova)?;
                if !self.place_cur(iova)? {
                    log::debug!(target: LOG, "shadow ring full, parking head {}", self.cur.guest_head);
                    self.parked.push_back(std::mem::take(&mut self.cur));
                    return Ok(());
                }
            }
            // Ask for the next kick (and clear what the ring's previous
            // owner may have left there); relay what came meanwhile.
            if (G::PENDING_IS_EXACT || pending == 0) && !self.guest.rearm(v)? {
                return Ok(());
            }
        }
    }

    /// Pop the chain at the guest's next avail position into `cur`: read,
    /// validate and translate it, and only then advance the guest position.
    fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &G::View<'_>,
        iova: &IovaTree,
    ) -> Result<(), SvqError> {
        let slots = self.take_chain(mem, v, iova, ChainSource::Ring)?;
        self.guest.advance(slots);
        Ok(())
    }

    /// The guest chain at the next avail position (or at `head`, for a
    /// resubmission) into `cur`: walked, validated, not already in flight,
    /// translated; then marked in flight. Returns its ring slots.
    /// Always inlined: `pop` is the hot path, and as a call it cost ~6
    /// instructions per descriptor (callgrind, batch 32).
    #[inline(always)]
    pub(super) fn take_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &G::View<'_>,
        iova: &IovaTree,
        from: ChainSource<'_>,
    ) -> Result<u16, SvqError> {
        let mut guest_segs = std::mem::take(&mut self.guest_segs);
        let r = self.walk_and_translate(mem, v, iova, from, &mut guest_segs);
        self.guest_segs = guest_segs;
        let chain = r?;
        let head = chain.id;
        self.cur.guest_slots = chain.slots;
        self.cur.resubmitted = !matches!(from, ChainSource::Ring);
        if let Some(b) = self.guest_busy.get_mut(head as usize) {
            *b = true;
        }
        if let Some(l) = &self.inflight_log {
            // Split rings keep nothing (a head names its chain): this is
            // `popped` there, with no branch left after inlining.
            match self.guest.kept_descs() {
                Some(descs) => l.popped_packed(head, descs),
                None => l.popped(head),
            }
        }
        Ok(chain.slots)
    }

    #[inline(always)]
    fn walk_and_translate(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &G::View<'_>,
        iova: &IovaTree,
        from: ChainSource<'_>,
        guest_segs: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError> {
        let c = match from {
            ChainSource::Ring => self.guest.walk_next(mem, v, guest_segs)?,
            ChainSource::Head(h) => self.guest.walk_head(mem, v, h, guest_segs)?,
            ChainSource::Copy(descs) => self.guest.walk_copy(mem, v, descs, guest_segs)?,
        };
        if self.guest_busy.get(c.id as usize).copied().unwrap_or(false) {
            return Err(SvqError::HeadAlreadyInFlight { head: c.id });
        }
        self.check_writable(c.id, guest_segs)?;
        self.translate(c.id, guest_segs, iova)?;
        Ok(c)
    }

    /// Checked before translation: a chain the device could never use is
    /// the more telling error, whatever its addresses.
    fn check_writable(&self, head: u16, guest_segs: &[GuestSeg]) -> Result<(), SvqError> {
        if self.min_writable == 0 {
            return Ok(());
        }
        let writable: u64 = guest_segs
            .iter()
            .filter(|g| g.write)
            .map(|g| u64::from(g.len))
            .sum();
        if writable < u64::from(self.min_writable) {
            return Err(SvqError::TooFewWritableBytes {
                head,
                writable,
                min: self.min_writable,
            });
        }
        Ok(())
    }

    /// Translate `guest_segs` into `cur`, reusing its vectors.
    fn translate(
        &mut self,
        head: u16,
        guest_segs: &[GuestSeg],
        iova: &IovaTree,
    ) -> Result<(), SvqError> {
        let segs = &mut self.cur.segs;
        let writable = &mut self.cur.writable;
        segs.clear();
        writable.clear();
        let mut writable_len = 0u64;
        for g in guest_segs {
            if g.write {
                writable.push((g.addr, g.len));
                writable_len += g.len as u64;
            }
            if g.len == 0 {
                // Nothing for the device to access; leaving it out keeps the
                // shadow chain free of addresses that may not translate.
                continue;
            }
            // Nearly every buffer lies inside one mapping, usually the one
            // the previous buffer used: no tree lookup, no segment list.
            let inside = |m: &Mapping| {
                g.addr >= m.addr
                    && g.addr <= m.last_addr()
                    && m.last_addr() - g.addr >= g.len as u64 - 1
            };
            let hit = match &self.last_map {
                Some(m) if inside(m) => Some(m.iova + (g.addr - m.addr)),
                _ => match iova.find(AddrSpace::Guest, g.addr).filter(|m| inside(m)) {
                    Some(m) => {
                        self.last_map = Some(*m);
                        Some(m.iova + (g.addr - m.addr))
                    }
                    None => None,
                },
            };
            if let Some(at) = hit {
                segs.push(ShadowSeg {
                    iova: at,
                    len: g.len,
                    write: g.write,
                });
                continue;
            }
            self.iova_segs.clear();
            iova.translate(AddrSpace::Guest, g.addr, g.len as u64, &mut self.iova_segs)
                .map_err(|source| SvqError::Translation {
                    head,
                    gpa: g.addr,
                    len: g.len as u64,
                    source,
                })?;
            segs.extend(self.iova_segs.iter().map(|s| ShadowSeg {
                iova: s.iova,
                // A piece of a u32-long buffer fits a u32.
                len: s.len as u32,
                write: g.write,
            }));
        }
        if segs.is_empty() {
            // A chain of empty buffers still needs a descriptor to carry it.
            segs.push(ShadowSeg {
                iova: 0,
                len: 0,
                write: guest_segs.iter().any(|g| g.write),
            });
        }
        let n = segs.len();
        let s = self.cfg.shadow_size as usize;
        if n > s {
            if !self.device_indirect {
                return Err(SvqError::NeedIndirect {
                    head,
                    segments: n,
                    shadow_size: self.cfg.shadow_size,
                });
            }
            let max = self.shadow.layout().max_segments();
            if n > max {
                return Err(SvqError::TooManySegments {
                    head,
                    segments: n,
                    max,
                });
            }
        }
        self.seq += 1;
        self.cur.guest_head = head;
        self.cur.seq = self.seq;
        self.cur.writable_len = writable_len;
        Ok(())
    }

    /// Put `cur` on the shadow ring (unpublished). `Ok(false)`: no room
    /// yet, `cur` is unchanged.
    fn place_cur(&mut self, iova: &IovaTree) -> Result<bool, SvqError> {
        let n = self.cur.segs.len();
        if n <= self.cfg.shadow_size as usize {
            if (self.shadow.num_free() as usize) < n {
                return Ok(false);
            }
            let avail_pos = self.shadow.avail_idx();
            let head = self.shadow.add_direct(&self.cur.segs);
            self.placed(head);
            self.inflight
                .insert(head, &mut self.cur, n as u16, None, avail_pos);
            return Ok(true);
        }
        let Some(table) = self.shadow.next_free_table() else {
            return Ok(false);
        };
        if self.shadow.num_free() == 0 {
            return Ok(false);
        }
        let hva = self.shadow.table_hva(table);
        let table_iova = match iova.translate_contiguous(AddrSpace::Host, hva, (n * 16) as u64) {
            Ok(t) => t,
            Err(source) => {
                // Keep the chain so that stop() can still rewind over it.
                self.parked.push_front(std::mem::take(&mut self.cur));
                return Err(SvqError::ShadowTranslation { hva, source });
            }
        };
        let avail_pos = self.shadow.avail_idx();
        let head = self
            .shadow
            .add_indirect(&self.cur.segs, table, table_iova)?;
        self.placed(head);
        self.inflight
            .insert(head, &mut self.cur, 1, Some(table), avail_pos);
        Ok(true)
    }
}

impl<G: GuestQueue, S: ShadowQueue> Svq for Relay<G, S> {
    fn config(&self) -> SvqConfig {
        self.cfg
    }

    fn set_min_writable(&mut self, bytes: u32) {
        self.min_writable = bytes;
    }

    fn set_inflight_log(&mut self, log: Box<dyn InflightLog>) {
        self.inflight_log = Some(log);
        self.guest.keep_descs();
    }

    fn min_writable(&self) -> u32 {
        self.min_writable
    }

    fn shadow_memory(&self) -> Arc<MmapRegion> {
        self.shadow.region().clone()
    }

    fn shadow_layout(&self) -> ShadowLayout {
        *self.shadow.layout()
    }

    fn shadow_ring_hva(&self) -> ShadowRingAddrs {
        self.shadow.ring_hva()
    }

    fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    fn broken_reason(&self) -> Option<&SvqError> {
        self.broken.as_ref()
    }

    fn stats(&self) -> SvqStats {
        SvqStats {
            guest_avail_idx: self.guest.next_avail(),
            guest_used_idx: self.guest.next_used(),
            shadow_avail_idx: self.shadow.avail_idx(),
            shadow_used_idx: self.shadow.last_used(),
            relayed: self.relayed,
            bytes_written: self.bytes_written,
            in_flight: self.inflight.len() as u32,
            parked: self.parked.len() as u32,
            errors: self.errors,
            broken: self.broken.as_ref().map(|e| e.to_string()),
        }
    }

    fn handle_guest_kick(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        self.usable()?;
        let r = self.guest.view(mem).and_then(|v| self.relay(mem, &v, iova));
        match r {
            Ok(kick) => Ok(kick),
            Err(e) => self.fail(e),
        }
    }

    fn handle_guest_kick_logged(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
        log: &dyn DirtyLog,
    ) -> Result<bool, SvqError> {
        let r = self.handle_guest_kick(mem, iova);
        self.flush_dirty(log);
        r
    }

    fn flush_dirty(&mut self, log: &dyn DirtyLog) {
        self.guest.flush_dirty(log);
    }

    fn suppress_notifications(&mut self, mem: &GuestMemoryMmap) -> Result<(), SvqError> {
        self.usable()?;
        let r = self.guest.view(mem).and_then(|v| {
            self.guest.suppress_kicks(&v);
            self.shadow.suppress_calls()
        });
        r.or_else(|e| self.fail(e))
    }

    fn request_notifications(&mut self, mem: &GuestMemoryMmap) -> Result<bool, SvqError> {
        if !self.notifications_suppressed() {
            return Ok(false);
        }
        let r = self.guest.view(mem).and_then(|v| {
            let guest = self.guest.request_kicks(&v)?;
            let device = self.shadow.request_calls()?;
            Ok(guest || device)
        });
        r
    }

    fn notifications_suppressed(&self) -> bool {
        self.guest.kicks_suppressed() || self.shadow.calls_suppressed()
    }

    fn guest_position(&self) -> RingIndexes {
        RingIndexes {
            avail: self.guest.next_avail(),
            used: self.guest.next_used(),
        }
    }

    fn handle_device_call(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
        log: &dyn DirtyLog,
    ) -> Result<CallOutcome, SvqError> {
        self.usable()?;
        let r = self.device_call(mem, iova, log);
        self.flush_dirty(log);
        match r {
            Ok(o) => Ok(o),
            Err(e) => self.fail(e),
        }
    }

    fn stop(
        &mut self,
        _mem: &GuestMemoryMmap,
        device_next_avail: u16,
    ) -> Result<StopState, SvqError> {
        if self.stopped {
            return Err(SvqError::Stopped);
        }
        let shadow_avail = self.shadow.avail_idx();
        let bad = SvqError::InvalidDeviceBase {
            device_next_avail,
            shadow_avail,
        };
        let mut not_taken = std::mem::take(&mut self.not_taken);
        let consistent = self.shadow.not_taken(device_next_avail, &mut not_taken)
            && not_taken.len() <= self.inflight.len()
            && not_taken
                .iter()
                .all(|&(pos, id)| self.inflight.get(id as u32).map(|e| e.avail_pos) == Some(pos));
        if !consistent {
            self.not_taken = not_taken;
            return Err(bad);
        }
        // A resubmitted chain the device never took stays in flight: it is
        // not on the guest ring where a rewind would find it (the ring
        // slots before the start avail position hold whatever the guest
        // and the old daemon left; on a packed ring used descriptors), so
        // it goes to the next owner the way it came, from the in-flight
        // region. Resubmitted chains were placed first, so the chains given
        // back are still the newest: the rewind covers exactly them.
        let mut slots = 0u32;
        let mut returned = 0usize;
        let mut kept = Vec::new();
        for &(_, id) in &not_taken {
            if let Some(e) = self.inflight.remove(id as u32) {
                self.shadow.free_chain(id, e.ndescs, e.table);
                if e.resubmitted {
                    kept.push(e.guest_head);
                    continue;
                }
                returned += 1;
                slots += u32::from(e.guest_slots);
                if let Some(b) = self.guest_busy.get_mut(e.guest_head as usize) {
                    *b = false;
                }
                if let Some(l) = &self.inflight_log {
                    l.returned(e.guest_head);
                }
            }
        }
        if let Some(o) = &mut self.ordered {
            o.forget_newest(not_taken.len());
        }
        self.not_taken = not_taken;
        self.shadow.unpublish_to(device_next_avail);
        for c in self.parked.drain(..) {
            if c.resubmitted {
                kept.push(c.guest_head);
                continue;
            }
            returned += 1;
            slots += u32::from(c.guest_slots);
            if let Some(b) = self.guest_busy.get_mut(c.guest_head as usize) {
                *b = false;
            }
            if let Some(l) = &self.inflight_log {
                l.returned(c.guest_head);
            }
        }
        let chains = returned;
        self.guest.rewind(chains as u16, slots);
        self.stopped = true;
        let state = StopState {
            indexes: RingIndexes {
                avail: self.guest.next_avail(),
                used: self.guest.next_used(),
            },
            in_flight: {
                let mut heads = match &self.ordered {
                    // Completed but waiting for an older chain count too:
                    // the guest has not seen them.
                    Some(o) => o.guest_heads(),
                    None => self.inflight.guest_heads_in_order(),
                };
                heads.extend(kept);
                heads
            },
        };
        log::debug!(
            target: LOG,
            "SVQ stopped: rewound {chains}, continue at avail {} used {}, {} in flight",
            state.indexes.avail, state.indexes.used, state.in_flight.len()
        );
        Ok(state)
    }

    fn resubmit(
        &mut self,
        heads: &[u16],
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        self.resubmit_heads(heads, mem, iova)
    }

    fn resubmit_packed(
        &mut self,
        chains: &[Vec<RingDesc>],
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        self.resubmit_copies(chains, mem, iova)
    }
}
