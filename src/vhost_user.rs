//! The vhost-user backend toward the VMM.
//!
//! Built on `vhost::vhost_user::BackendReqHandler` with our own
//! `VhostUserBackendReqHandlerMut`, not on vhost-user-backend's
//! `VhostUserDaemon`: that daemon always polls every queue's kick eventfd in
//! its own epoll loop and owns the vrings, but in passthrough the guest's
//! kick/call eventfds must go to the device untouched (the daemon is off the
//! data path), and in shadow mode they belong to our per-pair workers. The
//! plain message dispatcher lets the device model decide who consumes which
//! eventfd.
//!
//! Every error is logged here with its cause and reported to the VMM (as a
//! REPLY_ACK failure when negotiated); the connection loop then drops the
//! connection (as DPDK's vhost library does), the device state stays.

use std::fs::File;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{lock, Device, DeviceError, SharedDevice};
use crate::memory::{GuestRegion, RegionDesc, MAX_MEM_SLOTS};

const LOG: &str = "vhost-user";

/// Protocol features offered besides the migration ones. STATUS is not:
/// vhost 0.18's dispatcher does not route SET_STATUS/GET_STATUS to the
/// handler (a VMM therefore never sends SET_STATUS(0) before
/// GET_VRING_BASE; RESET_OWNER and a disconnect keep the ring state).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Everything offered: the above plus LOG_SHMFD, DEVICE_STATE,
/// INFLIGHT_SHMFD, and PAGEFAULT when the host passed the postcopy check
/// (`migration::postcopy::offer`).
pub fn offered_protocol_features(dev: &Device) -> VhostUserProtocolFeatures {
    protocol_features() | dev.migration().protocol_features()
}

/// Called with the mode after every change vhost-user messages caused
/// (SET_FEATURES with or without LOG_ALL, a loaded state, a disconnect).
pub type ModeListener = Arc<dyn Fn(bool) + Send + Sync>;

pub struct VuHandler {
    device: SharedDevice,
    on_mode: Option<ModeListener>,
}

impl VuHandler {
    pub fn new(device: SharedDevice) -> Self {
        VuHandler {
            device,
            on_mode: None,
        }
    }

    pub fn with_mode_listener(device: SharedDevice, on_mode: Option<ModeListener>) -> Self {
        VuHandler { device, on_mode }
    }

    /// Run `f` on the locked device, then report mode changes (outside the
    /// lock: the listener writes to QMP sockets).
    fn with_device<T>(&self, f: impl FnOnce(&mut Device) -> T) -> T {
        let (r, events) = {
            let mut d = lock(&self.device);
            let r = f(&mut d);
            (r, d.take_mode_events())
        };
        if let Some(l) = &self.on_mode {
            for e in events {
                l(e);
            }
        }
        r
    }
}

fn fail(op: &str, e: DeviceError) -> VuError {
    log::error!(target: LOG, "{op}: {e}");
    VuError::ReqHandlerError(std::io::Error::other(e.to_string()))
}

fn unsupported(op: &'static str) -> VuError {
    log::error!(target: LOG, "{op} is not supported");
    VuError::InvalidOperation(op)
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

impl VhostUserBackendReqHandlerMut for VuHandler {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.with_device(|d| d.disconnect());
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.with_device(|d| d.disconnect());
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(lock(&self.device).offered_features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.with_device(|d| d.set_features(features))
            .map_err(|e| fail("SET_FEATURES", e))
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<u64>>> {
        let regions = ctx
            .iter()
            .zip(files)
            .map(|(r, f)| GuestRegion::map(region_desc(r), f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail("SET_MEM_TABLE", e.into()))?;
        let mut d = lock(&self.device);
        d.set_mem_table(regions)
            .map_err(|e| fail("SET_MEM_TABLE", e))?;
        if postcopy == Some(true) {
            let gpas: Vec<u64> = ctx.iter().map(|r| r.guest_phys_addr).collect();
            return d
                .postcopy_register(&gpas)
                .map(Some)
                .map_err(|e| fail("SET_MEM_TABLE (postcopy)", e));
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        lock(&self.device)
            .set_vring_num(index, num)
            .map_err(|e| fail("SET_VRING_NUM", e))
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        let log = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        lock(&self.device)
            .set_vring_addr(index, descriptor, used, available, log)
            .map_err(|e| fail("SET_VRING_ADDR", e))
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        lock(&self.device)
            .set_vring_base(index, base)
            .map_err(|e| fail("SET_VRING_BASE", e))
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let base = lock(&self.device)
            .get_vring_base(index)
            .map_err(|e| fail("GET_VRING_BASE", e))?;
        Ok(VhostUserVringState::new(index, base.into()))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        lock(&self.device)
            .set_vring_kick(index, fd.map(eventfd))
            .map_err(|e| fail("SET_VRING_KICK", e))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        lock(&self.device)
            .set_vring_call(index, fd.map(eventfd))
            .map_err(|e| fail("SET_VRING_CALL", e))
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        // The relay never reports ring errors through this channel; the fd is
        // closed on drop.
        lock(&self.device)
            .check_queue(index.into())
            .map(|_| ())
            .map_err(|e| fail("SET_VRING_ERR", e))
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features(&lock(&self.device)))
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = offered_protocol_features(&lock(&self.device)).bits();
        if features & !offered != 0 {
            log::error!(target: LOG, "SET_PROTOCOL_FEATURES {features:#x}: not offered ({offered:#x})");
            return Err(VuError::InvalidParam);
        }
        lock(&self.device).set_protocol_features(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(lock(&self.device).num_queues() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        lock(&self.device)
            .set_vring_enable(index, enable)
            .map_err(|e| fail("SET_VRING_ENABLE", e))
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        lock(&self.device)
            .get_config(offset, size)
            .map_err(|e| fail("GET_CONFIG", e))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        lock(&self.device)
            .set_config(offset, buf)
            .map_err(|e| fail("SET_CONFIG", e))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(unsupported("GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(unsupported("GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(&mut self, i: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let mut d = lock(&self.device);
        let (queues, size) = (d.num_queues() as u16, d.max_queue_size);
        d.migration
            .get_inflight_fd(i, queues, size)
            .map_err(|e| fail("GET_INFLIGHT_FD", e.into()))
    }

    fn set_inflight_fd(&mut self, i: &VhostUserInflight, file: File) -> VuResult<()> {
        let mut d = lock(&self.device);
        let (queues, size) = (d.num_queues() as u16, d.max_queue_size);
        d.migration
            .set_inflight_fd(i, &file, queues, size)
            .map_err(|e| fail("SET_INFLIGHT_FD", e.into()))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy: Option<bool>,
    ) -> VuResult<Option<u64>> {
        let r =
            GuestRegion::map(region_desc(region), fd).map_err(|e| fail("ADD_MEM_REG", e.into()))?;
        let mut d = lock(&self.device);
        d.add_mem_region(r).map_err(|e| fail("ADD_MEM_REG", e))?;
        if postcopy == Some(true) {
            return d
                .postcopy_register(&[region.guest_phys_addr])
                .map(|a| a.first().copied())
                .map_err(|e| fail("ADD_MEM_REG (postcopy)", e));
        }
        Ok(None)
    }

    fn postcopy_advice(&mut self) -> VuResult<File> {
        lock(&self.device)
            .postcopy_advise()
            .map_err(|e| fail("POSTCOPY_ADVISE", e))
    }

    fn postcopy_listen(&mut self) -> VuResult<()> {
        lock(&self.device)
            .postcopy_listen()
            .map_err(|e| fail("POSTCOPY_LISTEN", e))
    }

    fn postcopy_end(&mut self) -> VuResult<()> {
        lock(&self.device)
            .postcopy_end()
            .map_err(|e| fail("POSTCOPY_END", e))
    }

    /// The VMM acknowledged the region addresses sent while listening.
    fn postcopy_ack_mem_regions(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        lock(&self.device)
            .remove_mem_region(region.guest_phys_addr, region.memory_size)
            .map_err(|e| fail("REM_MEM_REG", e))
    }

    /// The VMM only sees a failure code for these two (vhost 0.18 turns a
    /// handler error into 0x101 / 1 and keeps the connection): the log line
    /// names the problem.
    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VuResult<Option<File>> {
        let mut d = lock(&self.device);
        let limits = d.state_limits(offered_protocol_features(&d).bits());
        // The snapshot is taken first (the closure cannot borrow the device
        // while `migration` is borrowed mutably); only a SAVE uses it.
        let snap = match direction {
            VhostTransferStateDirection::SAVE => d.snapshot_state(),
            VhostTransferStateDirection::LOAD => Err("not a save".into()),
        };
        d.migration
            .set_device_state_fd(direction, phase, fd, limits, || snap)
            .map_err(|e| fail("SET_DEVICE_STATE_FD", e.into()))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        self.with_device(|d| {
            let mut migration = std::mem::replace(
                &mut d.migration,
                crate::migration::control::Migration::placeholder(),
            );
            let r = migration.check_device_state(|st| d.apply_state(st));
            d.migration = migration;
            r
        })
        .map_err(|e| fail("CHECK_DEVICE_STATE", e.into()))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(unsupported("GET_SHMEM_CONFIG"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        lock(&self.device)
            .set_log_base(file, log.mmap_size, log.mmap_offset)
            .map_err(|e| fail("SET_LOG_BASE", e))
    }
}
