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
    /// Scratch: the older chains a batch completes.
    batch: Vec<u16>,
}

impl InOrder {
    /// Tracking for the sides that negotiated IN_ORDER (None: neither).
    pub fn new(guest: bool, device: bool) -> Option<Self> {
        (guest || device).then(|| InOrder {
            device,
            placed: VecDeque::new(),
            batch: Vec::new(),
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

    /// The device completed `id` with `len`: mark it done, and from an
    /// IN_ORDER device every older chain not done yet (length 0), their
    /// shadow ids into `batch`, oldest first. False: `id` is not on the
    /// ring.
    fn complete(&mut self, id: u16, len: u32, batch: &mut Vec<u16>) -> bool {
        let Some(at) = self
            .placed
            .iter()
            .position(|p| p.shadow_id == id && p.done.is_none())
        else {
            return false;
        };
        if self.device {
            for p in self.placed.iter_mut().take(at) {
                if p.done.is_none() {
                    p.done = Some(0);
                    batch.push(p.shadow_id);
                }
            }
        }
        self.placed[at].done = Some(len);
        true
    }

    /// The oldest chain, once it is done: (guest head, slots, length).
    fn pop_done(&mut self) -> Option<(u16, u16, u32)> {
        let p = self.placed.front()?;
        let len = p.done?;
        let (head, slots) = (p.guest_head, p.guest_slots);
        self.placed.pop_front();
        Some((head, slots, len))
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
        let Some(o) = &mut self.ordered else {
            return Ok(0);
        };
        let mut batch = std::mem::take(&mut o.batch);
        let r = if o.complete(id, len, &mut batch) {
            self.retire_batch(&batch, id, len, log)
        } else {
            Err(SvqError::UsedIdNotInFlight { id: u32::from(id) })
        };
        let entries = batch.len() as u16 + 1;
        batch.clear();
        if let Some(o) = &mut self.ordered {
            o.batch = batch;
        }
        r?;
        while let Some((head, slots, done)) = self.ordered.as_mut().and_then(InOrder::pop_done) {
            self.give_back(v, head, slots, done);
        }
        Ok(entries)
    }

    /// Off the shadow ring: the `older` chains a batch completed without
    /// naming them (no length: all their writable bytes are logged), then
    /// `id`.
    fn retire_batch(
        &mut self,
        older: &[u16],
        id: u16,
        len: u32,
        log: &dyn DirtyLog,
    ) -> Result<(), SvqError> {
        for &o in older {
            self.shadow.skip_used(o);
            self.retire(o, None, log)?;
        }
        self.retire(id, Some(len), log).map(|_| ())
    }
}
