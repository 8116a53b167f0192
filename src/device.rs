//! The device model: one virtio-net device as the VMM configures it over
//! vhost-user, the device backend it is relayed to, guest memory in the IOVA
//! tree, per-queue ring state and the data-path mode.
//!
//! All methods run on the control side under the device lock (vhost-user
//! handler, QMP). Rings are started and stopped in `ring.rs`, modes switched
//! in `switch.rs`; this file holds the state and the vhost-user level
//! operations that feed it.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use backends::{BackendError, DeviceBackend, DmaRegion};
use iova::{AddrSpace, IovaError, IovaTree};
use svq::SvqError;
use vm_memory::{GuestMemoryMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{GuestRegion, MemoryError, MemoryTable};
use virtio_features::{self as vf, F_LOG_ALL, F_PROTOCOL_FEATURES, TRANSPORT_MASK};

use crate::migration::control::{Migration, MigrationError};
use crate::migration::dirty_log::DirtyLogReader;
use crate::stats::QueueStats;
use crate::worker::{PollConfig, WorkerConfig, WorkerError, WorkerHandle};

pub(crate) const LOG: &str = "device";

pub type SharedDevice = Arc<Mutex<Device>>;

/// Lock a shared device; a panic elsewhere must not take the daemon down with
/// it, so a poisoned lock is used as is.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, Device> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// Virtio feature bits the relay can carry (device-class and transport).
/// Never IN_ORDER (the SVQ completes out of order) nor packed rings.
pub const RELAY_FEATURES: u64 = vf::F_VERSION_1
    | vf::F_ANY_LAYOUT
    | vf::NET_F_MAC
    | vf::NET_F_MTU
    | vf::NET_F_STATUS
    | vf::NET_F_MRG_RXBUF
    | vf::RING_F_EVENT_IDX
    | vf::RING_F_INDIRECT_DESC
    | vf::NET_F_MQ;

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
    Postcopy(String),
    #[error("queue {queue}: cannot start while the device state is {state}")]
    MigrationBusy {
        queue: usize,
        state: crate::migration::state::MigState,
    },
}

pub type Result<T> = std::result::Result<T, DeviceError>;

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
            kick: None,
            call: None,
            enabled: false,
            running: Running::Stopped,
            in_flight: Vec::new(),
        }
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
    /// Shadow mode was entered because dirty logging started (and is left
    /// when it stops).
    pub(crate) logging_shadow: bool,
    /// The backend logs dirty pages itself (forwarding on).
    pub(crate) log_forwarded: bool,
    /// The latest SET_LOG_BASE mapped for a backend that logs by itself.
    pub(crate) log_area: Option<backends::DirtyLogArea>,
    /// Mode changes made by vhost-user messages, for QMP events.
    pub(crate) mode_events: Vec<bool>,
    /// Shadow-ring memory of all queues, mapped once (see arena.rs).
    pub(crate) shadow_arena: Option<crate::arena::ShadowArena>,
    /// MAC and queue pairs the VMM negotiated, for backends with a CVQ.
    pub(crate) net_ctrl: crate::netctrl::NetCtrl,
    /// POSTCOPY_ADVISE .. END.
    pub(crate) postcopy: Option<crate::postcopy::PostcopySession>,
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
            crate::migration::postcopy::offer()
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

    // --- features -----------------------------------------------------------

    /// LOG_ALL is always offered: the SVQ logs what the device writes (and a
    /// backend that logs by itself gets the log forwarded).
    pub fn offered_features(&self) -> u64 {
        let transport_ok = svq::SUPPORTED_FEATURES | !TRANSPORT_MASK;
        (self.backend.device_features() & RELAY_FEATURES & transport_ok)
            | F_PROTOCOL_FEATURES
            | F_LOG_ALL
    }

    pub fn set_features(&mut self, acked: u64) -> Result<()> {
        let offered = self.offered_features();
        if acked & !offered != 0 {
            return Err(DeviceError::BadFeatures { acked, offered });
        }
        let old = self.acked_features;
        self.acked_features = Some(acked);
        // Rings already running keep the features they started with; the
        // backend gets the new set when the next ring starts. LOG_ALL is a
        // vhost bit, not a device feature: toggling it alone changes nothing
        // the backend sees.
        if !self.is_started() {
            self.push_backend_features()?;
        }
        if let Err(e) = self.set_logging(acked & F_LOG_ALL != 0) {
            self.acked_features = old;
            return Err(e);
        }
        Ok(())
    }

    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated (rings then start
    /// disabled until SET_VRING_ENABLE).
    pub(crate) fn protocol_negotiated(&self) -> bool {
        self.acked_features
            .is_some_and(|f| f & F_PROTOCOL_FEATURES != 0)
    }

    /// Features negotiated with the device: the guest's minus vhost-user bits.
    pub(crate) fn device_features(&self) -> u64 {
        self.acked_features.unwrap_or(0) & !(F_PROTOCOL_FEATURES | F_LOG_ALL)
    }

    pub(crate) fn push_backend_features(&mut self) -> Result<()> {
        let f = self.device_features();
        if self.backend_features != Some(f) {
            // Features are fixed once the device saw FEATURES_OK; with every
            // ring stopped (the only time this runs) a reset is harmless and
            // keeps the IOVA mappings.
            if self.backend.status() != 0 {
                self.backend.set_status(0)?;
            }
            self.backend.set_features(f)?;
            self.backend_features = Some(f);
        }
        Ok(())
    }

    pub fn set_protocol_features(&mut self, f: u64) {
        self.protocol_features = f;
    }

    // --- config space -------------------------------------------------------

    pub fn get_config(&self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let max = self.backend.config_size();
        let end = u64::from(offset) + u64::from(size);
        if end > max as u64 {
            return Err(DeviceError::BadConfig { offset, size, max });
        }
        let mut buf = vec![0u8; size as usize];
        self.backend.get_config(offset, &mut buf)?;
        Ok(buf)
    }

    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let max = self.backend.config_size();
        if u64::from(offset) + data.len() as u64 > max as u64 {
            return Err(DeviceError::BadConfig {
                offset,
                size: data.len() as u32,
                max,
            });
        }
        self.backend.set_config(offset, data)?;
        self.net_ctrl_config_written(offset, data);
        Ok(())
    }

    // --- guest memory -------------------------------------------------------

    /// Replace the whole memory table. Regions sent again unchanged keep
    /// their mappings; new ones are mapped into the IOVA tree and the device
    /// before old ones go, so running rings never see a hole.
    pub fn set_mem_table(&mut self, regions: Vec<GuestRegion>) -> Result<()> {
        let reused: Vec<GuestRegion> = regions
            .into_iter()
            .map(|r| {
                self.mem
                    .regions()
                    .iter()
                    .find(|old| old.same_as(&r))
                    .cloned()
                    .unwrap_or(r)
            })
            .collect();
        let table = MemoryTable::from_regions(reused)?;
        self.replace_memory(table)
    }

    /// ADD_MEM_REG. The same region again is accepted and changes
    /// nothing: QEMU keeps one memory table per queue pair's vhost device
    /// and each of them adds every region.
    pub fn add_mem_region(&mut self, region: GuestRegion) -> Result<()> {
        if self.mem.regions().iter().any(|r| r.desc == region.desc) {
            log::debug!(target: LOG, "{}: region at GPA {:#x} is already mapped", self.name, region.desc.gpa);
            return Ok(());
        }
        let table = self.mem.with_added(region)?;
        self.replace_memory(table)
    }

    pub fn remove_mem_region(&mut self, gpa: u64, size: u64) -> Result<()> {
        let (table, _) = self.mem.with_removed(gpa, size)?;
        self.replace_memory(table)
    }

    /// Drop all guest memory (VMM gone).
    pub(crate) fn clear_memory(&mut self) {
        if let Err(e) = self.replace_memory(MemoryTable::default()) {
            log::warn!(target: LOG, "{}: unmapping guest memory: {e}", self.name);
        }
    }

    fn is_mapped(&self, r: &GuestRegion) -> bool {
        self.mem
            .regions()
            .iter()
            .any(|old| Arc::ptr_eq(&old.mmap, &r.mmap))
    }

    fn replace_memory(&mut self, table: MemoryTable) -> Result<()> {
        let added: Vec<GuestRegion> = table
            .regions()
            .iter()
            .filter(|r| !self.is_mapped(r))
            .cloned()
            .collect();
        let removed: Vec<GuestRegion> = self
            .mem
            .regions()
            .iter()
            .filter(|old| {
                !table
                    .regions()
                    .iter()
                    .any(|r| Arc::ptr_eq(&old.mmap, &r.mmap))
            })
            .cloned()
            .collect();
        // Regions that go leave the tree first (new memory may take their
        // GPA). `Some(iova)` = still mapped in the device.
        let mut gone: Vec<(GuestRegion, Option<u64>)> = Vec::new();
        for r in removed {
            let iova = self.tree.find(AddrSpace::Guest, r.desc.gpa).map(|m| m.iova);
            if iova.is_some() {
                let _ = self.tree.unmap(AddrSpace::Guest, r.desc.gpa);
            }
            gone.push((r, iova));
        }
        // The device cannot hold two mappings of one GPA range either.
        for (r, iova) in gone.iter_mut() {
            if added.iter().any(|a| ranges_overlap(a, r)) {
                if let Some(i) = iova.take() {
                    self.dma_unmap_logged(i, r);
                }
            }
        }
        let mut mapped: Vec<(u64, u64, u64)> = Vec::new();
        for r in &added {
            match self.map_region(r) {
                Ok(iova) => mapped.push((r.desc.gpa, iova, r.desc.size)),
                Err(e) => {
                    // Roll back: keep the old table as it was.
                    for &(gpa, iova, size) in &mapped {
                        let _ = self.backend.dma_unmap(iova, size);
                        let _ = self.tree.unmap(AddrSpace::Guest, gpa);
                    }
                    for (old, iova) in &gone {
                        let res = if iova.is_some() {
                            self.tree
                                .map(AddrSpace::Guest, old.desc.gpa, old.desc.size)
                                .map(|_| ())
                                .map_err(DeviceError::from)
                        } else {
                            self.map_region(old).map(|_| ())
                        };
                        if let Err(e2) = res {
                            log::error!(target: LOG, "{}: memory rollback: {e2}", self.name);
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.mem = table;
        self.publish_memory();
        for (r, iova) in &gone {
            if let Some(i) = iova {
                self.dma_unmap_logged(*i, r);
            }
        }
        Ok(())
    }

    fn map_region(&mut self, r: &GuestRegion) -> Result<u64> {
        let m = self.tree.map(AddrSpace::Guest, r.desc.gpa, r.desc.size)?;
        if let Err(e) = self.backend.dma_map(DmaRegion {
            iova: m.iova,
            memory: r.mmap.clone(),
            readonly: false,
        }) {
            let _ = self.tree.unmap(AddrSpace::Guest, r.desc.gpa);
            return Err(e.into());
        }
        Ok(m.iova)
    }

    fn dma_unmap_logged(&mut self, iova: u64, r: &GuestRegion) {
        if let Err(e) = self.backend.dma_unmap(iova, r.desc.size) {
            log::warn!(target: LOG, "{}: dma_unmap GPA {:#x}: {e}", self.name, r.desc.gpa);
        }
    }

    /// Hand the current memory and tree to every worker with a shadowed
    /// queue, and wait until they use it.
    pub(crate) fn publish_memory(&mut self) {
        self.guest_mem = Arc::new(self.mem.guest_memory());
        let tree = Arc::new(self.tree.clone());
        for (pair, w) in self.workers.iter().enumerate() {
            let shadowed =
                (0..2).any(|i| matches!(self.vrings[pair * 2 + i].running, Running::Shadow(_)));
            if shadowed {
                if let Err(e) = w.update_memory(self.guest_mem.clone(), tree.clone()) {
                    log::error!(target: LOG, "{}: {e}", self.name);
                }
            }
        }
    }

    pub(crate) fn tree_snapshot(&self) -> Arc<iova::IovaTree> {
        Arc::new(self.tree.clone())
    }
}

fn ranges_overlap(a: &GuestRegion, b: &GuestRegion) -> bool {
    let (a0, a1) = (a.desc.gpa, a.desc.gpa + (a.desc.size - 1));
    let (b0, b1) = (b.desc.gpa, b.desc.gpa + (b.desc.size - 1));
    a0 <= b1 && b0 <= a1
}

/// Make a kick eventfd the daemon reads non-blocking. The VMM only writes to
/// it, and an eventfd write never blocks in practice, so the shared file status
/// flag does not change the VMM's behaviour; it guarantees a worker never
/// blocks if the device read the counter first.
pub(crate) fn set_nonblocking(fd: &EventFd) {
    // SAFETY: fcntl on a descriptor we own (EventFd keeps it open); only file
    // status flags change, no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}
