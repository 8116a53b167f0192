//! Postcopy live migration (vhost-user PAGEFAULT): the daemon opens a
//! userfaultfd on POSTCOPY_ADVISE and hands it to the VMM; while the VMM
//! listens, every guest region the daemon maps is registered on it (MISSING
//! mode) and its address sent back, so a page the daemon touches before it
//! arrived faults to the VMM, which copies it in (UFFDIO_COPY) and wakes
//! the daemon. POSTCOPY_END unregisters everything and closes the fd. The
//! daemon itself serves no faults: the VMM owns the incoming pages.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::device::{Device, DeviceError, Result, LOG};
use crate::migration::postcopy::{
    open_userfaultfd, UffdioApi, UffdioRange, UffdioRegister, UFFDIO_API, UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_UNREGISTER, UFFD_API,
};

/// One postcopy session (ADVISE .. END).
#[derive(Debug)]
pub(crate) struct PostcopySession {
    uffd: OwnedFd,
    /// Host ranges registered on `uffd`.
    registered: Vec<(u64, u64)>,
}

fn err(what: &str) -> DeviceError {
    DeviceError::Postcopy(format!("{what}: {}", std::io::Error::last_os_error()))
}

impl PostcopySession {
    fn open() -> Result<Self> {
        let (uffd, _) = open_userfaultfd().map_err(DeviceError::Postcopy)?;
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

    fn register(&mut self, start: u64, len: u64) -> Result<()> {
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

impl Drop for PostcopySession {
    fn drop(&mut self) {
        self.unregister_all();
    }
}

impl Device {
    /// POSTCOPY_ADVISE: a new userfaultfd for the VMM.
    pub fn postcopy_advise(&mut self) -> Result<File> {
        let s = PostcopySession::open()?;
        let theirs = s
            .uffd
            .try_clone()
            .map_err(|e| DeviceError::Postcopy(format!("dup userfaultfd: {e}")))?;
        self.postcopy = Some(s);
        log::info!(target: LOG, "{}: postcopy advised", self.name);
        Ok(File::from(theirs))
    }

    /// POSTCOPY_LISTEN (the protocol session tracks ADVISE/LISTEN/END).
    pub fn postcopy_listen(&mut self) -> Result<()> {
        if self.postcopy.is_none() {
            return Err(DeviceError::Postcopy("LISTEN without ADVISE".into()));
        }
        Ok(())
    }

    /// While listening: register the guest regions at `gpas` (in the
    /// VMM's order) and return the daemon's addresses of them.
    pub fn postcopy_register(&mut self, gpas: &[u64]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(gpas.len());
        for &gpa in gpas {
            let r = self
                .mem
                .regions()
                .iter()
                .find(|r| r.desc.gpa == gpa)
                .ok_or_else(|| DeviceError::Postcopy(format!("no region at GPA {gpa:#x}")))?;
            out.push((r.mmap.as_ptr() as u64, r.mmap.size() as u64));
        }
        let s = self.postcopy.as_mut().ok_or_else(|| {
            DeviceError::Postcopy("memory table while listening without ADVISE".into())
        })?;
        for &(start, len) in &out {
            s.register(start, len)?;
        }
        Ok(out.into_iter().map(|(a, _)| a).collect())
    }

    /// POSTCOPY_END.
    pub fn postcopy_end(&mut self) -> Result<()> {
        if self.postcopy.take().is_some() {
            log::info!(target: LOG, "{}: postcopy ended", self.name);
        }
        Ok(())
    }
}
