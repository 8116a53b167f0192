//! The device status and reset machine: feature negotiation with
//! FEATURES_OK, adding status bits, reset (and what must be set up again
//! after it), `suspend` emulated by a reset on devices without SUSPEND and
//! `resume` emulated by a reset on devices without RESUME.

use super::net::{bits, status};
use super::sys::backend_bits;
use super::{ctx, Stop, VdpaNet, LOG};
use crate::{BackendError, DeviceBackend, Result};

impl VdpaNet {
    /// SET_FEATURES with everything (backend-owned bits included), then
    /// FEATURES_OK, then the control queue's place.
    pub(super) fn negotiate(&mut self, full: u64) -> Result<()> {
        self.dev
            .set_features(full)
            .map_err(ctx("VHOST_SET_FEATURES"))?;
        self.add_status(status::FEATURES_OK)?;
        self.features = Some(full);
        if full & bits::NET_F_CTRL_VQ != 0 {
            let index = if full & bits::NET_F_MQ != 0 {
                2 * u32::from(self.max_pairs)
            } else {
                2
            };
            self.cvq_index = Some(index);
            self.cvq_asid = self.isolate_cvq(index)?;
        }
        Ok(())
    }

    /// Suspended on a device that cannot resume, or stopped by a reset:
    /// ring changes are only remembered, and `resume` sets everything up
    /// again after a reset.
    pub(super) fn deferring(&self) -> bool {
        match self.stop {
            Stop::No => false,
            Stop::Suspended => !self.has_backend(backend_bits::RESUME),
            Stop::ByReset { .. } => true,
        }
    }

    /// The status the relay sees: while stopped by a reset, the one the
    /// device ran with (and gets back at `resume`).
    pub(super) fn shown_status(&self) -> u8 {
        match self.stop {
            Stop::ByReset { status, .. } => status,
            _ => self.status,
        }
    }

    /// `suspend` without VHOST_BACKEND_F_SUSPEND, the way QEMU's vhost-vdpa
    /// stops a device that cannot suspend: reset it. Its ring state is gone
    /// with it; each ring it ran is later placed at the used index in its
    /// ring memory ([`stopped_position`](Self::stopped_position)). A device
    /// not at DRIVER_OK runs nothing, so there is nothing to stop.
    pub(super) fn suspend_by_reset(&mut self) -> Result<()> {
        let (Some(features), true) = (self.features, self.status & status::DRIVER_OK != 0) else {
            return Ok(());
        };
        let ran = self.status;
        log::debug!(target: LOG, "suspend without VHOST_BACKEND_F_SUSPEND: resetting the device");
        let res = self.reset_device();
        if self.status & status::DRIVER_OK != 0 {
            // SET_STATUS 0 failed: the device still runs as it did.
            return res;
        }
        // From here the device's ring state is gone, even if re-sending the
        // mappings failed: `resume` (or a reset) is what brings it back.
        for v in &mut self.vrings {
            v.stopped_used = match (v.num, v.addrs, v.enabled) {
                (Some(_), Some(a), true) => Some(a.used),
                _ => None,
            };
            if v.stopped_used.is_some() {
                v.base = None;
            }
        }
        self.stop = Stop::ByReset {
            features,
            status: ran,
        };
        res
    }

    /// Where ring `q` of a device stopped by a reset continues: the base the
    /// relay set since, else for a ring the device ran the used index in its
    /// ring memory (QEMU's virtio_queue_restore_last_avail_idx), else the
    /// base set before (or 0). A chain the device had taken but not
    /// completed is thus made available again.
    pub(super) fn stopped_position(&self, q: usize) -> Result<u32> {
        let v = &self.vrings[q];
        if let Some(b) = v.base {
            return Ok(b);
        }
        let Some(used) = v.stopped_used else {
            return Ok(0);
        };
        if self.packed() {
            // Not reached: packed rings are offered only with SUSPEND.
            return Err(BackendError::InvalidState {
                op: "vring_base",
                why: "a packed ring's position is not in its ring memory after a reset",
            });
        }
        let at = used.checked_add(2).ok_or(BackendError::NotMapped {
            iova: used,
            size: 4,
        })?;
        self.dma.read_u16(at).map(u32::from).inspect_err(|e| {
            log::warn!(target: LOG, "queue {q}: reading the used index after a reset: {e}");
        })
    }

    /// `resume` without VHOST_VDPA_RESUME, the way QEMU restarts a vDPA
    /// device: read the ring positions the device stopped at, reset it, and
    /// negotiate, set up every ring at those positions (or at the ones the
    /// relay set meanwhile), DRIVER_OK and the control state again. After a
    /// stop by reset the positions come from ring memory and the device is
    /// not reset a second time unless it left its reset state.
    pub(super) fn resume_by_reset(&mut self) -> Result<()> {
        let by_reset = matches!(self.stop, Stop::ByReset { .. });
        let Some(full) = self
            .negotiated_features()
            .filter(|_| self.shown_status() & status::DRIVER_OK != 0)
        else {
            // Nothing was running, so nothing was stopped.
            self.stop = Stop::No;
            return Ok(());
        };
        // Every position first: a failure leaves the device stopped as it
        // was, for the relay to set the base and resume again.
        for q in 0..self.vrings.len() {
            if self.vrings[q].num.is_some() && self.vrings[q].base.is_none() {
                let b = if by_reset {
                    self.stopped_position(q)?
                } else {
                    self.dev
                        .get_vring_base(q as u32)
                        .map_err(ctx("VHOST_GET_VRING_BASE"))?
                };
                self.vrings[q].base = Some(b);
            }
        }
        let fresh = self.features.is_none() && self.status == status::ACKNOWLEDGE | status::DRIVER;
        if by_reset && fresh {
            // Still as the stop left it: reset, only mappings changed.
            log::debug!(target: LOG, "resume after a stop by reset: setting the device up again");
            self.stop = Stop::No;
        } else {
            log::debug!(target: LOG, "resume without VHOST_BACKEND_F_RESUME: resetting the device");
            self.reset_device()?;
        }
        for v in &mut self.vrings {
            v.stopped_used = None;
        }
        self.negotiate(full)?;
        for q in 0..self.vrings.len() {
            let v = &self.vrings[q];
            let (Some(num), Some(addrs)) = (v.num, v.addrs) else {
                continue;
            };
            let i = q as u32;
            let d = &self.dev;
            d.set_vring_num(i, num)
                .map_err(ctx("VHOST_SET_VRING_NUM"))?;
            d.set_vring_addr(i, &addrs)
                .map_err(ctx("VHOST_SET_VRING_ADDR"))?;
            d.set_vring_base(i, v.base.unwrap_or(0))
                .map_err(ctx("VHOST_SET_VRING_BASE"))?;
            d.set_vring_kick(i, v.kick.as_deref())
                .map_err(ctx("VHOST_SET_VRING_KICK"))?;
            d.set_vring_call(i, v.call.as_deref())
                .map_err(ctx("VHOST_SET_VRING_CALL"))?;
            if v.enabled {
                d.set_vring_enable(i, true)
                    .map_err(ctx("VHOST_VDPA_SET_VRING_ENABLE"))?;
            }
        }
        self.set_status(status::DRIVER_OK)
    }

    /// QEMU's vhost_vdpa_add_status: set bits, read back, check they stuck.
    pub(super) fn add_status(&mut self, add: u8) -> Result<()> {
        let s = self
            .dev
            .get_status()
            .map_err(ctx("VHOST_VDPA_GET_STATUS"))?;
        if s & add != add {
            self.dev
                .set_status(s | add)
                .map_err(ctx("VHOST_VDPA_SET_STATUS"))?;
        }
        let now = self
            .dev
            .get_status()
            .map_err(ctx("VHOST_VDPA_GET_STATUS"))?;
        self.status = now;
        if now & add != add {
            return Err(BackendError::Device(format!(
                "device did not accept status bits {add:#x} (status is {now:#x})"
            )));
        }
        Ok(())
    }

    pub(super) fn reset_device(&mut self) -> Result<()> {
        self.dev
            .set_status(0)
            .map_err(ctx("VHOST_VDPA_SET_STATUS"))?;
        self.status = 0;
        self.features = None;
        self.cvq_index = None;
        self.cvq_asid = 0;
        self.applied = None;
        self.stop = Stop::No;
        for v in &mut self.vrings {
            v.stopped_used = None;
        }
        if !self.has_backend(backend_bits::IOTLB_PERSIST) {
            self.replay_mappings()?;
        }
        self.add_status(status::ACKNOWLEDGE | status::DRIVER)
    }
}
