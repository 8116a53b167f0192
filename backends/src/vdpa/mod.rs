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
//! - `suspend` is VHOST_VDPA_SUSPEND when the device offers
//!   VHOST_BACKEND_F_SUSPEND. After it, `vring_base` is what the device
//!   reports through VHOST_GET_VRING_BASE: the kernel contract for SUSPEND is
//!   that the device keeps its ring state and touches no ring afterwards.
//! - Without SUSPEND (VDUSE devices, Linux 6.12), `suspend` of a running
//!   device resets it, as QEMU's vhost-vdpa does with devices that cannot
//!   suspend (the reset of `set_status(0)`: mappings sent again without
//!   IOTLB_PERSIST). The backend is then stopped by reset: the device's own
//!   ring state is gone, so `vring_base` never asks the device. A base set
//!   with `set_vring_base` since the stop wins; a ring the device was
//!   running (num, addrs, enabled) continues at the used index in its ring
//!   memory (`used + 2`, read through this backend's mappings, as QEMU's
//!   `virtio_queue_restore_last_avail_idx`); any other ring reports the base
//!   set for it, or 0. A used index outside every mapping is
//!   [`BackendError::NotMapped`] naming its address, from that `vring_base`
//!   (or `resume`), not from `suspend`. A chain the device had taken but not
//!   completed is thus made available again: at worst a TX packet is sent
//!   twice (an RX buffer it had started to fill is filled again; the guest
//!   never saw it). While stopped, `status` shows the status the device ran
//!   with, `set_status` adds no bits (0 is a plain reset), ring changes are
//!   only remembered, and `resume` sets the device up as below without a
//!   second reset. A device not at DRIVER_OK runs nothing: `suspend` leaves
//!   it alone then.
//! - `resume` is VHOST_VDPA_RESUME when the device offers
//!   VHOST_BACKEND_F_RESUME. Without it (devices that can suspend but not
//!   resume), ring changes made while suspended are only remembered, and
//!   `resume` restarts the device the way QEMU does: it reads the bases the
//!   relay did not set, resets, negotiates the same features, sets every
//!   ring up (at the bases the relay set or the device stopped at), sets
//!   DRIVER_OK and sends the wanted [`NetCtrlState`] again (a reset drops
//!   what the control queue set). After a stop by reset it does the same
//!   with the bases from ring memory.
//! - Packed rings: RING_PACKED is shown only when the device offers
//!   SUSPEND (without it a stop is a reset, and a packed ring's position is
//!   not in its ring memory). Bases are the kernel's 32 bits (avail position
//!   and wrap counter below, used above) both ways; `set_vring_base` with one
//!   16-bit position means nothing in flight (used = avail). The control
//!   queue follows the negotiated layout (`cvq.rs`).
//! - Dropping [`VdpaNet`] closes the fd; the kernel then resets the device and
//!   drops every mapping before the memory is released.
//!
//! One job per file: this one opens and probes the device; `status_machine.rs`
//! is the status and reset machine, `iotlb.rs` sends the IOTLB messages,
//! `control_queue.rs` runs the control queue (`cvq.rs` is its ring),
//! `device_backend.rs` maps the relay's operations onto all of that, `dma.rs`
//! keeps the mapping table, `sys.rs` and `kernel.rs` are the kernel interface.

mod control_queue;
mod cvq;
mod device_backend;
mod dma;
mod iotlb;
mod kernel;
mod net;
mod status_machine;
mod sys;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::{BackendError, IovaRange, Result, VringAddrs};
use cvq::{Cvq, CVQ_MEM_SIZE};
use dma::DmaTable;
use net::{bits, status};

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
    /// at `suspend` for a ring the device ran (it has moved on), read back
    /// while suspended (from the device, or from the ring memory when
    /// stopped by a reset). The kernel's layout: packed rings carry both
    /// positions with their wrap counters.
    base: Option<u32>,
    kick: Option<Arc<EventFd>>,
    call: Option<Arc<EventFd>>,
    enabled: bool,
    /// Stopped by a reset while the device ran this ring: the IOVA of the
    /// used ring it ran on, where the ring's position is read.
    stopped_used: Option<u64>,
}

/// Whether the device is stopped, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Running (or never started).
    No,
    /// VHOST_VDPA_SUSPEND: the device keeps its ring state.
    Suspended,
    /// Reset in place of VHOST_VDPA_SUSPEND (the device does not offer
    /// VHOST_BACKEND_F_SUSPEND): the device's own ring state is gone, ring
    /// positions come from the used indexes in ring memory. `features` and
    /// `status` are what it ran with, which `resume` sets again.
    ByReset { features: u64, status: u8 },
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
    stop: Stop,
    /// The backend stopped the device itself to set a ring up after
    /// DRIVER_OK (the kernel refuses that on a running device) and resumes
    /// it when that ring is enabled. The relay's own `suspend` takes over.
    late_ring: bool,
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
            stop: Stop::No,
            late_ring: false,
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
    /// `None` before `set_features`. While stopped by a reset, the features
    /// it ran with (which `resume` negotiates again).
    pub fn negotiated_features(&self) -> Option<u64> {
        match self.stop {
            Stop::ByReset { features, .. } => Some(features),
            _ => self.features,
        }
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

    pub(super) fn has_backend(&self, b: u32) -> bool {
        self.backend_features & bit(b) != 0
    }

    /// The data queue `q` as a device index.
    pub(super) fn data_queue(&self, q: usize) -> Result<u32> {
        let mut count = self.vrings.len();
        // Without MQ only pair 0 exists and index 2 is the control queue.
        if self
            .negotiated_features()
            .is_some_and(|f| f & bits::NET_F_MQ == 0 && count > 2)
        {
            count = 2;
        }
        if q >= count {
            return Err(BackendError::InvalidQueue { index: q, count });
        }
        Ok(q as u32)
    }

    pub(super) fn config_range(&self, offset: u32, len: usize) -> Result<()> {
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
