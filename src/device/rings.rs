//! Starting and stopping one ring, in passthrough (the device works on the
//! guest ring with the guest's eventfds) or shadow (an SVQ relays the guest
//! ring to a shadow ring the device works on, with the daemon's eventfds).

use std::sync::Arc;

use backends::VringAddrs;
use iova::AddrSpace;
use packed_ring::Pos;
use svq::{GuestRing, RingDesc, RingIndexes, ShadowVirtqueue, SvqConfig};
use virtio_features::status;
use vm_memory::{Bytes, GuestAddress, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::{DeviceError, Result};
use super::model::{Device, Running, ShadowRes, LOG};
use super::shadow_arena::ShadowArena;
use crate::migration::inflight_region::{InflightRegion, Layout};
use crate::migration::state_machine::MigState;
use crate::worker::{Attach, PendingReply};

/// Guest chains an SVQ relays before any new one: what was in flight when
/// the previous daemon (or ring) stopped, from the INFLIGHT_SHMFD region.
#[derive(Debug)]
pub(crate) enum Resubmit {
    /// Split ring: heads, walked from the guest descriptor table.
    Heads(Vec<u16>),
    /// Packed ring: the copies of each chain's ring descriptors.
    Packed(Vec<Vec<RingDesc>>),
}

impl Resubmit {
    const NONE: Resubmit = Resubmit::Heads(Vec::new());

    fn is_empty(&self) -> bool {
        match self {
            Resubmit::Heads(h) => h.is_empty(),
            Resubmit::Packed(c) => c.is_empty(),
        }
    }
}

/// A shadowed queue handed to its worker, answer pending.
pub(crate) struct ShadowStart {
    res: ShadowRes,
    pending: PendingReply,
    idx: RingIndexes,
}

/// Byte sizes of the three parts of a split ring of `num` entries (with the
/// event-index fields).
pub(crate) fn ring_sizes(num: u16) -> (u64, u64, u64) {
    let n = u64::from(num);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

impl Device {
    /// Byte sizes of a guest ring's descriptor, driver and device areas: a
    /// split ring's, or a packed ring's (descriptors, then the two 4-byte
    /// event suppression structures) once the VMM negotiated RING_PACKED.
    pub(crate) fn guest_ring_sizes(&self, num: u16) -> (u64, u64, u64) {
        layout_sizes(self.packed_negotiated(), num)
    }

    /// The same for the device's rings (a shadow ring is split when the SVQ
    /// relays a packed guest ring to a device without packed rings).
    fn device_ring_sizes(&self, num: u16) -> (u64, u64, u64) {
        layout_sizes(self.device_packed(), num)
    }
}

fn layout_sizes(packed: bool, num: u16) -> (u64, u64, u64) {
    if packed {
        (16 * u64::from(num), 4, 4)
    } else {
        ring_sizes(num)
    }
}

impl Device {}

/// virtio status bits the backend gets when the first ring starts.
/// Even data queues receive (RX of pair k is 2k). The control queue is not
/// relayed, so no even index is anything else.
fn is_rx_queue(q: usize) -> bool {
    q.is_multiple_of(2)
}

/// Size of `struct virtio_net_hdr` for the negotiated features: 12 bytes with
/// VERSION_1 or MRG_RXBUF (num_buffers present), 10 bytes otherwise.
fn net_header_len(features: u64) -> u32 {
    if features & (virtio_features::F_VERSION_1 | virtio_features::NET_F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

const STATUS_DRIVER_OK: u8 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

impl Device {
    /// The ring has everything it needs and the VMM wants it running.
    pub(crate) fn ring_ready(&self, q: usize) -> bool {
        let v = &self.vrings[q];
        let enabled = if self.protocol_negotiated() {
            v.enabled
        } else {
            true
        };
        !v.running.is_running()
            && v.num > 0
            && v.addrs.is_some()
            && v.kick.is_some()
            && enabled
            && self.acked_features.is_some()
            && !self.mem.is_empty()
            && self.driver_ok()
    }

    /// Start ring `q` in the device's current mode if it is ready.
    pub(crate) fn try_start(&mut self, q: usize) -> Result<()> {
        if !self.ring_ready(q) {
            return Ok(());
        }
        self.check_ring_memory(q)?;
        // No ring runs while a device state transfer is open or after a
        // failed load (ERROR until reset).
        let st = self.migration.state().state();
        if matches!(st, MigState::Saving | MigState::Resuming | MigState::Error) {
            return Err(DeviceError::MigrationBusy {
                queue: q,
                state: st,
            });
        }
        if !self.is_started() {
            self.push_backend_features()?;
        }
        let translated = self.shadow_translated();
        if !self.shadow && translated != 0 {
            return Err(DeviceError::NeedsShadow {
                features: translated,
            });
        }
        let (avail, used) = (self.vrings[q].base, self.vrings[q].used_base);
        let res = if self.shadow {
            self.start_shadow(q, RingIndexes { avail, used })
        } else {
            self.start_passthrough(q, avail)
                .map(|()| self.forward_ring_log(q))
        };
        if res.is_ok() {
            // In shadow mode with an in-flight region they were resubmitted.
            let resubmitted = self.shadow && self.inflight_region().is_some();
            if !self.vrings[q].in_flight.is_empty() && !resubmitted {
                log::warn!(target: LOG, "{}: queue {q}: {} heads were in flight when it stopped; \
                    the device does not resubmit them", self.name, self.vrings[q].in_flight.len());
                self.vrings[q].in_flight.clear();
            }
            if let Err(e) = self.migration.state_mut().ring_started() {
                log::warn!(target: LOG, "{}: queue {q}: {e}", self.name);
            }
            if self.backend.status() & 4 == 0 {
                self.backend.set_status(STATUS_DRIVER_OK)?;
            }
        }
        res
    }

    /// Each part of the ring must lie inside guest memory (checked again at
    /// start: the memory table may have changed since SET_VRING_ADDR).
    pub(crate) fn check_ring_memory(&self, q: usize) -> Result<()> {
        let v = &self.vrings[q];
        let Some(a) = v.addrs else {
            return Ok(());
        };
        let (dl, al, ul) = self.guest_ring_sizes(v.num);
        for (what, gpa, len) in [
            ("descriptor", a.desc, dl),
            ("avail", a.avail, al),
            ("used", a.used, ul),
        ] {
            if !self.mem.contains_gpa(gpa, len) {
                return Err(DeviceError::RingOutside {
                    queue: q,
                    what,
                    gpa,
                    len,
                });
            }
        }
        Ok(())
    }

    fn guest_ring_iovas(&self, q: usize) -> Result<VringAddrs> {
        let v = &self.vrings[q];
        let a = v.addrs.ok_or(DeviceError::NoMemTable { queue: q })?;
        let sizes = self.guest_ring_sizes(v.num);
        self.ring_iovas(AddrSpace::Guest, (a.desc, a.avail, a.used), sizes)
    }

    /// The IOVAs of a ring's three areas at `addrs` in `space`, each of
    /// its size in `sizes` and contiguous in the device's IOVA space.
    fn ring_iovas(
        &self,
        space: AddrSpace,
        addrs: (u64, u64, u64),
        sizes: (u64, u64, u64),
    ) -> Result<VringAddrs> {
        Ok(VringAddrs {
            desc: self.tree.translate_contiguous(space, addrs.0, sizes.0)?,
            avail: self.tree.translate_contiguous(space, addrs.1, sizes.1)?,
            used: self.tree.translate_contiguous(space, addrs.2, sizes.2)?,
        })
    }

    /// The device takes the guest ring and eventfds directly.
    pub(crate) fn start_passthrough(&mut self, q: usize, avail: u16) -> Result<()> {
        let addrs = self.guest_ring_iovas(q)?;
        let v = &self.vrings[q];
        let kick = v.kick.clone().ok_or(DeviceError::NotStarted)?;
        let call = v.call.clone();
        let num = v.num;
        let packed = self.packed_negotiated().then_some(v.packed_base);
        let res = (|| -> Result<()> {
            self.backend.set_vring_num(q, num)?;
            self.backend.set_vring_addr(q, addrs)?;
            match packed {
                Some(base) => self.backend.set_vring_base_packed(q, base)?,
                None => self.backend.set_vring_base(q, avail)?,
            }
            self.backend.set_vring_kick(q, kick)?;
            self.backend.set_vring_call(q, call)?;
            self.backend.set_vring_enable(q, true)?;
            Ok(())
        })();
        match res {
            Ok(()) => {
                self.vrings[q].running = Running::Passthrough;
                log::debug!(target: LOG, "{}: queue {q} started in passthrough at {avail}", self.name);
                Ok(())
            }
            Err(e) => {
                let _ = self.backend.set_vring_enable(q, false);
                Err(e)
            }
        }
    }

    /// An SVQ relays the guest ring; the device gets the shadow ring at base 0
    /// and the daemon's own eventfds.
    /// Heads the INFLIGHT_SHMFD region holds for `q` (a restarted VMM or
    /// daemon) are resubmitted before any new avail entry.
    pub(crate) fn start_shadow(&mut self, q: usize, idx: RingIndexes) -> Result<()> {
        let (idx, resubmit) = self.inflight_to_resubmit(q, idx);
        let started = self.start_shadow_with(q, idx, &resubmit)?;
        self.start_shadow_finish(q, started)
    }

    /// The heads to resubmit on `q`, oldest first, and where the guest ring
    /// continues: at the guest used idx plus the heads in flight (as
    /// libvhost-user does), since a VMM that lost the back-end sets the
    /// vring base to the used idx and the in-flight heads sit before it.
    fn inflight_to_resubmit(&self, q: usize, idx: RingIndexes) -> (RingIndexes, Resubmit) {
        let Some(region) = self.inflight_region() else {
            return (idx, Resubmit::NONE);
        };
        if region.layout() == Layout::Packed {
            return self.inflight_to_resubmit_packed(q, idx, &region);
        }
        let Some(iq) = u16::try_from(q).ok().and_then(|q| region.queue(q)) else {
            return (idx, Resubmit::NONE);
        };
        if iq.version() == 0 {
            return (idx, Resubmit::NONE);
        }
        let Some((_, used)) = self.read_guest_indexes(q) else {
            return (idx, Resubmit::NONE);
        };
        let heads = match iq.recover(used) {
            Ok(h) => h,
            Err(e) => {
                log::warn!(target: LOG, "{}: queue {q}: in-flight region: {e}", self.name);
                return (idx, Resubmit::NONE);
            }
        };
        if heads.is_empty() {
            return (idx, Resubmit::NONE);
        }
        let avail = used.wrapping_add(heads.len() as u16);
        if idx.avail != avail && idx.avail != used {
            log::warn!(target: LOG, "{}: queue {q}: vring base {} is neither the used idx {used} nor \
                {avail} past the {} heads in flight; continuing at {avail}", self.name, idx.avail, heads.len());
        }
        log::info!(target: LOG, "{}: queue {q}: resubmitting {} heads in flight", self.name, heads.len());
        (RingIndexes { avail, used }, Resubmit::Heads(heads))
    }

    /// As `inflight_to_resubmit`, packed layout: the region knows the
    /// guest's used position (a packed ring has no used index to read),
    /// and the guest avail position is past the slots of the chains in
    /// flight. An interrupted completion is finished or undone by looking
    /// at the guest ring's descriptor where it would have been written.
    fn inflight_to_resubmit_packed(
        &self,
        q: usize,
        idx: RingIndexes,
        region: &InflightRegion,
    ) -> (RingIndexes, Resubmit) {
        let Some(pq) = u16::try_from(q).ok().and_then(|q| region.packed_queue(q)) else {
            return (idx, Resubmit::NONE);
        };
        let (num, addrs) = (self.vrings[q].num, self.vrings[q].addrs);
        if pq.version() == 0 || region.queue_size() != num {
            if pq.version() != 0 {
                log::warn!(target: LOG, "{}: queue {q}: in-flight region is for rings of {}, the ring has {num}; nothing resubmitted", self.name, region.queue_size());
            }
            return (idx, Resubmit::NONE);
        }
        let Some(desc) = addrs.map(|a| a.desc) else {
            return (idx, Resubmit::NONE);
        };
        let mem = &self.guest_mem;
        // (flags, id) of the guest's descriptor at `pos`.
        let guest_desc = |pos: u16| -> Option<(u16, u16)> {
            if pos >= num {
                return None;
            }
            let at = desc.checked_add(16 * u64::from(pos))?;
            let id: u16 = mem.read_obj(GuestAddress(at.checked_add(12)?)).ok()?;
            let flags: u16 = mem.read_obj(GuestAddress(at.checked_add(14)?)).ok()?;
            Some((u16::from_le(flags), u16::from_le(id)))
        };
        let rec = match pq.recover(&guest_desc) {
            Ok(r) => r,
            Err(e) => {
                log::warn!(target: LOG, "{}: queue {q}: in-flight region: {e}; nothing resubmitted", self.name);
                return (idx, Resubmit::NONE);
            }
        };
        if rec.chains.is_empty() {
            return (idx, Resubmit::NONE);
        }
        let start = RingIndexes {
            avail: rec.avail(num).encode(),
            used: rec.used.encode(),
        };
        if idx != start {
            log::warn!(target: LOG, "{}: queue {q}: vring base {:#06x}/{:#06x} is not the in-flight region's {:#06x}/{:#06x} (used position, past {} chains in flight); continuing at the region's",
                self.name, idx.avail, idx.used, start.avail, start.used, rec.chains.len());
        }
        log::info!(target: LOG, "{}: queue {q}: resubmitting {} packed chains in flight", self.name, rec.chains.len());
        let chains = rec.chains.into_iter().map(|c| c.descs).collect();
        (start, Resubmit::Packed(chains))
    }

    /// Everything up to handing the SVQ to the worker (not waited for).
    pub(crate) fn start_shadow_begin(&mut self, q: usize, idx: RingIndexes) -> Result<ShadowStart> {
        self.start_shadow_with(q, idx, &Resubmit::NONE)
    }

    /// As `start_shadow_begin`, relaying `resubmit` (guest chains) first.
    fn start_shadow_with(
        &mut self,
        q: usize,
        idx: RingIndexes,
        resubmit: &Resubmit,
    ) -> Result<ShadowStart> {
        let v = &self.vrings[q];
        let a = v.addrs.ok_or(DeviceError::NoMemTable { queue: q })?;
        let guest_kick = v.kick.clone().ok_or(DeviceError::NotStarted)?;
        let guest_call = v.call.clone();
        let num = v.num;
        let shadow_size = num.min(self.backend.max_queue_size());
        let svq_err = |source| DeviceError::Svq { queue: q, source };
        let cfg = SvqConfig {
            queue_size: num,
            shadow_size,
            guest_features: self.acked_features.unwrap_or(0),
            device_features: self.device_features(),
        };
        // In the shared shadow area, already mapped in the tree and device.
        let slot = self.shadow_slot(q, ShadowVirtqueue::shadow_memory_size(&cfg))?;
        let ring = GuestRing {
            desc: a.desc,
            avail: a.avail,
            used: a.used,
            used_log: a.log,
        };
        let mut svq = ShadowVirtqueue::with_shadow_memory(cfg, ring, idx, slot).map_err(svq_err)?;
        if is_rx_queue(q) {
            // A receive buffer must hold at least the virtio-net header
            // (virtio 1.2, 5.1.6.3.1); one that cannot would leave the device
            // waiting for room forever.
            svq.set_min_writable(net_header_len(cfg.guest_features));
        }
        if let Some(log) = self.inflight_log(q, resubmit.is_empty(), idx) {
            svq.set_inflight_log(Box::new(log));
        }
        // Before the device gets the shadow ring: it starts with them.
        let kick_resubmitted = match resubmit {
            Resubmit::Heads(heads) => svq.resubmit(heads, &self.guest_mem, &self.tree),
            Resubmit::Packed(chains) => svq.resubmit_packed(chains, &self.guest_mem, &self.tree),
        }
        .map_err(svq_err)?;
        let mem = svq.shadow_memory();
        let hva = mem.as_ptr() as u64;
        let iova = self
            .tree
            .translate_contiguous(AddrSpace::Host, hva, mem.size() as u64)?;
        let res = ShadowRes {
            mem,
            hva,
            iova,
            dev_kick: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(backends::BackendError::Io)?),
            dev_call: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(backends::BackendError::Io)?),
        };
        let r = self.program_shadow(q, &svq, shadow_size, &res);
        // Where the guest ring stands now (past resubmitted chains) until
        // the worker's first pass publishes more; a new SVQ instance, so its
        // counts add to what earlier ones relayed (the worker's attach says
        // the same again, harmlessly).
        self.stats[q].begin_svq();
        self.stats[q].publish(&svq.stats());
        let r = r.and_then(|()| {
            self.workers[q / 2]
                .attach_begin(Attach {
                    queue: q,
                    svq: Box::new(svq),
                    guest_kick,
                    guest_call,
                    dev_kick: res.dev_kick.clone(),
                    dev_call: res.dev_call.clone(),
                    mem: self.guest_mem.clone(),
                    tree: self.tree_snapshot(),
                    stats: self.stats[q].clone(),
                })
                .map_err(DeviceError::from)
        });
        if r.is_ok() && kick_resubmitted {
            if let Err(e) = res.dev_kick.write(1) {
                log::warn!(target: LOG, "{}: queue {q}: kick after resubmitting: {e}", self.name);
            }
        }
        match r {
            Ok(pending) => Ok(ShadowStart { res, pending, idx }),
            Err(e) => {
                let _ = self.backend.set_vring_enable(q, false);
                self.unmap_shadow(&res);
                Err(e)
            }
        }
    }

    /// Wait until the worker relays the queue.
    pub(crate) fn start_shadow_finish(&mut self, q: usize, s: ShadowStart) -> Result<()> {
        let ShadowStart { res, pending, idx } = s;
        match pending.wait() {
            Ok(()) => {
                log::debug!(target: LOG, "{}: queue {q} started in shadow at {}/{}", self.name, idx.avail, idx.used);
                self.vrings[q].running = Running::Shadow(res);
                Ok(())
            }
            Err(e) => {
                let _ = self.backend.set_vring_enable(q, false);
                self.unmap_shadow(&res);
                Err(e.into())
            }
        }
    }

    fn program_shadow(
        &mut self,
        q: usize,
        svq: &ShadowVirtqueue,
        shadow_size: u16,
        res: &ShadowRes,
    ) -> Result<()> {
        let h = svq.shadow_ring_hva();
        let addrs = self.ring_iovas(
            AddrSpace::Host,
            (h.desc, h.avail, h.used),
            self.device_ring_sizes(shadow_size),
        )?;
        self.backend.set_vring_num(q, shadow_size)?;
        self.backend.set_vring_addr(q, addrs)?;
        if self.device_packed() {
            self.backend
                .set_vring_base_packed(q, packed_ring::EMPTY_RING_BASE)?;
        } else {
            self.backend.set_vring_base(q, 0)?;
        }
        self.backend.set_vring_kick(q, res.dev_kick.clone())?;
        self.backend.set_vring_call(q, Some(res.dev_call.clone()))?;
        self.backend.set_vring_enable(q, true)?;
        Ok(())
    }

    /// Shadow memory for queue `q`: `len` bytes of its slot in the shared
    /// area, created and mapped (IOVA tree and device) on first use.
    fn shadow_slot(&mut self, q: usize, len: usize) -> Result<Arc<MmapRegion>> {
        if self.shadow_arena.is_none() {
            let arena = ShadowArena::create(
                self.num_queues(),
                self.max_queue_size,
                &mut self.tree,
                self.backend.as_mut(),
            )?;
            self.shadow_arena = Some(arena);
        }
        let arena = self.shadow_arena.as_ref().expect("created above");
        Ok(arena.view(q, len)?)
    }

    fn unmap_shadow(&mut self, res: &ShadowRes) {
        // Shadow memory in the shared area stays mapped.
        if self
            .shadow_arena
            .as_ref()
            .is_some_and(|a| a.contains(res.hva))
        {
            return;
        }
        if let Err(e) = self.backend.dma_unmap(res.iova, res.mem.size() as u64) {
            log::warn!(target: LOG, "{}: unmapping shadow memory: {e}", self.name);
        }
        if let Err(e) = self.tree.unmap(AddrSpace::Host, res.hva) {
            log::warn!(target: LOG, "{}: unmapping shadow memory: {e}", self.name);
        }
    }

    /// Take a shadowed queue back from its worker once the device no longer
    /// processes it (suspended, or the queue disabled): complete what the
    /// device used, stop the SVQ at the device's position, release the shadow
    /// memory. Returns the guest ring indexes to continue from.
    pub(crate) fn take_shadow(&mut self, q: usize) -> RingIndexes {
        let Running::Shadow(res) = std::mem::replace(&mut self.vrings[q].running, Running::Stopped)
        else {
            let v = &self.vrings[q];
            return RingIndexes {
                avail: v.base,
                used: v.used_base,
            };
        };
        let fallback = {
            let s = self.stats[q].snapshot();
            RingIndexes {
                avail: s.avail_idx,
                used: s.used_idx,
            }
        };
        let idx = match self.workers[q / 2].detach(q) {
            Ok(mut svq) => self.finish_svq(q, &mut svq).unwrap_or_else(|e| {
                log::error!(target: LOG, "{}: {e}", self.name);
                let s = svq.stats();
                RingIndexes {
                    avail: s.guest_avail_idx,
                    used: s.guest_used_idx,
                }
            }),
            Err(e) => {
                log::error!(target: LOG, "{}: queue {q}: {e}", self.name);
                fallback
            }
        };
        self.unmap_shadow(&res);
        self.stats[q].set_indexes(idx.avail, idx.used);
        idx
    }

    fn finish_svq(&mut self, q: usize, svq: &mut ShadowVirtqueue) -> Result<RingIndexes> {
        let mem = self.guest_mem.clone();
        let tree = self.tree_snapshot();
        let svq_err = |source| DeviceError::Svq { queue: q, source };
        // The final used entries are guest writes too: logged like the
        // worker's (pinned only around the SVQ call, never across a swap).
        svq.flush_dirty(&self.ctl_log.pin());
        if !svq.is_broken() {
            // The device is quiescent: one pass picks up every used entry.
            let out = {
                let pinned = self.ctl_log.pin();
                svq.handle_device_call(&mem, &tree, &pinned)
            }
            .map_err(svq_err)?;
            if out.notify_guest {
                if let Some(call) = &self.vrings[q].call {
                    let _ = call.write(1);
                }
            }
        }
        // Where the device stopped taking chains on the shadow ring (on a
        // packed ring with the wrap counter in bit 15).
        let device_base = self.device_ring_position(q)?.avail;
        let st = svq.stop(&mem, device_base).map_err(svq_err);
        self.stats[q].publish(&svq.stats());
        let st = st?;
        if !st.in_flight.is_empty() {
            log::warn!(target: LOG,
                "{}: queue {q}: {} buffers were taken by the device and never completed",
                self.name, st.in_flight.len());
            self.record_in_flight(q, &st.in_flight);
        }
        self.vrings[q].in_flight = st.in_flight;
        Ok(st.indexes)
    }

    /// Stop ring `q` (GET_VRING_BASE, SET_VRING_ENABLE 0, disconnect):
    /// the device stops processing it, shadow state is folded back into the
    /// guest ring. Returns the next avail index; the ring state is kept for
    /// the next start.
    pub(crate) fn stop_ring(&mut self, q: usize) -> u16 {
        let idx = match &self.vrings[q].running {
            Running::Stopped => {
                let v = &self.vrings[q];
                return v.base;
            }
            Running::Passthrough => {
                if let Err(e) = self.backend.set_vring_enable(q, false) {
                    log::warn!(target: LOG, "{}: queue {q}: disable: {e}", self.name);
                }
                self.vrings[q].running = Running::Stopped;
                match self.device_ring_position(q) {
                    Ok(idx) => idx,
                    Err(e) => {
                        log::error!(target: LOG, "{}: queue {q}: reading the vring base: {e}", self.name);
                        let v = &self.vrings[q];
                        RingIndexes {
                            avail: v.base,
                            used: v.used_base,
                        }
                    }
                }
            }
            Running::Shadow(_) => {
                if let Err(e) = self.backend.set_vring_enable(q, false) {
                    log::warn!(target: LOG, "{}: queue {q}: disable: {e}", self.name);
                }
                self.take_shadow(q)
            }
        };
        self.set_ring_position(q, idx);
        self.stats[q].set_indexes(idx.avail, idx.used);
        log::debug!(target: LOG, "{}: queue {q} stopped at {}/{}", self.name, idx.avail, idx.used);
        if !self.is_started() {
            if let Err(e) = self.migration.state_mut().all_rings_stopped() {
                log::warn!(target: LOG, "{}: {e}", self.name);
            }
        }
        idx.avail
    }

    /// The SVQ's hook on `q`'s part of the INFLIGHT_SHMFD region. With
    /// `clear_stale`, heads still marked there are cleared first: they are
    /// left from an earlier shadow period that a passthrough device took
    /// over, and would otherwise be resubmitted after a later restart.
    /// Passthrough rings are not tracked: the device owns the ring there
    /// (a vhost-user device would need its own INFLIGHT_SHMFD; sim and vdpa
    /// have none). A packed ring starting at `start` without resubmitting
    /// also gets the region's used position set to its own (the region
    /// counts a packed ring's positions itself).
    fn inflight_log(
        &self,
        q: usize,
        clear_stale: bool,
        start: RingIndexes,
    ) -> Option<crate::migration::region_hook::RegionLog> {
        let region = self.inflight_region()?;
        let q16 = u16::try_from(q).ok()?;
        if let Some(pq) = region.packed_queue(q16) {
            let num = self.vrings[q].num;
            if region.queue_size() != num {
                log::warn!(target: LOG, "{}: queue {q}: in-flight region is for rings of {}, the ring has {num}; not tracked", self.name, region.queue_size());
                return None;
            }
            if clear_stale {
                pq.reset(Pos::decode(start.used));
            }
            return crate::migration::region_hook::RegionLog::new(region, q16);
        }
        let iq = region.queue(q16)?;
        if clear_stale {
            let stale = iq.resubmit_list();
            if !stale.is_empty() {
                log::debug!(target: LOG, "{}: queue {q}: clearing {} stale in-flight heads", self.name, stale.len());
                if let Err(e) = iq.commit_batch(&stale, iq.used_idx()) {
                    log::warn!(target: LOG, "{}: queue {q}: in-flight region: {e}", self.name);
                }
            }
        }
        crate::migration::region_hook::RegionLog::new(region, q16)
    }

    /// Heads the device kept when a ring stopped go to the INFLIGHT_SHMFD
    /// region (when the VMM gave one), so a restarted VMM resubmits them.
    /// A packed ring's chains need their descriptors, which only the SVQ's
    /// hook had: they are in the region already, or cannot be put there.
    fn record_in_flight(&mut self, q: usize, heads: &[u16]) {
        let Some(region) = self.inflight_region() else {
            return;
        };
        if let Some(pq) = u16::try_from(q).ok().and_then(|q| region.packed_queue(q)) {
            let held: Vec<u16> = pq
                .chains()
                .unwrap_or_default()
                .iter()
                .map(|c| c.id())
                .collect();
            let missing = heads.iter().filter(|h| !held.contains(h)).count();
            if missing > 0 {
                log::warn!(target: LOG, "{}: queue {q}: {missing} packed chains in flight are not in the in-flight region; a restart cannot resubmit them", self.name);
            }
            return;
        }
        let Some(iq) = u16::try_from(q).ok().and_then(|q| region.queue(q)) else {
            return;
        };
        for (counter, &h) in (iq.next_counter()..).zip(heads) {
            if let Err(e) = iq.mark(h, counter) {
                log::warn!(target: LOG, "{}: queue {q}: in-flight region: {e}", self.name);
            }
        }
    }

    /// The VMM's INFLIGHT_SHMFD region, when the rings use its layout
    /// (fixed when the VMM asked for or gave it: features negotiated
    /// differently since make it useless to these rings).
    pub(crate) fn inflight_region(&self) -> Option<Arc<InflightRegion>> {
        let want = if self.packed_negotiated() {
            Layout::Packed
        } else {
            Layout::Split
        };
        self.migration.inflight().filter(|r| r.layout() == want)
    }

    /// Where a device stopped or suspended stands on the ring it works on
    /// (the guest's, or a shadow ring): its vring base, which is both avail
    /// and used for a split ring; both halves of a packed ring's position.
    pub(crate) fn device_ring_position(&mut self, q: usize) -> Result<RingIndexes> {
        Ok(if self.device_packed() {
            let b = self.backend.vring_base_packed(q)?;
            RingIndexes {
                avail: b as u16,
                used: (b >> 16) as u16,
            }
        } else {
            let b = self.backend.vring_base(q)?;
            RingIndexes { avail: b, used: b }
        })
    }

    /// Ring `q` continues at `idx` when it starts next.
    pub(crate) fn set_ring_position(&mut self, q: usize, idx: RingIndexes) {
        let packed = self.packed_negotiated();
        let v = &mut self.vrings[q];
        if packed {
            v.set_packed_base(u32::from(idx.avail) | (u32::from(idx.used) << 16));
        } else {
            v.base = idx.avail;
            v.used_base = idx.used;
        }
    }

    /// Guest ring indexes as they are in guest memory (for query in
    /// passthrough, where the device owns the ring).
    pub(crate) fn read_guest_indexes(&self, q: usize) -> Option<(u16, u16)> {
        // A packed ring keeps its positions in its descriptors, not in two
        // index fields.
        if self.packed_negotiated() {
            return None;
        }
        let a = self.vrings[q].addrs?;
        let avail: u16 = self
            .guest_mem
            .read_obj(GuestAddress(a.avail.checked_add(2)?))
            .ok()?;
        let used: u16 = self
            .guest_mem
            .read_obj(GuestAddress(a.used.checked_add(2)?))
            .ok()?;
        Some((avail, used))
    }
}
