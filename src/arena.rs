//! One shared memory area for the shadow rings of every queue.
//!
//! Each shadowed queue needs daemon memory the device can reach (shadow
//! rings and indirect tables). One memfd per queue would be one device
//! mapping per queue, and a vhost-user device takes at most 8 memory regions
//! in total (DPDK's VHOST_MEMORY_MAX_NREGIONS): with the guest's regions,
//! 2 per queue pair overflow the table at 4 pairs. So the daemon allocates
//! one memfd with a fixed slot per queue the first time a queue goes to
//! shadow, maps it once in the IOVA tree and the device, and hands each SVQ
//! a view of its slot (`ShadowVirtqueue::with_shadow_memory`). The device
//! sees one region whatever the number of queues, and a switch costs no
//! mapping at all.
//!
//! The area is never unmapped: views are plain pointers into it held by the
//! queue workers, so the mapping must outlive every worker. Its pages are
//! only touched where rings live (the memfd is sparse).

use std::sync::Arc;

use backends::{BackendError, DmaRegion};
use iova::AddrSpace;
use svq::{ShadowVirtqueue, SvqConfig};
use vm_memory::MmapRegion;

use crate::device::{Device, Result, LOG};

pub(crate) struct ShadowArena {
    region: Arc<MmapRegion>,
    slot_size: usize,
    slots: usize,
}

impl ShadowArena {
    fn new(slots: usize, slot_size: usize) -> std::io::Result<ShadowArena> {
        let total = slots
            .checked_mul(slot_size)
            .ok_or_else(|| std::io::Error::other("shadow area size overflows"))?;
        let region = hostmem::memfd_region(c"svq-shadow-area", total)?;
        let region = Arc::new(region);
        // Views handed to the SVQs point into this mapping without owning
        // it; one reference that is never dropped keeps it mapped for the
        // life of the process (one area per device).
        std::mem::forget(Arc::clone(&region));
        Ok(ShadowArena {
            region,
            slot_size,
            slots,
        })
    }

    fn hva(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    /// A view of slot `slot`, `len` bytes.
    fn view(&self, slot: usize, len: usize) -> std::io::Result<Arc<MmapRegion>> {
        if slot >= self.slots || len > self.slot_size {
            return Err(std::io::Error::other(format!(
                "shadow slot {slot} of {len:#x} bytes does not fit the area ({} slots of {:#x})",
                self.slots, self.slot_size
            )));
        }
        // SAFETY: slot < slots and len <= slot_size, so the range
        // [slot * slot_size, +len) lies inside the area's mapping, which is
        // never unmapped (see `new`). The view does not own the mapping and
        // unmaps nothing when dropped. Slots do not overlap, and a slot is
        // used by one SVQ at a time (queue q always uses slot q).
        let view = unsafe {
            MmapRegion::build_raw(
                self.region.as_ptr().add(slot * self.slot_size),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| std::io::Error::other(format!("shadow slot view: {e}")))?;
        Ok(Arc::new(view))
    }

    /// Whether `hva` lies in the area.
    pub(crate) fn contains(&self, hva: u64) -> bool {
        hva >= self.hva() && hva - self.hva() < self.region.size() as u64
    }
}

impl Device {
    /// Shadow memory for queue `q`: `len` bytes of its slot in the shared
    /// area, created and mapped (IOVA tree and device) on first use.
    pub(crate) fn shadow_slot(&mut self, q: usize, len: usize) -> Result<Arc<MmapRegion>> {
        let arena = match self.shadow_arena.take() {
            Some(a) => a,
            None => self.new_shadow_arena()?,
        };
        let view = arena.view(q, len);
        self.shadow_arena = Some(arena);
        Ok(view.map_err(BackendError::Io)?)
    }

    fn new_shadow_arena(&mut self) -> Result<ShadowArena> {
        let max = self.max_queue_size;
        let slot_size = ShadowVirtqueue::shadow_memory_size(&SvqConfig {
            queue_size: max,
            shadow_size: max,
            guest_features: 0,
            // The largest layout: with the indirect table pool.
            device_features: virtio_features::RING_F_INDIRECT_DESC,
        });
        let arena = ShadowArena::new(self.num_queues(), slot_size).map_err(BackendError::Io)?;
        let hva = arena.hva();
        let size = arena.region.size() as u64;
        let mapping = self.tree.map(AddrSpace::Host, hva, size)?;
        if let Err(e) = self.backend.dma_map(DmaRegion {
            iova: mapping.iova,
            memory: arena.region.clone(),
            readonly: false,
        }) {
            let _ = self.tree.unmap(AddrSpace::Host, hva);
            return Err(e.into());
        }
        log::debug!(target: LOG, "{}: shadow area of {} slots x {slot_size:#x} bytes at IOVA {:#x}",
            self.name, arena.slots, mapping.iova);
        Ok(arena)
    }

    /// Whether shadow memory at `hva` belongs to the shared area (which
    /// stays mapped) rather than to one queue.
    pub(crate) fn in_shadow_arena(&self, hva: u64) -> bool {
        self.shadow_arena.as_ref().is_some_and(|a| a.contains(hva))
    }
}
