//! One connection to the device: the vhost crate's `Frontend` plus the two
//! messages it lacks (SET_STATUS, GET_STATUS), written here on a clone of the
//! same socket. Every request is answered before the next one is sent (all
//! calls happen under the backend's lock), so the two writers never
//! interleave.

use std::io::{Read, Write};
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::features::{bits, wanted_protocol};
use super::LOG;

pub(crate) type VuResult<T> = std::result::Result<T, vhost::Error>;

const SET_LOG_BASE: u32 = 6;
const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;
const HDR_VERSION: u32 = 0x1;
const HDR_REPLY: u32 = 0x4;
const HDR_NEED_REPLY: u32 = 0x8;

pub(crate) struct Conn {
    pub(crate) fe: Frontend,
    /// Same socket as `fe`, for the messages the crate does not implement.
    raw: UnixStream,
    /// Virtio features the device offers on this connection.
    pub(crate) offered: u64,
    /// Protocol features both sides agreed on.
    pub(crate) proto: VhostUserProtocolFeatures,
    watchdog: Watchdog,
}

/// Bounds every request by the reply timeout. SO_RCVTIMEO alone does not:
/// the vhost crate treats the timed-out read (EAGAIN) as a transient error
/// and reads again, forever. While a request is in progress the watchdog
/// thread shuts the socket down once the deadline passes; the blocked read
/// then ends with an error that marks the connection broken (reconnect).
struct Watchdog {
    shared: Arc<WatchShared>,
    timeout: Duration,
}

struct WatchShared {
    /// Deadline of the request in progress; `Err(())` tells the thread to exit.
    deadline: Mutex<Result<Option<Instant>, ()>>,
    cv: Condvar,
    /// Set when the watchdog shut the socket down.
    fired: std::sync::atomic::AtomicBool,
}

impl Watchdog {
    fn start(sock: UnixStream, timeout: Duration) -> std::io::Result<Watchdog> {
        let shared = Arc::new(WatchShared {
            deadline: Mutex::new(Ok(None)),
            cv: Condvar::new(),
            fired: std::sync::atomic::AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("vu-watchdog".into())
            .spawn(move || watch(&s, &sock))?;
        Ok(Watchdog { shared, timeout })
    }

    fn fired(&self) -> bool {
        self.shared.fired.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set(&self, deadline: Option<Instant>) {
        let mut d = self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if d.is_ok() {
            *d = Ok(deadline);
        }
        self.shared.cv.notify_one();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Err(());
        self.shared.cv.notify_one();
    }
}

fn watch(s: &WatchShared, sock: &UnixStream) {
    let mut d = s.deadline.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        d = match *d {
            Err(()) => return,
            Ok(None) => s.cv.wait(d).unwrap_or_else(|e| e.into_inner()),
            Ok(Some(at)) => {
                let now = Instant::now();
                if now >= at {
                    log::debug!(target: LOG, "the device did not answer in time; shutting the connection down");
                    s.fired.store(true, std::sync::atomic::Ordering::Release);
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                    *d = Ok(None);
                    continue;
                }
                s.cv.wait_timeout(d, at - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0)
            }
        };
    }
}

/// Is the connection unusable after this error (so the device must be
/// reconnected), as opposed to the device refusing one request?
pub(crate) fn is_broken(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as E;
    match e {
        vhost::Error::VhostUserProtocol(e) => !matches!(
            e,
            E::InvalidParam
                | E::InvalidOperation(_)
                | E::InactiveFeature(_)
                | E::InactiveOperation(_)
                | E::BackendInternalError
                | E::FeatureMismatch
                | E::OversizedMsg
                | E::IncorrectFds
        ),
        vhost::Error::IOError(_) => true,
        _ => false,
    }
}

fn protocol_error(what: &'static str) -> vhost::Error {
    vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::InvalidOperation(what))
}

fn io_error(e: std::io::Error) -> vhost::Error {
    vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketBroken(e))
}

impl Conn {
    /// Connect (no retry: reconnection has its own backoff) and negotiate:
    /// SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM.
    pub(crate) fn open(path: &Path, pairs: u16, timeout: Duration) -> VuResult<Conn> {
        let sock = UnixStream::connect(path).map_err(|e| {
            vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketConnect(e))
        })?;
        Self::negotiate(sock, pairs, timeout)
    }

    /// Negotiates on a connection the device made (listening mode) or we
    /// made.
    pub(crate) fn negotiate(sock: UnixStream, pairs: u16, timeout: Duration) -> VuResult<Conn> {
        let watchdog =
            Watchdog::start(sock.try_clone().map_err(io_error)?, timeout).map_err(io_error)?;
        Self::negotiate_bounded(sock, pairs, watchdog).map_err(|(e, w)| {
            if w.fired() {
                io_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ))
            } else {
                e
            }
        })
    }

    fn negotiate_bounded(
        sock: UnixStream,
        pairs: u16,
        watchdog: Watchdog,
    ) -> Result<Conn, (vhost::Error, Watchdog)> {
        let timeout = watchdog.timeout;
        watchdog.set(Some(Instant::now() + timeout));
        match Self::negotiate_inner(sock, pairs, timeout) {
            Ok((fe, raw, offered, proto)) => {
                watchdog.set(None);
                Ok(Conn {
                    fe,
                    raw,
                    offered,
                    proto,
                    watchdog,
                })
            }
            Err(e) => Err((e, watchdog)),
        }
    }

    fn negotiate_inner(
        sock: UnixStream,
        pairs: u16,
        timeout: Duration,
    ) -> VuResult<(Frontend, UnixStream, u64, VhostUserProtocolFeatures)> {
        sock.set_nonblocking(false).map_err(io_error)?;
        // A device that stops answering must not hold the relay forever:
        // the timeouts bound writes; reads are bounded by the Watchdog (the
        // crate retries a timed-out read), and a broken connection is
        // reconnected.
        sock.set_read_timeout(Some(timeout)).map_err(io_error)?;
        sock.set_write_timeout(Some(timeout)).map_err(io_error)?;
        let raw = sock.try_clone().map_err(io_error)?;
        let watchdog =
            Watchdog::start(sock.try_clone().map_err(io_error)?, timeout).map_err(io_error)?;
        watchdog.set(Some(Instant::now() + timeout));
        let queues = 2 * u64::from(pairs);
        let mut fe = Frontend::from_stream(sock, queues);
        fe.set_owner()?;
        let offered = fe.get_features()?;
        let mut proto = VhostUserProtocolFeatures::empty();
        if offered & bits::F_PROTOCOL_FEATURES != 0 {
            let dev_proto = fe.get_protocol_features()?;
            proto = wanted_protocol(dev_proto);
            fe.set_protocol_features(proto)?;
            if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is acknowledged: when a call returns, the
                // device has applied it (a new memory table is in use, a
                // ring is enabled).
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let n = fe.get_queue_num()?;
            if n < queues {
                return Err(protocol_error(
                    "the device has fewer queues than the relay needs",
                ));
            }
        } else if pairs > 1 {
            return Err(protocol_error(
                "the device does not offer MQ but more than one queue pair was asked for",
            ));
        }
        log::debug!(target: LOG, "negotiated: features {offered:#x}, protocol {:#x}",
            proto.bits());
        Ok((fe, raw, offered, proto))
    }

    /// Whether the last exchange ended because the device did not answer
    /// within the reply timeout.
    pub(crate) fn timed_out(&self) -> Option<Duration> {
        self.watchdog.fired().then_some(self.watchdog.timeout)
    }

    /// Runs one exchange with the device under the reply timeout (see
    /// [`Watchdog`]).
    pub(crate) fn bounded<T>(&mut self, f: impl FnOnce(&mut Conn) -> T) -> T {
        self.watchdog
            .set(Some(Instant::now() + self.watchdog.timeout));
        let r = f(self);
        self.watchdog.set(None);
        r
    }

    pub(crate) fn has(&self, f: VhostUserProtocolFeatures) -> bool {
        self.proto.contains(f)
    }

    /// A clone of the socket, for watching it for hang-ups.
    pub(crate) fn watch_handle(&self) -> std::io::Result<UnixStream> {
        self.raw.try_clone()
    }

    fn send_u64(&mut self, request: u32, value: Option<u64>, need_reply: bool) -> VuResult<()> {
        let mut msg = Vec::with_capacity(20);
        let flags = HDR_VERSION | if need_reply { HDR_NEED_REPLY } else { 0 };
        let size: u32 = if value.is_some() { 8 } else { 0 };
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        if let Some(v) = value {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        self.raw.write_all(&msg).map_err(io_error)
    }

    fn recv_u64(&mut self, request: u32) -> VuResult<u64> {
        let mut buf = [0u8; 20];
        self.raw.read_exact(&mut buf).map_err(io_error)?;
        let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        if word(0) != request || word(4) & HDR_REPLY == 0 || word(8) != 8 {
            // Out of step with the device: only a new connection recovers.
            return Err(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::InvalidMessage,
            ));
        }
        let mut v = [0u8; 8];
        v.copy_from_slice(&buf[12..20]);
        Ok(u64::from_le_bytes(v))
    }

    /// SET_LOG_BASE with the log as a shared-memory fd (LOG_SHMFD). Written
    /// here because the crate expects the reply to carry the log region, and
    /// DPDK answers with an empty body (what QEMU expects); both are taken.
    pub(crate) fn set_log_base(&mut self, fd: RawFd, size: u64, offset: u64) -> VuResult<()> {
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&SET_LOG_BASE.to_le_bytes());
        msg.extend_from_slice(&HDR_VERSION.to_le_bytes());
        msg.extend_from_slice(&16u32.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(&offset.to_le_bytes());
        let sent = self
            .raw
            .send_with_fd(&msg[..], fd)
            .map_err(|e| io_error(std::io::Error::from_raw_os_error(e.errno())))?;
        if sent != msg.len() {
            return Err(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::PartialMessage,
            ));
        }
        let mut hdr = [0u8; 12];
        self.raw.read_exact(&mut hdr).map_err(io_error)?;
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let size = word(8) as usize;
        if word(0) != SET_LOG_BASE || word(4) & HDR_REPLY == 0 || size > 16 {
            return Err(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::InvalidMessage,
            ));
        }
        let mut body = [0u8; 16];
        self.raw.read_exact(&mut body[..size]).map_err(io_error)?;
        Ok(())
    }

    pub(crate) fn set_status(&mut self, status: u8) -> VuResult<()> {
        let ack = self.has(VhostUserProtocolFeatures::REPLY_ACK);
        self.send_u64(SET_STATUS, Some(u64::from(status)), ack)?;
        if ack && self.recv_u64(SET_STATUS)? != 0 {
            return Err(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::BackendInternalError,
            ));
        }
        Ok(())
    }

    pub(crate) fn get_status(&mut self) -> VuResult<u8> {
        self.send_u64(GET_STATUS, None, false)?;
        let v = self.recv_u64(GET_STATUS)?;
        Ok(v as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_errors_break_the_connection_refusals_do_not() {
        use vhost::vhost_user::Error as E;
        let vu = vhost::Error::VhostUserProtocol;
        assert!(is_broken(&vu(E::Disconnected)));
        assert!(is_broken(&vu(E::PartialMessage)));
        assert!(is_broken(&vu(E::InvalidMessage)));
        assert!(is_broken(&vu(E::SocketBroken(
            std::io::Error::from_raw_os_error(libc::EPIPE)
        ))));
        assert!(!is_broken(&vu(E::BackendInternalError)));
        assert!(!is_broken(&vu(E::InvalidParam)));
    }
}
