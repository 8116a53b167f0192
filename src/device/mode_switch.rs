//! Switching every running queue of a device between passthrough and shadow
//! while traffic flows (DESIGN.md "Switching modes without losing a buffer").
//!
//! Both directions run with the device suspended, so by the backend contract
//! its vring base is both the next avail index and the used index: nothing is
//! in flight inside the device while rings change hands. Guest memory stays
//! mapped in both directions; only ring set-up changes.

use super::error::{DeviceError, Result};
use super::model::{Device, Running, LOG};
use super::rings::ShadowStart;

impl Device {
    /// Put every queue in shadow (`true`) or passthrough mode. Returns whether
    /// anything changed. Queues that are not running start in the new mode
    /// when the VMM starts them.
    pub fn set_shadow(&mut self, enable: bool) -> Result<bool> {
        if !self.is_started() {
            return Err(DeviceError::NotStarted);
        }
        let translated = self.shadow_translated();
        if !enable && translated != 0 {
            return Err(DeviceError::NeedsShadow {
                features: translated,
            });
        }
        let to_switch: Vec<usize> = (0..self.num_queues())
            .filter(|&q| match self.vrings[q].running {
                Running::Stopped => false,
                Running::Passthrough => enable,
                Running::Shadow(_) => !enable,
            })
            .collect();
        let changed = self.shadow != enable || !to_switch.is_empty();
        self.shadow = enable;
        if to_switch.is_empty() {
            return Ok(changed);
        }
        self.backend.suspend()?;
        let mut first_err = None;
        let name = self.name.clone();
        let mut log_err = |q: usize, e: DeviceError| {
            log::error!(target: LOG, "{name}: queue {q}: switching to {}: {e}",
                if enable { "shadow" } else { "passthrough" });
            first_err.get_or_insert(e);
        };
        if enable {
            // Every queue goes to its worker before the first answer is
            // awaited: the workers take them over in parallel.
            let mut started = Vec::with_capacity(to_switch.len());
            for q in to_switch {
                match self.passthrough_to_shadow_begin(q) {
                    Ok(s) => started.push((q, s)),
                    Err(e) => log_err(q, e),
                }
            }
            for (q, s) in started {
                if let Err(e) = self.passthrough_to_shadow_finish(q, s) {
                    log_err(q, e);
                }
            }
        } else {
            for q in to_switch {
                if let Err(e) = self.shadow_to_passthrough(q) {
                    log_err(q, e);
                }
            }
        }
        if let Err(e) = self.backend.resume() {
            log::error!(target: LOG, "{}: resume after switching: {e}", self.name);
            first_err.get_or_insert(e.into());
        }
        match first_err {
            None => {
                log::info!(target: LOG, "{}: data path now {}", self.name,
                    if enable { "shadow" } else { "passthrough" });
                Ok(true)
            }
            Some(e) => Err(e),
        }
    }

    fn passthrough_to_shadow_begin(&mut self, q: usize) -> Result<(u16, ShadowStart)> {
        // Suspended: nothing in flight inside the device.
        let idx = self.device_ring_position(q)?;
        let base = idx.avail;
        self.vrings[q].running = Running::Stopped;
        self.set_ring_position(q, idx);
        match self.start_shadow_begin(q, idx) {
            Ok(s) => Ok((base, s)),
            Err(e) => {
                self.restart_passthrough(q, base);
                Err(e)
            }
        }
    }

    fn passthrough_to_shadow_finish(&mut self, q: usize, s: (u16, ShadowStart)) -> Result<()> {
        let (base, s) = s;
        self.start_shadow_finish(q, s).inspect_err(|_| {
            self.restart_passthrough(q, base);
        })
    }

    /// Keep the queue alive in the mode it was in.
    fn restart_passthrough(&mut self, q: usize, base: u16) {
        if let Err(e2) = self.start_passthrough(q, base) {
            log::error!(target: LOG, "{}: queue {q}: restarting passthrough: {e2}", self.name);
        }
    }

    fn shadow_to_passthrough(&mut self, q: usize) -> Result<()> {
        let idx = self.take_shadow(q);
        self.set_ring_position(q, idx);
        self.start_passthrough(q, idx.avail)
    }
}
