//! Guest memory of the test "VM": memfd-backed regions, region 0 at GPA 0.

use std::os::fd::AsRawFd;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

struct Bump {
    start: u64,
    end: u64,
    next: u64,
}

pub struct GuestMem {
    pub mem: GuestMemoryMmap,
    /// Size of region 0 (which starts at GPA 0).
    pub size: u64,
    bumps: Vec<Bump>,
}

fn memfd_region(gpa: u64, size: usize) -> GuestRegionMmap {
    let region = hostmem::memfd_region(c"svq-test-guest", size).expect("memfd");
    GuestRegionMmap::new(region, GuestAddress(gpa)).expect("guest region")
}

impl GuestMem {
    /// `size` bytes of shared memory (a memfd) at GPA 0.
    pub fn new(size: usize) -> GuestMem {
        GuestMem::with_regions(&[(0, size)])
    }

    /// Several memfd regions `(gpa, size)`, sorted, the first at GPA 0.
    pub fn with_regions(layout: &[(u64, usize)]) -> GuestMem {
        assert_eq!(layout[0].0, 0);
        let regions: Vec<GuestRegionMmap> = layout
            .iter()
            .map(|&(gpa, size)| memfd_region(gpa, size))
            .collect();
        let mem = GuestMemoryMmap::from_regions(regions).expect("guest memory");
        let bumps = layout
            .iter()
            .map(|&(gpa, size)| Bump {
                start: gpa,
                end: gpa + size as u64,
                // Leave the first page unused so a zero address is never a
                // valid buffer.
                next: gpa + 4096,
            })
            .collect();
        GuestMem {
            mem,
            size: layout[0].1 as u64,
            bumps,
        }
    }

    fn region(&self, i: usize) -> &GuestRegionMmap {
        self.mem.iter().nth(i).expect("region index")
    }

    /// Region `i` as SET_MEM_TABLE / ADD_MEM_REG describe it.
    pub fn region_info_of(&self, i: usize) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo::from_guest_region(self.region(i)).expect("region info")
    }

    /// Region 0.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        self.region_info_of(0)
    }

    pub fn num_regions(&self) -> usize {
        self.bumps.len()
    }

    /// The memfd backing region 0.
    pub fn fd(&self) -> i32 {
        self.region(0)
            .file_offset()
            .expect("file backed")
            .file()
            .as_raw_fd()
    }

    /// VMM (frontend process) virtual address of a guest physical address:
    /// what SET_VRING_ADDR carries.
    pub fn vmm_addr(&self, gpa: GuestAddress) -> u64 {
        let r = self
            .mem
            .iter()
            .find(|r| gpa.0 >= r.start_addr().0 && gpa.0 - r.start_addr().0 < r.len())
            .unwrap_or_else(|| panic!("gpa {:#x} outside guest memory", gpa.0));
        r.as_ptr() as u64 + (gpa.0 - r.start_addr().0)
    }

    /// Bump-allocates `len` bytes aligned to `align` (a power of two) in region 0.
    pub fn alloc(&mut self, len: u64, align: u64) -> GuestAddress {
        self.alloc_in(0, len, align)
    }

    /// Bump-allocates in region `i`.
    pub fn alloc_in(&mut self, i: usize, len: u64, align: u64) -> GuestAddress {
        let b = &mut self.bumps[i];
        let start = (b.next + align - 1) & !(align - 1);
        let end = start + len;
        assert!(
            end <= b.end,
            "test guest memory region {i} ({:#x}) exhausted",
            b.start
        );
        b.next = end;
        GuestAddress(start)
    }
}
