//! Postcopy live migration (vhost-user PAGEFAULT): the daemon opens a
//! userfaultfd on POSTCOPY_ADVISE and hands it to the VMM; while the VMM
//! listens, every guest region the daemon maps is registered on it (MISSING
//! mode) and its address sent back, so a page the daemon touches before it
//! arrived faults to the VMM, which copies it in (UFFDIO_COPY) and wakes
//! the daemon. POSTCOPY_END unregisters everything and closes the fd. The
//! daemon itself serves no faults: the VMM owns the incoming pages.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::migration::userfaultfd::{
    open_userfaultfd, UffdioApi, UffdioRange, UffdioRegister, UFFDIO_API, UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_UNREGISTER, UFFD_API,
};

const LOG: &str = "device";

#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("{what}: {source}")]
    Uffd {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening a userfaultfd: {0}")]
    Open(String),
    #[error("LISTEN without ADVISE")]
    ListenWithoutAdvise,
    #[error("memory table while listening without ADVISE")]
    RegisterWithoutAdvise,
    #[error("no region at GPA {0:#x}")]
    NoRegion(u64),
}

type Result<T> = std::result::Result<T, PostcopyError>;

/// One postcopy session (ADVISE .. END).
#[derive(Debug)]
pub(crate) struct PostcopySession {
    uffd: OwnedFd,
    /// Host ranges registered on `uffd`.
    registered: Vec<(u64, u64)>,
}

fn err(what: &str) -> PostcopyError {
    PostcopyError::Uffd {
        what: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

impl PostcopySession {
    pub(crate) fn open() -> Result<Self> {
        let (uffd, _) = open_userfaultfd().map_err(PostcopyError::Open)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one struct uffdio_api (the
        // repr(C) `api`); uffd is a fresh userfaultfd.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(err("UFFDIO_API"));
        }
        Ok(PostcopySession {
            uffd,
            registered: Vec::new(),
        })
    }

    /// Register `start..start+len` (a live guest mapping of ours) for
    /// MISSING faults; a range registered already is left as it is.
    pub(crate) fn register(&mut self, start: u64, len: u64) -> Result<()> {
        if self.registered.contains(&(start, len)) {
            return Ok(());
        }
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one struct
        // uffdio_register (`reg`); the range is a live mapping of ours
        // (a guest region), page aligned.
        if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(err(&format!("UFFDIO_REGISTER {start:#x}+{len:#x}")));
        }
        self.registered.push((start, len));
        Ok(())
    }

    fn unregister_all(&mut self) {
        for (start, len) in self.registered.drain(..) {
            let mut range = UffdioRange { start, len };
            // SAFETY: UFFDIO_UNREGISTER reads one struct uffdio_range; the
            // range was registered on this fd. A range unmapped since then
            // fails harmlessly.
            if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) }
                != 0
            {
                log::debug!(target: LOG, "UFFDIO_UNREGISTER {start:#x}: {}",
                    std::io::Error::last_os_error());
            }
        }
    }
}

impl PostcopySession {
    /// A second fd on the userfaultfd, for the VMM.
    pub(crate) fn vmm_fd(&self) -> Result<File> {
        let theirs = self
            .uffd
            .try_clone()
            .map_err(|source| PostcopyError::Uffd {
                what: "dup userfaultfd".into(),
                source,
            })?;
        Ok(File::from(theirs))
    }
}

impl Drop for PostcopySession {
    fn drop(&mut self) {
        self.unregister_all();
    }
}
