//! Strict descriptor-chain walking and packet copies through the IOTLB.
//!
//! virtio-queue's `DescriptorChain` iterator ends a malformed chain silently
//! (a loop just runs out of its time-to-live, a bad `next` or an unreadable
//! indirect table just stops it). The sim must tell a malformed chain from a
//! short one, so it watches for a chain that ends on a descriptor still
//! carrying NEXT, and checks every buffer against the IOTLB before use.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::iotlb::IotlbView;

/// Largest packet (header + frame) the sim moves. The sim offers no GSO, so a
/// frame never exceeds 64 KiB; anything longer is a guest error.
pub(crate) const MAX_PACKET: usize = 12 + 65_535;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ChainError {
    #[error("descriptor chain starting at head {head} is malformed (loop, bad next index, length overflow or bad indirect table)")]
    Malformed { head: u16 },
    #[error("descriptor chain starting at head {head} has no descriptors")]
    Empty { head: u16 },
    #[error("buffer {addr:#x}+{len:#x} of chain {head} is not mapped in the IOTLB")]
    Unmapped { head: u16, addr: u64, len: u32 },
    #[error("device-writable buffer {addr:#x}+{len:#x} of chain {head} is read-only in the IOTLB")]
    ReadOnly { head: u16, addr: u64, len: u32 },
    #[error("chain {head} has a device-readable buffer after a device-writable one")]
    ReadAfterWrite { head: u16 },
    #[error("packed ring: descriptor {pos} continues chain {head} but is not available")]
    PackedNotAvailable { head: u16, pos: u16 },
    #[error("packed ring: chain at {pos} is longer than the ring ({size} descriptors)")]
    PackedTooLong { pos: u16, size: u16 },
    #[error("packed ring: chain at {pos} has buffer id {id}, the ring has {size} entries")]
    BadId { pos: u16, id: u16, size: u16 },
    #[error("packed ring: indirect descriptor at {pos} also has NEXT")]
    IndirectWithNext { pos: u16 },
    #[error("packed ring: indirect table {addr:#x}+{len:#x} at {pos} is empty, misaligned, longer than the ring or unmapped")]
    BadIndirect { pos: u16, addr: u64, len: u32 },
    #[error("packed ring: indirect table at {pos} holds an indirect descriptor")]
    NestedIndirect { pos: u16 },
    #[error("RX chain {head} has {writable} device-writable bytes, too few for the {need}-byte virtio-net header")]
    NoRoomForHeader {
        head: u16,
        writable: u64,
        need: usize,
    },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Segment {
    pub(crate) addr: u64,
    pub(crate) len: u32,
}

#[derive(Debug)]
pub(crate) struct Chain {
    /// The head index (split) or buffer id (packed) the used entry names.
    pub(crate) head: u16,
    /// Descriptor slots the chain took in a packed ring (a packed used
    /// entry moves the used position by them); 1 for split chains.
    pub(crate) slots: u16,
    pub(crate) readable: Vec<Segment>,
    pub(crate) writable: Vec<Segment>,
    pub(crate) read_len: u64,
    pub(crate) write_len: u64,
}

impl Chain {
    pub(crate) fn new(head: u16) -> Chain {
        Chain {
            head,
            slots: 1,
            readable: Vec::new(),
            writable: Vec::new(),
            read_len: 0,
            write_len: 0,
        }
    }

    /// Adds one buffer after checking it against the IOTLB (writable ones
    /// must be writable there) and the order rule (readable before
    /// writable). The one place both ring layouts check a buffer.
    pub(crate) fn push(
        &mut self,
        view: &IotlbView,
        addr: u64,
        len: u32,
        write: bool,
    ) -> Result<(), ChainError> {
        let head = self.head;
        let seg = Segment { addr, len };
        if write {
            if !view.writable(addr, u64::from(len)) {
                return Err(if view.readable(addr, u64::from(len)) {
                    ChainError::ReadOnly { head, addr, len }
                } else {
                    ChainError::Unmapped { head, addr, len }
                });
            }
            self.write_len += u64::from(len);
            self.writable.push(seg);
        } else {
            if !self.writable.is_empty() {
                return Err(ChainError::ReadAfterWrite { head });
            }
            if !view.readable(addr, u64::from(len)) {
                return Err(ChainError::Unmapped { head, addr, len });
            }
            self.read_len += u64::from(len);
            self.readable.push(seg);
        }
        Ok(())
    }
}

/// Walks a split ring's chain (virtio-queue's iterator) into a [`Chain`].
pub(crate) fn walk<M>(view: &IotlbView, mut chain: DescriptorChain<M>) -> Result<Chain, ChainError>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let mut out = Chain::new(chain.head_index());
    let mut last_has_next = false;
    let mut count = 0usize;
    for desc in chain.by_ref() {
        count += 1;
        last_has_next = desc.has_next();
        out.push(view, desc.addr().0, desc.len(), desc.is_write_only())?;
    }
    if count == 0 {
        return Err(ChainError::Empty { head: out.head });
    }
    // The iterator stops after `queue size` descriptors, on an out-of-range
    // `next`, on an unreadable descriptor and on length overflow; in each case
    // the last descriptor it returned still says NEXT.
    if last_has_next {
        return Err(ChainError::Malformed { head: out.head });
    }
    Ok(out)
}

/// Copies the device-readable bytes of a chain (at most `limit`).
/// `Ok(None)` means the chain holds more than `limit` bytes.
pub(crate) fn read_readable(
    view: &IotlbView,
    chain: &Chain,
    limit: usize,
) -> Result<Option<Vec<u8>>, vm_memory::GuestMemoryError> {
    if chain.read_len > limit as u64 {
        return Ok(None);
    }
    // read_len <= limit, so it fits a usize.
    let mut buf = vec![0u8; chain.read_len as usize];
    let mut off = 0usize;
    for seg in &chain.readable {
        let len = seg.len as usize;
        view.mem
            .read_slice(&mut buf[off..off + len], GuestAddress(seg.addr))?;
        off += len;
    }
    Ok(Some(buf))
}

/// Writes `data` into the device-writable buffers of `chain`, returning how
/// many bytes went in (all of `data`, or the chain's capacity).
pub(crate) fn write_writable(
    view: &IotlbView,
    chain: &Chain,
    data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut off = 0usize;
    for seg in &chain.writable {
        if off == data.len() {
            break;
        }
        let n = (seg.len as usize).min(data.len() - off);
        view.mem
            .write_slice(&data[off..off + n], GuestAddress(seg.addr))?;
        off += n;
    }
    Ok(off)
}
