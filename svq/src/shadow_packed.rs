//! The driver side of a packed shadow ring, for a device that negotiated
//! VIRTIO_F_RING_PACKED.
//!
//! Chains are written at the avail position in ring order, each with a
//! buffer id from a free list; the head's flags are stored last, which
//! makes the chain available. The device writes one used descriptor per
//! chain at its used position, so the slots of a chain come back when its
//! id does: `chain_len` says how many. The free slot count, ids and chain
//! lengths are kept in private memory; the shadow memory is only written,
//! except the used descriptors and the device area, which are the
//! device's.

use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::packed::Descriptor;
use vm_memory::MmapRegion;

use crate::layouts::ShadowQueue;
use crate::memory::{ShadowLayout, ShadowMem};
use crate::packed::{wants_event, Pos, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE};
use crate::shadow_ring::ShadowSeg;
use crate::{ShadowRingAddrs, SvqError};

/// The descriptor ring, driver and device areas are accessed through
/// pointers (`desc_ptr`, `event_field`) whose bounds and alignment rest on
/// this check of every memory the ring is given.
fn check_layout(mem: &ShadowMem, layout: &ShadowLayout) -> Result<(), SvqError> {
    let s = layout.shadow_size as usize;
    let fits = |off: usize, len: usize| off.checked_add(len).is_some_and(|e| e <= mem.size());
    let aligned = (mem.base() as usize).is_multiple_of(16)
        && layout.desc.is_multiple_of(16)
        && layout.avail.is_multiple_of(4)
        && layout.used.is_multiple_of(4);
    if !layout.shadow_size.is_power_of_two()
        || !aligned
        || !fits(layout.desc, 16 * s)
        || !fits(layout.avail, 4)
        || !fits(layout.used, 4)
    {
        return Err(SvqError::ShadowMemory(format!(
            "bad packed shadow layout {layout:?} for {:#x} bytes at {:p}",
            mem.size(),
            mem.base()
        )));
    }
    Ok(())
}

pub(crate) struct PackedShadowRing {
    mem: ShadowMem,
    layout: ShadowLayout,
    size: u16,
    mask: u16,
    event_idx: bool,
    /// Where the next chain goes, where the last publish left it, and
    /// where the next used descriptor is expected.
    avail: Pos,
    published: Pos,
    used: Pos,
    num_free: u16,
    free_ids: Vec<u16>,
    /// Slots each id's chain occupies.
    chain_len: Vec<u16>,
    /// The id of the chain starting at each position.
    head_id: Vec<u16>,
    free_tables: Vec<u16>,
    calls_suppressed: bool,
}

const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

impl PackedShadowRing {
    /// Descriptor `pos` (masked).
    #[inline]
    fn desc_ptr(&self, pos: u16) -> *mut u8 {
        let i = (pos & self.mask) as usize;
        // SAFETY: check_layout verified desc + 16 * size <= mapping size
        // with a 16-aligned base and offset, and i < size: a whole aligned
        // descriptor inside the mapping `mem` keeps alive.
        unsafe { self.mem.base().add(self.layout.desc + 16 * i) }
    }

    /// Write descriptor `pos`; its flags last with Release when `publish`
    /// (a chain's head: the store that hands the chain to the device).
    #[inline]
    fn write_desc(&self, pos: u16, addr: u64, len: u32, id: u16, flags: u16, publish: bool) {
        let p = self.desc_ptr(pos);
        // SAFETY: desc_ptr is a whole 16-aligned descriptor inside the
        // mapping: offsets 0 (u64), 8 (u32), 12 and 14 (u16) are aligned and
        // in bounds. The device reads the flags concurrently (atomic); it
        // reads the rest only after flags that make the slot available.
        unsafe {
            p.cast::<u64>().write_volatile(addr.to_le());
            p.add(8).cast::<u32>().write_volatile(len.to_le());
            p.add(12).cast::<u16>().write_volatile(id.to_le());
            let order = if publish {
                Ordering::Release
            } else {
                Ordering::Relaxed
            };
            AtomicU16::from_ptr(p.add(14).cast()).store(flags.to_le(), order);
        }
    }

    #[inline]
    fn flags_at(&self, pos: u16) -> u16 {
        // SAFETY: offset 14 of a whole aligned descriptor (desc_ptr); the
        // device writes it concurrently. Acquire: a used descriptor's id
        // and len are read after its flags.
        let f = unsafe { AtomicU16::from_ptr(self.desc_ptr(pos).add(14).cast()) };
        u16::from_le(f.load(Ordering::Acquire))
    }

    /// Field `i` (0: off_wrap, 1: flags) of the driver (`device` false) or
    /// device area.
    #[inline]
    fn event_field(&self, device: bool, i: usize) -> &AtomicU16 {
        debug_assert!(i < 2);
        let off = if device {
            self.layout.used
        } else {
            self.layout.avail
        };
        // SAFETY: check_layout verified 4 bytes at a 4-aligned offset of an
        // aligned mapping for both areas; 2 * i for i < 2 stays in them.
        unsafe { AtomicU16::from_ptr(self.mem.base().add(off + 2 * i).cast()) }
    }

    fn set_driver_event(&self, flags: u16, off_wrap: u16) {
        self.event_field(false, 0)
            .store(off_wrap.to_le(), Ordering::Relaxed);
        self.event_field(false, 1)
            .store(flags.to_le(), Ordering::Relaxed);
    }

    /// Interrupt me at the used descriptor at `used` (EVENT_IDX), or at
    /// every one.
    fn ask_for_calls(&self) {
        if self.event_idx {
            self.set_driver_event(EVENT_DESC, self.used.encode());
        } else {
            self.set_driver_event(EVENT_ENABLE, 0);
        }
    }

    fn used_moved(&self) -> bool {
        fence(Ordering::SeqCst);
        self.used.is_used(self.flags_at(self.used.pos))
    }

    fn avail_flags(at: Pos, seg_write: bool, next: bool) -> u16 {
        at.avail_flags() | if seg_write { WRITE } else { 0 } | if next { NEXT } else { 0 }
    }
}

impl ShadowQueue for PackedShadowRing {
    const PENDING_IS_EXACT: bool = false;

    /// Chains are written in ring order whether or not the device has
    /// IN_ORDER; ids come from the free list either way.
    fn new(
        layout: ShadowLayout,
        device_event_idx: bool,
        _in_order: bool,
    ) -> Result<Self, SvqError> {
        let size = layout.shadow_size;
        let mem = ShadowMem::new(layout.total)?;
        check_layout(&mem, &layout)?;
        Ok(PackedShadowRing {
            mem,
            layout,
            size,
            mask: size.wrapping_sub(1),
            event_idx: device_event_idx,
            avail: Pos::START,
            published: Pos::START,
            used: Pos::START,
            num_free: size,
            // Pop from the end: ids 0, 1, 2, ... first.
            free_ids: (0..size).rev().collect(),
            chain_len: vec![1; size as usize],
            head_id: vec![0; size as usize],
            free_tables: (0..layout.indirect_tables).rev().collect(),
            calls_suppressed: false,
        })
    }

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

    fn num_free(&self) -> u16 {
        // An id per chain: never more chains than ids.
        if self.free_ids.is_empty() {
            0
        } else {
            self.num_free
        }
    }

    fn next_free_table(&self) -> Option<u16> {
        self.free_tables.last().copied()
    }

    fn avail_idx(&self) -> u16 {
        self.avail.encode()
    }

    fn last_used(&self) -> u16 {
        self.used.encode()
    }

    fn add_direct(&mut self, segs: &[ShadowSeg]) -> u16 {
        debug_assert!(!segs.is_empty() && segs.len() <= self.num_free as usize);
        let id = self.free_ids.pop().unwrap_or(0);
        let head = self.avail;
        let n = segs.len();
        // The rest of the chain first, then the head, whose flags publish.
        let mut at = head;
        for (i, seg) in segs.iter().enumerate().skip(1) {
            at = at.add(1, self.size);
            let flags = Self::avail_flags(at, seg.write, i + 1 < n);
            self.write_desc(at.pos, seg.iova, seg.len, id, flags, false);
        }
        let s = &segs[0];
        let flags = Self::avail_flags(head, s.write, n > 1);
        self.write_desc(head.pos, s.iova, s.len, id, flags, true);
        self.chain_len[id as usize] = n as u16;
        self.head_id[head.pos as usize] = id;
        self.avail = head.add(n as u16, self.size);
        self.num_free -= n as u16;
        id
    }

    fn add_indirect(
        &mut self,
        segs: &[ShadowSeg],
        table: u16,
        table_iova: u64,
    ) -> Result<u16, SvqError> {
        let base = self.layout.table_offset(table);
        for (i, seg) in segs.iter().enumerate() {
            let flags = if seg.write { WRITE } else { 0 };
            let d = Descriptor::new(seg.iova, seg.len, 0, flags);
            self.mem.write_obj(base + i * 16, d)?;
        }
        self.free_tables.retain(|&t| t != table);
        let id = self.free_ids.pop().unwrap_or(0);
        let head = self.avail;
        let len = (segs.len() * 16) as u32;
        let flags = head.avail_flags() | INDIRECT;
        self.write_desc(head.pos, table_iova, len, id, flags, true);
        self.chain_len[id as usize] = 1;
        self.head_id[head.pos as usize] = id;
        self.avail = head.add(1, self.size);
        self.num_free -= 1;
        Ok(id)
    }

    fn free_chain(&mut self, id: u16, ndescs: u16, table: Option<u16>) {
        self.free_ids.push(id);
        self.num_free += ndescs;
        if let Some(t) = table {
            self.free_tables.push(t);
        }
    }

    fn publish(&mut self) -> Result<bool, SvqError> {
        let (old, new) = (self.published, self.avail);
        if old == new {
            return Ok(false);
        }
        self.published = new;
        // The head flags must be visible before we read the device's
        // suppression state, or we could miss the device re-enabling kicks.
        fence(Ordering::SeqCst);
        let flags = u16::from_le(self.event_field(true, 1).load(Ordering::Relaxed));
        let off_wrap = u16::from_le(self.event_field(true, 0).load(Ordering::Relaxed));
        Ok(wants_event(
            flags,
            off_wrap,
            self.event_idx,
            old,
            new,
            self.size,
        ))
    }

    fn used_pending(&self, in_flight: usize) -> Result<u16, SvqError> {
        // With nothing in flight the slot holds one of our own descriptors
        // (or zeroes): nothing to read.
        if in_flight == 0 {
            return Ok(0);
        }
        Ok(u16::from(self.used.is_used(self.flags_at(self.used.pos))))
    }

    fn pop_used(&mut self) -> (u32, u32) {
        let p = self.desc_ptr(self.used.pos);
        // SAFETY: offsets 8 (u32) and 12 (u16) of a whole aligned
        // descriptor (desc_ptr); the device wrote them before the flags
        // `used_pending` read with Acquire.
        let (len, id) = unsafe {
            (
                AtomicU32::from_ptr(p.add(8).cast()).load(Ordering::Relaxed),
                AtomicU16::from_ptr(p.add(12).cast()).load(Ordering::Relaxed),
            )
        };
        let (id, len) = (u16::from_le(id), u32::from_le(len));
        // An id the relay then refuses breaks the queue: how far to skip
        // for it does not matter.
        let slots = self.chain_len.get(id as usize).copied().unwrap_or(1);
        self.used = self.used.add(slots.clamp(1, self.size), self.size);
        (u32::from(id), len)
    }

    fn skip_used(&mut self, id: u16) {
        let slots = self.chain_len.get(id as usize).copied().unwrap_or(1);
        self.used = self.used.add(slots.clamp(1, self.size), self.size);
    }

    fn rearm(&mut self) -> Result<bool, SvqError> {
        if !self.event_idx || self.calls_suppressed {
            return Ok(false);
        }
        self.ask_for_calls();
        Ok(self.used_moved())
    }

    fn suppress_calls(&mut self) -> Result<(), SvqError> {
        if !self.calls_suppressed {
            self.calls_suppressed = true;
            self.set_driver_event(EVENT_DISABLE, 0);
        }
        Ok(())
    }

    fn request_calls(&mut self) -> Result<bool, SvqError> {
        self.calls_suppressed = false;
        self.ask_for_calls();
        Ok(self.used_moved())
    }

    fn calls_suppressed(&self) -> bool {
        self.calls_suppressed
    }

    fn not_taken(&self, device_next_avail: u16, out: &mut Vec<(u16, u16)>) -> bool {
        out.clear();
        let dev = Pos::decode(device_next_avail);
        let (size, avail) = (self.size, self.avail);
        if dev.pos >= size || dev.until(avail, size) > self.used.until(avail, size) {
            return false;
        }
        let mut at = dev;
        while at != avail {
            let id = self.head_id[at.pos as usize];
            let len = self.chain_len[id as usize];
            if len == 0 || u32::from(len) > at.until(avail, size) {
                return false;
            }
            out.push((at.encode(), id));
            at = at.add(len, size);
        }
        true
    }

    fn unpublish_to(&mut self, from: u16) {
        self.avail = Pos::decode(from);
        self.published = self.avail;
    }
}
