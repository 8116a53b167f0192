//! Chains between the guest and the device: parked (popped, waiting for room
//! on the shadow ring) and in flight (on the shadow ring, indexed by shadow
//! head).

use crate::shadow_ring::ShadowSeg;

/// A guest chain popped, validated and translated.
#[derive(Clone, Debug)]
pub(crate) struct Chain {
    pub guest_head: u16,
    /// Pop order, to report in-flight heads in order.
    pub seq: u64,
    /// Device-writable guest ranges (GPA, len) in chain order.
    pub writable: Vec<(u64, u32)>,
    pub writable_len: u64,
    /// Segments for the device.
    pub segs: Vec<ShadowSeg>,
}

#[derive(Debug)]
pub(crate) struct InFlight {
    pub chain: Chain,
    /// Shadow descriptors it occupies.
    pub ndescs: u16,
    pub table: Option<u16>,
    /// Shadow avail position it was published at.
    pub avail_pos: u16,
}

pub(crate) struct InFlightTable {
    slots: Vec<Option<InFlight>>,
    count: usize,
}

impl InFlightTable {
    pub fn new(shadow_size: u16) -> Self {
        InFlightTable {
            slots: (0..shadow_size).map(|_| None).collect(),
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn insert(&mut self, head: u16, entry: InFlight) {
        if let Some(slot) = self.slots.get_mut(head as usize) {
            if slot.replace(entry).is_none() {
                self.count += 1;
            }
        }
    }

    pub fn get(&self, head: u32) -> Option<&InFlight> {
        self.slots.get(head as usize).and_then(|s| s.as_ref())
    }

    pub fn remove(&mut self, head: u32) -> Option<InFlight> {
        let e = self.slots.get_mut(head as usize)?.take();
        if e.is_some() {
            self.count -= 1;
        }
        e
    }

    /// Guest heads still in flight, in pop order.
    pub fn guest_heads_in_order(&self) -> Vec<u16> {
        let mut v: Vec<(u64, u16)> = self
            .slots
            .iter()
            .flatten()
            .map(|e| (e.chain.seq, e.chain.guest_head))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, h)| h).collect()
    }
}
