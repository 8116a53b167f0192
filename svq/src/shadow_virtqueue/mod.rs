//! One shadow virtqueue: guest ring → shadow ring → guest used ring.

use std::collections::VecDeque;
use std::sync::Arc;

use iova::{AddrSpace, IovaTree, Mapping, Segment};
use vm_memory::{GuestMemoryMmap, MmapRegion};

use crate::chain_table::{Chain, InFlightTable};
use crate::guest::{GuestSeg, GuestSide, RingView};
use crate::memory::{ShadowLayout, ShadowMem};
use crate::shadow_ring::{ShadowRing, ShadowSeg};
use crate::{
    CallOutcome, DirtyLog, GuestRing, InflightLog, RingIndexes, ShadowRingAddrs, StopState,
    SvqConfig, SvqError, SvqStats, F_EVENT_IDX, F_INDIRECT_DESC,
};

const LOG: &str = "svq";

mod resubmit;

pub struct ShadowVirtqueue {
    cfg: SvqConfig,
    guest: GuestSide,
    shadow: ShadowRing,
    inflight: InFlightTable,
    /// Popped chains waiting for room on the shadow ring, oldest first.
    parked: VecDeque<Chain>,
    /// Guest heads popped and not yet returned, to catch a guest re-posting
    /// a head that is still in flight.
    guest_busy: Vec<bool>,
    device_indirect: bool,
    guest_event_idx: bool,
    broken: Option<SvqError>,
    stopped: bool,
    /// avail_event was written and not yet reported to a dirty log.
    avail_event_dirty: bool,
    /// The guest used flags were written and not yet reported to a dirty log.
    used_flags_dirty: bool,
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
}

impl ShadowVirtqueue {
    /// A queue relaying `guest` from the positions in `start`. The shadow
    /// ring starts at index 0 on both avail and used: give the device vring
    /// base 0 for it.
    pub fn new(cfg: SvqConfig, guest: GuestRing, start: RingIndexes) -> Result<Self, SvqError> {
        Self::build(cfg, guest, start, None)
    }

    /// As [`new`](Self::new), with the shadow rings and indirect tables in
    /// memory the caller provides: at least [`shadow_memory_size`] bytes at
    /// a page-aligned address, not used by anything else while the queue
    /// lives. [`shadow_memory`](Self::shadow_memory) then returns `memory`.
    ///
    /// [`shadow_memory_size`]: Self::shadow_memory_size
    pub fn with_shadow_memory(
        cfg: SvqConfig,
        guest: GuestRing,
        start: RingIndexes,
        memory: Arc<MmapRegion>,
    ) -> Result<Self, SvqError> {
        Self::build(cfg, guest, start, Some(memory))
    }

    /// Bytes of shadow memory a queue with `cfg` needs.
    pub fn shadow_memory_size(cfg: &SvqConfig) -> usize {
        let device_indirect = cfg.device_features & F_INDIRECT_DESC != 0;
        ShadowLayout::new(cfg.shadow_size, cfg.queue_size, device_indirect).total
    }

    fn build(
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
        let guest_side = GuestSide::new(cfg.queue_size, guest, start, guest_event_idx)?;
        let layout = ShadowLayout::new(s, cfg.queue_size, device_indirect);
        let mut shadow = ShadowRing::new(layout, device_event_idx)?;
        if let Some(m) = memory {
            shadow.use_memory(ShadowMem::from_region(m, layout.total)?)?;
        }
        log::debug!(
            target: LOG,
            "new SVQ: queue size {} shadow size {} start avail {} used {} shadow memory {:#x} bytes",
            cfg.queue_size, s, start.avail, start.used, layout.total
        );
        Ok(ShadowVirtqueue {
            cfg,
            guest: guest_side,
            shadow,
            inflight: InFlightTable::new(s),
            parked: VecDeque::new(),
            guest_busy: vec![false; cfg.queue_size as usize],
            device_indirect,
            guest_event_idx,
            broken: None,
            stopped: false,
            avail_event_dirty: false,
            used_flags_dirty: false,
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
        })
    }

    pub fn config(&self) -> SvqConfig {
        self.cfg
    }

    /// Require every guest chain popped from now on to offer at least
    /// `bytes` device-writable bytes; a chain with fewer breaks the queue
    /// with [`SvqError::TooFewWritableBytes`] and is left on the guest ring.
    /// 0 (the default) checks nothing.
    ///
    /// The SVQ does not know the device class, so the caller sets it: for a
    /// virtio-net receive queue, the size of the virtio-net header (12 bytes
    /// with VERSION_1 or MRG_RXBUF, else 10), which the device must always be
    /// able to write (virtio 1.2, 5.1.6.3.1 and 5.1.6.4). Otherwise such a
    /// chain is relayed and the device waits on it forever.
    pub fn set_min_writable(&mut self, bytes: u32) {
        self.min_writable = bytes;
    }

    /// Report every guest head popped, completed or given back to `log`
    /// from now on (the daemon's INFLIGHT_SHMFD region).
    pub fn set_inflight_log(&mut self, log: Box<dyn InflightLog>) {
        self.inflight_log = Some(log);
    }

    /// The minimum set by [`set_min_writable`](Self::set_min_writable).
    pub fn min_writable(&self) -> u32 {
        self.min_writable
    }

    /// Memory holding the shadow rings and indirect tables (memfd-backed,
    /// page aligned). Map it in the IOVA tree as `(AddrSpace::Host,
    /// as_ptr() as u64, size())` and DMA-map it before the first kick.
    pub fn shadow_memory(&self) -> Arc<MmapRegion> {
        self.shadow.region().clone()
    }

    /// Where each part lives inside `shadow_memory`.
    pub fn shadow_layout(&self) -> ShadowLayout {
        *self.shadow.layout()
    }

    /// HVAs of the shadow rings; translate them with the tree for the device.
    pub fn shadow_ring_hva(&self) -> ShadowRingAddrs {
        ShadowRingAddrs {
            desc: self.shadow.desc_hva(),
            avail: self.shadow.avail_hva(),
            used: self.shadow.used_hva(),
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// The error that broke the queue.
    pub fn broken_reason(&self) -> Option<&SvqError> {
        self.broken.as_ref()
    }

    pub fn stats(&self) -> SvqStats {
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

    /// Guest kicked (or start / retry): pop, validate, translate and relay
    /// every available chain. `Ok(true)`: kick the device.
    pub fn handle_guest_kick(
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

    /// As `handle_guest_kick`, also reporting the guest ring fields the SVQ
    /// wrote (avail_event under EVENT_IDX, the used flags) to `log`.
    pub fn handle_guest_kick_logged(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
        log: &dyn DirtyLog,
    ) -> Result<bool, SvqError> {
        let r = self.handle_guest_kick(mem, iova);
        self.flush_dirty(log);
        r
    }

    /// Report guest ring fields written since the last report (avail_event,
    /// the used flags).
    /// `handle_device_call` does this itself; call it before the final log
    /// sync of a migration.
    pub fn flush_dirty(&mut self, log: &dyn DirtyLog) {
        if std::mem::take(&mut self.avail_event_dirty) {
            let (gpa, len) = self.guest.avail_event_log();
            log.mark(gpa, len);
        }
        if std::mem::take(&mut self.used_flags_dirty) {
            let (gpa, len) = self.guest.used_flags_log();
            log.mark(gpa, len);
        }
    }

    /// The worker polls this queue from now on: tell the guest not to kick
    /// and the device not to interrupt, and stop re-arming either after
    /// each pass. Report the guest ring field written with `flush_dirty`.
    ///
    /// Polling passes are [`handle_device_call`](Self::handle_device_call)
    /// calls: each completes what the device used and relays what the
    /// guest made available, with at most one kick and one guest signal.
    pub fn suppress_notifications(&mut self, mem: &GuestMemoryMmap) -> Result<(), SvqError> {
        self.usable()?;
        let r = self.guest.view(mem).and_then(|v| {
            self.guest.suppress_kicks(&v);
            self.shadow.suppress_calls()
        });
        self.used_flags_dirty |= self.guest.take_flags_written();
        r.or_else(|e| self.fail(e))
    }

    /// The worker stops polling: ask the guest for kicks and the device for
    /// interrupts again. Returns true when work arrived while they were
    /// suppressed (guest chains or device used entries no notification will
    /// announce): the caller must run a pass before it sleeps. Works on a
    /// stopped or broken queue too, so that a ring handed back to a device
    /// never keeps the guest's NO_NOTIFY.
    pub fn request_notifications(&mut self, mem: &GuestMemoryMmap) -> Result<bool, SvqError> {
        if !self.notifications_suppressed() {
            return Ok(false);
        }
        let r = self.guest.view(mem).and_then(|v| {
            let guest = self.guest.request_kicks(&v)?;
            let device = self.shadow.request_calls()?;
            Ok(guest || device)
        });
        self.used_flags_dirty |= self.guest.take_flags_written();
        self.avail_event_dirty |= self.guest_event_idx;
        r
    }

    /// Between `suppress_notifications` and `request_notifications`.
    pub fn notifications_suppressed(&self) -> bool {
        self.guest.kicks_suppressed() || self.shadow.calls_suppressed()
    }

    /// Where the guest ring stands (next avail to pop, used idx): a poller
    /// compares it across a pass to tell whether the pass did any work.
    pub fn guest_position(&self) -> RingIndexes {
        RingIndexes {
            avail: self.guest.next_avail(),
            used: self.guest.next_used(),
        }
    }

    /// Device signalled: consume and validate shadow used entries, log and
    /// complete them to the guest, then relay parked and newly available
    /// chains.
    pub fn handle_device_call(
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

    fn device_call(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
        log: &dyn DirtyLog,
    ) -> Result<CallOutcome, SvqError> {
        let v = self.guest.view(mem)?;
        let old_used = self.guest.next_used();
        let r = self.consume_used(&v, log);
        // The guest used entries written and the used idx, once per call
        // as the kernel's vhost logs them, also when a bad entry stopped
        // the loop after some completions.
        self.log_used_since(old_used, log);
        r?;
        let notify_guest = self.guest.should_notify(&v, old_used)?;
        let kick_device = self.relay(mem, &v, iova)?;
        Ok(CallOutcome {
            notify_guest,
            kick_device,
        })
    }

    #[inline(always)]
    fn log_used_since(&self, old_used: u16, log: &dyn DirtyLog) {
        let n = self.guest.next_used().wrapping_sub(old_used);
        if n == 0 {
            return;
        }
        let (gpa, len, wrapped) = self.guest.used_entries_log(old_used, n);
        log.mark(gpa, len);
        if wrapped > 0 {
            log.mark(self.guest.used_ring_log(), wrapped);
        }
        let (gpa, len) = self.guest.used_idx_log();
        log.mark(gpa, len);
    }

    /// Complete every used entry the device published, re-arming until
    /// none arrives meanwhile.
    fn consume_used(&mut self, v: &RingView, log: &dyn DirtyLog) -> Result<(), SvqError> {
        loop {
            let used_idx = self.shadow.used_idx()?;
            let last = self.shadow.last_used();
            let ahead = used_idx.wrapping_sub(last);
            if ahead as usize > self.inflight.len() {
                return Err(SvqError::UsedIdxTooFarAhead {
                    used_idx,
                    last_used: last,
                    ahead,
                    in_flight: self.inflight.len(),
                });
            }
            for _ in 0..ahead {
                self.complete_one(v, log)?;
            }
            if !self.shadow.rearm()? {
                return Ok(());
            }
        }
    }

    fn complete_one(&mut self, v: &RingView, log: &dyn DirtyLog) -> Result<(), SvqError> {
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
        if len as u64 > max {
            return Err(SvqError::UsedLenTooBig { id, len, max });
        }
        // The chain is read in place in its slot: no move, no allocation.
        let Some(entry) = self.inflight.remove(id) else {
            return Err(SvqError::UsedIdNotInFlight { id });
        };
        self.shadow.free_chain(id as u16, entry.ndescs, entry.table);
        let chain = entry;
        // Written data first, so the log never lags the used entry that
        // makes it visible to the guest.
        let mut left = len as u64;
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
        let guest_head = chain.guest_head;
        if let Some(l) = &self.inflight_log {
            l.completing(guest_head);
        }
        self.guest.add_used(v, guest_head, len);
        if let Some(l) = &self.inflight_log {
            l.completed(guest_head, self.guest.next_used());
        }
        if let Some(b) = self.guest_busy.get_mut(guest_head as usize) {
            *b = false;
        }
        self.relayed += 1;
        self.bytes_written += len as u64;
        Ok(())
    }

    /// Place parked chains, then pop new guest chains until the guest ring
    /// is empty or the shadow ring full; publish. Returns whether to kick.
    fn relay(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &RingView,
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
        v: &RingView,
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
            // rearm writes avail_event under guest EVENT_IDX, and without
            // it clears a NO_NOTIFY left by the ring's previous owner once.
            self.avail_event_dirty |= self.guest_event_idx;
            let more = self.guest.rearm(v)?;
            self.used_flags_dirty |= self.guest.take_flags_written();
            if !more {
                return Ok(());
            }
        }
    }

    /// Pop the chain at the guest's next avail index into `cur`: read,
    /// validate and translate it, and only then advance the guest index.
    fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &RingView,
        iova: &IovaTree,
    ) -> Result<(), SvqError> {
        let head = self.guest.read_head(v)?;
        self.take_chain(mem, v, iova, head)?;
        self.guest.advance();
        Ok(())
    }

    /// The guest chain at `head` (a checked index) into `cur`: not already
    /// in flight, walked, validated and translated; then marked in flight.
    /// Always inlined: `pop` is the hot path, and as a call it cost ~6
    /// instructions per descriptor (callgrind, batch 32).
    #[inline(always)]
    pub(super) fn take_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &RingView,
        iova: &IovaTree,
        head: u16,
    ) -> Result<(), SvqError> {
        if self.guest_busy.get(head as usize).copied().unwrap_or(false) {
            return Err(SvqError::HeadAlreadyInFlight { head });
        }
        let mut guest_segs = std::mem::take(&mut self.guest_segs);
        let r = self.guest.walk(mem, v, head, &mut guest_segs);
        let r = r.and_then(|()| self.check_writable(head, &guest_segs));
        let r = r.and_then(|()| self.translate(head, &guest_segs, iova));
        self.guest_segs = guest_segs;
        r?;
        if let Some(b) = self.guest_busy.get_mut(head as usize) {
            *b = true;
        }
        if let Some(l) = &self.inflight_log {
            l.popped(head);
        }
        Ok(())
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
        self.inflight
            .insert(head, &mut self.cur, 1, Some(table), avail_pos);
        Ok(true)
    }

    /// Stop relaying. `device_next_avail` is the device's vring base on the
    /// shadow ring after it was suspended and `handle_device_call` ran once
    /// more. Chains the device never took and parked chains are given back
    /// to the guest ring by rewinding its avail index over them.
    ///
    /// Works on a broken queue too (the daemon still needs the indexes).
    /// On `InvalidDeviceBase` nothing changes and the call may be retried.
    pub fn stop(
        &mut self,
        _mem: &GuestMemoryMmap,
        device_next_avail: u16,
    ) -> Result<StopState, SvqError> {
        if self.stopped {
            return Err(SvqError::Stopped);
        }
        let shadow_avail = self.shadow.avail_idx();
        let not_taken = shadow_avail.wrapping_sub(device_next_avail);
        let bad = SvqError::InvalidDeviceBase {
            device_next_avail,
            shadow_avail,
        };
        if not_taken as usize > self.inflight.len() {
            return Err(bad);
        }
        for i in 0..not_taken {
            let pos = device_next_avail.wrapping_add(i);
            let head = self.shadow.slot_head(pos);
            if self.inflight.get(head as u32).map(|e| e.avail_pos) != Some(pos) {
                return Err(bad);
            }
        }
        for i in 0..not_taken {
            let head = self.shadow.slot_head(device_next_avail.wrapping_add(i));
            if let Some(e) = self.inflight.remove(head as u32) {
                self.shadow.free_chain(head, e.ndescs, e.table);
                if let Some(b) = self.guest_busy.get_mut(e.guest_head as usize) {
                    *b = false;
                }
                if let Some(l) = &self.inflight_log {
                    l.returned(e.guest_head);
                }
            }
        }
        self.shadow.unpublish_to(device_next_avail);
        let rewind = not_taken as usize + self.parked.len();
        for c in self.parked.drain(..) {
            if let Some(b) = self.guest_busy.get_mut(c.guest_head as usize) {
                *b = false;
            }
            if let Some(l) = &self.inflight_log {
                l.returned(c.guest_head);
            }
        }
        self.guest.rewind(rewind as u16);
        self.stopped = true;
        let state = StopState {
            indexes: RingIndexes {
                avail: self.guest.next_avail(),
                used: self.guest.next_used(),
            },
            in_flight: self.inflight.guest_heads_in_order(),
        };
        log::debug!(
            target: LOG,
            "SVQ stopped: rewound {rewind}, continue at avail {} used {}, {} in flight",
            state.indexes.avail, state.indexes.used, state.in_flight.len()
        );
        Ok(state)
    }
}
