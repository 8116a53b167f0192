//! Chains between the guest and the device: parked (popped, waiting for room
//! on the shadow ring) and in flight (on the shadow ring, indexed by shadow
//! head).

use crate::shadow_ring::ShadowSeg;

/// A guest chain popped, validated and translated.
#[derive(Clone, Debug, Default)]
pub(crate) struct Chain {
    /// The guest's head index (split) or buffer id (packed).
    pub guest_head: u16,
    /// Guest ring slots it occupies (1 on a split ring).
    pub guest_slots: u16,
    /// Pop order, to report in-flight heads in order.
    pub seq: u64,
    /// Device-writable guest ranges (GPA, len) in chain order.
    pub writable: Vec<(u64, u32)>,
    pub writable_len: u64,
    /// Segments for the device.
    pub segs: Vec<ShadowSeg>,
    /// Resubmitted after a restart, not popped from the ring.
    pub resubmitted: bool,
}

/// A chain on the shadow ring: what completing it needs (its segments
/// were written to the ring and are not kept).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    pub guest_head: u16,
    pub guest_slots: u16,
    /// Pop order, to report in-flight heads in order.
    pub seq: u64,
    /// Device-writable guest ranges (GPA, len) in chain order.
    pub writable: Vec<(u64, u32)>,
    pub writable_len: u64,
    /// Shadow descriptors it occupies.
    pub ndescs: u16,
    pub table: Option<u16>,
    /// Shadow avail position it was published at.
    pub avail_pos: u16,
    pub resubmitted: bool,
}

/// In-flight chains by shadow head. The slots are allocated once and their
/// vectors reused: placing a chain swaps its `writable` vector with the
/// slot's dead one, and completing it only clears `live`, so the relay moves
/// no chain and allocates nothing per descriptor.
pub(crate) struct InFlightTable {
    slots: Vec<InFlight>,
    live: Vec<bool>,
    count: usize,
}

impl InFlightTable {
    pub fn new(shadow_size: u16) -> Self {
        InFlightTable {
            slots: (0..shadow_size).map(|_| InFlight::default()).collect(),
            live: vec![false; shadow_size as usize],
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Make `chain` the in-flight chain of `head`; `chain` gets the slot's
    /// previous (dead) `writable` vector back for reuse.
    pub fn insert(
        &mut self,
        head: u16,
        chain: &mut Chain,
        ndescs: u16,
        table: Option<u16>,
        avail_pos: u16,
    ) {
        let h = head as usize;
        if let (Some(slot), Some(live)) = (self.slots.get_mut(h), self.live.get_mut(h)) {
            slot.guest_head = chain.guest_head;
            slot.guest_slots = chain.guest_slots;
            slot.seq = chain.seq;
            slot.writable_len = chain.writable_len;
            std::mem::swap(&mut slot.writable, &mut chain.writable);
            slot.ndescs = ndescs;
            slot.table = table;
            slot.avail_pos = avail_pos;
            slot.resubmitted = chain.resubmitted;
            if !std::mem::replace(live, true) {
                self.count += 1;
            }
        }
    }

    pub fn get(&self, head: u32) -> Option<&InFlight> {
        let h = head as usize;
        match self.live.get(h) {
            Some(true) => self.slots.get(h),
            _ => None,
        }
    }

    /// Mark `head` completed; its data stays readable through the returned
    /// reference until the slot is reused.
    pub fn remove(&mut self, head: u32) -> Option<&InFlight> {
        let h = head as usize;
        match self.live.get_mut(h) {
            Some(live) if *live => {
                *live = false;
                self.count -= 1;
                self.slots.get(h)
            }
            _ => None,
        }
    }

    /// Guest heads still in flight, in pop order.
    pub fn guest_heads_in_order(&self) -> Vec<u16> {
        let mut v: Vec<(u64, u16)> = self
            .slots
            .iter()
            .zip(&self.live)
            .filter(|(_, live)| **live)
            .map(|(e, _)| (e.seq, e.guest_head))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, h)| h).collect()
    }
}
