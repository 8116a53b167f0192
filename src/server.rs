//! The daemon's main loop: sockets, the VMM connection, signals, cleanup.
//!
//! One VMM connection at a time (vhost-user is one frontend per backend). The
//! main thread polls the listening (or connected) socket together with the
//! signal eventfd, so SIGTERM/SIGINT end the daemon cleanly at any point.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::cli::{Listen, RunConfig, ShadowPolicy};
use crate::device::{lock, Device, SharedDevice};
use crate::protocol::Session;
use crate::qmp::{Qmp, QmpDevice};
use crate::vhost_user::{ModeListener, VuHandler};

const LOG: &str = "server";

/// Bounds how long a peer may take to send the rest of a message it started.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("backend {spec}: {source}")]
    Backend {
        spec: String,
        source: backends::BackendError,
    },
    #[error("{0}")]
    Device(#[from] crate::device::DeviceError),
    #[error("{path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("--fd {fd}: {why}")]
    BadFd { fd: RawFd, why: String },
    #[error("signal setup: {0}")]
    Signals(io::Error),
}

/// Files to remove on exit.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Bind a Unix socket with mode 0600, replacing a stale socket file.
pub fn bind_socket(path: &Path) -> Result<UnixListener, RunError> {
    let err = |source| RunError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(RunError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    // SAFETY: umask only changes this process's file mode mask; restored
    // right after bind so the socket is never accessible to others.
    let old = unsafe { libc::umask(0o177) };
    let res = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = res.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

fn listener_from_fd(fd: RawFd) -> Result<UnixListener, RunError> {
    let bad = |why: String| RunError::BadFd { fd, why };
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, a live local.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(bad(format!("not a socket: {}", io::Error::last_os_error())));
    }
    if ty != libc::SOCK_STREAM {
        return Err(bad("not a stream socket".into()));
    }
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above, into the live local `listening`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || listening == 0 {
        return Err(bad("not a listening socket".into()));
    }
    // SAFETY: the fd is an open stream socket inherited for us to use; the
    // listener takes ownership of it for the life of the process.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

enum Wait {
    Ready,
    Signal,
    Timeout,
}

/// Wait for `fd` to be readable, a signal, or the timeout (None = forever).
fn wait_readable(fd: Option<RawFd>, sig: &EventFd, timeout: Option<Duration>) -> Wait {
    let mut fds = vec![libc::pollfd {
        fd: sig.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(fd) = fd {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Wait::Timeout;
        }
        if fds[0].revents != 0 {
            return Wait::Signal;
        }
        if n == 0 {
            return Wait::Timeout;
        }
        return Wait::Ready;
    }
}

/// Serve one VMM connection until it ends, then release what it set up
/// (the device is ready for the next VMM). Returns true if `sig` asked the
/// daemon to exit. Public so that the fuzzer drives exactly this path.
pub fn serve_connection(
    stream: UnixStream,
    device: &SharedDevice,
    sig: &EventFd,
    on_mode: &Option<ModeListener>,
) -> bool {
    let _ = stream.set_read_timeout(Some(MESSAGE_TIMEOUT));
    // A VMM that stops reading replies must not wedge the main thread.
    let _ = stream.set_write_timeout(Some(MESSAGE_TIMEOUT));
    let mut session = Session::new(VuHandler::new(device.clone(), on_mode.clone()));
    log::info!(target: LOG, "VMM connected");
    let exit = loop {
        match wait_readable(Some(stream.as_raw_fd()), sig, None) {
            Wait::Signal => break true,
            Wait::Timeout => continue,
            Wait::Ready => {}
        }
        match session.serve_one(&stream) {
            Ok(()) => {}
            Err(e) if e.is_disconnect() => {
                log::info!(target: LOG, "VMM disconnected");
                break false;
            }
            Err(e) => {
                log::error!(target: LOG, "dropping the VMM connection: {e}");
                break false;
            }
        }
    };
    drop(session);
    drop(stream);
    let events = {
        let mut d = lock(device);
        d.disconnect();
        d.take_mode_events()
    };
    if let Some(l) = on_mode {
        events.into_iter().for_each(|e| l(e));
    }
    exit
}

/// Starts the QMP server; returns what reports vhost-user-caused mode
/// changes as SHADOW_VQ_CHANGED events.
fn start_qmp(path: &Path, device: &SharedDevice) -> Result<ModeListener, RunError> {
    let listener = bind_socket(path)?;
    let qmp = Qmp::new(vec![Arc::new(device.clone()) as Arc<dyn QmpDevice>]);
    let name = lock(device).name().to_string();
    let q2 = qmp.clone();
    let on_mode: ModeListener =
        Arc::new(move |enabled| q2.broadcast(&crate::qmp::mode_event(&name, enabled)));
    std::thread::Builder::new()
        .name("qmp".into())
        .spawn(move || qmp.serve(listener))
        .map_err(|source| RunError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    log::info!(target: LOG, "QMP listening on {}", path.display());
    Ok(on_mode)
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(cfg: RunConfig) -> Result<(), RunError> {
    let backend =
        crate::backend::open(&cfg.backend, cfg.queue_pairs, cfg.queue_size).map_err(|source| {
            RunError::Backend {
                spec: cfg.backend.to_string(),
                source,
            }
        })?;
    let device = Arc::new(Mutex::new(Device::new(
        &cfg.name,
        backend,
        cfg.queue_pairs,
        cfg.queue_size,
        cfg.shadow == ShadowPolicy::On,
    )?));
    lock(&device).set_auto_shadow(cfg.shadow == ShadowPolicy::Auto);
    let mut on_request = 0;
    if cfg.in_order {
        on_request |= virtio_features::F_IN_ORDER;
    }
    if cfg.packed {
        on_request |= virtio_features::F_RING_PACKED;
    }
    lock(&device).set_offered_on_request(on_request);
    lock(&device).configure_workers(cfg.poll, &cfg.worker_cpus)?;
    let sig = crate::signals::install().map_err(RunError::Signals)?;
    let mut cleanup = Cleanup(Vec::new());
    let mut on_mode = None;
    if let Some(qmp) = &cfg.qmp {
        on_mode = Some(start_qmp(qmp, &device)?);
        cleanup.0.push(qmp.clone());
    }
    match &cfg.listen {
        Listen::Path { path, client: true } => run_client(path, &device, &sig, &on_mode),
        Listen::Path {
            path,
            client: false,
        } => {
            let l = bind_socket(path)?;
            cleanup.0.push(path.clone());
            log::info!(target: LOG, "listening on {}", path.display());
            run_listener(&l, &device, &sig, &on_mode);
        }
        Listen::Fd(fd) => {
            let l = listener_from_fd(*fd)?;
            log::info!(target: LOG, "listening on fd {fd}");
            run_listener(&l, &device, &sig, &on_mode);
        }
    }
    log::info!(target: LOG, "exiting on signal");
    Ok(())
}

fn run_listener(
    l: &UnixListener,
    device: &SharedDevice,
    sig: &EventFd,
    on_mode: &Option<ModeListener>,
) {
    loop {
        match wait_readable(Some(l.as_raw_fd()), sig, None) {
            Wait::Signal => return,
            Wait::Timeout => continue,
            Wait::Ready => {}
        }
        match l.accept() {
            Ok((stream, _)) => {
                if serve_connection(stream, device, sig, on_mode) {
                    return;
                }
            }
            Err(e) => {
                log::warn!(target: LOG, "accept: {e}");
                if let Wait::Signal = wait_readable(None, sig, Some(BACKOFF_MIN)) {
                    return;
                }
            }
        }
    }
}

/// --client: connect to the VMM's socket, and again (with backoff) whenever
/// the connection ends or cannot be made.
fn run_client(path: &Path, device: &SharedDevice, sig: &EventFd, on_mode: &Option<ModeListener>) {
    let mut delay = BACKOFF_MIN;
    let mut logged = false;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => {
                log::info!(target: LOG, "connected to {}", path.display());
                logged = false;
                let since = std::time::Instant::now();
                if serve_connection(stream, device, sig, on_mode) {
                    return;
                }
                // A VMM that accepts and drops connections at once must not
                // make this a busy loop; a session that lasted resets it.
                delay = if since.elapsed() > BACKOFF_MAX {
                    BACKOFF_MIN
                } else {
                    (delay * 2).min(BACKOFF_MAX)
                };
                if let Wait::Signal = wait_readable(None, sig, Some(delay)) {
                    return;
                }
            }
            Err(e) => {
                if !logged {
                    log::info!(target: LOG, "connecting to {}: {e}; retrying", path.display());
                    logged = true;
                }
                if let Wait::Signal = wait_readable(None, sig, Some(delay)) {
                    return;
                }
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}
