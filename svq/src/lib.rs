//! The shadow virtqueue (SVQ): relays one guest virtqueue (split or packed)
//! to a device through a driver-side ring (split or packed) in memory the
//! daemon owns.
//!
//! The guest ring is read (and its used ring written) through vm-memory, every
//! descriptor validated; buffers are handed to the device as IOVAs from an
//! [`iova::IovaTree`]; used entries coming back are validated, logged as dirty
//! and copied to the guest used ring. This crate does no I/O on eventfds or
//! sockets: the two handlers return whether the device must be kicked and
//! whether the guest must be signalled.
//!
//! `VIRTIO_F_IN_ORDER` is honoured on both sides: used entries go to the
//! guest in the order it made chains available, and a device's batched
//! used entry completes every older chain.

mod chain_table;
mod dirty;
mod error;
mod guest;
mod guest_packed;
mod layouts;
mod memory;
mod shadow_packed;
mod shadow_ring;
mod shadow_virtqueue;
mod tracking_hook;

// One set of packed-ring rules for the guest and shadow sides (and the
// software NIC in `backends`).
use packed_ring as packed;

#[cfg(test)]
mod tests;

pub use dirty::{DirtyLog, NoDirtyLog};
pub use error::SvqError;
pub use memory::ShadowLayout;
pub use shadow_virtqueue::{ShadowVirtqueue, Svq};
pub use tracking_hook::{InflightLog, RingDesc};

/// Transport/ring features the SVQ implements toward the guest. The daemon
/// offers the guest at most `device features & SUPPORTED_FEATURES` for these
/// bits (device-class bits are negotiated separately).
pub const SUPPORTED_FEATURES: u64 = virtio_features::F_VERSION_1
    | virtio_features::F_ANY_LAYOUT
    | virtio_features::RING_F_EVENT_IDX
    | virtio_features::RING_F_INDIRECT_DESC
    | virtio_features::F_RING_PACKED
    | virtio_features::F_IN_ORDER;

/// Feature bit masks used internally.
pub(crate) use virtio_features::{
    F_IN_ORDER, F_RING_PACKED, RING_F_EVENT_IDX as F_EVENT_IDX,
    RING_F_INDIRECT_DESC as F_INDIRECT_DESC,
};

/// Guest-physical addresses of the guest's ring: a split ring's descriptor
/// table, avail and used rings, or a packed ring's descriptor ring, driver
/// and device areas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GuestRing {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// GPA to mark dirty for used-ring writes (vhost-user `log_guest_addr`;
    /// normally equal to `used`).
    pub used_log: u64,
}

/// Ring positions of the guest queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RingIndexes {
    /// Next guest avail index to pop.
    pub avail: u16,
    /// Guest used idx.
    pub used: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvqConfig {
    /// Guest ring size (power of two).
    pub queue_size: u16,
    /// Shadow ring size (power of two, may be smaller than `queue_size`).
    pub shadow_size: u16,
    /// Features negotiated with the VMM/guest.
    pub guest_features: u64,
    /// Features negotiated with the device.
    pub device_features: u64,
}

/// Host virtual addresses of the shadow rings (inside `shadow_memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowRingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// What the daemon has to do after `handle_device_call`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CallOutcome {
    /// Signal the guest's call eventfd.
    pub notify_guest: bool,
    /// Kick the device (parked or newly available chains were published).
    pub kick_device: bool,
}

/// Alias kept for readers of the first API sketch.
pub type NotifyOutcome = CallOutcome;

/// Result of [`ShadowVirtqueue::stop`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StopState {
    /// Where the guest ring continues: `avail` is the next guest avail index
    /// to read (rewound over chains the device never took), `used` the guest
    /// used idx. `avail == used` when nothing is left in flight.
    pub indexes: RingIndexes,
    /// Guest heads (packed: buffer ids) the device took but never
    /// completed, in pop order; then resubmitted ones it never took.
    pub in_flight: Vec<u16>,
}

/// Counters and positions for `query-shadow-vq`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SvqStats {
    /// Next guest avail index to pop.
    pub guest_avail_idx: u16,
    /// Guest used idx.
    pub guest_used_idx: u16,
    /// Shadow avail idx (entries written, published or not).
    pub shadow_avail_idx: u16,
    /// Last shadow used idx consumed.
    pub shadow_used_idx: u16,
    /// Chains completed back to the guest.
    pub relayed: u64,
    /// Sum of used lengths reported by the device.
    pub bytes_written: u64,
    /// Chains on the shadow ring and not yet used.
    pub in_flight: u32,
    /// Chains popped from the guest waiting for shadow ring space.
    pub parked: u32,
    /// Errors that broke the queue (0 or 1 per SVQ instance).
    pub errors: u64,
    /// Why the queue is broken, if it is.
    pub broken: Option<String>,
}
