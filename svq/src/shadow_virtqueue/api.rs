//! The public face of a shadow virtqueue: [`ShadowVirtqueue`] picks the
//! relay for the negotiated ring layouts (split or packed toward the guest,
//! split or packed toward the device) and is used through [`Svq`], so one
//! type serves every pairing and each pairing's relay is compiled on its
//! own (one dynamic call per handler call, none per descriptor).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use iova::IovaTree;
use vm_memory::{GuestMemoryMmap, MmapRegion};

use super::Relay;
use crate::guest::GuestSide;
use crate::guest_packed::PackedGuest;
use crate::memory::ShadowLayout;
use crate::shadow_packed::PackedShadowRing;
use crate::shadow_ring::ShadowRing;
use crate::{
    CallOutcome, DirtyLog, GuestRing, InflightLog, RingDesc, RingIndexes, ShadowRingAddrs,
    StopState, SvqConfig, SvqError, SvqStats, F_INDIRECT_DESC, F_RING_PACKED,
};

/// What a shadow virtqueue does, whatever its ring layouts. Positions in
/// [`RingIndexes`], [`SvqStats`] and [`StopState`] are split ring indexes,
/// or `position | wrap_counter << 15` on a packed ring.
pub trait Svq: Send {
    fn config(&self) -> SvqConfig;

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
    fn set_min_writable(&mut self, bytes: u32);

    /// Report every guest head popped, completed or given back to `log`
    /// from now on (the daemon's INFLIGHT_SHMFD region).
    fn set_inflight_log(&mut self, log: Box<dyn InflightLog>);

    /// The minimum set by [`set_min_writable`](Self::set_min_writable).
    fn min_writable(&self) -> u32;

    /// Memory holding the shadow rings and indirect tables (memfd-backed,
    /// page aligned). Map it in the IOVA tree as `(AddrSpace::Host,
    /// as_ptr() as u64, size())` and DMA-map it before the first kick.
    fn shadow_memory(&self) -> Arc<MmapRegion>;

    /// Where each part lives inside `shadow_memory`.
    fn shadow_layout(&self) -> ShadowLayout;

    /// HVAs of the shadow rings; translate them with the tree for the device.
    fn shadow_ring_hva(&self) -> ShadowRingAddrs;

    fn is_broken(&self) -> bool;

    /// The error that broke the queue.
    fn broken_reason(&self) -> Option<&SvqError>;

    fn stats(&self) -> SvqStats;

    /// Guest kicked (or start / retry): pop, validate, translate and relay
    /// every available chain. `Ok(true)`: kick the device.
    fn handle_guest_kick(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError>;

    /// As `handle_guest_kick`, also reporting the guest ring fields the SVQ
    /// wrote (avail_event under EVENT_IDX, the used flags) to `log`.
    fn handle_guest_kick_logged(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
        log: &dyn DirtyLog,
    ) -> Result<bool, SvqError>;

    /// Report guest ring fields written since the last report (avail_event,
    /// the used flags).
    /// `handle_device_call` does this itself; call it before the final log
    /// sync of a migration.
    fn flush_dirty(&mut self, log: &dyn DirtyLog);

    /// The worker polls this queue from now on: tell the guest not to kick
    /// and the device not to interrupt, and stop re-arming either after
    /// each pass. Report the guest ring field written with `flush_dirty`.
    ///
    /// Polling passes are [`handle_device_call`](Self::handle_device_call)
    /// calls: each completes what the device used and relays what the
    /// guest made available, with at most one kick and one guest signal.
    fn suppress_notifications(&mut self, mem: &GuestMemoryMmap) -> Result<(), SvqError>;

    /// The worker stops polling: ask the guest for kicks and the device for
    /// interrupts again. Returns true when work arrived while they were
    /// suppressed (guest chains or device used entries no notification will
    /// announce): the caller must run a pass before it sleeps. Works on a
    /// stopped or broken queue too, so that a ring handed back to a device
    /// never keeps the guest's NO_NOTIFY.
    fn request_notifications(&mut self, mem: &GuestMemoryMmap) -> Result<bool, SvqError>;

    /// Between `suppress_notifications` and `request_notifications`.
    fn notifications_suppressed(&self) -> bool;

    /// Where the guest ring stands (next avail to pop, used idx): a poller
    /// compares it across a pass to tell whether the pass did any work.
    fn guest_position(&self) -> RingIndexes;

    /// Device signalled: consume and validate shadow used entries, log and
    /// complete them to the guest, then relay parked and newly available
    /// chains.
    fn handle_device_call(
        &mut self,
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
        log: &dyn DirtyLog,
    ) -> Result<CallOutcome, SvqError>;

    /// Stop relaying. `device_next_avail` is the device's vring base on the
    /// shadow ring after it was suspended and `handle_device_call` ran once
    /// more. Chains the device never took and parked chains are given back
    /// to the guest ring by rewinding its avail index over them, except
    /// resubmitted ones: those are not where a rewind would find them, and
    /// stay in flight (last in [`StopState::in_flight`], still in the
    /// in-flight log) for the next owner to resubmit again.
    ///
    /// Works on a broken queue too (the daemon still needs the indexes).
    /// On `InvalidDeviceBase` nothing changes and the call may be retried.
    fn stop(
        &mut self,
        mem: &GuestMemoryMmap,
        device_next_avail: u16,
    ) -> Result<StopState, SvqError>;

    /// Relay `heads` (oldest first) before any new avail entry: each chain
    /// is read from the guest descriptor table, validated and translated as
    /// a popped chain is, and completes to the guest used ring exactly once.
    /// Call it right after construction, before the first guest kick; the
    /// caller starts the queue with the guest avail index already past
    /// these heads (used idx + `heads.len()`, as libvhost-user does).
    /// `Ok(true)`: kick the device. An invalid chain breaks the queue; on a
    /// packed guest ring any head is refused
    /// ([`SvqError::ResubmitWrongLayout`]: use `resubmit_packed`).
    fn resubmit(
        &mut self,
        heads: &[u16],
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError>;

    /// As [`resubmit`](Self::resubmit) for a packed guest ring: each chain
    /// is given as the copies of its ring descriptors the in-flight region
    /// kept ([`InflightLog::popped_packed`]), since the device has written
    /// used descriptors over the ring slots since. The copies are checked
    /// as descriptors read from the ring are (guest memory, indirect
    /// tables, buffer id below the queue size and not in flight twice),
    /// and all chains together must fit between the start positions: the
    /// caller starts the queue with avail at the used position plus their
    /// slots. On a split guest ring any chain is refused
    /// ([`SvqError::ResubmitWrongLayout`]). With an in-flight log, each
    /// chain is reported again with `popped_packed` and its copies.
    fn resubmit_packed(
        &mut self,
        chains: &[Vec<RingDesc>],
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError>;
}

/// One shadow virtqueue; its operations are [`Svq`]'s.
pub struct ShadowVirtqueue(Box<dyn Svq>);

impl ShadowVirtqueue {
    /// A queue relaying `guest` from the positions in `start`. The guest
    /// ring is packed when `cfg.guest_features` has VIRTIO_F_RING_PACKED,
    /// the shadow ring when `cfg.device_features` has it. The shadow ring
    /// starts at its beginning: give the device vring base 0 for a split
    /// ring, `0x8000_8000` (both wrap counters 1) for a packed one.
    pub fn new(cfg: SvqConfig, guest: GuestRing, start: RingIndexes) -> Result<Self, SvqError> {
        Self::build(cfg, guest, start, None)
    }

    /// As [`new`](Self::new), with the shadow rings and indirect tables in
    /// memory the caller provides: at least [`shadow_memory_size`] bytes at
    /// a page-aligned address, not used by anything else while the queue
    /// lives. [`Svq::shadow_memory`] then returns `memory`.
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

    /// Bytes of shadow memory a queue with `cfg` needs (the same for both
    /// layouts: the split ring's parts are the larger).
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
        let guest_packed = cfg.guest_features & F_RING_PACKED != 0;
        let shadow_packed = cfg.device_features & F_RING_PACKED != 0;
        let relay: Box<dyn Svq> = match (guest_packed, shadow_packed) {
            (false, false) => Box::new(Relay::<GuestSide, ShadowRing>::build(
                cfg, guest, start, memory,
            )?),
            (false, true) => Box::new(Relay::<GuestSide, PackedShadowRing>::build(
                cfg, guest, start, memory,
            )?),
            (true, false) => Box::new(Relay::<PackedGuest, ShadowRing>::build(
                cfg, guest, start, memory,
            )?),
            (true, true) => Box::new(Relay::<PackedGuest, PackedShadowRing>::build(
                cfg, guest, start, memory,
            )?),
        };
        Ok(ShadowVirtqueue(relay))
    }
}

impl Deref for ShadowVirtqueue {
    type Target = dyn Svq;

    fn deref(&self) -> &(dyn Svq + 'static) {
        self.0.as_ref()
    }
}

impl DerefMut for ShadowVirtqueue {
    fn deref_mut(&mut self) -> &mut (dyn Svq + 'static) {
        self.0.as_mut()
    }
}
