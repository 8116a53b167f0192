//! The backend's local state (the source of truth) and how it is pushed to
//! the device, now or when the device comes back.
//!
//! A ring is *armed* when the device has it: NUM, BASE, ADDR, KICK, CALL and
//! ENABLE were sent since the last GET_VRING_BASE. vhost-user has no way to
//! read a ring position without stopping the ring, so every read of a running
//! ring disarms it, and it is armed again from local state.

use std::path::PathBuf;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::MmapRegion;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::conn::{is_broken, Conn, VuResult};
use super::features::{bits, config_bytes, relay_features, status, wire_features, CONFIG_SIZE};
use super::memtable::{placeholder, MemTable};
use super::{DirtyLogArea, VhostUserOptions, LOG};
use crate::{BackendError, DmaRegion, Result, VringAddrs};

const BUSY: &str = "the queue is running (disable it or suspend the device first)";

#[derive(Default)]
pub(crate) struct Ring {
    pub(crate) num: Option<u16>,
    pub(crate) addrs: Option<VringAddrs>,
    /// The position given to the device: the next avail index (split), or
    /// the avail index with its wrap counter in bit 15 (packed).
    pub(crate) base: u16,
    /// Packed rings: the used index with its wrap counter, the high half of
    /// the vhost-user position (the device gets only the low half: the
    /// vhost crate's SET_VRING_BASE carries 16 bits, which is all DPDK reads).
    pub(crate) used_half: u16,
    pub(crate) kick: Option<Arc<EventFd>>,
    pub(crate) call: Option<Arc<EventFd>>,
    pub(crate) enabled: bool,
    /// The device has the ring.
    pub(crate) armed: bool,
    /// Stopped by `vring_base` while it ran: stays stopped until started
    /// explicitly (kick, enable, resume, DRIVER_OK).
    pub(crate) parked: bool,
    /// The device went away while it had the ring; its position is the used
    /// index in ring memory (what the device last published).
    pub(crate) lost: bool,
    /// Where the device logs its used-ring writes while dirty logging is on.
    pub(crate) log_addr: Option<u64>,
}

fn ring_sizes(num: u16) -> (u64, u64, u64) {
    let n = u64::from(num);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    pub(crate) opts: VhostUserOptions,
    pub(crate) conn: Option<Conn>,
    /// Successful connections so far (1 after `connect`).
    pub(crate) generation: u64,
    /// Virtio features the device offered on the first connection: what the
    /// relay was told, so later connections must offer at least the acked part.
    pub(crate) device_offer: u64,
    /// The first connection had CONFIG: config space comes from the device.
    pub(crate) device_config: bool,
    pub(crate) proto: VhostUserProtocolFeatures,
    pub(crate) features: Option<u64>,
    pub(crate) status: u8,
    pub(crate) suspended: bool,
    pub(crate) table: MemTable,
    placeholder: Arc<MmapRegion>,
    pub(crate) rings: Vec<Ring>,
    /// The synthesized config, or the device's as last read.
    pub(crate) config: [u8; CONFIG_SIZE],
    /// Given to the device for a ring the caller polls (`set_vring_call(None)`):
    /// DPDK does not start a ring without a call fd.
    dummy_call: Arc<EventFd>,
    /// Wakes the reconnect thread.
    pub(crate) wake: Arc<EventFd>,
    /// The dirty log the device writes, while logging is on.
    pub(crate) log: Option<DirtyLogArea>,
}

impl Inner {
    pub(crate) fn new(
        path: PathBuf,
        opts: VhostUserOptions,
        mut conn: Conn,
        wake: Arc<EventFd>,
    ) -> Result<Inner> {
        let device_config = conn.has(VhostUserProtocolFeatures::CONFIG);
        let mac = opts.mac.unwrap_or_else(super::features::random_mac);
        let mut config = config_bytes(mac, opts.queue_pairs, opts.mtu);
        if device_config {
            let (_, payload) = conn
                .bounded(|c| {
                    c.fe.get_config(
                        0,
                        CONFIG_SIZE as u32,
                        VhostUserConfigFlags::empty(),
                        &[0u8; CONFIG_SIZE],
                    )
                })
                .map_err(|e| BackendError::Device(format!("vhost-user GET_CONFIG: {e}")))?;
            config.copy_from_slice(&payload[..CONFIG_SIZE]);
        }
        let rings = (0..2 * usize::from(opts.queue_pairs))
            .map(|_| Ring::default())
            .collect();
        Ok(Inner {
            path,
            device_offer: conn.offered,
            proto: conn.proto,
            device_config,
            opts,
            conn: Some(conn),
            generation: 1,
            features: None,
            status: 0,
            suspended: false,
            table: MemTable::default(),
            placeholder: placeholder()?,
            rings,
            config,
            dummy_call: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            wake,
            log: None,
        })
    }

    pub(crate) fn relay_features(&self) -> u64 {
        relay_features(
            self.device_offer,
            !self.device_config,
            self.opts.queue_pairs,
        )
    }

    /// Runs one exchange with the device. `Ok(None)`: there is no device right
    /// now (or it just went away); the local state will be replayed when it
    /// comes back.
    fn io<T>(&mut self, what: &str, f: impl FnOnce(&mut Conn) -> VuResult<T>) -> Result<Option<T>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        match conn.bounded(f) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_broken(&e) => {
                let why = match conn.timed_out() {
                    Some(t) => format!("{what}: no answer within {t:?}"),
                    None => format!("{what}: {e}"),
                };
                self.lost_connection(&why);
                Ok(None)
            }
            Err(e) => Err(BackendError::Device(format!(
                "vhost-user device {} refused {what}: {e}",
                self.path.display()
            ))),
        }
    }

    pub(crate) fn lost_connection(&mut self, why: &str) {
        if self.conn.take().is_none() {
            return;
        }
        log::warn!(target: LOG, "device {} disconnected ({why}); reconnecting", self.path.display());
        for r in &mut self.rings {
            if r.armed {
                r.armed = false;
                r.lost = true;
            }
        }
        let _ = self.wake.write(1);
    }

    pub(crate) fn check_queue(&self, q: usize) -> Result<()> {
        if q < self.rings.len() {
            Ok(())
        } else {
            Err(BackendError::InvalidQueue {
                index: q,
                count: self.rings.len(),
            })
        }
    }

    fn active(&self, q: usize) -> bool {
        self.rings[q].armed && self.rings[q].enabled
    }

    fn ring_mapped(&self, num: u16, a: VringAddrs) -> bool {
        let (d, av, u) = ring_sizes(num);
        self.table.contains(a.desc, d)
            && self.table.contains(a.avail, av)
            && self.table.contains(a.used, u)
    }

    fn eligible(&self, q: usize) -> bool {
        let r = &self.rings[q];
        let placed = match (r.num, r.addrs) {
            (Some(n), Some(a)) => self.ring_mapped(n, a),
            _ => false,
        };
        !r.armed
            && !r.parked
            && r.enabled
            && r.kick.is_some()
            && placed
            && !self.suspended
            && self.status & status::DRIVER_OK != 0
            && self.features.is_some()
    }

    /// Gives ring `q` to the device from local state.
    fn arm(&mut self, q: usize) -> Result<()> {
        let r = &self.rings[q];
        let (Some(num), Some(a), Some(kick)) = (r.num, r.addrs, r.kick.clone()) else {
            return Ok(());
        };
        let call = r
            .call
            .clone()
            .unwrap_or_else(|| Arc::clone(&self.dummy_call));
        let base = r.base;
        let cfg = self.vring_config(num, a, r.log_addr);
        let done = self.io("ring set-up", |c| {
            c.fe.set_vring_num(q, num)?;
            c.fe.set_vring_base(q, base)?;
            c.fe.set_vring_addr(q, &cfg)?;
            c.fe.set_vring_kick(q, &kick)?;
            c.fe.set_vring_call(q, &call)?;
            if c.offered & bits::F_PROTOCOL_FEATURES != 0 {
                c.fe.set_vring_enable(q, true)?;
            }
            Ok(())
        })?;
        if done.is_some() {
            self.rings[q].armed = true;
            log::debug!(target: LOG, "queue {q} armed: num {num} base {base}");
        }
        Ok(())
    }

    /// SET_VRING_ADDR contents; the used ring is logged while dirty logging
    /// is on and the caller gave a log address.
    fn vring_config(&self, num: u16, a: VringAddrs, log_addr: Option<u64>) -> VringConfigData {
        let log_addr = log_addr.filter(|_| self.log.is_some());
        VringConfigData {
            queue_max_size: num,
            queue_size: num,
            flags: u32::from(log_addr.is_some()), // VHOST_VRING_F_LOG
            desc_table_addr: a.desc,
            used_ring_addr: a.used,
            avail_ring_addr: a.avail,
            log_addr,
        }
    }

    /// SET_FEATURES contents: LOG_ALL is on exactly while dirty logging is.
    fn wire(&self, acked: u64) -> u64 {
        let mut w = wire_features(acked, self.device_offer);
        if self.log.is_some() {
            w |= self.device_offer & bits::F_LOG_ALL;
        }
        w
    }

    /// Re-sends the addresses of every ring the device has (to switch used
    /// ring logging on or off).
    fn resend_addrs(&mut self) -> Result<()> {
        for q in 0..self.rings.len() {
            let r = &self.rings[q];
            let (true, Some(num), Some(a)) = (r.armed, r.num, r.addrs) else {
                continue;
            };
            let cfg = self.vring_config(num, a, r.log_addr);
            self.io("SET_VRING_ADDR", |c| c.fe.set_vring_addr(q, &cfg))?;
        }
        Ok(())
    }

    fn send_log_base(&mut self) -> Result<()> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        let Some(fo) = log.memory.file_offset() else {
            return Err(BackendError::Device(
                "the dirty log must be fd-backed".into(),
            ));
        };
        let (fd, size, off) = (
            std::os::unix::io::AsRawFd::as_raw_fd(fo.file()),
            log.memory.size() as u64,
            fo.start(),
        );
        self.io("SET_LOG_BASE", |c| c.set_log_base(fd, size, off))?;
        Ok(())
    }

    pub(crate) fn set_dirty_log(&mut self, log: Option<DirtyLogArea>) -> Result<()> {
        if !super::features::device_logs_dirty_pages(self.device_offer, self.proto) {
            return Err(BackendError::Unsupported("dirty logging by the device"));
        }
        if let Some(l) = &log {
            if l.memory.file_offset().is_none() || l.memory.size() == 0 {
                return Err(BackendError::Device(
                    "the dirty log must be a non-empty fd-backed region".into(),
                ));
            }
        }
        let starting = log.is_some();
        self.log = log;
        // Order as QEMU: the log, then LOG_ALL, then the rings' log flags;
        // stopping clears LOG_ALL first. With REPLY_ACK the device has
        // switched logs / stopped logging when this returns.
        if starting {
            self.send_log_base()?;
        }
        if let Some(f) = self.features {
            let wire = self.wire(f);
            self.io("SET_FEATURES", |c| c.fe.set_features(wire))?;
        }
        self.resend_addrs()
    }

    pub(crate) fn set_vring_log_addr(&mut self, q: usize, addr: Option<u64>) -> Result<()> {
        let r = &mut self.rings[q];
        if r.log_addr == addr {
            return Ok(());
        }
        r.log_addr = addr;
        if let (true, Some(num), Some(a)) = (r.armed, r.num, r.addrs) {
            if self.log.is_some() {
                let cfg = self.vring_config(num, a, addr);
                self.io("SET_VRING_ADDR", |c| c.fe.set_vring_addr(q, &cfg))?;
            }
        }
        Ok(())
    }

    /// Arms every ring that can run; tries them all and reports the first
    /// failure.
    pub(crate) fn arm_eligible(&mut self) -> Result<()> {
        let mut first = None;
        for q in 0..self.rings.len() {
            if self.eligible(q) {
                if let Err(e) = self.arm(q) {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Takes ring `q` back from the device (GET_VRING_BASE) and returns its
    /// position.
    fn disarm(&mut self, q: usize) -> Result<u16> {
        if self.rings[q].armed {
            let got = self.io("GET_VRING_BASE", |c| c.fe.get_vring_base(q))?;
            let r = &mut self.rings[q];
            if let Some(b) = got {
                // The next avail index (with its wrap counter for packed
                // rings) in the low 16 bits; a packed used position above.
                r.base = b as u16;
                r.used_half = (b >> 16) as u16;
                r.armed = false;
                r.lost = false;
            }
        }
        self.position(q)
    }

    /// Takes one ring back while the others keep running.
    ///
    /// DPDK quirk: GET_VRING_BASE on any ring stops the whole device
    /// (destroy_device), and net_vhost then forgets which of the *other*
    /// rings were ready: they stay dead until their ready state changes. A
    /// new SET_VRING_KICK makes each of them not-ready and ready again. For a
    /// device without this quirk the repeated kick fd is a no-op.
    fn disarm_one(&mut self, q: usize) -> Result<u16> {
        let was_armed = self.rings[q].armed;
        let base = self.disarm(q)?;
        if was_armed {
            for o in 0..self.rings.len() {
                let r = &self.rings[o];
                if o == q || !r.armed {
                    continue;
                }
                if let Some(kick) = r.kick.clone() {
                    self.io("SET_VRING_KICK", |c| c.fe.set_vring_kick(o, &kick))?;
                }
            }
        }
        Ok(base)
    }

    fn packed(&self) -> bool {
        self.features.is_some_and(|f| f & bits::F_RING_PACKED != 0)
    }

    /// The ring position when the device does not have the ring.
    fn position(&mut self, q: usize) -> Result<u16> {
        let r = &self.rings[q];
        if !r.lost {
            return Ok(r.base);
        }
        if self.packed() {
            // A packed ring has no used index in memory to read back: it
            // restarts where the device last reported or was told.
            log::warn!(target: LOG, "queue {q}: the device went away with a packed ring; it restarts at its last known position");
            let r = &mut self.rings[q];
            r.lost = false;
            return Ok(r.base);
        }
        let used = r
            .addrs
            .and_then(|a| self.table.load_u16(a.used.checked_add(2)?));
        match used {
            Some(u) => {
                let r = &mut self.rings[q];
                r.base = u;
                r.lost = false;
                Ok(u)
            }
            None => Err(BackendError::Device(format!(
                "disconnected: the position of queue {q} died with the device and its used ring is not mapped"
            ))),
        }
    }

    fn send_table(&mut self) -> Result<()> {
        let entries = self.table.entries(&self.placeholder);
        self.io("SET_MEM_TABLE", |c| {
            c.fe.set_mem_table(&entries).map(|_| ())
        })?;
        Ok(())
    }

    /// Status messages go to devices with the STATUS protocol feature only;
    /// others get the same effect from ring set-up.
    fn send_status(&mut self, s: u8) -> Result<Option<u8>> {
        let got = self.io("SET_STATUS", |c| {
            if !c.has(VhostUserProtocolFeatures::STATUS) {
                return Ok(None);
            }
            c.set_status(s)?;
            c.get_status().map(Some)
        })?;
        Ok(got.flatten())
    }

    // ---- DeviceBackend operations -------------------------------------

    pub(crate) fn set_features(&mut self, f: u64) -> Result<()> {
        let extra = f & !self.relay_features();
        if extra != 0 {
            return Err(BackendError::UnsupportedFeatures(extra));
        }
        if self.status & status::FEATURES_OK != 0 {
            return Err(BackendError::InvalidState {
                op: "set_features",
                why: "features are fixed once FEATURES_OK is set (reset first)",
            });
        }
        self.features = Some(f);
        let wire = self.wire(f);
        self.io("SET_FEATURES", |c| c.fe.set_features(wire))?;
        Ok(())
    }

    pub(crate) fn set_status(&mut self, s: u8) -> Result<()> {
        if s == 0 {
            return self.reset();
        }
        if self.status & !s != 0 {
            return Err(BackendError::InvalidState {
                op: "set_status",
                why: "status bits can only be cleared by a reset (status 0)",
            });
        }
        self.status = s;
        if s & status::DRIVER_OK != 0 {
            for r in &mut self.rings {
                r.parked = false;
            }
            // Rings first, DRIVER_OK last: the order a virtio driver uses,
            // and DPDK starts the device on the later of the two.
            self.arm_eligible()?;
        }
        if let Some(dev) = self.send_status(s)? {
            if s & status::FEATURES_OK != 0 && dev & status::FEATURES_OK == 0 {
                self.status &= !status::FEATURES_OK;
                return Err(BackendError::Device(
                    "the vhost-user device cleared FEATURES_OK: it refused the features".into(),
                ));
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        let mut first = None;
        for q in 0..self.rings.len() {
            if self.rings[q].armed {
                if let Err(e) = self.disarm(q) {
                    first.get_or_insert(e);
                }
            }
        }
        for r in &mut self.rings {
            // Eventfds stay, as with the sim and vhost-vdpa.
            let (kick, call, armed) = (r.kick.take(), r.call.take(), r.armed);
            *r = Ring {
                kick,
                call,
                armed,
                ..Ring::default()
            };
        }
        self.features = None;
        self.status = 0;
        self.suspended = false;
        if let Err(e) = self.send_status(0) {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    pub(crate) fn get_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        let range = crate::config_range(offset, buf.len(), CONFIG_SIZE)?;
        if self.device_config {
            let len = buf.len() as u32;
            let zeros = vec![0u8; buf.len()];
            let got = self.io("GET_CONFIG", |c| {
                c.fe.get_config(offset, len, VhostUserConfigFlags::empty(), &zeros)
            })?;
            if let Some((_, payload)) = got {
                if payload.len() == buf.len() {
                    self.config[range.clone()].copy_from_slice(&payload);
                }
            }
        }
        buf.copy_from_slice(&self.config[range]);
        Ok(())
    }

    pub(crate) fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let range = crate::config_range(offset, data.len(), CONFIG_SIZE)?;
        if self.device_config {
            self.io("SET_CONFIG", |c| {
                c.fe.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            })?;
            self.config[range].copy_from_slice(data);
            return Ok(());
        }
        // Only the MAC is writable; writes to read-only fields are ignored,
        // as virtio-net devices do.
        for (i, b) in range.zip(data) {
            if i < 6 {
                self.config[i] = *b;
            }
        }
        Ok(())
    }

    pub(crate) fn dma_map(&mut self, region: DmaRegion) -> Result<()> {
        self.table.map(region)?;
        self.send_table()?;
        self.arm_eligible()
    }

    pub(crate) fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        if !self.table.region_holds(iova, iova, 1) {
            return Err(BackendError::NotMapped { iova, size });
        }
        // A ring that lives in the memory going away stops first, so the
        // device never sees a ring it cannot reach; it runs again once its
        // memory is mapped.
        for q in 0..self.rings.len() {
            let r = &self.rings[q];
            let (Some(num), Some(a)) = (r.num, r.addrs) else {
                continue;
            };
            let (d, av, u) = ring_sizes(num);
            let hit = self.table.region_holds(iova, a.desc, d)
                || self.table.region_holds(iova, a.avail, av)
                || self.table.region_holds(iova, a.used, u);
            if hit && r.armed {
                self.disarm_one(q)?;
            }
        }
        self.table.unmap(iova, size)?;
        // With REPLY_ACK the device has dropped the memory when this returns.
        self.send_table()
    }

    /// Ring layout may change only while the device does not run the ring.
    fn before_layout_change(&mut self, q: usize, op: &'static str) -> Result<()> {
        if self.active(q) {
            return Err(BackendError::InvalidState { op, why: BUSY });
        }
        if self.rings[q].armed {
            self.disarm_one(q)?;
        }
        Ok(())
    }

    pub(crate) fn set_vring_num(&mut self, q: usize, num: u16) -> Result<()> {
        let max = self.opts.max_queue_size;
        if num == 0 || !num.is_power_of_two() || num > max {
            return Err(BackendError::InvalidQueueSize(num, max));
        }
        if self.rings[q].num == Some(num) {
            return Ok(());
        }
        self.before_layout_change(q, "set_vring_num")?;
        self.rings[q].num = Some(num);
        self.arm_eligible()
    }

    pub(crate) fn set_vring_addr(&mut self, q: usize, a: VringAddrs) -> Result<()> {
        if self.rings[q].addrs == Some(a) {
            return Ok(());
        }
        if a.desc & 15 != 0 || a.avail & 1 != 0 || a.used & 3 != 0 {
            return Err(BackendError::InvalidState {
                op: "set_vring_addr",
                why: "ring addresses must be aligned (desc 16, avail 2, used 4)",
            });
        }
        self.before_layout_change(q, "set_vring_addr")?;
        self.rings[q].addrs = Some(a);
        self.arm_eligible()
    }

    pub(crate) fn set_vring_base(&mut self, q: usize, base: u16) -> Result<()> {
        self.before_layout_change(q, "set_vring_base")?;
        let r = &mut self.rings[q];
        r.base = base;
        r.lost = false;
        self.arm_eligible()
    }

    pub(crate) fn set_vring_base_packed(&mut self, q: usize, base: u32) -> Result<()> {
        self.set_vring_base(q, base as u16)?;
        self.rings[q].used_half = (base >> 16) as u16;
        Ok(())
    }

    /// A device that keeps one position (DPDK: used = avail once it
    /// completed what it took) reports no used half: the avail half is it.
    pub(crate) fn vring_base_packed(&mut self, q: usize) -> Result<u32> {
        let low = self.vring_base(q)?;
        let r = &self.rings[q];
        let high = if r.used_half == 0 { low } else { r.used_half };
        Ok(u32::from(low) | (u32::from(high) << 16))
    }

    pub(crate) fn vring_base(&mut self, q: usize) -> Result<u16> {
        let was_armed = self.rings[q].armed;
        let base = self.disarm_one(q)?;
        if was_armed {
            self.rings[q].parked = true;
        }
        Ok(base)
    }

    pub(crate) fn set_vring_kick(&mut self, q: usize, fd: Arc<EventFd>) -> Result<()> {
        let r = &mut self.rings[q];
        r.kick = Some(Arc::clone(&fd));
        r.parked = false;
        if r.armed {
            self.io("SET_VRING_KICK", |c| c.fe.set_vring_kick(q, &fd))?;
        }
        self.arm_eligible()
    }

    pub(crate) fn set_vring_call(&mut self, q: usize, fd: Option<Arc<EventFd>>) -> Result<()> {
        let r = &mut self.rings[q];
        r.call = fd.clone();
        if r.armed {
            let fd = fd.unwrap_or_else(|| Arc::clone(&self.dummy_call));
            self.io("SET_VRING_CALL", |c| c.fe.set_vring_call(q, &fd))?;
        }
        Ok(())
    }

    pub(crate) fn set_vring_enable(&mut self, q: usize, enable: bool) -> Result<()> {
        let protocol = self.device_offer & bits::F_PROTOCOL_FEATURES != 0;
        let r = &mut self.rings[q];
        r.enabled = enable;
        if enable {
            r.parked = false;
        }
        if !r.armed {
            return self.arm_eligible();
        }
        if protocol {
            self.io("SET_VRING_ENABLE", |c| c.fe.set_vring_enable(q, enable))?;
        } else if !enable {
            // Without SET_VRING_ENABLE the only way to stop a ring.
            self.disarm_one(q)?;
        }
        Ok(())
    }

    pub(crate) fn suspend(&mut self) -> Result<()> {
        self.suspended = true;
        let mut first = None;
        for q in 0..self.rings.len() {
            if self.rings[q].armed {
                if let Err(e) = self.disarm(q) {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    pub(crate) fn resume(&mut self) -> Result<()> {
        self.suspended = false;
        for r in &mut self.rings {
            r.parked = false;
        }
        self.arm_eligible()
    }

    /// A new connection to the device: replay features, status, memory table
    /// and rings from local state. Rings the old device had restart where its
    /// used index says.
    pub(crate) fn replay(&mut self, conn: Conn) -> Result<()> {
        let acked = self.features.unwrap_or(0) & self.device_offer;
        let missing = acked & !conn.offered;
        if missing != 0 {
            return Err(BackendError::Device(format!(
                "the vhost-user device came back without features {missing:#x} the relay acked"
            )));
        }
        self.conn = Some(conn);
        let r = self.replay_state();
        if r.is_err() || self.conn.is_none() {
            // Half a replay is no state to run on: drop the connection and
            // let the reconnect loop try again from the start.
            self.lost_connection("replay failed");
            self.conn = None;
            return Err(r
                .err()
                .unwrap_or_else(|| BackendError::Device("disconnected during replay".into())));
        }
        self.generation += 1;
        // Wake both ends once: the device for work queued while it was
        // away, the driver for completions whose interrupt was lost.
        for r in &self.rings {
            if r.armed {
                if let Some(k) = &r.kick {
                    let _ = k.write(1);
                }
                if let Some(c) = &r.call {
                    let _ = c.write(1);
                }
            }
        }
        log::info!(target: LOG, "reconnected to {} (connection {})",
            self.path.display(), self.generation);
        Ok(())
    }

    fn replay_state(&mut self) -> Result<()> {
        self.send_log_base()?;
        if let Some(f) = self.features {
            let wire = self.wire(f);
            self.io("SET_FEATURES", |c| c.fe.set_features(wire))?;
        }
        if self.status & !status::DRIVER_OK != 0 {
            self.send_status(self.status & !status::DRIVER_OK)?;
        }
        if !self.table.is_empty() {
            self.send_table()?;
        }
        for q in 0..self.rings.len() {
            if self.rings[q].lost {
                // Not fatal: a ring whose position is unknown stays stopped
                // until the caller sets a base.
                if let Err(e) = self.position(q) {
                    log::warn!(target: LOG, "queue {q}: {e}");
                    self.rings[q].parked = true;
                }
            }
        }
        self.arm_eligible()?;
        if self.status & status::DRIVER_OK != 0 {
            self.send_status(self.status)?;
        }
        Ok(())
    }
}
