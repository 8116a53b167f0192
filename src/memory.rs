//! The guest memory table the VMM sends (SET_MEM_TABLE, ADD_MEM_REG,
//! REM_MEM_REG): each region mapped into the daemon from the VMM's fd, plus the
//! translation of VMM virtual addresses (what SET_VRING_ADDR carries) to
//! guest-physical addresses.
//!
//! This module only holds the table; placing regions in the IOVA tree and the
//! device is the device model's job (it must also handle rollback).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Most regions a vhost-user frontend may plug (VHOST_USER_MAX_RAM_SLOTS).
pub const MAX_MEM_SLOTS: usize = 509;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory region GPA {gpa:#x} size {size:#x}: empty or wraps the address space")]
    BadRegion { gpa: u64, size: u64 },
    #[error("memory region GPA {gpa:#x} size {size:#x} overlaps another region")]
    Overlap { gpa: u64, size: u64 },
    #[error("too many memory regions (at most {MAX_MEM_SLOTS})")]
    TooMany,
    #[error("cannot map memory region GPA {gpa:#x} size {size:#x}: {err}")]
    Mmap {
        gpa: u64,
        size: u64,
        err: vm_memory::mmap::MmapRegionError,
    },
    #[error("memory region GPA {gpa:#x} size {size:#x} at file offset {offset:#x}: the file has only {file_len:#x} bytes")]
    FileTooSmall {
        gpa: u64,
        size: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("cannot inspect memory region fd: {0}")]
    Fd(std::io::Error),
    #[error("no memory region at GPA {gpa:#x} size {size:#x}")]
    NoSuchRegion { gpa: u64, size: u64 },
    #[error("VMM address {addr:#x}+{len:#x} is not inside one guest memory region")]
    NotInGuestMemory { addr: u64, len: u64 },
}

/// Where a region comes from, as the frontend described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    pub gpa: u64,
    pub size: u64,
    /// Start of the region in the VMM's virtual address space.
    pub user_addr: u64,
    pub mmap_offset: u64,
}

impl RegionDesc {
    fn check(&self) -> Result<(), MemoryError> {
        let ok = self.size > 0
            && self.gpa.checked_add(self.size - 1).is_some()
            && self.user_addr.checked_add(self.size - 1).is_some()
            && usize::try_from(self.size).is_ok();
        if ok {
            Ok(())
        } else {
            Err(MemoryError::BadRegion {
                gpa: self.gpa,
                size: self.size,
            })
        }
    }

    fn last_gpa(&self) -> u64 {
        self.gpa + (self.size - 1)
    }
}

/// One guest memory region mapped into the daemon.
#[derive(Clone, Debug)]
pub struct GuestRegion {
    pub desc: RegionDesc,
    pub mmap: Arc<MmapRegion>,
    /// (st_dev, st_ino) of the backing file: tells a re-sent identical region
    /// (keep the mapping) from new memory at the same address (re-map).
    file_id: (u64, u64),
}

impl GuestRegion {
    /// Map `size` bytes of `file` at `mmap_offset` (shared, read-write).
    pub fn map(desc: RegionDesc, file: File) -> Result<Self, MemoryError> {
        desc.check()?;
        let meta = file.metadata().map_err(MemoryError::Fd)?;
        let file_id = (meta.dev(), meta.ino());
        // Touching a shared mapping past the end of its file raises SIGBUS:
        // refuse a region the file cannot back (memfd, tmpfs, hugetlbfs all
        // report their size).
        let too_small = match desc.mmap_offset.checked_add(desc.size) {
            Some(end) => end > meta.len(),
            None => true,
        };
        if meta.is_file() && too_small {
            return Err(MemoryError::FileTooSmall {
                gpa: desc.gpa,
                size: desc.size,
                offset: desc.mmap_offset,
                file_len: meta.len(),
            });
        }
        let mmap = MmapRegion::from_file(
            FileOffset::new(file, desc.mmap_offset),
            desc.size as usize, // checked to fit by desc.check()
        )
        .map_err(|err| MemoryError::Mmap {
            gpa: desc.gpa,
            size: desc.size,
            err,
        })?;
        Ok(GuestRegion {
            desc,
            mmap: Arc::new(mmap),
            file_id,
        })
    }

    /// True if `other` describes the same memory at the same addresses.
    pub fn same_as(&self, other: &GuestRegion) -> bool {
        self.desc == other.desc && self.file_id == other.file_id
    }
}

/// The current table, sorted by GPA, regions never overlapping.
#[derive(Clone, Debug, Default)]
pub struct MemoryTable {
    regions: Vec<GuestRegion>,
}

impl MemoryTable {
    /// Build a table from a whole set of regions (SET_MEM_TABLE).
    pub fn from_regions(mut regions: Vec<GuestRegion>) -> Result<Self, MemoryError> {
        if regions.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany);
        }
        regions.sort_by_key(|r| r.desc.gpa);
        for pair in regions.windows(2) {
            if pair[0].desc.last_gpa() >= pair[1].desc.gpa {
                return Err(MemoryError::Overlap {
                    gpa: pair[1].desc.gpa,
                    size: pair[1].desc.size,
                });
            }
        }
        Ok(MemoryTable { regions })
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// A copy of this table with one more region (ADD_MEM_REG).
    pub fn with_added(&self, region: GuestRegion) -> Result<Self, MemoryError> {
        let mut regions = self.regions.clone();
        regions.push(region);
        Self::from_regions(regions)
    }

    /// A copy of this table without the region at `gpa` of `size` bytes
    /// (REM_MEM_REG), and the removed region.
    pub fn with_removed(&self, gpa: u64, size: u64) -> Result<(Self, GuestRegion), MemoryError> {
        let pos = self
            .regions
            .iter()
            .position(|r| r.desc.gpa == gpa && r.desc.size == size)
            .ok_or(MemoryError::NoSuchRegion { gpa, size })?;
        let mut regions = self.regions.clone();
        let removed = regions.remove(pos);
        Ok((MemoryTable { regions }, removed))
    }

    /// Translate a VMM virtual address range to a GPA; the whole range must
    /// lie inside one region (a ring is contiguous in guest memory).
    pub fn vmm_to_gpa(&self, addr: u64, len: u64) -> Result<u64, MemoryError> {
        let err = MemoryError::NotInGuestMemory { addr, len };
        let len = len.max(1);
        let Some(last) = addr.checked_add(len - 1) else {
            return Err(err);
        };
        self.regions
            .iter()
            .find(|r| {
                let d = &r.desc;
                addr >= d.user_addr && last <= d.user_addr + (d.size - 1)
            })
            .map(|r| r.desc.gpa + (addr - r.desc.user_addr))
            .ok_or(err)
    }

    /// True if `[gpa, gpa+len)` lies inside one region.
    pub fn contains_gpa(&self, gpa: u64, len: u64) -> bool {
        let len = len.max(1);
        let Some(last) = gpa.checked_add(len - 1) else {
            return false;
        };
        self.regions
            .iter()
            .any(|r| gpa >= r.desc.gpa && last <= r.desc.last_gpa())
    }

    /// The table as vm-memory guest memory (sharing the same mappings).
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        let regions: Vec<Arc<GuestRegionMmap>> = self
            .regions
            .iter()
            // Cannot fail: desc.check() rejected regions that wrap.
            .filter_map(|r| GuestRegionMmap::with_arc(r.mmap.clone(), GuestAddress(r.desc.gpa)))
            .map(Arc::new)
            .collect();
        if regions.is_empty() {
            return GuestMemoryMmap::new();
        }
        // Cannot fail either: sorted and non-overlapping by construction.
        GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    pub(crate) fn memfd(size: u64) -> File {
        hostmem::memfd(c"svq-relay-test", size).unwrap()
    }

    pub(crate) fn region(gpa: u64, size: u64, user_addr: u64) -> GuestRegion {
        GuestRegion::map(
            RegionDesc {
                gpa,
                size,
                user_addr,
                mmap_offset: 0,
            },
            memfd(size),
        )
        .unwrap()
    }

    #[test]
    fn vmm_address_translation() {
        let t = MemoryTable::from_regions(vec![
            region(0x10_0000, 0x10000, 0x7f00_0000_0000),
            region(0, 0x10000, 0x7f10_0000_0000),
        ])
        .unwrap();
        assert_eq!(t.regions()[0].desc.gpa, 0);
        assert_eq!(t.vmm_to_gpa(0x7f10_0000_0000, 16).unwrap(), 0);
        assert_eq!(t.vmm_to_gpa(0x7f00_0000_1000, 0x100).unwrap(), 0x10_1000);
        // Last byte of a region is fine, one past it is not.
        assert_eq!(t.vmm_to_gpa(0x7f00_0000_ffff, 1).unwrap(), 0x10_ffff);
        assert!(t.vmm_to_gpa(0x7f00_0000_ffff, 2).is_err());
        assert!(t.vmm_to_gpa(0x1234, 1).is_err());
        assert!(t.vmm_to_gpa(u64::MAX, 2).is_err());
        assert!(t.contains_gpa(0x10_0000, 0x10000));
        assert!(!t.contains_gpa(0xffff, 2));
        assert!(!t.contains_gpa(u64::MAX, 2));
    }

    #[test]
    fn guest_memory_shares_the_mapping() {
        let t = MemoryTable::from_regions(vec![region(0x1000, 0x2000, 0x5000)]).unwrap();
        let gm = t.guest_memory();
        gm.write_obj(0xdead_beefu32, GuestAddress(0x1100)).unwrap();
        let r = &t.regions()[0];
        // SAFETY: offset 0x100 is inside the 0x2000-byte mapping.
        let v = unsafe { std::ptr::read_unaligned(r.mmap.as_ptr().add(0x100) as *const u32) };
        assert_eq!(v, 0xdead_beef);
        assert_eq!(gm.num_regions(), 1);
        assert_eq!(MemoryTable::default().guest_memory().num_regions(), 0);
    }

    #[test]
    fn overlap_add_remove() {
        let t = MemoryTable::from_regions(vec![region(0, 0x2000, 0x1_0000)]).unwrap();
        assert!(matches!(
            t.with_added(region(0x1000, 0x1000, 0x2_0000)),
            Err(MemoryError::Overlap { .. })
        ));
        let t2 = t.with_added(region(0x2000, 0x1000, 0x2_0000)).unwrap();
        assert_eq!(t2.regions().len(), 2);
        assert!(matches!(
            t2.with_removed(0x2000, 0x2000),
            Err(MemoryError::NoSuchRegion { .. })
        ));
        let (t3, removed) = t2.with_removed(0x2000, 0x1000).unwrap();
        assert_eq!(removed.desc.gpa, 0x2000);
        assert_eq!(t3.regions().len(), 1);
        assert!(t3.vmm_to_gpa(0x2_0000, 1).is_err());
    }

    #[test]
    fn bad_regions_are_errors() {
        let bad = RegionDesc {
            gpa: u64::MAX - 10,
            size: 0x1000,
            user_addr: 0,
            mmap_offset: 0,
        };
        assert!(matches!(
            GuestRegion::map(bad, memfd(0x1000)),
            Err(MemoryError::BadRegion { .. })
        ));
        let past_end = RegionDesc {
            gpa: 0,
            size: 0x2000,
            user_addr: 0,
            mmap_offset: 0x1000,
        };
        assert!(matches!(
            GuestRegion::map(past_end, memfd(0x2000)),
            Err(MemoryError::FileTooSmall { .. })
        ));
        let empty = RegionDesc { size: 0, ..bad };
        assert!(GuestRegion::map(empty, memfd(0x1000)).is_err());
        // An fd that cannot be mapped (a pipe).
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are fresh and owned here.
        let (r, w) = unsafe {
            use std::os::unix::io::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        drop(w);
        let ok = RegionDesc {
            gpa: 0,
            size: 0x1000,
            user_addr: 0,
            mmap_offset: 0,
        };
        assert!(GuestRegion::map(ok, r).is_err());
    }

    #[test]
    fn same_as_compares_file_identity() {
        let a = region(0, 0x1000, 0x1000);
        let b = region(0, 0x1000, 0x1000);
        assert!(a.same_as(&a.clone()));
        assert!(!a.same_as(&b));
    }
}
