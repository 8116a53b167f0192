//! The software NIC as a VDUSE device (vDPA Device in Userspace).
//!
//! [`VduseNet`] creates a virtio-net device through `/dev/vduse/control` and
//! serves the kernel's requests with the sim ([`SimNet`]) as the device: once
//! the operator adds it to the vDPA bus (`vdpa dev add name NAME mgmtdev
//! vduse`) and it binds to `vhost_vdpa`, it is a `/dev/vhost-vdpa-N` exactly as
//! a hardware vDPA NIC would be, for QEMU's `-netdev vhost-vdpa` or for
//! `svq-relay --backend vdpa:/dev/vhost-vdpa-N`.
//!
//! How the kernel's requests map onto the sim:
//! - SET_STATUS: FEATURES_OK reads the driver's features
//!   (VDUSE_DEV_GET_FEATURES) into the sim, ACCESS_PLATFORM removed (the sim
//!   always translates through its IOTLB); DRIVER_OK reads every ring
//!   (VDUSE_VQ_GET_INFO: size, the three addresses, the avail index, ready),
//!   gives the ready ones to the sim with a kick eventfd registered with the
//!   kernel (VDUSE_VQ_SETUP_KICKFD, again after every reset: the kernel drops
//!   it) and a call eventfd this server turns into VDUSE_VQ_INJECT_IRQ;
//!   status 0 resets the sim (its mappings stay, as the kernel's do).
//! - GET_VQ_STATE: the sim's next avail index (it completes every chain it
//!   takes before it lets go of a ring, so that is also its used index).
//! - UPDATE_IOTLB: the mappings in the range are mirrored ([`iotlb`]).
//! - Anything else is answered FAILED and logged.
//!
//! What Linux 6.12's VDUSE allows for a net device, and so what this device
//! offers: VERSION_1 and ACCESS_PLATFORM are required; CTRL_VQ is refused
//! (so no control queue, and more than one queue pair is offered as MQ
//! without CTRL_VQ, as the sim does); the config space is read-only after
//! creation; there is no suspend or resume (a frontend that must stop the
//! device resets it); there is no message when a ring is enabled or
//! disabled after DRIVER_OK, so a ring enabled late starts at its first kick
//! (the kernel delivers kicks only for enabled rings) and a ring disabled
//! after DRIVER_OK keeps running until the next reset; one address space
//! (API version 0); creating a net device needs CAP_NET_ADMIN.

mod iotlb;
pub mod sys;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::sim::{SimConfig, SimNet, SimQueueStats};
use crate::{BackendError, DeviceBackend, VringAddrs};
pub use iotlb::{IotlbMirror, SyncReport};
use sys::{Control, DevConfig, KernelVduse, Request, Response, VduseIoctls, VqInfo};
use virtio_features::{self as bits, status};

const LOG: &str = "vduse";

const VIRTIO_ID_NET: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VduseError {
    #[error("VDUSE: {0}")]
    Kernel(#[source] io::Error),
    #[error("the sim device: {0}")]
    Device(#[source] BackendError),
    #[error("the kernel sent an IOTLB entry that cannot be mapped: {0}")]
    BadEntry(String),
    #[error("IOTLB update for the empty range {start:#x}..={last:#x}")]
    BadRange { start: u64, last: u64 },
    #[error("queue {index}: {why}")]
    BadQueue { index: u32, why: String },
    #[error("{0}")]
    Config(String),
}

/// Counters of the control plane, for the operator and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub requests: u64,
    pub failed: u64,
    pub iotlb_updates: u64,
    pub maps: u64,
    pub unmaps: u64,
    pub irqs: u64,
    pub resets: u64,
}

/// The server: the kernel's side of one VDUSE device and the sim behind it.
pub struct VduseNet<D: VduseIoctls> {
    dev: D,
    sim: SimNet,
    status: u8,
    kicks: Vec<Arc<EventFd>>,
    calls: Vec<Arc<EventFd>>,
    /// Set up but not enabled at DRIVER_OK (see `start_ring`).
    waiting: Vec<bool>,
    iotlb: IotlbMirror,
    stats: ServerStats,
}

/// The features the VDUSE device is created with: the sim's, plus
/// ACCESS_PLATFORM (VDUSE requires it), never CTRL_VQ (6.12 refuses it)
/// nor RING_PACKED (this server moves ring state in the split layout of
/// VDUSE_VQ_GET_INFO).
pub fn vduse_features(sim: &SimNet) -> u64 {
    (sim.device_features() | bits::F_ACCESS_PLATFORM) & !(bits::NET_F_CTRL_VQ | bits::F_RING_PACKED)
}

impl<D: VduseIoctls> VduseNet<D> {
    /// A server over an already created device `dev`.
    pub fn new(dev: D, sim: SimNet) -> io::Result<Self> {
        let n = sim.num_queues();
        let mk = || EventFd::new(EFD_NONBLOCK).map(Arc::new);
        let kicks = (0..n).map(|_| mk()).collect::<io::Result<Vec<_>>>()?;
        let calls = (0..n).map(|_| mk()).collect::<io::Result<Vec<_>>>()?;
        Ok(VduseNet {
            dev,
            sim,
            status: 0,
            kicks,
            calls,
            waiting: vec![false; n],
            iotlb: IotlbMirror::default(),
            stats: ServerStats::default(),
        })
    }

    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    pub fn queue_stats(&self, queue: usize) -> Option<SimQueueStats> {
        self.sim.queue_stats(queue)
    }

    pub fn num_queues(&self) -> usize {
        self.sim.num_queues()
    }

    pub fn mappings(&self) -> Vec<(u64, u64, u8)> {
        self.iotlb.mappings()
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// Answers every pending request. Returns how many were handled.
    pub fn serve_requests(&mut self) -> io::Result<usize> {
        let mut n = 0;
        while let Some(req) = self.dev.read_request()? {
            let resp = self.handle(req);
            self.dev.write_response(&resp)?;
            n += 1;
        }
        Ok(n)
    }

    /// One request: the answer the kernel gets.
    pub fn handle(&mut self, req: Request) -> Response {
        self.stats.requests += 1;
        let id = req.id();
        let result = match req {
            Request::GetVqState { index, .. } => self.vq_state(index).map(Some),
            Request::SetStatus { status, .. } => self.set_status(status).map(|()| None),
            Request::UpdateIotlb { start, last, .. } => {
                self.stats.iotlb_updates += 1;
                let r = self.iotlb.sync(&self.dev, &mut self.sim, start, last);
                r.map(|rep| {
                    self.stats.maps += rep.mapped as u64;
                    self.stats.unmaps += rep.unmapped as u64;
                    None
                })
            }
            Request::Unknown { kind, .. } => Err(VduseError::Config(format!(
                "request type {kind} is not one this server knows"
            ))),
        };
        match result {
            Ok(avail_index) => Response {
                id,
                ok: true,
                avail_index,
            },
            Err(e) => {
                self.stats.failed += 1;
                log::error!(target: LOG, "{req:?} failed: {e}");
                Response {
                    id,
                    ok: false,
                    avail_index: None,
                }
            }
        }
    }

    fn vq_state(&mut self, index: u32) -> Result<u16, VduseError> {
        let q = self.queue(index)?;
        if self.status & status::DRIVER_OK != 0 && !self.waiting[q] {
            return self.sim.vring_base(q).map_err(VduseError::Device);
        }
        // Not started (or not enabled yet): what the driver set is still
        // only in the kernel.
        Ok(self
            .dev
            .vq_info(index)
            .map_err(VduseError::Kernel)?
            .avail_index())
    }

    fn queue(&self, index: u32) -> Result<usize, VduseError> {
        let q = index as usize;
        if q >= self.sim.num_queues() {
            return Err(VduseError::BadQueue {
                index,
                why: format!("the device has {} queues", self.sim.num_queues()),
            });
        }
        Ok(q)
    }

    fn set_status(&mut self, new: u8) -> Result<(), VduseError> {
        if new == 0 {
            self.stats.resets += 1;
            self.status = 0;
            self.waiting.iter_mut().for_each(|w| *w = false);
            return self.sim.set_status(0).map_err(VduseError::Device);
        }
        let added = new & !self.status;
        if self.status & !new != 0 {
            return Err(VduseError::Config(format!(
                "status {new:#x} clears bits of {:#x} without a reset",
                self.status
            )));
        }
        if added & status::FEATURES_OK != 0 {
            let f = self.dev.driver_features().map_err(VduseError::Kernel)?;
            self.sim
                .set_features(f & !bits::F_ACCESS_PLATFORM)
                .map_err(VduseError::Device)?;
        }
        if added & status::DRIVER_OK != 0 {
            for index in 0..self.sim.num_queues() as u32 {
                self.start_ring(index)?;
            }
        }
        self.sim.set_status(new).map_err(VduseError::Device)?;
        self.status = new;
        Ok(())
    }

    /// Gives one ring, as the driver set it up, to the sim; a ring the driver
    /// has not enabled yet waits for its first kick (the kernel sends no
    /// message when a ring is enabled after DRIVER_OK, but it does deliver
    /// that ring's kicks to the eventfd registered here).
    fn start_ring(&mut self, index: u32) -> Result<(), VduseError> {
        let q = index as usize;
        self.dev
            .set_kickfd(index, &self.kicks[q])
            .map_err(VduseError::Kernel)?;
        let info = self.dev.vq_info(index).map_err(VduseError::Kernel)?;
        if info.ready == 0 {
            self.waiting[q] = true;
            return Ok(());
        }
        self.give_ring(&info)
    }

    fn give_ring(&mut self, info: &VqInfo) -> Result<(), VduseError> {
        let index = info.index;
        let q = index as usize;
        let num = u16::try_from(info.num)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| VduseError::BadQueue {
                index,
                why: format!("ring size {}", info.num),
            })?;
        let dev = VduseError::Device;
        self.sim.set_vring_num(q, num).map_err(dev)?;
        self.sim
            .set_vring_addr(
                q,
                VringAddrs {
                    desc: info.desc_addr,
                    avail: info.driver_addr,
                    used: info.device_addr,
                },
            )
            .map_err(dev)?;
        self.sim
            .set_vring_base(q, info.avail_index())
            .map_err(dev)?;
        self.sim
            .set_vring_kick(q, Arc::clone(&self.kicks[q]))
            .map_err(dev)?;
        self.sim
            .set_vring_call(q, Some(Arc::clone(&self.calls[q])))
            .map_err(dev)?;
        self.sim.set_vring_enable(q, true).map_err(dev)?;
        self.waiting[q] = false;
        log::info!(
            target: LOG,
            "queue {index}: size {num}, desc {:#x}, avail {:#x}, used {:#x}, base {}",
            info.desc_addr,
            info.driver_addr,
            info.device_addr,
            info.avail_index()
        );
        Ok(())
    }

    /// Queues that are set up in the kernel but not enabled yet: the server
    /// watches their kick eventfds.
    pub fn waiting_queues(&self) -> Vec<usize> {
        (0..self.waiting.len())
            .filter(|&q| self.waiting[q])
            .collect()
    }

    /// A kick on a ring that was not enabled at DRIVER_OK: start it if the
    /// driver has enabled it since. The kick itself stays in the eventfd
    /// for the sim (which also processes a ring once when it is enabled).
    pub fn kick_while_waiting(&mut self, q: usize) {
        if !self.waiting.get(q).copied().unwrap_or(false) {
            return;
        }
        let started = self
            .dev
            .vq_info(q as u32)
            .map_err(VduseError::Kernel)
            .and_then(|info| {
                if info.ready == 0 {
                    return Ok(false);
                }
                self.give_ring(&info).map(|()| true)
            });
        match started {
            Ok(true) => {}
            // Not enabled: a kick the kernel would not have delivered; drop it.
            Ok(false) => {
                let _ = self.kicks[q].read();
            }
            Err(e) => {
                let _ = self.kicks[q].read();
                self.waiting[q] = false;
                log::error!(target: LOG, "queue {q}: late start failed: {e}");
            }
        }
    }

    /// The sim signalled queue `q`: interrupt the driver.
    pub fn forward_call(&mut self, q: usize) {
        let Some(call) = self.calls.get(q) else {
            return;
        };
        if call.read().is_err() {
            return;
        }
        match self.dev.inject_irq(q as u32) {
            Ok(()) => self.stats.irqs += 1,
            // EINVAL: DRIVER_OK went away in between; the driver resets.
            Err(e) => log::debug!(target: LOG, "queue {q}: VDUSE_VQ_INJECT_IRQ: {e}"),
        }
    }

    /// Serves the device until `stop` is readable (or the kernel reports the
    /// device broken).
    pub fn run(&mut self, stop: &EventFd) -> io::Result<()> {
        const TOKEN_STOP: u64 = u64::MAX;
        const TOKEN_REQ: u64 = u64::MAX - 1;
        // Kick eventfds of waiting rings: tokens n..2n (calls are 0..n).
        let n = self.calls.len() as u64;
        let epoll = Epoll::new()?;
        let ctl = |op: ControlOperation, fd: RawFd, token: u64| {
            epoll.ctl(op, fd, EpollEvent::new(EventSet::IN, token))
        };
        ctl(ControlOperation::Add, stop.as_raw_fd(), TOKEN_STOP)?;
        ctl(ControlOperation::Add, self.dev.request_fd(), TOKEN_REQ)?;
        for (q, c) in self.calls.iter().enumerate() {
            ctl(ControlOperation::Add, c.as_raw_fd(), q as u64)?;
        }
        let mut watched = vec![false; self.kicks.len()];
        let mut events = vec![EpollEvent::default(); 8 + 2 * self.calls.len()];
        loop {
            for (q, w) in watched.iter_mut().enumerate() {
                let want = self.waiting[q];
                if want != *w {
                    let op = if want {
                        ControlOperation::Add
                    } else {
                        ControlOperation::Delete
                    };
                    ctl(op, self.kicks[q].as_raw_fd(), n + q as u64)?;
                    *w = want;
                }
            }
            let count = match epoll.wait(-1, &mut events) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..count] {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_REQ => {
                        if ev.event_set().contains(EventSet::ERROR) {
                            return Err(io::Error::other(
                                "the kernel marked the VDUSE device broken (a request timed out)",
                            ));
                        }
                        self.serve_requests()?;
                    }
                    t if t >= n => self.kick_while_waiting((t - n) as usize),
                    q => self.forward_call(q as usize),
                }
            }
        }
    }
}

/// What to create.
#[derive(Clone, Debug)]
pub struct VduseConfig {
    /// The device's name: `/dev/vduse/NAME` and the vDPA device name.
    pub name: String,
    pub sim: SimConfig,
}

/// A created VDUSE device and its server. Dropping it destroys the device
/// (the kernel refuses while it is still on the vDPA bus: `vdpa dev del`
/// first; that refusal is logged).
pub struct VduseDevice {
    // An Option only so that Drop can close the device fd before it asks the
    // kernel to destroy the device (an open fd keeps it busy).
    server: Option<VduseNet<KernelVduse>>,
    control: Control,
    name: String,
}

impl VduseDevice {
    /// VDUSE_CREATE_DEV with the sim's features and config space, then
    /// VDUSE_VQ_SETUP for every queue.
    pub fn create(cfg: VduseConfig) -> Result<VduseDevice, VduseError> {
        let sim = SimNet::new(cfg.sim.clone()).map_err(VduseError::Device)?;
        let mut space = vec![0u8; sim.config_size()];
        sim.get_config(0, &mut space).map_err(VduseError::Device)?;
        let config = DevConfig {
            name: sys::name_bytes(&cfg.name).map_err(VduseError::Kernel)?,
            vendor_id: 0,
            device_id: VIRTIO_ID_NET,
            features: vduse_features(&sim),
            vq_num: sim.num_queues() as u32,
            vq_align: 4096,
            reserved: [0; 13],
            config_size: space.len() as u32,
        };
        let control = Control::open().map_err(|e| {
            VduseError::Config(format!(
                "{}: {e} (is the vduse module loaded?)",
                sys::CONTROL_PATH
            ))
        })?;
        control.create(&config, &space).map_err(|e| {
            VduseError::Config(format!(
                "VDUSE_CREATE_DEV {:?}: {e} (the name in use, or features the kernel refuses: {:#x})",
                cfg.name, config.features
            ))
        })?;
        let dev = match open_when_present(&cfg.name) {
            Ok(d) => d,
            Err(e) => {
                let _ = control.destroy(&cfg.name);
                return Err(VduseError::Kernel(e));
            }
        };
        for index in 0..config.vq_num {
            if let Err(e) = dev.setup_vq(index, cfg.sim.max_queue_size) {
                let _ = control.destroy(&cfg.name);
                return Err(VduseError::Kernel(e));
            }
        }
        let server = VduseNet::new(dev, sim).map_err(VduseError::Kernel)?;
        log::info!(
            target: LOG,
            "created /dev/vduse/{}: features {:#x}, {} queues",
            cfg.name,
            config.features,
            config.vq_num
        );
        Ok(VduseDevice {
            server: Some(server),
            control,
            name: cfg.name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn server(&mut self) -> &mut VduseNet<KernelVduse> {
        self.server.as_mut().expect("the server lives until drop")
    }
}

/// The device node appears when udev or devtmpfs gets to it.
fn open_when_present(name: &str) -> io::Result<KernelVduse> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match KernelVduse::open(name) {
            Ok(d) => return Ok(d),
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e),
        }
    }
}

impl Drop for VduseDevice {
    fn drop(&mut self) {
        drop(self.server.take());
        if let Err(e) = self.control.destroy(&self.name) {
            log::warn!(
                target: LOG,
                "VDUSE_DESTROY_DEV {:?}: {e} (still on the vDPA bus? `vdpa dev del {}`)",
                self.name,
                self.name
            );
        }
    }
}
