//! Dirty logging for live migration (DESIGN.md "Live migration"): who logs
//! the pages the device writes while the VMM migrates.
//!
//! - The backend logs by itself (`has_dirty_log()`, e.g. a vhost-user device
//!   offering LOG_ALL) and the data path is in passthrough with guest memory
//!   mapped at IOVA == GPA: the log is forwarded to it and passthrough stays.
//! - Otherwise, under `--shadow auto`, every queue switches to shadow before
//!   the SET_FEATURES reply and the SVQs log (written ranges of each used
//!   chain, used ring entries and idx, avail_event); clearing LOG_ALL
//!   switches back.

use std::fs::File;
use std::sync::Arc;

use backends::DirtyLogArea;
use iova::AddrSpace;
use vm_memory::{FileOffset, MmapRegion};

use super::error::{DeviceError, Result};
use super::model::{Device, Running, LOG};

impl Device {
    /// VHOST_F_LOG_ALL acked (`on`) or cleared in SET_FEATURES.
    pub(crate) fn set_logging(&mut self, on: bool) -> Result<()> {
        if self.migration.log_all() == on {
            return Ok(());
        }
        if on {
            // The log first, so the switch below logs from its first write.
            self.migration.set_log_all(true)?;
            if self.can_forward_log() {
                match self.forward_log() {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        // The SVQs can log instead.
                        self.stop_forwarding();
                        log::warn!(target: LOG, "{}: the device refused the dirty log ({e}); \
                            logging in shadow mode instead", self.name);
                    }
                }
            }
            if self.auto_shadow {
                match self.switch_for_logging(true) {
                    // Only a switch made for logging is undone when it
                    // stops (an operator's shadow mode stays).
                    Ok(changed) => self.logging_shadow = changed,
                    Err(e) => {
                        let _ = self.migration.set_log_all(false);
                        return Err(e);
                    }
                }
            } else if !self.shadow {
                log::warn!(target: LOG, "{}: dirty logging requested in passthrough with \
                    --shadow off and a device that cannot log: pages the device writes \
                    are not logged", self.name);
            }
        } else {
            // Back to passthrough first: the final used entries written
            // while the SVQs stop are still logged.
            if std::mem::take(&mut self.logging_shadow) {
                self.switch_for_logging(false)?;
            }
            self.stop_forwarding();
            self.migration.set_log_all(false)?;
        }
        Ok(())
    }

    fn switch_for_logging(&mut self, enable: bool) -> Result<bool> {
        let changed = if self.is_started() {
            self.set_shadow(enable)?
        } else {
            let changed = self.shadow != enable;
            self.shadow = enable;
            changed
        };
        if changed {
            self.mode_events.push(enable);
        }
        Ok(changed)
    }

    /// The backend can log, passthrough is on, and the device's IOVA of
    /// every guest region is its GPA (the device logs IOVA pages).
    fn can_forward_log(&self) -> bool {
        self.backend.has_dirty_log()
            && !self.shadow
            && self.mem.regions().iter().all(|r| {
                self.tree
                    .find(AddrSpace::Guest, r.desc.gpa)
                    .is_some_and(|m| m.iova == r.desc.gpa)
            })
    }

    /// Give the backend the current log (if any) and the used-ring log
    /// addresses of the rings it runs.
    fn forward_log(&mut self) -> Result<()> {
        let Some(area) = self.log_area.clone() else {
            // No SET_LOG_BASE yet: forwarded when it comes.
            self.log_forwarded = true;
            return Ok(());
        };
        self.backend.set_dirty_log(Some(area))?;
        for q in 0..self.num_queues() {
            if matches!(self.vrings[q].running, Running::Passthrough) {
                let addr = self.vrings[q].addrs.map(|a| a.log);
                self.backend.set_vring_log_addr(q, addr)?;
            }
        }
        self.log_forwarded = true;
        log::info!(target: LOG, "{}: dirty log forwarded to the {} backend", self.name,
            self.backend.kind());
        Ok(())
    }

    fn stop_forwarding(&mut self) {
        if std::mem::take(&mut self.log_forwarded) {
            if let Err(e) = self.backend.set_dirty_log(None) {
                log::warn!(target: LOG, "{}: stopping the device's dirty log: {e}", self.name);
            }
        }
    }

    /// SET_LOG_BASE. When this returns, nothing writes the previous log:
    /// the workers' readers moved to the new one (SharedDirtyLog::swap) and
    /// a backend that logs by itself has the new one.
    pub fn set_log_base(&mut self, file: File, size: u64, offset: u64) -> Result<()> {
        self.migration.set_log_base(&file, size, offset)?;
        if self.backend.has_dirty_log() {
            let region = MmapRegion::from_file(FileOffset::new(file, offset), size as usize)
                .map_err(|e| DeviceError::Backend(backends::BackendError::Device(e.to_string())))?;
            self.log_area = Some(DirtyLogArea {
                memory: Arc::new(region),
            });
            if self.log_forwarded {
                if let Err(e) = self.forward_log() {
                    self.log_forwarded = false;
                    log::warn!(target: LOG, "{}: the device refused the dirty log ({e}); \
                        logging in shadow mode instead", self.name);
                    if self.auto_shadow {
                        self.logging_shadow = self.switch_for_logging(true)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A ring started in passthrough while the backend logs.
    pub(crate) fn forward_ring_log(&mut self, q: usize) {
        if self.log_forwarded && self.log_area.is_some() {
            let addr = self.vrings[q].addrs.map(|a| a.log);
            if let Err(e) = self.backend.set_vring_log_addr(q, addr) {
                log::warn!(target: LOG, "{}: queue {q}: used ring log address: {e}", self.name);
            }
        }
    }
}
