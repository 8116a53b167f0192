//! Resubmission after a restart: guest heads that were in flight (from the
//! INFLIGHT_SHMFD region) are walked from the guest descriptor table and
//! relayed again, without touching the guest avail index.

use iova::IovaTree;
use vm_memory::GuestMemoryMmap;

use super::Relay;
use crate::layouts::{GuestQueue, ShadowQueue};
use crate::SvqError;

impl<G: GuestQueue, S: ShadowQueue> Relay<G, S> {
    /// [`Svq::resubmit`](super::Svq::resubmit).
    pub(super) fn resubmit_heads(
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
        v: &G::View<'_>,
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
        v: &G::View<'_>,
        iova: &IovaTree,
    ) -> Result<(), SvqError> {
        for &head in heads {
            self.take_chain(mem, v, iova, Some(head))?;
            // Keep the order: once one chain waits for room, the rest do.
            if !self.parked.is_empty() || !self.place_cur(iova)? {
                self.parked.push_back(std::mem::take(&mut self.cur));
            }
        }
        Ok(())
    }
}
