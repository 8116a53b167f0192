//! What the relay needs from a ring, whatever its layout: the guest ring the
//! SVQ is the device of ([`GuestQueue`], split in `guest.rs`, packed in
//! `guest_packed.rs`) and the shadow ring it is the driver of
//! ([`ShadowQueue`], split in `shadow_ring.rs`, packed in
//! `shadow_packed.rs`).
//!
//! The relay (`shadow_virtqueue`) is generic over both, so each of the four
//! pairings is compiled on its own and the split hot path is the same code
//! it was before packed rings existed.
//!
//! Positions are one u16 each: a split ring's free-running index, or a
//! packed ring's `position | wrap_counter << 15` (the vhost-user encoding
//! of GET/SET_VRING_BASE).

use std::sync::Arc;

use vm_memory::{GuestMemoryMmap, MmapRegion};

use crate::guest::GuestSeg;
use crate::memory::{ShadowLayout, ShadowMem};
use crate::shadow_ring::ShadowSeg;
use crate::{DirtyLog, GuestRing, RingDesc, RingIndexes, ShadowRingAddrs, SvqError};

/// A guest chain as the guest ring names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChainHead {
    /// What the used entry names: a split ring's head index, a packed
    /// ring's buffer id. Below the queue size.
    pub id: u16,
    /// Ring slots the chain occupies: 1 on a split ring (the avail slot),
    /// its descriptors on a packed ring (an indirect one counts 1).
    pub slots: u16,
}

/// The device side of a guest ring.
pub(crate) trait GuestQueue: Send + Sized {
    /// The ring resolved in the current guest memory, for one call.
    type View<'m>;

    fn new(
        size: u16,
        ring: GuestRing,
        start: RingIndexes,
        event_idx: bool,
    ) -> Result<Self, SvqError>;

    fn view<'m>(&self, mem: &'m GuestMemoryMmap) -> Result<Self::View<'m>, SvqError>;

    /// Position of the next chain to pop.
    fn next_avail(&self) -> u16;

    /// Position of the next used entry to write.
    fn next_used(&self) -> u16;

    /// `pending` counts every available chain (a split ring's avail idx),
    /// rather than saying whether there is one (a packed ring has to walk
    /// a chain to find the next): after relaying that many the relay goes
    /// straight to re-arming.
    const PENDING_IS_EXACT: bool;

    /// At least this many chains are available (0: none now).
    fn pending(&self, v: &Self::View<'_>) -> Result<u16, SvqError>;

    /// Walk and validate the chain at the next avail position into `out`
    /// (cleared first). Does not advance: [`advance`](Self::advance) does,
    /// once the chain is accepted.
    fn walk_next(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &Self::View<'_>,
        out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError>;

    /// Walk the chain a resubmission names by its head (split rings; a
    /// packed ring has no table to find a chain in by id).
    fn walk_head(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &Self::View<'_>,
        head: u16,
        out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError>;

    /// Walk a resubmitted chain from the copies of its ring descriptors
    /// (packed rings: the device wrote used descriptors over the ring
    /// slots since), validated as a chain on the ring is.
    fn walk_copy(
        &mut self,
        mem: &GuestMemoryMmap,
        v: &Self::View<'_>,
        descs: &[RingDesc],
        out: &mut Vec<GuestSeg>,
    ) -> Result<ChainHead, SvqError>;

    /// From now on keep a copy of the ring descriptors of each chain
    /// walked, for [`kept_descs`](Self::kept_descs). Nothing to keep on a
    /// split ring (a head names its chain).
    fn keep_descs(&mut self) {}

    /// The ring descriptors of the chain walked last, when kept; None on a
    /// split ring.
    #[inline(always)]
    fn kept_descs(&self) -> Option<&[RingDesc]> {
        None
    }

    /// Past the chain just walked.
    fn advance(&mut self, slots: u16);

    /// Back over the last `chains` chains popped, `slots` ring slots in all,
    /// so they are popped again by the next owner of the ring.
    fn rewind(&mut self, chains: u16, slots: u32);

    /// Write and publish the used entry for chain `id` of `slots` slots.
    fn add_used(&mut self, v: &Self::View<'_>, id: u16, len: u32, slots: u16);

    /// Mark the used entries (and index) written since position `old`.
    fn log_used_since(&self, old: u16, log: &dyn DirtyLog);

    /// Does the guest want an interrupt for the used entries since `old`?
    fn should_notify(&self, v: &Self::View<'_>, old: u16) -> Result<bool, SvqError>;

    /// Ask the guest to kick for its next chain; true when chains arrived
    /// meanwhile that no kick will announce.
    fn rearm(&mut self, v: &Self::View<'_>) -> Result<bool, SvqError>;

    /// The ring is polled: tell the guest not to kick.
    fn suppress_kicks(&mut self, v: &Self::View<'_>);

    /// Polling ends: ask for kicks again; true when chains arrived that no
    /// kick will announce.
    fn request_kicks(&mut self, v: &Self::View<'_>) -> Result<bool, SvqError>;

    fn kicks_suppressed(&self) -> bool;

    /// Mark the notification fields written since the last call.
    fn flush_dirty(&mut self, log: &dyn DirtyLog);
}

/// The driver side of a shadow ring.
pub(crate) trait ShadowQueue: Send + Sized {
    /// `in_order`: the device negotiated IN_ORDER, so chains use the
    /// descriptors in ring order.
    fn new(layout: ShadowLayout, device_event_idx: bool, in_order: bool) -> Result<Self, SvqError>;

    /// Moves a ring nothing has been written to yet onto other memory.
    fn use_memory(&mut self, mem: ShadowMem) -> Result<(), SvqError>;

    fn region(&self) -> &Arc<MmapRegion>;

    fn layout(&self) -> &ShadowLayout;

    /// HVAs of the descriptor ring, driver area and device area.
    fn ring_hva(&self) -> ShadowRingAddrs;

    fn table_hva(&self, table: u16) -> u64;

    /// Free descriptor slots.
    fn num_free(&self) -> u16;

    fn next_free_table(&self) -> Option<u16>;

    /// Position the next chain is placed at.
    fn avail_idx(&self) -> u16;

    /// Position of the next used entry to consume.
    fn last_used(&self) -> u16;

    /// Write a chain into free descriptors (the caller checked `num_free`);
    /// returns the id its used entry will name.
    fn add_direct(&mut self, segs: &[ShadowSeg]) -> u16;

    /// Write a chain into indirect table `table` at `table_iova` and one
    /// descriptor pointing at it.
    fn add_indirect(
        &mut self,
        segs: &[ShadowSeg],
        table: u16,
        table_iova: u64,
    ) -> Result<u16, SvqError>;

    /// Return chain `id`'s descriptors (and table) to the free lists.
    fn free_chain(&mut self, id: u16, ndescs: u16, table: Option<u16>);

    /// Make every chain placed visible to the device; whether the device
    /// wants a kick for them.
    fn publish(&mut self) -> Result<bool, SvqError>;

    /// `used_pending` counts every used entry ready (see
    /// [`GuestQueue::PENDING_IS_EXACT`]).
    const PENDING_IS_EXACT: bool;

    /// At least this many used entries are ready (0: none now); more than
    /// `in_flight` is the device's error.
    fn used_pending(&self, in_flight: usize) -> Result<u16, SvqError>;

    /// The used entry at `last_used` (id, len), and past it.
    fn pop_used(&mut self) -> (u32, u32);

    /// Past the used entry chain `id` would have had: an IN_ORDER batch
    /// completed it without naming it.
    fn skip_used(&mut self, id: u16);

    /// Ask for an interrupt at the next used entry; true when entries
    /// arrived meanwhile.
    fn rearm(&mut self) -> Result<bool, SvqError>;

    fn suppress_calls(&mut self) -> Result<(), SvqError>;

    fn request_calls(&mut self) -> Result<bool, SvqError>;

    fn calls_suppressed(&self) -> bool;

    /// The chains placed from `device_next_avail` on, the device never
    /// took them: `(position, id)` in ring order into `out`. False when
    /// `device_next_avail` is no chain boundary between the last used
    /// entry and `avail_idx`.
    fn not_taken(&self, device_next_avail: u16, out: &mut Vec<(u16, u16)>) -> bool;

    /// Forget the chains from `from` on: `avail_idx` goes back to it.
    fn unpublish_to(&mut self, from: u16);
}
