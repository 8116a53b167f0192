//! Device backends: what svq-relay relays virtqueues to.
//!
//! [`DeviceBackend`] is the set of vhost-like operations the relay needs from a
//! device (the same shape as the vhost-vdpa ioctls). It is object safe so the
//! daemon can hold a `Box<dyn DeviceBackend>` and pick the implementation at run
//! time: the built-in software NIC ([`sim`]), and later kernel vhost-vdpa and a
//! vhost-user device.
//!
//! All ring addresses a backend receives are IOVAs: addresses in the device's own
//! I/O address space, filled by [`DeviceBackend::dma_map`]. The device never sees
//! guest-physical or daemon-virtual addresses.

use std::sync::Arc;

use vm_memory::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

pub use net_ctrl::NetCtrlState;

mod net_ctrl;
pub mod sim;
pub mod vdpa;
pub mod vduse;
pub mod vhost_user;

/// Errors a device backend reports. The daemon turns them into log lines and
/// vhost-user / QMP errors; none of them is fatal to the process.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("queue index {index} out of range: the device has {count} queues")]
    InvalidQueue { index: usize, count: usize },
    #[error("queue size {0} is invalid (must be a power of two, 1..={1})")]
    InvalidQueueSize(u16, u16),
    #[error("IOVA range {iova:#x}+{size:#x} is outside the device range {first:#x}..={last:#x}")]
    IovaOutOfRange {
        iova: u64,
        size: u64,
        first: u64,
        last: u64,
    },
    #[error("IOVA range {iova:#x}+{size:#x} overlaps an existing mapping")]
    MappingOverlap { iova: u64, size: u64 },
    #[error("no mapping at IOVA {iova:#x}+{size:#x}")]
    NotMapped { iova: u64, size: u64 },
    #[error("features {0:#x} include bits the device does not offer")]
    UnsupportedFeatures(u64),
    #[error(
        "config access at offset {offset} length {len} is outside the config space ({size} bytes)"
    )]
    ConfigOutOfRange {
        offset: u32,
        len: usize,
        size: usize,
    },
    #[error("{op} is not allowed now: {why}")]
    InvalidState { op: &'static str, why: &'static str },
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    #[error("device backend I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("device error: {0}")]
    Device(String),
    /// The device answered a control-virtqueue command with an ack other
    /// than VIRTIO_NET_OK.
    #[error("the device refused control command class {class} command {cmd} (ack {ack})")]
    CtrlNack { class: u8, cmd: u8, ack: u8 },
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// The IOVA window a device can address, both ends inclusive
/// (VHOST_VDPA_GET_IOVA_RANGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaRange {
    pub first: u64,
    pub last: u64,
}

impl IovaRange {
    /// Checks that a non-empty `region` lies wholly inside the window and
    /// returns the last IOVA it covers.
    pub fn check(&self, region: &DmaRegion) -> Result<u64> {
        let out_of_range = BackendError::IovaOutOfRange {
            iova: region.iova,
            size: region.size(),
            first: self.first,
            last: self.last,
        };
        match region.last() {
            Some(last)
                if region.size() > 0
                    && self.first <= self.last
                    && region.iova >= self.first
                    && last <= self.last =>
            {
                Ok(last)
            }
            _ => Err(out_of_range),
        }
    }
}

/// The bytes `[offset, offset + len)` of a config space of `size` bytes, or
/// the error a config access outside it gets.
pub(crate) fn config_range(offset: u32, len: usize, size: usize) -> Result<std::ops::Range<usize>> {
    let start = offset as usize;
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(BackendError::ConfigOutOfRange { offset, len, size }),
    }
}

/// Ring addresses, as IOVAs in the device's address space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// One mapping of daemon memory into the device's IOVA space.
///
/// A mapping always covers a whole [`MmapRegion`] (a guest memory region, or a
/// shadow-ring area the daemon allocated). Holding the `Arc` keeps the memory
/// mapped for as long as the device can reach it, so no backend ever holds a
/// dangling address. The region's `file_offset()` is what a vhost-user device
/// needs to map the same memory in its own process.
#[derive(Clone, Debug)]
pub struct DmaRegion {
    pub iova: u64,
    pub memory: Arc<MmapRegion>,
    pub readonly: bool,
}

impl DmaRegion {
    pub fn size(&self) -> u64 {
        self.memory.size() as u64
    }

    /// Last IOVA covered (inclusive). `None` if the region would wrap the
    /// 64-bit space.
    pub fn last(&self) -> Option<u64> {
        self.iova.checked_add(self.size().checked_sub(1)?)
    }
}

/// A dirty-page bitmap the device writes itself: bit n (LSB first in each
/// byte) set means the device wrote page n (4 KiB) of its address space.
/// Shared with the device, so it must be fd-backed; the region's file offset
/// becomes the log's mmap offset.
#[derive(Clone, Debug)]
pub struct DirtyLogArea {
    pub memory: Arc<MmapRegion>,
}

/// The vhost-like operations the relay needs from a device.
///
/// Queue indexes count data queues the virtio-net way: RX of pair k is 2k,
/// TX of pair k is 2k + 1.
///
/// Contract on ring state: after [`suspend`](Self::suspend) (or with the queue
/// disabled) the device has finished every chain it took from the avail ring, so
/// [`vring_base`](Self::vring_base) is both the next avail index the device
/// will read and the used index it has published. A relay relies on this to
/// hand a ring between the device and its shadow queues with nothing in flight
/// inside the device.
pub trait DeviceBackend: Send {
    /// Short name for logs and QMP ("sim", "tap", "vdpa", "vhost-user").
    fn kind(&self) -> &'static str;
    /// The device reaches guest memory only through this process's
    /// mappings (a software device). Postcopy needs it: the daemon's
    /// userfaultfd sees only its own faults, while a separate device (a
    /// DMA engine, another process) would populate pages QEMU has not
    /// placed yet.
    fn in_process(&self) -> bool {
        false
    }
    /// Virtio feature bits the device offers.
    fn device_features(&self) -> u64;
    /// Acknowledge the negotiated features (a subset of `device_features`).
    fn set_features(&mut self, features: u64) -> Result<()>;
    /// Number of data virtqueues (2 per queue pair).
    fn num_queues(&self) -> usize;
    /// Largest ring size the device accepts.
    fn max_queue_size(&self) -> u16;
    /// The IOVA window the device can address.
    fn iova_range(&self) -> IovaRange;
    /// Size of the virtio-net config space in bytes.
    fn config_size(&self) -> usize;
    /// Read the virtio-net config space (MAC, status, max pairs, MTU).
    fn get_config(&self, offset: u32, buf: &mut [u8]) -> Result<()>;
    /// Write the config space (only the writable fields change).
    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()>;
    /// Device status byte (VIRTIO_CONFIG_S_*). Writing 0 resets rings and
    /// features but keeps IOVA mappings (like vhost-vdpa).
    fn set_status(&mut self, status: u8) -> Result<()>;
    fn status(&self) -> u8;

    /// Map a region into the device IOVA space.
    fn dma_map(&mut self, region: DmaRegion) -> Result<()>;
    /// Remove the mapping that starts at `iova` and is `size` bytes long.
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()>;

    fn set_vring_num(&mut self, queue: usize, num: u16) -> Result<()>;
    fn set_vring_addr(&mut self, queue: usize, addrs: VringAddrs) -> Result<()>;
    /// Set the next avail index to read (and, with nothing in flight, the used
    /// index to write).
    fn set_vring_base(&mut self, queue: usize, base: u16) -> Result<()>;
    /// Read the ring position; see the trait-level contract.
    fn vring_base(&mut self, queue: usize) -> Result<u16>;
    /// [`set_vring_base`](Self::set_vring_base) for a packed ring
    /// (VIRTIO_F_RING_PACKED negotiated): the position as vhost-user carries
    /// it, the next avail index with the driver's wrap counter in bit 15 and
    /// the used index with the device's wrap counter in bits 16..=31 (QEMU's
    /// layout; DPDK reads only the low half). A backend whose device cannot
    /// run packed rings never offers RING_PACKED and refuses this.
    fn set_vring_base_packed(&mut self, _queue: usize, _base: u32) -> Result<()> {
        Err(BackendError::Unsupported("packed rings"))
    }
    /// [`vring_base`](Self::vring_base) for a packed ring, in the layout of
    /// [`set_vring_base_packed`](Self::set_vring_base_packed).
    fn vring_base_packed(&mut self, _queue: usize) -> Result<u32> {
        Err(BackendError::Unsupported("packed rings"))
    }
    /// The eventfd the driver writes to notify the device.
    fn set_vring_kick(&mut self, queue: usize, fd: Arc<EventFd>) -> Result<()>;
    /// The eventfd the device writes to interrupt the driver; `None` means
    /// the driver polls.
    fn set_vring_call(&mut self, queue: usize, fd: Option<Arc<EventFd>>) -> Result<()>;
    /// Start or stop processing a ring.
    fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<()>;

    /// Stop all rings after completing what the device already took.
    fn suspend(&mut self) -> Result<()>;
    /// Undo `suspend`.
    fn resume(&mut self) -> Result<()>;

    /// True if the device can log the pages it writes itself (so passthrough can
    /// stay on during migration).
    fn has_dirty_log(&self) -> bool {
        false
    }

    /// Start (Some) or stop (None) the device's own dirty logging into `log`
    /// (only when [`has_dirty_log`](Self::has_dirty_log)).
    fn set_dirty_log(&mut self, _log: Option<DirtyLogArea>) -> Result<()> {
        Err(BackendError::Unsupported("dirty logging by the device"))
    }

    /// Where the device logs its used-ring writes of `queue` (a page in the
    /// log's address space), or None to not log them.
    fn set_vring_log_addr(&mut self, _queue: usize, _addr: Option<u64>) -> Result<()> {
        Err(BackendError::Unsupported("dirty logging by the device"))
    }

    /// Program the receive-side state the VMM's driver negotiated (MAC,
    /// active queue pairs, RX mode) into a device whose control queue the
    /// daemon drives (vDPA). Devices that take it from the rings and config
    /// space alone (the software NIC, a vhost-user device) do not need it.
    fn apply_net_ctrl(&mut self, _state: &NetCtrlState) -> Result<()> {
        Err(BackendError::Unsupported(
            "programming the NIC control state",
        ))
    }
}
