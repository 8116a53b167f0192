//! Per-queue counters shared between a queue's current owner (a worker while
//! the queue is shadowed, the control thread otherwise) and QMP readers.
//! Atomics only: the data path never takes a lock to publish them.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use svq::SvqStats;

#[derive(Debug, Default)]
pub struct QueueStats {
    avail_idx: AtomicU16,
    used_idx: AtomicU16,
    in_flight: AtomicU32,
    relayed: AtomicU64,
    errors: AtomicU64,
    /// Totals of earlier SVQ instances on this queue (an SVQ counts from 0).
    relayed_base: AtomicU64,
    errors_base: AtomicU64,
    broken: Mutex<Option<String>>,
}

/// A consistent-enough copy for `query-shadow-vq`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub avail_idx: u16,
    pub used_idx: u16,
    pub in_flight: u32,
    pub relayed: u64,
    pub errors: u64,
    pub broken: Option<String>,
}

impl QueueStats {
    /// A new SVQ instance takes over the queue: later `publish` calls add to
    /// what earlier instances relayed.
    pub fn begin_svq(&self) {
        self.relayed_base.store(self.relayed.load(Relaxed), Relaxed);
        self.errors_base.store(self.errors.load(Relaxed), Relaxed);
        self.set_broken(None);
    }

    pub fn publish(&self, s: &SvqStats) {
        self.avail_idx.store(s.guest_avail_idx, Relaxed);
        self.used_idx.store(s.guest_used_idx, Relaxed);
        self.in_flight
            .store(s.in_flight.saturating_add(s.parked), Relaxed);
        self.relayed.store(
            self.relayed_base.load(Relaxed).saturating_add(s.relayed),
            Relaxed,
        );
        self.errors.store(
            self.errors_base.load(Relaxed).saturating_add(s.errors),
            Relaxed,
        );
        if s.broken.is_some() {
            self.set_broken(s.broken.clone());
        }
    }

    /// An error the SVQ did not count itself (e.g. a failed kick).
    pub fn add_error(&self, why: String) {
        self.errors.fetch_add(1, Relaxed);
        self.errors_base.fetch_add(1, Relaxed);
        self.set_broken(Some(why));
    }

    /// Ring positions while the queue is not shadowed.
    pub fn set_indexes(&self, avail: u16, used: u16) {
        self.avail_idx.store(avail, Relaxed);
        self.used_idx.store(used, Relaxed);
        self.in_flight.store(0, Relaxed);
    }

    fn set_broken(&self, why: Option<String>) {
        let mut b = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        *b = why;
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            avail_idx: self.avail_idx.load(Relaxed),
            used_idx: self.used_idx.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            relayed: self.relayed.load(Relaxed),
            errors: self.errors.load(Relaxed),
            broken: self
                .broken
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_accumulates_across_svq_instances() {
        let q = QueueStats::default();
        q.begin_svq();
        q.publish(&SvqStats {
            relayed: 5,
            guest_avail_idx: 7,
            guest_used_idx: 5,
            in_flight: 2,
            ..Default::default()
        });
        assert_eq!(q.snapshot().relayed, 5);
        assert_eq!(q.snapshot().in_flight, 2);
        q.begin_svq();
        q.publish(&SvqStats {
            relayed: 3,
            errors: 1,
            broken: Some("bad".into()),
            ..Default::default()
        });
        let s = q.snapshot();
        assert_eq!((s.relayed, s.errors), (8, 1));
        assert_eq!(s.broken.as_deref(), Some("bad"));
        q.begin_svq();
        assert_eq!(q.snapshot().broken, None);
        assert_eq!(q.snapshot().errors, 1);
    }
}
