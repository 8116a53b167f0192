//! VIRTIO_F_IN_ORDER on either side of the relay.
//!
//! Toward the guest: used entries go out in the order the guest made the
//! chains available, whatever order the device completes them in; a chain
//! the device completed early waits for the older ones.
//!
//! Toward a device with IN_ORDER: the device may write one used entry for a
//! batch, naming its last chain (virtio 1.2, 2.7.9 and 2.8.18): every chain
//! placed before that one is complete too, with no length said. The shadow
//! ring places chains in order (sequential descriptors), so the batch is
//! the oldest chains up to the one named.

use std::collections::VecDeque;

use super::Relay;
use crate::layouts::{GuestQueue, ShadowQueue};
use crate::{DirtyLog, SvqError};

/// A chain on the shadow ring, in placement order.
#[derive(Clone, Copy, Debug)]
struct Placed {
    shadow_id: u16,
    guest_head: u16,
    guest_slots: u16,
    /// Completed by the device with this length, not yet given back.
    done: Option<u32>,
}

pub(crate) struct InOrder {
    device: bool,
    placed: VecDeque<Placed>,
}

impl InOrder {
    /// Tracking for the sides that negotiated IN_ORDER (None: neither).
    pub fn new(guest: bool, device: bool) -> Option<Self> {
        (guest || device).then(|| InOrder {
            device,
            placed: VecDeque::new(),
        })
    }

    /// Stop gave the newest `n` chains back to the guest ring.
    pub fn forget_newest(&mut self, n: usize) {
        let keep = self.placed.len().saturating_sub(n);
        self.placed.truncate(keep);
    }

    /// Guest heads the guest has not got back, oldest first.
    pub fn guest_heads(&self) -> Vec<u16> {
        self.placed.iter().map(|p| p.guest_head).collect()
    }
}

impl<G: GuestQueue, S: ShadowQueue> Relay<G, S> {
    /// Chain `shadow_id` (now `cur`) went on the shadow ring.
    #[inline(always)]
    pub(super) fn placed(&mut self, shadow_id: u16) {
        if let Some(o) = &mut self.ordered {
            o.placed.push_back(Placed {
                shadow_id,
                guest_head: self.cur.guest_head,
                guest_slots: self.cur.guest_slots,
                done: None,
            });
        }
    }

    /// The device completed `id` (checked in flight) with `len`: retire it
    /// (and, from an IN_ORDER device, every older chain still on the
    /// ring), then give back every completed chain at the front. Returns
    /// the used entries this one stood for.
    pub(super) fn complete_in_order(
        &mut self,
        v: &G::View<'_>,
        log: &dyn DirtyLog,
        id: u16,
        len: u32,
    ) -> Result<u16, SvqError> {
        let Some(o) = &self.ordered else {
            return Ok(0);
        };
        let Some(at) = o
            .placed
            .iter()
            .position(|p| p.shadow_id == id && p.done.is_none())
        else {
            return Err(SvqError::UsedIdNotInFlight { id: u32::from(id) });
        };
        // Older chains still on the ring: a batch when the device has
        // IN_ORDER, or the device is ahead of them (completed out of order).
        let batch: Vec<u16> = if o.device {
            o.placed
                .iter()
                .take(at)
                .filter(|p| p.done.is_none())
                .map(|p| p.shadow_id)
                .collect()
        } else {
            Vec::new()
        };
        for &older in &batch {
            self.shadow.skip_used(older);
            self.retire(older, None, log)?;
        }
        self.retire(id, Some(len), log)?;
        if let Some(o) = &mut self.ordered {
            let device = o.device;
            for (i, p) in o.placed.iter_mut().enumerate().take(at + 1) {
                if p.done.is_none() && (i == at || device) {
                    p.done = Some(if i == at { len } else { 0 });
                }
            }
        }
        while let Some(p) = self
            .ordered
            .as_mut()
            .and_then(|o| o.placed.front().copied())
        {
            let Some(done) = p.done else {
                break;
            };
            if let Some(o) = &mut self.ordered {
                o.placed.pop_front();
            }
            self.give_back(v, p.guest_head, p.guest_slots, done);
        }
        Ok(batch.len() as u16 + 1)
    }
}
