//! The reconnect thread: watches the device socket for a hang-up and, while
//! the device is away, gets a new connection and replays the local state.
//! Connecting mode retries with backoff (100 ms doubling to 2 s); listening
//! mode waits for the device to connect again.
//!
//! A thread rather than "reconnect on the next operation": in passthrough the
//! daemon makes no backend calls while traffic flows, so nobody else would
//! notice that the device restarted.

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::conn::Conn;
use super::inner::Inner;
use super::LOG;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    pub(crate) wake: Arc<EventFd>,
    pub(crate) stop: AtomicBool,
    /// Listening mode: the device connects to us.
    pub(crate) listener: Option<UnixListener>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves state that is still
        // self-consistent at message granularity; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Waits until `wake` or `fd` (for `events`) is ready, or `timeout` passes.
/// Returns whether `fd` reported one of `events` or a hang-up/error.
pub(crate) fn wait(wake: &EventFd, fd: Option<(RawFd, i16)>, timeout: Option<Duration>) -> bool {
    let (fd, events) = fd.unwrap_or((-1, 0));
    let mut fds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
    ];
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: `fds` is a valid array of two pollfd that outlives the call; a
    // negative fd is ignored by poll.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return false;
    }
    if fds[0].revents & libc::POLLIN != 0 {
        let _ = wake.read();
    }
    fd >= 0 && fds[1].revents & (events | libc::POLLHUP | libc::POLLERR) != 0
}

/// One attempt at a new connection, negotiated, without the state lock: a
/// slow device must not block the relay's calls.
fn new_connection(shared: &Shared, backoff: Duration) -> Option<crate::Result<Conn>> {
    let (path, pairs, timeout) = {
        let inner = shared.lock();
        if inner.conn.is_some() {
            return None;
        }
        (
            inner.path.clone(),
            inner.opts.queue_pairs,
            inner.opts.reply_timeout,
        )
    };
    let to_err = |e: vhost::Error| crate::BackendError::Device(e.to_string());
    match &shared.listener {
        None => {
            wait(&shared.wake, None, Some(backoff));
            if shared.stop.load(Ordering::Acquire) {
                return None;
            }
            Some(Conn::open(&path, pairs, timeout).map_err(to_err))
        }
        Some(l) => {
            if !wait(&shared.wake, Some((l.as_raw_fd(), libc::POLLIN)), None) {
                return None;
            }
            match l.accept() {
                Ok((sock, _)) => Some(Conn::negotiate(sock, pairs, timeout).map_err(to_err)),
                Err(e) => Some(Err(e.into())),
            }
        }
    }
}

pub(crate) fn run(shared: Arc<Shared>) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let watched = {
            let inner = shared.lock();
            inner
                .conn
                .as_ref()
                .map(|c| (c.watch_handle(), inner.generation))
        };
        match watched {
            Some((Ok(sock), generation)) => {
                backoff = BACKOFF_FIRST;
                // Replies arriving for a request in progress are not ours
                // to see: only ask for the peer closing.
                if wait(
                    &shared.wake,
                    Some((sock.as_raw_fd(), libc::POLLRDHUP)),
                    None,
                ) {
                    let mut inner = shared.lock();
                    if inner.generation == generation {
                        inner.lost_connection("the device closed the connection");
                    }
                }
            }
            Some((Err(e), _)) => {
                log::warn!(target: LOG, "cannot watch the device socket: {e}");
                wait(&shared.wake, None, Some(BACKOFF_MAX));
            }
            None => match new_connection(&shared, backoff) {
                None => {}
                Some(res) => match res.and_then(|conn| shared.lock().replay(conn)) {
                    Ok(()) => backoff = BACKOFF_FIRST,
                    Err(e) => {
                        log::debug!(target: LOG, "reconnecting: {e}");
                        if shared.listener.is_some() {
                            // Connecting mode waits before its next try.
                            wait(&shared.wake, None, Some(backoff));
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                },
            },
        }
    }
}
