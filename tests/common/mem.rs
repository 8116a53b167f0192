//! Guest memory of the test "VM": one memfd mapped at GPA 0.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

pub struct GuestMem {
    pub mem: GuestMemoryMmap,
    pub size: u64,
    next: u64,
}

impl GuestMem {
    /// `size` bytes of shared memory (a memfd) at GPA 0.
    pub fn new(size: usize) -> GuestMem {
        // SAFETY: the name is a valid NUL-terminated string; memfd_create does
        // not retain the pointer.
        let fd = unsafe { libc::memfd_create(c"svq-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).expect("size memfd");
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size).expect("mmap memfd");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("guest region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        GuestMem {
            mem,
            size: size as u64,
            // Leave page 0 unused so a zero address is never a valid buffer.
            next: 4096,
        }
    }

    /// The region as the vhost-user SET_MEM_TABLE describes it.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        let region = self.mem.iter().next().expect("one region");
        VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info")
    }

    /// The memfd backing guest memory.
    pub fn fd(&self) -> i32 {
        let region = self.mem.iter().next().expect("one region");
        region
            .file_offset()
            .expect("file backed")
            .file()
            .as_raw_fd()
    }

    /// VMM (frontend process) virtual address of a guest physical address:
    /// what SET_VRING_ADDR carries.
    pub fn vmm_addr(&self, gpa: GuestAddress) -> u64 {
        let region = self.mem.iter().next().expect("one region");
        assert!(
            gpa.0 < region.len(),
            "gpa {:#x} outside guest memory",
            gpa.0
        );
        region.as_ptr() as u64 + gpa.0
    }

    /// Bump-allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> GuestAddress {
        let start = (self.next + align - 1) & !(align - 1);
        let end = start + len;
        assert!(end <= self.size, "test guest memory exhausted");
        self.next = end;
        GuestAddress(start)
    }
}
