//! The device model behind the vhost-user protocol layer
//! (`crate::protocol`): each request the session accepted becomes a call on
//! the locked `Device`.
//!
//! In passthrough the guest's kick/call eventfds go to the device untouched
//! (the daemon is off the data path); in shadow mode they belong to the
//! per-pair workers. The device model decides who consumes which eventfd,
//! which is why this is not vhost-user-backend's `VhostUserDaemon`.
//!
//! Every request ends in `after_request`, which reports the mode changes it
//! caused to QMP (outside the device lock).

use std::fs::File;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserVringAddr, VhostUserVringAddrFlags,
};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{lock, Device, SharedDevice};
use crate::memory::{GuestRegion, RegionDesc, MAX_MEM_SLOTS};
use crate::protocol::{HandlerResult, RequestHandler};

/// Called with the mode after every change vhost-user messages caused
/// (SET_FEATURES with or without LOG_ALL, a loaded state, a disconnect).
pub type ModeListener = Arc<dyn Fn(bool) + Send + Sync>;

pub struct VuHandler {
    device: SharedDevice,
    on_mode: Option<ModeListener>,
}

impl VuHandler {
    pub fn new(device: SharedDevice, on_mode: Option<ModeListener>) -> Self {
        VuHandler { device, on_mode }
    }

    fn dev(&self) -> std::sync::MutexGuard<'_, Device> {
        lock(&self.device)
    }
}

/// A received fd as an EventFd.
fn eventfd(file: File) -> EventFd {
    // SAFETY: the fd was just received over the socket and is owned by `file`;
    // ownership moves into the EventFd. If the VMM sent something that is not
    // an eventfd, reads/writes of 8 bytes on it fail or act on that file, which
    // is memory safe.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

fn region_desc(r: &VhostUserMemoryRegion) -> RegionDesc {
    RegionDesc {
        gpa: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

impl RequestHandler for VuHandler {
    fn features(&mut self) -> u64 {
        self.dev().offered_features()
    }

    fn set_features(&mut self, features: u64) -> HandlerResult<()> {
        Ok(self.dev().set_features(features)?)
    }

    fn protocol_features(&mut self) -> VhostUserProtocolFeatures {
        self.dev().offered_protocol_features()
    }

    fn set_protocol_features(&mut self, f: VhostUserProtocolFeatures) -> HandlerResult<()> {
        self.dev().set_protocol_features(f.bits());
        Ok(())
    }

    fn queue_num(&mut self) -> u64 {
        self.dev().num_queues() as u64
    }

    fn max_mem_slots(&mut self) -> u64 {
        MAX_MEM_SLOTS as u64
    }

    fn set_owner(&mut self) -> HandlerResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> HandlerResult<()> {
        self.dev().disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> HandlerResult<()> {
        Ok(self.dev().reset_device()?)
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: bool,
    ) -> HandlerResult<Vec<u64>> {
        let mapped = regions
            .iter()
            .zip(files)
            .map(|(r, f)| GuestRegion::map(region_desc(r), f))
            .collect::<Result<Vec<_>, _>>()?;
        let mut d = self.dev();
        d.set_mem_table(mapped)?;
        if !postcopy {
            return Ok(Vec::new());
        }
        let gpas: Vec<u64> = regions.iter().map(|r| r.guest_phys_addr).collect();
        Ok(d.postcopy_register(&gpas)?)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy: bool,
    ) -> HandlerResult<u64> {
        let r = GuestRegion::map(region_desc(region), file)?;
        let mut d = self.dev();
        d.add_mem_region(r)?;
        if !postcopy {
            return Ok(0);
        }
        let bases = d.postcopy_register(&[region.guest_phys_addr])?;
        Ok(bases.first().copied().unwrap_or_default())
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> HandlerResult<()> {
        Ok(self
            .dev()
            .remove_mem_region(region.guest_phys_addr, region.memory_size)?)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> HandlerResult<()> {
        Ok(self.dev().set_vring_num(index, num)?)
    }

    fn set_vring_addr(&mut self, a: &VhostUserVringAddr) -> HandlerResult<()> {
        let log = VhostUserVringAddrFlags::from_bits_truncate(a.flags)
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(a.log);
        Ok(self
            .dev()
            .set_vring_addr(a.index, a.descriptor, a.used, a.available, log)?)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> HandlerResult<()> {
        Ok(self.dev().set_vring_base(index, base)?)
    }

    fn get_vring_base(&mut self, index: u32) -> HandlerResult<u32> {
        Ok(self.dev().get_vring_base(index)?)
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> HandlerResult<()> {
        Ok(self.dev().set_vring_kick(index, file.map(eventfd))?)
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> HandlerResult<()> {
        Ok(self.dev().set_vring_call(index, file.map(eventfd))?)
    }

    fn set_vring_err(&mut self, index: u8, _file: Option<File>) -> HandlerResult<()> {
        // The relay never reports ring errors through this channel; the fd is
        // closed on drop.
        self.dev().check_queue(index.into())?;
        Ok(())
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> HandlerResult<()> {
        Ok(self.dev().set_vring_enable(index, enable)?)
    }

    fn get_config(&mut self, offset: u32, size: u32) -> HandlerResult<Vec<u8>> {
        Ok(self.dev().get_config(offset, size)?)
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> HandlerResult<()> {
        Ok(self.dev().set_config(offset, data)?)
    }

    fn set_status(&mut self, status: u8) -> HandlerResult<()> {
        Ok(self.dev().set_status(status)?)
    }

    fn status(&mut self) -> u8 {
        self.dev().status()
    }

    fn get_inflight_fd(
        &mut self,
        req: &VhostUserInflight,
    ) -> HandlerResult<(VhostUserInflight, File)> {
        Ok(self.dev().get_inflight_fd(req)?)
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> HandlerResult<()> {
        Ok(self.dev().set_inflight_fd(inflight, &file)?)
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> HandlerResult<()> {
        Ok(self
            .dev()
            .set_log_base(file, log.mmap_size, log.mmap_offset)?)
    }

    fn postcopy_advise(&mut self) -> HandlerResult<File> {
        Ok(self.dev().postcopy_advise()?)
    }

    fn postcopy_listen(&mut self) -> HandlerResult<()> {
        Ok(self.dev().postcopy_listen()?)
    }

    fn postcopy_end(&mut self) -> HandlerResult<()> {
        Ok(self.dev().postcopy_end()?)
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> HandlerResult<Option<File>> {
        Ok(self.dev().set_device_state_fd(direction, phase, file)?)
    }

    fn check_device_state(&mut self) -> HandlerResult<()> {
        Ok(self.dev().check_device_state()?)
    }

    fn after_request(&mut self) {
        let events = self.dev().take_mode_events();
        if let Some(l) = &self.on_mode {
            for e in events {
                l(e);
            }
        }
    }
}
