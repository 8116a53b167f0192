//! The packed-ring layout of the INFLIGHT_SHMFD region, as DPDK's
//! lib/vhost implements it (`rte_vhost_inflight_info_packed` in
//! rte_vhost.h; `rte_vhost_set_inflight_desc_packed`,
//! `rte_vhost_set_last_inflight_io_packed`, `rte_vhost_clr_inflight_desc_packed`
//! in vhost.c; the initialization in `vhost_user_get_inflight_fd` and the
//! recovery in `vhost_check_queue_inflights_packed`, vhost_user.c). One
//! queue's region:
//!
//! ```text
//! header (32 bytes)
//!   0 features: u64      8 version: u16     10 desc_num: u16
//!  12 free_head: u16    14 old_free_head: u16
//!  16 used_idx: u16     18 old_used_idx: u16
//!  20 used_wrap_counter: u8  21 old_used_wrap_counter: u8  22 padding[10]
//! desc[desc_num] (32 bytes each)
//!   0 inflight: u8   1 padding  2 next: u16  4 last: u16  6 num: u16
//!   8 counter: u64  16 id: u16  18 flags: u16  20 len: u32  24 addr: u64
//! ```
//!
//! rounded up to 64 bytes per queue. The entries are a pool, not the ring:
//! a chain taken from the guest is copied descriptor by descriptor into
//! entries taken from the free list (`free_head`, linked by `next`), so
//! that it can be walked after a restart although the device has written
//! used descriptors over its ring slots since. The first entry is the
//! chain's head: `inflight`, `num` (descriptors), `last` (its last entry),
//! `counter` (the order the chains were taken in). `used_idx` and its wrap
//! counter follow the guest's used position; the `old_` fields are the
//! state before the completion in progress.
//!
//! Where this differs from DPDK, and why:
//! - Taking a chain sets `inflight` after the copy, not before: a crash
//!   in the middle leaves no half-copied chain to resubmit (the chain was
//!   never placed for the device, and the guest still has it).
//! - The used position (used_idx, old_used_idx and both wrap counters,
//!   bytes 16..24) is stored with one 8-byte atomic write, so a crash never
//!   leaves a used_idx from one step with a wrap counter from another.
//! - Recovery decides whether an interrupted completion reached the guest
//!   from the guest ring itself (is the descriptor at the old used position
//!   used, with that chain's id?). DPDK looks at `desc[old_used_idx]`, an
//!   entry of the pool indexed by a ring position, which says nothing
//!   about that completion; the entry being completed is `free_head` (the
//!   completion put it there first).
//! - Recovery rebuilds the free list from the entries no chain in flight
//!   holds, so a list torn by a crash (or garbage) never hands out an entry
//!   twice; every index read from the region is checked before use.

use packed_ring::{Pos, F_USED};
use svq::RingDesc;

use super::inflight_region::{InflightError, INFLIGHT_VERSION};
use super::mapping::Window;

pub(super) const HEADER: usize = 32;
pub(super) const DESC: usize = 32;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_FREE_HEAD: usize = 12;
const OFF_OLD_FREE_HEAD: usize = 14;
/// used_idx, old_used_idx, used_wrap_counter, old_used_wrap_counter and
/// two bytes of padding: one aligned u64.
const OFF_POSITIONS: usize = 16;

const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 2;
const D_LAST: usize = 4;
const D_NUM: usize = 6;
const D_COUNTER: usize = 8;
const D_ID: usize = 16;
const D_FLAGS: usize = 18;
const D_LEN: usize = 20;
const D_ADDR: usize = 24;

/// Bytes of one queue's region (DPDK's `get_pervq_shm_size_packed`).
pub fn packed_queue_region_size(queue_size: u16) -> u64 {
    let raw = (HEADER + DESC * usize::from(queue_size)) as u64;
    raw.div_ceil(64) * 64
}

/// A chain in flight as the region holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedChain {
    /// Its head entry in the region.
    pub entry: u16,
    pub counter: u64,
    /// Its ring descriptors, in ring order (at least one).
    pub descs: Vec<RingDesc>,
}

impl PackedChain {
    /// The buffer id its used descriptor names (the last descriptor's).
    pub fn id(&self) -> u16 {
        self.descs.last().map_or(0, |d| d.id)
    }

    /// Ring slots it occupies.
    pub fn slots(&self) -> u16 {
        self.descs.len() as u16
    }
}

/// What a restarted back-end continues from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedRecovery {
    /// The guest's used position.
    pub used: Pos,
    /// The chains in flight, oldest (lowest counter) first.
    pub chains: Vec<PackedChain>,
}

impl PackedRecovery {
    /// Where the guest avail position stands: past every chain in flight.
    pub fn avail(&self, queue_size: u16) -> Pos {
        let slots: u32 = self.chains.iter().map(|c| u32::from(c.slots())).sum();
        // recover() checked the chains fit the ring.
        self.used
            .add(slots.min(u32::from(queue_size)) as u16, queue_size)
    }

    /// One past the largest counter in flight.
    pub fn next_counter(&self) -> u64 {
        self.chains
            .iter()
            .map(|c| c.counter.saturating_add(1))
            .max()
            .unwrap_or(0)
    }
}

/// The used position fields, as stored (wrap counters unchecked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Positions {
    used_idx: u16,
    old_used_idx: u16,
    used_wrap: u8,
    old_used_wrap: u8,
}

impl Positions {
    fn of(used: Pos, old: Pos) -> Self {
        Positions {
            used_idx: used.pos,
            old_used_idx: old.pos,
            used_wrap: u8::from(used.wrap),
            old_used_wrap: u8::from(old.wrap),
        }
    }
}

/// One queue's region in the packed layout.
#[derive(Clone, Copy, Debug)]
pub struct PackedInflightQueue<'a> {
    /// Every offset used is inside the queue's region (checked geometry,
    /// entries checked < size).
    pub(super) io: Window<'a>,
    pub(super) queue: u16,
    pub(super) size: u16,
}

impl PackedInflightQueue<'_> {
    fn entry(&self, e: u16) -> usize {
        HEADER + DESC * usize::from(e)
    }

    fn positions(&self) -> Positions {
        let b = self.io.r64(OFF_POSITIONS).to_ne_bytes();
        Positions {
            used_idx: u16::from_ne_bytes([b[0], b[1]]),
            old_used_idx: u16::from_ne_bytes([b[2], b[3]]),
            used_wrap: b[4],
            old_used_wrap: b[5],
        }
    }

    /// All four fields at once: a crash leaves either the old or the new.
    fn set_positions(&self, p: Positions) {
        let u = p.used_idx.to_ne_bytes();
        let o = p.old_used_idx.to_ne_bytes();
        let word = [u[0], u[1], o[0], o[1], p.used_wrap, p.old_used_wrap, 0, 0];
        self.io.w64(OFF_POSITIONS, u64::from_ne_bytes(word));
    }

    fn corrupt(&self, what: &'static str, entry: u16) -> InflightError {
        InflightError::Corrupt {
            queue: self.queue,
            what,
            entry,
        }
    }

    fn check_entry(&self, e: u16) -> Result<(), InflightError> {
        if e >= self.size {
            return Err(InflightError::BadHead {
                queue: self.queue,
                head: e,
                size: self.size,
            });
        }
        Ok(())
    }

    pub fn version(&self) -> u16 {
        self.io.r16(OFF_VERSION)
    }

    pub fn desc_num(&self) -> u16 {
        self.io.r16(OFF_DESC_NUM)
    }

    pub fn free_head(&self) -> u16 {
        self.io.r16(OFF_FREE_HEAD)
    }

    /// The recorded used position (None: the fields are out of range).
    pub fn used(&self) -> Option<Pos> {
        let p = self.positions();
        (p.used_idx < self.size && p.used_wrap <= 1).then_some(Pos {
            pos: p.used_idx,
            wrap: p.used_wrap == 1,
        })
    }

    pub fn is_in_flight(&self, entry: u16) -> bool {
        entry < self.size && self.io.r8(self.entry(entry) + D_INFLIGHT) != 0
    }

    /// Fresh region (DPDK's GET_INFLIGHT_FD initialization): every entry
    /// free, linked in index order, both used positions at 0 with wrap
    /// counter 1. The version last: a region is in use once it has one.
    pub(super) fn init(&self) {
        self.io.w64(0, 0);
        self.io.w16(OFF_DESC_NUM, self.size);
        self.reset(Pos::START);
        self.io.w16(OFF_VERSION, INFLIGHT_VERSION);
    }

    /// Nothing in flight, the guest's used position at `used`: for a ring
    /// that starts without resubmitting (what the region holds is from an
    /// earlier period the guest has since moved past).
    pub fn reset(&self, used: Pos) {
        for e in 0..self.size {
            self.io.w8(self.entry(e) + D_INFLIGHT, 0);
        }
        self.rebuild_free_list(&[]);
        self.set_positions(Positions::of(used, used));
    }

    /// Link every entry `taken` does not hold into the free list, in
    /// index order; the last links to `desc_num` (the end, as DPDK's
    /// initialization leaves it).
    fn rebuild_free_list(&self, taken: &[bool]) {
        let mut head = self.size;
        for e in (0..self.size).rev() {
            if taken.get(usize::from(e)).copied().unwrap_or(false) {
                continue;
            }
            self.io.w16(self.entry(e) + D_NEXT, head);
            head = e;
        }
        self.io.w16(OFF_FREE_HEAD, head);
        self.io.w16(OFF_OLD_FREE_HEAD, head);
    }

    /// A chain was taken from the guest ring: copy its descriptors into
    /// free entries, then mark the head in flight with `counter`. Returns
    /// the head entry (what `completing` / `completed` / `returned` name).
    pub fn mark(&self, descs: &[RingDesc], counter: u64) -> Result<u16, InflightError> {
        let (head, rest) = self.fill(descs, counter)?;
        self.commit_mark(head, rest);
        Ok(head)
    }

    /// The copy, nothing in flight yet: the head entry and the free list
    /// after the chain's entries.
    fn fill(&self, descs: &[RingDesc], counter: u64) -> Result<(u16, u16), InflightError> {
        if descs.is_empty() || descs.len() > usize::from(self.size) {
            return Err(InflightError::ChainLength {
                queue: self.queue,
                descs: descs.len(),
                size: self.size,
            });
        }
        let head = self.free_head();
        let mut e = head;
        let mut last = head;
        for d in descs {
            if e >= self.size {
                return Err(InflightError::NoFreeEntry { queue: self.queue });
            }
            let o = self.entry(e);
            self.io.w64(o + D_ADDR, d.addr);
            self.io.w32(o + D_LEN, d.len);
            self.io.w16(o + D_ID, d.id);
            self.io.w16(o + D_FLAGS, d.flags);
            last = e;
            e = self.io.r16(o + D_NEXT);
        }
        let o = self.entry(head);
        self.io.w16(o + D_NUM, descs.len() as u16);
        self.io.w16(o + D_LAST, last);
        self.io.w64(o + D_COUNTER, counter);
        Ok((head, e))
    }

    fn commit_mark(&self, head: u16, rest: u16) {
        // Release: whoever sees inflight=1 sees the copy.
        self.io.w8(self.entry(head) + D_INFLIGHT, 1);
        self.io.w16(OFF_FREE_HEAD, rest);
        self.io.w16(OFF_OLD_FREE_HEAD, rest);
    }

    /// The head entry's chain: (num, last), checked.
    fn chain_shape(&self, entry: u16) -> Result<(u16, u16), InflightError> {
        self.check_entry(entry)?;
        if !self.is_in_flight(entry) {
            return Err(InflightError::NotInFlight {
                queue: self.queue,
                entry,
            });
        }
        let o = self.entry(entry);
        let (num, last) = (self.io.r16(o + D_NUM), self.io.r16(o + D_LAST));
        if num == 0 || num > self.size || last >= self.size {
            return Err(self.corrupt("chain length or last entry out of range", entry));
        }
        Ok((num, last))
    }

    /// Before the chain's used descriptor is written to the guest
    /// (DPDK's "last inflight io"): its entries go back to the free list
    /// (the head first in it, which recovery relies on) and the used
    /// position moves past its slots; the old position stays recorded.
    pub fn completing(&self, entry: u16) -> Result<(), InflightError> {
        let (num, last) = self.chain_shape(entry)?;
        self.link_free(entry, last);
        self.advance_used(num)
    }

    fn link_free(&self, entry: u16, last: u16) {
        self.io.w16(self.entry(last) + D_NEXT, self.free_head());
        self.io.w16(OFF_FREE_HEAD, entry);
    }

    fn advance_used(&self, num: u16) -> Result<(), InflightError> {
        let p = self.positions();
        let old = Pos {
            pos: p.old_used_idx,
            wrap: p.old_used_wrap == 1,
        };
        if old.pos >= self.size {
            return Err(self.corrupt("used position out of range", old.pos));
        }
        self.set_positions(Positions::of(old.add(num, self.size), old));
        Ok(())
    }

    /// The guest's used position covers the chain: not in flight, and the
    /// current state becomes the one a later recovery starts from.
    pub fn completed(&self, entry: u16) -> Result<(), InflightError> {
        self.check_entry(entry)?;
        self.io.w8(self.entry(entry) + D_INFLIGHT, 0);
        let p = self.positions();
        self.set_positions(Positions {
            old_used_idx: p.used_idx,
            old_used_wrap: p.used_wrap,
            ..p
        });
        self.io.w16(OFF_OLD_FREE_HEAD, self.free_head());
        Ok(())
    }

    /// The chain went back to the guest ring uncompleted: not in flight,
    /// its entries free, the used position unchanged.
    pub fn returned(&self, entry: u16) -> Result<(), InflightError> {
        let (_, last) = self.chain_shape(entry)?;
        self.io.w8(self.entry(entry) + D_INFLIGHT, 0);
        self.link_free(entry, last);
        self.io.w16(OFF_OLD_FREE_HEAD, entry);
        Ok(())
    }

    /// The chains in flight, checked: every entry index in range, no entry
    /// in two chains, `last` where the walk ends, all of them together no
    /// more descriptors than the ring has slots. Oldest first. Reads only.
    pub fn chains(&self) -> Result<Vec<PackedChain>, InflightError> {
        self.chains_taken().map(|(c, _)| c)
    }

    fn chains_taken(&self) -> Result<(Vec<PackedChain>, Vec<bool>), InflightError> {
        let size = usize::from(self.size);
        let mut taken = vec![false; size];
        let mut chains = Vec::new();
        let mut slots = 0usize;
        for head in 0..self.size {
            let flag = self.io.r8(self.entry(head) + D_INFLIGHT);
            if flag == 0 {
                continue;
            }
            if flag != 1 {
                return Err(self.corrupt("in-flight flag neither 0 nor 1", head));
            }
            let (num, last) = self.chain_shape(head)?;
            slots += usize::from(num);
            if slots > size {
                return Err(self.corrupt("more descriptors in flight than ring slots", head));
            }
            let mut descs = Vec::with_capacity(usize::from(num));
            let mut e = head;
            for k in 0..num {
                if e >= self.size {
                    return Err(self.corrupt("chain links outside the region", head));
                }
                if std::mem::replace(&mut taken[usize::from(e)], true) {
                    return Err(self.corrupt("entry in two chains", e));
                }
                let o = self.entry(e);
                descs.push(RingDesc {
                    addr: self.io.r64(o + D_ADDR),
                    len: self.io.r32(o + D_LEN),
                    id: self.io.r16(o + D_ID),
                    flags: self.io.r16(o + D_FLAGS),
                });
                if k + 1 < num {
                    e = self.io.r16(o + D_NEXT);
                }
            }
            if e != last {
                return Err(self.corrupt("chain does not end at its last entry", head));
            }
            let counter = self.io.r64(self.entry(head) + D_COUNTER);
            chains.push(PackedChain {
                entry: head,
                counter,
                descs,
            });
        }
        chains.sort_by_key(|c| (c.counter, c.entry));
        Ok((chains, taken))
    }

    /// Reconnect procedure. `guest_desc(position)` reads the guest ring's
    /// descriptor at a position: `(flags, id)`, None if unreadable. A
    /// completion that stopped between `completing` and `completed` is
    /// finished if its used descriptor reached the guest ring, undone if
    /// not; then the free list is rebuilt. Returns the used position and
    /// the chains to resubmit, oldest first. Garbage is refused with an
    /// error (the region is then only fit for [`reset`](Self::reset)).
    pub fn recover(
        &self,
        guest_desc: &dyn Fn(u16) -> Option<(u16, u16)>,
    ) -> Result<PackedRecovery, InflightError> {
        match self.version() {
            0 => return Err(InflightError::Uninitialized { queue: self.queue }),
            INFLIGHT_VERSION => {}
            version => {
                return Err(InflightError::Version {
                    queue: self.queue,
                    version,
                })
            }
        }
        if self.desc_num() != self.size {
            return Err(InflightError::DescNum {
                queue: self.queue,
                desc_num: self.desc_num(),
                queue_size: self.size,
            });
        }
        let p = self.positions();
        if p.used_idx >= self.size || p.old_used_idx >= self.size {
            return Err(self.corrupt("used position out of range", p.used_idx));
        }
        if p.used_wrap > 1 || p.old_used_wrap > 1 {
            return Err(self.corrupt("wrap counter neither 0 nor 1", p.used_idx));
        }
        let used = Pos {
            pos: p.used_idx,
            wrap: p.used_wrap == 1,
        };
        let old = Pos {
            pos: p.old_used_idx,
            wrap: p.old_used_wrap == 1,
        };
        let used = if used != old {
            self.finish_interrupted(old, used, guest_desc)?
        } else {
            used
        };
        let (chains, taken) = self.chains_taken()?;
        self.rebuild_free_list(&taken);
        Ok(PackedRecovery { used, chains })
    }

    /// `completing` ran for the chain at `free_head` and moved the used
    /// position from `old` to `used`; did its used descriptor reach the
    /// guest? Returns the used position to continue from.
    fn finish_interrupted(
        &self,
        old: Pos,
        used: Pos,
        guest_desc: &dyn Fn(u16) -> Option<(u16, u16)>,
    ) -> Result<Pos, InflightError> {
        let entry = self.free_head();
        if entry >= self.size {
            return Err(self.corrupt("interrupted completion names no entry", entry));
        }
        let done = if !self.is_in_flight(entry) {
            // `completed` cleared it and stopped before recording the
            // position: the guest has it.
            true
        } else {
            let (num, last) = self.chain_shape(entry)?;
            if old.until(used, self.size) != u32::from(num) {
                return Err(self.corrupt("interrupted completion does not match its chain", entry));
            }
            let (flags, id) = guest_desc(old.pos).ok_or(InflightError::GuestRingUnreadable {
                queue: self.queue,
                position: old.pos,
            })?;
            // Written: the USED bit equals the wrap counter of the used
            // position (the driver re-using the slot in the next lap keeps
            // it so); still the chain's available descriptor: the inverse.
            let written = (flags & F_USED != 0) == old.wrap;
            let chain_id = self.io.r16(self.entry(last) + D_ID);
            if written && id != chain_id {
                return Err(self.corrupt(
                    "guest used descriptor names another buffer than the completion",
                    entry,
                ));
            }
            if written {
                self.io.w8(self.entry(entry) + D_INFLIGHT, 0);
            }
            written
        };
        let at = if done { used } else { old };
        self.set_positions(Positions::of(at, at));
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::inflight_region::{InflightRegion, Layout};
    use hostmem::memfd;
    use std::os::unix::fs::FileExt;
    use vhost::vhost_user::message::VhostUserInflight;

    fn req(num_queues: u16, queue_size: u16) -> VhostUserInflight {
        VhostUserInflight::new(0, 0, num_queues, queue_size)
    }

    fn region(q: u16) -> (InflightRegion, VhostUserInflight, std::fs::File) {
        InflightRegion::allocate(&req(1, q), 2, 1024, Layout::Packed).unwrap()
    }

    fn d(addr: u64, len: u32, id: u16, flags: u16) -> RingDesc {
        RingDesc {
            addr,
            len,
            id,
            flags,
        }
    }

    const NEXT: u16 = 1;

    /// A guest ring of `q` slots as the recovery reads it.
    struct Ring(Vec<(u16, u16)>);

    impl Ring {
        fn new(q: u16) -> Self {
            Ring(vec![(0, 0); usize::from(q)])
        }
        /// The device wrote a used descriptor for `id` at `at`.
        fn used(&mut self, at: Pos, id: u16) {
            self.0[usize::from(at.pos)] = (at.used_flags(), id);
        }
        /// The driver made a descriptor available at `at`.
        fn avail(&mut self, at: Pos, id: u16) {
            self.0[usize::from(at.pos)] = (at.avail_flags(), id);
        }
        fn read(&self) -> impl Fn(u16) -> Option<(u16, u16)> + '_ {
            |p| self.0.get(usize::from(p)).copied()
        }
    }

    #[test]
    fn region_sizes_and_layout() {
        assert_eq!(packed_queue_region_size(1), 64);
        assert_eq!(packed_queue_region_size(2), 128); // 32 + 64 -> 128
        assert_eq!(packed_queue_region_size(256), 32 + 32 * 256 + 32);
        // DPDK: RTE_ALIGN_MUL_CEIL(32 * q + 8 + 2 * 6 + 9, 64).
        for q in [1u16, 2, 4, 8, 256, 32768] {
            let dpdk = (32 * u64::from(q) + 8 + 12 + 9).div_ceil(64) * 64;
            assert_eq!(packed_queue_region_size(q), dpdk);
        }
        let (r, reply, file) =
            InflightRegion::allocate(&req(2, 4), 2, 1024, Layout::Packed).unwrap();
        assert_eq!(reply.mmap_size, 2 * packed_queue_region_size(4));
        assert!(r.queue(0).is_none(), "no split view of a packed region");
        let q1 = r.packed_queue(1).unwrap();
        let stride = packed_queue_region_size(4);
        let mut hdr = [0u8; 32];
        file.read_exact_at(&mut hdr, stride).unwrap();
        // features 0, version 1, desc_num 4, free_head 0, old_free_head 0,
        // used_idx 0, old_used_idx 0, wrap counters 1.
        let mut want = [0u8; 32];
        want[8..12].copy_from_slice(&[1, 0, 4, 0]);
        want[20..22].copy_from_slice(&[1, 1]);
        assert_eq!(hdr, want);
        // The free list: desc[j].next = j + 1.
        for j in 0..4u64 {
            let mut next = [0u8; 2];
            file.read_exact_at(&mut next, stride + 32 + 32 * j + 2)
                .unwrap();
            assert_eq!(u16::from_ne_bytes(next), j as u16 + 1);
        }
        let e = q1
            .mark(&[d(0x1122_3344_5566_7788, 0x99aa_bbcc, 3, 0x8001)], 0x0102)
            .unwrap();
        assert_eq!(e, 0);
        let mut ent = [0u8; 32];
        file.read_exact_at(&mut ent, stride + 32).unwrap();
        let mut want = [0u8; 32];
        want[0] = 1; // inflight
        want[2..4].copy_from_slice(&1u16.to_ne_bytes()); // next (unchanged)
        want[4..6].copy_from_slice(&0u16.to_ne_bytes()); // last
        want[6..8].copy_from_slice(&1u16.to_ne_bytes()); // num
        want[8..16].copy_from_slice(&0x0102u64.to_ne_bytes());
        want[16..18].copy_from_slice(&3u16.to_ne_bytes());
        want[18..20].copy_from_slice(&0x8001u16.to_ne_bytes());
        want[20..24].copy_from_slice(&0x99aa_bbccu32.to_ne_bytes());
        want[24..32].copy_from_slice(&0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(ent, want);
        assert_eq!(q1.free_head(), 1);
        // Queue 0 untouched.
        assert!(!r.packed_queue(0).unwrap().is_in_flight(0));
    }

    #[test]
    fn chains_take_entries_from_the_free_list_and_give_them_back() {
        let (r, _, _) = region(8);
        let q = r.packed_queue(0).unwrap();
        let a = q
            .mark(&[d(0x1000, 10, 0, NEXT), d(0x2000, 20, 0, 0)], 0)
            .unwrap();
        let b = q.mark(&[d(0x3000, 30, 1, 0)], 1).unwrap();
        let c = q
            .mark(
                &[d(0x4000, 1, 5, NEXT), d(0x5000, 2, 5, NEXT), d(0, 3, 5, 0)],
                2,
            )
            .unwrap();
        assert_eq!((a, b, c, q.free_head()), (0, 2, 3, 6));
        // b completes first: its entry heads the free list, used moves 1.
        q.completing(b).unwrap();
        assert_eq!(q.free_head(), b);
        q.completed(b).unwrap();
        assert_eq!(q.used(), Some(Pos { pos: 1, wrap: true }));
        // The next chain reuses b's entry, then the old list.
        let e = q
            .mark(&[d(0x6000, 1, 1, NEXT), d(0x7000, 1, 1, 0)], 3)
            .unwrap();
        assert_eq!(e, b);
        let chains = q.chains().unwrap();
        assert_eq!(
            chains.iter().map(|c| (c.entry, c.id())).collect::<Vec<_>>(),
            [(0, 0), (3, 5), (2, 1)]
        );
        assert_eq!(chains[2].descs[1], d(0x7000, 1, 1, 0));
        // Every chain back: everything free, used past 1 + 2 + 3 + 2 slots.
        for c in &chains {
            q.completing(c.entry).unwrap();
            q.completed(c.entry).unwrap();
        }
        assert!(q.chains().unwrap().is_empty());
        assert_eq!(
            q.used(),
            Some(Pos {
                pos: 0,
                wrap: false
            })
        );
        // The list holds all 8 entries, each once.
        let mut seen = [false; 8];
        let mut e = q.free_head();
        for _ in 0..8 {
            assert!(!std::mem::replace(&mut seen[usize::from(e)], true));
            e = q.io.r16(q.entry(e) + D_NEXT);
        }
        assert!(seen.iter().all(|&s| s));
        // A ninth descriptor does not fit.
        let nine = vec![d(0, 0, 0, NEXT); 9];
        assert!(matches!(
            q.mark(&nine, 9),
            Err(InflightError::ChainLength { descs: 9, .. })
        ));
        let eight = vec![d(0, 0, 0, NEXT); 8];
        let e = q.mark(&eight, 9).unwrap();
        assert!(matches!(
            q.mark(&[d(0, 0, 1, 0)], 10),
            Err(InflightError::NoFreeEntry { .. })
        ));
        q.returned(e).unwrap();
        assert!(q.chains().unwrap().is_empty());
        assert_eq!(
            q.used(),
            Some(Pos {
                pos: 0,
                wrap: false
            })
        );
    }

    /// A region that went through `steps` of a run, then a new daemon maps
    /// it: what it resubmits, and from where.
    fn restart(file: &std::fs::File, reply: &VhostUserInflight, ring: &Ring) -> PackedRecovery {
        let r = InflightRegion::map(reply, file, 2, 1024, Layout::Packed).unwrap();
        let q = r.packed_queue(0).unwrap();
        let rec = q.recover(&ring.read()).unwrap();
        // Recovering again changes nothing.
        assert_eq!(q.recover(&ring.read()).unwrap(), rec);
        rec
    }

    fn ids(rec: &PackedRecovery) -> Vec<u16> {
        rec.chains.iter().map(PackedChain::id).collect()
    }

    /// One step of a run: may change the guest ring, says whether the
    /// guest saw the completion.
    type Step<'a> = &'a dyn Fn(&mut Ring, &mut bool);

    /// Chains a (2 slots, id 0), b (1 slot, id 1) taken; b completes. A
    /// crash at every point of b's completion recovers to either "b in
    /// flight, used at 0" or "b done, used at 1", matching the guest ring.
    #[test]
    fn a_crash_at_each_step_of_a_completion_recovers() {
        let at = |p| Pos { pos: p, wrap: true };
        for crash in 0..6 {
            let (r, reply, file) = region(4);
            let q = r.packed_queue(0).unwrap();
            let mut ring = Ring::new(4);
            ring.avail(at(0), 0);
            ring.avail(at(1), 0);
            ring.avail(at(2), 1);
            let a = q
                .mark(&[d(0x1000, 8, 0, NEXT), d(0x2000, 8, 0, 0)], 0)
                .unwrap();
            let b = q.mark(&[d(0x3000, 8, 1, 0)], 1).unwrap();
            let (num, last) = q.chain_shape(b).unwrap();
            let mut guest_saw = false;
            let steps: [Step; 5] = [
                &|_, _| q.link_free(b, last),
                &|_, _| q.advance_used(num).unwrap(),
                &|ring, saw| {
                    ring.used(at(0), 1);
                    *saw = true;
                },
                &|_, _| q.io.w8(q.entry(b) + D_INFLIGHT, 0),
                &|_, _| q.completed(b).unwrap(),
            ];
            for s in steps.iter().take(crash) {
                s(&mut ring, &mut guest_saw);
            }
            drop(r);
            let rec = restart(&file, &reply, &ring);
            if guest_saw {
                assert_eq!(ids(&rec), [0], "crash after step {crash}");
                assert_eq!(rec.used, at(1));
            } else {
                assert_eq!(ids(&rec), [0, 1], "crash after step {crash}");
                assert_eq!(rec.used, at(0));
            }
            assert_eq!(rec.avail(4), at(3), "crash after step {crash}");
            assert_eq!(rec.chains[0].entry, a);
            assert_eq!(rec.next_counter(), if guest_saw { 1 } else { 2 });
            // The rebuilt free list hands out exactly the free entries.
            let r = InflightRegion::map(&reply, &file, 2, 1024, Layout::Packed).unwrap();
            let q = r.packed_queue(0).unwrap();
            let free = 4 - rec.avail(4).pos; // 4 slots, 3 or 2 held
            let free = if guest_saw { free + 1 } else { free };
            let more = vec![d(0, 0, 3, NEXT); usize::from(free)];
            let e = q.mark(&more, 9).unwrap();
            assert!(!rec.chains.iter().any(|c| c.entry == e));
            assert!(q.mark(&[d(0, 0, 2, 0)], 10).is_err());
        }
    }

    /// A crash while a chain is being taken leaves nothing to resubmit
    /// until its head is marked; after that, the chain.
    #[test]
    fn a_crash_while_taking_a_chain_recovers() {
        for commit in [false, true] {
            let (r, reply, file) = region(4);
            let q = r.packed_queue(0).unwrap();
            let (head, rest) = q
                .fill(&[d(0x1000, 8, 2, NEXT), d(0x2000, 8, 2, 0)], 7)
                .unwrap();
            if commit {
                // inflight=1, free_head not yet moved.
                q.io.w8(q.entry(head) + D_INFLIGHT, 1);
            } else {
                let _ = rest;
            }
            drop(r);
            let rec = restart(&file, &reply, &Ring::new(4));
            assert_eq!(rec.chains.len(), usize::from(commit));
            let r = InflightRegion::map(&reply, &file, 2, 1024, Layout::Packed).unwrap();
            let q = r.packed_queue(0).unwrap();
            let e = q.mark(&[d(0, 0, 1, 0)], 8).unwrap();
            assert_eq!(e, if commit { 2 } else { 0 });
        }
    }

    /// Returned chains (stop rewound over them) are not resubmitted; the
    /// used position stays.
    #[test]
    fn returned_chains_are_free_again() {
        let (r, reply, file) = region(8);
        let q = r.packed_queue(0).unwrap();
        let a = q.mark(&[d(0x1000, 8, 4, 0)], 0).unwrap();
        let b = q.mark(&[d(0x2000, 8, 6, 0)], 1).unwrap();
        q.returned(b).unwrap();
        drop(r);
        let rec = restart(&file, &reply, &Ring::new(8));
        assert_eq!(ids(&rec), [4]);
        assert_eq!(rec.chains[0].entry, a);
        assert_eq!(rec.used, Pos::START);
    }

    #[test]
    fn reset_moves_the_position_and_forgets_the_chains() {
        let (r, _, _) = region(8);
        let q = r.packed_queue(0).unwrap();
        q.mark(&[d(0x1000, 8, 4, 0)], 0).unwrap();
        let at = Pos {
            pos: 5,
            wrap: false,
        };
        q.reset(at);
        assert_eq!(q.used(), Some(at));
        let rec = q.recover(&|_| None).unwrap();
        assert_eq!((rec.used, rec.chains.len()), (at, 0));
    }

    #[test]
    fn garbage_is_refused() {
        let (r, reply, file) = region(4);
        let q = r.packed_queue(0).unwrap();
        let a = q
            .mark(&[d(0x1000, 8, 0, NEXT), d(0x2000, 8, 0, 0)], 0)
            .unwrap();
        let base = 0u64;
        let ent = |e: u16, off: usize| base + 32 + 32 * u64::from(e) + off as u64;
        let put16 = |at: u64, v: u16| file.write_all_at(&v.to_ne_bytes(), at).unwrap();
        let ring = Ring::new(4);
        let expect = |what: &str| {
            let e = q.recover(&ring.read()).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        // A chain link out of the region.
        put16(ent(a, D_NEXT), 200);
        expect("chain links outside the region");
        // Two chains sharing an entry.
        put16(ent(a, D_NEXT), 1);
        file.write_all_at(&[1], ent(1, D_INFLIGHT)).unwrap();
        put16(ent(1, D_NUM), 1);
        put16(ent(1, D_LAST), 1);
        expect("entry in two chains");
        file.write_all_at(&[0], ent(1, D_INFLIGHT)).unwrap();
        // Wrong last, num out of range, flag not 0/1.
        put16(ent(a, D_LAST), 3);
        expect("does not end at its last entry");
        put16(ent(a, D_LAST), 1);
        put16(ent(a, D_NUM), 5);
        expect("chain length or last entry out of range");
        put16(ent(a, D_NUM), 2);
        file.write_all_at(&[9], ent(a, D_INFLIGHT)).unwrap();
        expect("neither 0 nor 1");
        file.write_all_at(&[1], ent(a, D_INFLIGHT)).unwrap();
        // Positions.
        file.write_all_at(&[2], 20).unwrap();
        expect("wrap counter");
        file.write_all_at(&[1], 20).unwrap();
        put16(16, 4);
        expect("used position out of range");
        // An interrupted completion that does not match the chain at the
        // free head, or whose ring slot cannot be read.
        put16(16, 1);
        put16(12, a);
        expect("does not match its chain");
        put16(16, 2);
        let e = q.recover(&|_| None).unwrap_err();
        assert!(
            matches!(e, InflightError::GuestRingUnreadable { .. }),
            "{e}"
        );
        let mut other = Ring::new(4);
        other.used(Pos::START, 3);
        let e = q.recover(&other.read()).unwrap_err().to_string();
        assert!(e.contains("names another buffer"), "{e}");
        put16(12, 9);
        expect("names no entry");
        // Entry operations check their arguments.
        assert!(matches!(
            q.completing(4),
            Err(InflightError::BadHead { head: 4, .. })
        ));
        assert!(matches!(
            q.completing(1),
            Err(InflightError::NotInFlight { entry: 1, .. })
        ));
        assert!(q.completed(4).is_err() && q.returned(2).is_err());
        drop(r);
        // A version or geometry the daemon does not know.
        file.write_all_at(&3u16.to_ne_bytes(), 8).unwrap();
        let e = InflightRegion::map(&reply, &file, 2, 1024, Layout::Packed).unwrap_err();
        assert!(e.to_string().contains("version 3"), "{e}");
    }

    proptest::proptest! {
        /// Whatever a crashed daemon or a hostile VMM left in the region,
        /// recovery never panics; what it accepts is chains of entries in
        /// range, each entry in one chain, that fit the ring, and a free
        /// list that hands out only the other entries.
        #[test]
        fn arbitrary_region_contents(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 320),
            flags in proptest::collection::vec(proptest::prelude::any::<(u16, u16)>(), 8),
            valid_header in proptest::prelude::any::<bool>(),
            few_in_flight in proptest::prelude::any::<bool>(),
        ) {
            let mut bytes = bytes;
            if valid_header {
                bytes[8..12].copy_from_slice(&[1, 0, 8, 0]);
                bytes[16] &= 7;
                bytes[18] &= 7;
                bytes[20] &= 1;
                bytes[21] &= 1;
            }
            if few_in_flight {
                // Make chains plausible: small num/last/next, flags 0/1.
                for e in 0..8 {
                    let o = 32 + 32 * e;
                    bytes[o] &= 1;
                    for f in [D_NEXT, D_LAST, D_NUM] {
                        bytes[o + f] &= 7;
                        bytes[o + f + 1] = 0;
                    }
                }
            }
            let file = memfd(c"t", 320).unwrap();
            file.write_all_at(&bytes, 0).unwrap();
            let msg = VhostUserInflight::new(320, 0, 1, 8);
            let Ok(r) = InflightRegion::map(&msg, &file, 2, 256, Layout::Packed) else {
                proptest::prop_assert!(!valid_header);
                return Ok(());
            };
            let q = r.packed_queue(0).unwrap();
            let ring = flags.clone();
            if let Ok(rec) = q.recover(&|p| ring.get(usize::from(p)).copied()) {
                let mut entries = Vec::new();
                let mut slots = 0;
                for c in &rec.chains {
                    proptest::prop_assert!(!c.descs.is_empty());
                    proptest::prop_assert!(c.entry < 8);
                    slots += c.descs.len();
                    entries.push(c.entry);
                }
                proptest::prop_assert!(slots <= 8);
                entries.sort_unstable();
                entries.dedup();
                proptest::prop_assert_eq!(entries.len(), rec.chains.len());
                let free = 8 - slots;
                for k in 0..free {
                    let e = q.mark(&[RingDesc::default()], 100 + k as u64);
                    proptest::prop_assert!(e.is_ok());
                }
                proptest::prop_assert!(q.mark(&[RingDesc::default()], 200).is_err());
                proptest::prop_assert!(q.recover(&|_| None).is_ok());
            }
        }
    }
}
