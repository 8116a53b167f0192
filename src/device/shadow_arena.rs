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

use backends::{BackendError, DeviceBackend, DmaRegion};
use iova::{AddrSpace, IovaError, IovaTree};
use svq::{ShadowVirtqueue, SvqConfig};
use vm_memory::MmapRegion;

const LOG: &str = "device";

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("allocating the shadow area: {0}")]
    Alloc(#[source] std::io::Error),
    #[error("shadow slot {slot} of {len:#x} bytes does not fit the area ({slots} slots of {slot_size:#x})")]
    SlotOutside {
        slot: usize,
        len: usize,
        slots: usize,
        slot_size: usize,
    },
    #[error("shadow slot view: {0}")]
    View(String),
    #[error("mapping the shadow area in the IOVA tree: {0}")]
    Iova(#[from] IovaError),
    #[error("mapping the shadow area in the device: {0}")]
    Backend(#[from] BackendError),
}

pub(crate) struct ShadowArena {
    region: Arc<MmapRegion>,
    slot_size: usize,
    slots: usize,
}

impl ShadowArena {
    /// An area of one slot per queue, each big enough for the largest
    /// shadow ring layout of queues of `max_queue_size`, mapped in `tree`
    /// and the device.
    pub(crate) fn create(
        queues: usize,
        max_queue_size: u16,
        tree: &mut IovaTree,
        device: &mut dyn DeviceBackend,
    ) -> Result<ShadowArena, ArenaError> {
        let slot_size = ShadowVirtqueue::shadow_memory_size(&SvqConfig {
            queue_size: max_queue_size,
            shadow_size: max_queue_size,
            guest_features: 0,
            // The largest layout: with the indirect table pool.
            device_features: virtio_features::RING_F_INDIRECT_DESC,
        });
        let arena = ShadowArena::allocate(queues, slot_size)?;
        let hva = arena.hva();
        let size = arena.region.size() as u64;
        let mapping = tree.map(AddrSpace::Host, hva, size)?;
        if let Err(e) = device.dma_map(DmaRegion {
            iova: mapping.iova,
            memory: arena.region.clone(),
            readonly: false,
        }) {
            let _ = tree.unmap(AddrSpace::Host, hva);
            return Err(e.into());
        }
        log::debug!(target: LOG, "shadow area of {queues} slots x {slot_size:#x} bytes at IOVA {:#x}",
            mapping.iova);
        Ok(arena)
    }

    fn allocate(slots: usize, slot_size: usize) -> Result<ShadowArena, ArenaError> {
        let total = slots.checked_mul(slot_size).ok_or_else(|| {
            ArenaError::Alloc(std::io::Error::other("shadow area size overflows"))
        })?;
        let region = hostmem::memfd_region(c"svq-shadow-area", total).map_err(ArenaError::Alloc)?;
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
    pub(crate) fn view(&self, slot: usize, len: usize) -> Result<Arc<MmapRegion>, ArenaError> {
        if slot >= self.slots || len > self.slot_size {
            return Err(ArenaError::SlotOutside {
                slot,
                len,
                slots: self.slots,
                slot_size: self.slot_size,
            });
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
        .map_err(|e| ArenaError::View(e.to_string()))?;
        Ok(Arc::new(view))
    }

    /// Whether `hva` lies in the area.
    pub(crate) fn contains(&self, hva: u64) -> bool {
        hva >= self.hva() && hva - self.hva() < self.region.size() as u64
    }
}
