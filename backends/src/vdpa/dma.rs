//! The relay's mappings in address space 0, and the IOTLB messages that
//! create and remove them.
//!
//! Every mapping keeps its `Arc<MmapRegion>` until the device has been told to
//! forget it, so the kernel never pins or translates memory the daemon freed.

use std::collections::BTreeMap;

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
