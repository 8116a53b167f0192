//! The VMM-facing per-queue operations: what the vhost-user vring messages
//! (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ENABLE, GET_VRING_BASE) do, and the
//! NIC control state that follows from which rings the VMM enables.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use backends::BackendError;
use vmm_sys_util::eventfd::EventFd;

use super::error::{DeviceError, Result};
use super::model::{Device, RingGpas, Running, LOG};

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
            n => self.guest_ring_sizes(n),
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
        if self.vrings[q].running.is_running() {
            log::warn!(target: LOG, "{}: queue {q}: SET_VRING_BASE on a running ring ignored", self.name);
            return Ok(());
        }
        if self.packed_negotiated() {
            // Avail index and wrap counter below, used index and wrap counter
            // above (QEMU's layout), handed to the device as they are. A VMM
            // that sends no used half (DPDK virtio-user: 0x8000 for a new
            // ring) has nothing in flight: used = avail. An empty used half
            // the relay itself reported (a full ring in flight at an even
            // lap) is kept.
            let v = &mut self.vrings[q];
            let base = if base >> 16 == 0 && v.reported_packed_base != Some(base) {
                base | (base << 16)
            } else {
                base
            };
            v.set_packed_base(base);
            self.stats[q].set_indexes(v.base, v.used_base);
            return Ok(());
        }
        let base16 = u16::try_from(base).map_err(|_| DeviceError::BadBase { queue: q, base })?;
        self.vrings[q].base = base16;
        self.vrings[q].used_base = base16;
        self.stats[q].set_indexes(base16, base16);
        Ok(())
    }

    /// GET_VRING_BASE: stop the ring and return where the guest ring is.
    pub fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        let q = self.check_queue(index.into())?;
        let base = self.stop_ring(q);
        let base = if self.packed_negotiated() {
            let v = &mut self.vrings[q];
            v.reported_packed_base = Some(v.packed_base);
            v.packed_base
        } else {
            u32::from(base)
        };
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

    /// Queue pairs the VMM has enabled: one past the highest pair with an
    /// enabled ring (all of them when the VMM does not use SET_VRING_ENABLE,
    /// i.e. without protocol features); `None` when no ring is enabled.
    fn vmm_enabled_pairs(&self) -> Option<u16> {
        if !self.protocol_negotiated() {
            return u16::try_from(self.queue_pairs).ok();
        }
        let top = (0..self.queue_pairs)
            .rev()
            .find(|&k| self.vrings[2 * k].enabled || self.vrings[2 * k + 1].enabled)?;
        u16::try_from(top + 1).ok()
    }

    /// Gives the backend the NIC control state the VMM negotiated, if it
    /// changed (see nic_control.rs).
    pub(crate) fn sync_net_ctrl(&mut self) {
        let all = self.queue_pairs as u16;
        let Some(state) = self.net_ctrl.wanted(self.vmm_enabled_pairs(), all) else {
            return;
        };
        match self.backend.apply_net_ctrl(&state) {
            Ok(()) => {
                log::debug!(target: LOG, "{}: NIC control state {state:?}", self.name);
            }
            Err(BackendError::Unsupported(what)) => {
                log::debug!(target: LOG, "{}: NIC control state not programmed: {what}", self.name);
            }
            Err(e) => {
                // The backend keeps the wanted state and sends it again at
                // the next DRIVER_OK; the data path is not affected.
                log::warn!(target: LOG, "{}: programming {state:?}: {e}", self.name);
            }
        }
        self.net_ctrl.sent(state);
    }
}

/// Make a kick eventfd the daemon reads non-blocking. The VMM only writes to
/// it, and an eventfd write never blocks in practice, so the shared file status
/// flag does not change the VMM's behaviour; it guarantees a worker never
/// blocks if the device read the counter first.
fn set_nonblocking(fd: &EventFd) {
    // SAFETY: fcntl on a descriptor we own (EventFd keeps it open); only file
    // status flags change, no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}
