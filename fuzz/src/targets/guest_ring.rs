//! `guest-ring` and `device-used`: one shadow virtqueue (split ring) between
//! a scripted guest and a scripted device, in guarded memory.
//!
//! `guest-ring` scripts a hostile guest (any descriptor, index, flag or
//! indirect table, addresses near region edges) against a correct device:
//! the queue may break only with a guest-side error. `device-used` scripts
//! a correct guest driver against a hostile device (used ids not in
//! flight, lengths past the writable bytes, duplicate completions, a used
//! index running ahead): the queue may break only with a device-side
//! error, and the guest must never see a completion it did not post.
//!
//! In both, after every call: the in-flight log saw a consistent life for
//! every head, each used entry the guest sees is the head the log
//! completed with the length the device reported, every page marked dirty
//! is guest memory; at the end: nothing outside the used rings changed,
//! `stop` accounts for every chain, and a second queue on the same memory
//! still relays.

use std::cell::RefCell;
use std::collections::HashMap;

use iova::IovaTree;
use svq::{GuestRing, RingIndexes, ShadowVirtqueue, SvqConfig, SvqError};

use super::ring_env::{
    in_guest, CheckingLog, GuestView, Memory, ShadowDevice, INDIRECT, MAX_QUEUE, NEXT, WRITE,
};
use crate::engine::Target;
use crate::input::{Reader, Writer};
use crate::rng::Rng;

const F_INDIRECT: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

/// Where queue 1 (the neighbour) lives: region C, out of reach of the
/// guest's raw writes.
const NB: GuestRing = GuestRing {
    desc: 0x4_0000,
    avail: 0x4_0100,
    used: 0x4_0200,
    used_log: 0x4_0200,
};
const NB_BUF: u64 = 0x4_0400;
const NB_END: u64 = 0x4_0800;
const NB_SIZE: u16 = 8;
/// Indirect tables of queue 0's guest.
const TABLES: u64 = 0x8000;
/// Buffer area of the well-behaved guest: crosses the A/B edge at 0x10000.
const BUF_LO: u64 = 0x3000;
const BUF_HI: u64 = 0x2_0000;
const EDGES: [u64; 6] = [0, 0x1_0000, 0x2_0000, 0x4_0000, 0x4_4000, 1 << 32];

pub struct GuestRingTarget {
    hostile_device: bool,
    mem: Memory,
}

impl GuestRingTarget {
    pub fn new(hostile_device: bool) -> Result<Self, String> {
        Ok(GuestRingTarget {
            hostile_device,
            mem: Memory::new(2)?,
        })
    }
}

fn used_len(q: u16) -> u64 {
    6 + 8 * u64::from(q)
}

/// Queue 0's ring placement for `sel`: ordinary, straddling the A/B edge,
/// the used ring flush with the end of region C, or anywhere.
fn placement(sel: u8, q: u16, raw: u64) -> GuestRing {
    let q64 = u64::from(q);
    let r = match sel % 8 {
        1 => {
            let desc = 0x1_0000 - 8 * q64;
            GuestRing {
                desc,
                avail: desc + 16 * q64,
                used: 0x1_1000,
                used_log: 0,
            }
        }
        2 => GuestRing {
            desc: 0x1_0000,
            avail: 0x1_1000,
            used: (0x4_4000 - used_len(q)) & !3,
            used_log: 0,
        },
        3 => GuestRing {
            desc: raw & 0x2_ffff & !15,
            avail: (raw >> 20) & 0x2_ffff & !1,
            used: (raw >> 40) & 0x2_ffff & !3,
            used_log: 0,
        },
        _ => GuestRing {
            desc: 0,
            avail: 0x1000,
            used: 0x2000,
            used_log: 0,
        },
    };
    GuestRing {
        used_log: r.used,
        ..r
    }
}

fn device_side(e: &SvqError) -> bool {
    matches!(
        e,
        SvqError::UsedIdxTooFarAhead { .. }
            | SvqError::BadUsedId { .. }
            | SvqError::UsedIdNotInFlight { .. }
            | SvqError::UsedLenTooBig { .. }
    )
}

fn guest_side(e: &SvqError) -> bool {
    !device_side(e)
        && !matches!(
            e,
            SvqError::ShadowAccess { .. }
                | SvqError::ShadowTranslation { .. }
                | SvqError::InvalidDeviceBase { .. }
                | SvqError::Stopped
                | SvqError::ShadowMemory(_)
        )
}

/// A guest chain the driver posted, as it remembers it.
struct Posted {
    descs: Vec<u16>,
    writable: u64,
}

/// One case's queue 0 and everything that watches it.
struct Harness<'a> {
    svq: ShadowVirtqueue,
    dev: ShadowDevice,
    log: CheckingLog,
    view: GuestView,
    tree: &'a IovaTree,
    ring: GuestRing,
    q: u16,
    /// Guest avail idx as the guest last wrote it.
    avail_idx: u16,
    /// Guest used idx as the guest last read it.
    seen_used: u16,
    /// Used lengths the device reported, in the order the SVQ consumes them.
    reported: std::collections::VecDeque<u32>,
    broken: Option<SvqError>,
    hostile_device: bool,
    /// The driver's outstanding heads (device-used only).
    posted: HashMap<u16, Posted>,
    free: Vec<u16>,
    /// Shadow ids the device completed, for duplicate completions.
    completed_ids: Vec<u32>,
    /// The guest wrote over its own used ring.
    used_tampered: bool,
}

type R = Result<(), String>;

impl Harness<'_> {
    /// Record an SVQ result; a failure the scripted side cannot cause is
    /// the SVQ's bug.
    fn outcome<T>(&mut self, what: &str, r: Result<T, SvqError>) -> Result<Option<T>, String> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                if let Some(prev) = &self.broken {
                    if *prev != e {
                        return Err(format!("{what}: broken queue changed error {prev} -> {e}"));
                    }
                    return Ok(None);
                }
                let allowed = if self.hostile_device {
                    device_side(&e)
                        || matches!(
                            e,
                            SvqError::NeedIndirect { .. } | SvqError::TooManySegments { .. }
                        )
                } else {
                    guest_side(&e)
                };
                if !allowed {
                    return Err(format!("{what}: queue broke with {e:?}"));
                }
                self.broken = Some(e);
                Ok(None)
            }
        }
    }

    fn kick(&mut self) -> R {
        let r = self.svq.handle_guest_kick(&self.view.mem, self.tree);
        self.outcome("kick", r)?;
        self.take()?;
        self.check()
    }

    fn take(&mut self) -> R {
        self.dev
            .take_all(self.tree)
            .map(|_| ())
            .map_err(|e| format!("device: {e}"))
    }

    fn call(&mut self) -> R {
        let bad = RefCell::new(None);
        let mark = |gpa: u64, len: u64| {
            if !in_guest(gpa, len) || len == 0 {
                bad.borrow_mut()
                    .get_or_insert(format!("dirty mark {gpa:#x}+{len:#x} is not guest memory"));
            }
        };
        let r = self
            .svq
            .handle_device_call(&self.view.mem, self.tree, &mark);
        if let Some(e) = bad.into_inner() {
            return Err(e);
        }
        self.outcome("device call", r)?;
        self.take()?;
        self.check()
    }

    /// Complete `n` taken chains correctly, in an order from `r`.
    fn complete_well(&mut self, r: &mut Reader, n: usize) -> R {
        for _ in 0..n.min(self.dev.taken.len()) {
            let i = usize::from(r.u8()) % self.dev.taken.len();
            let t = self.dev.taken.remove(i);
            let w = t.writable().min(u64::from(u32::MAX)) as u32;
            let len = match r.u8() % 3 {
                0 => w,
                1 => 0,
                _ => r.u32() % w.saturating_add(1).max(1),
            };
            self.dev.push_used(u32::from(t.head), len)?;
            self.reported.push_back(len);
        }
        self.dev.publish_used(self.dev.used_idx)
    }

    /// The log and the guest used ring agree, and the guest saw only heads
    /// it posted.
    fn check(&mut self) -> R {
        if let Some(v) = self.log.take_violation() {
            return Err(v);
        }
        let q = u64::from(self.q);
        for (head, idx) in self.log.take_completed() {
            let at = self.ring.used + 4 + 8 * (u64::from(idx.wrapping_sub(1)) % q);
            let (id, len) = (self.view.read_u32(at), self.view.read_u32(at + 4));
            if id != u32::from(head) {
                return Err(format!(
                    "used idx {idx}: guest sees id {id}, log completed {head}"
                ));
            }
            // A hostile device that publishes a used index past what it
            // wrote makes the SVQ consume stale entries the harness never
            // reported; their ids are checked above, their lengths against
            // the writable bytes in `reap`.
            match self.reported.pop_front() {
                _ if self.hostile_device => {}
                Some(l) if l == len => {}
                other => {
                    return Err(format!(
                        "used idx {idx}: guest sees len {len}, device reported {other:?}"
                    ))
                }
            }
        }
        if self.hostile_device {
            self.reap()?;
        }
        Ok(())
    }

    /// The driver's side of completions (device-used only).
    fn reap(&mut self) -> R {
        let q = u64::from(self.q);
        let used = self.view.read_u16(self.ring.used + 2);
        if used.wrapping_sub(self.seen_used) > self.q {
            return Err(format!(
                "guest used idx jumped from {} to {used}",
                self.seen_used
            ));
        }
        while self.seen_used != used {
            let at = self.ring.used + 4 + 8 * (u64::from(self.seen_used) % q);
            let (id, len) = (self.view.read_u32(at), self.view.read_u32(at + 4));
            let Some(p) = u16::try_from(id).ok().and_then(|h| self.posted.remove(&h)) else {
                return Err(format!(
                    "guest sees a used entry for head {id}, not outstanding"
                ));
            };
            if u64::from(len) > p.writable {
                return Err(format!(
                    "guest sees len {len} for head {id} with {} writable bytes",
                    p.writable
                ));
            }
            self.free.extend(p.descs);
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        Ok(())
    }

    /// Every write of the guest's: one over its own used ring takes away
    /// the check that the ring's used idx is the SVQ's.
    fn guest_write(&mut self, gpa: u64, b: &[u8]) {
        let (lo, hi) = (self.ring.used, self.ring.used + used_len(self.q));
        self.used_tampered |= gpa < hi && gpa.saturating_add(b.len() as u64) > lo;
        self.view.write(gpa, b);
    }

    fn write_u16(&mut self, gpa: u64, v: u16) {
        self.guest_write(gpa, &v.to_le_bytes());
    }

    fn write_desc(&mut self, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        self.guest_write(table + 16 * i, &b);
    }

    fn push_avail(&mut self, head: u16) {
        let slot = self.ring.avail + 4 + 2 * (u64::from(self.avail_idx) % u64::from(self.q));
        self.write_u16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_u16(self.ring.avail + 2, self.avail_idx);
    }

    /// One step of the hostile guest against the correct device.
    fn hostile_guest_op(&mut self, r: &mut Reader) -> R {
        let q = u64::from(self.q);
        match r.u8() % 8 {
            0 | 1 => {
                let op = r.u8();
                let i = u64::from(r.u16());
                let (addr, len, flags, next) = (gpa_near(r), r.u32(), r.u16(), r.u16());
                let (table, i) = if op & 1 == 0 {
                    (self.ring.desc, i % q)
                } else {
                    (TABLES, i % 256)
                };
                let len = if op & 2 == 0 { len % 0x2000 } else { len };
                self.write_desc(table, i, addr, len, flags, next);
            }
            2 => {
                let h = r.u16();
                self.push_avail(if h & 0x8000 == 0 { h % self.q } else { h });
            }
            3 => {
                self.avail_idx = r.u16();
                self.write_u16(self.ring.avail + 2, self.avail_idx);
            }
            4 => self.kick()?,
            5 => {
                let n = usize::from(r.u8() % 8);
                self.complete_well(r, n)?;
                self.call()?;
            }
            6 => {
                let gpa = u64::from(r.u32()) % 0x4_4000;
                let n = usize::from(r.u8() % 32);
                let b = r.bytes(n);
                let end = gpa + b.len() as u64;
                if end <= NB.desc || gpa >= NB_END {
                    self.guest_write(gpa, b);
                }
            }
            _ => {
                let v = r.u16();
                match r.u8() % 3 {
                    0 => self.write_u16(self.ring.avail, v),
                    1 => self.write_u16(self.ring.avail + 4 + 2 * q, v),
                    _ => self.write_u16(self.ring.used, v),
                }
            }
        }
        Ok(())
    }

    /// One step of the correct driver against the hostile device.
    fn hostile_device_op(&mut self, r: &mut Reader) -> R {
        match r.u8() % 6 {
            0 | 1 => self.post(r),
            2 => self.kick()?,
            3 => {
                let n = usize::from(r.u8() % 8);
                for _ in 0..n {
                    self.bad_used(r)?;
                }
            }
            4 => {
                let idx = match r.u8() % 4 {
                    0 => self.dev.used_idx.wrapping_add(r.u16()),
                    1 => self.dev.used_idx.wrapping_sub(1),
                    _ => self.dev.used_idx,
                };
                self.dev.publish_used(idx)?;
            }
            _ => self.call()?,
        }
        Ok(())
    }

    fn bad_used(&mut self, r: &mut Reader) -> R {
        let sel = r.u8();
        let (id, writable) = match sel % 4 {
            0 | 1 if !self.dev.taken.is_empty() => {
                let t = self
                    .dev
                    .taken
                    .remove(usize::from(r.u8()) % self.dev.taken.len());
                (u32::from(t.head), t.writable())
            }
            2 if !self.completed_ids.is_empty() => {
                let i = usize::from(r.u8()) % self.completed_ids.len();
                (self.completed_ids[i], 0)
            }
            _ => (r.u32() % (u32::from(self.dev.size) * 2), 0),
        };
        self.dev.taken.retain(|t| u32::from(t.head) != id);
        let w = writable.min(u64::from(u32::MAX)) as u32;
        let len = match (sel >> 2) % 4 {
            0 => w,
            1 => w.wrapping_add(1),
            2 => r.u32(),
            _ => r.u32() % w.saturating_add(1).max(1),
        };
        self.completed_ids.push(id);
        self.dev.push_used(id, len)?;
        self.reported.push_back(len);
        Ok(())
    }

    /// Post a valid chain of 1-4 buffers, direct or indirect.
    fn post(&mut self, r: &mut Reader) {
        let n = 1 + usize::from(r.u8() % 4);
        // The spec bounds an indirect table by the queue size.
        let indirect = self.svq.config().guest_features & F_INDIRECT != 0
            && r.u8().is_multiple_of(3)
            && n <= usize::from(self.q);
        let first_write = usize::from(r.u8()) % (n + 1);
        let mut bufs = Vec::new();
        for k in 0..n {
            let len = u64::from(r.u16() % 0x1800);
            let addr = BUF_LO + u64::from(r.u32()) % (BUF_HI - BUF_LO - len);
            bufs.push((addr, len as u32, k >= first_write));
        }
        let writable = bufs.iter().filter(|b| b.2).map(|b| u64::from(b.1)).sum();
        let need = if indirect { 1 } else { n };
        if self.free.len() < need {
            return;
        }
        let descs: Vec<u16> = self.free.split_off(self.free.len() - need);
        let head = descs[0];
        if indirect {
            let table = TABLES + 0x40 * u64::from(head);
            for (k, &(a, l, w)) in bufs.iter().enumerate() {
                let more = if k + 1 < n { NEXT } else { 0 };
                let flags = more | if w { WRITE } else { 0 };
                self.write_desc(table, k as u64, a, l, flags, k as u16 + 1);
            }
            self.write_desc(
                self.ring.desc,
                u64::from(head),
                table,
                16 * n as u32,
                INDIRECT,
                0,
            );
        } else {
            for (k, &(a, l, w)) in bufs.iter().enumerate() {
                let more = if k + 1 < n { NEXT } else { 0 };
                let flags = more | if w { WRITE } else { 0 };
                let next = descs.get(k + 1).copied().unwrap_or(0);
                self.write_desc(self.ring.desc, u64::from(descs[k]), a, l, flags, next);
            }
        }
        self.posted.insert(head, Posted { descs, writable });
        self.push_avail(head);
    }

    /// Drain what a correct device would, then stop and account for every
    /// chain.
    fn finish(&mut self) -> R {
        if self.broken.is_none() {
            self.take()?;
            let n = self.dev.taken.len();
            let mut order = Reader::new(&[]);
            self.complete_well(&mut order, n)?;
            self.call()?;
        }
        let base = self.dev.last_avail;
        let stop = self
            .svq
            .stop(&self.view.mem, base)
            .map_err(|e| format!("stop at device base {base}: {e}"))?;
        if let Some(v) = self.log.take_violation() {
            return Err(v);
        }
        let mut logged: Vec<u16> = self.log.in_flight().into_iter().collect();
        let mut stopped = stop.in_flight.clone();
        logged.sort_unstable();
        stopped.sort_unstable();
        if logged != stopped {
            return Err(format!(
                "stop says {stopped:?} in flight, the log {logged:?}"
            ));
        }
        let i = stop.indexes;
        if usize::from(i.avail.wrapping_sub(i.used)) != stop.in_flight.len() {
            return Err(format!(
                "stop: avail {} used {} with {} in flight",
                i.avail,
                i.used,
                stop.in_flight.len()
            ));
        }
        let guest_used = self.view.read_u16(self.ring.used + 2);
        let visible = in_guest(self.ring.used, used_len(self.q));
        if i.used != guest_used && visible && !self.used_tampered {
            return Err(format!(
                "stop: used {} but the guest ring says {guest_used}",
                i.used
            ));
        }
        if self.hostile_device {
            self.reap()?;
        }
        Ok(())
    }
}

/// A guest address: anywhere, in the buffer area, or within 32 bytes of a
/// region edge.
fn gpa_near(r: &mut Reader) -> u64 {
    let (sel, v) = (r.u8(), r.u64());
    match sel % 4 {
        0 => v,
        1 => BUF_LO + v % (BUF_HI - BUF_LO),
        2 => EDGES[(v % 6) as usize]
            .wrapping_add((v >> 8) % 64)
            .wrapping_sub(32),
        _ => TABLES + 16 * (v % 256),
    }
}

/// Queue 1 must still relay a chain after whatever queue 0 went through.
fn neighbour_relays(
    view: &mut GuestView,
    tree: &IovaTree,
    shadow: std::sync::Arc<vm_memory::MmapRegion>,
) -> R {
    let cfg = SvqConfig {
        queue_size: NB_SIZE,
        shadow_size: NB_SIZE,
        guest_features: F_VERSION_1,
        device_features: F_VERSION_1,
    };
    let mut svq = ShadowVirtqueue::with_shadow_memory(cfg, NB, RingIndexes::default(), shadow)
        .map_err(|e| format!("neighbour: {e}"))?;
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&NB_BUF.to_le_bytes());
    d[8..12].copy_from_slice(&64u32.to_le_bytes());
    d[12..14].copy_from_slice(&WRITE.to_le_bytes());
    view.write(NB.desc, &d);
    view.write_u16(NB.avail + 4, 0);
    view.write_u16(NB.avail + 2, 1);
    let e = |e: SvqError| format!("neighbour queue: {e}");
    svq.handle_guest_kick(&view.mem, tree).map_err(e)?;
    let mut dev = ShadowDevice::new(&svq);
    dev.take_all(tree)?;
    let t = dev.taken.pop().ok_or("neighbour chain not relayed")?;
    if t.segs.len() != 1 || t.segs[0].gpa != NB_BUF || t.segs[0].len != 64 {
        return Err(format!("neighbour chain relayed as {:?}", t.segs));
    }
    dev.push_used(u32::from(t.head), 64)?;
    dev.publish_used(1)?;
    svq.handle_device_call(&view.mem, tree, &svq::NoDirtyLog)
        .map_err(e)?;
    let (idx, id, len) = (
        view.read_u16(NB.used + 2),
        view.read_u32(NB.used + 4),
        view.read_u32(NB.used + 8),
    );
    if (idx, id, len) != (1, 0, 64) {
        return Err(format!("neighbour used ring: idx {idx} id {id} len {len}"));
    }
    Ok(())
}

impl Target for GuestRingTarget {
    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(rng.below(9) as u8)
            .u8(rng.below(9) as u8)
            .u8(rng.next_u64() as u8)
            .u8(if rng.one_in(3) { rng.below(4) as u8 } else { 0 })
            .u64(rng.next_u64())
            .u16(if rng.one_in(2) {
                0
            } else {
                rng.next_u64() as u16
            });
        if self.hostile_device {
            for _ in 0..rng.range(4, 60) {
                let op = *rng.pick(&[0u8, 0, 1, 2, 3, 4, 5, 5]);
                w.u8(op).bytes(&rng.bytes(12));
            }
            return w.0;
        }
        // A correct driver's chains as raw writes, with a little garbage.
        let q = 1u16 << (w.0[0] % 9);
        let mut next_desc = 0u16;
        for _ in 0..rng.range(1, 12) {
            let n = rng.range(1, 4) as u16;
            let head = next_desc % q;
            for k in 0..n {
                let i = (next_desc + k) % q;
                let flags = if k + 1 < n { NEXT } else { 0 } | if k + 1 == n { WRITE } else { 0 };
                w.u8(0).u8(0).u16(i).u8(1).u64(rng.next_u64());
                w.u32(rng.range(1, 0x1000) as u32)
                    .u16(flags)
                    .u16((i + 1) % q);
            }
            next_desc = next_desc.wrapping_add(n);
            w.u8(2).u16(head);
            if rng.one_in(2) {
                w.u8(4);
            }
            if rng.one_in(3) {
                w.u8(5).u8(rng.below(8) as u8).bytes(&rng.bytes(16));
            }
            if rng.one_in(6) {
                let junk = rng.bytes(24);
                w.u8(rng.below(8) as u8).bytes(&junk);
            }
        }
        w.u8(4);
        w.0
    }

    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(input);
        let q = 1u16 << (r.u8() % 9);
        let s = (1u16 << (r.u8() % 9)).min(MAX_QUEUE);
        let f = r.u8();
        let feat = |b: u8, bit: u64| if f & b != 0 { bit } else { 0 };
        let cfg = SvqConfig {
            queue_size: q,
            shadow_size: s,
            guest_features: F_VERSION_1 | feat(1, F_EVENT_IDX) | feat(2, F_INDIRECT),
            device_features: F_VERSION_1 | feat(4, F_EVENT_IDX) | feat(8, F_INDIRECT),
        };
        let sel = r.u8();
        let ring = placement(if self.hostile_device { sel & 2 } else { sel }, q, r.u64());
        let start = r.u16();
        let (mem, shadows, tree) = self.mem.fresh()?;
        let indexes = RingIndexes {
            avail: start,
            used: start,
        };
        let mut svq =
            match ShadowVirtqueue::with_shadow_memory(cfg, ring, indexes, shadows[0].clone()) {
                Ok(s) => s,
                Err(SvqError::MisalignedRing { .. }) => return Ok(()),
                Err(e) => return Err(format!("new queue: {e}")),
            };
        let log = CheckingLog::default();
        svq.set_inflight_log(Box::new(log.clone()));
        let mut view = GuestView::new(mem);
        view.allow(ring.used, used_len(q));
        view.allow(NB.used, used_len(NB_SIZE));
        // The guest's indexes start where the queue does.
        view.write_u16(ring.avail + 2, start);
        view.write_u16(ring.used + 2, start);
        let dev = ShadowDevice::new(&svq);
        let mut h = Harness {
            svq,
            dev,
            log,
            view,
            tree: &tree,
            ring,
            q,
            avail_idx: start,
            seen_used: start,
            reported: Default::default(),
            broken: None,
            hostile_device: self.hostile_device,
            posted: HashMap::new(),
            free: (0..q).rev().collect(),
            completed_ids: Vec::new(),
            used_tampered: false,
        };
        h.dev.strict = !self.hostile_device;
        let mut steps = 0;
        while !r.is_empty() && steps < 512 {
            if self.hostile_device {
                h.hostile_device_op(&mut r)?;
            } else {
                h.hostile_guest_op(&mut r)?;
            }
            steps += 1;
        }
        h.finish()?;
        let mut view = h.view;
        neighbour_relays(&mut view, &tree, shadows[1].clone())?;
        view.check_untouched()
    }

    fn max_len(&self) -> usize {
        2048
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::ring_env::REGIONS;

    #[test]
    fn generated_cases_pass_and_some_relay() {
        for hostile in [false, true] {
            let mut t = GuestRingTarget::new(hostile).unwrap();
            let mut rng = Rng::new(7);
            for _ in 0..200 {
                let input = t.generate(&mut rng);
                t.run(&input).unwrap();
            }
        }
    }

    #[test]
    fn a_placement_flush_with_region_end_stays_inside() {
        for q in [1u16, 8, 256] {
            let r = placement(2, q, 0);
            assert!(in_guest(r.used, used_len(q)), "q {q}");
            assert!(REGIONS[2].0 + REGIONS[2].1 as u64 - (r.used + used_len(q)) < 4);
        }
    }
}
