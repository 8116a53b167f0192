//! The SVQ's in-flight hook on one queue of the INFLIGHT_SHMFD region
//! (QEMU vhost-user.rst, "Inflight I/O tracking", split rings): a head is
//! marked with the next counter when popped, linked into the last batch
//! before its used entry is written, and cleared with the used idx after.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::inflight_region::InflightRegion;

const LOG: &str = "inflight";

/// Ownership: the region is shared memory (the VMM keeps the fd across a
/// restart), but each queue's part is written only by the worker that owns
/// that queue's SVQ (this log lives inside the SVQ), and the daemon's main
/// thread touches a queue's part only while the ring is stopped. Every
/// access goes through the region's atomic accessors; no raw pointer here.
pub struct RegionLog {
    region: Arc<InflightRegion>,
    queue: u16,
    counter: AtomicU64,
}

impl RegionLog {
    /// None when the region has no part for `queue`.
    pub fn new(region: Arc<InflightRegion>, queue: u16) -> Option<Self> {
        let counter = region.queue(queue)?.next_counter();
        Some(RegionLog {
            region,
            queue,
            counter: AtomicU64::new(counter),
        })
    }

    fn warn(&self, what: &str, e: impl std::fmt::Display) {
        log::warn!(target: LOG, "queue {}: {what}: {e}", self.queue);
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

    fn completing(&self, head: u16) {
        if let Some(q) = self.region.queue(self.queue) {
            if let Err(e) = q.link_batch(&[head]) {
                self.warn("linking a completed head", e);
            }
        }
    }

    fn completed(&self, head: u16, used_idx: u16) {
        if let Some(q) = self.region.queue(self.queue) {
            if let Err(e) = q.commit_batch(&[head], used_idx) {
                self.warn("clearing a completed head", e);
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
    }
}
