//! The device side of the guest's split ring.
//!
//! virtio-queue's `Queue` keeps the guest ring positions and checks the ring
//! addresses; its split-ring `Descriptor` is the descriptor layout. Chains
//! are walked here rather than with its `DescriptorChain` iterator, which
//! ends silently on a bad descriptor: the relay must tell a malformed chain
//! from a short one. Each ring is resolved once per call to a host pointer
//! whose bounds and alignment are checked then ([`RingView`]); each access is
//! then a masked index and one load or store, instead of a region lookup or a
//! bounds-checked reference per access, which dominated the cost of relaying
//! a descriptor.

use std::cell::Cell;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    VolatileMemory,
};

use crate::layouts::{ChainHead, GuestQueue};
use crate::shadow_ring::need_event;
use crate::{DirtyLog, GuestRing, RingDesc, RingIndexes, SvqError};

/// One guest descriptor's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GuestSeg {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// The guest rings resolved in the current guest memory, for one call.
///
/// Invariant (established by [`GuestSide::view`], relied on by every
/// accessor): `desc` points at `16 * q` bytes, `avail` at `6 + 2 * q` bytes
/// and `used` at `6 + 8 * q` bytes of one guest memory region, where
/// `q = mask + 1` is the queue size; `desc` is aligned for `Descriptor`,
/// `avail` for u16 and `used` for u32; the memory stays mapped for `'m`
/// because `mem` is borrowed for `'m`. Accessors mask ring positions with
/// `mask`, so every offset they form is inside those bounds.
pub(crate) struct RingView<'m> {
    desc: *const Descriptor,
    avail: *mut u8,
    used: *mut u8,
    mask: u16,
    bufs: GuestBuffers<'m>,
}

/// Checks buffers against guest memory for one call.
pub(crate) struct GuestBuffers<'m> {
    mem: &'m GuestMemoryMmap,
    /// The region the last buffer was found in: buffers of one call are
    /// usually in the same region, and checking it is cheaper than a lookup.
    hint: Cell<Option<&'m GuestRegionMmap>>,
}

impl<'m> GuestBuffers<'m> {
    pub fn new(mem: &'m GuestMemoryMmap, hint: Option<&'m GuestRegionMmap>) -> Self {
        GuestBuffers {
            mem,
            hint: Cell::new(hint),
        }
    }

    /// Is `[addr, addr + len)` guest memory? Empty ranges are never
    /// accessed and always pass; a range over several adjacent regions takes
    /// the general path.
    #[inline]
    pub fn contains(&self, addr: u64, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = addr.checked_add(len as u64 - 1) else {
            return false;
        };
        if let Some(r) = self.hint.get() {
            if addr >= r.start_addr().0 && last <= r.last_addr().0 {
                return true;
            }
        }
        match self.mem.find_region(GuestAddress(addr)) {
            Some(r) if last <= r.last_addr().0 => {
                self.hint.set(Some(r));
                true
            }
            Some(_) => self.mem.check_range(GuestAddress(addr), len as usize),
            None => false,
        }
    }

    /// Validate one descriptor's buffer (inside guest memory, no readable
    /// buffer after a writable one) and append it to `out`.
    #[inline(always)]
    pub fn push(
        &self,
        head: u16,
        (addr, len, write): (u64, u32, bool),
        out: &mut Vec<GuestSeg>,
        seen_write: &mut bool,
    ) -> Result<(), SvqError> {
        if !self.contains(addr, len) {
            return Err(SvqError::DescOutsideMemory { head, addr, len });
        }
        if *seen_write && !write {
            return Err(SvqError::ReadableAfterWritable { head });
        }
        *seen_write |= write;
        out.push(GuestSeg { addr, len, write });
        Ok(())
    }
}

impl<'m> RingView<'m> {
    #[inline]
    fn q(&self) -> usize {
        self.mask as usize + 1
    }

    /// u16 ring field at byte offset `off` of the avail ring.
    #[inline]
    fn avail_u16(&self, off: usize) -> &AtomicU16 {
        debug_assert!(off + 2 <= 6 + 2 * self.q() && off.is_multiple_of(2));
        // SAFETY: callers pass an even off with off + 2 <= 6 + 2 * q (flags,
        // idx, a masked ring slot or used_event), inside the avail bytes of
        // the struct invariant; `avail` is u16-aligned, so is avail + off.
        // The guest accesses these fields concurrently: atomics are the
        // virtio memory model's access for them.
        unsafe { AtomicU16::from_ptr(self.avail.add(off).cast()) }
    }

    /// u16 field at byte offset `off` of the used ring (flags, idx,
    /// avail_event).
    #[inline]
    fn used_u16(&self, off: usize) -> &AtomicU16 {
        debug_assert!(off + 2 <= 6 + 8 * self.q() && off.is_multiple_of(2));
        // SAFETY: as in `avail_u16`, within the used bytes (`used` is
        // u32-aligned, off is even).
        unsafe { AtomicU16::from_ptr(self.used.add(off).cast()) }
    }

    #[inline]
    fn used_u32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off + 4 <= 6 + 8 * self.q() && off.is_multiple_of(4));
        // SAFETY: callers pass off = 4 + 8 * slot (+ 4) with slot masked, a
        // multiple of 4 inside the used ring entries of the invariant.
        unsafe { AtomicU32::from_ptr(self.used.add(off).cast()) }
    }

    #[inline]
    fn avail_idx(&self) -> u16 {
        // Acquire: ring slots and descriptors are read after the index.
        u16::from_le(self.avail_u16(2).load(Ordering::Acquire))
    }

    #[inline]
    fn avail_slot(&self, pos: u16) -> u16 {
        let off = 4 + 2 * (pos & self.mask) as usize;
        u16::from_le(self.avail_u16(off).load(Ordering::Relaxed))
    }

    /// Descriptor `idx` of the table (masked; callers check `idx < q`).
    #[inline]
    fn desc(&self, idx: u16) -> Descriptor {
        // SAFETY: (idx & mask) < q, so the 16 bytes read are inside the
        // descriptor table of the invariant, and `desc` is aligned. A
        // volatile read (as vm-memory's `VolatileRef::load`) because the
        // guest owns this memory; every field is validated after the copy.
        unsafe { self.desc.add((idx & self.mask) as usize).read_volatile() }
    }
}

pub(crate) struct GuestSide {
    queue: Queue,
    size: u16,
    ring: GuestRing,
    event_idx: bool,
    /// Loop detection: a descriptor is visited when its stamp equals the
    /// current generation, so no per-walk clearing is needed.
    direct_stamp: Vec<u32>,
    indirect_stamp: Vec<u32>,
    direct_gen: u32,
    indirect_gen: u32,
    /// Where the three rings sat at the last `view`: offsets inside the
    /// region holding the descriptor table, keyed by that region's guest
    /// start and size. Offsets and bounds depend only on those, so when the
    /// region found next time has the same key they are still exact, and
    /// `view` skips three bounds-checked slice lookups.
    ring_offsets: Cell<Option<RingOffsets>>,
    /// Without EVENT_IDX: the used flags were checked (NO_NOTIFY cleared)
    /// since the SVQ took the ring. Until then they hold whatever the
    /// previous owner left, e.g. VRING_USED_F_NO_NOTIFY from a polling
    /// device in passthrough.
    kicks_asked: bool,
    /// `rearm`, `suppress_kicks` or `request_kicks` wrote the used flags
    /// and the write was not yet reported.
    flags_written: bool,
    /// A polling worker scans the ring itself: the guest is told not to
    /// kick (NO_NOTIFY, or avail_event left behind) and `rearm` asks for
    /// nothing until `request_kicks`.
    kicks_suppressed: bool,
    /// avail_event was written and not yet reported to a dirty log.
    avail_event_written: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingOffsets {
    region_start: u64,
    region_size: usize,
    desc: usize,
    avail: usize,
    used: usize,
}

fn bump(gen: &mut u32, stamps: &mut [u32]) {
    *gen = gen.wrapping_add(1);
    if *gen == 0 {
        stamps.iter_mut().for_each(|s| *s = 0);
        *gen = 1;
    }
}

impl GuestSide {
    /// Offsets of the rings in the region `[start, start + size)` holding
    /// the descriptor table, if all three rings lie inside it; cached by
    /// region start and size.
    fn ring_offsets_in(&self, start: u64, size: usize) -> Option<RingOffsets> {
        if let Some(o) = self.ring_offsets.get() {
            if o.region_start == start && o.region_size == size {
                return Some(o);
            }
        }
        let q = self.size as usize;
        let off = |addr: u64, len: usize| {
            let o = usize::try_from(addr.checked_sub(start)?).ok()?;
            (o.checked_add(len)? <= size).then_some(o)
        };
        let o = RingOffsets {
            region_start: start,
            region_size: size,
            desc: off(self.ring.desc, 16 * q)?,
            avail: off(self.ring.avail, 6 + 2 * q)?,
            used: off(self.ring.used, 6 + 8 * q)?,
        };
        self.ring_offsets.set(Some(o));
        Some(o)
    }

    /// Head index in the avail slot of `next_avail`.
    fn read_head(&self, v: &RingView) -> Result<u16, SvqError> {
        let head = v.avail_slot(self.next_avail());
        if head >= self.size {
            return Err(SvqError::BadHeadIndex {
                head,
                queue_size: self.size,
            });
        }
        Ok(head)
    }

    /// Walk and validate the chain at `head` into `out` (cleared first).
    fn walk(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &RingView,
        head: u16,
        out: &mut Vec<GuestSeg>,
    ) -> Result<(), SvqError> {
        out.clear();
        bump(&mut self.direct_gen, &mut self.direct_stamp);
        let max = self.size as u32;
        let mut count = 0u32;
        let mut seen_write = false;
        let mut idx = head;
        loop {
            let stamp = &mut self.direct_stamp[idx as usize];
            if *stamp == self.direct_gen {
                return Err(SvqError::DescriptorLoop { head, index: idx });
            }
            *stamp = self.direct_gen;
            // idx < size: the head was checked, and so is every next.
            let desc = v.desc(idx);
            if desc.refers_to_indirect_table() {
                self.walk_indirect(mem, v, head, &desc, out, &mut count, &mut seen_write)?;
            } else {
                count += 1;
                if count > max {
                    return Err(SvqError::ChainTooLong { head, max });
                }
                v.bufs.push(head, seg_of(&desc), out, &mut seen_write)?;
            }
            if !desc.has_next() {
                return Ok(());
            }
            let next = desc.next();
            if next >= self.size {
                return Err(SvqError::BadNextIndex {
                    head,
                    index: idx,
                    next,
                    table_len: max,
                });
            }
            idx = next;
        }
    }

    // Out of line: indirect chains are rare, and inlined this path made
    // the direct walk spill most of its registers.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    #[inline(never)]
    fn walk_indirect(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &RingView,
        head: u16,
        desc: &Descriptor,
        out: &mut Vec<GuestSeg>,
        count: &mut u32,
        seen_write: &mut bool,
    ) -> Result<(), SvqError> {
        let len = desc.len();
        let table = desc.addr().0;
        if len == 0 {
            return Err(SvqError::ZeroLengthIndirect { head });
        }
        if len & 15 != 0 {
            return Err(SvqError::MisalignedIndirect { head, len });
        }
        let entries = len / 16;
        let max = self.size as u32;
        if entries > max {
            return Err(SvqError::IndirectTooLong { head, entries, max });
        }
        if !v.bufs.contains(table, len) {
            return Err(SvqError::IndirectOutsideMemory {
                head,
                addr: table,
                len,
            });
        }
        // One region lookup for the table when it sits in one region (the
        // normal case); entry by entry otherwise.
        let slice = mem.get_slice(GuestAddress(table), len as usize).ok();
        bump(&mut self.indirect_gen, &mut self.indirect_stamp);
        let mut idx = 0u16;
        loop {
            let stamp = &mut self.indirect_stamp[idx as usize];
            if *stamp == self.indirect_gen {
                return Err(SvqError::DescriptorLoop { head, index: idx });
            }
            *stamp = self.indirect_gen;
            let off = 16 * idx as usize;
            let d: Descriptor = match &slice {
                Some(sl) => sl.get_ref::<Descriptor>(off).ok().map(|r| r.load()),
                None => mem.read_obj(GuestAddress(table + off as u64)).ok(),
            }
            .ok_or(())
            .map_err(|_| SvqError::IndirectOutsideMemory {
                head,
                addr: table,
                len,
            })?;
            if d.refers_to_indirect_table() {
                return Err(SvqError::NestedIndirect { head });
            }
            *count += 1;
            if *count > max {
                return Err(SvqError::ChainTooLong { head, max });
            }
            v.bufs.push(head, seg_of(&d), out, seen_write)?;
            if !d.has_next() {
                return Ok(());
            }
            let next = d.next();
            if next as u32 >= entries {
                return Err(SvqError::BadNextIndex {
                    head,
                    index: idx,
                    next,
                    table_len: entries,
                });
            }
            idx = next;
        }
    }

    /// GPA ranges (for the dirty log) of the `n` (1..=size) used entries
    /// from `at`: `(gpa, len)` up to the end of the ring, and the bytes
    /// that wrapped around to its first entry (usually 0).
    #[inline]
    fn used_entries_log(&self, at: u16, n: u16) -> (u64, u64, u64) {
        let size = u64::from(self.size);
        let n = u64::from(n).min(size);
        let first = u64::from(at & (self.size - 1));
        let head = n.min(size - first);
        let gpa = self.ring.used_log.wrapping_add(4 + 8 * first);
        (gpa, 8 * head, 8 * (n - head))
    }

    /// EVENT_IDX: kick me for the chain after `next_avail`.
    fn ask_for_next_avail(&mut self, v: &RingView) {
        self.avail_event_written = true;
        let off = 4 + 8 * self.size as usize;
        v.used_u16(off)
            .store(u16::to_le(self.next_avail()), Ordering::Relaxed);
    }

    /// Set or clear VRING_USED_F_NO_NOTIFY in the used flags; returns
    /// whether they changed (and were written, for the dirty log).
    fn set_no_notify(&mut self, v: &RingView, on: bool) -> bool {
        let no_notify = VRING_USED_F_NO_NOTIFY as u16;
        let flags = u16::from_le(v.used_u16(0).load(Ordering::Relaxed));
        let want = if on {
            flags | no_notify
        } else {
            flags & !no_notify
        };
        if want == flags {
            return false;
        }
        v.used_u16(0).store(u16::to_le(want), Ordering::Relaxed);
        self.flags_written = true;
        true
    }

    /// After asking for kicks: did chains arrive that the guest added
    /// without kicking? The store must be visible before avail idx is
    /// re-read, or a chain the guest added while it still saw the old value
    /// would wait for the next kick.
    fn avail_moved(&self, v: &RingView) -> Result<bool, SvqError> {
        fence(Ordering::SeqCst);
        Ok(v.avail_idx() != self.next_avail())
    }
}

/// Host pointer to the ring part `what` at `addr`, `len` bytes inside one
/// memory region (`region`, the one the descriptor ring is in, tried
/// first) and aligned to `align`.
pub(crate) fn ring_ptr(
    mem: &GuestMemoryMmap,
    region: Option<&GuestRegionMmap>,
    what: &'static str,
    addr: u64,
    len: usize,
    align: usize,
) -> Result<*mut u8, SvqError> {
    region
        .and_then(|r| r.get_slice(r.to_region_addr(GuestAddress(addr))?, len).ok())
        .or_else(|| mem.get_slice(GuestAddress(addr), len).ok())
        .map(|s| s.ptr_guard_mut().as_ptr())
        .filter(|p| (*p as usize).is_multiple_of(align))
        .ok_or(SvqError::GuestRingAccess { what, addr })
}

impl GuestQueue for GuestSide {
    type View<'m> = RingView<'m>;
    const PENDING_IS_EXACT: bool = true;

    fn new(
        size: u16,
        ring: GuestRing,
        start: RingIndexes,
        event_idx: bool,
    ) -> Result<Self, SvqError> {
        let bad_size = SvqError::InvalidQueueSize(size);
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(bad_size);
        }
        for (name, addr, align) in [
            ("descriptor", ring.desc, 16),
            ("avail", ring.avail, 2),
            ("used", ring.used, 4),
        ] {
            if addr & (align - 1) != 0 {
                return Err(SvqError::MisalignedRing {
                    ring: name,
                    addr,
                    align,
                });
            }
        }
        if start.avail.wrapping_sub(start.used) > size {
            return Err(SvqError::InvalidStartIndexes {
                avail: start.avail,
                used: start.used,
                queue_size: size,
            });
        }
        let mut queue = Queue::new(size).map_err(|_| bad_size.clone())?;
        let misaligned = |ring, addr, align| SvqError::MisalignedRing { ring, addr, align };
        queue
            .try_set_desc_table_address(GuestAddress(ring.desc))
            .map_err(|_| misaligned("descriptor", ring.desc, 16))?;
        queue
            .try_set_avail_ring_address(GuestAddress(ring.avail))
            .map_err(|_| misaligned("avail", ring.avail, 2))?;
        queue
            .try_set_used_ring_address(GuestAddress(ring.used))
            .map_err(|_| misaligned("used", ring.used, 4))?;
        queue.set_event_idx(event_idx);
        queue.set_next_avail(start.avail);
        queue.set_next_used(start.used);
        queue.set_ready(true);
        Ok(GuestSide {
            queue,
            size,
            ring,
            event_idx,
            direct_stamp: vec![0; size as usize],
            indirect_stamp: vec![0; size as usize],
            direct_gen: 0,
            indirect_gen: 0,
            ring_offsets: Cell::new(None),
            kicks_asked: false,
            flags_written: false,
            kicks_suppressed: false,
            avail_event_written: false,
        })
    }

    /// Resolve the three rings; each must lie inside one memory region.
    fn view<'m>(&self, mem: &'m GuestMemoryMmap) -> Result<RingView<'m>, SvqError> {
        let q = self.size as usize;
        // The rings normally share a region: look it up once. get_slice
        // checks that the whole ring is inside one region; the alignment
        // check keeps the accessors' atomics and reads aligned even if a
        // region's host mapping were oddly placed.
        let region = mem.find_region(GuestAddress(self.ring.desc));
        let desc_align = std::mem::align_of::<Descriptor>();
        if let Some(r) = region {
            if let Some(o) = self.ring_offsets_in(r.start_addr().0, r.size()) {
                let base = r.as_ptr();
                // SAFETY: ring_offsets_in checked each offset plus its ring
                // length against this region's size, so each pointer is
                // inside the mapping, which `mem` keeps for 'm.
                let (desc, avail, used) =
                    unsafe { (base.add(o.desc), base.add(o.avail), base.add(o.used)) };
                let aligned = (desc as usize).is_multiple_of(desc_align)
                    && (avail as usize).is_multiple_of(2)
                    && (used as usize).is_multiple_of(4);
                if aligned {
                    return Ok(RingView {
                        desc: desc.cast(),
                        avail,
                        used,
                        mask: self.size - 1,
                        bufs: GuestBuffers::new(mem, region),
                    });
                }
            }
        }
        let ptr = |what, addr, len, align| ring_ptr(mem, region, what, addr, len, align);
        Ok(RingView {
            avail: ptr("avail ring", self.ring.avail, 6 + 2 * q, 2)?,
            desc: ptr("descriptor table", self.ring.desc, 16 * q, desc_align)?.cast(),
            used: ptr("used ring", self.ring.used, 6 + 8 * q, 4)?,
            // size is a power of two (checked in new).
            mask: self.size - 1,
            bufs: GuestBuffers::new(mem, region),
        })
    }

    fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    fn next_used(&self) -> u16 {
        self.queue.next_used()
    }

    /// Chains available and not yet popped; the guest may not be more than a
    /// whole ring ahead.
    #[inline(always)]
    fn pending(&self, v: &RingView) -> Result<u16, SvqError> {
        let idx = v.avail_idx();
        let n = idx.wrapping_sub(self.next_avail());
        if n > self.size {
            return Err(SvqError::AvailIdxTooFarAhead {
                avail_idx: idx,
                last_avail: self.next_avail(),
                queue_size: self.size,
            });
        }
        Ok(n)
    }

    #[inline(always)]
    fn walk_next(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &RingView,
        out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError> {
        let head = self.read_head(v)?;
        self.walk(mem, v, head, out)?;
        Ok(ChainHead { id: head, slots: 1 })
    }

    fn walk_head(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &RingView,
        head: u16,
        out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError> {
        // `walk` relies on a checked head (the region is shared memory).
        if head >= self.size {
            return Err(SvqError::BadHeadIndex {
                head,
                queue_size: self.size,
            });
        }
        self.walk(mem, v, head, out)?;
        Ok(ChainHead { id: head, slots: 1 })
    }

    fn walk_copy(
        &mut self,
        _mem: &GuestMemoryMmap,
        _v: &RingView,
        _descs: &[RingDesc],
        _out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError> {
        Err(SvqError::ResubmitWrongLayout {
            guest_packed: false,
        })
    }

    #[inline(always)]
    fn advance(&mut self, _slots: u16) {
        self.queue
            .set_next_avail(self.queue.next_avail().wrapping_add(1));
    }

    fn rewind(&mut self, chains: u16, _slots: u32) {
        self.queue
            .set_next_avail(self.queue.next_avail().wrapping_sub(chains));
    }

    /// Write a used entry at `next_used` and publish it.
    #[inline(always)]
    fn add_used(&mut self, v: &RingView, id: u16, len: u32, _slots: u16) {
        let at = self.next_used();
        let off = 4 + 8 * (at & v.mask) as usize;
        v.used_u32(off)
            .store(u32::to_le(id as u32), Ordering::Relaxed);
        v.used_u32(off + 4)
            .store(u32::to_le(len), Ordering::Relaxed);
        let next = at.wrapping_add(1);
        // Release: the entry is visible before the index that covers it.
        v.used_u16(2).store(u16::to_le(next), Ordering::Release);
        self.queue.set_next_used(next);
    }

    /// The entries, and the used idx, once per call as the kernel's vhost
    /// logs them.
    #[inline(always)]
    fn log_used_since(&self, old: u16, log: &dyn DirtyLog) {
        let n = self.next_used().wrapping_sub(old);
        if n == 0 {
            return;
        }
        let (gpa, len, wrapped) = self.used_entries_log(old, n);
        log.mark(gpa, len);
        if wrapped > 0 {
            // The first used entry.
            log.mark(self.ring.used_log.wrapping_add(4), wrapped);
        }
        // The used idx.
        log.mark(self.ring.used_log.wrapping_add(2), 2);
    }

    /// Does the guest want an interrupt for used entries `[old, next_used)`?
    fn should_notify(&self, v: &RingView, old: u16) -> Result<bool, SvqError> {
        let new = self.next_used();
        if new == old {
            return Ok(false);
        }
        // The used idx store must be visible before we read the guest's
        // suppression state, or we could miss it re-enabling interrupts.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let off = 4 + 2 * self.size as usize;
            let used_event = u16::from_le(v.avail_u16(off).load(Ordering::Relaxed));
            Ok(need_event(used_event, new, old))
        } else {
            let flags = u16::from_le(v.avail_u16(0).load(Ordering::Relaxed));
            Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
        }
    }

    /// Ask the guest to kick for the next chain after `next_avail`: under
    /// EVENT_IDX by writing avail_event; without it by clearing the used
    /// flags once (a device that polled the ring before the SVQ took it over
    /// may have left VRING_USED_F_NO_NOTIFY there, and the SVQ does not poll:
    /// the guest would never kick again). Returns true when chains arrived
    /// meanwhile.
    fn rearm(&mut self, v: &RingView) -> Result<bool, SvqError> {
        if self.kicks_suppressed {
            // The poller comes back to the ring by itself.
            return Ok(false);
        }
        if self.event_idx {
            self.ask_for_next_avail(v);
        } else if !self.kicks_asked {
            self.kicks_asked = true;
            if !self.set_no_notify(v, false) {
                return Ok(false);
            }
        } else {
            return Ok(false);
        }
        self.avail_moved(v)
    }

    /// Tell the guest not to kick: the ring is polled. Without EVENT_IDX by
    /// setting VRING_USED_F_NO_NOTIFY; under EVENT_IDX avail_event is simply
    /// no longer advanced, so it stays behind the guest's avail idx and
    /// `vring_need_event` is false for every chain the guest adds (as the
    /// kernel's vhost does in `vhost_disable_notify`).
    fn suppress_kicks(&mut self, v: &RingView) {
        if self.kicks_suppressed {
            return;
        }
        self.kicks_suppressed = true;
        if !self.event_idx {
            self.set_no_notify(v, true);
        }
    }

    /// Ask the guest to kick again (the poller is going to sleep): clear
    /// NO_NOTIFY, or under EVENT_IDX set avail_event to the next chain.
    /// Returns true when chains arrived that no kick will announce: the
    /// guest added them while it was told not to kick, so the caller must
    /// relay them instead of sleeping.
    fn request_kicks(&mut self, v: &RingView) -> Result<bool, SvqError> {
        self.kicks_suppressed = false;
        self.kicks_asked = true;
        if self.event_idx {
            self.ask_for_next_avail(v);
        } else {
            self.set_no_notify(v, false);
        }
        self.avail_moved(v)
    }

    fn kicks_suppressed(&self) -> bool {
        self.kicks_suppressed
    }

    fn flush_dirty(&mut self, log: &dyn DirtyLog) {
        if std::mem::take(&mut self.avail_event_written) {
            let avail_event = 4 + 8 * u64::from(self.size);
            log.mark(self.ring.used_log.wrapping_add(avail_event), 2);
        }
        if std::mem::take(&mut self.flags_written) {
            log.mark(self.ring.used_log, 2);
        }
    }
}

#[inline(always)]
fn seg_of(d: &Descriptor) -> (u64, u32, bool) {
    (d.addr().0, d.len(), d.is_write_only())
}
