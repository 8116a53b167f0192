//! The device's life as the VMM drives it: SET_STATUS (DRIVER_OK starts
//! the rings, 0 resets), RESET_DEVICE, and what happens when the VMM goes
//! away (disconnect, RESET_OWNER).

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_features::status::DRIVER_OK;

use super::error::Result;
use super::model::{Device, LOG};

impl Device {
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
