//! The kernel's IOTLB for this device, mirrored into the sim's own.
//!
//! VDUSE tells userspace only that a range changed (VDUSE_UPDATE_IOTLB; with
//! vhost-vdpa in front it is always the whole 64-bit space, because the
//! kernel hands the device its complete IOTLB at every change). The server
//! then asks for each mapping in the range (VDUSE_IOTLB_GET_FD: a file, an
//! offset and a permission), mmaps the new ones into this process and gives
//! them to the sim with `dma_map`, and unmaps from the sim the ones that are
//! gone. A mapping is the same when its range, permission, offset and file
//! (device and inode) are; an unchanged mapping is never remapped, so the
//! sim's workers keep running through an update that does not touch them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use vm_memory::FileOffset;
use vm_memory::MmapRegion;

use super::sys::{IotlbEntry, VduseIoctls, ACCESS_RO};
use super::VduseError;
use crate::{DeviceBackend, DmaRegion};

const LOG: &str = "vduse";

/// One mapping as the kernel described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    last: u64,
    perm: u8,
    offset: u64,
    /// (st_dev, st_ino) of the file behind it.
    file: (u64, u64),
}

impl Mapping {
    fn size(&self) -> u64 {
        self.last - self.start + 1
    }
}

/// What one update changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub mapped: usize,
    pub unmapped: usize,
}

#[derive(Default)]
pub struct IotlbMirror {
    maps: BTreeMap<u64, Mapping>,
}

impl IotlbMirror {
    /// Mappings currently given to the device, as (first, last, perm).
    pub fn mappings(&self) -> Vec<(u64, u64, u8)> {
        self.maps
            .values()
            .map(|m| (m.start, m.last, m.perm))
            .collect()
    }

    /// Brings the device's mappings inside `[start, last]` in line with the
    /// kernel's.
    pub fn sync(
        &mut self,
        dev: &dyn VduseIoctls,
        device: &mut dyn DeviceBackend,
        start: u64,
        last: u64,
    ) -> Result<SyncReport, VduseError> {
        if start > last {
            return Err(VduseError::BadRange { start, last });
        }
        // What the kernel has now, with the files of the new ones.
        let mut fresh: Vec<(Mapping, File)> = Vec::new();
        let mut at = start;
        loop {
            let Some((e, file)) = dev.iotlb_entry(at, last).map_err(VduseError::Kernel)? else {
                break;
            };
            let m = describe(&e, &file, at)?;
            let next = m.last.checked_add(1);
            fresh.push((m, file));
            match next {
                Some(n) if n <= last => at = n,
                _ => break,
            }
        }
        let mut report = SyncReport::default();
        let gone: Vec<Mapping> = self
            .maps
            .values()
            .filter(|m| m.start <= last && start <= m.last)
            .filter(|m| !fresh.iter().any(|(f, _)| f == *m))
            .copied()
            .collect();
        for m in gone {
            device
                .dma_unmap(m.start, m.size())
                .map_err(VduseError::Device)?;
            self.maps.remove(&m.start);
            log::info!(target: LOG, "unmapped {:#x}..={:#x}", m.start, m.last);
            report.unmapped += 1;
        }
        for (m, file) in fresh {
            if self.maps.get(&m.start) == Some(&m) {
                continue;
            }
            let region = map_file(file, &m)?;
            device
                .dma_map(DmaRegion {
                    iova: m.start,
                    memory: Arc::new(region),
                    readonly: m.perm == ACCESS_RO,
                })
                .map_err(VduseError::Device)?;
            log::info!(
                target: LOG,
                "mapped {:#x}..={:#x} ({}) from offset {:#x}",
                m.start,
                m.last,
                if m.perm == ACCESS_RO { "ro" } else { "rw" },
                m.offset
            );
            self.maps.insert(m.start, m);
            report.mapped += 1;
        }
        Ok(report)
    }
}

/// Checks what the kernel returned for a query starting at `asked`.
fn describe(e: &IotlbEntry, file: &File, asked: u64) -> Result<Mapping, VduseError> {
    // The kernel returns the first mapping overlapping the query; one that
    // ends before it, or runs backwards, is nonsense and would loop forever.
    if e.last < e.start || e.last < asked {
        return Err(VduseError::BadEntry(format!(
            "mapping {:#x}..={:#x} returned for a query at {asked:#x}",
            e.start, e.last
        )));
    }
    if e.perm == 0 || e.perm > 3 {
        return Err(VduseError::BadEntry(format!(
            "mapping {:#x}..={:#x} has permission {}",
            e.start, e.last, e.perm
        )));
    }
    let meta = file.metadata().map_err(VduseError::Kernel)?;
    Ok(Mapping {
        start: e.start,
        last: e.last,
        perm: e.perm,
        offset: e.offset,
        file: (meta.dev(), meta.ino()),
    })
}

fn map_file(file: File, m: &Mapping) -> Result<MmapRegion, VduseError> {
    let bad = |why: String| {
        VduseError::BadEntry(format!("mapping {:#x}..={:#x}: {why}", m.start, m.last))
    };
    let size = usize::try_from(m.size()).map_err(|_| bad("too large for this process".into()))?;
    if !(m.offset.is_multiple_of(4096) && m.start.is_multiple_of(4096) && size.is_multiple_of(4096))
    {
        return Err(bad(format!(
            "offset {:#x} or size {size:#x} not page aligned",
            m.offset
        )));
    }
    let prot = if m.perm == ACCESS_RO {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    MmapRegion::build(
        Some(FileOffset::new(file, m.offset)),
        size,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|e| bad(format!("mmap: {e}")))
}
