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

/// The mappings of one address space, sorted by start address.
///
/// Sorted vectors rather than a tree: mappings change rarely (memory hot-plug,
/// mode switches) while every relayed descriptor is a lookup. On top of the
/// sorted starts sits a bucket table: the span from the first start to the
/// last mapped byte is cut into at most [`BUCKETS`] equal power-of-two
/// buckets, and `bucket[b]` is the floor index of bucket `b`'s first address.
/// A lookup reads the two table entries around its bucket and searches only
/// between them. With regions spread over the span (509 hot-plugged DIMMs,
/// a handful of boot regions) that range holds one or two starts, so a
/// lookup is two dependent loads instead of ~9 halvings at 509 mappings; a
/// crowded bucket degrades to the same halving search over its range, never
/// worse than `O(log n)`. The table is rebuilt on every insert and remove,
/// `O(n + BUCKETS)`.
#[derive(Clone, Debug, Default)]
struct SpaceIndex {
    starts: Vec<u64>,
    maps: Vec<Mapping>,
    /// Floor index of the first address of each bucket, then `n - 1`.
    bucket: Vec<u32>,
    /// Buckets are `1 << shift` bytes from `starts[0]`.
    shift: u32,
    /// Last byte mapped by any mapping, inclusive.
    max_last: u64,
}

/// Upper bound on the number of buckets (the table is 4 bytes each).
const BUCKETS: u64 = 1024;
/// Up to this many mappings the lookup skips the bucket table.
const SMALL: usize = 8;

impl SpaceIndex {
    /// Index of the last mapping that starts at or below `addr`.
    #[inline]
    fn floor(&self, addr: u64) -> Option<usize> {
        let starts = &self.starts;
        let first = *starts.first()?;
        if addr < first {
            return None;
        }
        let (lo, hi) = if starts.len() <= SMALL {
            // A few halvings in one cache line beat the table's loads.
            (0, starts.len() - 1)
        } else if addr > self.max_last {
            return Some(starts.len() - 1);
        } else {
            // addr - first <= max_last - first, so the bucket and the one
            // after it are in the table (one entry per bucket + a sentinel).
            let b = ((addr - first) >> self.shift) as usize;
            match (self.bucket.get(b), self.bucket.get(b + 1)) {
                (Some(&lo), Some(&hi)) => (lo as usize, hi as usize),
                _ => (0, starts.len() - 1),
            }
        };
        // Branch-free halving over [lo, hi]: the comparison is unpredictable
        // with random buffer addresses, a conditional move is not.
        let mut base = lo;
        let mut n = hi - lo + 1;
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
        self.rebuild();
    }

    fn remove(&mut self, addr: u64) -> Option<Mapping> {
        let at = self.starts.binary_search(&addr).ok()?;
        self.starts.remove(at);
        let m = self.maps.remove(at);
        self.rebuild();
        Some(m)
    }

    fn rebuild(&mut self) {
        self.bucket.clear();
        let Some(&first) = self.starts.first() else {
            self.max_last = 0;
            self.shift = 0;
            return;
        };
        // Mappings never overlap, so the last one ends last.
        self.max_last = self.maps.last().map_or(first, Mapping::last_addr);
        let span = self.max_last - first;
        // Smallest shift with span >> shift < BUCKETS.
        let bits = u64::BITS - span.leading_zeros();
        self.shift = bits.saturating_sub(BUCKETS.trailing_zeros());
        let buckets = (span >> self.shift) + 1;
        let mut i = 0usize;
        for b in 0..buckets {
            let at = first + (b << self.shift);
            while i + 1 < self.starts.len() && self.starts[i + 1] <= at {
                i += 1;
            }
            // At most 509 + a few mappings per space in practice; an index
            // that does not fit u32 cannot be allocated anyway.
            self.bucket.push(i as u32);
        }
        self.bucket.push((self.starts.len() - 1) as u32);
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
        let i = match idx.floor(addr) {
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
        Self::translate_split(space, addr, len, maps, i, out)
    }

    /// `translate` of a range that crosses mappings, from mapping `i` on.
    /// Kept out of line so the one-mapping path stays small.
    #[cold]
    #[inline(never)]
    fn translate_split(
        space: AddrSpace,
        addr: u64,
        len: u64,
        maps: &[Mapping],
        mut i: usize,
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        let not_mapped = |missing| IovaError::NotMapped {
            space,
            addr,
            len,
            missing,
        };
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
