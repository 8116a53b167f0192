//! The device side of the guest's packed ring (virtio 1.2, 2.8).
//!
//! The descriptor ring is read chain by chain from the avail position: a
//! chain is its descriptors in ring order while NEXT is set, the buffer id
//! in its last one (where DPDK puts it; Linux writes it in every one). The
//! SVQ writes one used descriptor per chain at its used position, which
//! then moves on by the chain's slot count. The driver area (written by
//! the guest) says when it wants interrupts, the device area (written
//! here) when it should kick.

use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::packed::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

use crate::guest::{ring_ptr, GuestBuffers, GuestSeg};
use crate::layouts::{ChainHead, GuestQueue};
use crate::packed::{wants_event, Pos, EVENT_DISABLE, EVENT_ENABLE};
use crate::{DirtyLog, GuestRing, RingDesc, RingIndexes, SvqError};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// The guest's packed ring resolved in the current guest memory, for one
/// call.
///
/// Invariant (established by [`PackedGuest::view`], relied on by every
/// accessor): `desc` points at `16 * q` bytes, `driver` and `device` at 4
/// bytes each, of guest memory, all three aligned to their size's natural
/// alignment (16 and 4), where `q = mask + 1`; the memory stays mapped for
/// `'m` because `bufs` borrows it for `'m`. Positions are masked.
pub(crate) struct PackedView<'m> {
    desc: *mut u8,
    driver: *mut u8,
    device: *mut u8,
    mask: u16,
    bufs: GuestBuffers<'m>,
}

impl PackedView<'_> {
    #[inline]
    fn desc_ptr(&self, pos: u16) -> *mut u8 {
        // SAFETY: (pos & mask) < q, so the 16 bytes at this offset are
        // inside the descriptor ring of the invariant.
        unsafe { self.desc.add(16 * (pos & self.mask) as usize) }
    }

    /// The flags of descriptor `pos`; Acquire, because the rest of the
    /// descriptor (and, at a chain's head, the whole chain) is read after
    /// the flags that make it available.
    #[inline]
    fn flags(&self, pos: u16) -> u16 {
        // SAFETY: offset 14 of a 16-aligned descriptor inside the ring (see
        // desc_ptr) is an aligned u16. The guest writes it concurrently:
        // atomics are the virtio memory model's access.
        let f = unsafe { AtomicU16::from_ptr(self.desc_ptr(pos).add(14).cast()) };
        u16::from_le(f.load(Ordering::Acquire))
    }

    /// Descriptor `pos`, copied; every field is validated after the copy.
    #[inline]
    fn desc(&self, pos: u16) -> Descriptor {
        // SAFETY: desc_ptr is 16 bytes inside the ring and 16-aligned; a
        // volatile read because the guest owns this memory.
        unsafe { self.desc_ptr(pos).cast::<Descriptor>().read_volatile() }
    }

    /// Write the used descriptor at `pos`: id and len, then the flags that
    /// hand it to the guest (Release: the guest reads id and len, and the
    /// buffer, after seeing them).
    #[inline]
    fn write_used(&self, pos: u16, id: u16, len: u32, flags: u16) {
        let p = self.desc_ptr(pos);
        // SAFETY: offsets 8 (u32), 12 and 14 (u16) of a 16-aligned
        // descriptor inside the ring are aligned and in bounds; the guest
        // reads them concurrently, hence atomics.
        unsafe {
            AtomicU32::from_ptr(p.add(8).cast()).store(len.to_le(), Ordering::Relaxed);
            AtomicU16::from_ptr(p.add(12).cast()).store(id.to_le(), Ordering::Relaxed);
            AtomicU16::from_ptr(p.add(14).cast()).store(flags.to_le(), Ordering::Release);
        }
    }

    /// Field `i` (0: off_wrap, 1: flags) of the driver or device area.
    #[inline]
    fn event_field(&self, device: bool, i: usize) -> &AtomicU16 {
        debug_assert!(i < 2);
        let base = if device { self.device } else { self.driver };
        // SAFETY: base is 4 aligned bytes of guest memory (invariant), so
        // base + 2 * i for i < 2 is an aligned u16 inside them, mapped as
        // long as the view. The other party writes or reads it
        // concurrently, hence an atomic.
        unsafe { AtomicU16::from_ptr(base.add(2 * i).cast()) }
    }

    /// The guest's interrupt suppression: (flags, off_wrap).
    fn driver_event(&self) -> (u16, u16) {
        let f = self.event_field(false, 1).load(Ordering::Relaxed);
        let o = self.event_field(false, 0).load(Ordering::Relaxed);
        (u16::from_le(f), u16::from_le(o))
    }

    fn device_event_flags(&self) -> u16 {
        u16::from_le(self.event_field(true, 1).load(Ordering::Relaxed))
    }

    fn set_device_event_flags(&self, flags: u16) {
        self.event_field(true, 1)
            .store(flags.to_le(), Ordering::Relaxed);
    }
}

pub(crate) struct PackedGuest {
    size: u16,
    /// `avail` is the driver area, `used` the device area.
    ring: GuestRing,
    event_idx: bool,
    /// Where the next chain starts, and where the next used descriptor
    /// goes.
    avail: Pos,
    used: Pos,
    /// The device area flags were checked (ENABLE) since the SVQ took the
    /// ring; until then they hold what the previous owner left.
    kicks_asked: bool,
    kicks_suppressed: bool,
    /// The device area was written and not yet reported to a dirty log.
    event_written: bool,
    /// Copy each chain's ring descriptors into `kept` as it is walked
    /// (an in-flight log needs them: the slots are overwritten by used
    /// descriptors while the chain is in flight).
    keep: bool,
    kept: Vec<RingDesc>,
    /// Slots of the chains resubmitted so far: all of them lie between the
    /// start positions.
    resubmitted: u32,
}

impl PackedGuest {
    /// Ask the guest to kick (ENABLE) or not (DISABLE); whether the flags
    /// changed.
    fn set_kicks(&mut self, v: &PackedView, on: bool) -> bool {
        let want = if on { EVENT_ENABLE } else { EVENT_DISABLE };
        if v.device_event_flags() == want {
            return false;
        }
        v.set_device_event_flags(want);
        self.event_written = true;
        true
    }

    /// After asking for kicks: did a chain arrive that the guest made
    /// available while it still saw the old flags?
    fn avail_moved(&self, v: &PackedView) -> bool {
        fence(Ordering::SeqCst);
        self.avail.is_avail(v.flags(self.avail.pos))
    }

    // Out of line: indirect chains are rare.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    #[inline(never)]
    fn walk_indirect(
        &self,
        mem: &GuestMemoryMmap,
        v: &PackedView,
        head: u16,
        d: &Descriptor,
        out: &mut Vec<GuestSeg>,
        count: &mut u32,
        seen_write: &mut bool,
    ) -> Result<(), SvqError> {
        let (table, len) = (d.addr().0, d.len());
        if len == 0 {
            return Err(SvqError::ZeroLengthIndirect { head });
        }
        if len & 15 != 0 {
            return Err(SvqError::MisalignedIndirect { head, len });
        }
        let entries = len / 16;
        let max = u32::from(self.size);
        if entries > max {
            return Err(SvqError::IndirectTooLong { head, entries, max });
        }
        let outside = SvqError::IndirectOutsideMemory {
            head,
            addr: table,
            len,
        };
        if !v.bufs.contains(table, len) {
            return Err(outside);
        }
        let slice = mem.get_slice(GuestAddress(table), len as usize).ok();
        for i in 0..entries as usize {
            let e: Descriptor = match &slice {
                Some(sl) => sl.get_ref::<Descriptor>(16 * i).ok().map(|r| r.load()),
                None => mem.read_obj(GuestAddress(table + 16 * i as u64)).ok(),
            }
            .ok_or_else(|| outside.clone())?;
            if e.flags() & INDIRECT != 0 {
                return Err(SvqError::NestedIndirect { head });
            }
            *count += 1;
            if *count > max {
                return Err(SvqError::ChainTooLong { head, max });
            }
            // Entries are used in table order; their NEXT flag means
            // nothing (virtio 1.2, 2.8.7).
            let seg = (e.addr().0, e.len(), e.flags() & WRITE != 0);
            v.bufs.push(head, seg, out, seen_write)?;
        }
        Ok(())
    }
}

impl GuestQueue for PackedGuest {
    type View<'m> = PackedView<'m>;
    const PENDING_IS_EXACT: bool = false;

    fn new(
        size: u16,
        ring: GuestRing,
        start: RingIndexes,
        event_idx: bool,
    ) -> Result<Self, SvqError> {
        // Positions need 15 bits; accessors mask them, which needs a power
        // of two (what vhost-user VMMs use for packed rings too).
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(SvqError::InvalidQueueSize(size));
        }
        for (name, addr, align) in [
            ("descriptor", ring.desc, 16),
            ("driver area", ring.avail, 4),
            ("device area", ring.used, 4),
        ] {
            if addr & (align - 1) != 0 {
                return Err(SvqError::MisalignedRing {
                    ring: name,
                    addr,
                    align,
                });
            }
        }
        let (avail, used) = (Pos::decode(start.avail), Pos::decode(start.used));
        if avail.pos >= size || used.pos >= size || used.until(avail, size) > u32::from(size) {
            return Err(SvqError::InvalidStartIndexes {
                avail: start.avail,
                used: start.used,
                queue_size: size,
            });
        }
        Ok(PackedGuest {
            size,
            ring,
            event_idx,
            avail,
            used,
            kicks_asked: false,
            kicks_suppressed: false,
            event_written: false,
            keep: false,
            kept: Vec::new(),
            resubmitted: 0,
        })
    }

    fn view<'m>(&self, mem: &'m GuestMemoryMmap) -> Result<PackedView<'m>, SvqError> {
        let region = mem.find_region(GuestAddress(self.ring.desc));
        let ptr = |what, addr, len, align| ring_ptr(mem, region, what, addr, len, align);
        let q = self.size as usize;
        Ok(PackedView {
            desc: ptr("descriptor ring", self.ring.desc, 16 * q, 16)?,
            driver: ptr("driver area", self.ring.avail, 4, 4)?,
            device: ptr("device area", self.ring.used, 4, 4)?,
            // A power of two (checked in new).
            mask: self.size - 1,
            bufs: GuestBuffers::new(mem, region),
        })
    }

    fn next_avail(&self) -> u16 {
        self.avail.encode()
    }

    fn next_used(&self) -> u16 {
        self.used.encode()
    }

    fn pending(&self, v: &PackedView) -> Result<u16, SvqError> {
        Ok(u16::from(self.avail.is_avail(v.flags(self.avail.pos))))
    }

    fn walk_next(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &PackedView,
        out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError> {
        out.clear();
        let head = self.avail.pos;
        let max = u32::from(self.size);
        let mut count = 0u32;
        let mut seen_write = false;
        let mut at = self.avail;
        let mut slots = 0u16;
        if self.keep {
            self.kept.clear();
        }
        loop {
            let d = v.desc(at.pos);
            let flags = d.flags();
            if self.keep {
                self.kept.push(RingDesc {
                    addr: d.addr().0,
                    len: d.len(),
                    id: d.id(),
                    flags,
                });
            }
            // The head was available (pending); the rest of the chain must
            // be too, in its own lap.
            if slots > 0 && !at.is_avail(flags) {
                return Err(SvqError::PackedDescNotAvailable {
                    head,
                    position: at.pos,
                });
            }
            slots += 1;
            if u32::from(slots) > max {
                return Err(SvqError::ChainTooLong { head, max });
            }
            if flags & INDIRECT != 0 {
                if flags & NEXT != 0 {
                    return Err(SvqError::IndirectWithNext { head });
                }
                self.walk_indirect(mem, v, head, &d, out, &mut count, &mut seen_write)?;
            } else {
                count += 1;
                if count > max {
                    return Err(SvqError::ChainTooLong { head, max });
                }
                let seg = (d.addr().0, d.len(), flags & WRITE != 0);
                v.bufs.push(head, seg, out, &mut seen_write)?;
            }
            if flags & NEXT == 0 {
                let id = d.id();
                if id >= self.size {
                    return Err(SvqError::BadBufferId {
                        head,
                        id,
                        queue_size: self.size,
                    });
                }
                // The slots between the used and the avail position are
                // the guest's chains in flight: all of them fit the ring.
                let in_ring = self.used.until(self.avail, self.size) + u32::from(slots);
                if in_ring > max {
                    return Err(SvqError::PackedRingOverrun {
                        head,
                        in_ring,
                        queue_size: self.size,
                    });
                }
                return Ok(ChainHead { id, slots });
            }
            at = at.add(1, self.size);
        }
    }

    fn walk_head(
        &mut self,
        _mem: &GuestMemoryMmap,
        _v: &PackedView,
        _head: u16,
        _out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError> {
        Err(SvqError::ResubmitWrongLayout { guest_packed: true })
    }

    /// As `walk_next`, from copies: the same checks on every descriptor
    /// (guest memory, readable before writable, indirect tables read from
    /// guest memory and checked, id below the queue size), NEXT exactly on
    /// all but the last, and all resubmitted chains together within the
    /// slots the start positions leave between used and avail. The
    /// AVAIL/USED bits are not checked: they were, when the chain was
    /// popped, and the copy keeps what they were then.
    fn walk_copy(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &PackedView,
        descs: &[RingDesc],
        out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError> {
        out.clear();
        let n = descs.len();
        let id = descs.last().map_or(0, |d| d.id);
        let malformed = |what| SvqError::ResubmitChainMalformed { id, descs: n, what };
        if n == 0 {
            return Err(malformed("no descriptor"));
        }
        let max = u32::from(self.size);
        // Errors name the chain by its id: it has no ring position now.
        let head = id;
        if n > usize::from(self.size) {
            return Err(SvqError::ChainTooLong { head, max });
        }
        let mut count = 0u32;
        let mut seen_write = false;
        for (k, rd) in descs.iter().enumerate() {
            let flags = rd.flags;
            let more = k + 1 < n;
            if (flags & NEXT != 0) != more {
                return Err(malformed(if more {
                    "a descriptor before the last lacks NEXT"
                } else {
                    "the last descriptor has NEXT"
                }));
            }
            if flags & INDIRECT != 0 {
                if more {
                    return Err(SvqError::IndirectWithNext { head });
                }
                let d = Descriptor::new(rd.addr, rd.len, rd.id, flags);
                self.walk_indirect(mem, v, head, &d, out, &mut count, &mut seen_write)?;
            } else {
                count += 1;
                if count > max {
                    return Err(SvqError::ChainTooLong { head, max });
                }
                let seg = (rd.addr, rd.len, flags & WRITE != 0);
                v.bufs.push(head, seg, out, &mut seen_write)?;
            }
        }
        if id >= self.size {
            return Err(SvqError::BadBufferId {
                head,
                id,
                queue_size: self.size,
            });
        }
        let in_ring = self.resubmitted + n as u32;
        if in_ring > self.used.until(self.avail, self.size) {
            return Err(malformed(
                "more slots resubmitted than the start positions leave in flight",
            ));
        }
        self.resubmitted = in_ring;
        if self.keep {
            self.kept.clear();
            self.kept.extend_from_slice(descs);
        }
        Ok(ChainHead {
            id,
            slots: n as u16,
        })
    }

    fn keep_descs(&mut self) {
        self.keep = true;
    }

    #[inline(always)]
    fn kept_descs(&self) -> Option<&[RingDesc]> {
        self.keep.then_some(self.kept.as_slice())
    }

    fn advance(&mut self, slots: u16) {
        self.avail = self.avail.add(slots, self.size);
    }

    fn rewind(&mut self, _chains: u16, slots: u32) {
        let slots = slots.min(u32::from(self.size)) as u16;
        self.avail = self.avail.sub(slots, self.size);
    }

    fn add_used(&mut self, v: &PackedView, id: u16, len: u32, slots: u16) {
        v.write_used(self.used.pos, id, len, self.used.used_flags());
        self.used = self.used.add(slots, self.size);
    }

    /// The descriptor slots from `old` to the used position (the used
    /// descriptors are somewhere in them, one per chain).
    fn log_used_since(&self, old: u16, log: &dyn DirtyLog) {
        let old = Pos::decode(old);
        let n = u64::from(old.until(self.used, self.size).min(u32::from(self.size)));
        if n == 0 {
            return;
        }
        let first = u64::from(old.pos);
        let head = n.min(u64::from(self.size) - first);
        log.mark(self.ring.desc.wrapping_add(16 * first), 16 * head);
        if n > head {
            log.mark(self.ring.desc, 16 * (n - head));
        }
    }

    fn should_notify(&self, v: &PackedView, old: u16) -> Result<bool, SvqError> {
        let old = Pos::decode(old);
        if old == self.used {
            return Ok(false);
        }
        // The used flags must be visible before we read the guest's
        // suppression state, or we could miss it re-enabling interrupts.
        fence(Ordering::SeqCst);
        let (flags, off_wrap) = v.driver_event();
        Ok(wants_event(
            flags,
            off_wrap,
            self.event_idx,
            old,
            self.used,
            self.size,
        ))
    }

    /// ENABLE once after taking the ring over (a polling device may have
    /// left DISABLE); kicks stay enabled after that, so there is nothing
    /// to re-arm per call.
    fn rearm(&mut self, v: &PackedView) -> Result<bool, SvqError> {
        if self.kicks_suppressed || self.kicks_asked {
            return Ok(false);
        }
        self.kicks_asked = true;
        if !self.set_kicks(v, true) {
            return Ok(false);
        }
        Ok(self.avail_moved(v))
    }

    fn suppress_kicks(&mut self, v: &PackedView) {
        if self.kicks_suppressed {
            return;
        }
        self.kicks_suppressed = true;
        self.set_kicks(v, false);
    }

    fn request_kicks(&mut self, v: &PackedView) -> Result<bool, SvqError> {
        self.kicks_suppressed = false;
        self.kicks_asked = true;
        self.set_kicks(v, true);
        Ok(self.avail_moved(v))
    }

    fn kicks_suppressed(&self) -> bool {
        self.kicks_suppressed
    }

    fn flush_dirty(&mut self, log: &dyn DirtyLog) {
        if std::mem::take(&mut self.event_written) {
            log.mark(self.ring.used_log, 4);
        }
    }
}
