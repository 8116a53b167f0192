//! The migration messages on the device model: device-state transfer
//! (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE), the in-flight region
//! (GET/SET_INFLIGHT_FD) and the postcopy session (POSTCOPY_ADVISE, LISTEN,
//! END and the memory tables sent while listening). The mechanisms live in
//! `crate::migration`; this file gives them the device's limits and
//! snapshot.

use std::fs::File;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserInflight,
};

use super::error::Result;
use super::model::{Device, LOG};
use super::postcopy_session::{PostcopyError, PostcopySession};
use crate::migration::control::Migration;
use crate::migration::inflight_region::Layout;
use crate::migration::state_machine::Failure;

impl Device {
    pub fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> Result<Option<File>> {
        let offered = self.offered_protocol_features().bits();
        let limits = self.state_limits(offered);
        // The snapshot is taken first (the closure cannot borrow the device
        // while `migration` is borrowed mutably); only a SAVE uses it.
        let snap = match direction {
            VhostTransferStateDirection::SAVE => self.snapshot_state().map_err(|e| e.to_string()),
            VhostTransferStateDirection::LOAD => Err("not a save".into()),
        };
        Ok(self
            .migration
            .set_device_state_fd(direction, phase, fd, limits, || snap)?)
    }

    /// CHECK_DEVICE_STATE: a finished LOAD is applied to the device here.
    pub fn check_device_state(&mut self) -> Result<()> {
        let mut migration = std::mem::replace(&mut self.migration, Migration::placeholder());
        // Every refusal leaves the device as it was: the transfer can be
        // tried again.
        let r = migration.check_device_state(|st| {
            self.apply_state(st)
                .map_err(|e| (Failure::Recoverable, e.to_string()))
        });
        self.migration = migration;
        Ok(r?)
    }

    /// The in-flight region's layout: the rings' as negotiated now (QEMU
    /// sends SET_FEATURES before GET_INFLIGHT_FD; DPDK picks the layout
    /// from the features at that point too).
    fn inflight_layout(&self) -> Layout {
        if self.packed_negotiated() {
            Layout::Packed
        } else {
            Layout::Split
        }
    }

    pub fn get_inflight_fd(
        &mut self,
        req: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        let (queues, size) = (self.num_queues() as u16, self.max_queue_size);
        let layout = self.inflight_layout();
        Ok(self.migration.get_inflight_fd(req, queues, size, layout)?)
    }

    pub fn set_inflight_fd(&mut self, req: &VhostUserInflight, file: &File) -> Result<()> {
        let (queues, size) = (self.num_queues() as u16, self.max_queue_size);
        let layout = self.inflight_layout();
        Ok(self
            .migration
            .set_inflight_fd(req, file, queues, size, layout)?)
    }
}

impl Device {
    /// POSTCOPY_ADVISE: a new userfaultfd for the VMM.
    pub fn postcopy_advise(&mut self) -> Result<File> {
        let s = PostcopySession::open()?;
        let theirs = s.vmm_fd()?;
        self.postcopy = Some(s);
        log::info!(target: LOG, "{}: postcopy advised", self.name);
        Ok(theirs)
    }

    /// POSTCOPY_LISTEN (the protocol session tracks ADVISE/LISTEN/END).
    pub fn postcopy_listen(&mut self) -> Result<()> {
        if self.postcopy.is_none() {
            return Err(PostcopyError::ListenWithoutAdvise.into());
        }
        Ok(())
    }

    /// While listening: register the guest regions at `gpas` (in the
    /// VMM's order) and return the daemon's addresses of them.
    pub fn postcopy_register(&mut self, gpas: &[u64]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(gpas.len());
        for &gpa in gpas {
            let r = self
                .mem
                .regions()
                .iter()
                .find(|r| r.desc.gpa == gpa)
                .ok_or(PostcopyError::NoRegion(gpa))?;
            out.push((r.mmap.as_ptr() as u64, r.mmap.size() as u64));
        }
        let s = self
            .postcopy
            .as_mut()
            .ok_or(PostcopyError::RegisterWithoutAdvise)?;
        for &(start, len) in &out {
            s.register(start, len)?;
        }
        Ok(out.into_iter().map(|(a, _)| a).collect())
    }

    /// POSTCOPY_END.
    pub fn postcopy_end(&mut self) -> Result<()> {
        if self.postcopy.take().is_some() {
            log::info!(target: LOG, "{}: postcopy ended", self.name);
        }
        Ok(())
    }
}
