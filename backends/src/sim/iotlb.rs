//! The sim's IOTLB: the only way the device reaches memory.
//!
//! Filled by `dma_map`/`dma_unmap` exactly like a vDPA device's IOTLB, so a
//! relay that forgets to map something sees the same failure it would see with
//! hardware. Workers read an immutable [`IotlbView`] snapshot; a new snapshot is
//! published on every map/unmap.

use std::collections::BTreeMap;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::{BackendError, DmaRegion, IovaRange, Result};

/// What the sim claims it can address: 48 bits, like typical IOMMU-backed
/// hardware, so a relay's IOVA allocator is exercised against a real limit.
pub(crate) const IOVA_RANGE: IovaRange = IovaRange {
    first: 0,
    last: (1 << 48) - 1,
};

#[derive(Default)]
pub(crate) struct Iotlb {
    maps: BTreeMap<u64, DmaRegion>,
}

/// An immutable picture of the IOTLB that workers use for every access.
pub(crate) struct IotlbView {
    pub(crate) mem: GuestMemoryMmap,
    /// Inclusive IOVA ranges the device may read but never write.
    readonly: Vec<(u64, u64)>,
}

impl IotlbView {
    pub(crate) fn empty() -> Self {
        IotlbView {
            mem: GuestMemoryMmap::new(),
            readonly: Vec::new(),
        }
    }

    /// True if every byte of `addr..addr+len` is mapped.
    pub(crate) fn readable(&self, addr: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        if addr.checked_add(len as u64 - 1).is_none() {
            return false;
        }
        GuestMemoryBackend::check_range(&self.mem, GuestAddress(addr), len)
    }

    /// True if every byte of `addr..addr+len` is mapped and none of it read-only.
    pub(crate) fn writable(&self, addr: u64, len: u64) -> bool {
        if !self.readable(addr, len) {
            return false;
        }
        if len == 0 {
            return true;
        }
        let last = addr + (len - 1);
        !self
            .readonly
            .iter()
            .any(|&(first, rlast)| first <= last && addr <= rlast)
    }
}

impl Iotlb {
    pub(crate) fn map(&mut self, region: DmaRegion) -> Result<()> {
        let size = region.size();
        let last = IOVA_RANGE.check(&region)?;
        // The mapping starting at or before `last` with the highest start is
        // the only one that can overlap from below; anything starting inside
        // the new range overlaps too and also starts at or before `last`.
        if let Some((_, prev)) = self.maps.range(..=last).next_back() {
            if prev.last().is_some_and(|plast| plast >= region.iova) {
                return Err(BackendError::MappingOverlap {
                    iova: region.iova,
                    size,
                });
            }
        }
        self.maps.insert(region.iova, region);
        Ok(())
    }

    /// Removes every mapping inside `iova..iova+size`. A range that cuts a
    /// mapping in two, or that holds no mapping at all, is an error and removes
    /// nothing: a mapping always covers a whole `MmapRegion`.
    pub(crate) fn unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        let not_mapped = BackendError::NotMapped { iova, size };
        if size == 0 {
            return Err(not_mapped);
        }
        let last = iova.checked_add(size - 1).ok_or(not_mapped)?;
        let mut inside = Vec::new();
        // A mapping starting below `iova` that reaches into the range would be
        // cut in two.
        if let Some((_, prev)) = self.maps.range(..iova).next_back() {
            if prev.last().is_some_and(|plast| plast >= iova) {
                return Err(BackendError::NotMapped { iova, size });
            }
        }
        for (&start, region) in self.maps.range(iova..=last) {
            match region.last() {
                Some(rlast) if rlast <= last => inside.push(start),
                _ => return Err(BackendError::NotMapped { iova, size }),
            }
        }
        if inside.is_empty() {
            return Err(BackendError::NotMapped { iova, size });
        }
        for start in inside {
            self.maps.remove(&start);
        }
        Ok(())
    }

    pub(crate) fn view(&self) -> Result<IotlbView> {
        if self.maps.is_empty() {
            return Ok(IotlbView::empty());
        }
        let mut regions = Vec::with_capacity(self.maps.len());
        let mut readonly = Vec::new();
        for region in self.maps.values() {
            let r =
                GuestRegionMmap::with_arc(Arc::clone(&region.memory), GuestAddress(region.iova))
                    .ok_or_else(|| {
                        BackendError::Device("DMA region wraps the address space".into())
                    })?;
            regions.push(Arc::new(r));
            if region.readonly {
                if let Some(last) = region.last() {
                    readonly.push((region.iova, last));
                }
            }
        }
        let mem = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| BackendError::Device(format!("IOTLB inconsistent: {e}")))?;
        Ok(IotlbView { mem, readonly })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::MmapRegion;

    fn region(iova: u64, size: usize) -> DmaRegion {
        DmaRegion {
            iova,
            memory: Arc::new(MmapRegion::new(size).unwrap()),
            readonly: false,
        }
    }

    #[test]
    fn overlaps_and_range_are_rejected() {
        let mut t = Iotlb::default();
        t.map(region(0x10000, 0x2000)).unwrap();
        for iova in [0xf000, 0x10000, 0x11000, 0x11fff] {
            assert!(matches!(
                t.map(region(iova, 0x1000 + (iova == 0xf000) as usize * 0x1000)),
                Err(BackendError::MappingOverlap { .. })
            ));
        }
        t.map(region(0x12000, 0x1000)).unwrap();
        t.map(region(0xf000, 0x1000)).unwrap();
        assert!(matches!(
            t.map(region((1 << 48) - 0x1000, 0x2000)),
            Err(BackendError::IovaOutOfRange { .. })
        ));
        t.map(region((1 << 48) - 0x1000, 0x1000)).unwrap();
    }

    #[test]
    fn unmap_needs_whole_mappings() {
        let mut t = Iotlb::default();
        t.map(region(0x10000, 0x2000)).unwrap();
        t.map(region(0x12000, 0x1000)).unwrap();
        assert!(t.unmap(0x11000, 0x1000).is_err());
        assert!(t.unmap(0x10000, 0x1000).is_err());
        assert!(t.unmap(0x20000, 0x1000).is_err());
        let v = t.view().unwrap();
        assert!(v.readable(0x10000, 0x3000));
        assert!(!v.readable(0x10000, 0x3001));
        t.unmap(0x10000, 0x3000).unwrap();
        assert!(!t.view().unwrap().readable(0x10000, 1));
    }

    #[test]
    fn readonly_regions_are_not_writable() {
        let mut t = Iotlb::default();
        let mut r = region(0x1000, 0x1000);
        r.readonly = true;
        t.map(r).unwrap();
        t.map(region(0x2000, 0x1000)).unwrap();
        let v = t.view().unwrap();
        assert!(v.readable(0x1000, 0x2000));
        assert!(!v.writable(0x1fff, 2));
        assert!(v.writable(0x2000, 0x1000));
    }
}
