//! [`DeviceBackend`] for [`VdpaNet`]: the relay's operations mapped onto
//! the vhost-vdpa calls (see the contract in `mod.rs`).

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::dma::invalidate_msg;
use super::net::{bits, status, BACKEND_ACKED, BACKEND_OWNED};
use super::sys::{backend_bits, IotlbMsg};
use super::{ctx, Stop, VdpaNet, Vring, LOG};
use crate::{BackendError, DeviceBackend, DmaRegion, IovaRange, NetCtrlState, Result, VringAddrs};

const BUSY: &str = "status bits are cleared only by a reset (status 0)";

impl DeviceBackend for VdpaNet {
    fn kind(&self) -> &'static str {
        "vdpa"
    }

    fn device_features(&self) -> u64 {
        let mut f = self.offered & !BACKEND_OWNED;
        if !self.has_backend(backend_bits::SUSPEND) {
            // Without SUSPEND a stop is a reset, after which a ring's
            // position is read from ring memory: a split ring's used index
            // is there, a packed ring's position is not (no index, only
            // flags that the next lap overwrites).
            f &= !bits::F_RING_PACKED;
        }
        f
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let extra = features & !self.device_features();
        if extra != 0 {
            return Err(BackendError::UnsupportedFeatures(extra));
        }
        if self.shown_status() & status::DRIVER_OK != 0 {
            return Err(BackendError::InvalidState {
                op: "set_features",
                why: "the device is running (reset it first)",
            });
        }
        if self.status & status::FEATURES_OK != 0 {
            log::debug!(target: LOG, "features change after FEATURES_OK: resetting the device");
            self.reset_device()?;
        }
        let mut full = features | (self.offered & BACKEND_ACKED);
        if self.cvq.is_none() {
            full &= !(bits::NET_F_CTRL_VQ | bits::NET_F_CTRL_RX | bits::NET_F_CTRL_MAC_ADDR);
        }
        self.negotiate(full)
    }

    fn num_queues(&self) -> usize {
        self.vrings.len()
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn iova_range(&self) -> IovaRange {
        self.range
    }

    fn config_size(&self) -> usize {
        self.config_size
    }

    fn get_config(&self, offset: u32, buf: &mut [u8]) -> Result<()> {
        self.config_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.dev
            .get_config(offset, buf)
            .map_err(ctx("VHOST_VDPA_GET_CONFIG"))
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.config_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.dev
            .set_config(offset, data)
            .map_err(ctx("VHOST_VDPA_SET_CONFIG"))
    }

    fn set_status(&mut self, new: u8) -> Result<()> {
        if new == 0 {
            self.reset_device()?;
            // The relay sets its rings up again; only the eventfds stay.
            for v in &mut self.vrings {
                *v = Vring {
                    kick: v.kick.take(),
                    call: v.call.take(),
                    ..Vring::default()
                };
            }
            return Ok(());
        }
        let managed = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        let shown = self.shown_status();
        let target = new | (shown & managed);
        if shown & !target != 0 {
            return Err(BackendError::InvalidState {
                op: "set_status",
                why: BUSY,
            });
        }
        let add = target & !shown;
        if add == 0 {
            return Ok(());
        }
        if matches!(self.stop, Stop::ByReset { .. }) {
            return Err(BackendError::InvalidState {
                op: "set_status",
                why: "the device is stopped by a reset (resume it first)",
            });
        }
        if add & (status::FEATURES_OK | status::DRIVER_OK) != 0 && self.features.is_none() {
            return Err(BackendError::InvalidState {
                op: "set_status",
                why: "features must be set first",
            });
        }
        let driver_ok = add & status::DRIVER_OK != 0;
        if driver_ok {
            self.start_cvq()?;
        }
        self.add_status(add)?;
        if driver_ok {
            self.applied = Some(NetCtrlState::after_reset());
            self.sync_net_state()?;
        }
        Ok(())
    }

    fn status(&self) -> u8 {
        self.shown_status()
    }

    fn dma_map(&mut self, region: DmaRegion) -> Result<()> {
        self.dma.check_new(&region, self.range, &[])?;
        self.map_regions(0, std::slice::from_ref(&region))?;
        self.dma.insert(region);
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        let starts = self.dma.inside(iova, size)?;
        let msgs: Vec<IotlbMsg> = starts
            .iter()
            .filter_map(|s| self.dma.get(*s))
            .map(|r| invalidate_msg(0, r.iova, r.size()))
            .collect();
        let (sent, res) = self.send_iotlb(0, &msgs);
        // What the kernel let go of may be released; the rest stays mapped.
        for s in &starts[..sent] {
            self.dma.remove(*s);
        }
        res
    }

    fn set_vring_num(&mut self, queue: usize, num: u16) -> Result<()> {
        let q = self.data_queue(queue)?;
        let max = self.max_queue_size;
        if num == 0 || !num.is_power_of_two() || num > max {
            return Err(BackendError::InvalidQueueSize(num, max));
        }
        self.stop_for_late_ring()?;
        if !self.deferring() {
            self.dev
                .set_vring_num(q, num)
                .map_err(ctx("VHOST_SET_VRING_NUM"))?;
        }
        self.vrings[queue].num = Some(num);
        Ok(())
    }

    fn set_vring_addr(&mut self, queue: usize, addrs: VringAddrs) -> Result<()> {
        let q = self.data_queue(queue)?;
        if addrs.desc & 15 != 0 || addrs.avail & 1 != 0 || addrs.used & 3 != 0 {
            return Err(BackendError::InvalidState {
                op: "set_vring_addr",
                why: "ring addresses must be aligned (desc 16, avail 2, used 4)",
            });
        }
        self.stop_for_late_ring()?;
        if !self.deferring() {
            self.dev
                .set_vring_addr(q, &addrs)
                .map_err(ctx("VHOST_SET_VRING_ADDR"))?;
        }
        self.vrings[queue].addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, queue: usize, base: u16) -> Result<()> {
        let base = u32::from(base);
        // A packed ring given one position has nothing in flight: used is
        // at avail.
        self.set_base(
            queue,
            if self.packed() {
                base | base << 16
            } else {
                base
            },
        )
    }

    fn vring_base(&mut self, queue: usize) -> Result<u16> {
        // Packed: the avail half (position and wrap counter).
        self.base(queue).map(|b| b as u16)
    }

    fn set_vring_base_packed(&mut self, queue: usize, base: u32) -> Result<()> {
        self.require_packed("set_vring_base_packed")?;
        self.set_base(queue, base)
    }

    fn vring_base_packed(&mut self, queue: usize) -> Result<u32> {
        self.require_packed("vring_base_packed")?;
        self.base(queue)
    }

    fn set_vring_kick(&mut self, queue: usize, fd: Arc<EventFd>) -> Result<()> {
        let q = self.data_queue(queue)?;
        if !self.deferring() {
            self.dev
                .set_vring_kick(q, Some(&fd))
                .map_err(ctx("VHOST_SET_VRING_KICK"))?;
        }
        self.vrings[queue].kick = Some(fd);
        Ok(())
    }

    fn set_vring_call(&mut self, queue: usize, fd: Option<Arc<EventFd>>) -> Result<()> {
        let q = self.data_queue(queue)?;
        if !self.deferring() {
            self.dev
                .set_vring_call(q, fd.as_deref())
                .map_err(ctx("VHOST_SET_VRING_CALL"))?;
        }
        self.vrings[queue].call = fd;
        Ok(())
    }

    fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<()> {
        // Checked before `vrings[queue]` is touched.
        self.data_queue(queue)?;
        if !enable && self.vrings[queue].enabled && self.running() {
            return self.disable_running_ring(queue);
        }
        if enable
            && !self.vrings[queue].enabled
            && !self.has_backend(backend_bits::ENABLE_AFTER_DRIVER_OK)
        {
            self.stop_for_late_ring()?;
        }
        self.program_enable(queue, enable)?;
        if enable && self.late_ring {
            log::debug!(target: LOG, "queue {queue} set up after DRIVER_OK: restarting the device with it");
            return self.resume();
        }
        Ok(())
    }

    fn suspend(&mut self) -> Result<()> {
        if self.stop != Stop::No {
            // Stopped for a late ring: from here the relay resumes it.
            self.late_ring = false;
            return Ok(());
        }
        if !self.has_backend(backend_bits::SUSPEND) {
            return self.suspend_by_reset();
        }
        self.dev.suspend().map_err(ctx("VHOST_VDPA_SUSPEND"))?;
        self.stop = Stop::Suspended;
        for v in &mut self.vrings {
            v.base = None;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        self.late_ring = false;
        match self.stop {
            Stop::No => Ok(()),
            Stop::ByReset { .. } => self.resume_by_reset(),
            Stop::Suspended if !self.has_backend(backend_bits::RESUME) => self.resume_by_reset(),
            Stop::Suspended => {
                self.dev.resume().map_err(ctx("VHOST_VDPA_RESUME"))?;
                self.stop = Stop::No;
                Ok(())
            }
        }
    }

    fn apply_net_ctrl(&mut self, state: &NetCtrlState) -> Result<()> {
        self.apply_net_state(state)
    }
}

impl VdpaNet {
    /// Whether the rings are packed (RING_PACKED negotiated, or the
    /// features a device stopped by a reset ran with).
    pub(super) fn packed(&self) -> bool {
        self.negotiated_features()
            .is_some_and(|f| f & bits::F_RING_PACKED != 0)
    }

    fn require_packed(&self, op: &'static str) -> Result<()> {
        if self.packed() {
            return Ok(());
        }
        Err(BackendError::InvalidState {
            op,
            why: "the rings are split (RING_PACKED not negotiated)",
        })
    }

    /// Sets a ring's position in the kernel's layout (see
    /// [`VdpaIoctls::set_vring_base`](super::VdpaIoctls::set_vring_base)).
    fn set_base(&mut self, queue: usize, base: u32) -> Result<()> {
        let q = self.data_queue(queue)?;
        self.stop_for_late_ring()?;
        if !self.deferring() {
            self.dev
                .set_vring_base(q, base)
                .map_err(ctx("VHOST_SET_VRING_BASE"))?;
        }
        self.vrings[queue].base = Some(base);
        Ok(())
    }

    /// A ring's position in the kernel's layout: where the device stopped,
    /// or what was set for it while the device could not be asked.
    pub(super) fn base(&mut self, queue: usize) -> Result<u32> {
        let q = self.data_queue(queue)?;
        if self.running() && !self.vrings[queue].enabled {
            // Disabled while the device ran: where it stopped.
            if let Some(b) = self.vrings[queue].base {
                return Ok(b);
            }
        }
        if self.deferring() {
            if let Some(b) = self.vrings[queue].base {
                return Ok(b);
            }
        }
        if let Stop::ByReset { .. } = self.stop {
            // The device's ring state went with the reset: not asked.
            let b = self.stopped_position(queue)?;
            if self.vrings[queue].stopped_used.is_some() {
                self.vrings[queue].base = Some(b);
            }
            return Ok(b);
        }
        let b = self
            .dev
            .get_vring_base(q)
            .map_err(ctx("VHOST_GET_VRING_BASE"))?;
        if self.stop == Stop::Suspended {
            self.vrings[queue].base = Some(b);
        }
        Ok(b)
    }

    /// Ring `queue` enabled or not: told to the device now, or remembered
    /// for `resume` while ring changes are deferred.
    fn program_enable(&mut self, queue: usize, enable: bool) -> Result<()> {
        if !self.deferring() {
            let q = self.data_queue(queue)?;
            self.dev
                .set_vring_enable(q, enable)
                .map_err(ctx("VHOST_VDPA_SET_VRING_ENABLE"))?;
        }
        self.vrings[queue].enabled = enable;
        Ok(())
    }

    fn running(&self) -> bool {
        self.stop == Stop::No && self.status & status::DRIVER_OK != 0
    }

    /// Disabling one ring of a running device: vhost-vdpa passes it on as
    /// `set_vq_ready(false)`, which not every parent honours while DRIVER_OK
    /// is set (VDUSE does not even tell its device), yet the relay reads the
    /// ring's position next and relies on the device touching it no more.
    /// So the device is stopped (suspended, or reset where it cannot
    /// suspend), the ring's position read, the ring disabled, and the device
    /// restarted with the other rings.
    fn disable_running_ring(&mut self, queue: usize) -> Result<()> {
        self.suspend()?;
        let base = self.base(queue)?;
        self.vrings[queue].base = Some(base);
        self.program_enable(queue, false)?;
        log::debug!(target: LOG, "queue {queue} disabled at {base:#x}: restarting the device without it");
        self.resume()
    }

    /// A ring set up (or, without ENABLE_AFTER_DRIVER_OK, enabled) while
    /// the device runs: the kernel refuses ring changes after DRIVER_OK
    /// unless the device is suspended, so the device is stopped (suspended,
    /// or reset where it cannot suspend), the ring is set up with the others
    /// and the device restarts when the ring is enabled. That is how the
    /// relay's rings reach a vhost-vdpa device one at a time, as the VMM
    /// starts them.
    fn stop_for_late_ring(&mut self) -> Result<()> {
        if !self.running() {
            return Ok(());
        }
        self.suspend()?;
        self.late_ring = true;
        Ok(())
    }
}
