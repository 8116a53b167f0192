//! The device's address space, kept locally and sent whole with
//! SET_MEM_TABLE (DPDK's net_vhost does not offer CONFIGURE_MEM_SLOTS).
//!
//! We define the device's address space: each mapping is one table entry
//! with guest_phys_addr = userspace_addr = IOVA. Ring addresses (which
//! vhost-user translates through userspace_addr) and buffer addresses (through
//! guest_phys_addr) are therefore both IOVAs.

use std::collections::BTreeMap;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::{BackendError, DmaRegion, IovaRange, Result};

/// Most regions one SET_MEM_TABLE can carry (VHOST_MEMORY_BASELINE_NREGIONS;
/// DPDK's VHOST_MEMORY_MAX_NREGIONS is the same).
pub(crate) const MAX_REGIONS: usize = 8;

/// The IOVA window we give the relay: 47 bits, a user address space's worth.
/// Address 0 is usable, so guest memory can be mapped at IOVA = GPA.
pub(crate) const IOVA_RANGE: IovaRange = IovaRange {
    first: 0,
    last: (1 << 47) - 1,
};

/// Where the placeholder region sits: outside the range the relay can use.
const PLACEHOLDER_IOVA: u64 = 1 << 47;
const PLACEHOLDER_SIZE: usize = 4096;

#[derive(Default)]
pub(crate) struct MemTable {
    regions: BTreeMap<u64, DmaRegion>,
}

impl MemTable {
    pub(crate) fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    pub(crate) fn map(&mut self, region: DmaRegion) -> Result<()> {
        let size = region.size();
        // IOVA_RANGE starts at 0, so only the top end can be crossed.
        match region.last() {
            Some(last) if size != 0 && last <= IOVA_RANGE.last => {}
            _ => {
                return Err(BackendError::IovaOutOfRange {
                    iova: region.iova,
                    size,
                    first: IOVA_RANGE.first,
                    last: IOVA_RANGE.last,
                })
            }
        }
        let last = region.iova + (size - 1);
        if region.memory.file_offset().is_none() {
            return Err(BackendError::Device(format!(
                "vhost-user: the region at IOVA {:#x} is not backed by a file; \
                 the device can only map fd-backed (memfd, shared) memory",
                region.iova
            )));
        }
        let overlaps = self
            .regions
            .range(..=last)
            .next_back()
            .is_some_and(|(_, r)| r.last().is_some_and(|l| l >= region.iova));
        if overlaps {
            return Err(BackendError::MappingOverlap {
                iova: region.iova,
                size,
            });
        }
        if self.regions.len() >= MAX_REGIONS {
            return Err(BackendError::Device(format!(
                "vhost-user: a memory table holds at most {MAX_REGIONS} regions"
            )));
        }
        self.regions.insert(region.iova, region);
        Ok(())
    }

    pub(crate) fn unmap(&mut self, iova: u64, size: u64) -> Result<DmaRegion> {
        match self.regions.get(&iova) {
            Some(r) if r.size() == size => {}
            _ => return Err(BackendError::NotMapped { iova, size }),
        }
        self.regions
            .remove(&iova)
            .ok_or(BackendError::NotMapped { iova, size })
    }

    /// Would removing `iova..iova+size` take away any byte of `[a, a+len)`?
    pub(crate) fn region_holds(&self, iova: u64, a: u64, len: u64) -> bool {
        self.regions.get(&iova).is_some_and(|r| {
            let end = a.saturating_add(len);
            a <= r.last().unwrap_or(0) && end > r.iova
        })
    }

    /// The region that holds all of `[iova, iova+len)`, and the offset in it.
    fn find(&self, iova: u64, len: u64) -> Option<(&DmaRegion, usize)> {
        let (_, r) = self.regions.range(..=iova).next_back()?;
        let off = iova - r.iova;
        let end = off.checked_add(len)?;
        if end > r.size() {
            return None;
        }
        Some((r, usize::try_from(off).ok()?))
    }

    /// Every byte of `[iova, iova+len)` is in one mapping.
    pub(crate) fn contains(&self, iova: u64, len: u64) -> bool {
        self.find(iova, len).is_some()
    }

    /// Reads a little-endian u16 the device may be writing concurrently
    /// (a used index).
    pub(crate) fn load_u16(&self, iova: u64) -> Option<u16> {
        let (r, off) = self.find(iova, 2)?;
        let v: u16 = r
            .memory
            .as_volatile_slice()
            .load(off, Ordering::Acquire)
            .ok()?;
        Some(u16::from_le(v))
    }

    /// The table entries for SET_MEM_TABLE. An empty table is sent as one
    /// placeholder page outside the relay's range: vhost-user has no empty
    /// table, and a device must not keep memory the relay unmapped.
    pub(crate) fn entries(&self, placeholder: &MmapRegion) -> Vec<VhostUserMemoryRegionInfo> {
        let mut v: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .values()
            .filter_map(|r| {
                let fo = r.memory.file_offset()?;
                Some(entry(r.iova, r.size(), fo))
            })
            .collect();
        if v.is_empty() {
            if let Some(fo) = placeholder.file_offset() {
                v.push(entry(PLACEHOLDER_IOVA, placeholder.size() as u64, fo));
            }
        }
        v
    }
}

fn entry(iova: u64, size: u64, fo: &FileOffset) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: iova,
        memory_size: size,
        userspace_addr: iova,
        mmap_offset: fo.start(),
        mmap_handle: fo.file().as_raw_fd(),
    }
}

/// A small memfd-backed region, for the placeholder table entry and tests.
pub(crate) fn memfd_region(name: &std::ffi::CStr, size: usize) -> Result<Arc<MmapRegion>> {
    Ok(Arc::new(hostmem::memfd_region(name, size)?))
}

pub(crate) fn placeholder() -> Result<Arc<MmapRegion>> {
    memfd_region(c"svq-vu-placeholder", PLACEHOLDER_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(iova: u64, size: usize) -> DmaRegion {
        DmaRegion {
            iova,
            memory: memfd_region(c"t", size).unwrap(),
            readonly: false,
        }
    }

    #[test]
    fn entries_use_the_iova_as_both_addresses() {
        let mut t = MemTable::default();
        t.map(region(0, 0x2000)).unwrap();
        t.map(region(0x10_0000, 0x1000)).unwrap();
        let ph = placeholder().unwrap();
        let e = t.entries(&ph);
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].guest_phys_addr, e[0].userspace_addr, e[0].memory_size),
            (0, 0, 0x2000)
        );
        assert_eq!(
            (e[1].guest_phys_addr, e[1].userspace_addr, e[1].memory_size),
            (0x10_0000, 0x10_0000, 0x1000)
        );
        assert!(e.iter().all(|r| r.mmap_offset == 0 && r.mmap_handle >= 0));
        assert_ne!(e[0].mmap_handle, e[1].mmap_handle);
    }

    #[test]
    fn file_offset_becomes_mmap_offset() {
        let file = memfd_region(c"t", 0x3000).unwrap();
        let fd = file.file_offset().unwrap().file().try_clone().unwrap();
        let mem = MmapRegion::from_file(FileOffset::new(fd, 0x1000), 0x2000).unwrap();
        let mut t = MemTable::default();
        t.map(DmaRegion {
            iova: 0x4000,
            memory: Arc::new(mem),
            readonly: true,
        })
        .unwrap();
        let e = t.entries(&placeholder().unwrap());
        assert_eq!(
            (e[0].guest_phys_addr, e[0].memory_size, e[0].mmap_offset),
            (0x4000, 0x2000, 0x1000)
        );
    }

    #[test]
    fn empty_table_sends_the_placeholder_outside_the_range() {
        let t = MemTable::default();
        let e = t.entries(&placeholder().unwrap());
        assert_eq!(e.len(), 1);
        assert!(e[0].guest_phys_addr > IOVA_RANGE.last);
        assert_eq!(e[0].memory_size, PLACEHOLDER_SIZE as u64);
    }

    #[test]
    fn anonymous_memory_overlap_range_and_count_are_rejected() {
        let mut t = MemTable::default();
        let anon = Arc::new(MmapRegion::new(0x1000).unwrap());
        let r = t.map(DmaRegion {
            iova: 0,
            memory: anon,
            readonly: false,
        });
        assert!(matches!(r, Err(BackendError::Device(m)) if m.contains("not backed by a file")));
        t.map(region(0x1000, 0x2000)).unwrap();
        assert!(matches!(
            t.map(region(0x2000, 0x1000)),
            Err(BackendError::MappingOverlap { .. })
        ));
        assert!(matches!(
            t.map(region(0, 0x1001)),
            Err(BackendError::MappingOverlap { .. })
        ));
        t.map(region(0, 0x1000)).unwrap();
        assert!(matches!(
            t.map(region(IOVA_RANGE.last, 0x1000)),
            Err(BackendError::IovaOutOfRange { .. })
        ));
        assert!(matches!(
            t.map(region(u64::MAX - 0xfff, 0x2000)),
            Err(BackendError::IovaOutOfRange { .. })
        ));
        for k in 2..MAX_REGIONS as u64 {
            t.map(region(k * 0x10_0000, 0x1000)).unwrap();
        }
        assert!(matches!(
            t.map(region(0x1000_0000, 0x1000)),
            Err(BackendError::Device(_))
        ));
    }

    #[test]
    fn unmap_needs_the_exact_mapping() {
        let mut t = MemTable::default();
        t.map(region(0x1000, 0x2000)).unwrap();
        assert!(t.unmap(0x1000, 0x1000).is_err());
        assert!(t.unmap(0x2000, 0x1000).is_err());
        t.unmap(0x1000, 0x2000).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn lookups_stay_inside_one_mapping() {
        let mut t = MemTable::default();
        let r = region(0x1000, 0x1000);
        r.memory
            .as_volatile_slice()
            .write_obj(0x1234u16.to_le(), 0x10)
            .unwrap();
        t.map(r).unwrap();
        assert_eq!(t.load_u16(0x1010), Some(0x1234));
        assert_eq!(t.load_u16(0x1fff), None, "straddles the end");
        assert_eq!(t.load_u16(0x800), None);
        assert!(t.contains(0x1000, 0x1000));
        assert!(!t.contains(0x1000, 0x1001));
        assert!(t.region_holds(0x1000, 0x1ff0, 0x100));
        assert!(!t.region_holds(0x1000, 0x2000, 0x100));
        assert!(!t.region_holds(0x5000, 0x1000, 1));
    }
}
