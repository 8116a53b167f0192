//! Turning every kind of failure into a saved input: panics (on any thread)
//! through a panic hook, wild memory accesses through a SIGSEGV/SIGBUS
//! handler that writes the input being run before the process dies, hangs
//! through a watchdog. And memory with inaccessible guard pages around each
//! region, so that an access outside what the daemon was given faults
//! instead of reading a neighbour.

use std::ffi::CString;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// A case that runs longer than this is a hang.
pub const HANG_SECS: u64 = 20;

static CUR_PTR: AtomicPtr<u8> = AtomicPtr::new(ptr::null_mut());
static CUR_LEN: AtomicUsize = AtomicUsize::new(0);
/// Cases started so far (the watchdog's progress counter).
static STARTED: AtomicU64 = AtomicU64::new(0);
/// Where a crash or a hang leaves the input, and the summary prefix.
static CRASH_PATH: OnceLock<CString> = OnceLock::new();
static PREFIX: OnceLock<Vec<u8>> = OnceLock::new();
static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Install the panic hook, the fault handlers and the watchdog. `target`
/// and `crash_path` name what a fatal failure prints and writes.
pub fn install(target: &str, crash_path: &str) {
    let _ = CRASH_PATH.set(CString::new(crash_path).expect("path without NUL"));
    let _ = PREFIX.set(format!("{target}: ").into_bytes());
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        let msg = format!("panic on thread {thread}: {info}");
        if CUR_PTR.load(Ordering::SeqCst).is_null() {
            // Outside a case: the harness itself broke, nobody will ask.
            eprintln!("svq-fuzz: {msg}");
        }
        let mut p = PANIC.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some(msg);
        }
    }));
    for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE] {
        // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO
        // signature and an empty mask is a valid argument; the handler only
        // calls async-signal-safe functions (open, write, close, _exit).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fault as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, ptr::null_mut());
        }
    }
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(watchdog)
        .expect("start the watchdog thread");
}

/// Mark `input` as the case now running (kept until the next call).
pub fn begin_case(input: &[u8]) {
    CUR_LEN.store(0, Ordering::SeqCst);
    CUR_PTR.store(input.as_ptr() as *mut u8, Ordering::SeqCst);
    CUR_LEN.store(input.len(), Ordering::SeqCst);
    STARTED.fetch_add(1, Ordering::SeqCst);
}

/// The case is over: its input may be freed.
pub fn end_case() {
    CUR_LEN.store(0, Ordering::SeqCst);
    CUR_PTR.store(ptr::null_mut(), Ordering::SeqCst);
}

/// The first panic since the last call, on any thread.
pub fn take_panic() -> Option<String> {
    PANIC.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn watchdog() {
    let mut last = STARTED.load(Ordering::SeqCst);
    let mut still = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = STARTED.load(Ordering::SeqCst);
        let running = !CUR_PTR.load(Ordering::SeqCst).is_null();
        if now != last || !running {
            last = now;
            still = 0;
            continue;
        }
        still += 1;
        if still >= HANG_SECS {
            die(b"hang: one case ran for more than the watchdog allows");
        }
    }
}

extern "C" fn on_fault(sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let what: &[u8] = match sig {
        libc::SIGSEGV => b"SIGSEGV (access outside the memory given)",
        libc::SIGBUS => b"SIGBUS (access past the end of a mapping)",
        libc::SIGILL => b"SIGILL",
        _ => b"SIGFPE",
    };
    die(what);
}

/// Save the running input, print the summary line, exit. Only
/// async-signal-safe calls: this runs inside a fault handler.
fn die(what: &[u8]) -> ! {
    let p = CUR_PTR.load(Ordering::SeqCst);
    let n = CUR_LEN.load(Ordering::SeqCst);
    let path = CRASH_PATH.get();
    if let Some(path) = path {
        // SAFETY: `path` is a NUL-terminated string that lives forever;
        // `p`/`n` describe the input buffer the engine keeps alive while the
        // case runs (`begin_case`/`end_case`), or are null/0.
        unsafe {
            let fd = libc::open(
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            );
            if fd >= 0 {
                if !p.is_null() && n > 0 {
                    libc::write(fd, p as *const libc::c_void, n);
                }
                libc::close(fd);
            }
        }
    }
    let mut line = [0u8; 512];
    let mut len = 0;
    let mut put = |b: &[u8]| {
        for &c in b {
            if len < line.len() {
                line[len] = c;
                len += 1;
            }
        }
    };
    put(PREFIX
        .get()
        .map_or(b"svq-fuzz: ".as_slice(), |v| v.as_slice()));
    let mut digits = [0u8; 20];
    let mut cases = STARTED.load(Ordering::SeqCst);
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (cases % 10) as u8;
        cases /= 10;
        if cases == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" cases, 1 failures (");
    put(what);
    put(b"; input in ");
    if let Some(path) = path {
        put(path.as_bytes());
    }
    put(b")\n");
    // SAFETY: writing a stack buffer to stdout and exiting without running
    // destructors are both async-signal-safe.
    unsafe {
        libc::write(1, line.as_ptr() as *const libc::c_void, len);
        libc::_exit(3);
    }
}

/// Anonymous memory cut into regions, each with an inaccessible page before
/// and after it.
pub struct GuardedMemory {
    base: *mut u8,
    total: usize,
    regions: Vec<(*mut u8, usize)>,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointers
// are only handed out as addresses for vm-memory regions.
unsafe impl Send for GuardedMemory {}
// SAFETY: as above; the value itself never writes through its pointers.
unsafe impl Sync for GuardedMemory {}

pub const PAGE: usize = 4096;

impl GuardedMemory {
    /// Regions of `sizes` bytes (multiples of the page size).
    pub fn new(sizes: &[usize]) -> std::io::Result<Self> {
        assert!(sizes.iter().all(|s| s % PAGE == 0 && *s > 0));
        let total = PAGE + sizes.iter().map(|s| s + PAGE).sum::<usize>();
        // SAFETY: a fresh private anonymous mapping with no access; nothing
        // else refers to it.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = base as *mut u8;
        let mut regions = Vec::new();
        let mut off = PAGE;
        for &s in sizes {
            // SAFETY: `base + off .. + s` lies inside the mapping made above
            // (`total` counts every region and its guard page).
            let r = unsafe { base.add(off) };
            // SAFETY: as above; only the region's own pages become
            // accessible, the guard pages around it stay PROT_NONE.
            let rc = unsafe {
                libc::mprotect(
                    r as *mut libc::c_void,
                    s,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: unmapping what this function mapped.
                unsafe { libc::munmap(base as *mut libc::c_void, total) };
                return Err(e);
            }
            regions.push((r, s));
            off += s + PAGE;
        }
        Ok(GuardedMemory {
            base,
            total,
            regions,
        })
    }

    /// A vm-memory view of region `i`. The view does not own the mapping:
    /// keep `self` alive longer than every view.
    pub fn region(&self, i: usize) -> vm_memory::MmapRegion {
        let (p, s) = self.regions[i];
        // SAFETY: `p..p+s` is a read-write part of the private anonymous
        // mapping this value owns and unmaps only on drop, after the views
        // (the targets drop their guest memory and queues first).
        unsafe {
            vm_memory::MmapRegion::build_raw(
                p,
                s,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .expect("a page-aligned region")
    }

    /// Zero every region (between cases).
    pub fn clear(&self) {
        for &(p, s) in &self.regions {
            // SAFETY: `p..p+s` is a read-write region of this mapping.
            unsafe { ptr::write_bytes(p, 0, s) };
        }
    }
}

impl Drop for GuardedMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping `new` made; no view outlives `self`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.total) };
    }
}
