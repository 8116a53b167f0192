//! What a device-model operation can refuse, for the vhost-user and QMP
//! layers to report (the protocol layer turns it into a REPLY_ACK failure,
//! QMP into an error reply).

use backends::BackendError;
use iova::IovaError;
use svq::SvqError;

use super::postcopy_session::PostcopyError;
use super::shadow_arena::ArenaError;
use crate::memory::MemoryError;
use crate::migration::control::MigrationError;
use crate::migration::state_machine::MigState;
use crate::worker::WorkerError;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue index {index} out of range: the device has {count} queues")]
    BadQueue { index: u64, count: usize },
    #[error("queue {queue}: size {num} is invalid (must be a power of two, 1..={max})")]
    BadQueueSize { queue: usize, num: u32, max: u16 },
    #[error("queue {queue}: base {base} is out of range")]
    BadBase { queue: usize, base: u32 },
    #[error("queue {queue}: ring addresses given before the memory table (SET_MEM_TABLE)")]
    NoMemTable { queue: usize },
    #[error("queue {queue}: {what} ring: {source}")]
    RingAddr {
        queue: usize,
        what: &'static str,
        source: MemoryError,
    },
    #[error("queue {queue}: {what} ring at GPA {gpa:#x}+{len:#x} is outside guest memory")]
    RingOutside {
        queue: usize,
        what: &'static str,
        gpa: u64,
        len: u64,
    },
    #[error("features {acked:#x} include bits that were not offered ({offered:#x})")]
    BadFeatures { acked: u64, offered: u64 },
    #[error(
        "config access at offset {offset} size {size} is outside the config space ({max} bytes)"
    )]
    BadConfig { offset: u32, size: u32, max: usize },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("IOVA tree: {0}")]
    Iova(#[from] IovaError),
    #[error("device backend: {0}")]
    Backend(#[from] BackendError),
    #[error("queue {queue}: shadow virtqueue: {source}")]
    Svq { queue: usize, source: SvqError },
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("Device is not started")]
    NotStarted,
    #[error("migration: {0}")]
    Migration(#[from] MigrationError),
    #[error("postcopy: {0}")]
    Postcopy(#[from] PostcopyError),
    #[error("shadow ring memory: {0}")]
    ShadowArena(#[from] ArenaError),
    #[error("queue {queue}: cannot start while the device state is {state}")]
    MigrationBusy { queue: usize, state: MigState },
    #[error(
        "the VMM negotiated features {features:#x} (RING_PACKED, IN_ORDER) the device lacks: \
         only shadow mode relays them"
    )]
    NeedsShadow { features: u64 },
}

pub type Result<T> = std::result::Result<T, DeviceError>;
