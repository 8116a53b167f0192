//! Resubmission after a restart: guest chains that were in flight (from the
//! INFLIGHT_SHMFD region) are relayed again, without touching the guest
//! avail position. A split ring's are walked from the guest descriptor
//! table by head; a packed ring's from the copies of their descriptors the
//! region kept (the ring slots may hold used descriptors by now).

use iova::IovaTree;
use vm_memory::GuestMemoryMmap;

use super::{ChainSource, Relay};
use crate::layouts::{GuestQueue, ShadowQueue};
use crate::{RingDesc, SvqError};

impl<G: GuestQueue, S: ShadowQueue> Relay<G, S> {
    /// [`Svq::resubmit`](super::Svq::resubmit).
    pub(super) fn resubmit_heads(
        &mut self,
        heads: &[u16],
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        let from: Vec<ChainSource> = heads.iter().map(|&h| ChainSource::Head(h)).collect();
        self.resubmit_from(&from, mem, iova)
    }

    /// [`Svq::resubmit_packed`](super::Svq::resubmit_packed).
    pub(super) fn resubmit_copies(
        &mut self,
        chains: &[Vec<RingDesc>],
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        let from: Vec<ChainSource> = chains.iter().map(|c| ChainSource::Copy(c)).collect();
        self.resubmit_from(&from, mem, iova)
    }

    fn resubmit_from(
        &mut self,
        from: &[ChainSource<'_>],
        mem: &GuestMemoryMmap,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        self.usable()?;
        let r = self
            .guest
            .view(mem)
            .and_then(|v| self.resubmit_inner(from, mem, &v, iova));
        match r {
            Ok(kick) => Ok(kick),
            Err(e) => self.fail(e),
        }
    }

    fn resubmit_inner(
        &mut self,
        from: &[ChainSource<'_>],
        mem: &GuestMemoryMmap,
        v: &G::View<'_>,
        iova: &IovaTree,
    ) -> Result<bool, SvqError> {
        self.last_map = None;
        let r = self.resubmit_chains(from, mem, v, iova);
        self.last_map = None;
        // Publish what was placed even when a later chain failed.
        let kick = self.shadow.publish()?;
        r.map(|()| kick)
    }

    fn resubmit_chains(
        &mut self,
        from: &[ChainSource<'_>],
        mem: &GuestMemoryMmap,
        v: &G::View<'_>,
        iova: &IovaTree,
    ) -> Result<(), SvqError> {
        for &chain in from {
            self.take_chain(mem, v, iova, chain)?;
            // Keep the order: once one chain waits for room, the rest do.
            if !self.parked.is_empty() || !self.place_cur(iova)? {
                self.parked.push_back(std::mem::take(&mut self.cur));
            }
        }
        Ok(())
    }
}
