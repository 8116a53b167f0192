//! The SVQ's in-flight hook on one queue of the INFLIGHT_SHMFD region
//! (QEMU vhost-user.rst, "Inflight I/O tracking").
//!
//! Split layout: a head is marked with the next counter when popped,
//! linked into the last batch before its used entry is written, and cleared
//! with the used idx after.
//!
//! Packed layout (`inflight_region_packed.rs`): a chain's descriptors are
//! copied into entries of the region when popped; before its used
//! descriptor is written the entries go back to the free list and the used
//! position moves; after, the chain is no longer in flight. The SVQ names a
//! packed chain by its buffer id, the region by its head entry: this log
//! keeps which entry holds which id.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use packed_ring::Pos;
use svq::RingDesc;

use super::inflight_region::{InflightRegion, Layout};
use super::inflight_region_packed::PackedInflightQueue;

const LOG: &str = "inflight";

/// No entry holds this id.
const NO_ENTRY: u16 = u16::MAX;

/// Ownership: the region is shared memory (the VMM keeps the fd across a
/// restart), but each queue's part is written only by the worker that owns
/// that queue's SVQ (this log lives inside the SVQ), and the daemon's main
/// thread touches a queue's part only while the ring is stopped. Every
/// access goes through the region's atomic accessors; no raw pointer here.
pub struct RegionLog {
    region: Arc<InflightRegion>,
    queue: u16,
    counter: AtomicU64,
    /// Packed layout: the head entry of each buffer id in flight (indexed
    /// by id, below the queue size; `NO_ENTRY` when none). Atomics only
    /// because the hook takes `&self`; one thread uses them.
    entries: Vec<AtomicU16>,
}

impl RegionLog {
    /// None when the region has no part for `queue`, or (packed layout)
    /// when what it holds does not check out: the caller resets such a
    /// region before the ring starts, so this is a bug or a VMM writing
    /// into the region meanwhile.
    pub fn new(region: Arc<InflightRegion>, queue: u16) -> Option<Self> {
        let (counter, entries) = match region.layout() {
            Layout::Split => (region.queue(queue)?.next_counter(), Vec::new()),
            Layout::Packed => {
                let q = region.packed_queue(queue)?;
                let chains = match q.chains() {
                    Ok(c) => c,
                    Err(e) => {
                        log::warn!(target: LOG, "queue {queue}: not tracking in-flight chains: {e}");
                        return None;
                    }
                };
                let entries: Vec<AtomicU16> = (0..region.queue_size())
                    .map(|_| AtomicU16::new(NO_ENTRY))
                    .collect();
                for c in &chains {
                    match entries.get(usize::from(c.id())) {
                        Some(slot) if slot.load(Ordering::Relaxed) == NO_ENTRY => {
                            slot.store(c.entry, Ordering::Relaxed)
                        }
                        _ => {
                            log::warn!(target: LOG, "queue {queue}: in-flight chains name buffer id {} \
                                twice or out of range; not tracking", c.id());
                            return None;
                        }
                    }
                }
                let next = chains
                    .iter()
                    .map(|c| c.counter.saturating_add(1))
                    .max()
                    .unwrap_or(0);
                (next, entries)
            }
        };
        Some(RegionLog {
            region,
            queue,
            counter: AtomicU64::new(counter),
            entries,
        })
    }

    fn warn(&self, what: &str, e: impl std::fmt::Display) {
        log::warn!(target: LOG, "queue {}: {what}: {e}", self.queue);
    }

    fn packed(&self) -> Option<PackedInflightQueue<'_>> {
        self.region.packed_queue(self.queue)
    }

    /// The entry holding buffer `id`, forgotten when `take`.
    fn entry(&self, id: u16, take: bool) -> Option<u16> {
        let slot = self.entries.get(usize::from(id))?;
        let e = if take {
            slot.swap(NO_ENTRY, Ordering::Relaxed)
        } else {
            slot.load(Ordering::Relaxed)
        };
        if e == NO_ENTRY {
            log::warn!(target: LOG, "queue {}: buffer id {id} is not in the in-flight region", self.queue);
            return None;
        }
        Some(e)
    }
}

impl svq::InflightLog for RegionLog {
    fn popped(&self, head: u16) {
        if let Some(q) = self.region.queue(self.queue) {
            let c = self.counter.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = q.mark(head, c) {
                self.warn("marking a head in flight", e);
            }
        }
    }

    fn popped_packed(&self, id: u16, descs: &[RingDesc]) {
        let Some(q) = self.packed() else {
            // A split region: the head is all it keeps.
            return self.popped(id);
        };
        let Some(slot) = self.entries.get(usize::from(id)) else {
            return self.warn(
                "marking a chain in flight",
                format!("buffer id {id} out of range"),
            );
        };
        if slot.load(Ordering::Relaxed) != NO_ENTRY {
            // Resubmitted: the region holds the chain already (with its
            // counter, so the order stays).
            return;
        }
        let c = self.counter.fetch_add(1, Ordering::Relaxed);
        match q.mark(descs, c) {
            Ok(entry) => slot.store(entry, Ordering::Relaxed),
            Err(e) => self.warn("marking a chain in flight", e),
        }
    }

    fn completing(&self, head: u16) {
        if let Some(q) = self.region.queue(self.queue) {
            if let Err(e) = q.link_batch(&[head]) {
                self.warn("linking a completed head", e);
            }
        }
        if let (Some(q), Some(entry)) = (self.packed(), self.entry(head, false)) {
            if let Err(e) = q.completing(entry) {
                self.warn("completing a chain", e);
            }
        }
    }

    fn completed(&self, head: u16, used_idx: u16) {
        if let Some(q) = self.region.queue(self.queue) {
            if let Err(e) = q.commit_batch(&[head], used_idx) {
                self.warn("clearing a completed head", e);
            }
        }
        if let (Some(q), Some(entry)) = (self.packed(), self.entry(head, true)) {
            if let Err(e) = q.completed(entry) {
                self.warn("clearing a completed chain", e);
            }
            // The region counts the same slots as the SVQ's ring.
            let used = Pos::decode(used_idx);
            if q.used() != Some(used) {
                log::warn!(target: LOG, "queue {}: in-flight region's used position {:?} is not the ring's {used:?}",
                    self.queue, q.used());
            }
        }
    }

    fn returned(&self, head: u16) {
        // Back on the guest avail ring: cleared, the recorded used idx kept.
        if let Some(q) = self.region.queue(self.queue) {
            if let Err(e) = q.commit_batch(&[head], q.used_idx()) {
                self.warn("clearing a returned head", e);
            }
        }
        if let (Some(q), Some(entry)) = (self.packed(), self.entry(head, true)) {
            if let Err(e) = q.returned(entry) {
                self.warn("clearing a returned chain", e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svq::InflightLog;
    use vhost::vhost_user::message::VhostUserInflight;

    fn d(addr: u64, id: u16, flags: u16) -> RingDesc {
        RingDesc {
            addr,
            len: 64,
            id,
            flags,
        }
    }

    /// The hook keeps the packed region as the SVQ reports: chains by id,
    /// resubmissions keep their entries, completions move the position.
    #[test]
    fn packed_chains_through_the_hook() {
        let (r, _, _) =
            InflightRegion::allocate(&VhostUserInflight::new(0, 0, 1, 8), 1, 256, Layout::Packed)
                .unwrap();
        let r = Arc::new(r);
        let log = RegionLog::new(r.clone(), 0).unwrap();
        log.popped_packed(5, &[d(0x1000, 5, 1), d(0x2000, 5, 0)]);
        log.popped_packed(2, &[d(0x3000, 2, 0)]);
        log.popped_packed(7, &[d(0x4000, 7, 0)]);
        log.returned(7);
        log.completing(2);
        log.completed(2, 1 | 0x8000);
        let q = r.packed_queue(0).unwrap();
        let chains = q.chains().unwrap();
        assert_eq!(chains.len(), 1);
        assert_eq!((chains[0].id(), chains[0].slots()), (5, 2));
        assert_eq!(q.used(), Some(Pos { pos: 1, wrap: true }));
        // A new daemon: the log knows id 5's entry; resubmitting it keeps
        // the entry (no second copy), completing it frees it.
        drop(log);
        let log = RegionLog::new(r.clone(), 0).unwrap();
        log.popped_packed(5, &chains[0].descs);
        assert_eq!(q.chains().unwrap(), chains);
        log.popped_packed(1, &[d(0x5000, 1, 0)]);
        assert_eq!(q.chains().unwrap()[1].counter, chains[0].counter + 1);
        log.completing(5);
        log.completed(5, 3 | 0x8000);
        assert_eq!(q.chains().unwrap().len(), 1);
        assert_eq!(q.used(), Some(Pos { pos: 3, wrap: true }));
        // An id the region does not hold changes nothing.
        log.completing(6);
        log.completed(6, 4 | 0x8000);
        assert_eq!(q.used(), Some(Pos { pos: 3, wrap: true }));
    }
}
