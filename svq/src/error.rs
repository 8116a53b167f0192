//! Every way a shadow virtqueue can refuse its input.
//!
//! Guest-side variants describe a malformed guest ring, device-side variants a
//! malformed shadow used ring. Either puts the queue (only) into the broken
//! state; the error is kept and returned again by every later call.

use iova::IovaError;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvqError {
    // --- configuration -------------------------------------------------------
    #[error("guest queue size {0} is not a power of two in 1..=32768")]
    InvalidQueueSize(u16),
    #[error("shadow ring size {0} is not a power of two in 1..=32768")]
    InvalidShadowSize(u16),
    #[error("guest {ring} ring address {addr:#x} is not aligned to {align}")]
    MisalignedRing {
        ring: &'static str,
        addr: u64,
        align: u64,
    },
    #[error(
        "start indexes avail {avail} / used {used} are more than the queue size {queue_size} apart"
    )]
    InvalidStartIndexes {
        avail: u16,
        used: u16,
        queue_size: u16,
    },
    #[error("cannot create shadow memory: {0}")]
    ShadowMemory(String),

    // --- guest ring ----------------------------------------------------------
    #[error("guest {what} at GPA {addr:#x} is outside guest memory")]
    GuestRingAccess { what: &'static str, addr: u64 },
    #[error("guest avail idx {avail_idx} is more than the queue size {queue_size} ahead of the last popped index {last_avail}")]
    AvailIdxTooFarAhead {
        avail_idx: u16,
        last_avail: u16,
        queue_size: u16,
    },
    #[error("guest avail ring names head {head}, outside the queue of size {queue_size}")]
    BadHeadIndex { head: u16, queue_size: u16 },
    #[error("guest made head {head} available again while it is still in flight")]
    HeadAlreadyInFlight { head: u16 },
    #[error("chain {head}: descriptor {index} has next {next}, outside its table of {table_len}")]
    BadNextIndex {
        head: u16,
        index: u16,
        next: u16,
        table_len: u32,
    },
    #[error("chain {head}: buffer GPA {addr:#x}+{len:#x} is outside guest memory")]
    DescOutsideMemory { head: u16, addr: u64, len: u32 },
    #[error("chain {head}: more than {max} descriptors")]
    ChainTooLong { head: u16, max: u32 },
    #[error("chain {head}: descriptor {index} visited twice (loop)")]
    DescriptorLoop { head: u16, index: u16 },
    #[error("chain {head}: an indirect table refers to another indirect table")]
    NestedIndirect { head: u16 },
    #[error("chain {head}: zero-length indirect table")]
    ZeroLengthIndirect { head: u16 },
    #[error("chain {head}: indirect table length {len} is not a multiple of 16")]
    MisalignedIndirect { head: u16, len: u32 },
    #[error("chain {head}: indirect table of {entries} entries exceeds the queue size {max}")]
    IndirectTooLong { head: u16, entries: u32, max: u32 },
    #[error("chain {head}: indirect table GPA {addr:#x}+{len:#x} is outside guest memory")]
    IndirectOutsideMemory { head: u16, addr: u64, len: u32 },
    #[error("packed chain at {head}: descriptor {position} continues it but is not available")]
    PackedDescNotAvailable { head: u16, position: u16 },
    #[error("packed chain at {head}: an indirect descriptor also has NEXT set")]
    IndirectWithNext { head: u16 },
    #[error("packed chain at {head}: buffer id {id} is outside the queue of size {queue_size}")]
    BadBufferId { head: u16, id: u16, queue_size: u16 },
    #[error("packed chain at {head}: {in_ring} descriptor slots would be in flight, more than the queue size {queue_size}")]
    PackedRingOverrun {
        head: u16,
        in_ring: u32,
        queue_size: u16,
    },
    #[error("chain {head}: device-readable descriptor after a device-writable one")]
    ReadableAfterWritable { head: u16 },
    #[error(
        "chain {head}: {writable} device-writable bytes, fewer than the {min} this queue requires"
    )]
    TooFewWritableBytes { head: u16, writable: u64, min: u32 },
    #[error("chain {head}: GPA {gpa:#x}+{len:#x} has no IOVA: {source}")]
    Translation {
        head: u16,
        gpa: u64,
        len: u64,
        source: IovaError,
    },
    #[error("chain {head}: {segments} segments exceed the shadow ring ({shadow_size}) and the device lacks INDIRECT_DESC")]
    NeedIndirect {
        head: u16,
        segments: usize,
        shadow_size: u16,
    },
    #[error("chain {head}: {segments} segments exceed the indirect table capacity {max}")]
    TooManySegments {
        head: u16,
        segments: usize,
        max: usize,
    },
    #[error("shadow indirect table at HVA {hva:#x} has no IOVA: {source}")]
    ShadowTranslation { hva: u64, source: IovaError },

    // --- device side ---------------------------------------------------------
    #[error("shadow used idx {used_idx} is {ahead} entries past the last seen {last_used}, but only {in_flight} are in flight")]
    UsedIdxTooFarAhead {
        used_idx: u16,
        last_used: u16,
        ahead: u16,
        in_flight: usize,
    },
    #[error("shadow used entry names id {id}, outside the shadow ring of size {shadow_size}")]
    BadUsedId { id: u32, shadow_size: u16 },
    #[error("shadow used entry names id {id}, which is not in flight")]
    UsedIdNotInFlight { id: u32 },
    #[error("an IN_ORDER batch of {batch} used entries goes past the {ready} the used idx covers")]
    BatchPastUsedIdx { batch: u16, ready: u16 },
    #[error("shadow used entry for id {id} has len {len}, more than the {max} writable bytes of its chain")]
    UsedLenTooBig { id: u32, len: u32, max: u64 },
    #[error("device vring base {device_next_avail} is inconsistent with the shadow avail idx {shadow_avail}")]
    InvalidDeviceBase {
        device_next_avail: u16,
        shadow_avail: u16,
    },
    #[error("shadow memory access at offset {offset:#x} failed")]
    ShadowAccess { offset: usize },

    // --- lifecycle -----------------------------------------------------------
    #[error("in-flight chains resubmitted in the wrong form for the guest ring (packed: {guest_packed}): heads for a split ring, descriptor copies for a packed one")]
    ResubmitWrongLayout { guest_packed: bool },
    #[error("resubmitted packed chain of {descs} descriptors (buffer id {id}): {what}")]
    ResubmitChainMalformed {
        id: u16,
        descs: usize,
        what: &'static str,
    },
    #[error("shadow virtqueue was stopped")]
    Stopped,
}
