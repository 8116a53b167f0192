//! Anonymous shared memory files: the one place the workspace calls
//! `memfd_create`.
//!
//! Memory the daemon shares with another party (a device that maps it, a
//! VMM that is handed the fd, a test playing the guest) lives in a memfd so
//! it can be passed over a socket and mapped `MAP_SHARED` on both ends.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, MmapRegion};

/// A new memfd of `size` zero-filled bytes, close-on-exec. `name` shows in
/// `/proc/PID/fd` and `/proc/PID/maps` (as `/memfd:NAME`).
pub fn memfd(name: &CStr, size: u64) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of
    // the call; memfd_create reads nothing else of ours and returns a new fd
    // or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and nothing else owns it;
    // the File takes ownership and closes it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// A new memfd of `size` bytes, mapped shared and read-write.
pub fn memfd_region(name: &CStr, size: usize) -> io::Result<MmapRegion> {
    let file = memfd(name, size as u64)?;
    MmapRegion::from_file(FileOffset::new(file, 0), size)
        .map_err(|e| io::Error::other(format!("mapping memfd {name:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, VolatileMemory};

    #[test]
    fn memfd_has_the_size_asked_and_is_shared() {
        let f = memfd(c"hostmem-test", 8192).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 8192);
        let a: MmapRegion =
            MmapRegion::from_file(FileOffset::new(f.try_clone().unwrap(), 0), 8192).unwrap();
        let b: MmapRegion = MmapRegion::from_file(FileOffset::new(f, 0), 8192).unwrap();
        a.as_volatile_slice().write_obj(0xabcdu32, 4096).unwrap();
        let b = b.as_volatile_slice();
        assert_eq!(b.read_obj::<u32>(4096).unwrap(), 0xabcd);
        assert_eq!(b.read_obj::<u32>(0).unwrap(), 0);
    }

    #[test]
    fn region_is_mapped_with_its_size() {
        let r = memfd_region(c"hostmem-test", 4096).unwrap();
        assert_eq!(r.size(), 4096);
    }
}
