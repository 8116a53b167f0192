//! The reconnect thread: watches the device socket for a hang-up and, while
//! the device is away, reconnects with backoff (100 ms doubling to 2 s) and
//! replays the local state.
//!
//! A thread rather than "reconnect on the next operation": in passthrough the
//! daemon makes no backend calls while traffic flows, so nobody else would
//! notice that the device restarted.

use std::os::unix::io::AsRawFd;
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
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves state that is still
        // self-consistent at message granularity; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Waits until `wake` or `sock` (if any) is ready, or `timeout` passes.
/// Returns whether the socket hung up.
fn wait(
    wake: &EventFd,
    sock: Option<&std::os::unix::net::UnixStream>,
    timeout: Option<Duration>,
) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sock.map_or(-1, |s| s.as_raw_fd()),
            // Replies arriving for a request in progress are not ours to
            // see: only ask for the peer closing.
            events: libc::POLLRDHUP,
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
    sock.is_some() && fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
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
                if wait(&shared.wake, Some(&sock), None) {
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
            None => {
                wait(&shared.wake, None, Some(backoff));
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                let (path, pairs, timeout) = {
                    let inner = shared.lock();
                    if inner.conn.is_some() {
                        continue;
                    }
                    (
                        inner.path.clone(),
                        inner.opts.queue_pairs,
                        inner.opts.reply_timeout,
                    )
                };
                // Connecting and negotiating happen without the lock: a slow
                // device must not block the relay's calls.
                let res = Conn::open(&path, pairs, timeout)
                    .map_err(|e| crate::BackendError::Device(e.to_string()))
                    .and_then(|conn| shared.lock().replay(conn));
                match res {
                    Ok(()) => backoff = BACKOFF_FIRST,
                    Err(e) => {
                        log::debug!(target: LOG, "reconnecting to {}: {e}", path.display());
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }
}
