//! The device side of a packed ring (virtio 1.2, 2.8) for the sim, through
//! the IOTLB like everything the sim touches.
//!
//! The sim completes chains in the order it took them (see the worker), so
//! the used position trails the avail position by exactly the chains taken
//! in the current round, and both are equal whenever a control operation
//! looks. A used descriptor goes where the chain's first descriptor was and
//! the used position moves on by the chain's slot count, as Linux's and
//! DPDK's packed drivers expect of an in-order device.

use std::sync::atomic::{fence, Ordering};

use packed_ring::{wants_event, Pos, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::packed::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::chain::{Chain, ChainError};
use super::iotlb::IotlbView;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// What went wrong with a packed ring: a malformed chain, or ring memory the
/// IOTLB refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PackedError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("ring memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

pub(crate) struct PackedQueue {
    size: u16,
    desc: u64,
    /// Driver event suppression (written by the driver, read here).
    driver: u64,
    /// Device event suppression (written here).
    device: u64,
    event_idx: bool,
    avail: Pos,
    used: Pos,
    /// The used position the driver was last considered for an interrupt
    /// at: DESC mode asks for one when the used position passes its offset.
    signalled: Pos,
}

impl PackedQueue {
    pub(crate) fn new(size: u16) -> Self {
        PackedQueue {
            size,
            desc: 0,
            driver: 0,
            device: 0,
            event_idx: false,
            avail: Pos::START,
            used: Pos::START,
            signalled: Pos::START,
        }
    }

    pub(crate) fn reset(&mut self, size: u16) {
        *self = PackedQueue::new(size);
    }

    pub(crate) fn set_size(&mut self, size: u16) {
        self.size = size;
    }

    pub(crate) fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    pub(crate) fn set_addrs(&mut self, desc: u64, driver: u64, device: u64) {
        (self.desc, self.driver, self.device) = (desc, driver, device);
    }

    /// vhost's packed base: avail position and wrap counter in the low 16
    /// bits, used position and wrap counter in the high 16.
    pub(crate) fn base(&self) -> u32 {
        u32::from(self.avail.encode()) | u32::from(self.used.encode()) << 16
    }

    /// Positions past the ring are refused (false).
    pub(crate) fn set_base(&mut self, base: u32) -> bool {
        let avail = Pos::decode(base as u16);
        let used = Pos::decode((base >> 16) as u16);
        if avail.pos >= self.size || used.pos >= self.size {
            return false;
        }
        (self.avail, self.used, self.signalled) = (avail, used, used);
        true
    }

    /// The next chain's position; `rewind` to it gives back every chain
    /// taken since (none of them completed).
    pub(crate) fn mark(&self) -> u16 {
        self.avail.encode()
    }

    pub(crate) fn rewind(&mut self, mark: u16) {
        self.avail = Pos::decode(mark);
    }

    /// The first ring area the IOTLB does not give the device as it needs
    /// it: the descriptor ring read and written, the driver area read, the
    /// device area written.
    pub(crate) fn unmapped_area(&self, view: &IotlbView) -> Option<(&'static str, u64)> {
        if !view.writable(self.desc, 16 * u64::from(self.size)) {
            Some(("descriptor ring", self.desc))
        } else if !view.readable(self.driver, 4) {
            Some(("driver area", self.driver))
        } else if !view.writable(self.device, 4) {
            Some(("device area", self.device))
        } else {
            None
        }
    }

    fn slot(&self, pos: u16) -> GuestAddress {
        GuestAddress(self.desc.wrapping_add(16 * u64::from(pos)))
    }

    /// The flags of descriptor `pos`; Acquire, because the rest of it (and,
    /// at a chain's head, the whole chain) is read after the flags that
    /// made it available.
    fn flags(&self, view: &IotlbView, pos: u16) -> Result<u16, GuestMemoryError> {
        let addr = GuestAddress(self.slot(pos).0.wrapping_add(14));
        Ok(u16::from_le(view.mem.load(addr, Ordering::Acquire)?))
    }

    pub(crate) fn has_avail(&self, view: &IotlbView) -> Result<bool, GuestMemoryError> {
        Ok(self.avail.is_avail(self.flags(view, self.avail.pos)?))
    }

    /// Takes the chain at the avail position, if the driver made one
    /// available. On an error the position stays where it was.
    pub(crate) fn pop(&mut self, view: &IotlbView) -> Result<Option<Chain>, PackedError> {
        let start = self.avail;
        if !start.is_avail(self.flags(view, start.pos)?) {
            return Ok(None);
        }
        let mut chain = Chain::new(0);
        let mut pos = start;
        let mut slots = 0u16;
        let id = loop {
            if slots == self.size {
                return Err(ChainError::PackedTooLong {
                    pos: start.pos,
                    size: self.size,
                }
                .into());
            }
            // Every continuation was made available before the head (the
            // head's flags are written last): one that is not is malformed.
            if slots > 0 && !pos.is_avail(self.flags(view, pos.pos)?) {
                return Err(ChainError::PackedNotAvailable {
                    head: start.pos,
                    pos: pos.pos,
                }
                .into());
            }
            let d: Descriptor = view.mem.read_obj(self.slot(pos.pos))?;
            slots += 1;
            if d.flags() & INDIRECT != 0 {
                if d.flags() & NEXT != 0 {
                    return Err(ChainError::IndirectWithNext { pos: pos.pos }.into());
                }
                self.walk_indirect(view, pos.pos, &d, &mut chain)?;
            } else {
                chain.push(view, d.addr().0, d.len(), d.flags() & WRITE != 0)?;
            }
            // The buffer id is in the chain's last descriptor (Linux writes
            // it in every one, DPDK only there).
            if d.flags() & NEXT == 0 {
                break d.id();
            }
            pos = pos.add(1, self.size);
        };
        if id >= self.size {
            return Err(ChainError::BadId {
                pos: start.pos,
                id,
                size: self.size,
            }
            .into());
        }
        chain.head = id;
        chain.slots = slots;
        self.avail = start.add(slots, self.size);
        Ok(Some(chain))
    }

    /// An indirect table: `len / 16` descriptors in order (their NEXT and
    /// id fields are not used in a packed ring), none indirect itself.
    fn walk_indirect(
        &self,
        view: &IotlbView,
        pos: u16,
        d: &Descriptor,
        chain: &mut Chain,
    ) -> Result<(), PackedError> {
        let (table, len) = (d.addr().0, d.len());
        let entries = len / 16;
        if len == 0 || len % 16 != 0 || entries > u32::from(self.size) {
            return Err(ChainError::BadIndirect {
                pos,
                addr: table,
                len,
            }
            .into());
        }
        if !view.readable(table, u64::from(len)) {
            return Err(ChainError::BadIndirect {
                pos,
                addr: table,
                len,
            }
            .into());
        }
        for i in 0..u64::from(entries) {
            let e: Descriptor = view.mem.read_obj(GuestAddress(table + 16 * i))?;
            if e.flags() & INDIRECT != 0 {
                return Err(ChainError::NestedIndirect { pos }.into());
            }
            chain.push(view, e.addr().0, e.len(), e.flags() & WRITE != 0)?;
        }
        Ok(())
    }

    /// Writes the used descriptor of `chain` at the used position: id and
    /// length first, the flags that hand it to the driver last (Release).
    pub(crate) fn add_used(
        &mut self,
        view: &IotlbView,
        chain: &Chain,
        len: u32,
    ) -> Result<(), GuestMemoryError> {
        let at = self.slot(self.used.pos);
        view.mem.store(
            len.to_le(),
            GuestAddress(at.0.wrapping_add(8)),
            Ordering::Relaxed,
        )?;
        view.mem.store(
            chain.head.to_le(),
            GuestAddress(at.0.wrapping_add(12)),
            Ordering::Relaxed,
        )?;
        view.mem.store(
            self.used.used_flags().to_le(),
            GuestAddress(at.0.wrapping_add(14)),
            Ordering::Release,
        )?;
        self.used = self.used.add(chain.slots, self.size);
        Ok(())
    }

    /// Does the driver want an interrupt for the used descriptors written
    /// since the last call? (Its driver area: DISABLE, ENABLE, or under
    /// EVENT_IDX DESC with the position it waits for.)
    pub(crate) fn needs_notification(
        &mut self,
        view: &IotlbView,
    ) -> Result<bool, GuestMemoryError> {
        // The used flags' store before the driver area's load: the driver
        // writes its area and then re-checks the used flags.
        fence(Ordering::SeqCst);
        let off_wrap = u16::from_le(
            view.mem
                .load(GuestAddress(self.driver), Ordering::Relaxed)?,
        );
        let flags = u16::from_le(
            view.mem
                .load(GuestAddress(self.driver.wrapping_add(2)), Ordering::Relaxed)?,
        );
        let old = std::mem::replace(&mut self.signalled, self.used);
        Ok(wants_event(
            flags,
            off_wrap,
            self.event_idx,
            old,
            self.used,
            self.size,
        ))
    }

    /// Stops the driver's kicks while the worker is taking chains anyway.
    pub(crate) fn disable_kicks(&self, view: &IotlbView) -> Result<(), GuestMemoryError> {
        self.set_device_event(view, EVENT_DISABLE, 0)
    }

    /// Asks for a kick once the driver makes the descriptor at `mark`
    /// available (under EVENT_IDX; any kick otherwise). Returns whether it
    /// already is, so the caller retries instead of waiting.
    pub(crate) fn arm_kick(&self, view: &IotlbView, mark: u16) -> Result<bool, GuestMemoryError> {
        if self.event_idx {
            self.set_device_event(view, EVENT_DESC, mark)?;
        } else {
            self.set_device_event(view, EVENT_ENABLE, 0)?;
        }
        fence(Ordering::SeqCst);
        let at = Pos::decode(mark);
        Ok(at.is_avail(self.flags(view, at.pos)?))
    }

    /// Leaves the device area asking for every kick, for whoever drives the
    /// ring next (a relay's shadow queue after a hand-over).
    pub(crate) fn release(&self, view: &IotlbView) -> Result<(), GuestMemoryError> {
        self.set_device_event(view, EVENT_ENABLE, 0)
    }

    fn set_device_event(
        &self,
        view: &IotlbView,
        flags: u16,
        off_wrap: u16,
    ) -> Result<(), GuestMemoryError> {
        view.mem.store(
            off_wrap.to_le(),
            GuestAddress(self.device),
            Ordering::Relaxed,
        )?;
        view.mem.store(
            flags.to_le(),
            GuestAddress(self.device.wrapping_add(2)),
            Ordering::Relaxed,
        )
    }
}
