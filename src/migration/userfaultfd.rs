//! Whether postcopy (vhost-user PAGEFAULT, POSTCOPY_ADVISE/LISTEN/END) can
//! work on this host, checked the way QEMU's postcopy OS-support test does
//! (`postcopy_ram_supported_by_host` / `ufd_check_and_apply` in
//! migration/postcopy-ram.c): open a userfaultfd, do the UFFDIO_API
//! handshake, register an anonymous test page for MISSING faults, check the
//! kernel offers COPY, WAKE and ZEROPAGE on it, unregister.
//!
//! The userfaultfd uAPI is defined here because libc does not carry the
//! ioctl numbers and structs (linux/userfaultfd.h).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::AsRawFd;

const LOG: &str = "postcopy";

/// UFFD_API: the only API version.
pub const UFFD_API: u64 = 0xAA;
/// userfaultfd(2) flag (Linux 5.11+): handle faults from user mode only;
/// allowed without privilege when vm.unprivileged_userfaultfd is 0.
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

// ioctl "nr" values; the kernel reports available ioctls as 1 << nr.
pub const _UFFDIO_REGISTER: u64 = 0x00;
pub const _UFFDIO_UNREGISTER: u64 = 0x01;
pub const _UFFDIO_WAKE: u64 = 0x02;
pub const _UFFDIO_COPY: u64 = 0x03;
pub const _UFFDIO_ZEROPAGE: u64 = 0x04;
pub const _UFFDIO_API: u64 = 0x3F;
const UFFDIO: u64 = 0xAA;

/// struct uffdio_api.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// struct uffdio_range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// struct uffdio_register.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// asm-generic _IOC: dir << 30 | size << 16 | type << 8 | nr.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_WRITE: u64 = 1;

/// _IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)
pub const UFFDIO_API: u64 = ioc(
    IOC_READ | IOC_WRITE,
    _UFFDIO_API,
    std::mem::size_of::<UffdioApi>(),
);
/// _IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register)
pub const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    _UFFDIO_REGISTER,
    std::mem::size_of::<UffdioRegister>(),
);
/// _IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)
pub const UFFDIO_UNREGISTER: u64 = ioc(
    IOC_READ,
    _UFFDIO_UNREGISTER,
    std::mem::size_of::<UffdioRange>(),
);

/// What the API handshake must offer (QEMU's `ioctl_mask`).
const API_IOCTLS: u64 = (1 << _UFFDIO_REGISTER) | (1 << _UFFDIO_UNREGISTER);
/// What a registered range must offer (QEMU's `feature_mask`).
const RANGE_IOCTLS: u64 = (1 << _UFFDIO_WAKE) | (1 << _UFFDIO_COPY) | (1 << _UFFDIO_ZEROPAGE);

/// What the host supports, when it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostcopySupport {
    /// UFFD features the kernel offers (uffdio_api.features).
    pub features: u64,
    /// ioctls available on a MISSING-registered range.
    pub range_ioctls: u64,
    /// The fd had to be opened with UFFD_USER_MODE_ONLY (faults raised by
    /// the kernel on our behalf are not reported).
    pub user_mode_only: bool,
}

/// The OS-support check. `Err` names the step that failed and why; the
/// daemon then does not offer PAGEFAULT and says so in its log and in
/// `--print-capabilities`.
pub fn postcopy_support() -> Result<(), String> {
    probe().map(|_| ())
}

/// Whether the daemon offers PAGEFAULT: the host must pass [`probe`]
/// (vhost 0.18 dispatches POSTCOPY_* with its `postcopy` feature, which the
/// workspace enables). Probed once per process.
pub fn offer() -> Result<PostcopySupport, String> {
    static RESULT: std::sync::OnceLock<Result<PostcopySupport, String>> =
        std::sync::OnceLock::new();
    RESULT.get_or_init(probe).clone()
}

/// The check, with what it found.
pub fn probe() -> Result<PostcopySupport, String> {
    let (ufd, user_mode_only) = open_userfaultfd()?;

    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one struct uffdio_api,
    // which `api` is (repr(C), same layout); ufd is a valid userfaultfd.
    if unsafe { libc::ioctl(ufd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
        return Err(format!(
            "UFFDIO_API handshake failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if api.api != UFFD_API {
        return Err(format!(
            "UFFDIO_API: kernel API {:#x}, expected {UFFD_API:#x}",
            api.api
        ));
    }
    if api.ioctls & API_IOCTLS != API_IOCTLS {
        return Err(format!(
            "UFFDIO_API: missing REGISTER/UNREGISTER ioctls (offered {:#x})",
            api.ioctls
        ));
    }

    let page = TestPage::new()?;
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start: page.addr as u64,
            len: page.len as u64,
        },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads/writes one struct uffdio_register; the
    // range is our own anonymous mapping, alive until `page` drops.
    if unsafe { libc::ioctl(ufd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
        return Err(format!(
            "UFFDIO_REGISTER (missing mode) of a test page failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let unregister = || -> Result<(), String> {
        let mut range = reg.range;
        // SAFETY: UFFDIO_UNREGISTER reads one struct uffdio_range, the range
        // registered above.
        if unsafe { libc::ioctl(ufd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) } != 0 {
            return Err(format!(
                "UFFDIO_UNREGISTER of the test page failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    if reg.ioctls & RANGE_IOCTLS != RANGE_IOCTLS {
        // Unregister before reporting (closing the fd would too).
        let _ = unregister();
        return Err(format!(
            "registered range lacks {} (ioctls {:#x})",
            missing_names(reg.ioctls),
            reg.ioctls
        ));
    }
    unregister()?;
    drop(page);
    drop(ufd);
    log::debug!(target: LOG, "postcopy supported: features {:#x}, range ioctls {:#x}{}",
        api.features, reg.ioctls, if user_mode_only { ", user mode only" } else { "" });
    Ok(PostcopySupport {
        features: api.features,
        range_ioctls: reg.ioctls,
        user_mode_only,
    })
}

fn missing_names(ioctls: u64) -> String {
    [
        (_UFFDIO_COPY, "UFFDIO_COPY"),
        (_UFFDIO_WAKE, "UFFDIO_WAKE"),
        (_UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE"),
    ]
    .iter()
    .filter(|(nr, _)| ioctls & (1 << nr) == 0)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join(", ")
}

fn userfaultfd(flags: libc::c_int) -> Result<OwnedFd, std::io::Error> {
    // SAFETY: the userfaultfd syscall takes one int of flags and returns a
    // new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// userfaultfd(O_CLOEXEC | O_NONBLOCK); when that is not permitted
/// (vm.unprivileged_userfaultfd = 0 without CAP_SYS_PTRACE), again with
/// UFFD_USER_MODE_ONLY.
pub(crate) fn open_userfaultfd() -> Result<(OwnedFd, bool), String> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    match userfaultfd(flags) {
        Ok(fd) => Ok((fd, false)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            match userfaultfd(flags | UFFD_USER_MODE_ONLY) {
                Ok(fd) => Ok((fd, true)),
                Err(e2) => Err(format!(
                    "userfaultfd syscall not permitted ({e}), and with UFFD_USER_MODE_ONLY: {e2} \
                     (see vm.unprivileged_userfaultfd)"
                )),
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Err(format!(
            "userfaultfd syscall not available in this kernel: {e}"
        )),
        Err(e) => Err(format!("userfaultfd syscall failed: {e}")),
    }
}

/// One anonymous private page, unmapped on drop.
struct TestPage {
    addr: *mut libc::c_void,
    len: usize,
}

impl TestPage {
    fn new() -> Result<Self, String> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let len = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => 4096,
        };
        // SAFETY: a fresh anonymous mapping chosen by the kernel; it aliases
        // nothing and is only passed to the kernel, never dereferenced.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!(
                "cannot map a test page: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(TestPage { addr, len })
    }
}

impl Drop for TestPage {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in new().
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// userfaultfd descriptors this process has open.
    fn open_userfaultfds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read_link(e.path())
                            .map(|l| l.to_string_lossy().contains("userfaultfd"))
                            .unwrap_or(false)
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
    }

    #[test]
    fn missing_ioctls_are_named() {
        assert_eq!(
            missing_names(1 << _UFFDIO_WAKE),
            "UFFDIO_COPY, UFFDIO_ZEROPAGE"
        );
        assert_eq!(missing_names(RANGE_IOCTLS), "");
    }

    #[test]
    fn probe_passes_or_says_why_and_leaves_nothing_behind() {
        // The only test in this process that opens userfaultfds.
        let before = open_userfaultfds();
        match probe() {
            Ok(s) => {
                assert_eq!(s.range_ioctls & RANGE_IOCTLS, RANGE_IOCTLS);
                assert_eq!(postcopy_support(), Ok(()));
            }
            Err(why) => {
                assert!(!why.trim().is_empty());
                assert_eq!(postcopy_support(), Err(why.clone()));
                eprintln!("postcopy not supported here: {why}");
            }
        }
        // The fd (and with it any registration) is gone.
        assert_eq!(open_userfaultfds(), before);
    }
}
