//! A vhost-user device as a backend: the relay is the vhost-user *frontend*
//! of an existing device (DPDK net_vhost, OVS-DPDK, a SmartNIC port), built
//! on the vhost crate's `Frontend`.
//!
//! Behaviour a relay can rely on:
//! - Address space: we define it. Every `dma_map` region is one memory-table
//!   entry with guest_phys_addr = userspace_addr = IOVA, so ring addresses
//!   and buffer addresses are both IOVAs. Regions must be fd-backed (memfd or
//!   shared file mappings). At most 8 regions (one SET_MEM_TABLE). The table
//!   is kept locally and sent whole on every change; with REPLY_ACK (DPDK
//!   offers it) `dma_unmap` returns after the device dropped the memory. An
//!   empty table is sent as one placeholder page outside the IOVA range.
//!   `readonly` cannot be expressed in vhost-user and is ignored.
//! - Rings: the device gets a ring (NUM, BASE, ADDR, KICK, CALL, ENABLE) once
//!   it is complete, enabled, inside mapped memory, the features are set,
//!   the status has DRIVER_OK and the device is not suspended. Reading a
//!   running ring's position (`vring_base`) needs GET_VRING_BASE, which stops
//!   it: it stays stopped until a kick fd, `set_vring_enable(true)`, `resume`
//!   or DRIVER_OK starts it again. Layout changes (num, addr, base) on a
//!   running ring are refused; on a disabled one they take the ring back
//!   from the device first.
//! - `suspend` takes every ring back with GET_VRING_BASE (vhost-user has no
//!   SUSPEND); DPDK completes each burst before answering, so afterwards
//!   `vring_base` is both the next avail index and the published used index.
//!   `resume` hands the rings back from local state (with any base, address
//!   or eventfd set in between).
//! - Status: SET_STATUS/GET_STATUS with the STATUS protocol feature (the vhost
//!   crate lacks them; see `conn.rs`), else local. `set_status(0)` takes the
//!   rings back, forgets ring layout and features, keeps mappings and
//!   eventfds.
//! - Config: from the device with the CONFIG protocol feature, else
//!   synthesized (MAC given or random locally administered, LINK_UP, pairs,
//!   MTU), and then MAC/STATUS/MTU are offered as features.
//! - Features: what the device offers minus PROTOCOL_FEATURES, IN_ORDER,
//!   RING_PACKED, ACCESS_PLATFORM and the control-queue family (see
//!   `features.rs`); MQ only with more than one pair.
//! - Connecting or listening: by default we connect to a device that
//!   listens; with [`VhostUserOptions::listen`] we listen and the device
//!   connects (net_vhost `client=1`, OVS-DPDK `dpdkvhostuserclient`).
//! - Reconnect: a thread watches the socket; when the device goes away it
//!   reconnects with backoff (100 ms doubling to 2 s), or in listening mode
//!   waits for the device to connect again, negotiates again and replays
//!   features, status, dirty log, memory table and rings.
//!   [`VhostUserNet::connection_generation`] counts connections. While the
//!   device is away every operation is recorded and answered from local
//!   state (nothing is lost, the daemon's VMM is not disturbed); a ring the
//!   device had restarts at the used index in its memory (what the device
//!   last published), unless the caller sets a base first. The one answer
//!   that cannot be given is the position of such a ring whose used ring is
//!   not mapped: `BackendError::Device("disconnected: ...")`.
//!   Restarting at the used index re-offers every chain the dead device had
//!   taken but not completed (their avail slots and descriptors are still
//!   intact), so for a device that completes chains in order, as DPDK does,
//!   nothing is lost and nothing needs resubmitting; a TX chain may be sent
//!   twice. A device completing out of order would need INFLIGHT_SHMFD,
//!   which is not implemented.
//! - Dirty logging: [`DeviceBackend::has_dirty_log`] says whether the device
//!   offers LOG_ALL with LOG_SHMFD. Then [`VhostUserNet::set_dirty_log`]
//!   hands the device a log (SET_LOG_BASE with the fd, LOG_ALL in the
//!   features) and [`VhostUserNet::set_vring_log_addr`] names the address it
//!   logs for each used ring (VHOST_VRING_F_LOG), so passthrough can stay on
//!   during a migration. The device logs by its addresses, our IOVAs: the
//!   log is a guest-physical log only where IOVA = GPA. Not in the
//!   `DeviceBackend` trait yet (inherent methods).
//!
//! DPDK 22.11 net_vhost (testpmd), as found by the tests in
//! `tests/vhost_user_dpdk.rs` and in DPDK's lib/vhost/vhost_user.c:
//! - GET_VRING_BASE on *any* ring stops the whole device (destroy_device),
//!   and net_vhost then forgets which other rings were ready: they stay dead
//!   (no error anywhere) until their ready state changes, even after the
//!   stopped ring is set up again. The backend re-sends SET_VRING_KICK on
//!   every other ring it still gives the device, which toggles their ready
//!   state; without it the MQ test stops passing traffic on pair 0 after a
//!   `vring_base` of queue 3.
//! - A ring does not start without a call fd: `set_vring_call(None)` gives
//!   it a private eventfd nobody reads.
//! - Ring addresses are translated at SET_VRING_KICK (and SET_VRING_ADDR on
//!   an enabled ring); if the used index in ring memory differs from the
//!   SET_VRING_BASE value, DPDK continues from the used index with only a
//!   warning (read in the source, not tested). A relay must keep used idx ==
//!   base (the trait contract does).
//! - SET_MEM_TABLE under running rings is fine: DPDK locks all queues,
//!   remaps and re-translates the rings (tested under traffic). A ring whose
//!   memory is not in the table when it is set up is never translated by a
//!   later SET_MEM_TABLE (read in the source), hence rings are set up only
//!   once their memory is mapped.
//! - No CONFIG, no CONFIGURE_MEM_SLOTS; offers STATUS, REPLY_ACK, MQ,
//!   LOG_SHMFD (with LOG_ALL); the relay sees features 0x1_3c01_e7eb
//!   (with the synthesized MAC/STATUS/MTU).
//! - SET_LOG_BASE is answered with an empty reply (what QEMU expects); the
//!   vhost crate's `set_log_base` wants the log region back and fails, so
//!   the message is written in `conn.rs`.
//! - testpmd drains its RX queues when forwarding starts: a device that
//!   connects to us (client=1) can be ready before that, and packets sent in
//!   between are dropped. The tests wait for forwarding to start.
//! - GET_VRING_BASE waits for the forwarding core to leave the ring, and
//!   every burst completes before its call returns, so the base read after
//!   `suspend` equals the used index in memory (checked for every queue).

mod conn;
mod features;
mod inner;
mod memtable;
mod monitor;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{BackendError, DeviceBackend, DmaRegion, IovaRange, Result, VringAddrs};
use conn::Conn;
use inner::Inner;
use monitor::Shared;

pub(crate) const LOG: &str = "vhost-user";

/// How to talk to the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserOptions {
    /// Queue pairs the relay uses (the device must have at least 2x queues).
    pub queue_pairs: u16,
    /// MAC for the synthesized config space; random locally administered if
    /// `None`. Ignored when the device has its own config space.
    pub mac: Option<[u8; 6]>,
    /// MTU for the synthesized config space.
    pub mtu: u16,
    /// Largest ring size accepted (vhost-user cannot ask the device).
    pub max_queue_size: u16,
    /// A device that takes longer than this to answer a request is treated
    /// as gone (and reconnected).
    pub reply_timeout: Duration,
    /// Listen on the path and let the device connect (DPDK net_vhost with
    /// `client=1`, OVS-DPDK `dpdkvhostuserclient` ports), instead of
    /// connecting to a device that listens. A device that goes away is
    /// waited for on the same socket.
    pub listen: bool,
    /// Listening mode: how long `connect_with` waits for the device's first
    /// connection.
    pub accept_timeout: Duration,
}

impl Default for VhostUserOptions {
    fn default() -> Self {
        VhostUserOptions {
            queue_pairs: 1,
            mac: None,
            mtu: 1500,
            max_queue_size: 32768,
            reply_timeout: Duration::from_secs(5),
            listen: false,
            accept_timeout: Duration::from_secs(30),
        }
    }
}

pub use crate::DirtyLogArea;

/// A vhost-user virtio-net device. Dropping it stops the reconnect thread and
/// closes the connection (the device then stops its rings).
pub struct VhostUserNet {
    shared: Arc<Shared>,
    monitor: Option<JoinHandle<()>>,
    features: u64,
    queues: usize,
    max_queue_size: u16,
    dirty_log: bool,
}

impl VhostUserNet {
    /// Connects to the device listening on `path` and negotiates with it.
    pub fn connect(path: &Path, queue_pairs: u16) -> Result<Self> {
        Self::connect_with(
            path,
            VhostUserOptions {
                queue_pairs,
                ..VhostUserOptions::default()
            },
        )
    }

    pub fn connect_with(path: &Path, opts: VhostUserOptions) -> Result<Self> {
        let max = opts.max_queue_size;
        if max == 0 || !max.is_power_of_two() || max > 32768 {
            return Err(BackendError::InvalidQueueSize(max, 32768));
        }
        // The vhost crate caps a device at VHOST_USER_MAX_VRINGS queues.
        if opts.queue_pairs == 0 || opts.queue_pairs > 128 {
            return Err(BackendError::Device(format!(
                "vhost-user: {} queue pairs requested, 1..=128 supported",
                opts.queue_pairs
            )));
        }
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let listener = if opts.listen {
            Some(listen_on(path)?)
        } else {
            None
        };
        let conn = match &listener {
            None => Conn::open(path, opts.queue_pairs, opts.reply_timeout),
            Some(l) => {
                let ready = monitor::wait(
                    &wake,
                    Some((l.as_raw_fd(), libc::POLLIN)),
                    Some(opts.accept_timeout),
                );
                if !ready {
                    let _ = std::fs::remove_file(path);
                    return Err(BackendError::Device(format!(
                        "vhost-user: no device connected to {} within {:?}",
                        path.display(),
                        opts.accept_timeout
                    )));
                }
                let (sock, _) = l.accept()?;
                Conn::negotiate(sock, opts.queue_pairs, opts.reply_timeout)
            }
        }
        .map_err(|e| BackendError::Device(format!("vhost-user device {}: {e}", path.display())))?;
        let inner = Inner::new(path.to_path_buf(), opts.clone(), conn, Arc::clone(&wake))?;
        let features = inner.relay_features();
        let dirty_log = features::device_logs_dirty_pages(inner.device_offer, inner.proto);
        let shared = Arc::new(Shared {
            inner: std::sync::Mutex::new(inner),
            wake,
            stop: AtomicBool::new(false),
            listener,
        });
        let s = Arc::clone(&shared);
        let monitor = std::thread::Builder::new()
            .name("vu-reconnect".into())
            .spawn(move || monitor::run(s))?;
        Ok(VhostUserNet {
            shared,
            monitor: Some(monitor),
            features,
            queues: 2 * usize::from(opts.queue_pairs),
            max_queue_size: max,
            dirty_log,
        })
    }

    /// Connections made so far: 1 after `connect`, +1 for each reconnect.
    /// A change tells the caller the device lost what was in flight.
    pub fn connection_generation(&self) -> u64 {
        self.shared.lock().generation
    }

    /// Whether the device is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().conn.is_some()
    }

    /// The vhost-user protocol features negotiated on the first connection.
    pub fn protocol_features(&self) -> u64 {
        self.shared.lock().proto.bits()
    }

    /// Starts (`Some`) or stops (`None`) dirty logging by the device. A new
    /// log replaces the old one: with REPLY_ACK the device no longer writes
    /// the old log when this returns. Replayed after a reconnect.
    pub fn set_dirty_log(&mut self, log: Option<DirtyLogArea>) -> Result<()> {
        self.shared.lock().set_dirty_log(log)
    }

    /// The address the device logs as written when it updates ring `queue`'s
    /// used ring (vhost's log_guest_addr; the used ring's guest-physical
    /// address in passthrough), or `None` to not log it.
    pub fn set_vring_log_addr(&mut self, queue: usize, addr: Option<u64>) -> Result<()> {
        self.with_queue(queue, |i| i.set_vring_log_addr(queue, addr))
    }

    fn with_queue<R>(&self, q: usize, f: impl FnOnce(&mut Inner) -> Result<R>) -> Result<R> {
        let mut inner = self.shared.lock();
        inner.check_queue(q)?;
        f(&mut inner)
    }
}

impl DeviceBackend for VhostUserNet {
    fn kind(&self) -> &'static str {
        "vhost-user"
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        self.shared.lock().set_features(features)
    }

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn iova_range(&self) -> IovaRange {
        memtable::IOVA_RANGE
    }

    fn config_size(&self) -> usize {
        features::CONFIG_SIZE
    }

    fn get_config(&self, offset: u32, buf: &mut [u8]) -> Result<()> {
        self.shared.lock().get_config(offset, buf)
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.shared.lock().set_config(offset, data)
    }

    fn set_status(&mut self, status: u8) -> Result<()> {
        self.shared.lock().set_status(status)
    }

    fn status(&self) -> u8 {
        self.shared.lock().status
    }

    fn dma_map(&mut self, region: DmaRegion) -> Result<()> {
        self.shared.lock().dma_map(region)
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        self.shared.lock().dma_unmap(iova, size)
    }

    fn set_vring_num(&mut self, queue: usize, num: u16) -> Result<()> {
        self.with_queue(queue, |i| i.set_vring_num(queue, num))
    }

    fn set_vring_addr(&mut self, queue: usize, addrs: VringAddrs) -> Result<()> {
        self.with_queue(queue, |i| i.set_vring_addr(queue, addrs))
    }

    fn set_vring_base(&mut self, queue: usize, base: u16) -> Result<()> {
        self.with_queue(queue, |i| i.set_vring_base(queue, base))
    }

    fn vring_base(&mut self, queue: usize) -> Result<u16> {
        self.with_queue(queue, |i| i.vring_base(queue))
    }

    fn set_vring_base_packed(&mut self, queue: usize, base: u32) -> Result<()> {
        self.with_queue(queue, |i| i.set_vring_base_packed(queue, base))
    }

    fn vring_base_packed(&mut self, queue: usize) -> Result<u32> {
        self.with_queue(queue, |i| i.vring_base_packed(queue))
    }

    fn set_vring_kick(&mut self, queue: usize, fd: Arc<EventFd>) -> Result<()> {
        self.with_queue(queue, |i| i.set_vring_kick(queue, fd))
    }

    fn set_vring_call(&mut self, queue: usize, fd: Option<Arc<EventFd>>) -> Result<()> {
        self.with_queue(queue, |i| i.set_vring_call(queue, fd))
    }

    fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<()> {
        self.with_queue(queue, |i| i.set_vring_enable(queue, enable))
    }

    fn suspend(&mut self) -> Result<()> {
        self.shared.lock().suspend()
    }

    fn resume(&mut self) -> Result<()> {
        self.shared.lock().resume()
    }

    fn has_dirty_log(&self) -> bool {
        self.dirty_log
    }

    fn set_dirty_log(&mut self, log: Option<DirtyLogArea>) -> Result<()> {
        VhostUserNet::set_dirty_log(self, log)
    }

    fn set_vring_log_addr(&mut self, queue: usize, addr: Option<u64>) -> Result<()> {
        VhostUserNet::set_vring_log_addr(self, queue, addr)
    }
}

impl Drop for VhostUserNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.monitor.take() {
            if t.join().is_err() {
                log::error!(target: LOG, "the vhost-user reconnect thread panicked");
            }
        }
        if self.shared.listener.is_some() {
            let _ = std::fs::remove_file(&self.shared.lock().path);
        }
    }
}

/// Binds the listening socket, replacing a stale socket file (one nobody
/// listens on) but nothing else.
fn listen_on(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let stale = meta.file_type().is_socket() && UnixStream::connect(path).is_err();
        if !stale {
            return Err(BackendError::Device(format!(
                "vhost-user: {} exists and is not a stale socket",
                path.display()
            )));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}
