//! The IOVA tree: where daemon-visible memory sits in a device's I/O address space.
//!
//! A vDPA device addresses memory through IOVAs inside a window
//! `[first, last]` it reports. Two kinds of memory are mapped into that window:
//!
//! * guest memory, known by guest-physical address ([`AddrSpace::Guest`]);
//! * memory the daemon owns — shadow rings, indirect tables — known by its host
//!   virtual address ([`AddrSpace::Host`]).
//!
//! Guest memory is placed at IOVA = GPA whenever that range is free and inside
//! the window. Then the guest's own ring addresses are valid IOVAs, so switching
//! between passthrough and shadow mode never re-maps guest memory. Everything
//! else is placed first-fit, page aligned.
//!
//! Lookups in both directions are `O(log n)`: one ordered map per address space
//! keyed by address, and one ordered map of occupied IOVA ranges.

use std::collections::BTreeMap;
use std::fmt;

/// Granule of IOVA allocation.
pub const PAGE_SIZE: u64 = 4096;

/// Which address space an address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddrSpace {
    /// Guest-physical addresses.
    Guest,
    /// Host virtual addresses of memory the daemon owns.
    Host,
}

impl fmt::Display for AddrSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrSpace::Guest => f.write_str("GPA"),
            AddrSpace::Host => f.write_str("HVA"),
        }
    }
}

/// One mapping: `size` bytes at `addr` in `space` appear at `iova`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub space: AddrSpace,
    pub addr: u64,
    pub size: u64,
    pub iova: u64,
}

impl Mapping {
    /// Last address covered, inclusive.
    pub fn last_addr(&self) -> u64 {
        self.addr + (self.size - 1)
    }

    /// Last IOVA covered, inclusive.
    pub fn last_iova(&self) -> u64 {
        self.iova + (self.size - 1)
    }
}

/// A contiguous piece of a translated range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub iova: u64,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IovaError {
    #[error("IOVA window {first:#x}..={last:#x} is empty or holds no whole page")]
    InvalidWindow { first: u64, last: u64 },
    #[error("zero-length mapping at {space} {addr:#x}")]
    ZeroSize { space: AddrSpace, addr: u64 },
    #[error("{space} range {addr:#x}+{size:#x} wraps the address space")]
    Wraps {
        space: AddrSpace,
        addr: u64,
        size: u64,
    },
    #[error("{space} range {addr:#x}+{size:#x} overlaps an existing mapping")]
    Overlap {
        space: AddrSpace,
        addr: u64,
        size: u64,
    },
    #[error("no free IOVA range of {size:#x} bytes in the device window")]
    Exhausted { size: u64 },
    #[error("no mapping starts at {space} {addr:#x}")]
    NoSuchMapping { space: AddrSpace, addr: u64 },
    #[error("{space} range {addr:#x}+{len:#x} is not mapped (first unmapped byte {missing:#x})")]
    NotMapped {
        space: AddrSpace,
        addr: u64,
        len: u64,
        missing: u64,
    },
    #[error("{space} range {addr:#x}+{len:#x} is not contiguous in IOVA space")]
    NotContiguous {
        space: AddrSpace,
        addr: u64,
        len: u64,
    },
}

pub type Result<T> = std::result::Result<T, IovaError>;

/// Mappings of guest and host memory into one device's IOVA window.
/// The mappings of one address space, sorted by start address.
///
/// Sorted vectors rather than a tree: mappings change rarely (memory hot-plug,
/// mode switches) while every relayed descriptor is a lookup. The binary search
/// runs over `starts` alone, 8 bytes a key, so even 509 regions stay within a
/// few cache lines of the hot path.
#[derive(Clone, Debug, Default)]
struct SpaceIndex {
    starts: Vec<u64>,
    maps: Vec<Mapping>,
}

impl SpaceIndex {
    /// Index of the last mapping that starts at or below `addr`.
    fn floor(&self, addr: u64) -> Option<usize> {
        let starts = &self.starts;
        if starts.first().is_none_or(|&a| a > addr) {
            return None;
        }
        // Branch-free halving: with random buffer addresses the comparison is
        // unpredictable, and a conditional move beats a mispredicted branch.
        let mut base = 0;
        let mut n = starts.len();
        while n > 1 {
            let half = n / 2;
            base = if starts[base + half] <= addr {
                base + half
            } else {
                base
            };
            n -= half;
        }
        Some(base)
    }

    fn insert(&mut self, m: Mapping) {
        let at = self.starts.partition_point(|&a| a < m.addr);
        self.starts.insert(at, m.addr);
        self.maps.insert(at, m);
    }

    fn remove(&mut self, addr: u64) -> Option<Mapping> {
        let at = self.starts.binary_search(&addr).ok()?;
        self.starts.remove(at);
        Some(self.maps.remove(at))
    }
}

#[derive(Clone, Debug)]
pub struct IovaTree {
    /// Usable window, page aligned inward.
    first: u64,
    last: u64,
    guest: SpaceIndex,
    host: SpaceIndex,
    /// Occupied IOVA ranges: first IOVA of the allocation → (last IOVA of the
    /// allocation, inclusive; the mapping's space and start address).
    iova: BTreeMap<u64, (u64, AddrSpace, u64)>,
}

fn align_up(v: u64) -> Option<u64> {
    v.checked_add(PAGE_SIZE - 1).map(|v| v & !(PAGE_SIZE - 1))
}

fn align_down(v: u64) -> u64 {
    v & !(PAGE_SIZE - 1)
}

impl IovaTree {
    /// A tree for a device that can address `[first, last]` (inclusive), as
    /// reported by VHOST_VDPA_GET_IOVA_RANGE.
    pub fn new(first: u64, last: u64) -> Result<Self> {
        let bad = IovaError::InvalidWindow { first, last };
        let a_first = align_up(first).ok_or(bad.clone())?;
        // Last byte of the last whole page inside the window.
        let a_last = match last.checked_add(1) {
            Some(end) => align_down(end).checked_sub(1).ok_or(bad.clone())?,
            None => u64::MAX,
        };
        if a_first > a_last || a_last - a_first < PAGE_SIZE - 1 {
            return Err(bad);
        }
        Ok(IovaTree {
            first: a_first,
            last: a_last,
            guest: SpaceIndex::default(),
            host: SpaceIndex::default(),
            iova: BTreeMap::new(),
        })
    }

    /// The usable window, page aligned: `(first, last)` inclusive.
    pub fn window(&self) -> (u64, u64) {
        (self.first, self.last)
    }

    fn space_map(&self, space: AddrSpace) -> &SpaceIndex {
        match space {
            AddrSpace::Guest => &self.guest,
            AddrSpace::Host => &self.host,
        }
    }

    fn space_map_mut(&mut self, space: AddrSpace) -> &mut SpaceIndex {
        match space {
            AddrSpace::Guest => &mut self.guest,
            AddrSpace::Host => &mut self.host,
        }
    }

    /// The mapping containing `addr`, if any.
    pub fn find(&self, space: AddrSpace, addr: u64) -> Option<&Mapping> {
        let idx = self.space_map(space);
        idx.floor(addr)
            .map(|i| &idx.maps[i])
            .filter(|m| addr <= m.last_addr())
    }

    /// True if no IOVA in `[lo, hi]` is allocated.
    fn iova_free(&self, lo: u64, hi: u64) -> bool {
        if let Some((_, &(end, _, _))) = self.iova.range(..=hi).next_back() {
            if end >= lo {
                return false;
            }
        }
        true
    }

    /// First-fit search for `len` bytes (page multiple) at page alignment.
    fn first_fit(&self, len: u64) -> Option<u64> {
        let mut candidate = self.first;
        for (&start, &(end, _, _)) in &self.iova {
            if start > candidate && start - candidate >= len {
                break;
            }
            if end >= candidate {
                candidate = align_up(end.checked_add(1)?)?;
            }
        }
        let last = candidate.checked_add(len - 1)?;
        (last <= self.last).then_some(candidate)
    }

    /// Map `size` bytes at `addr` in `space`. Guest memory lands at IOVA = GPA
    /// when that is possible; everything else first-fit.
    pub fn map(&mut self, space: AddrSpace, addr: u64, size: u64) -> Result<Mapping> {
        if size == 0 {
            return Err(IovaError::ZeroSize { space, addr });
        }
        let last_addr = addr
            .checked_add(size - 1)
            .ok_or(IovaError::Wraps { space, addr, size })?;
        // Reject overlap with an existing mapping in the same space.
        let idx = self.space_map(space);
        let overlaps = idx
            .floor(last_addr)
            .is_some_and(|i| idx.maps[i].last_addr() >= addr);
        if overlaps {
            return Err(IovaError::Overlap { space, addr, size });
        }
        // The allocation covers whole pages; the mapping keeps addr's offset
        // inside its first page so that iova and addr agree modulo PAGE_SIZE.
        let offset = addr % PAGE_SIZE;
        let alloc_len = align_up(offset + size).ok_or(IovaError::Wraps { space, addr, size })?;
        let identity = align_down(addr);
        let base = if space == AddrSpace::Guest
            && identity >= self.first
            && identity
                .checked_add(alloc_len - 1)
                .is_some_and(|end| end <= self.last && self.iova_free(identity, end))
        {
            identity
        } else {
            self.first_fit(alloc_len)
                .ok_or(IovaError::Exhausted { size: alloc_len })?
        };
        let mapping = Mapping {
            space,
            addr,
            size,
            iova: base + offset,
        };
        self.iova
            .insert(base, (base + (alloc_len - 1), space, addr));
        self.space_map_mut(space).insert(mapping);
        Ok(mapping)
    }

    /// Remove the mapping that starts at `addr`.
    pub fn unmap(&mut self, space: AddrSpace, addr: u64) -> Result<Mapping> {
        let mapping = self
            .space_map_mut(space)
            .remove(addr)
            .ok_or(IovaError::NoSuchMapping { space, addr })?;
        self.iova.remove(&align_down(mapping.iova));
        Ok(mapping)
    }

    /// Translate `[addr, addr + len)` into IOVA segments, appended to `out`.
    /// A range that crosses mappings comes back as one segment per mapping.
    /// On error `out` is left as it was.
    pub fn translate(
        &self,
        space: AddrSpace,
        addr: u64,
        len: u64,
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        let idx = self.space_map(space);
        let maps = &idx.maps;
        let not_mapped = |missing| IovaError::NotMapped {
            space,
            addr,
            len,
            missing,
        };
        if len == 0 {
            return Ok(());
        }
        if addr.checked_add(len - 1).is_none() {
            return Err(not_mapped(u64::MAX));
        }
        let mut i = match idx.floor(addr) {
            Some(i) if addr <= maps[i].last_addr() => i,
            _ => return Err(not_mapped(addr)),
        };
        // Fast path: the whole range inside one mapping (nearly every buffer).
        let m = &maps[i];
        if m.last_addr() - addr >= len - 1 {
            out.push(Segment {
                iova: m.iova + (addr - m.addr),
                len,
            });
            return Ok(());
        }
        let start_len = out.len();
        let mut cur = addr;
        let mut left = len;
        loop {
            let m = &maps[i];
            let take = (m.last_addr() - cur + 1).min(left);
            out.push(Segment {
                iova: m.iova + (cur - m.addr),
                len: take,
            });
            left -= take;
            if left == 0 {
                return Ok(());
            }
            cur += take;
            i += 1;
            // Mappings never overlap, so the next one must start exactly here.
            if maps.get(i).is_none_or(|next| next.addr != cur) {
                out.truncate(start_len);
                return Err(not_mapped(cur));
            }
        }
    }

    /// Translate a range that must lie inside one mapping (a ring, a table).
    pub fn translate_contiguous(&self, space: AddrSpace, addr: u64, len: u64) -> Result<u64> {
        let m = self.find(space, addr).ok_or(IovaError::NotMapped {
            space,
            addr,
            len,
            missing: addr,
        })?;
        if len > 0 && m.last_addr() - addr < len - 1 {
            return Err(IovaError::NotContiguous { space, addr, len });
        }
        Ok(m.iova + (addr - m.addr))
    }

    /// Which address an IOVA stands for.
    pub fn reverse(&self, iova: u64) -> Option<(AddrSpace, u64)> {
        let (_, &(end, space, addr)) = self.iova.range(..=iova).next_back()?;
        if iova > end {
            return None;
        }
        let m = self.find(space, addr)?;
        (iova >= m.iova && iova <= m.last_iova()).then(|| (space, m.addr + (iova - m.iova)))
    }

    /// All mappings of one address space, in address order.
    pub fn mappings(&self, space: AddrSpace) -> impl Iterator<Item = &Mapping> {
        self.space_map(space).maps.iter()
    }

    /// Number of mappings in both spaces.
    pub fn len(&self) -> usize {
        self.guest.maps.len() + self.host.maps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
