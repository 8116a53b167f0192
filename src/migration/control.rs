//! Per-device migration control: what the vhost-user handler calls for the
//! migration messages. Owns the state machine, the dirty log handle, the
//! state transfer in progress, the in-flight region and the postcopy probe
//! result, so the device model only adds one field and a few calls
//! (WIRING.md).

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserInflight,
    VhostUserProtocolFeatures,
};

use super::dirty_log::{DirtyBitmap, DirtyLogError, SharedDirtyLog};
use super::inflight_region::{InflightError, InflightRegion, Layout};
use super::state_machine::{Direction, Failure, MigState, MigrationState, TransitionError};
use super::stream::{DeviceState, Limits, StateError};
use super::transfer::{Outcome, Transfer, TransferError};
use super::userfaultfd::PostcopySupport;

const LOG: &str = "migration";

/// How long CHECK_DEVICE_STATE waits for the transfer thread. The VMM sends
/// it after it saw EOF (save) or closed its end (load), so the thread is
/// done or about to be.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Stream(#[from] StateError),
    #[error(transparent)]
    Inflight(#[from] InflightError),
}

#[derive(Debug)]
pub struct Migration {
    state: MigrationState,
    log: SharedDirtyLog,
    /// The latest SET_LOG_BASE; installed in `log` while LOG_ALL is on.
    log_base: Option<Arc<DirtyBitmap>>,
    log_all: bool,
    transfer: Option<Transfer>,
    inflight: Option<Arc<InflightRegion>>,
    postcopy: Result<PostcopySupport, String>,
}

impl Migration {
    /// `postcopy`: the result of [`super::userfaultfd::probe`] taken at start.
    pub fn new(postcopy: Result<PostcopySupport, String>) -> Self {
        if let Err(why) = &postcopy {
            // Info, not warn: a missing optional feature is not a fault, and
            // a healthy daemon is silent at the default level.
            log::info!(target: LOG, "postcopy (PAGEFAULT) not offered: {why}");
        }
        Migration {
            state: MigrationState::new(),
            log: SharedDirtyLog::new(),
            log_base: None,
            log_all: false,
            transfer: None,
            inflight: None,
            postcopy,
        }
    }

    /// A stand-in while the real one is taken out of its owner for a call
    /// that also needs the owner (no probe, no log line).
    pub fn placeholder() -> Self {
        Migration {
            state: MigrationState::new(),
            log: SharedDirtyLog::new(),
            log_base: None,
            log_all: false,
            transfer: None,
            inflight: None,
            postcopy: Err(String::new()),
        }
    }

    pub fn state(&self) -> &MigrationState {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut MigrationState {
        &mut self.state
    }

    /// The handle workers take readers from.
    pub fn dirty_log(&self) -> &SharedDirtyLog {
        &self.log
    }

    /// Whether the VMM asked for logging (VHOST_F_LOG_ALL acked).
    pub fn log_all(&self) -> bool {
        self.log_all
    }

    /// The latest SET_LOG_BASE.
    pub fn log_base(&self) -> Option<&Arc<DirtyBitmap>> {
        self.log_base.as_ref()
    }

    pub fn logging(&self) -> bool {
        self.log_all && self.log_base.is_some()
    }

    pub fn postcopy(&self) -> Result<&PostcopySupport, &str> {
        self.postcopy.as_ref().map_err(|s| s.as_str())
    }

    /// Protocol features this module implements (to OR into the offer).
    /// PAGEFAULT only when the host passed the postcopy check.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        Self::features_for(self.postcopy.is_ok())
    }

    /// What `protocol_features` is, for a module whose postcopy check
    /// passed or not (also what `--print-capabilities` reports).
    pub fn features_for(postcopy: bool) -> VhostUserProtocolFeatures {
        let mut f = VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        if postcopy {
            f |= VhostUserProtocolFeatures::PAGEFAULT;
        }
        f
    }

    fn install_log(&mut self) -> Result<(), MigrationError> {
        let want = if self.log_all {
            self.log_base.clone()
        } else {
            None
        };
        self.log.swap(want)?;
        Ok(())
    }

    /// SET_LOG_BASE. When this returns Ok nobody writes the previous log.
    pub fn set_log_base(
        &mut self,
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
    ) -> Result<(), MigrationError> {
        let b = DirtyBitmap::map(file, mmap_size, mmap_offset)?;
        log::debug!(target: LOG, "new dirty log: {} pages", b.pages());
        self.log_base = Some(Arc::new(b));
        self.install_log()
    }

    /// SET_FEATURES: whether VHOST_F_LOG_ALL is set. Returns true when it
    /// changed (the device then switches to shadow / back, under `--shadow
    /// auto`). Turning logging on installs the log before returning, so call
    /// it before switching to shadow; turning it off, after switching back.
    pub fn set_log_all(&mut self, on: bool) -> Result<bool, MigrationError> {
        if self.log_all == on {
            return Ok(false);
        }
        self.log_all = on;
        self.install_log()?;
        Ok(true)
    }

    /// SET_DEVICE_STATE_FD. `snapshot` builds the state to save (called for
    /// SAVE only, with the device stopped); `limits` bound a LOAD. Returns
    /// the fd to send back (always None: the VMM's pipe is used).
    pub fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
        limits: Limits,
        snapshot: impl FnOnce() -> Result<DeviceState, String>,
    ) -> Result<Option<File>, MigrationError> {
        if let Some(old) = self.transfer.take() {
            old.abort();
        }
        let dir = self.state.set_device_state_fd(direction, phase)?;
        let started = match dir {
            Direction::Save => snapshot()
                .map_err(|why| (why, None))
                .and_then(|s| s.to_bytes().map_err(|e| (e.to_string(), None)))
                .and_then(|bytes| {
                    Transfer::start_save(file, bytes).map_err(|e| (e.to_string(), Some(e)))
                }),
            Direction::Load => {
                Transfer::start_load(file, limits).map_err(|e| (e.to_string(), Some(e)))
            }
        };
        match started {
            Ok(t) => {
                self.transfer = Some(t);
                Ok(None)
            }
            Err((why, _)) => {
                self.state.fail(Failure::Recoverable, &why);
                Err(TransitionError::Failed {
                    from: MigState::Stopped,
                    to: match dir {
                        Direction::Save => MigState::Saving,
                        Direction::Load => MigState::Resuming,
                    },
                    why,
                    now: self.state.state(),
                }
                .into())
            }
        }
    }

    /// CHECK_DEVICE_STATE. For a LOAD, `apply` gets the checked state; it
    /// must apply all of it or report failure: `Failure::Recoverable` when
    /// it refused before changing anything (the device stays STOPPED),
    /// `Failure::Fatal` when it may be half applied (ERROR). A stream that
    /// failed to load leaves the device as it was (STOPPED).
    pub fn check_device_state(
        &mut self,
        apply: impl FnOnce(DeviceState) -> Result<(), (Failure, String)>,
    ) -> Result<(), MigrationError> {
        let Some(t) = self.transfer.take() else {
            // No transfer object: either none was started (refused by the
            // state machine) or it was lost, which must not count as success.
            let lost = Err((
                Failure::Recoverable,
                "no state transfer in progress".to_string(),
            ));
            let e = match self.state.check_device_state(lost) {
                Err(e) => e,
                Ok(()) => TransitionError::NoTransfer(self.state.state()),
            };
            return Err(e.into());
        };
        let outcome = match t.finish(CHECK_TIMEOUT) {
            Ok(Outcome::Saved { bytes }) => {
                log::info!(target: LOG, "device state saved ({bytes} bytes)");
                Ok(())
            }
            Ok(Outcome::Loaded(state)) => apply(*state),
            Err(e) => Err((Failure::Recoverable, e.to_string())),
        };
        self.state.check_device_state(outcome)?;
        Ok(())
    }

    /// GET_INFLIGHT_FD.
    pub fn get_inflight_fd(
        &mut self,
        req: &VhostUserInflight,
        max_queues: u16,
        max_queue_size: u16,
        layout: Layout,
    ) -> Result<(VhostUserInflight, File), MigrationError> {
        let (region, reply, file) =
            InflightRegion::allocate(req, max_queues, max_queue_size, layout)?;
        self.inflight = Some(Arc::new(region));
        Ok((reply, file))
    }

    /// SET_INFLIGHT_FD.
    pub fn set_inflight_fd(
        &mut self,
        req: &VhostUserInflight,
        file: &File,
        max_queues: u16,
        max_queue_size: u16,
        layout: Layout,
    ) -> Result<(), MigrationError> {
        let region = InflightRegion::map(req, file, max_queues, max_queue_size, layout)?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    pub fn inflight(&self) -> Option<Arc<InflightRegion>> {
        self.inflight.clone()
    }

    /// RESET_DEVICE / RESET_OWNER / VMM gone: abandon any transfer, stop
    /// logging, leave ERROR. The in-flight region stays: surviving a
    /// reconnect is its purpose.
    pub fn reset(&mut self) {
        if let Some(t) = self.transfer.take() {
            t.abort();
        }
        self.state.reset();
        self.log_all = false;
        self.log_base = None;
        if let Err(e) = self.log.swap(None) {
            log::error!(target: LOG, "reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::stream::{Features, NicState, RelayMode, RxMode, VlanFilter, VringState};
    use hostmem::memfd;
    use std::io::{Read, Write};
    use std::os::unix::io::FromRawFd;
    use svq::DirtyLog;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn limits() -> Limits {
        Limits {
            queue_count: 2,
            max_queue_size: 256,
            features: virtio_features::F_VERSION_1 | virtio_features::F_LOG_ALL,
            protocol_features: u64::MAX,
        }
    }

    fn state() -> DeviceState {
        DeviceState {
            features: Features {
                virtio: 1 << 32,
                protocol: 0x2,
            },
            mode: RelayMode::Shadow,
            nic: NicState {
                mac: [2, 0, 0, 0, 0, 9],
                mtu: 9000,
                queue_pairs: 1,
                rx_mode: RxMode {
                    promisc: false,
                    allmulti: true,
                },
                vlans: VlanFilter::default(),
            },
            vrings: vec![
                VringState {
                    size: 256,
                    next_avail: 300,
                    used_idx: 300,
                    enabled: true,
                    ..Default::default()
                },
                VringState {
                    size: 256,
                    next_avail: 12,
                    used_idx: 11,
                    enabled: true,
                    in_flight: vec![40],
                    ..Default::default()
                },
            ],
        }
    }

    fn mig() -> Migration {
        Migration::new(Err("not probed in tests".into()))
    }

    const SAVE: VhostTransferStateDirection = VhostTransferStateDirection::SAVE;
    const LOAD: VhostTransferStateDirection = VhostTransferStateDirection::LOAD;
    const STOPPED: VhostTransferStatePhase = VhostTransferStatePhase::STOPPED;

    #[test]
    fn offers_pagefault_only_with_postcopy() {
        assert!(!mig()
            .protocol_features()
            .contains(VhostUserProtocolFeatures::PAGEFAULT));
        let ok = Migration::new(Ok(PostcopySupport {
            features: 0,
            range_ioctls: 0x1c,
            user_mode_only: false,
        }));
        assert!(ok
            .protocol_features()
            .contains(VhostUserProtocolFeatures::PAGEFAULT));
        assert!(ok
            .protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD));
    }

    #[test]
    fn save_on_source_load_on_destination() {
        let mut src = mig();
        let mut dst = mig();
        // Source: VMM's read end, daemon's write end.
        let (mut vmm_r, dev_w) = pipe();
        src.set_device_state_fd(SAVE, STOPPED, dev_w, limits(), || Ok(state()))
            .unwrap();
        assert_eq!(src.state().state(), MigState::Saving);
        let mut bytes = Vec::new();
        vmm_r.read_to_end(&mut bytes).unwrap();
        src.check_device_state(|_| panic!("nothing to apply on save"))
            .unwrap();
        assert_eq!(src.state().state(), MigState::Stopped);

        // Destination: daemon's read end, VMM's write end.
        let (dev_r, mut vmm_w) = pipe();
        dst.set_device_state_fd(LOAD, STOPPED, dev_r, limits(), || unreachable!())
            .unwrap();
        vmm_w.write_all(&bytes).unwrap();
        drop(vmm_w);
        let mut applied = None;
        dst.check_device_state(|s| {
            applied = Some(s);
            Ok(())
        })
        .unwrap();
        assert_eq!(applied, Some(state()));
        assert_eq!(dst.state().state(), MigState::Stopped);
    }

    #[test]
    fn a_bad_stream_applies_nothing_and_leaves_the_device_stopped() {
        let mut dst = mig();
        let (dev_r, mut vmm_w) = pipe();
        dst.set_device_state_fd(LOAD, STOPPED, dev_r, limits(), || unreachable!())
            .unwrap();
        let mut b = state().to_bytes().unwrap();
        b.truncate(b.len() - 3);
        vmm_w.write_all(&b).unwrap();
        drop(vmm_w);
        let e = dst
            .check_device_state(|_| panic!("applied a bad stream"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("truncated record") && e.contains("device now STOPPED"),
            "{e}"
        );
        assert_eq!(dst.state().state(), MigState::Stopped);
    }

    #[test]
    fn a_failed_apply_is_error_until_reset() {
        let mut dst = mig();
        let (dev_r, mut vmm_w) = pipe();
        dst.set_device_state_fd(LOAD, STOPPED, dev_r, limits(), || unreachable!())
            .unwrap();
        vmm_w.write_all(&state().to_bytes().unwrap()).unwrap();
        drop(vmm_w);
        let e = dst
            .check_device_state(|_| Err((Failure::Fatal, "backend refused the vring base".into())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend refused the vring base"), "{e}");
        assert_eq!(dst.state().state(), MigState::Error);
        let (dev_r, _vmm_w) = pipe();
        assert!(dst
            .set_device_state_fd(LOAD, STOPPED, dev_r, limits(), || unreachable!())
            .is_err());
        dst.reset();
        assert_eq!(dst.state().state(), MigState::Stopped);
    }

    #[test]
    fn snapshot_failure_goes_back_to_stopped() {
        let mut src = mig();
        let (_r, w) = pipe();
        let e = src
            .set_device_state_fd(SAVE, STOPPED, w, limits(), || Err("ring 1 broken".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ring 1 broken"), "{e}");
        assert_eq!(src.state().state(), MigState::Stopped);
    }

    #[test]
    fn check_without_transfer() {
        let mut m = mig();
        let e = m.check_device_state(|_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("without a state transfer"), "{e}");
    }

    #[test]
    fn log_is_live_only_with_log_all_and_swaps_per_set_log_base() {
        let mut m = mig();
        let mut r = m.dirty_log().reader();
        let f1 = memfd(c"log1", 8).unwrap();
        let f2 = memfd(c"log2", 8).unwrap();
        m.set_log_base(&f1, 8, 0).unwrap();
        r.pin().mark(0, 1); // LOG_ALL off: not logged
        assert!(!m.logging());
        assert!(m.set_log_all(true).unwrap());
        assert!(!m.set_log_all(true).unwrap());
        r.pin().mark(4096, 1);
        let b1 = m.dirty_log().current().unwrap();
        m.set_log_base(&f2, 8, 0).unwrap();
        r.pin().mark(2 * 4096, 1);
        let b2 = m.dirty_log().current().unwrap();
        assert_eq!(b1.dirty_pages(), vec![1]);
        assert_eq!(b2.dirty_pages(), vec![2]);
        m.set_log_all(false).unwrap();
        r.pin().mark(3 * 4096, 1);
        assert_eq!(b2.dirty_pages(), vec![2]);
        assert!(m.dirty_log().current().is_none());
    }

    #[test]
    fn inflight_messages() {
        let mut m = mig();
        let (reply, file) = m
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 2, 64), 2, 256, Layout::Split)
            .unwrap();
        m.inflight().unwrap().queue(1).unwrap().mark(3, 0).unwrap();
        m.reset();
        m.set_inflight_fd(&reply, &file, 2, 256, Layout::Split)
            .unwrap();
        assert_eq!(
            m.inflight().unwrap().queue(1).unwrap().recover(0).unwrap(),
            vec![3]
        );
        assert!(m
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 3, 64), 2, 256, Layout::Split)
            .is_err());
    }
}
