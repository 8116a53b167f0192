//! SIGTERM/SIGINT become a readable eventfd the main loop polls (the
//! self-pipe trick): the handler only does an async-signal-safe write(2).

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte
        // buffer for the duration of the call; the eventfd stays open for the
        // life of the process (it is leaked in `install`).
        unsafe {
            libc::write(fd, (&one as *const u64).cast(), 8);
        }
    }
}

/// Install the handlers; the returned eventfd becomes readable on a signal.
pub fn install() -> io::Result<Arc<EventFd>> {
    let efd = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    SIGNAL_FD.store(efd.as_raw_fd(), Ordering::Relaxed);
    // Keep the fd open for the handler even if every other reference goes.
    std::mem::forget(efd.clone());
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid starting point; we set a plain
        // handler (no SA_SIGINFO) whose body is async-signal-safe, with an
        // empty mask; the pointers passed are to live locals.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // A VMM that goes away mid-write must not kill the daemon.
    // SAFETY: setting SIGPIPE to SIG_IGN has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    Ok(efd)
}
