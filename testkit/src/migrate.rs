//! Live-migration tools for the test VMM: dirty logs it hands out with
//! SET_LOG_BASE, the device state over SET_DEVICE_STATE_FD pipes, and moving
//! the VMM (same guest memory, same drivers) to a second daemon.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserHeaderFlag,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vm_memory::{FileOffset, MmapRegion};

use crate::vmm::{connect_stream, Vmm};

pub use virtio_features::F_LOG_ALL;
pub const PAGE: u64 = 4096;

/// How long a state transfer may take before the test fails.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(15);

/// The protocol features a migrating VMM negotiates.
pub fn migration_proto() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

fn memfd(name: &std::ffi::CStr, size: u64) -> File {
    hostmem::memfd(name, size).expect("memfd")
}

/// One dirty log (a memfd bitmap, one bit per 4 KiB page).
pub struct Log {
    pub file: File,
    map: MmapRegion,
    pub size: u64,
}

impl Log {
    /// A log covering `guest_bytes` of guest memory.
    pub fn new(guest_bytes: u64) -> Log {
        let pages = guest_bytes.div_ceil(PAGE);
        let size = pages.div_ceil(8).next_multiple_of(8);
        let file = memfd(c"svq-test-log", size);
        let map = MmapRegion::from_file(
            FileOffset::new(file.try_clone().expect("dup log fd"), 0),
            size as usize,
        )
        .expect("map log");
        Log { file, map, size }
    }

    pub fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.size,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// The bitmap bytes now.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        // SAFETY: the mapping is `size` bytes long and stays mapped while
        // `self` lives; the daemon may set bits concurrently (a torn byte
        // read is fine for a snapshot compared later).
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr(), out.as_mut_ptr(), out.len());
        }
        out
    }

    /// Marked pages.
    pub fn pages(&self) -> BTreeSet<u64> {
        let mut set = BTreeSet::new();
        for (i, b) in self.bytes().iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    set.insert(i as u64 * 8 + bit);
                }
            }
        }
        set
    }
}

/// SET_LOG_BASE with `log`; returns when the daemon replied.
pub fn set_log_base(fe: &Frontend, log: &Log) {
    fe.set_log_base(0, Some(log.region()))
        .expect("SET_LOG_BASE");
}

/// Pages touched by `(gpa, len)` ranges.
pub fn pages_of(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for &(gpa, len) in ranges {
        if len == 0 {
            continue;
        }
        for p in gpa / PAGE..=(gpa + len - 1) / PAGE {
            set.insert(p);
        }
    }
    set
}

pub fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// SET_DEVICE_STATE_FD(SAVE), read the stream to EOF, CHECK_DEVICE_STATE.
pub fn save_state(fe: &Frontend) -> Result<Vec<u8>, String> {
    let (mut r, w) = pipe();
    let back = fe
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(w),
        )
        .map_err(|e| format!("SET_DEVICE_STATE_FD(SAVE): {e}"))?;
    if back.is_some() {
        return Err("the daemon sent its own state fd".into());
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let res = r.read_to_end(&mut v).map(|_| v);
        let _ = tx.send(res);
    });
    let bytes = rx
        .recv_timeout(TRANSFER_TIMEOUT)
        .map_err(|_| "the state stream did not end".to_string())?
        .map_err(|e| format!("reading the state: {e}"))?;
    fe.check_device_state()
        .map_err(|e| format!("CHECK_DEVICE_STATE after save: {e}"))?;
    Ok(bytes)
}

/// SET_DEVICE_STATE_FD(LOAD), write `bytes`, close, CHECK_DEVICE_STATE.
pub fn load_state(fe: &Frontend, bytes: &[u8]) -> Result<(), String> {
    let (r, mut w) = pipe();
    fe.set_device_state_fd(
        VhostTransferStateDirection::LOAD,
        VhostTransferStatePhase::STOPPED,
        OwnedFd::from(r),
    )
    .map_err(|e| format!("SET_DEVICE_STATE_FD(LOAD): {e}"))?;
    let bytes = bytes.to_vec();
    // A writer thread: the daemon may stop reading (a stream too large),
    // which ends this write with EPIPE instead of blocking the test.
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
    });
    let _ = writer.join();
    fe.check_device_state()
        .map_err(|e| format!("CHECK_DEVICE_STATE after load: {e}"))
}

impl Vmm {
    /// Connects to another daemon as the same VM (same guest memory, same
    /// drivers and eventfds), negotiates what this VMM negotiated (without
    /// LOG_ALL) and sends the memory table. Rings are not started.
    pub fn move_to(&mut self, path: &Path) {
        let stream = connect_stream(path);
        let raw = stream.try_clone().expect("clone socket");
        let mut fe = Frontend::from_stream(stream, 2 * self.cfg.pairs as u64);
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        assert_eq!(offered, self.offered, "destination offers other features");
        let offered_proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(offered_proto.contains(self.proto), "{offered_proto:?}");
        fe.set_protocol_features(self.proto)
            .expect("SET_PROTOCOL_FEATURES");
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.get_queue_num().expect("GET_QUEUE_NUM");
        self.acked &= !F_LOG_ALL;
        fe.set_features(self.acked).expect("SET_FEATURES");
        self.fe = fe;
        self.raw = raw;
        self.set_mem_table()
            .expect("SET_MEM_TABLE on the destination");
    }

    /// Dirty logging on, as a migration starts: device-written ranges
    /// recorded from here, SET_LOG_BASE with `log`, SET_FEATURES +LOG_ALL.
    pub fn start_logging(&mut self, log: &Log) {
        self.record_written(true);
        set_log_base(&self.fe, log);
        self.acked |= F_LOG_ALL;
        self.fe
            .set_features(self.acked)
            .expect("SET_FEATURES +LOG_ALL");
    }

    /// Stops every ring with frames in flight (sent, not waited for), as a
    /// migration's stop does, then services what completed. Returns the
    /// positions GET_VRING_BASE gave.
    pub fn stop_with_frames_in_flight(&mut self) -> Vec<u32> {
        for p in self.pairs.iter_mut() {
            p.send(16);
        }
        let bases = self.get_vring_bases();
        for p in self.pairs.iter_mut() {
            p.service()
                .unwrap_or_else(|e| panic!("after the stop: {e}"));
        }
        bases
    }

    /// Turns recording of device-written ranges on (or off) on every ring.
    pub fn record_written(&mut self, on: bool) {
        for p in self.pairs.iter_mut() {
            for r in [&mut p.rx.ring, &mut p.tx.ring] {
                if on {
                    r.written.get_or_insert_with(Vec::new);
                } else {
                    r.written = None;
                }
            }
        }
    }

    /// Every range recorded so far.
    pub fn written_ranges(&self) -> Vec<(u64, u64)> {
        self.pairs
            .iter()
            .flat_map(|p| [&p.rx.ring, &p.tx.ring])
            .filter_map(|r| r.written.clone())
            .flatten()
            .collect()
    }
}
