//! Resubmission after a restart: guest heads that were in flight (from the
//! INFLIGHT_SHMFD region) are walked from the guest descriptor table and
//! relayed again, without touching the guest avail index.

use iova::IovaTree;
use vm_memory::GuestMemoryMmap;

use super::ShadowVirtqueue;
use crate::guest::RingView;
use crate::SvqError;

impl ShadowVirtqueue {
    /// Relay `heads` (oldest first) before any new avail entry: each chain
    /// is read from the guest descriptor table, validated and translated as
    /// a popped chain is, and completes to the guest used ring exactly once.
    /// Call it right after construction, before the first guest kick; the
    /// caller starts the queue with the guest avail index already past
    /// these heads (used idx + `heads.len()`, as libvhost-user does).
    /// `Ok(true)`: kick the device. An invalid chain breaks the queue.
    pub fn resubmit(
        &mut self,
        heads: &[u16],
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        self.usable()?;
        let r = self
            .guest
            .view(mem)
            .and_then(|v| self.resubmit_inner(heads, mem, &v, iova));
        match r {
            Ok(kick) => Ok(kick),
            Err(e) => self.fail(e),
        }
    }

    fn resubmit_inner(
        &mut self,
        heads: &[u16],
        mem: &GuestMemoryMmap,
        v: &RingView,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        self.last_map = None;
        let r = self.resubmit_chains(heads, mem, v, iova);
        self.last_map = None;
        // Publish what was placed even when a later chain failed.
        let kick = self.shadow.publish()?;
        r.map(|()| kick)
    }

    fn resubmit_chains(
        &mut self,
        heads: &[u16],
        mem: &GuestMemoryMmap,
        v: &RingView,
        iova: &IovaTree,
    ) -> Result<(), SvqError> {
        for &head in heads {
            // `walk` relies on a checked head (the region is shared memory).
            if head >= self.cfg.queue_size {
                return Err(SvqError::BadHeadIndex {
                    head,
                    queue_size: self.cfg.queue_size,
                });
            }
            self.take_chain(mem, v, iova, head)?;
            // Keep the order: once one chain waits for room, the rest do.
            if !self.parked.is_empty() || !self.place_cur(iova)? {
                self.parked.push_back(std::mem::take(&mut self.cur));
            }
        }
        Ok(())
    }
}
