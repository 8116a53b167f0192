//! The device model's state: one virtio-net device as the VMM configured
//! it over vhost-user, the device backend it is relayed to, guest memory in
//! the IOVA tree, per-queue ring state and the data-path mode; its
//! constructor and accessors. The operations on it live beside this file,
//! one file per concern (see `mod.rs`).

use std::sync::{Arc, Mutex};

use backends::{BackendError, DeviceBackend};
use iova::IovaTree;
use vm_memory::{GuestMemoryMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use super::error::{DeviceError, Result};
use super::nic_control::NetCtrl;
use super::postcopy_session::PostcopySession;
use super::shadow_arena::ShadowArena;
use crate::memory::MemoryTable;
use crate::migration::control::Migration;
use crate::migration::dirty_log::DirtyLogReader;
use crate::stats::QueueStats;
use crate::worker::{PollConfig, WorkerConfig, WorkerHandle};

pub(crate) const LOG: &str = "device";

pub type SharedDevice = Arc<Mutex<Device>>;

/// Lock a shared device; a panic elsewhere must not take the daemon down with
/// it, so a poisoned lock is used as is.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, Device> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest-physical ring addresses of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGpas {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where used-ring writes are logged (vhost-user log_guest_addr).
    pub log: u64,
}

/// Resources of a queue while the SVQ relays it (the SVQ itself lives in the
/// queue pair's worker).
pub(crate) struct ShadowRes {
    pub mem: Arc<MmapRegion>,
    pub hva: u64,
    pub iova: u64,
    pub dev_kick: Arc<EventFd>,
    pub dev_call: Arc<EventFd>,
}

pub(crate) enum Running {
    Stopped,
    Passthrough,
    Shadow(ShadowRes),
}

impl Running {
    pub fn is_running(&self) -> bool {
        !matches!(self, Running::Stopped)
    }
}

/// One queue as the VMM configured it.
pub(crate) struct Vring {
    pub num: u16,
    pub addrs: Option<RingGpas>,
    /// Next guest avail index for the next start (SET_VRING_BASE, or where
    /// the last stop left the ring).
    pub base: u16,
    /// Guest used idx for the next start; equals `base` unless a stop left
    /// chains in flight.
    pub used_base: u16,
    /// Packed rings: the vhost-user position for the next
    /// start, avail index and wrap counter in the low half, used index and
    /// wrap counter in the high half.
    pub packed_base: u32,
    /// The packed position GET_VRING_BASE last returned.
    pub reported_packed_base: Option<u32>,
    pub kick: Option<Arc<EventFd>>,
    pub call: Option<Arc<EventFd>>,
    /// SET_VRING_ENABLE state (only meaningful with protocol features).
    pub enabled: bool,
    pub running: Running,
    /// Guest heads the device took and never completed when the ring last
    /// stopped (shadow mode only; the device state snapshot reports them).
    pub in_flight: Vec<u16>,
}

impl Vring {
    fn new() -> Self {
        Vring {
            num: 0,
            addrs: None,
            base: 0,
            used_base: 0,
            packed_base: 0,
            reported_packed_base: None,
            kick: None,
            call: None,
            enabled: false,
            running: Running::Stopped,
            in_flight: Vec::new(),
        }
    }

    /// A packed ring's vhost-user position: kept whole for the device, its
    /// halves (index and wrap counter of avail and of used) as the indexes
    /// shown and counted.
    pub(crate) fn set_packed_base(&mut self, base: u32) {
        self.packed_base = base;
        self.base = base as u16;
        self.used_base = (base >> 16) as u16;
    }
}

pub struct Device {
    pub(crate) name: String,
    pub(crate) backend: Box<dyn DeviceBackend>,
    pub(crate) queue_pairs: usize,
    pub(crate) max_queue_size: u16,
    pub(crate) tree: IovaTree,
    pub(crate) mem: MemoryTable,
    /// Snapshots handed to workers (replaced, never mutated in place).
    pub(crate) guest_mem: Arc<GuestMemoryMmap>,
    pub(crate) vrings: Vec<Vring>,
    pub(crate) acked_features: Option<u64>,
    /// Features the backend was last given (None: not since the last reset).
    pub(crate) backend_features: Option<u64>,
    pub(crate) protocol_features: u64,
    /// The virtio status the VMM set with SET_STATUS (STATUS protocol
    /// feature); with that feature negotiated rings start at DRIVER_OK.
    pub(crate) vmm_status: u8,
    /// Mode the data path is in (or will start in): shadow or passthrough.
    pub(crate) shadow: bool,
    pub(crate) workers: Vec<WorkerHandle>,
    pub(crate) stats: Vec<Arc<QueueStats>>,
    /// Dirty logging, device state transfer, in-flight region.
    pub(crate) migration: Migration,
    /// The control thread's writer of the dirty log (final used entries
    /// written while a shadowed ring stops). Never pinned across a swap.
    pub(crate) ctl_log: DirtyLogReader,
    /// `--shadow auto`: dirty logging switches the data path to shadow.
    pub(crate) auto_shadow: bool,
    /// `--in-order`, `--packed`: the features offered on request.
    pub(crate) on_request: u64,
    /// Shadow mode was entered because dirty logging started (and is left
    /// when it stops).
    pub(crate) logging_shadow: bool,
    /// The backend logs dirty pages itself (forwarding on).
    pub(crate) log_forwarded: bool,
    /// The latest SET_LOG_BASE mapped for a backend that logs by itself.
    pub(crate) log_area: Option<backends::DirtyLogArea>,
    /// Mode changes made by vhost-user messages, for QMP events.
    pub(crate) mode_events: Vec<bool>,
    /// Shadow-ring memory of all queues, mapped once (see shadow_arena.rs).
    pub(crate) shadow_arena: Option<ShadowArena>,
    /// MAC and queue pairs the VMM negotiated, for backends with a CVQ.
    pub(crate) net_ctrl: NetCtrl,
    /// POSTCOPY_ADVISE .. END.
    pub(crate) postcopy: Option<PostcopySession>,
}

impl Device {
    pub fn new(
        name: &str,
        backend: Box<dyn DeviceBackend>,
        queue_pairs: u16,
        max_queue_size: u16,
        shadow: bool,
    ) -> Result<Self> {
        let range = backend.iova_range();
        let tree = IovaTree::new(range.first, range.last)?;
        let pairs = usize::from(queue_pairs);
        let num_queues = pairs * 2;
        if backend.num_queues() < num_queues {
            return Err(BackendError::InvalidQueue {
                index: num_queues - 1,
                count: backend.num_queues(),
            }
            .into());
        }
        let postcopy = if backend.in_process() {
            crate::migration::userfaultfd::offer()
        } else {
            Err(format!(
                "the {} device writes guest memory outside this process, \
                 so pages would appear before QEMU places them",
                backend.kind()
            ))
        };
        let migration = Migration::new(postcopy);
        let workers = (0..pairs)
            .map(|p| WorkerHandle::spawn_logged(p, migration.dirty_log().reader()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let ctl_log = migration.dirty_log().reader();
        Ok(Device {
            name: name.to_string(),
            max_queue_size: max_queue_size.min(backend.max_queue_size()),
            backend,
            queue_pairs: pairs,
            tree,
            mem: MemoryTable::default(),
            guest_mem: Arc::new(GuestMemoryMmap::new()),
            vrings: (0..num_queues).map(|_| Vring::new()).collect(),
            acked_features: None,
            backend_features: None,
            protocol_features: 0,
            vmm_status: 0,
            shadow,
            workers,
            stats: (0..num_queues)
                .map(|_| Arc::new(QueueStats::default()))
                .collect(),
            migration,
            ctl_log,
            auto_shadow: false,
            on_request: 0,
            logging_shadow: false,
            log_forwarded: false,
            log_area: None,
            mode_events: Vec::new(),
            postcopy: None,
            shadow_arena: None,
            net_ctrl: Default::default(),
        })
    }

    /// How workers wait for work, and where they run: worker N on
    /// `cpus[N % cpus.len()]` (empty: wherever the scheduler puts them).
    pub fn configure_workers(&self, poll: PollConfig, cpus: &[usize]) -> Result<()> {
        for (n, w) in self.workers.iter().enumerate() {
            let cpu = (!cpus.is_empty()).then(|| cpus[n % cpus.len()]);
            w.configure(WorkerConfig { poll, cpu })?;
        }
        Ok(())
    }

    /// `--shadow auto`: switch to shadow while the VMM logs dirty pages.
    pub fn set_auto_shadow(&mut self, on: bool) {
        self.auto_shadow = on;
    }

    /// Mode changes caused by vhost-user messages since the last call.
    pub fn take_mode_events(&mut self) -> Vec<bool> {
        std::mem::take(&mut self.mode_events)
    }

    pub fn migration(&self) -> &Migration {
        &self.migration
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    pub fn num_queues(&self) -> usize {
        self.queue_pairs * 2
    }

    pub fn shadow(&self) -> bool {
        self.shadow
    }

    /// True once the VMM has started at least one ring.
    pub fn is_started(&self) -> bool {
        self.vrings.iter().any(|v| v.running.is_running())
    }

    pub(crate) fn check_queue(&self, index: u64) -> Result<usize> {
        let count = self.num_queues();
        match usize::try_from(index) {
            Ok(q) if q < count => Ok(q),
            _ => Err(DeviceError::BadQueue { index, count }),
        }
    }
}
