//! The device status and reset machine: feature negotiation with
//! FEATURES_OK, adding status bits, reset (and what must be set up again
//! after it), and `resume` emulated by a reset on devices without RESUME.

use super::net::{bits, status};
use super::sys::backend_bits;
use super::{ctx, VdpaNet, LOG};
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

    /// Suspended on a device that cannot resume: ring changes are only
    /// remembered, and `resume` sets everything up again after a reset.
    pub(super) fn deferring(&self) -> bool {
        self.suspended && !self.has_backend(backend_bits::RESUME)
    }

    /// `resume` without VHOST_VDPA_RESUME, the way QEMU restarts a vDPA
    /// device: read the ring positions the device stopped at, reset it, and
    /// negotiate, set up every ring at those positions (or at the ones the
    /// relay set meanwhile), DRIVER_OK and the control state again.
    pub(super) fn resume_by_reset(&mut self) -> Result<()> {
        let (Some(full), true) = (self.features, self.status & status::DRIVER_OK != 0) else {
            // Nothing was running, so nothing was stopped.
            self.suspended = false;
            return Ok(());
        };
        for q in 0..self.vrings.len() {
            if self.vrings[q].num.is_some() && self.vrings[q].base.is_none() {
                let b = self
                    .dev
                    .get_vring_base(q as u32)
                    .map_err(ctx("VHOST_GET_VRING_BASE"))?;
                self.vrings[q].base = Some(b);
            }
        }
        log::debug!(target: LOG, "resume without VHOST_BACKEND_F_RESUME: resetting the device");
        self.reset_device()?;
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
        self.suspended = false;
        if !self.has_backend(backend_bits::IOTLB_PERSIST) {
            self.replay_mappings()?;
        }
        self.add_status(status::ACKNOWLEDGE | status::DRIVER)
    }
}
