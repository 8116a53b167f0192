//! Daemon-owned memory for one shadow ring: the descriptor table, the avail
//! and used rings and a small pool of indirect tables, in one memfd so it can
//! be shared with another process (a vhost-user device) later.
//!
//! Indirect tables: a chain with more segments than the whole shadow ring is
//! sent through one indirect table. Such chains are rare (a shadow ring
//! smaller than the guest chains it carries), so instead of one table per
//! shadow descriptor there is a pool of [`INDIRECT_TABLES`] tables of
//! `2 * queue_size` entries each (every guest descriptor of a maximal chain may
//! be split once across two IOVA mappings). A chain that needs a table while
//! all are in use is parked until one comes back. The pool exists only when
//! the device negotiated INDIRECT_DESC and `2 * queue_size > shadow_size`.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use vm_memory::{ByteValued, MmapRegion};

use crate::SvqError;

/// Number of indirect tables in the pool.
pub const INDIRECT_TABLES: u16 = 4;

const PAGE: usize = 4096;
const DESC_SIZE: usize = 16;

fn page_align(v: usize) -> usize {
    v.div_ceil(PAGE) * PAGE
}

/// Offsets inside the shadow memory; every part starts on a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowLayout {
    pub shadow_size: u16,
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    pub indirect: usize,
    /// Tables in the indirect pool (0 when there is none).
    pub indirect_tables: u16,
    /// Entries per indirect table.
    pub table_entries: u32,
    pub total: usize,
}

impl ShadowLayout {
    pub fn new(shadow_size: u16, queue_size: u16, device_indirect: bool) -> Self {
        let s = shadow_size as usize;
        let table_entries = 2 * queue_size as u32;
        let indirect_tables = if device_indirect && table_entries > shadow_size as u32 {
            INDIRECT_TABLES
        } else {
            0
        };
        let desc = 0;
        let avail = page_align(desc + DESC_SIZE * s);
        // flags, idx, ring[s], used_event
        let used = avail + page_align(4 + 2 * s + 2);
        // flags, idx, ring[s] of (id, len), avail_event
        let indirect = used + page_align(4 + 8 * s + 2);
        let total =
            indirect + page_align(indirect_tables as usize * table_entries as usize * DESC_SIZE);
        ShadowLayout {
            shadow_size,
            desc,
            avail,
            used,
            indirect,
            indirect_tables,
            table_entries,
            total: total.max(PAGE),
        }
    }

    /// Largest chain (in shadow descriptors) that can be sent at all.
    pub fn max_segments(&self) -> usize {
        if self.indirect_tables > 0 {
            self.table_entries as usize
        } else {
            self.shadow_size as usize
        }
    }

    pub fn table_offset(&self, table: u16) -> usize {
        self.indirect + table as usize * self.table_entries as usize * DESC_SIZE
    }
}

/// The mapped shadow memory with bounds-checked accessors. Offsets are
/// computed by the SVQ itself, so an error here is a bug, reported as
/// [`SvqError::ShadowAccess`] rather than a panic.
pub(crate) struct ShadowMem {
    region: Arc<MmapRegion>,
}

impl ShadowMem {
    pub fn new(size: usize) -> Result<Self, SvqError> {
        let region = hostmem::memfd_region(c"svq-shadow", size)
            .map_err(|e| SvqError::ShadowMemory(e.to_string()))?;
        Ok(ShadowMem {
            region: Arc::new(region),
        })
    }

    /// Shadow memory the caller allocated (e.g. one slice of an area shared
    /// by all queues, so a vhost-user device sees one memory region instead
    /// of one per queue). Needs `size` bytes at a page-aligned address;
    /// zeroed here, as a fresh memfd would be.
    pub fn from_region(region: Arc<MmapRegion>, size: usize) -> Result<Self, SvqError> {
        if region.size() < size || !(region.as_ptr() as usize).is_multiple_of(PAGE) {
            return Err(SvqError::ShadowMemory(format!(
                "provided memory at {:p}+{:#x} is not page aligned or smaller than {size:#x}",
                region.as_ptr(),
                region.size()
            )));
        }
        // SAFETY: the region is a live mapping of at least `size` bytes
        // (checked above; MmapRegion guarantees its own range), and no
        // device has been given a ring in it yet, so nothing else accesses
        // these bytes while they are cleared.
        unsafe { std::ptr::write_bytes(region.as_ptr(), 0, size) };
        Ok(ShadowMem { region })
    }

    pub fn region(&self) -> &Arc<MmapRegion> {
        &self.region
    }

    pub fn base(&self) -> *mut u8 {
        self.region.as_ptr()
    }

    pub fn size(&self) -> usize {
        self.region.size()
    }

    pub fn hva(&self, offset: usize) -> u64 {
        self.region.as_ptr() as u64 + offset as u64
    }

    /// Pointer to a `T` at `offset`, if all its bytes are inside the region
    /// and it is aligned for `T`. A compare and a mask: this runs several
    /// times per relayed descriptor, and vm-memory's `get_ref` + `store`
    /// path costs a few dozen instructions and an out-of-line call there.
    #[inline]
    fn at<T>(&self, offset: usize) -> Result<*mut T, SvqError> {
        let inside = offset
            .checked_add(std::mem::size_of::<T>())
            .is_some_and(|end| end <= self.region.size());
        if !inside {
            return Err(SvqError::ShadowAccess { offset });
        }
        // SAFETY: offset + size_of::<T>() <= region size, checked above, so
        // the result stays inside the one mapping `region` owns.
        let p = unsafe { self.region.as_ptr().add(offset) }.cast::<T>();
        if !p.is_aligned() {
            return Err(SvqError::ShadowAccess { offset });
        }
        Ok(p)
    }

    /// Volatile write of a plain-data value (descriptors).
    #[inline]
    pub fn write_obj<T: ByteValued>(&self, offset: usize, val: T) -> Result<(), SvqError> {
        let p = self.at::<T>(offset)?;
        // SAFETY: `at` checked that p is aligned and its size_of::<T>() bytes
        // lie inside the mapping, which lives as long as `self.region`. The
        // device only reads these bytes, so a volatile write (as vm-memory's
        // own `VolatileRef::store` does) is the right access.
        unsafe { p.write_volatile(val) };
        Ok(())
    }

    /// Atomic store of a ring field the device reads concurrently.
    #[inline]
    pub fn store_u16(&self, offset: usize, val: u16, order: Ordering) -> Result<(), SvqError> {
        let p = self.at::<u16>(offset)?;
        // SAFETY: p is aligned and inside the live mapping (`at`); every
        // access this process makes to ring fields is atomic, and the device
        // is the other party of the virtio memory model for them.
        unsafe { AtomicU16::from_ptr(p) }.store(val, order);
        Ok(())
    }

    /// Atomic load of a ring field the device writes concurrently.
    #[inline]
    pub fn load_u16(&self, offset: usize, order: Ordering) -> Result<u16, SvqError> {
        let p = self.at::<u16>(offset)?;
        // SAFETY: as in `store_u16`.
        Ok(unsafe { AtomicU16::from_ptr(p) }.load(order))
    }
}
