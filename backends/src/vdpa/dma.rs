//! The relay's mappings in address space 0, and the IOTLB messages that
//! create and remove them.
//!
//! Every mapping keeps its `Arc<MmapRegion>` until the device has been told to
//! forget it, so the kernel never pins or translates memory the daemon freed.

use std::collections::BTreeMap;

use vm_memory::{Bytes, VolatileMemory};

use super::sys::{IotlbKind, IotlbMsg, ACCESS_RO, ACCESS_RW};
use crate::{BackendError, DmaRegion, IovaRange, Result};

/// The kernel pins memory by pages: an IOVA and the memory it maps must sit
/// at the same offset inside a page.
const PAGE_MASK: u64 = 4096 - 1;

#[derive(Default)]
pub(crate) struct DmaTable {
    maps: BTreeMap<u64, DmaRegion>,
}

impl DmaTable {
    /// Checks that `region` can be added: not empty, inside `range`, not
    /// overlapping a mapping here or one of `pending` (other regions of the
    /// same call), page offsets matching.
    pub(crate) fn check_new(
        &self,
        region: &DmaRegion,
        range: IovaRange,
        pending: &[DmaRegion],
    ) -> Result<()> {
        let size = region.size();
        let last = range.check(region)?;
        let uaddr = region.memory.as_ptr() as u64;
        if (uaddr ^ region.iova) & PAGE_MASK != 0 {
            return Err(BackendError::InvalidState {
                op: "dma_map",
                why: "an IOVA and the memory it maps must have the same offset inside a 4 KiB page",
            });
        }
        let overlap = BackendError::MappingOverlap {
            iova: region.iova,
            size,
        };
        if let Some((_, prev)) = self.maps.range(..=last).next_back() {
            if prev.last().is_some_and(|plast| plast >= region.iova) {
                return Err(overlap);
            }
        }
        if pending.iter().any(|p| {
            p.last()
                .is_some_and(|plast| p.iova <= last && region.iova <= plast)
        }) {
            return Err(overlap);
        }
        Ok(())
    }

    pub(crate) fn insert(&mut self, region: DmaRegion) {
        self.maps.insert(region.iova, region);
    }

    /// Start addresses of the mappings that lie inside `iova..iova+size`.
    /// A range that cuts a mapping, or holds none, is an error: a mapping
    /// always goes away whole.
    pub(crate) fn inside(&self, iova: u64, size: u64) -> Result<Vec<u64>> {
        let not_mapped = BackendError::NotMapped { iova, size };
        if size == 0 {
            return Err(not_mapped);
        }
        let last = iova.checked_add(size - 1).ok_or(not_mapped)?;
        if let Some((_, prev)) = self.maps.range(..iova).next_back() {
            if prev.last().is_some_and(|plast| plast >= iova) {
                return Err(BackendError::NotMapped { iova, size });
            }
        }
        let mut inside = Vec::new();
        for (&start, region) in self.maps.range(iova..=last) {
            match region.last() {
                Some(rlast) if rlast <= last => inside.push(start),
                _ => return Err(BackendError::NotMapped { iova, size }),
            }
        }
        if inside.is_empty() {
            return Err(BackendError::NotMapped { iova, size });
        }
        Ok(inside)
    }

    pub(crate) fn get(&self, iova: u64) -> Option<&DmaRegion> {
        self.maps.get(&iova)
    }

    pub(crate) fn remove(&mut self, iova: u64) -> Option<DmaRegion> {
        self.maps.remove(&iova)
    }

    pub(crate) fn regions(&self) -> impl Iterator<Item = &DmaRegion> {
        self.maps.values()
    }

    /// The little-endian 16-bit value at `iova`, read from the memory of
    /// the one mapping that holds both bytes. [`BackendError::NotMapped`]
    /// (`iova`, 2 bytes) when no mapping does: nothing mapped there, or the
    /// value would straddle the end of a mapping.
    pub(crate) fn read_u16(&self, iova: u64) -> Result<u16> {
        let not_mapped = || BackendError::NotMapped { iova, size: 2 };
        let (&start, region) = self
            .maps
            .range(..=iova)
            .next_back()
            .ok_or_else(not_mapped)?;
        let last = iova.checked_add(1).ok_or_else(not_mapped)?;
        if region.last().is_none_or(|rlast| rlast < last) {
            return Err(not_mapped());
        }
        let off = usize::try_from(iova - start).map_err(|_| not_mapped())?;
        region
            .memory
            .get_slice(off, 2)
            .and_then(|s| s.read_obj::<u16>(0))
            .map(u16::from_le)
            .map_err(|_| not_mapped())
    }
}

pub(crate) fn update_msg(asid: u32, region: &DmaRegion) -> IotlbMsg {
    IotlbMsg {
        asid,
        kind: IotlbKind::Update,
        iova: region.iova,
        size: region.size(),
        uaddr: region.memory.as_ptr() as u64,
        perm: if region.readonly {
            ACCESS_RO
        } else {
            ACCESS_RW
        },
    }
}

pub(crate) fn invalidate_msg(asid: u32, iova: u64, size: u64) -> IotlbMsg {
    IotlbMsg {
        asid,
        kind: IotlbKind::Invalidate,
        iova,
        size,
        uaddr: 0,
        perm: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, MmapRegion, VolatileMemory};

    use super::*;

    fn table() -> DmaTable {
        let mut t = DmaTable::default();
        for iova in [0x1000u64, 0x3000] {
            let memory = Arc::new(MmapRegion::new(0x1000).unwrap());
            memory
                .get_slice(0, 0x1000)
                .unwrap()
                .write_obj(0xbeefu16.to_le(), 0x10)
                .unwrap();
            memory
                .get_slice(0, 0x1000)
                .unwrap()
                .write_obj(0x1234u16.to_le(), 0xffe)
                .unwrap();
            t.insert(DmaRegion {
                iova,
                memory,
                readonly: false,
            });
        }
        t
    }

    #[test]
    fn read_u16_reads_inside_one_mapping() {
        let t = table();
        assert_eq!(t.read_u16(0x1010).unwrap(), 0xbeef);
        assert_eq!(t.read_u16(0x3010).unwrap(), 0xbeef);
        // The last two bytes of a mapping.
        assert_eq!(t.read_u16(0x1ffe).unwrap(), 0x1234);
        assert_eq!(t.read_u16(0x1000).unwrap(), 0);
    }

    #[test]
    fn read_u16_outside_the_mappings_is_not_mapped() {
        let t = table();
        // Below the first mapping, in the gap, past the last one, straddling
        // a mapping's end (into the gap and into nothing), at the top of the
        // address space.
        for iova in [0, 0xfff, 0x2000, 0x2ffe, 0x4000, 0x1fff, 0x3fff, u64::MAX] {
            assert!(
                matches!(
                    t.read_u16(iova),
                    Err(BackendError::NotMapped { iova: i, size: 2 }) if i == iova
                ),
                "{iova:#x}"
            );
        }
        assert!(matches!(
            DmaTable::default().read_u16(0x1000),
            Err(BackendError::NotMapped { .. })
        ));
    }
}
