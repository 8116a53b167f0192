//! Kernel vhost-vdpa device backend (`--backend vdpa:/dev/vhost-vdpa-N`).
//!
//! [`VdpaNet`] drives a virtio-net vDPA device through the vhost-vdpa
//! character device. All kernel calls go through [`VdpaIoctls`] ([`KernelVdpa`]
//! for the real fd), so the logic here is tested against a fake device.
//!
//! Behaviour a relay can rely on:
//! - Open: SET_OWNER, backend features (IOTLB_MSG_V2 required; IOTLB_BATCH,
//!   IOTLB_ASID, SUSPEND, RESUME, ENABLE_AFTER_DRIVER_OK, IOTLB_PERSIST acked
//!   when offered), device id must be net, reset, then ACKNOWLEDGE|DRIVER.
//! - Status follows QEMU's vhost-vdpa: `set_features` writes the features and
//!   sets FEATURES_OK, and fails if the device does not keep FEATURES_OK;
//!   `set_status(DRIVER_OK)` (the other bits are managed here) first starts
//!   the control queue, then sets DRIVER_OK and checks it stuck, then
//!   programs the wanted [`NetCtrlState`]. Status bits are cleared only by
//!   `set_status(0)`, which resets the device and leaves it at
//!   ACKNOWLEDGE|DRIVER. Changing features after FEATURES_OK (before
//!   DRIVER_OK) resets the device first, so rings must be set up again.
//! - Mappings: `dma_map` sends one IOTLB v2 UPDATE (uaddr = the region's
//!   address in this process) in ASID 0, inside BATCH_BEGIN/BATCH_END when the
//!   device offers IOTLB_BATCH: one batch per call. [`VdpaNet::dma_map_all`]
//!   puts several regions in one batch. `dma_unmap` sends one INVALIDATE per
//!   whole mapping. The `Arc<MmapRegion>` of a mapping is held until its
//!   INVALIDATE succeeded. Out-of-range and overlapping maps are rejected
//!   before anything reaches the kernel. Mappings survive `set_status(0)`:
//!   without IOTLB_PERSIST the parent driver may drop its translations at
//!   reset, so they are sent again (INVALIDATE + UPDATE) after each reset.
//! - [`iova_range`](DeviceBackend::iova_range) is the device's range minus the
//!   top 4 KiB page when the device has a control queue: that page is where
//!   the control queue's own memory lives when it cannot get an address space
//!   of its own.
//! - Control queue: the daemon's, never the guest's. CTRL_VQ, CTRL_RX,
//!   CTRL_MAC_ADDR and ACCESS_PLATFORM are negotiated here whenever offered and
//!   never shown in `device_features` (nor CTRL_VLAN, CTRL_RX_EXTRA,
//!   GUEST_ANNOUNCE, LOG_ALL). With IOTLB_ASID, at least two address spaces and
//!   the control queue in a group no data queue shares, its memory goes to
//!   ASID 1 (SET_GROUP_ASID), as QEMU does. [`VdpaNet::apply_net_state`]
//!   remembers the state asked for (even when sending it fails) and sends
//!   what differs from the device's state; after every DRIVER_OK the device
//!   is back at its reset defaults and the remembered state is sent again,
//!   which is what restores MAC, queue pairs and RX mode at a migration
//!   destination. Until the daemon calls it, the wanted state is "all open
//!   pairs, device MAC, promiscuous": with MQ negotiated, VQ_PAIRS_SET goes
//!   out at DRIVER_OK so every pair runs.
//! - Rings are handed to the device as the relay sets them; a ring enabled
//!   after DRIVER_OK relies on the device honouring that (the kernel
//!   advertises it as VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK).
//! - `suspend` is VHOST_VDPA_SUSPEND and fails with
//!   [`BackendError::Unsupported`] when the device does not offer
//!   VHOST_BACKEND_F_SUSPEND: the daemon then cannot switch a running device
//!   to shadow rings (it has no way to stop the device without losing ring
//!   state). After `suspend`, `vring_base` is what the device reports through
//!   VHOST_GET_VRING_BASE: the kernel contract for SUSPEND is that the device
//!   keeps its ring state and touches no ring afterwards.
//! - `resume` is VHOST_VDPA_RESUME when the device offers
//!   VHOST_BACKEND_F_RESUME. Without it (devices that can suspend but not
//!   resume), ring changes made while suspended are only remembered, and
//!   `resume` restarts the device the way QEMU does: it reads the bases the
//!   relay did not set, resets, negotiates the same features, sets every
//!   ring up (at the bases the relay set or the device stopped at), sets
//!   DRIVER_OK and sends the wanted [`NetCtrlState`] again (a reset drops
//!   what the control queue set).
//! - Dropping [`VdpaNet`] closes the fd; the kernel then resets the device and
//!   drops every mapping before the memory is released.

mod cvq;
mod dma;
mod kernel;
mod net;
mod sys;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::{BackendError, DeviceBackend, DmaRegion, IovaRange, Result, VringAddrs};
use cvq::{Cvq, CVQ_MEM_SIZE};
use dma::{invalidate_msg, update_msg, DmaTable};
use net::{bits, ctrl, status, BACKEND_ACKED, BACKEND_OWNED};

use crate::NetCtrlState;
pub use kernel::KernelVdpa;
pub use sys::{
    backend_bits, IotlbKind, IotlbMsg, VdpaIoctls, ACCESS_RO, ACCESS_RW, IOTLB_MSG_V2_LEN,
};

const LOG: &str = "vdpa";

/// Backend features acked when offered.
const WANTED_BACKEND: u64 = (1 << backend_bits::IOTLB_MSG_V2)
    | (1 << backend_bits::IOTLB_BATCH)
    | (1 << backend_bits::IOTLB_ASID)
    | (1 << backend_bits::SUSPEND)
    | (1 << backend_bits::RESUME)
    | (1 << backend_bits::ENABLE_AFTER_DRIVER_OK)
    | (1 << backend_bits::IOTLB_PERSIST);

/// The address space the control queue moves to when it can be isolated
/// (the relay's mappings stay in 0).
pub const CVQ_ASID: u32 = 1;

/// Ring set-up the backend remembers per data queue, to set the rings up
/// again when it has to emulate `resume` with a reset.
#[derive(Default)]
struct Vring {
    num: Option<u16>,
    addrs: Option<VringAddrs>,
    /// The base to program at that point: set by `set_vring_base`, forgotten
    /// at `suspend` (the device has moved on), read back from the device
    /// while suspended.
    base: Option<u16>,
    kick: Option<Arc<EventFd>>,
    call: Option<Arc<EventFd>>,
    enabled: bool,
}

/// A virtio-net vDPA device.
pub struct VdpaNet {
    // First, so the fd closes (and the kernel lets go of every mapping)
    // before the mapped memory below is released.
    dev: Box<dyn VdpaIoctls>,
    backend_features: u64,
    offered: u64,
    /// What the device accepted with FEATURES_OK (backend-owned bits included).
    features: Option<u64>,
    status: u8,
    queue_pairs: u16,
    max_pairs: u16,
    max_queue_size: u16,
    device_range: IovaRange,
    range: IovaRange,
    config_size: usize,
    dma: DmaTable,
    cvq: Option<Cvq>,
    /// Device index of the control queue while CTRL_VQ is negotiated.
    cvq_index: Option<u32>,
    cvq_asid: u32,
    cvq_timeout: Duration,
    wanted: NetCtrlState,
    /// What the device is known to have; `None` until DRIVER_OK.
    applied: Option<NetCtrlState>,
    vrings: Vec<Vring>,
    config_call: Option<Arc<EventFd>>,
    suspended: bool,
}

/// Adds the name of the failed kernel call to its error.
fn ctx(op: &'static str) -> impl FnOnce(io::Error) -> BackendError {
    move |e| BackendError::Io(io::Error::new(e.kind(), format!("{op}: {e}")))
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl VdpaNet {
    /// Opens `/dev/vhost-vdpa-N` and prepares `queue_pairs` data queue pairs.
    pub fn open(path: &Path, queue_pairs: u16) -> Result<VdpaNet> {
        let dev = KernelVdpa::open(path).map_err(|e| {
            BackendError::Io(io::Error::new(
                e.kind(),
                format!("open {}: {e}", path.display()),
            ))
        })?;
        VdpaNet::with_ioctls(Box::new(dev), queue_pairs)
    }

    /// Same as [`open`](Self::open) over any implementation of the ioctls.
    pub fn with_ioctls(dev: Box<dyn VdpaIoctls>, queue_pairs: u16) -> Result<VdpaNet> {
        dev.set_owner().map_err(ctx("VHOST_SET_OWNER"))?;
        let offered_backend = dev
            .get_backend_features()
            .map_err(ctx("VHOST_GET_BACKEND_FEATURES"))?;
        if offered_backend & bit(backend_bits::IOTLB_MSG_V2) == 0 {
            return Err(BackendError::Unsupported(
                "IOTLB v2 messages (VHOST_BACKEND_F_IOTLB_MSG_V2)",
            ));
        }
        let backend_features = offered_backend & WANTED_BACKEND;
        dev.set_backend_features(backend_features)
            .map_err(ctx("VHOST_SET_BACKEND_FEATURES"))?;
        let id = dev
            .get_device_id()
            .map_err(ctx("VHOST_VDPA_GET_DEVICE_ID"))?;
        if id != net::VIRTIO_ID_NET {
            return Err(BackendError::Device(format!(
                "not a network device (virtio device id {id})"
            )));
        }
        let offered = dev.get_features().map_err(ctx("VHOST_GET_FEATURES"))?;
        dev.set_status(0).map_err(ctx("VHOST_VDPA_SET_STATUS"))?;

        let max = dev
            .get_vring_num()
            .map_err(ctx("VHOST_VDPA_GET_VRING_NUM"))?;
        if max == 0 {
            return Err(BackendError::Device("device reports ring size 0".into()));
        }
        // A power of two is what both ring layouts need.
        let max_queue_size = 1u16 << (15 - max.leading_zeros());
        let device_range = dev
            .get_iova_range()
            .map_err(ctx("VHOST_VDPA_GET_IOVA_RANGE"))?;
        if device_range.first > device_range.last {
            return Err(BackendError::Device(format!(
                "empty IOVA range {:#x}..={:#x}",
                device_range.first, device_range.last
            )));
        }
        let vqs = dev
            .get_vqs_count()
            .map_err(ctx("VHOST_VDPA_GET_VQS_COUNT"))?;
        let config_size = match dev.get_config_size() {
            Ok(n) => n as usize,
            Err(e) => {
                // Kernels before 5.19 lack the call: the fields the features
                // announce are all there is.
                log::debug!(target: LOG, "VHOST_VDPA_GET_CONFIG_SIZE: {e}; deriving it from features");
                config_size_from_features(offered)
            }
        };

        let max_pairs = if offered & bits::NET_F_MQ != 0 {
            let mut b = [0u8; 2];
            if config_size < 10 {
                return Err(BackendError::Device(
                    "MQ offered but the config space has no max_virtqueue_pairs".into(),
                ));
            }
            dev.get_config(net::cfg::MAX_VIRTQUEUE_PAIRS, &mut b)
                .map_err(ctx("VHOST_VDPA_GET_CONFIG"))?;
            u16::from_le_bytes(b)
        } else {
            1
        };
        if queue_pairs == 0 || queue_pairs > max_pairs {
            return Err(BackendError::Device(format!(
                "{queue_pairs} queue pairs requested, the device has {max_pairs}{}",
                if offered & bits::NET_F_MQ == 0 {
                    " (no VIRTIO_NET_F_MQ)"
                } else {
                    ""
                }
            )));
        }
        let data_vqs = 2 * u32::from(max_pairs);
        if vqs < data_vqs {
            return Err(BackendError::Device(format!(
                "device has {vqs} virtqueues, {data_vqs} data queues expected"
            )));
        }

        let mut range = device_range;
        let mut cvq = None;
        if offered & bits::NET_F_CTRL_VQ != 0 {
            if vqs <= data_vqs {
                log::warn!(target: LOG, "CTRL_VQ offered but no queue for it ({vqs} virtqueues); not using it");
            } else if let Some(iova) = cvq_iova(device_range) {
                cvq = Cvq::new(iova, max_queue_size)?;
                if cvq.is_some() {
                    range.last = iova - 1;
                }
            } else {
                log::warn!(target: LOG, "IOVA range too small for the control queue; not using it");
            }
        }

        let mut this = VdpaNet {
            dev,
            backend_features,
            offered,
            features: None,
            status: 0,
            queue_pairs,
            max_pairs,
            max_queue_size,
            device_range,
            range,
            config_size,
            dma: DmaTable::default(),
            cvq,
            cvq_index: None,
            cvq_asid: 0,
            cvq_timeout: cvq::DEFAULT_TIMEOUT,
            wanted: NetCtrlState {
                queue_pairs,
                ..NetCtrlState::after_reset()
            },
            applied: None,
            vrings: (0..2 * usize::from(queue_pairs))
                .map(|_| Vring::default())
                .collect(),
            config_call: None,
            suspended: false,
        };
        this.add_status(status::ACKNOWLEDGE | status::DRIVER)?;
        log::debug!(
            target: LOG,
            "vDPA net device: features {offered:#x}, backend features {backend_features:#x}, \
             {max_pairs} pairs, ring size {max_queue_size}, IOVA {:#x}..={:#x}, control queue {}",
            device_range.first,
            device_range.last,
            if this.cvq.is_some() { "yes" } else { "no" }
        );
        Ok(this)
    }

    /// Backend features acked at open (bit `n` is `1 << backend_bits::*`).
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Features the device accepted, including the bits the backend owns;
    /// `None` before `set_features`.
    pub fn negotiated_features(&self) -> Option<u64> {
        self.features
    }

    /// The device's own IOVA range (`iova_range` may be one page smaller).
    pub fn device_iova_range(&self) -> IovaRange {
        self.device_range
    }

    /// Queue pairs the device has (max_virtqueue_pairs, or 1 without MQ).
    pub fn max_queue_pairs(&self) -> u16 {
        self.max_pairs
    }

    /// Device index of the control queue and the address space its memory
    /// is in, once CTRL_VQ is negotiated.
    pub fn control_queue(&self) -> Option<(u32, u32)> {
        self.cvq_index.map(|i| (i, self.cvq_asid))
    }

    /// Bounds the wait for each control command (default 5 s). A command
    /// that times out leaves the control queue unusable until a reset.
    pub fn set_cvq_timeout(&mut self, timeout: Duration) {
        self.cvq_timeout = timeout;
    }

    /// The eventfd the device signals on a config change (link status,
    /// announce); `None` detaches it.
    pub fn set_config_call(&mut self, fd: Option<Arc<EventFd>>) -> Result<()> {
        self.dev
            .set_config_call(fd.as_deref())
            .map_err(ctx("VHOST_VDPA_SET_CONFIG_CALL"))?;
        self.config_call = fd;
        Ok(())
    }

    /// Maps several regions in one IOTLB batch: all or nothing.
    pub fn dma_map_all(&mut self, regions: Vec<DmaRegion>) -> Result<()> {
        if regions.is_empty() {
            return Ok(());
        }
        for (i, r) in regions.iter().enumerate() {
            self.dma.check_new(r, self.range, &regions[..i])?;
        }
        self.map_regions(0, &regions)?;
        for r in regions {
            self.dma.insert(r);
        }
        Ok(())
    }

    /// Programs MAC, queue pairs and RX mode through the control queue.
    ///
    /// Before DRIVER_OK the state is remembered and sent right after
    /// DRIVER_OK (also after every reset); after DRIVER_OK the commands that
    /// change something go out now. Only what differs from what the device
    /// has is sent (a device starts with its own MAC, one pair, promiscuous
    /// on, all-multicast off). A field that needs a feature the device lacks
    /// is [`BackendError::Unsupported`] and nothing is sent; a NACK is
    /// [`BackendError::CtrlNack`].
    pub fn apply_net_state(&mut self, state: &NetCtrlState) -> Result<()> {
        if state.queue_pairs == 0 || state.queue_pairs > self.queue_pairs {
            return Err(BackendError::Device(format!(
                "{} queue pairs requested, {} are open",
                state.queue_pairs, self.queue_pairs
            )));
        }
        // What can be negotiated now, or what was.
        let have = self
            .features
            .unwrap_or(self.offered & (BACKEND_ACKED | bits::NET_F_MQ));
        let cvq = self.cvq.is_some() && have & bits::NET_F_CTRL_VQ != 0;
        let need = |b: u64| cvq && have & b != 0;
        if state.mac.is_some() && !need(bits::NET_F_CTRL_MAC_ADDR) {
            return Err(BackendError::Unsupported(
                "setting the MAC (VIRTIO_NET_F_CTRL_MAC_ADDR)",
            ));
        }
        if state.queue_pairs > 1 && !need(bits::NET_F_MQ) {
            return Err(BackendError::Unsupported(
                "several queue pairs (VIRTIO_NET_F_MQ with CTRL_VQ)",
            ));
        }
        if (!state.promisc || state.allmulti) && !need(bits::NET_F_CTRL_RX) {
            return Err(BackendError::Unsupported("RX mode (VIRTIO_NET_F_CTRL_RX)"));
        }
        self.wanted = *state;
        if self.status & status::DRIVER_OK != 0 {
            self.sync_net_state()?;
        }
        Ok(())
    }

    /// SET_FEATURES with everything (backend-owned bits included), then
    /// FEATURES_OK, then the control queue's place.
    fn negotiate(&mut self, full: u64) -> Result<()> {
        self.dev
            .set_features(full)
            .map_err(ctx("VHOST_SET_FEATURES"))?;
        self.add_status(status::FEATURES_OK)?;
        self.features = Some(full);
        if full & bits::NET_F_CTRL_VQ != 0 {
            let index = if full & bits::NET_F_MQ != 0 {
                2 * u32::from(self.max_pairs)
            } else {
                2
            };
            self.cvq_index = Some(index);
            self.cvq_asid = self.isolate_cvq(index)?;
        }
        Ok(())
    }

    /// Suspended on a device that cannot resume: ring changes are only
    /// remembered, and `resume` sets everything up again after a reset.
    fn deferring(&self) -> bool {
        self.suspended && !self.has_backend(backend_bits::RESUME)
    }

    /// `resume` without VHOST_VDPA_RESUME, the way QEMU restarts a vDPA
    /// device: read the ring positions the device stopped at, reset it, and
    /// negotiate, set up every ring at those positions (or at the ones the
    /// relay set meanwhile), DRIVER_OK and the control state again.
    fn resume_by_reset(&mut self) -> Result<()> {
        let (Some(full), true) = (self.features, self.status & status::DRIVER_OK != 0) else {
            // Nothing was running, so nothing was stopped.
            self.suspended = false;
            return Ok(());
        };
        for q in 0..self.vrings.len() {
            if self.vrings[q].num.is_some() && self.vrings[q].base.is_none() {
                let b = self
                    .dev
                    .get_vring_base(q as u32)
                    .map_err(ctx("VHOST_GET_VRING_BASE"))?;
                self.vrings[q].base = Some(b);
            }
        }
        log::debug!(target: LOG, "resume without VHOST_BACKEND_F_RESUME: resetting the device");
        self.reset_device()?;
        self.negotiate(full)?;
        for q in 0..self.vrings.len() {
            let v = &self.vrings[q];
            let (Some(num), Some(addrs)) = (v.num, v.addrs) else {
                continue;
            };
            let i = q as u32;
            let d = &self.dev;
            d.set_vring_num(i, num)
                .map_err(ctx("VHOST_SET_VRING_NUM"))?;
            d.set_vring_addr(i, &addrs)
                .map_err(ctx("VHOST_SET_VRING_ADDR"))?;
            d.set_vring_base(i, v.base.unwrap_or(0))
                .map_err(ctx("VHOST_SET_VRING_BASE"))?;
            d.set_vring_kick(i, v.kick.as_deref())
                .map_err(ctx("VHOST_SET_VRING_KICK"))?;
            d.set_vring_call(i, v.call.as_deref())
                .map_err(ctx("VHOST_SET_VRING_CALL"))?;
            if v.enabled {
                d.set_vring_enable(i, true)
                    .map_err(ctx("VHOST_VDPA_SET_VRING_ENABLE"))?;
            }
        }
        self.set_status(status::DRIVER_OK)
    }

    fn has_backend(&self, b: u32) -> bool {
        self.backend_features & bit(b) != 0
    }

    /// QEMU's vhost_vdpa_add_status: set bits, read back, check they stuck.
    fn add_status(&mut self, add: u8) -> Result<()> {
        let s = self
            .dev
            .get_status()
            .map_err(ctx("VHOST_VDPA_GET_STATUS"))?;
        if s & add != add {
            self.dev
                .set_status(s | add)
                .map_err(ctx("VHOST_VDPA_SET_STATUS"))?;
        }
        let now = self
            .dev
            .get_status()
            .map_err(ctx("VHOST_VDPA_GET_STATUS"))?;
        self.status = now;
        if now & add != add {
            return Err(BackendError::Device(format!(
                "device did not accept status bits {add:#x} (status is {now:#x})"
            )));
        }
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.dev
            .set_status(0)
            .map_err(ctx("VHOST_VDPA_SET_STATUS"))?;
        self.status = 0;
        self.features = None;
        self.cvq_index = None;
        self.cvq_asid = 0;
        self.applied = None;
        self.suspended = false;
        if !self.has_backend(backend_bits::IOTLB_PERSIST) {
            self.replay_mappings()?;
        }
        self.add_status(status::ACKNOWLEDGE | status::DRIVER)
    }

    /// After a reset without IOTLB_PERSIST the parent driver may have
    /// dropped its translations while the kernel still lists them: remove
    /// and re-add every mapping. The control queue page is re-mapped when
    /// the queue starts again.
    fn replay_mappings(&mut self) -> Result<()> {
        if let Some(asid) = self.cvq.as_ref().and_then(|c| c.mapped_asid) {
            let msg = [invalidate_msg(
                asid,
                self.cvq_iova_or_zero(),
                CVQ_MEM_SIZE as u64,
            )];
            self.send_iotlb(asid, &msg).1?;
            if let Some(c) = self.cvq.as_mut() {
                c.mapped_asid = None;
            }
        }
        let regions: Vec<DmaRegion> = self.dma.regions().cloned().collect();
        if regions.is_empty() {
            return Ok(());
        }
        let inval: Vec<IotlbMsg> = regions
            .iter()
            .map(|r| invalidate_msg(0, r.iova, r.size()))
            .collect();
        self.send_iotlb(0, &inval).1?;
        self.map_regions(0, &regions)
    }

    fn cvq_iova_or_zero(&self) -> u64 {
        self.cvq.as_ref().map_or(0, |c| c.iova)
    }

    /// Sends `msgs` in `asid`, inside one batch when the device takes
    /// batches. Returns how many of `msgs` the kernel accepted and the
    /// first error (a failed BATCH_END included).
    fn send_iotlb(&self, asid: u32, msgs: &[IotlbMsg]) -> (usize, Result<()>) {
        let batch = self.has_backend(backend_bits::IOTLB_BATCH);
        if batch {
            if let Err(e) = self
                .dev
                .send_iotlb(&IotlbMsg::batch(IotlbKind::BatchBegin, asid))
            {
                return (0, Err(ctx("IOTLB BATCH_BEGIN")(e)));
            }
        }
        let mut sent = 0;
        let mut res = Ok(());
        for m in msgs {
            let op = match m.kind {
                IotlbKind::Update => "IOTLB UPDATE",
                _ => "IOTLB INVALIDATE",
            };
            if let Err(e) = self.dev.send_iotlb(m) {
                res = Err(ctx(op)(e));
                break;
            }
            sent += 1;
        }
        if batch {
            // Devices that apply a batch at its end report failures here.
            if let Err(e) = self
                .dev
                .send_iotlb(&IotlbMsg::batch(IotlbKind::BatchEnd, asid))
            {
                if res.is_ok() {
                    res = Err(ctx("IOTLB BATCH_END")(e));
                }
            }
        }
        (sent, res)
    }

    /// Maps `regions` in `asid`; on failure the kernel is told to forget the
    /// ones it accepted, so its table matches ours.
    fn map_regions(&self, asid: u32, regions: &[DmaRegion]) -> Result<()> {
        let msgs: Vec<IotlbMsg> = regions.iter().map(|r| update_msg(asid, r)).collect();
        let (sent, res) = self.send_iotlb(asid, &msgs);
        if let Err(e) = res {
            let undo: Vec<IotlbMsg> = regions[..sent]
                .iter()
                .map(|r| invalidate_msg(asid, r.iova, r.size()))
                .collect();
            if !undo.is_empty() {
                if let (_, Err(u)) = self.send_iotlb(asid, &undo) {
                    log::error!(target: LOG, "undoing a failed map: {u}");
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// The data queue `q` as a device index.
    fn data_queue(&self, q: usize) -> Result<u32> {
        let mut count = self.vrings.len();
        // Without MQ only pair 0 exists and index 2 is the control queue.
        if self
            .features
            .is_some_and(|f| f & bits::NET_F_MQ == 0 && count > 2)
        {
            count = 2;
        }
        if q >= count {
            return Err(BackendError::InvalidQueue { index: q, count });
        }
        Ok(q as u32)
    }

    /// With IOTLB_ASID, two address spaces and the control queue in a group
    /// of its own, move that group to [`CVQ_ASID`] (QEMU's CVQ isolation
    /// probe). Groups can depend on the features, so this runs after
    /// FEATURES_OK.
    fn isolate_cvq(&mut self, cvq_index: u32) -> Result<u32> {
        if !self.has_backend(backend_bits::IOTLB_ASID) {
            return Ok(0);
        }
        let probe = || -> io::Result<Option<u32>> {
            if self.dev.get_as_num()? <= CVQ_ASID || self.dev.get_group_num()? < 2 {
                return Ok(None);
            }
            let group = self.dev.get_vring_group(cvq_index)?;
            for q in 0..cvq_index {
                if self.dev.get_vring_group(q)? == group {
                    return Ok(None);
                }
            }
            Ok(Some(group))
        };
        match probe() {
            Ok(Some(group)) => {
                self.dev
                    .set_group_asid(group, CVQ_ASID)
                    .map_err(ctx("VHOST_VDPA_SET_GROUP_ASID"))?;
                log::debug!(target: LOG, "control queue group {group} in ASID {CVQ_ASID}");
                Ok(CVQ_ASID)
            }
            Ok(None) => Ok(0),
            Err(e) => {
                log::warn!(target: LOG, "control queue isolation probe failed ({e}); sharing ASID 0");
                Ok(0)
            }
        }
    }

    /// Maps the control queue page where its group looks and hands the
    /// ring to the device (before DRIVER_OK).
    fn start_cvq(&mut self) -> Result<()> {
        let Some(index) = self.cvq_index else {
            return Ok(());
        };
        let asid = self.cvq_asid;
        let Some(cvq) = self.cvq.as_ref() else {
            return Ok(());
        };
        if cvq.mapped_asid != Some(asid) {
            let region = cvq.region();
            if let Some(old) = cvq.mapped_asid {
                let msg = [invalidate_msg(old, region.iova, region.size())];
                self.send_iotlb(old, &msg).1?;
            }
            self.map_regions(asid, std::slice::from_ref(&region))?;
        }
        let Some(cvq) = self.cvq.as_mut() else {
            return Ok(());
        };
        cvq.mapped_asid = Some(asid);
        cvq.reset_ring()?;
        let d = &self.dev;
        d.set_vring_num(index, cvq.num)
            .map_err(ctx("VHOST_SET_VRING_NUM"))?;
        d.set_vring_addr(index, &cvq.addrs())
            .map_err(ctx("VHOST_SET_VRING_ADDR"))?;
        d.set_vring_base(index, 0)
            .map_err(ctx("VHOST_SET_VRING_BASE"))?;
        d.set_vring_kick(index, Some(&cvq.kick))
            .map_err(ctx("VHOST_SET_VRING_KICK"))?;
        d.set_vring_call(index, Some(&cvq.call))
            .map_err(ctx("VHOST_SET_VRING_CALL"))?;
        d.set_vring_enable(index, true)
            .map_err(ctx("VHOST_VDPA_SET_VRING_ENABLE"))?;
        Ok(())
    }

    fn command(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<()> {
        let timeout = self.cvq_timeout;
        let cvq = self
            .cvq
            .as_mut()
            .ok_or(BackendError::Unsupported("the control virtqueue"))?;
        cvq.command(class, cmd, data, timeout)
    }

    /// Sends the commands that take the device from `applied` to `wanted`,
    /// in QEMU's restore order (MAC, queue pairs, RX mode).
    fn sync_net_state(&mut self) -> Result<()> {
        let f = self.features.unwrap_or(0);
        if f & bits::NET_F_CTRL_VQ == 0 {
            return Ok(());
        }
        let want = self.wanted;
        let mut cur = self.applied.unwrap_or_else(NetCtrlState::after_reset);
        // apply_net_state checked these against the features it knew of; the
        // features negotiated since may lack them.
        let missing = [
            (want.mac.is_some(), bits::NET_F_CTRL_MAC_ADDR, "the MAC"),
            (want.queue_pairs > 1, bits::NET_F_MQ, "the queue pairs"),
            (
                !want.promisc || want.allmulti,
                bits::NET_F_CTRL_RX,
                "the RX mode",
            ),
        ];
        for (needed, bit, what) in missing {
            if needed && f & bit == 0 {
                log::warn!(target: LOG, "cannot program {what}: feature {bit:#x} was not negotiated");
            }
        }
        if let Some(mac) = want.mac {
            if cur.mac != Some(mac) && f & bits::NET_F_CTRL_MAC_ADDR != 0 {
                self.command(ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET, &mac)?;
                cur.mac = Some(mac);
                self.applied = Some(cur);
            }
        }
        let pairs = if f & bits::NET_F_MQ != 0 {
            want.queue_pairs
        } else {
            1
        };
        if pairs != cur.queue_pairs {
            self.command(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &pairs.to_le_bytes())?;
            cur.queue_pairs = pairs;
            self.applied = Some(cur);
        }
        if f & bits::NET_F_CTRL_RX != 0 {
            if want.promisc != cur.promisc {
                self.command(ctrl::CLASS_RX, ctrl::RX_PROMISC, &[u8::from(want.promisc)])?;
                cur.promisc = want.promisc;
                self.applied = Some(cur);
            }
            if want.allmulti != cur.allmulti {
                self.command(
                    ctrl::CLASS_RX,
                    ctrl::RX_ALLMULTI,
                    &[u8::from(want.allmulti)],
                )?;
                cur.allmulti = want.allmulti;
            }
        }
        self.applied = Some(cur);
        Ok(())
    }

    fn config_range(&self, offset: u32, len: usize) -> Result<()> {
        crate::config_range(offset, len, self.config_size).map(drop)
    }
}

/// The page at the top of the device range, if the range has room for it
/// and for at least one byte below it.
fn cvq_iova(r: IovaRange) -> Option<u64> {
    let iova = r.last.checked_sub(CVQ_MEM_SIZE as u64 - 1)? & !(CVQ_MEM_SIZE as u64 - 1);
    (iova > r.first && iova.checked_add(CVQ_MEM_SIZE as u64 - 1)? <= r.last).then_some(iova)
}

/// virtio_net_config up to the last field the features announce.
fn config_size_from_features(f: u64) -> usize {
    if f & bits::NET_F_MTU != 0 {
        12
    } else if f & bits::NET_F_MQ != 0 {
        10
    } else if f & bits::NET_F_STATUS != 0 {
        8
    } else if f & bits::NET_F_MAC != 0 {
        6
    } else {
        0
    }
}

const BUSY: &str = "status bits are cleared only by a reset (status 0)";

impl DeviceBackend for VdpaNet {
    fn kind(&self) -> &'static str {
        "vdpa"
    }

    fn device_features(&self) -> u64 {
        self.offered & !BACKEND_OWNED
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let extra = features & !self.device_features();
        if extra != 0 {
            return Err(BackendError::UnsupportedFeatures(extra));
        }
        if self.status & status::DRIVER_OK != 0 {
            return Err(BackendError::InvalidState {
                op: "set_features",
                why: "the device is running (reset it first)",
            });
        }
        if self.status & status::FEATURES_OK != 0 {
            log::debug!(target: LOG, "features change after FEATURES_OK: resetting the device");
            self.reset_device()?;
        }
        let mut full = features | (self.offered & BACKEND_ACKED);
        if self.cvq.is_none() {
            full &= !(bits::NET_F_CTRL_VQ | bits::NET_F_CTRL_RX | bits::NET_F_CTRL_MAC_ADDR);
        }
        self.negotiate(full)
    }

    fn num_queues(&self) -> usize {
        self.vrings.len()
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn iova_range(&self) -> IovaRange {
        self.range
    }

    fn config_size(&self) -> usize {
        self.config_size
    }

    fn get_config(&self, offset: u32, buf: &mut [u8]) -> Result<()> {
        self.config_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.dev
            .get_config(offset, buf)
            .map_err(ctx("VHOST_VDPA_GET_CONFIG"))
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.config_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.dev
            .set_config(offset, data)
            .map_err(ctx("VHOST_VDPA_SET_CONFIG"))
    }

    fn set_status(&mut self, new: u8) -> Result<()> {
        if new == 0 {
            self.reset_device()?;
            // The relay sets its rings up again; only the eventfds stay.
            for v in &mut self.vrings {
                *v = Vring {
                    kick: v.kick.take(),
                    call: v.call.take(),
                    ..Vring::default()
                };
            }
            return Ok(());
        }
        let managed = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        let target = new | (self.status & managed);
        if self.status & !target != 0 {
            return Err(BackendError::InvalidState {
                op: "set_status",
                why: BUSY,
            });
        }
        let add = target & !self.status;
        if add == 0 {
            return Ok(());
        }
        if add & (status::FEATURES_OK | status::DRIVER_OK) != 0 && self.features.is_none() {
            return Err(BackendError::InvalidState {
                op: "set_status",
                why: "features must be set first",
            });
        }
        let driver_ok = add & status::DRIVER_OK != 0;
        if driver_ok {
            self.start_cvq()?;
        }
        self.add_status(add)?;
        if driver_ok {
            self.applied = Some(NetCtrlState::after_reset());
            self.sync_net_state()?;
        }
        Ok(())
    }

    fn status(&self) -> u8 {
        self.status
    }

    fn dma_map(&mut self, region: DmaRegion) -> Result<()> {
        self.dma.check_new(&region, self.range, &[])?;
        self.map_regions(0, std::slice::from_ref(&region))?;
        self.dma.insert(region);
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        let starts = self.dma.inside(iova, size)?;
        let msgs: Vec<IotlbMsg> = starts
            .iter()
            .filter_map(|s| self.dma.get(*s))
            .map(|r| invalidate_msg(0, r.iova, r.size()))
            .collect();
        let (sent, res) = self.send_iotlb(0, &msgs);
        // What the kernel let go of may be released; the rest stays mapped.
        for s in &starts[..sent] {
            self.dma.remove(*s);
        }
        res
    }

    fn set_vring_num(&mut self, queue: usize, num: u16) -> Result<()> {
        let q = self.data_queue(queue)?;
        let max = self.max_queue_size;
        if num == 0 || !num.is_power_of_two() || num > max {
            return Err(BackendError::InvalidQueueSize(num, max));
        }
        if !self.deferring() {
            self.dev
                .set_vring_num(q, num)
                .map_err(ctx("VHOST_SET_VRING_NUM"))?;
        }
        self.vrings[queue].num = Some(num);
        Ok(())
    }

    fn set_vring_addr(&mut self, queue: usize, addrs: VringAddrs) -> Result<()> {
        let q = self.data_queue(queue)?;
        if addrs.desc & 15 != 0 || addrs.avail & 1 != 0 || addrs.used & 3 != 0 {
            return Err(BackendError::InvalidState {
                op: "set_vring_addr",
                why: "ring addresses must be aligned (desc 16, avail 2, used 4)",
            });
        }
        if !self.deferring() {
            self.dev
                .set_vring_addr(q, &addrs)
                .map_err(ctx("VHOST_SET_VRING_ADDR"))?;
        }
        self.vrings[queue].addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, queue: usize, base: u16) -> Result<()> {
        let q = self.data_queue(queue)?;
        if !self.deferring() {
            self.dev
                .set_vring_base(q, base)
                .map_err(ctx("VHOST_SET_VRING_BASE"))?;
        }
        self.vrings[queue].base = Some(base);
        Ok(())
    }

    fn vring_base(&mut self, queue: usize) -> Result<u16> {
        let q = self.data_queue(queue)?;
        if self.deferring() {
            if let Some(b) = self.vrings[queue].base {
                return Ok(b);
            }
        }
        let b = self
            .dev
            .get_vring_base(q)
            .map_err(ctx("VHOST_GET_VRING_BASE"))?;
        if self.suspended {
            self.vrings[queue].base = Some(b);
        }
        Ok(b)
    }

    fn set_vring_kick(&mut self, queue: usize, fd: Arc<EventFd>) -> Result<()> {
        let q = self.data_queue(queue)?;
        if !self.deferring() {
            self.dev
                .set_vring_kick(q, Some(&fd))
                .map_err(ctx("VHOST_SET_VRING_KICK"))?;
        }
        self.vrings[queue].kick = Some(fd);
        Ok(())
    }

    fn set_vring_call(&mut self, queue: usize, fd: Option<Arc<EventFd>>) -> Result<()> {
        let q = self.data_queue(queue)?;
        if !self.deferring() {
            self.dev
                .set_vring_call(q, fd.as_deref())
                .map_err(ctx("VHOST_SET_VRING_CALL"))?;
        }
        self.vrings[queue].call = fd;
        Ok(())
    }

    fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<()> {
        let q = self.data_queue(queue)?;
        if !self.deferring() {
            self.dev
                .set_vring_enable(q, enable)
                .map_err(ctx("VHOST_VDPA_SET_VRING_ENABLE"))?;
        }
        self.vrings[queue].enabled = enable;
        Ok(())
    }

    fn suspend(&mut self) -> Result<()> {
        if !self.has_backend(backend_bits::SUSPEND) {
            return Err(BackendError::Unsupported(
                "suspend (the device does not offer VHOST_BACKEND_F_SUSPEND)",
            ));
        }
        if self.suspended {
            return Ok(());
        }
        self.dev.suspend().map_err(ctx("VHOST_VDPA_SUSPEND"))?;
        self.suspended = true;
        for v in &mut self.vrings {
            v.base = None;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        if !self.suspended {
            return Ok(());
        }
        if !self.has_backend(backend_bits::RESUME) {
            return self.resume_by_reset();
        }
        self.dev.resume().map_err(ctx("VHOST_VDPA_RESUME"))?;
        self.suspended = false;
        Ok(())
    }

    fn apply_net_ctrl(&mut self, state: &NetCtrlState) -> Result<()> {
        self.apply_net_state(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvq_page_sits_at_the_top_of_the_range() {
        let r = IovaRange {
            first: 0,
            last: (1 << 48) - 1,
        };
        assert_eq!(cvq_iova(r), Some((1 << 48) - 4096));
        let r = IovaRange {
            first: 0x1000,
            last: u64::MAX,
        };
        assert_eq!(cvq_iova(r), Some(u64::MAX - 4095));
        // Unaligned end: the last whole page inside.
        let r = IovaRange {
            first: 0,
            last: 0x2ffe,
        };
        assert_eq!(cvq_iova(r), Some(0x1000));
        // No room below the page.
        let r = IovaRange {
            first: 0x1000,
            last: 0x1fff,
        };
        assert_eq!(cvq_iova(r), None);
    }

    #[test]
    fn config_size_follows_features() {
        assert_eq!(config_size_from_features(bits::NET_F_MAC), 6);
        assert_eq!(
            config_size_from_features(bits::NET_F_MQ | bits::NET_F_MAC),
            10
        );
        assert_eq!(config_size_from_features(bits::NET_F_MTU), 12);
        assert_eq!(config_size_from_features(0), 0);
    }
}
