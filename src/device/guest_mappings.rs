//! Guest memory as the VMM describes it (SET_MEM_TABLE, ADD/REM_MEM_REG),
//! mapped into the IOVA tree and the device, and handed to the workers.

use std::sync::Arc;

use backends::DmaRegion;
use iova::AddrSpace;

use super::error::{DeviceError, Result};
use super::model::{Device, Running, LOG};
use crate::memory::{GuestRegion, MemoryTable};

impl Device {
    /// Replace the whole memory table. Regions sent again unchanged keep
    /// their mappings; new ones are mapped into the IOVA tree and the device
    /// before old ones go, so running rings never see a hole.
    pub fn set_mem_table(&mut self, regions: Vec<GuestRegion>) -> Result<()> {
        let reused: Vec<GuestRegion> = regions
            .into_iter()
            .map(|r| {
                self.mem
                    .regions()
                    .iter()
                    .find(|old| old.same_as(&r))
                    .cloned()
                    .unwrap_or(r)
            })
            .collect();
        let table = MemoryTable::from_regions(reused)?;
        self.replace_memory(table)
    }

    /// ADD_MEM_REG. The same region again is accepted and changes
    /// nothing: QEMU keeps one memory table per queue pair's vhost device
    /// and each of them adds every region.
    pub fn add_mem_region(&mut self, region: GuestRegion) -> Result<()> {
        if self.mem.regions().iter().any(|r| r.desc == region.desc) {
            log::debug!(target: LOG, "{}: region at GPA {:#x} is already mapped", self.name, region.desc.gpa);
            return Ok(());
        }
        let table = self.mem.with_added(region)?;
        self.replace_memory(table)
    }

    pub fn remove_mem_region(&mut self, gpa: u64, size: u64) -> Result<()> {
        let (table, _) = self.mem.with_removed(gpa, size)?;
        self.replace_memory(table)
    }

    /// Drop all guest memory (VMM gone).
    pub(crate) fn clear_memory(&mut self) {
        if let Err(e) = self.replace_memory(MemoryTable::default()) {
            log::warn!(target: LOG, "{}: unmapping guest memory: {e}", self.name);
        }
    }

    fn is_mapped(&self, r: &GuestRegion) -> bool {
        self.mem
            .regions()
            .iter()
            .any(|old| Arc::ptr_eq(&old.mmap, &r.mmap))
    }

    fn replace_memory(&mut self, table: MemoryTable) -> Result<()> {
        let added: Vec<GuestRegion> = table
            .regions()
            .iter()
            .filter(|r| !self.is_mapped(r))
            .cloned()
            .collect();
        let removed: Vec<GuestRegion> = self
            .mem
            .regions()
            .iter()
            .filter(|old| {
                !table
                    .regions()
                    .iter()
                    .any(|r| Arc::ptr_eq(&old.mmap, &r.mmap))
            })
            .cloned()
            .collect();
        // Regions that go leave the tree first (new memory may take their
        // GPA). `Some(iova)` = still mapped in the device.
        let mut gone: Vec<(GuestRegion, Option<u64>)> = Vec::new();
        for r in removed {
            let iova = self.tree.find(AddrSpace::Guest, r.desc.gpa).map(|m| m.iova);
            if iova.is_some() {
                let _ = self.tree.unmap(AddrSpace::Guest, r.desc.gpa);
            }
            gone.push((r, iova));
        }
        // The device cannot hold two mappings of one GPA range either.
        for (r, iova) in gone.iter_mut() {
            if added.iter().any(|a| ranges_overlap(a, r)) {
                if let Some(i) = iova.take() {
                    self.dma_unmap_logged(i, r);
                }
            }
        }
        let mut mapped: Vec<(u64, u64, u64)> = Vec::new();
        for r in &added {
            match self.map_region_over(r, &mut gone) {
                Ok(iova) => mapped.push((r.desc.gpa, iova, r.desc.size)),
                Err(e) => {
                    // Roll back: keep the old table as it was.
                    for &(gpa, iova, size) in &mapped {
                        let _ = self.backend.dma_unmap(iova, size);
                        let _ = self.tree.unmap(AddrSpace::Guest, gpa);
                    }
                    for (old, iova) in &gone {
                        let res = if iova.is_some() {
                            self.tree
                                .map(AddrSpace::Guest, old.desc.gpa, old.desc.size)
                                .map(|_| ())
                                .map_err(DeviceError::from)
                        } else {
                            self.map_region(old).map(|_| ())
                        };
                        if let Err(e2) = res {
                            log::error!(target: LOG, "{}: memory rollback: {e2}", self.name);
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.mem = table;
        self.publish_memory();
        for (r, iova) in &gone {
            if let Some(i) = iova {
                self.dma_unmap_logged(*i, r);
            }
        }
        Ok(())
    }

    fn map_region(&mut self, r: &GuestRegion) -> Result<u64> {
        self.map_region_over(r, &mut [])
    }

    /// `map_region` while the regions in `gone` are leaving: the tree may
    /// give `r` IOVAs one of them still holds in the device (it left the
    /// tree first), so that one leaves the device first.
    fn map_region_over(
        &mut self,
        r: &GuestRegion,
        gone: &mut [(GuestRegion, Option<u64>)],
    ) -> Result<u64> {
        let m = self.tree.map(AddrSpace::Guest, r.desc.gpa, r.desc.size)?;
        for (old, iova) in gone.iter_mut() {
            if let Some(i) = *iova {
                if spans_overlap((i, old.desc.size), (m.iova, r.desc.size)) {
                    self.dma_unmap_logged(i, old);
                    *iova = None;
                }
            }
        }
        if let Err(e) = self.backend.dma_map(DmaRegion {
            iova: m.iova,
            memory: r.mmap.clone(),
            readonly: false,
        }) {
            let _ = self.tree.unmap(AddrSpace::Guest, r.desc.gpa);
            return Err(e.into());
        }
        Ok(m.iova)
    }

    fn dma_unmap_logged(&mut self, iova: u64, r: &GuestRegion) {
        if let Err(e) = self.backend.dma_unmap(iova, r.desc.size) {
            log::warn!(target: LOG, "{}: dma_unmap GPA {:#x}: {e}", self.name, r.desc.gpa);
        }
    }

    /// Hand the current memory and tree to every worker with a shadowed
    /// queue, and wait until they use it.
    pub(crate) fn publish_memory(&mut self) {
        self.guest_mem = Arc::new(self.mem.guest_memory());
        let tree = Arc::new(self.tree.clone());
        for (pair, w) in self.workers.iter().enumerate() {
            let shadowed =
                (0..2).any(|i| matches!(self.vrings[pair * 2 + i].running, Running::Shadow(_)));
            if shadowed {
                if let Err(e) = w.update_memory(self.guest_mem.clone(), tree.clone()) {
                    log::error!(target: LOG, "{}: {e}", self.name);
                }
            }
        }
    }

    pub(crate) fn tree_snapshot(&self) -> Arc<iova::IovaTree> {
        Arc::new(self.tree.clone())
    }
}

/// Do `(start, size)` spans overlap? Sizes are not 0.
fn spans_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    let (a1, b1) = (a.0.saturating_add(a.1 - 1), b.0.saturating_add(b.1 - 1));
    a.0 <= b1 && b.0 <= a1
}

fn ranges_overlap(a: &GuestRegion, b: &GuestRegion) -> bool {
    spans_overlap((a.desc.gpa, a.desc.size), (b.desc.gpa, b.desc.size))
}
