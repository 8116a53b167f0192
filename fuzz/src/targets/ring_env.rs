//! The world a shadow virtqueue runs in, built so that mistakes show: guest
//! memory in three regions with guard pages around each (two of them
//! adjacent in guest-physical space but not in host memory, so a buffer
//! straddling them must be split), shadow memory with guard pages, an IOVA
//! window that does not contain the GPAs, a device that reads the shadow
//! ring the way hardware behind an IOMMU would, and an in-flight log that
//! checks the life of every head.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use iova::{AddrSpace, IovaTree};
use svq::{InflightLog, ShadowVirtqueue, SvqConfig};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion, VolatileMemory,
};

use crate::guard::GuardedMemory;

/// (GPA, size) of the guest regions: A and B touch in GPA space.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x4_0000, 0x4000)];
pub const IOVA_WINDOW: (u64, u64) = (0x1_0000_0000, 0x1_ffff_ffff);
/// Largest configuration a case may ask for (shadow memory is sized for it).
pub const MAX_QUEUE: u16 = 256;

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// `gpa..gpa+len` is all guest memory (possibly over adjacent regions).
pub fn in_guest(gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    let mut at = gpa;
    while at < end {
        match REGIONS.iter().find(|&&(a, s)| at >= a && at < a + s as u64) {
            Some(&(a, s)) => at = a + s as u64,
            None => return false,
        }
    }
    true
}

/// What the in-flight log saw, checked as it arrives.
#[derive(Default)]
pub struct LogState {
    pub in_flight: HashSet<u16>,
    /// Heads completed, in order, since the last `take_completed`.
    pub completed: Vec<(u16, u16)>,
    pub completing: Option<u16>,
    pub violations: Vec<String>,
}

#[derive(Clone, Default)]
pub struct CheckingLog(pub Arc<Mutex<LogState>>);

impl CheckingLog {
    fn with<R>(&self, f: impl FnOnce(&mut LogState) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn take_violation(&self) -> Option<String> {
        self.with(|s| s.violations.drain(..).next())
    }

    pub fn take_completed(&self) -> Vec<(u16, u16)> {
        self.with(|s| std::mem::take(&mut s.completed))
    }

    pub fn in_flight(&self) -> HashSet<u16> {
        self.with(|s| s.in_flight.clone())
    }
}

impl InflightLog for CheckingLog {
    fn popped(&self, head: u16) {
        self.with(|s| {
            if !s.in_flight.insert(head) {
                s.violations
                    .push(format!("head {head} popped while already in flight"));
            }
        })
    }
    fn completing(&self, head: u16) {
        self.with(|s| {
            if !s.in_flight.contains(&head) {
                s.violations
                    .push(format!("head {head} completing but not in flight"));
            }
            s.completing = Some(head);
        })
    }
    fn completed(&self, head: u16, used_idx: u16) {
        self.with(|s| {
            if s.completing != Some(head) || !s.in_flight.remove(&head) {
                s.violations.push(format!(
                    "head {head} completed (used idx {used_idx}) without completing or in flight"
                ));
            }
            s.completing = None;
            s.completed.push((head, used_idx));
        })
    }
    fn returned(&self, head: u16) {
        self.with(|s| {
            if !s.in_flight.remove(&head) {
                s.violations
                    .push(format!("head {head} returned but not in flight"));
            }
        })
    }
}

/// Guest and shadow memory, reused across cases.
pub struct Memory {
    guest: GuardedMemory,
    shadow: Vec<GuardedMemory>,
}

impl Memory {
    pub fn new(queues: usize) -> Result<Self, String> {
        let sizes: Vec<usize> = REGIONS.iter().map(|r| r.1).collect();
        let guest = GuardedMemory::new(&sizes).map_err(|e| e.to_string())?;
        let max = SvqConfig {
            queue_size: MAX_QUEUE,
            shadow_size: MAX_QUEUE,
            guest_features: 0,
            device_features: 1 << 28,
        };
        let shadow_size = ShadowVirtqueue::shadow_memory_size(&max).next_multiple_of(4096);
        let shadow = (0..queues)
            .map(|_| GuardedMemory::new(&[shadow_size]).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Memory { guest, shadow })
    }

    /// Fresh zeroed memory for a case: the guest's view and the IOVA tree
    /// with every guest region and shadow area mapped.
    pub fn fresh(&self) -> Result<(GuestMemoryMmap, Vec<Arc<MmapRegion>>, IovaTree), String> {
        self.guest.clear();
        let regions = REGIONS
            .iter()
            .enumerate()
            .map(|(i, &(gpa, _))| {
                GuestRegionMmap::new(self.guest.region(i), GuestAddress(gpa))
                    .ok_or_else(|| "guest region".to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())?;
        let mut tree = IovaTree::new(IOVA_WINDOW.0, IOVA_WINDOW.1).map_err(|e| e.to_string())?;
        for &(gpa, size) in &REGIONS {
            tree.map(AddrSpace::Guest, gpa, size as u64)
                .map_err(|e| e.to_string())?;
        }
        let mut shadows = Vec::new();
        for s in &self.shadow {
            s.clear();
            let r = Arc::new(s.region(0));
            tree.map(AddrSpace::Host, r.as_ptr() as u64, r.size() as u64)
                .map_err(|e| e.to_string())?;
            shadows.push(r);
        }
        Ok((mem, shadows, tree))
    }
}

/// One buffer of a chain as the device sees it.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub gpa: u64,
    pub len: u32,
    pub write: bool,
}

#[derive(Clone, Debug)]
pub struct Taken {
    pub head: u16,
    pub segs: Vec<Seg>,
}

impl Taken {
    pub fn writable(&self) -> u64 {
        self.segs
            .iter()
            .filter(|s| s.write)
            .map(|s| u64::from(s.len))
            .sum()
    }
}

/// The device on one shadow ring. Everything it reads from the shadow ring
/// is checked: the SVQ wrote it, so a bad value is the SVQ's bug.
pub struct ShadowDevice {
    region: Arc<MmapRegion>,
    pub size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    pub last_avail: u16,
    pub used_idx: u16,
    /// Taken and not completed, in take order.
    pub taken: Vec<Taken>,
    /// A head published again while taken is the SVQ's bug; off for a
    /// hostile device, whose bogus completions the SVQ may rightly accept.
    pub strict: bool,
}

type R<T> = Result<T, String>;

impl ShadowDevice {
    pub fn new(svq: &ShadowVirtqueue) -> Self {
        let region = svq.shadow_memory();
        let base = region.as_ptr() as u64;
        let a = svq.shadow_ring_hva();
        ShadowDevice {
            size: svq.config().shadow_size,
            desc: (a.desc - base) as usize,
            avail: (a.avail - base) as usize,
            used: (a.used - base) as usize,
            region,
            last_avail: 0,
            used_idx: 0,
            taken: Vec::new(),
            strict: true,
        }
    }

    fn read<const N: usize>(&self, off: usize) -> R<[u8; N]> {
        let mut b = [0u8; N];
        self.region
            .as_volatile_slice()
            .read_slice(&mut b, off)
            .map_err(|e| format!("shadow read at {off:#x}: {e}"))?;
        Ok(b)
    }

    fn u16_at(&self, off: usize) -> R<u16> {
        Ok(u16::from_le_bytes(self.read(off)?))
    }

    fn desc_at(&self, off: usize) -> R<(u64, u32, u16, u16)> {
        let b: [u8; 16] = self.read(off)?;
        Ok((
            u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
            u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
            u16::from_le_bytes([b[12], b[13]]),
            u16::from_le_bytes([b[14], b[15]]),
        ))
    }

    pub fn avail_idx(&self) -> R<u16> {
        let v = self
            .region
            .as_volatile_slice()
            .load::<u16>(self.avail + 2, Ordering::Acquire)
            .map_err(|e| e.to_string())?;
        Ok(u16::from_le(v))
    }

    /// Where a device buffer lives, checked to be all inside guest memory.
    fn resolve(&self, tree: &IovaTree, iova: u64, len: u32) -> R<u64> {
        let bad = || format!("shadow descriptor IOVA {iova:#x}+{len:#x} is not guest memory");
        if len == 0 {
            // Nothing to access (the SVQ's carrier for a chain of empty buffers).
            return Ok(0);
        }
        match tree.reverse(iova) {
            Some((AddrSpace::Guest, gpa)) if len > 0 => {
                let end = iova.checked_add(u64::from(len) - 1).ok_or_else(bad)?;
                match tree.reverse(end) {
                    Some((AddrSpace::Guest, g)) if g == gpa + u64::from(len) - 1 => Ok(gpa),
                    _ => Err(bad()),
                }
            }
            _ => Err(bad()),
        }
    }

    /// An indirect table's offset inside this queue's shadow memory.
    fn table_offset(&self, tree: &IovaTree, iova: u64, len: u32) -> R<usize> {
        let base = self.region.as_ptr() as u64;
        match tree.reverse(iova) {
            Some((AddrSpace::Host, hva))
                if hva >= base
                    && hva + u64::from(len) <= base + self.region.size() as u64
                    && len > 0
                    && len.is_multiple_of(16) =>
            {
                Ok((hva - base) as usize)
            }
            other => Err(format!(
                "shadow indirect table IOVA {iova:#x}+{len:#x} resolves to {other:?}"
            )),
        }
    }

    /// Take every chain the SVQ published, checking each.
    pub fn take_all(&mut self, tree: &IovaTree) -> R<usize> {
        let idx = self.avail_idx()?;
        let pending = idx.wrapping_sub(self.last_avail);
        if pending > self.size {
            return Err(format!(
                "shadow avail idx {idx} is {pending} ahead of the device at {}, ring size {}",
                self.last_avail, self.size
            ));
        }
        let mut n = 0;
        while self.last_avail != idx {
            let slot = usize::from(self.last_avail % self.size);
            let head = self.u16_at(self.avail + 4 + 2 * slot)?;
            if head >= self.size {
                return Err(format!("shadow avail names head {head} of {}", self.size));
            }
            if self.taken.iter().any(|t| t.head == head) {
                if self.strict {
                    return Err(format!("shadow head {head} published while in flight"));
                }
                self.taken.retain(|t| t.head != head);
            }
            let segs = self.walk(tree, head)?;
            self.taken.push(Taken { head, segs });
            self.last_avail = self.last_avail.wrapping_add(1);
            n += 1;
        }
        Ok(n)
    }

    fn walk(&self, tree: &IovaTree, head: u16) -> R<Vec<Seg>> {
        let (addr, len, flags, _) = self.desc_at(self.desc + 16 * usize::from(head))?;
        let (table, count) = if flags & INDIRECT != 0 {
            if flags & NEXT != 0 {
                return Err(format!("shadow head {head}: indirect with NEXT"));
            }
            (self.table_offset(tree, addr, len)?, (len / 16) as usize)
        } else {
            (self.desc, usize::from(self.size))
        };
        let mut segs: Vec<Seg> = Vec::new();
        let mut i = if table == self.desc {
            usize::from(head)
        } else {
            0
        };
        for _ in 0..=count {
            let (addr, len, flags, next) = self.desc_at(table + 16 * i)?;
            if flags & INDIRECT != 0 {
                return Err(format!("shadow head {head}: nested indirect"));
            }
            let write = flags & WRITE != 0;
            if !write && segs.last().is_some_and(|s| s.write) {
                return Err(format!("shadow head {head}: readable after writable"));
            }
            let gpa = self.resolve(tree, addr, len)?;
            segs.push(Seg { gpa, len, write });
            if flags & NEXT == 0 {
                return Ok(segs);
            }
            i = usize::from(next);
            if i >= count {
                return Err(format!("shadow head {head}: next {next} outside {count}"));
            }
        }
        Err(format!("shadow head {head}: chain loops"))
    }

    /// Write one used entry (as any device would, whatever its values).
    pub fn push_used(&mut self, id: u32, len: u32) -> R<()> {
        let slot = usize::from(self.used_idx % self.size);
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&id.to_le_bytes());
        b[4..].copy_from_slice(&len.to_le_bytes());
        self.region
            .as_volatile_slice()
            .write_slice(&b, self.used + 4 + 8 * slot)
            .map_err(|e| e.to_string())?;
        self.used_idx = self.used_idx.wrapping_add(1);
        Ok(())
    }

    pub fn publish_used(&self, idx: u16) -> R<()> {
        self.region
            .as_volatile_slice()
            .store(u16::to_le(idx), self.used + 2, Ordering::Release)
            .map_err(|e| e.to_string())
    }
}

/// Guest memory the test itself writes through, keeping a copy so that any
/// byte the SVQ changes outside the used rings is caught.
pub struct GuestView {
    pub mem: GuestMemoryMmap,
    copy: Vec<Vec<u8>>,
    /// GPA ranges the SVQ may write (the used rings).
    allowed: Vec<(u64, u64)>,
}

impl GuestView {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let copy = REGIONS.iter().map(|r| vec![0u8; r.1]).collect();
        GuestView {
            mem,
            copy,
            allowed: Vec::new(),
        }
    }

    pub fn allow(&mut self, gpa: u64, len: u64) {
        self.allowed.push((gpa, len));
    }

    /// Write `b` at `gpa` where it is guest memory (bytes outside are
    /// dropped, as a guest cannot write there either).
    pub fn write(&mut self, gpa: u64, b: &[u8]) {
        for (i, &(base, size)) in REGIONS.iter().enumerate() {
            let end = base + size as u64;
            let lo = gpa.max(base);
            let hi = gpa.saturating_add(b.len() as u64).min(end);
            if lo >= hi {
                continue;
            }
            let part = &b[(lo - gpa) as usize..(hi - gpa) as usize];
            let _ = self.mem.write_slice(part, GuestAddress(lo));
            self.copy[i][(lo - base) as usize..(hi - base) as usize].copy_from_slice(part);
        }
    }

    pub fn write_u16(&mut self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        let _ = self.mem.read_slice(&mut b, GuestAddress(gpa));
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        let _ = self.mem.read_slice(&mut b, GuestAddress(gpa));
        u32::from_le_bytes(b)
    }

    /// Every byte outside the allowed ranges is what the test wrote; the
    /// allowed ranges are taken into the copy.
    pub fn check_untouched(&mut self) -> R<()> {
        for (i, &(base, size)) in REGIONS.iter().enumerate() {
            let mut actual = vec![0u8; size];
            self.mem
                .read_slice(&mut actual, GuestAddress(base))
                .map_err(|e| e.to_string())?;
            for &(a, l) in &self.allowed {
                let lo = a.max(base);
                let hi = a.saturating_add(l).min(base + size as u64);
                if lo < hi {
                    let (lo, hi) = ((lo - base) as usize, (hi - base) as usize);
                    self.copy[i][lo..hi].copy_from_slice(&actual[lo..hi]);
                }
            }
            if let Some(off) = (0..size).find(|&o| actual[o] != self.copy[i][o]) {
                return Err(format!(
                    "guest byte at GPA {:#x} changed outside the used rings ({:#x} -> {:#x})",
                    base + off as u64,
                    self.copy[i][off],
                    actual[off]
                ));
            }
        }
        Ok(())
    }
}
