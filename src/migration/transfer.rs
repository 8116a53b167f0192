//! Device-state transfer over the fd of SET_DEVICE_STATE_FD (normally a
//! pipe end). The copy runs on its own thread so the vhost-user thread keeps
//! answering messages; CHECK_DEVICE_STATE collects the outcome with
//! [`Transfer::finish`]. All I/O is non-blocking with poll, so a VMM that
//! never reads or never closes ends in a timeout or a cancel, not a stuck
//! thread.
//!
//! Writing to a pipe whose reader has gone raises SIGPIPE; Rust binaries
//! (the daemon and the test harness) ignore SIGPIPE, so it surfaces as EPIPE.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::state_machine::Direction;
use super::stream::{DeviceState, Limits, StateError, MAX_STREAM};

const LOG: &str = "migration";

/// Longest a whole transfer may take once started.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a blocked transfer looks at its cancel flag.
const POLL_TICK_MS: i32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot start the transfer thread: {0}")]
    Spawn(std::io::Error),
    #[error("state transfer fd: {0}")]
    Fd(std::io::Error),
    #[error("state transfer I/O after {done} bytes: {source}")]
    Io { done: usize, source: std::io::Error },
    #[error("the VMM closed the pipe after {done} of {total} bytes")]
    Closed { done: usize, total: usize },
    #[error("state transfer did not finish within {0:?}")]
    Timeout(Duration),
    #[error("state transfer cancelled")]
    Cancelled,
    #[error("device state stream: {0}")]
    Stream(#[from] StateError),
    #[error("state transfer thread ended without a result")]
    Lost,
}

/// What a finished transfer produced.
#[derive(Debug)]
pub enum Outcome {
    /// Every byte of the stream was written and the fd closed.
    Saved { bytes: usize },
    /// The whole stream was read and validated; apply it now (nothing has
    /// been applied yet).
    Loaded(Box<DeviceState>),
}

type Done = Result<Outcome, TransferError>;

/// A transfer in progress.
#[derive(Debug)]
pub struct Transfer {
    direction: Direction,
    cancel: Arc<AtomicBool>,
    rx: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

impl Transfer {
    /// Write `stream` (from [`DeviceState::to_bytes`], taken while the
    /// device is stopped) to `fd`, then close it.
    pub fn start_save(fd: File, stream: Vec<u8>) -> Result<Self, TransferError> {
        Self::spawn(Direction::Save, fd, move |fd, cancel| {
            write_all(&fd, &stream, cancel).map(|n| Outcome::Saved { bytes: n })
        })
    }

    /// Read a stream from `fd` until EOF and check it against `limits`.
    pub fn start_load(fd: File, limits: Limits) -> Result<Self, TransferError> {
        Self::spawn(Direction::Load, fd, move |fd, cancel| {
            let bytes = read_to_eof(&fd, MAX_STREAM, cancel)?;
            let state = DeviceState::from_bytes(&bytes, &limits)?;
            Ok(Outcome::Loaded(Box::new(state)))
        })
    }

    fn spawn(
        direction: Direction,
        fd: File,
        work: impl FnOnce(File, &AtomicBool) -> Done + Send + 'static,
    ) -> Result<Self, TransferError> {
        // O_NONBLOCK is shared with other holders of this open file; the VMM
        // closes its copy of our pipe end after sending it (QEMU does), so
        // only we see the flag.
        set_nonblocking(&fd).map_err(TransferError::Fd)?;
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let c = cancel.clone();
        let thread = std::thread::Builder::new()
            .name(format!("state-{direction}").to_lowercase())
            .spawn(move || {
                let r = work(fd, &c);
                // fd is closed by now (moved into `work`): the VMM sees EOF.
                match &r {
                    Ok(_) => log::debug!(target: LOG, "state {direction} done"),
                    Err(e) => log::warn!(target: LOG, "state {direction} failed: {e}"),
                }
                let _ = tx.send(r);
            })
            .map_err(TransferError::Spawn)?;
        Ok(Transfer {
            direction,
            cancel,
            rx,
            thread: Some(thread),
        })
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Wait (at most `timeout`) for the outcome. On timeout the transfer is
    /// cancelled: a late result can no longer be applied.
    pub fn finish(mut self, timeout: Duration) -> Result<Outcome, TransferError> {
        let r = match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(TransferError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(TransferError::Lost),
        };
        self.stop();
        r
    }

    /// Abandon the transfer (a new SET_DEVICE_STATE_FD, a reset).
    pub fn abort(mut self) {
        self.stop();
    }

    /// Cancel and join; the thread notices within one poll tick.
    fn stop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_nonblocking(fd: &File) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor `fd` owns; only file status flags change.
    let r = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            -1
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Wait until `fd` is ready for `events`, the deadline passes or `cancel` is
/// set.
fn wait(
    fd: &File,
    events: libc::c_short,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<(), TransferError> {
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(TransferError::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(TransferError::Timeout(TRANSFER_TIMEOUT));
        }
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, count 1.
        let n = unsafe { libc::poll(&mut p, 1, POLL_TICK_MS) };
        if n > 0 {
            // Readable/writable, or HUP/ERR: the next read/write says which.
            return Ok(());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(TransferError::Io { done: 0, source: e });
            }
        }
    }
}

fn write_all(fd: &File, data: &[u8], cancel: &AtomicBool) -> Result<usize, TransferError> {
    use std::io::Write;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    let mut done = 0;
    let mut f = fd;
    while done < data.len() {
        match f.write(&data[done..]) {
            Ok(0) => {
                return Err(TransferError::Closed {
                    done,
                    total: data.len(),
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait(fd, libc::POLLOUT, deadline, cancel)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                return Err(TransferError::Closed {
                    done,
                    total: data.len(),
                })
            }
            Err(source) => return Err(TransferError::Io { done, source }),
        }
    }
    Ok(done)
}

fn read_to_eof(fd: &File, max: usize, cancel: &AtomicBool) -> Result<Vec<u8>, TransferError> {
    use std::io::Read;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut f = fd;
    loop {
        match f.read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) => {
                if buf.len() + n > max {
                    return Err(StateError::TooLarge { max }.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait(fd, libc::POLLIN, deadline, cancel)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(TransferError::Io {
                    done: buf.len(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::stream::{Features, NicState, RelayMode, RxMode, VlanFilter, VringState};
    use std::io::{Read, Write};
    use std::os::unix::io::FromRawFd;

    const WAIT: Duration = Duration::from_secs(10);

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn limits() -> Limits {
        Limits {
            queue_count: 2,
            max_queue_size: 256,
            features: 1 << 32,
            protocol_features: 0,
        }
    }

    fn state() -> DeviceState {
        DeviceState {
            features: Features {
                virtio: 1 << 32,
                protocol: 0,
            },
            mode: RelayMode::Shadow,
            nic: NicState {
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
                queue_pairs: 1,
                rx_mode: RxMode::default(),
                vlans: VlanFilter::default(),
            },
            vrings: vec![
                VringState {
                    size: 256,
                    next_avail: 3,
                    used_idx: 1,
                    enabled: true,
                    in_flight: vec![7, 8],
                    ..Default::default()
                },
                VringState {
                    size: 256,
                    enabled: true,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn save_writes_the_whole_stream_then_eof() {
        let (mut r, w) = pipe();
        let bytes = state().to_bytes().unwrap();
        let t = Transfer::start_save(w, bytes.clone()).unwrap();
        assert_eq!(t.direction(), Direction::Save);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap(); // EOF: the daemon closed its end
        assert_eq!(got, bytes);
        match t.finish(WAIT).unwrap() {
            Outcome::Saved { bytes: n } => assert_eq!(n, bytes.len()),
            o => panic!("{o:?}"),
        }
        assert_eq!(DeviceState::from_bytes(&got, &limits()).unwrap(), state());
    }

    #[test]
    fn save_larger_than_the_pipe_buffer() {
        let (mut r, w) = pipe();
        let bytes: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let t = Transfer::start_save(w, bytes.clone()).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, bytes);
        assert!(matches!(
            t.finish(WAIT),
            Ok(Outcome::Saved { bytes: 300_000 })
        ));
    }

    #[test]
    fn save_to_a_closed_pipe_fails() {
        let (r, w) = pipe();
        drop(r);
        let t = Transfer::start_save(w, vec![1; 1000]).unwrap();
        let e = t.finish(WAIT).unwrap_err().to_string();
        assert!(e.contains("closed the pipe after 0 of 1000 bytes"), "{e}");
    }

    #[test]
    fn save_nobody_reads_can_be_aborted() {
        let (_r, w) = pipe();
        let t = Transfer::start_save(w, vec![0; 1 << 20]).unwrap();
        // The pipe fills and the thread waits in poll; abort must end it.
        t.abort();
        let (_r, w) = pipe();
        let t = Transfer::start_save(w, vec![0; 1 << 20]).unwrap();
        let e = t.finish(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, TransferError::Timeout(_)), "{e}");
    }

    #[test]
    fn load_reads_until_eof_and_validates() {
        let (r, mut w) = pipe();
        let t = Transfer::start_load(r, limits()).unwrap();
        w.write_all(&state().to_bytes().unwrap()).unwrap();
        drop(w);
        match t.finish(WAIT).unwrap() {
            Outcome::Loaded(s) => assert_eq!(*s, state()),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn load_of_a_bad_stream_names_the_problem() {
        let (r, mut w) = pipe();
        let t = Transfer::start_load(r, limits()).unwrap();
        let b = state().to_bytes().unwrap();
        w.write_all(&b[..b.len() - 8]).unwrap(); // no end record
        drop(w);
        let e = t.finish(WAIT).unwrap_err().to_string();
        assert!(e.contains("without an end record"), "{e}");

        let (r, mut w) = pipe();
        let t = Transfer::start_load(r, limits()).unwrap();
        let mut b = state().to_bytes().unwrap();
        b[4] = 9;
        w.write_all(&b).unwrap();
        drop(w);
        let e = t.finish(WAIT).unwrap_err().to_string();
        assert!(e.contains("unsupported stream version 9"), "{e}");
    }

    #[test]
    fn load_stops_at_the_size_bound() {
        let (r, w) = pipe();
        let t = Transfer::start_load(r, limits()).unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            // Stops with EPIPE once the loader gave up and closed its end.
            while sent <= MAX_STREAM + chunk.len() {
                if w.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
        });
        let e = t.finish(WAIT).unwrap_err().to_string();
        assert!(
            e.contains(&format!("larger than {MAX_STREAM} bytes")),
            "{e}"
        );
        writer.join().unwrap();
    }

    #[test]
    fn load_without_eof_times_out_and_ends() {
        let (r, mut w) = pipe();
        let t = Transfer::start_load(r, limits()).unwrap();
        w.write_all(b"SVQR").unwrap();
        let e = t.finish(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, TransferError::Timeout(_)), "{e}");
        // The thread is gone: its end of the pipe is closed.
        assert!(w.write_all(&[0; 8]).is_err());
    }
}
