//! A small, independent PACKED-virtqueue test double (virtio 1.1+ section
//! 2.8), both ends of it:
//!
//! - [`PackedRing`] is a DRIVER (the guest side) in guest memory, written
//!   after Linux's `drivers/virtio/virtio_ring.c` packed functions;
//! - [`PackedDevice`] is a DEVICE consuming a packed ring through
//!   [`RingMemory`], written after DPDK's vhost packed path (which reads the
//!   buffer id from the last descriptor of a chain) and QEMU's interrupt
//!   decision.
//!
//! A shadow virtqueue is a device to the guest and a driver to the real
//! device, so it is tested from both sides: against [`PackedRing`] for the
//! first, against [`PackedDevice`] for the second. Deliberately does not
//! share code with the svq crate: a misreading of the spec there must not
//! be repeated here.
//!
//! Positions (avail and used) are reported as one u16, `pos | wrap << 15`,
//! the vhost-user encoding of a packed ring's base.

use std::collections::BTreeSet;
use std::sync::atomic::{fence, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, MmapRegion, VolatileMemory,
};

use crate::ring::{need_event, Seg, Used, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

/// Descriptor flag: made available by the driver (when equal to the
/// driver's wrap counter).
pub const PACKED_F_AVAIL: u16 = 1 << 7;
/// Descriptor flag: used by the device (when equal, with AVAIL, to the
/// device's wrap counter).
pub const PACKED_F_USED: u16 = 1 << 15;

/// Event suppression flags: notify on every event.
pub const EVENT_ENABLE: u16 = 0;
/// Event suppression flags: never notify.
pub const EVENT_DISABLE: u16 = 1;
/// Event suppression flags: notify once the position in `off_wrap` is
/// passed (only with VIRTIO_RING_F_EVENT_IDX).
pub const EVENT_DESC: u16 = 2;

/// The wrap counter's bit in an encoded position and in `off_wrap`.
const WRAP_BIT: u16 = 1 << 15;

/// Bytes of one packed descriptor, and offsets of its fields.
const DESC_BYTES: u64 = 16;
const DESC_LEN: u64 = 8;
const DESC_ID: u64 = 12;
const DESC_FLAGS: u64 = 14;

/// Offsets inside an event suppression struct `{off_wrap, flags}`.
const EVENT_OFF_WRAP: u64 = 0;
const EVENT_FLAGS: u64 = 2;

/// Bytes needed by the three parts of a packed ring of `size` entries:
/// descriptor ring, driver area, device area.
pub fn packed_ring_bytes(size: u16) -> (u64, u64, u64) {
    (DESC_BYTES * size as u64, 4, 4)
}

/// `pos | wrap << 15`: how positions are reported and taken.
pub fn encode_position(pos: u16, wrap: bool) -> u16 {
    pos | (u16::from(wrap) << 15)
}

/// The inverse of [`encode_position`]: `(pos, wrap)`.
pub fn decode_position(v: u16) -> (u16, bool) {
    (v & !WRAP_BIT, v & WRAP_BIT != 0)
}

/// Moves a ring position `n` slots on. Positions run 0..size and the wrap
/// counter flips each time one passes the end (size need not be a power of
/// two in a packed ring, so this cannot be a mask).
fn advance(size: u16, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
    let size = u32::from(size);
    let mut p = u32::from(pos) + u32::from(n);
    let mut w = wrap;
    while p >= size {
        p -= size;
        w = !w;
    }
    (p as u16, w)
}

/// The AVAIL/USED bits that make a descriptor available in the lap whose
/// wrap counter is `wrap`: AVAIL equal to it, USED different.
fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        PACKED_F_AVAIL
    } else {
        PACKED_F_USED
    }
}

/// The AVAIL/USED bits of a descriptor used in the lap whose wrap counter
/// is `wrap`: both equal to it.
fn used_bits(wrap: bool) -> u16 {
    if wrap {
        PACKED_F_AVAIL | PACKED_F_USED
    } else {
        0
    }
}

/// Is a descriptor with `flags` available to a device whose avail wrap
/// counter is `wrap`?
fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & PACKED_F_AVAIL != 0) == wrap && (flags & PACKED_F_USED != 0) != wrap
}

/// Is a descriptor with `flags` used, for a driver whose used wrap counter
/// is `wrap`? (Linux `is_used_desc_packed`.)
fn is_used(flags: u16, wrap: bool) -> bool {
    let avail = flags & PACKED_F_AVAIL != 0;
    let used = flags & PACKED_F_USED != 0;
    avail == used && used == wrap
}

/// The notification decision both sides share (Linux
/// `virtqueue_kick_prepare_packed`, QEMU `vring_packed_need_event`): the
/// other side moved its position from `old` to `new` (`new` in 0..size, in
/// the lap of wrap counter `wrap`; `old` may be "negative", i.e. in the lap
/// before). DESC asks for a notification once the slot in `off_wrap` is
/// passed; a slot of the other lap is taken as one `size` earlier.
///
/// DESC is only valid with EVENT_IDX; without it, it is treated as ENABLE
/// (DPDK's choice, the safe one: a spurious notification is harmless, a
/// missing one hangs). Any value but DISABLE and DESC means notify.
fn notify_wanted(
    flags: u16,
    off_wrap: u16,
    event_idx: bool,
    size: u16,
    wrap: bool,
    new: u16,
    old: u16,
) -> bool {
    if flags != EVENT_DESC || !event_idx {
        return flags != EVENT_DISABLE;
    }
    let (mut event, event_wrap) = decode_position(off_wrap);
    if event_wrap != wrap {
        event = event.wrapping_sub(size);
    }
    need_event(event, new, old)
}

/// One packed descriptor, as laid out in the ring (little endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

impl PackedDesc {
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.id.to_le_bytes());
        raw[14..16].copy_from_slice(&self.flags.to_le_bytes());
        raw
    }

    pub fn from_bytes(raw: &[u8; 16]) -> PackedDesc {
        PackedDesc {
            addr: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
            id: u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes")),
            flags: u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes")),
        }
    }
}

#[derive(Clone, Debug)]
struct InFlight {
    /// Ring slots the buffer occupies (1 for an indirect one).
    slots: u16,
    segs: Vec<Seg>,
    tag: u64,
    writable: u64,
}

/// The DRIVER (guest side) of a packed ring in guest memory.
///
/// Buffer ids come from a stack (0, 1, 2, ... first; a freed id is reused
/// first), so ids and ring positions part ways as soon as a chain has more
/// than one descriptor: a device mixing them up is caught.
pub struct PackedRing {
    mem: GuestMemoryMmap,
    pub size: u16,
    pub desc: GuestAddress,
    /// Driver event suppression area (the driver's interrupt suppression).
    pub driver: GuestAddress,
    /// Device event suppression area (the device's kick suppression).
    pub device: GuestAddress,
    /// VIRTIO_RING_F_EVENT_IDX negotiated: EVENT_DESC is honoured, and
    /// `pop_used` keeps the driver area's off_wrap at the used position
    /// while its flags are EVENT_DESC (as Linux does after each
    /// `virtqueue_get_buf`).
    pub event_idx: bool,
    pub total_added: u64,
    pub total_used: u64,
    /// When set, every guest range the device wrote and the driver saw in
    /// a used descriptor (the written bytes of the buffer, the used
    /// descriptor's 16 bytes) is appended as `(gpa, len)`: what a dirty log
    /// must cover.
    pub written: Option<Vec<(u64, u64)>>,
    /// Next slot the driver writes, and its lap's wrap counter.
    avail: u16,
    avail_wrap: bool,
    /// Next slot the driver expects a used descriptor at.
    used: u16,
    used_wrap: bool,
    free_ids: Vec<u16>,
    free_slots: usize,
    /// Indexed by buffer id.
    inflight: Vec<Option<InFlight>>,
    /// Slots made available since the last `kick_needed` (Linux
    /// `num_added`).
    added_since_kick: u16,
}

impl PackedRing {
    /// A ring of `size` entries (any size 1..=32768: packed rings need not
    /// be a power of two) at the given, already allocated and aligned
    /// addresses. Zeroes the ring memory: every slot then looks used in the
    /// lap before the first (wrap counter 0), which is what both sides
    /// expect at wrap counter 1.
    pub fn new(
        mem: &GuestMemoryMmap,
        size: u16,
        desc: GuestAddress,
        driver: GuestAddress,
        device: GuestAddress,
    ) -> PackedRing {
        assert!((1..=WRAP_BIT).contains(&size), "packed ring size {size}");
        // Spec 2.8.10.1: descriptors 16-byte aligned, both areas 4-byte
        // aligned (the event areas are also read as one u32 here).
        assert!(
            desc.0.is_multiple_of(16) && driver.0.is_multiple_of(4) && device.0.is_multiple_of(4)
        );
        let (d, dr, dv) = packed_ring_bytes(size);
        crate::ring::zero_ring(mem, [(desc, d), (driver, dr), (device, dv)]);
        PackedRing {
            mem: mem.clone(),
            size,
            desc,
            driver,
            device,
            event_idx: false,
            total_added: 0,
            total_used: 0,
            written: None,
            avail: 0,
            avail_wrap: true,
            used: 0,
            used_wrap: true,
            // Pop from the end: hand out 0, 1, 2, ... first.
            free_ids: (0..size).rev().collect(),
            free_slots: size as usize,
            inflight: vec![None; size as usize],
            added_since_kick: 0,
        }
    }

    /// The guest memory the ring lives in.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Continues the ring at the encoded positions `avail` and `used` (as
    /// after a hand-over; no chain may be in flight). Rewrites every slot's
    /// flags to what a ring used up to there holds: slots before `used`
    /// used in the current lap, the others in the lap before. Without that,
    /// zeroed memory at wrap counter 0 would look like a ring full of used
    /// descriptors.
    pub fn start_at(&mut self, avail: u16, used: u16) {
        assert_eq!(self.num_inflight(), 0, "start_at with chains in flight");
        let (a, aw) = decode_position(avail);
        let (u, uw) = decode_position(used);
        assert!(a < self.size && u < self.size, "positions past the ring");
        self.avail = a;
        self.avail_wrap = aw;
        self.used = u;
        self.used_wrap = uw;
        self.added_since_kick = 0;
        for pos in 0..self.size {
            let lap = if pos < u { uw } else { !uw };
            self.write_flags(pos, used_bits(lap));
        }
    }

    /// The driver's avail position, encoded: where the next chain goes.
    pub fn avail_position(&self) -> u16 {
        encode_position(self.avail, self.avail_wrap)
    }

    /// The driver's used position, encoded: where it expects the next used
    /// descriptor.
    pub fn used_position(&self) -> u16 {
        encode_position(self.used, self.used_wrap)
    }

    /// Free descriptor slots in the ring.
    pub fn num_free(&self) -> usize {
        self.free_slots
    }

    pub fn num_inflight(&self) -> usize {
        self.inflight.iter().filter(|e| e.is_some()).count()
    }

    /// Tags of the buffers made available and not yet seen used, by id.
    pub fn inflight_tags(&self) -> Vec<u64> {
        self.inflight.iter().flatten().map(|f| f.tag).collect()
    }

    /// The buffer id the next add will use, if a slot is free.
    pub fn next_id(&self) -> Option<u16> {
        self.free_ids
            .last()
            .copied()
            .filter(|_| self.free_slots > 0)
    }

    /// Guest address of the slot at `pos` (a ring index, or an encoded
    /// position: the wrap bit is ignored).
    fn slot(&self, pos: u16) -> GuestAddress {
        let i = (pos & !WRAP_BIT) % self.size;
        GuestAddress(self.desc.0 + DESC_BYTES * i as u64)
    }

    /// Writes one raw descriptor at `pos` (ring index or encoded position),
    /// flags last with Release, so that flags making it available publish
    /// the rest. No bookkeeping: for building deliberately broken rings.
    pub fn write_desc(&self, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        self.write_desc_body(pos, addr, len, id);
        self.write_flags(pos, flags);
    }

    /// Writes everything of a descriptor but its flags.
    fn write_desc_body(&self, pos: u16, addr: u64, len: u32, id: u16) {
        let raw = PackedDesc {
            addr,
            len,
            id,
            flags: 0,
        }
        .to_bytes();
        self.mem
            .write_slice(&raw[..DESC_FLAGS as usize], self.slot(pos))
            .expect("write desc");
    }

    /// Stores the flags of the descriptor at `pos` (ring index or encoded
    /// position) with Release: everything written before is visible to a
    /// device that sees these flags.
    pub fn write_flags(&self, pos: u16, flags: u16) {
        let addr = self.slot(pos).0 + DESC_FLAGS;
        self.mem
            .store(flags.to_le(), GuestAddress(addr), Ordering::Release)
            .expect("store desc flags");
    }

    /// The flags of the descriptor at `pos`, loaded with Acquire.
    fn load_flags(&self, pos: u16) -> u16 {
        let addr = self.slot(pos).0 + DESC_FLAGS;
        u16::from_le(
            self.mem
                .load(GuestAddress(addr), Ordering::Acquire)
                .expect("load desc flags"),
        )
    }

    /// The AVAIL/USED bits the driver would set at its avail position now.
    pub fn avail_flags_now(&self) -> u16 {
        avail_bits(self.avail_wrap)
    }

    /// Adds a chain, one descriptor per segment, and makes it available.
    /// Returns the buffer id, or None if there are not enough free slots.
    pub fn add(&mut self, segs: &[Seg], tag: u64) -> Option<u16> {
        let (id, head, flags) = self.add_deferred(segs, tag)?;
        self.write_flags(head, flags);
        Some(id)
    }

    /// Adds a chain as one INDIRECT descriptor whose table (16 bytes per
    /// segment) is written at `table`. Occupies one slot.
    pub fn add_indirect(&mut self, segs: &[Seg], tag: u64, table: GuestAddress) -> Option<u16> {
        assert!(!segs.is_empty());
        if self.free_slots < 1 {
            return None;
        }
        let id = self.free_ids.pop()?;
        // Like Linux: the table's entries carry only addr, len and WRITE;
        // no NEXT (the device uses them in order) and no AVAIL/USED.
        for (i, seg) in segs.iter().enumerate() {
            let raw = PackedDesc {
                addr: seg.addr.0,
                len: seg.len,
                id: 0,
                flags: if seg.write { DESC_F_WRITE } else { 0 },
            }
            .to_bytes();
            self.mem
                .write_slice(&raw, GuestAddress(table.0 + DESC_BYTES * i as u64))
                .expect("write indirect table");
        }
        let head = self.avail_position();
        let table_len = (DESC_BYTES as usize * segs.len()) as u32;
        self.write_desc_body(head, table.0, table_len, id);
        let flags = DESC_F_INDIRECT | self.avail_flags_now();
        self.made_available(id, 1, segs, tag);
        self.write_flags(head, flags);
        Some(id)
    }

    /// Adds a chain like [`PackedRing::add`] but leaves the head's flags
    /// unwritten (the slot keeps its old flags, so the chain is not
    /// available yet): for tests of a half-written chain. Returns the
    /// buffer id, the head's encoded position and the flags to write there
    /// with [`PackedRing::write_flags`] to publish it. The chain is booked
    /// in flight already.
    pub fn add_deferred(&mut self, segs: &[Seg], tag: u64) -> Option<(u16, u16, u16)> {
        assert!(!segs.is_empty());
        if segs.len() > self.free_slots {
            return None;
        }
        let id = self.free_ids.pop()?;
        let head = self.avail_position();
        let (mut pos, mut wrap) = (self.avail, self.avail_wrap);
        let mut head_flags = 0;
        for (i, seg) in segs.iter().enumerate() {
            // Each descriptor carries the AVAIL/USED bits of its own lap: a
            // chain may wrap in the middle (Linux flips them there). The id
            // goes in every descriptor, as Linux writes it; the device reads
            // it from the last.
            let mut flags = avail_bits(wrap);
            if seg.write {
                flags |= DESC_F_WRITE;
            }
            if i + 1 < segs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc_body(pos, seg.addr.0, seg.len, id);
            if i == 0 {
                head_flags = flags;
            } else {
                self.write_flags(pos, flags);
            }
            (pos, wrap) = advance(self.size, pos, wrap, 1);
        }
        self.made_available(id, segs.len() as u16, segs, tag);
        Some((id, head, head_flags))
    }

    /// Books buffer `id` (occupying `slots` slots at the avail position) as
    /// in flight and moves the avail position past it.
    fn made_available(&mut self, id: u16, slots: u16, segs: &[Seg], tag: u64) {
        let writable = segs.iter().filter(|s| s.write).map(|s| s.len as u64).sum();
        assert!(self.inflight[id as usize].is_none());
        self.inflight[id as usize] = Some(InFlight {
            slots,
            segs: segs.to_vec(),
            tag,
            writable,
        });
        self.free_slots -= slots as usize;
        (self.avail, self.avail_wrap) = advance(self.size, self.avail, self.avail_wrap, slots);
        self.added_since_kick = self.added_since_kick.wrapping_add(slots);
        self.total_added += 1;
    }

    /// Whether the device wants a kick for the chains added since the last
    /// call (Linux `virtqueue_kick_prepare_packed`): reads the DEVICE area;
    /// with EVENT_DESC, kicks once the avail position passed its off_wrap.
    pub fn kick_needed(&mut self) -> bool {
        // The new head flags must be visible before the device's
        // suppression is read, or a device going to sleep is missed.
        fence(Ordering::SeqCst);
        let new = self.avail;
        let old = new.wrapping_sub(self.added_since_kick);
        self.added_since_kick = 0;
        let (flags, off_wrap) = self.device_event();
        notify_wanted(
            flags,
            off_wrap,
            self.event_idx,
            self.size,
            self.avail_wrap,
            new,
            old,
        )
    }

    /// Writes the DRIVER area (interrupt suppression): off_wrap first, then
    /// flags, so a device seeing EVENT_DESC sees its off_wrap.
    pub fn set_driver_event(&self, flags: u16, off_wrap: u16) {
        let base = self.driver.0;
        self.mem
            .store(
                off_wrap.to_le(),
                GuestAddress(base + EVENT_OFF_WRAP),
                Ordering::Release,
            )
            .expect("store driver off_wrap");
        self.mem
            .store(
                flags.to_le(),
                GuestAddress(base + EVENT_FLAGS),
                Ordering::Release,
            )
            .expect("store driver flags");
        // Before the driver looks at the ring again (the re-check after
        // enabling interrupts).
        fence(Ordering::SeqCst);
    }

    /// The DRIVER area as in memory: (flags, off_wrap).
    fn driver_event(&self) -> (u16, u16) {
        read_event_u32(&self.mem, self.driver)
    }

    /// What the device wrote in the DEVICE area: (flags, off_wrap), read
    /// as one u32 like Linux does, so the pair is consistent.
    pub fn device_event(&self) -> (u16, u16) {
        read_event_u32(&self.mem, self.device)
    }

    /// Is there a used descriptor at the used position?
    pub fn used_ready(&self) -> bool {
        is_used(self.load_flags(self.used), self.used_wrap)
    }

    /// Consumes every used descriptor at the used position, validating each
    /// against what the driver made available. An Err describes a device
    /// bug; the used position then stays at the offending descriptor.
    pub fn pop_used(&mut self) -> Result<Vec<Used>, String> {
        let mut out = Vec::new();
        loop {
            self.pop_used_once(&mut out)?;
            if !self.event_idx || self.driver_event().0 != EVENT_DESC {
                return Ok(out);
            }
            // Ask for an interrupt at the next used descriptor, then look
            // again: one written before the device saw off_wrap gets none.
            let off_wrap = self.used_position();
            self.mem
                .store(
                    off_wrap.to_le(),
                    GuestAddress(self.driver.0 + EVENT_OFF_WRAP),
                    Ordering::Release,
                )
                .expect("store driver off_wrap");
            fence(Ordering::SeqCst);
            if !self.used_ready() {
                return Ok(out);
            }
        }
    }

    fn pop_used_once(&mut self, out: &mut Vec<Used>) -> Result<(), String> {
        while self.used_ready() {
            let pos = self.used_position();
            let slot = self.slot(self.used);
            // The Acquire load of the flags orders this read after them.
            let mut raw = [0u8; 16];
            self.mem.read_slice(&mut raw, slot).expect("read used desc");
            let d = PackedDesc::from_bytes(&raw);
            let f = match self.inflight.get(d.id as usize) {
                Some(Some(f)) => f,
                _ => {
                    return Err(format!(
                        "used descriptor at {:#06x} has id {} which is not in flight \
                         (duplicate, never made available, or >= ring size {})",
                        pos, d.id, self.size
                    ))
                }
            };
            if d.len as u64 > f.writable {
                return Err(format!(
                    "used descriptor at {:#06x} (id {}) has len {} > {} writable bytes",
                    pos, d.id, d.len, f.writable
                ));
            }
            let f = self.inflight[d.id as usize].take().expect("checked");
            self.free_ids.push(d.id);
            self.free_slots += f.slots as usize;
            if let Some(w) = self.written.as_mut() {
                let mut left = d.len as u64;
                for sg in f.segs.iter().filter(|sg| sg.write) {
                    if left == 0 {
                        break;
                    }
                    let n = left.min(sg.len as u64);
                    w.push((sg.addr.0, n));
                    left -= n;
                }
                w.push((slot.0, DESC_BYTES));
            }
            // The driver, not the device, knows how many slots the buffer
            // occupied (Linux `desc_state[id].num`).
            (self.used, self.used_wrap) = advance(self.size, self.used, self.used_wrap, f.slots);
            self.total_used += 1;
            out.push(Used {
                head: d.id,
                len: d.len,
                tag: f.tag,
                segs: f.segs,
            });
        }
        Ok(())
    }

    /// Reads the bytes of the written part of a completed buffer (`len`
    /// bytes over its writable segments).
    pub fn read_written(&self, used: &Used) -> Vec<u8> {
        crate::ring::read_written(&self.mem, used)
    }
}

/// An event suppression struct read as one u32: (flags, off_wrap).
fn read_event_u32(mem: &GuestMemoryMmap, addr: GuestAddress) -> (u16, u16) {
    let v = u32::from_le(mem.load(addr, Ordering::Acquire).expect("load event area"));
    ((v >> 16) as u16, v as u16)
}

/// Memory a [`PackedDevice`] finds its ring in. Abstract because the ring
/// may sit in a plain mmap (shadow memory addressed by offset) rather than
/// in guest memory. Accesses out of range panic: the ring is the test's.
pub trait RingMemory {
    fn read(&self, addr: u64, buf: &mut [u8]);
    fn write(&self, addr: u64, buf: &[u8]);
    /// Loads a little-endian u16 with Acquire.
    fn load_u16(&self, addr: u64) -> u16;
    /// Stores a little-endian u16 with Release.
    fn store_u16(&self, addr: u64, v: u16);
    /// Is `addr..addr + len` inside this memory? Lets the device reject an
    /// indirect table pointing nowhere instead of panicking.
    fn contains(&self, _addr: u64, _len: usize) -> bool {
        true
    }
}

/// Guest memory, addressed by guest physical address.
impl RingMemory for GuestMemoryMmap {
    fn read(&self, addr: u64, buf: &mut [u8]) {
        self.read_slice(buf, GuestAddress(addr))
            .expect("read guest memory");
    }

    fn write(&self, addr: u64, buf: &[u8]) {
        self.write_slice(buf, GuestAddress(addr))
            .expect("write guest memory");
    }

    fn load_u16(&self, addr: u64) -> u16 {
        u16::from_le(
            self.load(GuestAddress(addr), Ordering::Acquire)
                .expect("load guest u16"),
        )
    }

    fn store_u16(&self, addr: u64, v: u16) {
        self.store(v.to_le(), GuestAddress(addr), Ordering::Release)
            .expect("store guest u16");
    }

    fn contains(&self, addr: u64, len: usize) -> bool {
        self.check_range(GuestAddress(addr), len)
    }
}

/// A plain mapping, addressed by offset inside it.
impl<B: Bitmap> RingMemory for MmapRegion<B> {
    fn read(&self, addr: u64, buf: &mut [u8]) {
        self.as_volatile_slice()
            .read_slice(buf, addr as usize)
            .expect("read region");
    }

    fn write(&self, addr: u64, buf: &[u8]) {
        self.as_volatile_slice()
            .write_slice(buf, addr as usize)
            .expect("write region");
    }

    fn load_u16(&self, addr: u64) -> u16 {
        let v: u16 = self
            .as_volatile_slice()
            .load(addr as usize, Ordering::Acquire)
            .expect("load region u16");
        u16::from_le(v)
    }

    fn store_u16(&self, addr: u64, v: u16) {
        self.as_volatile_slice()
            .store(v.to_le(), addr as usize, Ordering::Release)
            .expect("store region u16");
    }

    fn contains(&self, addr: u64, len: usize) -> bool {
        addr.checked_add(len as u64)
            .is_some_and(|end| end <= self.size() as u64)
    }
}

/// A buffer as taken by [`PackedDevice::take_all`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedTaken {
    /// The buffer id, from the chain's last descriptor.
    pub id: u16,
    /// Ring slots the chain occupied: what to pass to `push_used`.
    pub slots: u16,
    /// Some descriptor of the chain was INDIRECT.
    pub indirect: bool,
    /// `(addr as in the descriptor, len, write)`, in chain order, indirect
    /// tables expanded.
    pub segs: Vec<(u64, u32, bool)>,
}

impl PackedTaken {
    /// Device-writable bytes of the buffer.
    pub fn writable(&self) -> u64 {
        self.segs
            .iter()
            .filter(|s| s.2)
            .map(|s| u64::from(s.1))
            .sum()
    }
}

/// A DEVICE consuming a packed ring.
///
/// It remembers the ids it took until they are pushed used, and rejects a
/// chain reusing one still in flight: a driver bug a real device would
/// turn into data corruption.
pub struct PackedDevice {
    pub size: u16,
    /// Descriptor ring, driver area and device area, as RingMemory
    /// addresses.
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    /// VIRTIO_RING_F_EVENT_IDX negotiated: EVENT_DESC is honoured, and
    /// `take_all` keeps the device area's off_wrap at the avail position
    /// while its flags are EVENT_DESC (as vhost does when re-enabling
    /// notifications).
    pub event_idx: bool,
    avail: u16,
    avail_wrap: bool,
    used: u16,
    used_wrap: bool,
    taken: BTreeSet<u16>,
    /// Slots the used position moved since the last `interrupt_needed`.
    used_since_signal: u16,
    /// QEMU `signalled_used_valid`: false until the first interrupt
    /// decision after a (re)start, which then always interrupts.
    signalled_valid: bool,
}

impl PackedDevice {
    pub fn new(size: u16, desc: u64, driver: u64, device: u64) -> PackedDevice {
        assert!((1..=WRAP_BIT).contains(&size), "packed ring size {size}");
        PackedDevice {
            size,
            desc,
            driver,
            device,
            event_idx: false,
            avail: 0,
            avail_wrap: true,
            used: 0,
            used_wrap: true,
            taken: BTreeSet::new(),
            used_since_signal: 0,
            signalled_valid: false,
        }
    }

    /// Continues at the encoded positions (as after VHOST_USER_SET_VRING_BASE:
    /// `avail` may be ahead of `used` by buffers taken elsewhere).
    pub fn start_at(&mut self, avail: u16, used: u16) {
        let (a, aw) = decode_position(avail);
        let (u, uw) = decode_position(used);
        assert!(a < self.size && u < self.size, "positions past the ring");
        self.avail = a;
        self.avail_wrap = aw;
        self.used = u;
        self.used_wrap = uw;
        self.taken.clear();
        self.used_since_signal = 0;
        self.signalled_valid = false;
    }

    /// The device's avail position, encoded: the next slot it reads.
    pub fn avail_position(&self) -> u16 {
        encode_position(self.avail, self.avail_wrap)
    }

    /// The device's used position, encoded: the next slot it writes.
    pub fn used_position(&self) -> u16 {
        encode_position(self.used, self.used_wrap)
    }

    /// Ids taken and not yet pushed used.
    pub fn inflight_ids(&self) -> Vec<u16> {
        self.taken.iter().copied().collect()
    }

    /// RingMemory address of the slot at ring index `pos`.
    fn slot(&self, pos: u16) -> u64 {
        self.desc + DESC_BYTES * u64::from(pos % self.size)
    }

    fn read_desc(mem: &dyn RingMemory, addr: u64) -> PackedDesc {
        let mut raw = [0u8; 16];
        mem.read(addr, &mut raw);
        PackedDesc::from_bytes(&raw)
    }

    /// Is a chain available at the avail position?
    fn head_ready(&self, mem: &dyn RingMemory) -> bool {
        let flags = mem.load_u16(self.slot(self.avail) + DESC_FLAGS);
        is_avail(flags, self.avail_wrap)
    }

    /// Takes every available chain. `table` maps an indirect descriptor's
    /// addr to the RingMemory address of its table (identity for guest
    /// memory). An Err describes a malformed ring; the avail position then
    /// stays at the offending chain (the device is broken, as QEMU's
    /// `virtio_error` leaves it).
    pub fn take_all(
        &mut self,
        mem: &dyn RingMemory,
        table: &dyn Fn(u64) -> u64,
    ) -> Result<Vec<PackedTaken>, String> {
        let mut out = Vec::new();
        loop {
            while let Some(t) = self.take_one(mem, table)? {
                out.push(t);
            }
            let flags = mem.load_u16(self.device + EVENT_FLAGS);
            if !self.event_idx || flags != EVENT_DESC {
                return Ok(out);
            }
            // Ask for a kick at the next chain, then look again: one made
            // available before the driver saw off_wrap gets none.
            mem.store_u16(self.device + EVENT_OFF_WRAP, self.avail_position());
            fence(Ordering::SeqCst);
            if !self.head_ready(mem) {
                return Ok(out);
            }
        }
    }

    /// Takes the chain at the avail position, if one is available.
    fn take_one(
        &mut self,
        mem: &dyn RingMemory,
        table: &dyn Fn(u64) -> u64,
    ) -> Result<Option<PackedTaken>, String> {
        let start = self.avail_position();
        // Only the head's flags say the chain is there; the driver wrote
        // the rest before them, and this Acquire load orders the reads.
        let head_flags = mem.load_u16(self.slot(self.avail) + DESC_FLAGS);
        if !is_avail(head_flags, self.avail_wrap) {
            return Ok(None);
        }
        let (mut pos, mut wrap) = (self.avail, self.avail_wrap);
        let mut taken = PackedTaken {
            id: 0,
            slots: 0,
            indirect: false,
            segs: Vec::new(),
        };
        loop {
            if taken.slots >= self.size {
                return Err(format!(
                    "chain at {start:#06x} is longer than the ring ({} descriptors)",
                    self.size
                ));
            }
            let mut d = Self::read_desc(mem, self.slot(pos));
            if taken.slots == 0 {
                d.flags = head_flags;
            }
            taken.slots += 1;
            // DPDK: the id of the last descriptor is the buffer's.
            taken.id = d.id;
            if d.flags & DESC_F_INDIRECT != 0 {
                if d.flags & DESC_F_NEXT != 0 {
                    return Err(format!(
                        "chain at {start:#06x}: descriptor {pos} has both INDIRECT and NEXT"
                    ));
                }
                self.read_table(mem, table, &d, start, &mut taken.segs)?;
                taken.indirect = true;
            } else {
                taken
                    .segs
                    .push((d.addr, d.len, d.flags & DESC_F_WRITE != 0));
            }
            (pos, wrap) = advance(self.size, pos, wrap, 1);
            if d.flags & DESC_F_NEXT == 0 {
                break;
            }
        }
        if !self.taken.insert(taken.id) {
            return Err(format!(
                "chain at {start:#06x} reuses buffer id {} which is still in flight",
                taken.id
            ));
        }
        self.avail = pos;
        self.avail_wrap = wrap;
        Ok(Some(taken))
    }

    /// Appends the entries of the indirect table `d` points at. Their NEXT
    /// flag is ignored (a packed table is used in order, spec 2.8.19); a
    /// nested INDIRECT, a length that is no whole number of descriptors or
    /// a table longer than the ring is an error.
    fn read_table(
        &self,
        mem: &dyn RingMemory,
        table: &dyn Fn(u64) -> u64,
        d: &PackedDesc,
        start: u16,
        segs: &mut Vec<(u64, u32, bool)>,
    ) -> Result<(), String> {
        let n = d.len as u64 / DESC_BYTES;
        if !u64::from(d.len).is_multiple_of(DESC_BYTES) || n == 0 {
            return Err(format!(
                "chain at {start:#06x}: indirect table length {} is not a positive multiple of 16",
                d.len
            ));
        }
        if n > u64::from(self.size) {
            return Err(format!(
                "chain at {start:#06x}: indirect table of {n} descriptors is longer than the ring ({})",
                self.size
            ));
        }
        let base = table(d.addr);
        if !mem.contains(base, d.len as usize) {
            return Err(format!(
                "chain at {start:#06x}: indirect table {:#x} (at {base:#x}, {} bytes) is outside memory",
                d.addr, d.len
            ));
        }
        for i in 0..n {
            let e = Self::read_desc(mem, base + DESC_BYTES * i);
            if e.flags & DESC_F_INDIRECT != 0 {
                return Err(format!(
                    "chain at {start:#06x}: nested INDIRECT in entry {i} of table {:#x}",
                    d.addr
                ));
            }
            segs.push((e.addr, e.len, e.flags & DESC_F_WRITE != 0));
        }
        Ok(())
    }

    /// Writes a used descriptor for buffer `id` (`len` bytes written) at
    /// the used position, flags last with Release, and moves the used
    /// position `slots` on (the slots the chain occupied, 1 if indirect).
    /// No checks: a test may push nonsense on purpose.
    pub fn push_used(&mut self, mem: &dyn RingMemory, id: u16, len: u32, slots: u16) {
        let slot = self.slot(self.used);
        mem.write(slot + DESC_LEN, &len.to_le_bytes());
        mem.write(slot + DESC_ID, &id.to_le_bytes());
        mem.store_u16(slot + DESC_FLAGS, used_bits(self.used_wrap));
        self.taken.remove(&id);
        (self.used, self.used_wrap) = advance(self.size, self.used, self.used_wrap, slots);
        self.used_since_signal = self.used_since_signal.wrapping_add(slots);
    }

    /// IN_ORDER: one used descriptor for the batch `ids` (oldest first),
    /// naming the last (`len` bytes), the used position moving over all
    /// their `slots` (DPDK's `vhost_shadow_dequeue_batch_packed_inorder`).
    pub fn push_used_batch(&mut self, mem: &dyn RingMemory, ids: &[u16], len: u32, slots: u16) {
        let Some((&last, older)) = ids.split_last() else {
            return;
        };
        for id in older {
            self.taken.remove(id);
        }
        self.push_used(mem, last, len, slots);
    }

    /// Whether the driver wants an interrupt for the used descriptors
    /// written since the last call (QEMU `virtio_packed_should_notify`):
    /// reads the DRIVER area; DISABLE never, ENABLE always, EVENT_DESC once
    /// the used position passed its off_wrap, and always on the first
    /// decision after a (re)start.
    ///
    /// One deviation from QEMU: the old position is the current one minus
    /// the slots moved, not the position at the last call, so a move across
    /// the end of the ring is judged exactly (QEMU's offsets then make it
    /// interrupt for an off_wrap passed before the last call too).
    pub fn interrupt_needed(&mut self, mem: &dyn RingMemory) -> bool {
        // The used descriptors must be visible before the driver's
        // suppression is read.
        fence(Ordering::SeqCst);
        let (flags, off_wrap) = self.driver_event(mem);
        let new = self.used;
        let old = new.wrapping_sub(self.used_since_signal);
        self.used_since_signal = 0;
        let valid = std::mem::replace(&mut self.signalled_valid, true);
        if flags == EVENT_DESC && self.event_idx && !valid {
            return true;
        }
        notify_wanted(
            flags,
            off_wrap,
            self.event_idx,
            self.size,
            self.used_wrap,
            new,
            old,
        )
    }

    /// Writes the DEVICE area (kick suppression): off_wrap first, then
    /// flags.
    pub fn set_device_event(&self, mem: &dyn RingMemory, flags: u16, off_wrap: u16) {
        mem.store_u16(self.device + EVENT_OFF_WRAP, off_wrap);
        mem.store_u16(self.device + EVENT_FLAGS, flags);
        fence(Ordering::SeqCst);
    }

    /// What the driver wrote in the DRIVER area: (flags, off_wrap). Flags
    /// first, as QEMU reads them, so an EVENT_DESC seen comes with its
    /// off_wrap.
    pub fn driver_event(&self, mem: &dyn RingMemory) -> (u16, u16) {
        let flags = mem.load_u16(self.driver + EVENT_FLAGS);
        let off_wrap = mem.load_u16(self.driver + EVENT_OFF_WRAP);
        (flags, off_wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestRegionMmap;

    const DESC: u64 = 0x1000;
    const DRIVER: u64 = 0x2000;
    const DEVICE: u64 = 0x2004;
    const TABLES: u64 = 0x4000;
    const BUFS: u64 = 0x10000;

    fn ident(a: u64) -> u64 {
        a
    }

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory")
    }

    fn pair(mem: &GuestMemoryMmap, size: u16) -> (PackedRing, PackedDevice) {
        let ring = PackedRing::new(
            mem,
            size,
            GuestAddress(DESC),
            GuestAddress(DRIVER),
            GuestAddress(DEVICE),
        );
        (ring, PackedDevice::new(size, DESC, DRIVER, DEVICE))
    }

    /// Buffer `i` (4 KiB each).
    fn buf(i: u64) -> GuestAddress {
        GuestAddress(BUFS + 0x1000 * i)
    }

    fn seg(i: u64, len: u32, write: bool) -> Seg {
        Seg {
            addr: buf(i),
            len,
            write,
        }
    }

    /// What the device writes into a buffer: derived from its id.
    fn pattern(id: u16, n: usize) -> Vec<u8> {
        (0..n).map(|i| (id as usize * 31 + i) as u8).collect()
    }

    /// Device side: fills the writable segments with `pattern` (up to
    /// `len` bytes, segment addresses mapped by `to_mem`) and pushes used.
    fn complete(
        dev: &mut PackedDevice,
        mem: &dyn RingMemory,
        t: &PackedTaken,
        len: u32,
        to_mem: &dyn Fn(u64) -> u64,
    ) {
        let data = pattern(t.id, len as usize);
        let mut off = 0;
        for &(addr, slen, _) in t.segs.iter().filter(|s| s.2) {
            let n = (slen as usize).min(data.len() - off);
            mem.write(to_mem(addr), &data[off..off + n]);
            off += n;
        }
        assert_eq!(off, len as usize);
        dev.push_used(mem, t.id, len, t.slots);
    }

    fn assert_positions_agree(ring: &PackedRing, dev: &PackedDevice) {
        assert_eq!(ring.avail_position(), dev.avail_position(), "avail");
        assert_eq!(ring.used_position(), dev.used_position(), "used");
    }

    #[test]
    fn chains_of_one_to_three_segments() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        ring.written = Some(Vec::new());
        let chains = [
            vec![seg(0, 100, false)],
            vec![seg(1, 64, false), seg(2, 200, true)],
            vec![seg(3, 10, false), seg(4, 50, true), seg(5, 70, true)],
        ];
        let mut ids = Vec::new();
        for (tag, c) in chains.iter().enumerate() {
            assert_eq!(ring.next_id(), Some(tag as u16));
            ids.push(ring.add(c, tag as u64).expect("room"));
        }
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!(ring.num_free(), 2);
        assert_eq!(ring.avail_position(), encode_position(6, true));
        assert!(ring.kick_needed());

        let taken = dev.take_all(&mem, &ident).unwrap();
        assert_eq!(taken.len(), 3);
        for (t, c) in taken.iter().zip(&chains) {
            assert_eq!(t.slots as usize, c.len());
            assert!(!t.indirect);
            let want: Vec<_> = c.iter().map(|s| (s.addr.0, s.len, s.write)).collect();
            assert_eq!(t.segs, want);
        }
        assert_eq!(dev.avail_position(), ring.avail_position());
        assert!(dev.take_all(&mem, &ident).unwrap().is_empty());

        // Spans segments: 50 + 30 of the third chain.
        let lens = [0, 150, 80];
        for (t, &len) in taken.iter().zip(&lens) {
            complete(&mut dev, &mem, t, len, &ident);
        }
        let used = ring.pop_used().unwrap();
        assert_eq!(used.len(), 3);
        for (i, u) in used.iter().enumerate() {
            assert_eq!(u.head, ids[i]);
            assert_eq!(u.tag, i as u64);
            assert_eq!(u.len, lens[i]);
            assert_eq!(ring.read_written(u), pattern(u.head, lens[i] as usize));
        }
        assert_positions_agree(&ring, &dev);
        assert_eq!(ring.num_free(), 8);
        assert_eq!(ring.num_inflight(), 0);
        assert_eq!((ring.total_added, ring.total_used), (3, 3));

        // Used descriptors at slots 0, 1 and 3 (chain slots 1, 2, 3).
        let w = ring.written.as_ref().unwrap();
        assert!(w.contains(&(DESC, 16)));
        assert!(w.contains(&(DESC + 16, 16)));
        assert!(w.contains(&(DESC + 48, 16)));
        assert!(w.contains(&(buf(2).0, 150)));
        assert!(w.contains(&(buf(4).0, 50)));
        assert!(w.contains(&(buf(5).0, 30)));
        assert_eq!(w.len(), 3 + 3);
    }

    #[test]
    fn id_goes_in_every_descriptor_and_flags_carry_the_lap() {
        let mem = guest();
        let (mut ring, _) = pair(&mem, 4);
        ring.start_at(encode_position(3, true), encode_position(3, true));
        let id = ring
            .add(&[seg(0, 8, false), seg(1, 8, false), seg(2, 8, true)], 7)
            .unwrap();
        let d = |pos: u64| {
            let mut raw = [0u8; 16];
            mem.read_slice(&mut raw, GuestAddress(DESC + 16 * pos))
                .unwrap();
            PackedDesc::from_bytes(&raw)
        };
        // Head at 3 in lap 1; the rest wrapped into lap 0.
        assert_eq!(d(3).flags, PACKED_F_AVAIL | DESC_F_NEXT);
        assert_eq!(d(0).flags, PACKED_F_USED | DESC_F_NEXT);
        assert_eq!(d(1).flags, PACKED_F_USED | DESC_F_WRITE);
        for p in [3, 0, 1] {
            assert_eq!(d(p).id, id);
        }
        assert_eq!(ring.avail_position(), encode_position(2, false));
        assert_eq!(ring.avail_flags_now(), PACKED_F_USED);
    }

    #[test]
    fn indirect_chains() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        let segs = [seg(0, 40, false), seg(1, 100, true), seg(2, 100, true)];
        let id0 = ring.add_indirect(&segs, 10, GuestAddress(TABLES)).unwrap();
        let id1 = ring
            .add(&[seg(3, 20, false), seg(4, 20, true)], 11)
            .unwrap();
        let id2 = ring
            .add_indirect(
                &[seg(5, 100, true), seg(6, 100, true)],
                12,
                GuestAddress(TABLES + 0x100),
            )
            .unwrap();
        assert_eq!(ring.num_free(), 8 - 4);

        let taken = dev.take_all(&mem, &ident).unwrap();
        assert_eq!(taken.len(), 3);
        assert_eq!(
            taken[0],
            PackedTaken {
                id: id0,
                slots: 1,
                indirect: true,
                segs: segs.iter().map(|s| (s.addr.0, s.len, s.write)).collect(),
            }
        );
        assert_eq!(
            (taken[1].id, taken[1].slots, taken[1].indirect),
            (id1, 2, false)
        );
        assert_eq!(
            (taken[2].id, taken[2].slots, taken[2].indirect),
            (id2, 1, true)
        );
        assert_eq!(taken[2].writable(), 200);

        complete(&mut dev, &mem, &taken[2], 150, &ident);
        complete(&mut dev, &mem, &taken[0], 200, &ident);
        complete(&mut dev, &mem, &taken[1], 20, &ident);
        let used = ring.pop_used().unwrap();
        let got: Vec<_> = used.iter().map(|u| (u.head, u.tag, u.len)).collect();
        assert_eq!(got, [(id2, 12, 150), (id0, 10, 200), (id1, 11, 20)]);
        for u in &used {
            assert_eq!(ring.read_written(u), pattern(u.head, u.len as usize));
        }
        assert_positions_agree(&ring, &dev);
        assert_eq!(ring.num_free(), 8);
    }

    /// A tiny deterministic generator, so failures reproduce.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Random traffic: chains of 1..3 segments (some indirect) added while
    /// room lasts, taken, completed in random order with random lengths,
    /// popped; checked against a model. Returns the slots made available.
    fn random_traffic(size: u16, rounds: usize, seed: u64) -> u64 {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, size);
        let mut rng = Lcg(seed);
        let mut tag = 0u64;
        let mut expect: std::collections::BTreeMap<u64, (u16, u32)> = Default::default();
        let mut device_side: Vec<PackedTaken> = Vec::new();
        let mut slots_added = 0u64;
        let mut wraps_seen = 0;
        let mut last_wrap = true;
        for _ in 0..rounds {
            // Add a few.
            for _ in 0..rng.below(4) {
                let n = 1 + rng.below(3) as usize;
                // Buffers by id: those in flight never share memory.
                let Some(next) = ring.next_id() else { break };
                let segs: Vec<Seg> = (0..n)
                    .map(|k| seg(next as u64 * 3 + k as u64, 64, k > 0 || rng.below(2) == 0))
                    .collect();
                let indirect = n > 1 && rng.below(3) == 0;
                let id = if indirect {
                    let table = GuestAddress(TABLES + 0x40 * (tag % 128));
                    ring.add_indirect(&segs, tag, table)
                } else {
                    ring.add(&segs, tag)
                };
                let Some(id) = id else { break };
                assert_eq!(id, next);
                slots_added += if indirect { 1 } else { n as u64 };
                let writable = segs.iter().filter(|s| s.write).count() as u32 * 64;
                expect.insert(tag, (id, writable));
                tag += 1;
            }
            device_side.extend(dev.take_all(&mem, &ident).unwrap());
            assert_eq!(ring.avail_position(), dev.avail_position());
            // Complete some, in random order.
            for _ in 0..rng.below(4) {
                if device_side.is_empty() {
                    break;
                }
                let t = device_side.swap_remove(rng.below(device_side.len() as u64) as usize);
                let len = rng.below(t.writable() + 1) as u32;
                complete(&mut dev, &mem, &t, len, &ident);
            }
            for u in ring.pop_used().unwrap() {
                let (id, writable) = expect.remove(&u.tag).expect("tag in flight");
                assert_eq!(u.head, id);
                assert!(u.len as u64 <= writable as u64);
                assert_eq!(ring.read_written(&u), pattern(u.head, u.len as usize));
            }
            assert_eq!(ring.used_position(), dev.used_position());
            let w = ring.avail_position() & WRAP_BIT != 0;
            if w != last_wrap {
                wraps_seen += 1;
                last_wrap = w;
            }
        }
        // Drain.
        device_side.extend(dev.take_all(&mem, &ident).unwrap());
        device_side.reverse();
        for t in device_side.drain(..) {
            complete(&mut dev, &mem, &t, 0, &ident);
        }
        for u in ring.pop_used().unwrap() {
            expect.remove(&u.tag).expect("tag in flight");
        }
        assert!(expect.is_empty(), "lost buffers: {expect:?}");
        assert_positions_agree(&ring, &dev);
        assert_eq!(ring.num_free(), size as usize);
        assert_eq!(ring.total_added, ring.total_used);
        assert!(dev.inflight_ids().is_empty());
        assert!(wraps_seen >= 4, "only {wraps_seen} wraps");
        slots_added
    }

    #[test]
    fn out_of_order_completion_across_wraps() {
        for seed in 1..=8 {
            let slots = random_traffic(8, 300, seed);
            assert!(slots > 8 * 20, "seed {seed}: {slots} slots");
        }
    }

    #[test]
    fn ring_size_not_a_power_of_two() {
        for seed in 1..=4 {
            random_traffic(5, 300, seed);
        }
    }

    #[test]
    fn positions_agree_after_reverse_completion_of_mixed_lengths() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        for round in 0..10u64 {
            // 3 + 1 + 2 + 1 slots, then completed last first.
            let a = ring.add(&[seg(0, 8, true), seg(1, 8, true), seg(2, 8, true)], 0);
            let b = ring.add(&[seg(3, 8, true)], 1);
            let c = ring.add(&[seg(4, 8, false), seg(5, 8, true)], 2);
            let d = ring.add_indirect(&[seg(6, 8, true), seg(7, 8, true)], 3, GuestAddress(TABLES));
            assert!(a.is_some() && b.is_some() && c.is_some() && d.is_some());
            assert_eq!(ring.num_free(), 1);
            assert!(ring.add(&[seg(0, 1, true), seg(0, 1, true)], 9).is_none());
            let mut taken = dev.take_all(&mem, &ident).unwrap();
            assert_eq!(taken.len(), 4);
            taken.reverse();
            for t in &taken {
                complete(&mut dev, &mem, t, 8, &ident);
            }
            let tags: Vec<_> = ring.pop_used().unwrap().iter().map(|u| u.tag).collect();
            assert_eq!(tags, [3, 2, 1, 0]);
            assert_positions_agree(&ring, &dev);
            // 7 slots a round: the used position lags nothing.
            let (pos, wrap) = decode_position(ring.avail_position());
            let total = 7 * (round + 1);
            assert_eq!(pos as u64, total % 8);
            assert_eq!(wrap, (total / 8) % 2 == 0);
        }
    }

    #[test]
    fn half_written_chain_is_not_taken() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        let (id, head, flags) = ring
            .add_deferred(&[seg(0, 8, false), seg(1, 8, true)], 5)
            .unwrap();
        assert_eq!(head, encode_position(0, true));
        assert_eq!(flags, PACKED_F_AVAIL | DESC_F_NEXT);
        assert!(dev.take_all(&mem, &ident).unwrap().is_empty());
        assert_eq!(dev.avail_position(), encode_position(0, true));
        ring.write_flags(head, flags);
        let t = dev.take_all(&mem, &ident).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].id, t[0].slots), (id, 2));
    }

    /// Completes everything available, so the ring has room again.
    fn drain(ring: &mut PackedRing, dev: &mut PackedDevice, mem: &GuestMemoryMmap) {
        for t in dev.take_all(mem, &ident).unwrap() {
            dev.push_used(mem, t.id, 0, t.slots);
        }
        ring.pop_used().unwrap();
        assert_positions_agree(ring, dev);
    }

    fn add_one(ring: &mut PackedRing) {
        ring.add(&[seg(0, 8, false)], 0).expect("room");
    }

    #[test]
    fn kick_suppression() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        ring.event_idx = true;
        dev.event_idx = true;

        // ENABLE (the zeroed area).
        add_one(&mut ring);
        assert!(ring.kick_needed());
        dev.set_device_event(&mem, EVENT_DISABLE, 0);
        add_one(&mut ring);
        assert!(!ring.kick_needed());
        drain(&mut ring, &mut dev, &mem);

        // DESC at slot 4 of lap 1; the avail position is 2 of lap 1.
        dev.set_device_event(&mem, EVENT_DESC, encode_position(4, true));
        add_one(&mut ring); // 2 -> 3
        assert!(!ring.kick_needed());
        add_one(&mut ring); // 3 -> 4
        assert!(!ring.kick_needed());
        add_one(&mut ring); // 4 -> 5: passes 4
        assert!(ring.kick_needed());
        drain(&mut ring, &mut dev, &mem);
        // take_all with DESC moved off_wrap to its avail position.
        assert_eq!(ring.device_event(), (EVENT_DESC, encode_position(5, true)));

        // Slot 1 of the next lap (wrap 0), seen from 5 of lap 1.
        dev.set_device_event(&mem, EVENT_DESC, encode_position(1, false));
        ring.add(&[seg(0, 8, false), seg(1, 8, false)], 0).unwrap(); // 5 -> 7
        assert!(!ring.kick_needed());
        ring.add(&[seg(0, 8, false), seg(1, 8, false)], 0).unwrap(); // 7 -> 1 (wrap 0)
        assert!(!ring.kick_needed());
        add_one(&mut ring); // 1 -> 2: passes 1 of lap 0
        assert!(ring.kick_needed());
        drain(&mut ring, &mut dev, &mem);
        assert_eq!(ring.avail_position(), encode_position(2, false));

        // Now in lap 0: slot 7 of lap 1 is behind, slot 3 of lap 0 ahead.
        dev.set_device_event(&mem, EVENT_DESC, encode_position(7, true));
        add_one(&mut ring); // 2 -> 3
        assert!(!ring.kick_needed());
        dev.set_device_event(&mem, EVENT_DESC, encode_position(3, false));
        add_one(&mut ring); // 3 -> 4: passes 3
        assert!(ring.kick_needed());
        // A chain crossing the end, event in the lap before: 6 of lap 0.
        drain(&mut ring, &mut dev, &mem);
        dev.set_device_event(&mem, EVENT_DESC, encode_position(6, false));
        ring.add(&[seg(0, 8, false), seg(1, 8, false)], 0).unwrap(); // 4 -> 6
        assert!(!ring.kick_needed());
        ring.add(&[seg(0, 8, false), seg(1, 8, false), seg(2, 8, false)], 0)
            .unwrap(); // 6 -> 1 (wrap 1): passes 6 of lap 0
        assert!(ring.kick_needed());
        assert_eq!(ring.avail_position(), encode_position(1, true));

        // Without EVENT_IDX, DESC is taken as ENABLE.
        ring.event_idx = false;
        drain(&mut ring, &mut dev, &mem);
        dev.set_device_event(&mem, EVENT_DESC, encode_position(7, false));
        add_one(&mut ring);
        assert!(ring.kick_needed());
    }

    #[test]
    fn take_all_rearms_the_kick() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        ring.event_idx = true;
        dev.event_idx = true;
        dev.set_device_event(&mem, EVENT_DESC, encode_position(0, true));
        add_one(&mut ring);
        assert!(ring.kick_needed());
        assert_eq!(dev.take_all(&mem, &ident).unwrap().len(), 1);
        assert_eq!(dev.driver_event(&mem), (EVENT_ENABLE, 0));
        assert_eq!(ring.device_event().1, encode_position(1, true));
        add_one(&mut ring);
        assert!(ring.kick_needed());
        add_one(&mut ring);
        assert!(!ring.kick_needed());
    }

    #[test]
    fn interrupt_suppression() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        ring.event_idx = true;
        dev.event_idx = true;
        let mut pending: Vec<PackedTaken> = Vec::new();
        let mut refill = |ring: &mut PackedRing, dev: &mut PackedDevice| {
            while ring.add(&[seg(0, 8, true)], 0).is_some() {}
            pending.extend(dev.take_all(&mem, &ident).unwrap());
            pending.remove(0)
        };

        // ENABLE, then DISABLE.
        let t = refill(&mut ring, &mut dev);
        dev.push_used(&mem, t.id, 0, 1);
        assert!(dev.interrupt_needed(&mem));
        ring.set_driver_event(EVENT_DISABLE, 0);
        let t = refill(&mut ring, &mut dev);
        dev.push_used(&mem, t.id, 0, 1);
        assert!(!dev.interrupt_needed(&mem));
        assert_eq!(ring.pop_used().unwrap().len(), 2);

        // DESC at 4 of lap 1; used position 2 of lap 1.
        ring.set_driver_event(EVENT_DESC, encode_position(4, true));
        for (want, _) in [(false, 2), (false, 3), (true, 4)] {
            let t = refill(&mut ring, &mut dev);
            dev.push_used(&mem, t.id, 0, 1);
            assert_eq!(
                dev.interrupt_needed(&mem),
                want,
                "{:#x}",
                dev.used_position()
            );
        }
        // pop_used with DESC moves off_wrap to its used position.
        assert_eq!(ring.pop_used().unwrap().len(), 3);
        assert_eq!(
            dev.driver_event(&mem),
            (EVENT_DESC, encode_position(5, true))
        );
        let t = refill(&mut ring, &mut dev);
        dev.push_used(&mem, t.id, 0, 1);
        assert!(dev.interrupt_needed(&mem));
        ring.pop_used().unwrap();

        // 1 of lap 0, seen from 6 of lap 1.
        ring.set_driver_event(EVENT_DESC, encode_position(1, false));
        for (want, at) in [(false, 7), (false, 0), (false, 1), (true, 2)] {
            let t = refill(&mut ring, &mut dev);
            dev.push_used(&mem, t.id, 0, 1);
            assert_eq!(dev.interrupt_needed(&mem), want, "at {at}");
        }
        ring.pop_used().unwrap();
        assert_eq!(dev.used_position(), encode_position(2, false));

        // In lap 0: 6 of lap 1 is behind; two at once crossing the end
        // from 6 of lap 0 pass 7 of lap 0.
        ring.set_driver_event(EVENT_DESC, encode_position(6, true));
        let t = refill(&mut ring, &mut dev);
        dev.push_used(&mem, t.id, 0, 1); // 2 -> 3
        assert!(!dev.interrupt_needed(&mem));
        ring.pop_used().unwrap();
        for _ in 3..6 {
            let t = refill(&mut ring, &mut dev);
            dev.push_used(&mem, t.id, 0, 1);
        }
        ring.set_driver_event(EVENT_DESC, encode_position(7, false));
        assert!(!dev.interrupt_needed(&mem)); // 3 -> 6
        let t1 = refill(&mut ring, &mut dev);
        let t2 = refill(&mut ring, &mut dev);
        dev.push_used(&mem, t1.id, 0, 1);
        dev.push_used(&mem, t2.id, 0, 1); // 6 -> 0 (lap 1)
        assert_eq!(dev.used_position(), encode_position(0, true));
        assert!(dev.interrupt_needed(&mem));
        // Off_wrap at 7 of lap 0 is behind now, also for QEMU's offsets.
        let t = refill(&mut ring, &mut dev);
        dev.push_used(&mem, t.id, 0, 1);
        assert!(!dev.interrupt_needed(&mem));
        ring.pop_used().unwrap();
    }

    #[test]
    fn first_interrupt_after_start_is_unconditional_with_desc() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        dev.event_idx = true;
        ring.set_driver_event(EVENT_DESC, encode_position(6, true));
        for _ in 0..2 {
            ring.add(&[seg(0, 8, true)], 0).unwrap();
        }
        let t = dev.take_all(&mem, &ident).unwrap();
        dev.push_used(&mem, t[0].id, 0, 1);
        assert!(dev.interrupt_needed(&mem));
        dev.push_used(&mem, t[1].id, 0, 1);
        assert!(!dev.interrupt_needed(&mem));
        dev.start_at(dev.avail_position(), dev.used_position());
        assert!(dev.interrupt_needed(&mem));
        // Without EVENT_IDX, DESC means ENABLE.
        dev.event_idx = false;
        assert!(dev.interrupt_needed(&mem));
    }

    #[test]
    fn pop_used_rejects_an_id_not_in_flight() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        let id = ring.add(&[seg(0, 64, true)], 1).unwrap();
        let t = dev.take_all(&mem, &ident).unwrap();
        assert_eq!(t[0].id, id);
        dev.push_used(&mem, 5, 0, 1);
        let err = ring.pop_used().unwrap_err();
        assert!(
            err.contains("id 5") && err.contains("not in flight"),
            "{err}"
        );
        assert_eq!(ring.used_position(), encode_position(0, true));
        assert_eq!(ring.num_inflight(), 1);

        // A duplicate of one already popped.
        let (mut ring, mut dev) = pair(&mem, 8);
        let id = ring.add(&[seg(0, 64, true)], 1).unwrap();
        dev.take_all(&mem, &ident).unwrap();
        dev.push_used(&mem, id, 0, 1);
        dev.push_used(&mem, id, 0, 1);
        let err = ring.pop_used().unwrap_err();
        assert!(err.contains("not in flight"), "{err}");
        assert_eq!(ring.used_position(), encode_position(1, true));

        let (mut ring, mut dev) = pair(&mem, 8);
        ring.add(&[seg(0, 64, true)], 1).unwrap();
        dev.take_all(&mem, &ident).unwrap();
        dev.push_used(&mem, 300, 0, 1);
        let err = ring.pop_used().unwrap_err();
        assert!(err.contains("id 300"), "{err}");
    }

    #[test]
    fn pop_used_rejects_len_past_the_writable_bytes() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        let id = ring
            .add(&[seg(0, 64, false), seg(1, 100, true), seg(2, 28, true)], 1)
            .unwrap();
        let t = dev.take_all(&mem, &ident).unwrap();
        assert_eq!(t[0].writable(), 128);
        dev.push_used(&mem, id, 129, 3);
        let err = ring.pop_used().unwrap_err();
        assert!(err.contains("len 129 > 128"), "{err}");
        assert_eq!(ring.num_inflight(), 1);
        assert_eq!(ring.used_position(), encode_position(0, true));
    }

    #[test]
    fn malformed_rings_are_rejected() {
        let mem = guest();
        let avail = PACKED_F_AVAIL;

        // Every slot chained to the next: longer than the ring.
        let (ring, mut dev) = pair(&mem, 8);
        for pos in (0..8).rev() {
            ring.write_desc(pos, buf(0).0, 8, 0, avail | DESC_F_NEXT);
        }
        let err = dev.take_all(&mem, &ident).unwrap_err();
        assert!(err.contains("longer than the ring"), "{err}");
        assert_eq!(dev.avail_position(), encode_position(0, true));

        // A chain of exactly the ring's size is fine.
        let (ring, mut dev) = pair(&mem, 8);
        for pos in (0..8).rev() {
            let next = if pos < 7 { DESC_F_NEXT } else { 0 };
            ring.write_desc(pos, buf(0).0, 8, 3, avail | next);
        }
        let t = dev.take_all(&mem, &ident).unwrap();
        assert_eq!((t.len(), t[0].slots, t[0].id), (1, 8, 3));
        assert_eq!(dev.avail_position(), encode_position(0, false));

        // Nested INDIRECT.
        let (ring, mut dev) = pair(&mem, 8);
        let entry = PackedDesc {
            addr: TABLES + 0x100,
            len: 16,
            id: 0,
            flags: DESC_F_INDIRECT,
        };
        mem.write_slice(&entry.to_bytes(), GuestAddress(TABLES))
            .unwrap();
        ring.write_desc(0, TABLES, 16, 0, avail | DESC_F_INDIRECT);
        let err = dev.take_all(&mem, &ident).unwrap_err();
        assert!(err.contains("nested INDIRECT"), "{err}");

        // INDIRECT with NEXT; a table length that is no whole descriptor;
        // a table outside memory.
        for (len, flags, addr, what) in [
            (
                16,
                DESC_F_INDIRECT | DESC_F_NEXT,
                TABLES,
                "INDIRECT and NEXT",
            ),
            (24, DESC_F_INDIRECT, TABLES, "multiple of 16"),
            (0, DESC_F_INDIRECT, TABLES, "multiple of 16"),
            (16 * 9, DESC_F_INDIRECT, TABLES, "longer than the ring"),
            (32, DESC_F_INDIRECT, 0x10_0000 - 16, "outside memory"),
        ] {
            let (ring, mut dev) = pair(&mem, 8);
            ring.write_desc(0, addr, len, 0, avail | flags);
            let err = dev.take_all(&mem, &ident).unwrap_err();
            assert!(err.contains(what), "{what}: {err}");
        }

        // Reusing an id still in flight.
        let (ring, mut dev) = pair(&mem, 8);
        ring.write_desc(1, buf(0).0, 8, 2, avail);
        ring.write_desc(0, buf(0).0, 8, 2, avail);
        let err = dev.take_all(&mem, &ident).unwrap_err();
        assert!(err.contains("id 2 which is still in flight"), "{err}");
        assert_eq!(dev.avail_position(), encode_position(1, true));

        // The table's NEXT flags are ignored; its entries are used in order.
        let (ring, mut dev) = pair(&mem, 8);
        for (i, f) in [DESC_F_NEXT, 0, DESC_F_WRITE | DESC_F_NEXT]
            .iter()
            .enumerate()
        {
            let e = PackedDesc {
                addr: buf(i as u64).0,
                len: 8,
                id: 0,
                flags: *f,
            };
            mem.write_slice(&e.to_bytes(), GuestAddress(TABLES + 16 * i as u64))
                .unwrap();
        }
        // The indirect descriptor's own WRITE flag means nothing.
        ring.write_desc(0, TABLES, 48, 4, avail | DESC_F_INDIRECT | DESC_F_WRITE);
        let t = dev.take_all(&mem, &ident).unwrap();
        assert_eq!(
            t[0].segs,
            [
                (buf(0).0, 8, false),
                (buf(1).0, 8, false),
                (buf(2).0, 8, true)
            ]
        );
    }

    #[test]
    fn direct_descriptors_then_an_indirect_one() {
        // DPDK accepts a chain ending in an INDIRECT descriptor.
        let mem = guest();
        let (ring, mut dev) = pair(&mem, 8);
        let e = PackedDesc {
            addr: buf(1).0,
            len: 32,
            id: 0,
            flags: DESC_F_WRITE,
        };
        mem.write_slice(&e.to_bytes(), GuestAddress(TABLES))
            .unwrap();
        ring.write_desc(1, TABLES, 16, 6, PACKED_F_AVAIL | DESC_F_INDIRECT);
        ring.write_desc(0, buf(0).0, 8, 6, PACKED_F_AVAIL | DESC_F_NEXT);
        let t = dev.take_all(&mem, &ident).unwrap();
        assert_eq!(
            t[0],
            PackedTaken {
                id: 6,
                slots: 2,
                indirect: true,
                segs: vec![(buf(0).0, 8, false), (buf(1).0, 32, true)],
            }
        );
    }

    #[test]
    fn device_reads_the_id_from_the_last_descriptor() {
        let mem = guest();
        let (ring, mut dev) = pair(&mem, 8);
        ring.write_desc(1, buf(1).0, 8, 4, PACKED_F_AVAIL);
        ring.write_desc(0, buf(0).0, 8, 9, PACKED_F_AVAIL | DESC_F_NEXT);
        let t = dev.take_all(&mem, &ident).unwrap();
        assert_eq!((t[0].id, t[0].slots), (4, 2));
    }

    #[test]
    fn start_at_continues_a_ring_in_either_lap() {
        let mem = guest();
        for start in [encode_position(5, false), encode_position(7, true)] {
            let (mut ring, mut dev) = pair(&mem, 8);
            ring.start_at(start, start);
            dev.start_at(start, start);
            // Zeroed memory at wrap 0 would look used everywhere.
            assert!(ring.pop_used().unwrap().is_empty());
            assert!(dev.take_all(&mem, &ident).unwrap().is_empty());
            for round in 0..12u64 {
                let a = ring
                    .add(&[seg(0, 8, false), seg(1, 16, true)], round)
                    .unwrap();
                let b = ring.add(&[seg(2, 16, true)], round + 100).unwrap();
                let t = dev.take_all(&mem, &ident).unwrap();
                assert_eq!(t.iter().map(|t| t.id).collect::<Vec<_>>(), [a, b]);
                complete(&mut dev, &mem, &t[1], 16, &ident);
                complete(&mut dev, &mem, &t[0], 5, &ident);
                let u = ring.pop_used().unwrap();
                assert_eq!((u[0].tag, u[1].tag), (round + 100, round));
                assert_positions_agree(&ring, &dev);
            }
        }
    }

    #[test]
    fn device_start_at_with_buffers_taken_elsewhere() {
        let mem = guest();
        let (mut ring, mut dev) = pair(&mem, 8);
        let a = ring.add(&[seg(0, 8, true), seg(1, 8, true)], 1).unwrap();
        let b = ring.add(&[seg(2, 8, true)], 2).unwrap();
        let t = dev.take_all(&mem, &ident).unwrap();
        // A new device continues: both taken, none used.
        let mut dev2 = PackedDevice::new(8, DESC, DRIVER, DEVICE);
        dev2.start_at(dev.avail_position(), dev.used_position());
        assert!(dev2.take_all(&mem, &ident).unwrap().is_empty());
        dev2.push_used(&mem, b, 8, t[1].slots);
        dev2.push_used(&mem, a, 16, t[0].slots);
        let tags: Vec<_> = ring.pop_used().unwrap().iter().map(|u| u.tag).collect();
        assert_eq!(tags, [2, 1]);
        assert_positions_agree(&ring, &dev2);
    }

    #[test]
    fn mmap_region_as_ring_memory() {
        // The same mapping seen as guest memory at GPA BASE (by the
        // driver) and as a plain region addressed by offset (by the
        // device), as a shadow ring in an mmap would be.
        const BASE: u64 = 0x40_0000;
        let region: MmapRegion = MmapRegion::new(0x10000).expect("mmap");
        let gr = GuestRegionMmap::new(region, GuestAddress(BASE)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![gr]).unwrap();
        let region: &MmapRegion = mem.find_region(GuestAddress(BASE)).unwrap();
        let gpa = |off: u64| GuestAddress(BASE + off);
        let to_off = |a: u64| a - BASE;
        let s = |off: u64, len: u32, write: bool| Seg {
            addr: gpa(off),
            len,
            write,
        };

        let mut ring = PackedRing::new(&mem, 8, gpa(0x100), gpa(0x200), gpa(0x204));
        let mut dev = PackedDevice::new(8, 0x100, 0x200, 0x204);
        ring.event_idx = true;
        dev.event_idx = true;
        for round in 0..5u64 {
            let direct = ring
                .add(&[s(0x1000, 16, false), s(0x2000, 64, true)], round)
                .unwrap();
            let ind = ring
                .add_indirect(
                    &[s(0x3000, 32, true), s(0x4000, 32, true)],
                    round + 10,
                    gpa(0x800),
                )
                .unwrap();
            let t = dev.take_all(region, &to_off).unwrap();
            assert_eq!(t.len(), 2);
            assert_eq!(t[0].segs[1], (BASE + 0x2000, 64, true));
            assert_eq!((t[1].id, t[1].slots, t[1].indirect), (ind, 1, true));
            complete(&mut dev, region, &t[1], 40, &to_off);
            complete(&mut dev, region, &t[0], 64, &to_off);
            let u = ring.pop_used().unwrap();
            assert_eq!((u[0].head, u[1].head), (ind, direct));
            assert_eq!(ring.read_written(&u[0]), pattern(ind, 40));
            assert_eq!(ring.read_written(&u[1]), pattern(direct, 64));
            assert_positions_agree(&ring, &dev);
        }
        // The event areas through the region's accessors.
        ring.set_driver_event(EVENT_DESC, 0x8003);
        assert_eq!(dev.driver_event(region), (EVENT_DESC, 0x8003));
        dev.set_device_event(region, EVENT_DISABLE, 0x0005);
        assert_eq!(ring.device_event(), (EVENT_DISABLE, 0x0005));
    }

    #[test]
    fn mmap_region_accessors() {
        let region: MmapRegion = MmapRegion::new(0x10000).expect("mmap");
        region.store_u16(0x10, 0xbeef);
        assert_eq!(region.load_u16(0x10), 0xbeef);
        let mut b = [0u8; 2];
        region.read(0x10, &mut b);
        assert_eq!(b, [0xef, 0xbe]);
        region.write(0x20, &[1, 2, 3]);
        let mut c = [0u8; 3];
        region.read(0x20, &mut c);
        assert_eq!(c, [1, 2, 3]);
        assert!(region.contains(0xfff0, 16));
        assert!(!region.contains(0xfff0, 17));
        assert!(!region.contains(u64::MAX, 2));
    }

    #[test]
    fn position_encoding() {
        assert_eq!(encode_position(5, true), 0x8005);
        assert_eq!(decode_position(0x8005), (5, true));
        assert_eq!(decode_position(7), (7, false));
        assert_eq!(advance(8, 7, true, 1), (0, false));
        assert_eq!(advance(5, 3, false, 4), (2, true));
        assert_eq!(packed_ring_bytes(256), (4096, 4, 4));
    }
}
