//! The VMM-facing per-queue operations (what the vhost-user vring messages
//! do), and what happens when the VMM goes away.

use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{set_nonblocking, Device, DeviceError, Result, RingGpas, Running, LOG};
use crate::ring::ring_sizes;

use virtio_features::status::DRIVER_OK;

impl Device {
    pub fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let q = self.check_queue(index.into())?;
        let max = self.max_queue_size;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(DeviceError::BadQueueSize { queue: q, num, max });
        }
        // Takes effect at the next start (a running ring keeps its size).
        self.vrings[q].num = num as u16;
        Ok(())
    }

    /// Ring addresses arrive as VMM virtual addresses; they are translated
    /// to GPAs through the memory table now, so a ring outside guest memory
    /// is refused here.
    pub fn set_vring_addr(
        &mut self,
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
        log: Option<u64>,
    ) -> Result<()> {
        let q = self.check_queue(index.into())?;
        if self.mem.is_empty() {
            return Err(DeviceError::NoMemTable { queue: q });
        }
        let (dl, al, ul) = match self.vrings[q].num {
            0 => (1, 1, 1),
            n => ring_sizes(n),
        };
        let tr = |what, addr, len| {
            self.mem
                .vmm_to_gpa(addr, len)
                .map_err(|source| DeviceError::RingAddr {
                    queue: q,
                    what,
                    source,
                })
        };
        let desc = tr("descriptor", desc, dl)?;
        let avail = tr("avail", avail, al)?;
        let used = tr("used", used, ul)?;
        let new = RingGpas {
            desc,
            avail,
            used,
            log: log.unwrap_or(used),
        };
        let old = self.vrings[q].addrs.replace(new);
        // A running ring restarts on new addresses. QEMU re-sends unchanged
        // ones to toggle the log flag; only the SVQ uses the log address.
        let restart = match (&self.vrings[q].running, old) {
            (Running::Stopped, _) => false,
            (_, None) => true,
            (Running::Passthrough, Some(o)) => {
                (o.desc, o.avail, o.used) != (new.desc, new.avail, new.used)
            }
            (Running::Shadow(_), Some(o)) => o != new,
        };
        if restart {
            self.stop_ring(q);
            self.try_start(q)?;
        } else if matches!(self.vrings[q].running, Running::Passthrough)
            && old.is_some_and(|o| o.log != new.log)
        {
            self.forward_ring_log(q);
        }
        Ok(())
    }

    pub fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let q = self.check_queue(index.into())?;
        let base16 = u16::try_from(base).map_err(|_| DeviceError::BadBase { queue: q, base })?;
        if self.vrings[q].running.is_running() {
            log::warn!(target: LOG, "{}: queue {q}: SET_VRING_BASE on a running ring ignored", self.name);
            return Ok(());
        }
        self.vrings[q].base = base16;
        self.vrings[q].used_base = base16;
        self.stats[q].set_indexes(base16, base16);
        Ok(())
    }

    /// GET_VRING_BASE: stop the ring and return where the guest ring is.
    pub fn get_vring_base(&mut self, index: u32) -> Result<u16> {
        let q = self.check_queue(index.into())?;
        let base = self.stop_ring(q);
        // The VMM restarts a ring with a new kick (and enable); until then it
        // stays stopped.
        let v = &mut self.vrings[q];
        v.kick = None;
        v.enabled = false;
        Ok(base)
    }

    pub fn set_vring_kick(&mut self, index: u8, fd: Option<EventFd>) -> Result<()> {
        let q = self.check_queue(index.into())?;
        if self.vrings[q].running.is_running() {
            self.stop_ring(q);
        }
        if fd.is_none() {
            log::warn!(target: LOG, "{}: queue {q}: no kick eventfd (polling mode) is not supported; the ring stays stopped", self.name);
        }
        let fd = fd.map(|f| {
            set_nonblocking(&f);
            Arc::new(f)
        });
        self.vrings[q].kick = fd;
        self.try_start(q)
    }

    /// The call eventfd may change at any time (and arrive before
    /// SET_FEATURES, as DPDK sends it); a running ring switches to it at once.
    pub fn set_vring_call(&mut self, index: u8, fd: Option<EventFd>) -> Result<()> {
        let q = self.check_queue(index.into())?;
        let fd = fd.map(Arc::new);
        self.vrings[q].call = fd.clone();
        match self.vrings[q].running {
            Running::Stopped => {}
            Running::Passthrough => self.backend.set_vring_call(q, fd)?,
            Running::Shadow(_) => self.workers[q / 2].set_guest_call(q, fd)?,
        }
        Ok(())
    }

    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let q = self.check_queue(index.into())?;
        self.vrings[q].enabled = enable;
        self.sync_net_ctrl();
        if enable {
            self.try_start(q)
        } else {
            self.stop_ring(q);
            Ok(())
        }
    }

    /// SET_STATUS. 0 resets the device: every ring stops, and its indexes
    /// stay for GET_VRING_BASE (QEMU 7.2 resets before it reads them; later
    /// QEMUs after). DRIVER_OK starts every ring that is ready.
    pub fn set_status(&mut self, status: u8) -> Result<()> {
        let was_ok = self.vmm_status & DRIVER_OK != 0;
        self.vmm_status = status;
        if status == 0 {
            self.stop_all_rings();
            return self.reset_backend();
        }
        if status & DRIVER_OK == 0 || was_ok {
            return Ok(());
        }
        // One queue failing to start does not keep the others stopped.
        let mut first_err = None;
        for q in 0..self.num_queues() {
            if let Err(e) = self.try_start(q) {
                log::error!(target: LOG, "{}: queue {q}: start at DRIVER_OK: {e}", self.name);
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// RESET_DEVICE: the device goes back to its initial state (every ring
    /// stopped and forgotten, features and status cleared) while what
    /// belongs to the connection stays: the negotiated protocol features,
    /// the memory table and the call eventfds the VMM already sent (QEMU
    /// sends SET_VRING_CALL before RESET_DEVICE at initialisation).
    pub fn reset_device(&mut self) -> Result<()> {
        self.stop_all_rings();
        for q in 0..self.num_queues() {
            let v = &mut self.vrings[q];
            v.kick = None;
            v.enabled = false;
            v.addrs = None;
            v.num = 0;
            v.base = 0;
            v.used_base = 0;
            v.in_flight.clear();
            self.stats[q].set_indexes(0, 0);
        }
        self.vmm_status = 0;
        self.acked_features = None;
        self.reset_backend()
    }

    /// Stops every running ring; each keeps its indexes for GET_VRING_BASE.
    fn stop_all_rings(&mut self) {
        for q in 0..self.num_queues() {
            if self.vrings[q].running.is_running() {
                self.stop_ring(q);
            }
        }
    }

    /// Resets the device behind the relay; it forgets its features, so the
    /// next start gives them again.
    fn reset_backend(&mut self) -> Result<()> {
        if self.backend.status() != 0 {
            self.backend.set_status(0)?;
        }
        self.backend_features = None;
        Ok(())
    }

    /// GET_STATUS.
    pub fn status(&self) -> u8 {
        self.vmm_status
    }

    /// Rings may run: DRIVER_OK was set, or the VMM does not use SET_STATUS.
    pub(crate) fn driver_ok(&self) -> bool {
        self.protocol_features & VhostUserProtocolFeatures::STATUS.bits() == 0
            || self.vmm_status & DRIVER_OK != 0
    }

    /// The VMM disconnected (or reset the owner): stop every ring, keep the
    /// ring indexes and the mode, drop what belonged to that VMM (eventfds,
    /// memory, negotiated features).
    pub fn disconnect(&mut self) {
        self.stop_all_rings();
        for q in 0..self.num_queues() {
            let v = &mut self.vrings[q];
            v.kick = None;
            v.call = None;
            v.enabled = false;
            v.addrs = None;
        }
        if let Err(e) = self.backend.set_status(0) {
            log::warn!(target: LOG, "{}: device reset: {e}", self.name);
        }
        // A migration in progress is abandoned: logging stops, the mode
        // dirty logging chose is undone (every ring is stopped already).
        if std::mem::take(&mut self.logging_shadow) && self.shadow {
            self.shadow = false;
            self.mode_events.push(false);
        }
        if std::mem::take(&mut self.log_forwarded) {
            let _ = self.backend.set_dirty_log(None);
        }
        self.log_area = None;
        self.postcopy = None;
        self.migration.reset();
        self.backend_features = None;
        self.acked_features = None;
        self.protocol_features = 0;
        self.vmm_status = 0;
        self.clear_memory();
    }
}
