//! The driver side of the shadow split ring.
//!
//! Everything the SVQ needs to know about the ring (free list, descriptor
//! links, which head sits in which avail slot) is kept in private memory; the
//! shadow memory is only written, except the used ring and the device's
//! notification fields, which are the device's to write.

use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::MmapRegion;

use crate::layouts::ShadowQueue;
use crate::memory::{ShadowLayout, ShadowMem};
use crate::{ShadowRingAddrs, SvqError};

/// One buffer segment as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ShadowSeg {
    pub iova: u64,
    pub len: u32,
    pub write: bool,
}

pub(crate) use packed_ring::need_event;

/// The descriptor table, avail ring and used entries are accessed through
/// pointers (`desc_ptr`, `avail_slot`, `pop_used`) whose bounds and
/// alignment rest on this check of every memory the ring is given.
fn check_layout(mem: &ShadowMem, layout: &ShadowLayout) -> Result<(), SvqError> {
    let size = layout.shadow_size;
    let s = size as usize;
    let fits = |off: usize, len: usize| off.checked_add(len).is_some_and(|e| e <= mem.size());
    let aligned = (mem.base() as usize).is_multiple_of(16)
        && layout.desc.is_multiple_of(16)
        && layout.avail.is_multiple_of(2)
        && layout.used.is_multiple_of(4);
    if !size.is_power_of_two()
        || !aligned
        || !fits(layout.desc, 16 * s)
        || !fits(layout.avail, 6 + 2 * s)
        || !fits(layout.used, 6 + 8 * s)
    {
        return Err(SvqError::ShadowMemory(format!(
            "bad shadow layout {layout:?} for {:#x} bytes at {:p}",
            mem.size(),
            mem.base()
        )));
    }
    Ok(())
}

pub(crate) struct ShadowRing {
    mem: ShadowMem,
    layout: ShadowLayout,
    size: u16,
    /// `size - 1`: ring positions wrap with a mask (size is a power of two,
    /// checked by the SVQ); `%` by a runtime u16 is a division.
    mask: u16,
    event_idx: bool,
    /// Private copy of each descriptor's `next` link, and the free list.
    next: Vec<u16>,
    free_head: u16,
    num_free: u16,
    /// Next avail index to fill, and the last one published to the device.
    avail_idx: u16,
    published: u16,
    /// Private copy of the avail ring slots.
    avail_slots: Vec<u16>,
    /// Next used index to consume.
    last_used: u16,
    free_tables: Vec<u16>,
    /// A polling worker reads the used ring itself: the device is told not
    /// to interrupt and `rearm` asks for nothing until `request_calls`.
    calls_suppressed: bool,
    /// IN_ORDER: descriptors are used in ring order from `next_desc` (the
    /// device returns them in that order), not from the free list.
    in_order: bool,
    next_desc: u16,
}

impl ShadowRing {
    fn slot_head(&self, avail_pos: u16) -> u16 {
        self.avail_slots[(avail_pos & self.mask) as usize]
    }

    fn flags(seg: &ShadowSeg, has_next: bool) -> u16 {
        let mut f = 0;
        if seg.write {
            f |= VRING_DESC_F_WRITE as u16;
        }
        if has_next {
            f |= VRING_DESC_F_NEXT as u16;
        }
        f
    }

    /// Shadow descriptor `i` (masked).
    #[inline]
    fn desc_ptr(&self, i: u16) -> *mut Descriptor {
        let i = (i & self.mask) as usize;
        // SAFETY: new() checked desc + 16 * size <= mapping size with a
        // 16-aligned base and offset, and i < size: the result points at a
        // whole, aligned descriptor inside the mapping `mem` keeps alive.
        unsafe {
            self.mem
                .base()
                .add(self.layout.desc)
                .cast::<Descriptor>()
                .add(i)
        }
    }

    /// The avail ring slot `slot` (masked).
    #[inline]
    fn avail_slot(&self, slot: u16) -> &AtomicU16 {
        let off = self.layout.avail + 4 + 2 * (slot & self.mask) as usize;
        // SAFETY: new() checked avail + 6 + 2 * size <= mapping size with an
        // even offset from an aligned base; slot < size after the mask. The
        // device reads the slots concurrently, hence an atomic.
        unsafe { AtomicU16::from_ptr(self.mem.base().add(off).cast()) }
    }

    /// Write shadow descriptor `i` as two aligned 8-byte stores.
    #[inline]
    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let p = self.desc_ptr(i).cast::<u64>();
        // len, flags, next in their little-endian layout (virtio 1.x).
        let tail = len as u64 | (flags as u64) << 32 | (next as u64) << 48;
        // SAFETY: desc_ptr points at a whole 16-aligned descriptor inside
        // the mapping, so both u64s are in bounds and aligned. The device
        // only reads descriptors, and only after the avail idx Release
        // store; volatile as vm-memory's own VolatileRef::store.
        unsafe {
            p.write_volatile(addr.to_le());
            p.add(1).write_volatile(tail.to_le());
        }
    }

    #[inline]
    fn push_avail(&mut self, head: u16) {
        let slot = self.avail_idx & self.mask;
        self.avail_slots[slot as usize] = head;
        self.avail_slot(slot)
            .store(u16::to_le(head), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// IN_ORDER: the chain on the descriptors from `next_desc` on, in ring
    /// order. Free: the device returned the older ones in order.
    #[cold]
    fn add_in_order(&mut self, segs: &[ShadowSeg]) -> u16 {
        let head = self.next_desc;
        let n = segs.len();
        for (i, seg) in segs.iter().enumerate() {
            let at = head.wrapping_add(i as u16) & self.mask;
            let next = at.wrapping_add(1) & self.mask;
            self.write_desc(at, seg.iova, seg.len, Self::flags(seg, i + 1 < n), next);
        }
        self.next_desc = head.wrapping_add(n as u16) & self.mask;
        self.num_free -= n as u16;
        self.push_avail(head);
        head
    }

    /// The device's used idx.
    fn used_idx(&self) -> Result<u16, SvqError> {
        // Acquire: used entries are read after the index that covers them.
        Ok(u16::from_le(
            self.mem.load_u16(self.layout.used + 2, Ordering::Acquire)?,
        ))
    }

    /// EVENT_IDX: interrupt me at the used entry after `last_used`.
    fn ask_for_next_used(&self) -> Result<(), SvqError> {
        let off = self.layout.avail + 4 + 2 * self.size as usize;
        self.mem
            .store_u16(off, u16::to_le(self.last_used), Ordering::Relaxed)
    }

    /// After asking for interrupts: did used entries arrive meanwhile? The
    /// store must be visible before used idx is re-read.
    fn used_moved(&self) -> Result<bool, SvqError> {
        fence(Ordering::SeqCst);
        Ok(self.used_idx()? != self.last_used)
    }
}

impl ShadowQueue for ShadowRing {
    const PENDING_IS_EXACT: bool = true;

    fn new(layout: ShadowLayout, device_event_idx: bool, in_order: bool) -> Result<Self, SvqError> {
        let size = layout.shadow_size;
        let mem = ShadowMem::new(layout.total)?;
        check_layout(&mem, &layout)?;
        let next = (1..=size).map(|i| if i == size { 0 } else { i }).collect();
        Ok(ShadowRing {
            mem,
            layout,
            size,
            mask: size.wrapping_sub(1),
            event_idx: device_event_idx,
            next,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            published: 0,
            avail_slots: vec![0; size as usize],
            last_used: 0,
            free_tables: (0..layout.indirect_tables).rev().collect(),
            calls_suppressed: false,
            in_order,
            next_desc: 0,
        })
    }

    /// Moves a ring nothing has been written to yet onto other memory.
    fn use_memory(&mut self, mem: ShadowMem) -> Result<(), SvqError> {
        check_layout(&mem, &self.layout)?;
        self.mem = mem;
        Ok(())
    }

    fn region(&self) -> &Arc<MmapRegion> {
        self.mem.region()
    }

    fn layout(&self) -> &ShadowLayout {
        &self.layout
    }

    fn ring_hva(&self) -> ShadowRingAddrs {
        ShadowRingAddrs {
            desc: self.mem.hva(self.layout.desc),
            avail: self.mem.hva(self.layout.avail),
            used: self.mem.hva(self.layout.used),
        }
    }

    fn table_hva(&self, table: u16) -> u64 {
        self.mem.hva(self.layout.table_offset(table))
    }

    #[inline(always)]
    fn num_free(&self) -> u16 {
        self.num_free
    }

    fn next_free_table(&self) -> Option<u16> {
        self.free_tables.last().copied()
    }

    #[inline(always)]
    fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    #[inline(always)]
    fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Write a chain into free descriptors; the caller checked `num_free`.
    #[inline(always)]
    fn add_direct(&mut self, segs: &[ShadowSeg]) -> u16 {
        debug_assert!(!segs.is_empty() && segs.len() <= self.num_free as usize);
        if self.in_order {
            return self.add_in_order(segs);
        }
        let head = self.free_head;
        let mut cur = head;
        let n = segs.len();
        for (i, seg) in segs.iter().enumerate() {
            let next = self.next[(cur & self.mask) as usize];
            self.write_desc(cur, seg.iova, seg.len, Self::flags(seg, i + 1 < n), next);
            cur = next;
        }
        // cur is now the free-list successor of the chain's last descriptor.
        self.free_head = cur;
        self.num_free -= n as u16;
        self.push_avail(head);
        head
    }

    /// Write a chain into an indirect table at `table_iova` and one shadow
    /// descriptor pointing at it; the caller checked a descriptor and a
    /// table are free and `segs` fits a table.
    fn add_indirect(
        &mut self,
        segs: &[ShadowSeg],
        table: u16,
        table_iova: u64,
    ) -> Result<u16, SvqError> {
        let base = self.layout.table_offset(table);
        for (i, seg) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let next = if last { 0 } else { i as u16 + 1 };
            let d = Descriptor::new(seg.iova, seg.len, Self::flags(seg, !last), next);
            self.mem.write_obj(base + i * 16, d)?;
        }
        self.free_tables.retain(|&t| t != table);
        let head = if self.in_order {
            self.next_desc
        } else {
            self.free_head
        };
        self.write_desc(
            head,
            table_iova,
            (segs.len() * 16) as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        if self.in_order {
            self.next_desc = head.wrapping_add(1) & self.mask;
        } else {
            self.free_head = self.next[head as usize];
        }
        self.num_free -= 1;
        self.push_avail(head);
        Ok(head)
    }

    /// Return a chain's descriptors (and table) to the free lists.
    #[inline(always)]
    fn free_chain(&mut self, head: u16, ndescs: u16, table: Option<u16>) {
        if self.in_order {
            // Returned in ring order: they are the ones after next_desc.
            self.num_free += ndescs;
            if let Some(t) = table {
                self.free_tables.push(t);
            }
            return;
        }
        let mut last = head;
        for _ in 1..ndescs {
            last = self.next[last as usize];
        }
        self.next[last as usize] = self.free_head;
        self.free_head = head;
        self.num_free += ndescs;
        if let Some(t) = table {
            self.free_tables.push(t);
        }
    }

    /// Make every written avail entry visible to the device. Returns whether
    /// the device wants a kick for them.
    fn publish(&mut self) -> Result<bool, SvqError> {
        let old = self.published;
        let new = self.avail_idx;
        if old == new {
            return Ok(false);
        }
        // Descriptors and ring slots must be visible before the index.
        self.mem
            .store_u16(self.layout.avail + 2, u16::to_le(new), Ordering::Release)?;
        self.published = new;
        // The index store must be visible before we read the device's
        // suppression state, or we could miss the device re-enabling kicks.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let off = self.layout.used + 4 + 8 * self.size as usize;
            let avail_event = u16::from_le(self.mem.load_u16(off, Ordering::Relaxed)?);
            Ok(need_event(avail_event, new, old))
        } else {
            let flags = u16::from_le(self.mem.load_u16(self.layout.used, Ordering::Relaxed)?);
            Ok(flags & VRING_USED_F_NO_NOTIFY as u16 == 0)
        }
    }

    #[inline(always)]
    fn used_pending(&self, in_flight: usize) -> Result<u16, SvqError> {
        let used_idx = self.used_idx()?;
        let last = self.last_used;
        let ahead = used_idx.wrapping_sub(last);
        if ahead as usize > in_flight {
            return Err(SvqError::UsedIdxTooFarAhead {
                used_idx,
                last_used: last,
                ahead,
                in_flight,
            });
        }
        Ok(ahead)
    }

    /// Read the used entry at `last_used` and advance past it.
    #[inline(always)]
    fn pop_used(&mut self) -> (u32, u32) {
        let off = self.layout.used + 4 + 8 * (self.last_used & self.mask) as usize;
        // SAFETY: new() checked used + 6 + 8 * size <= mapping size with a
        // 4-aligned offset from an aligned base, and the slot is masked, so
        // both u32s are inside the mapping and aligned. The device writes
        // them concurrently, hence atomics.
        let (id, len) = unsafe {
            let p = self.mem.base().add(off).cast::<u32>();
            (AtomicU32::from_ptr(p), AtomicU32::from_ptr(p.add(1)))
        };
        // Relaxed: the Acquire load of used idx that covered this entry
        // orders these reads after the device's writes.
        let id = u32::from_le(id.load(Ordering::Relaxed));
        let len = u32::from_le(len.load(Ordering::Relaxed));
        self.last_used = self.last_used.wrapping_add(1);
        (id, len)
    }

    fn skip_used(&mut self, _id: u16) {
        self.last_used = self.last_used.wrapping_add(1);
    }

    /// Ask for an interrupt at the next used entry (EVENT_IDX only; without
    /// it the avail flags stay 0 and the device always interrupts).
    /// Returns true when entries arrived meanwhile and must be consumed.
    fn rearm(&mut self) -> Result<bool, SvqError> {
        if !self.event_idx || self.calls_suppressed {
            return Ok(false);
        }
        self.ask_for_next_used()?;
        self.used_moved()
    }

    /// Tell the device not to interrupt: the used ring is polled. Without
    /// EVENT_IDX by setting VRING_AVAIL_F_NO_INTERRUPT; under EVENT_IDX
    /// used_event is no longer advanced, so it stays behind the device's
    /// used idx and the device's `vring_need_event` is false.
    fn suppress_calls(&mut self) -> Result<(), SvqError> {
        if self.calls_suppressed {
            return Ok(());
        }
        self.calls_suppressed = true;
        if !self.event_idx {
            self.mem.store_u16(
                self.layout.avail,
                u16::to_le(VRING_AVAIL_F_NO_INTERRUPT as u16),
                Ordering::Relaxed,
            )?;
        }
        Ok(())
    }

    /// Ask for interrupts again: clear NO_INTERRUPT, or under EVENT_IDX set
    /// used_event to the next used entry. Returns true when used entries
    /// arrived that no interrupt will announce.
    fn request_calls(&mut self) -> Result<bool, SvqError> {
        self.calls_suppressed = false;
        if self.event_idx {
            self.ask_for_next_used()?;
        } else {
            self.mem
                .store_u16(self.layout.avail, 0, Ordering::Relaxed)?;
        }
        self.used_moved()
    }

    fn calls_suppressed(&self) -> bool {
        self.calls_suppressed
    }

    fn not_taken(&self, device_next_avail: u16, out: &mut Vec<(u16, u16)>) -> bool {
        out.clear();
        let n = self.avail_idx.wrapping_sub(device_next_avail);
        if n > self.size {
            return false;
        }
        out.extend((0..n).map(|i| {
            let pos = device_next_avail.wrapping_add(i);
            (pos, self.slot_head(pos))
        }));
        true
    }

    /// Forget avail entries `[from, avail_idx)` that the device never took,
    /// so `avail_idx` goes back to `from`.
    fn unpublish_to(&mut self, from: u16) {
        self.avail_idx = from;
        self.published = from;
    }
}
