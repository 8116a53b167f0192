//! A small, independent split-virtqueue DRIVER (the guest side): lays out
//! desc/avail/used in guest memory, posts chains, reads used entries.
//! Deliberately does not share code with the svq crate.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// The virtio "need event" test (EVENT_IDX): has `new` moved past `event`
/// since `old`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One buffer segment of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

/// A completed chain as read from the used ring.
#[derive(Clone, Debug)]
pub struct Used {
    pub head: u16,
    pub len: u32,
    pub tag: u64,
    pub segs: Vec<Seg>,
}

#[derive(Clone, Debug)]
struct InFlight {
    descs: Vec<u16>,
    segs: Vec<Seg>,
    tag: u64,
    writable: u64,
}

pub struct SplitRing {
    mem: GuestMemoryMmap,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    free: Vec<u16>,
    /// Next avail index the driver will publish (free-running, wraps at 2^16).
    pub avail_idx: u16,
    /// Used index up to which the driver has consumed entries.
    pub last_used: u16,
    inflight: Vec<Option<InFlight>>,
    pub total_added: u64,
    pub total_used: u64,
    /// VIRTIO_F_RING_EVENT_IDX negotiated: kicks and interrupts are
    /// suppressed through avail_event / used_event.
    pub event_idx: bool,
    /// Avail index at the last kick decision.
    kicked_idx: u16,
    /// With EVENT_IDX: ask for an interrupt only every this many entries
    /// (0 or 1: every entry).
    pub irq_batch: u16,
    /// Used entries sure to come, as of the next pop_used (None: every
    /// chain in flight, as for TX; RX buffers wait for frames).
    pub coming: Option<usize>,
    /// When set, every guest range the device wrote and the driver saw in
    /// a used entry (written bytes of the chain, the used entry, used idx)
    /// is appended as `(gpa, len)`: what a dirty log must cover.
    pub written: Option<Vec<(u64, u64)>>,
}

/// Zero the three parts of a ring, `(address, bytes)` each.
pub fn zero_ring(mem: &GuestMemoryMmap, parts: [(GuestAddress, u64); 3]) {
    for (addr, len) in parts {
        mem.write_slice(&vec![0u8; len as usize], addr)
            .expect("zero ring");
    }
}

/// Bytes needed by the three parts of a split ring of `size` entries.
pub fn ring_bytes(size: u16) -> (u64, u64, u64) {
    let n = size as u64;
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

impl SplitRing {
    /// A ring of `size` entries at the given (already allocated) addresses.
    /// Zeroes the ring memory.
    pub fn new(
        mem: &GuestMemoryMmap,
        size: u16,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    ) -> SplitRing {
        assert!(size.is_power_of_two());
        let (d, a, u) = ring_bytes(size);
        zero_ring(mem, [(desc, d), (avail, a), (used, u)]);
        SplitRing {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            // Pop from the end: hand out 0, 1, 2, ... first.
            free: (0..size).rev().collect(),
            avail_idx: 0,
            last_used: 0,
            inflight: vec![None; size as usize],
            total_added: 0,
            total_used: 0,
            event_idx: false,
            kicked_idx: 0,
            irq_batch: 0,
            coming: None,
            written: None,
        }
    }

    /// The guest memory the ring lives in.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_inflight(&self) -> usize {
        self.inflight.iter().filter(|e| e.is_some()).count()
    }

    /// Tags of the chains made available and not yet seen in the used ring.
    pub fn inflight_tags(&self) -> Vec<u64> {
        self.inflight.iter().flatten().map(|f| f.tag).collect()
    }

    /// Writes one raw descriptor (for building deliberately broken rings).
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.desc.0 + 16 * (i as u64);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(base))
            .expect("write desc");
    }

    /// Puts `head` into the next avail slot without any bookkeeping (for
    /// broken rings). Call `publish` afterwards.
    pub fn push_avail_raw(&mut self, head: u16) {
        let slot = self.avail.0 + 4 + 2 * (self.avail_idx % self.size) as u64;
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("write avail slot");
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// The head the next `add` or `add_indirect` will use, if any is free.
    pub fn next_head(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Continues the ring at index `base` (as after a hand-over): the
    /// avail and used indexes in memory and the driver's own.
    pub fn start_at(&mut self, base: u16) {
        self.avail_idx = base;
        self.last_used = base;
        self.kicked_idx = base;
        for idx in [self.avail.0 + 2, self.used.0 + 2] {
            self.mem
                .write_obj(base.to_le(), GuestAddress(idx))
                .expect("write ring index");
        }
    }

    /// The device's avail_event (EVENT_IDX: kick once avail idx passes it).
    pub fn avail_event(&self) -> u16 {
        let slot = GuestAddress(self.used.0 + 4 + 8 * self.size as u64);
        self.mem
            .load(slot, Ordering::Acquire)
            .expect("load avail_event")
    }

    /// Writes used_event (EVENT_IDX: interrupt once used idx passes it).
    pub fn set_used_event(&self, v: u16) {
        let slot = GuestAddress(self.avail.0 + 4 + 2 * self.size as u64);
        self.mem
            .store(v.to_le(), slot, Ordering::Release)
            .expect("store used_event");
    }

    /// Writes the avail ring's flags (bit 0: VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem
            .store(flags.to_le(), self.avail, Ordering::Release)
            .expect("store avail flags");
    }

    /// Up to `max` used entries as `(id, len)`, without checking them
    /// against what was made available (for rings built with
    /// `write_desc` / `push_avail_raw`).
    pub fn take_used_raw(&mut self, max: u16) -> Vec<(u16, u32)> {
        let idx = self.device_used_idx();
        // The entries must be read after the index.
        fence(Ordering::SeqCst);
        let mut out = Vec::new();
        while self.last_used != idx && out.len() < usize::from(max) {
            let (id, len) = self.used_entry(self.last_used);
            out.push((id as u16, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Adds a chain and writes its head into the avail ring (not yet
    /// published). Returns the head, or None if there are not enough free
    /// descriptors.
    pub fn add(&mut self, segs: &[Seg], tag: u64) -> Option<u16> {
        assert!(!segs.is_empty());
        if self.free.len() < segs.len() {
            return None;
        }
        let descs: Vec<u16> = (0..segs.len())
            .map(|_| self.free.pop().expect("checked"))
            .collect();
        for (i, seg) in segs.iter().enumerate() {
            let more = i + 1 < segs.len();
            let mut flags = if seg.write { DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if more {
                flags |= DESC_F_NEXT;
                next = descs[i + 1];
            }
            self.write_desc(descs[i], seg.addr.0, seg.len, flags, next);
        }
        let head = descs[0];
        self.made_available(head, descs, segs, tag);
        Some(head)
    }

    /// Adds a chain as one INDIRECT descriptor whose table (16 bytes per
    /// segment) is written at `table`.
    pub fn add_indirect(&mut self, segs: &[Seg], tag: u64, table: GuestAddress) -> Option<u16> {
        assert!(!segs.is_empty());
        let head = self.free.pop()?;
        for (i, seg) in segs.iter().enumerate() {
            let more = i + 1 < segs.len();
            let mut flags = if seg.write { DESC_F_WRITE } else { 0 };
            if more {
                flags |= DESC_F_NEXT;
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&seg.addr.0.to_le_bytes());
            raw[8..12].copy_from_slice(&seg.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(if more { i as u16 + 1 } else { 0 }).to_le_bytes());
            self.mem
                .write_slice(&raw, GuestAddress(table.0 + 16 * i as u64))
                .expect("write indirect table");
        }
        self.write_desc(head, table.0, 16 * segs.len() as u32, DESC_F_INDIRECT, 0);
        self.made_available(head, vec![head], segs, tag);
        Some(head)
    }

    /// Books chain `head` (occupying `descs`) as in flight and puts it in
    /// the avail ring.
    fn made_available(&mut self, head: u16, descs: Vec<u16>, segs: &[Seg], tag: u64) {
        let writable = segs.iter().filter(|s| s.write).map(|s| s.len as u64).sum();
        assert!(self.inflight[head as usize].is_none());
        self.inflight[head as usize] = Some(InFlight {
            descs,
            segs: segs.to_vec(),
            tag,
            writable,
        });
        self.push_avail_raw(head);
        self.total_added += 1;
    }

    /// Publishes and returns whether the device wants a kick (always true
    /// without EVENT_IDX: the driver kicks unconditionally then).
    pub fn publish_and_check_kick(&mut self) -> bool {
        self.publish();
        let old = self.kicked_idx;
        self.kicked_idx = self.avail_idx;
        if !self.event_idx {
            return true;
        }
        let slot = GuestAddress(self.used.0 + 4 + 8 * self.size as u64);
        let avail_event: u16 = self.mem.load(slot, Ordering::Acquire).expect("avail_event");
        need_event(avail_event, self.avail_idx, old)
    }

    /// Makes everything added so far visible to the device.
    pub fn publish(&self) {
        // The descriptors and avail slots must be visible before the index.
        fence(Ordering::SeqCst);
        self.mem
            .store(
                self.avail_idx,
                self.avail.0.checked_add(2).map(GuestAddress).unwrap(),
                Ordering::Release,
            )
            .expect("store avail idx");
        fence(Ordering::SeqCst);
    }

    /// The device's used index as currently in memory.
    pub fn device_used_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .expect("load used idx")
    }

    /// The used ring's flags (bit 0: VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        self.mem
            .load(self.used, Ordering::Acquire)
            .expect("load used flags")
    }

    /// Consumes all new used entries, validating each against what the
    /// driver made available. An Err describes a device bug.
    pub fn pop_used(&mut self) -> Result<Vec<Used>, String> {
        let mut out = Vec::new();
        loop {
            self.pop_used_once(&mut out)?;
            if !self.event_idx {
                return Ok(out);
            }
            // Ask for an interrupt after the next `ahead + 1` entries, never
            // more than are sure to come; then look again: an entry written
            // before the device saw used_event gets no interrupt.
            let sure = match self.coming {
                Some(n) => n.saturating_sub(out.len()),
                None => self.num_inflight(),
            };
            let ahead = (self.irq_batch as usize).min(sure).saturating_sub(1) as u16;
            let slot = GuestAddress(self.avail.0 + 4 + 2 * self.size as u64);
            self.mem
                .store(self.last_used.wrapping_add(ahead), slot, Ordering::Release)
                .expect("store used_event");
            fence(Ordering::SeqCst);
            if self.device_used_idx() == self.last_used {
                return Ok(out);
            }
        }
    }

    fn pop_used_once(&mut self, out: &mut Vec<Used>) -> Result<(), String> {
        let used_idx = self.device_used_idx();
        let pending = used_idx.wrapping_sub(self.last_used);
        let inflight = self.num_inflight();
        if pending as usize > inflight {
            return Err(format!(
                "used idx {} jumped {} entries past {} but only {} chains are in flight",
                used_idx, pending, self.last_used, inflight
            ));
        }
        // The entries must be read after the index.
        fence(Ordering::SeqCst);
        while self.last_used != used_idx {
            let slot = self.used_slot(self.last_used);
            let (id, len) = self.used_entry(self.last_used);
            if id >= self.size as u32 {
                return Err(format!(
                    "used entry {} has id {} >= ring size {}",
                    self.last_used, id, self.size
                ));
            }
            let Some(f) = self.inflight[id as usize].take() else {
                return Err(format!(
                    "used entry {} has id {} which is not in flight (duplicate or never made available)",
                    self.last_used, id
                ));
            };
            if len as u64 > f.writable {
                return Err(format!(
                    "used entry {} (id {}) has len {} > {} writable bytes",
                    self.last_used, id, len, f.writable
                ));
            }
            self.free.extend(f.descs.iter().rev());
            if let Some(w) = self.written.as_mut() {
                w.push((slot, 8));
                w.push((self.used.0 + 2, 2));
                let mut left = len as u64;
                for sg in f.segs.iter().filter(|sg| sg.write) {
                    if left == 0 {
                        break;
                    }
                    let n = left.min(sg.len as u64);
                    w.push((sg.addr.0, n));
                    left -= n;
                }
            }
            out.push(Used {
                head: id as u16,
                len,
                tag: f.tag,
                segs: f.segs,
            });
            self.last_used = self.last_used.wrapping_add(1);
            self.total_used += 1;
        }
        Ok(())
    }

    /// Guest address of the used ring entry at position `pos`.
    fn used_slot(&self, pos: u16) -> u64 {
        self.used.0 + 4 + 8 * (pos % self.size) as u64
    }

    /// The used ring entry at position `pos`: (id, len).
    fn used_entry(&self, pos: u16) -> (u32, u32) {
        let slot = self.used_slot(pos);
        let id: u32 = self.mem.read_obj(GuestAddress(slot)).expect("read used id");
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(slot + 4))
            .expect("read used len");
        (u32::from_le(id), u32::from_le(len))
    }

    /// Reads the bytes of the written part of a completed chain (`len` bytes
    /// over its writable segments).
    pub fn read_written(&self, used: &Used) -> Vec<u8> {
        read_written(&self.mem, used)
    }
}

/// The written part of a completed chain: `used.len` bytes over its
/// writable segments, read from `mem` (split and packed drivers alike).
pub fn read_written(mem: &GuestMemoryMmap, used: &Used) -> Vec<u8> {
    let mut out = Vec::with_capacity(used.len as usize);
    let mut left = used.len as usize;
    for s in used.segs.iter().filter(|s| s.write) {
        if left == 0 {
            break;
        }
        let n = left.min(s.len as usize);
        let mut buf = vec![0u8; n];
        mem.read_slice(&mut buf, s.addr).expect("read buffer");
        out.extend_from_slice(&buf);
        left -= n;
    }
    out
}

/// Waits until at least one of the eventfds `fds` is readable, at most
/// `timeout_ms`. Returns which ones were readable (their counters drained).
pub fn wait_eventfds(fds: &[std::os::fd::RawFd], timeout_ms: i32) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid, exclusively borrowed array of pollfd of the
    // length passed; poll only writes the revents fields.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if rc <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter()
        .map(|p| {
            let ready = p.revents & libc::POLLIN != 0;
            if ready {
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a local u64 from an eventfd the
                // caller keeps open for the duration of this call.
                unsafe { libc::read(p.fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
            }
            ready
        })
        .collect()
}
