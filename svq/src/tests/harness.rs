//! Test doubles: a guest driver writing a split ring in guest memory, a fake
//! device consuming the shadow ring through the shadow memory (addresses are
//! IOVAs, resolved with the tree like a device behind an IOMMU would), and a
//! passthrough device reading the guest ring directly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use iova::{AddrSpace, IovaTree};
use testkit::ring::{Seg, SplitRing};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, MmapRegion, VolatileMemory};

use crate::{DirtyLog, GuestRing, ShadowVirtqueue};

/// Guest memory: two adjacent regions, so buffers can straddle two IOVA
/// mappings.
pub const REGION_A: (u64, usize) = (0, 0x10_0000);
pub const REGION_B: (u64, usize) = (0x10_0000, 0x10_0000);
pub const MEM_END: u64 = 0x20_0000;

pub const DESC_GPA: u64 = 0x0;
pub const AVAIL_GPA: u64 = 0x4000;
pub const USED_GPA: u64 = 0x8000;
/// Buffer area of head h: `BUF_BASE + h * BUF_AREA`; head 7's straddles
/// the region boundary.
pub const BUF_BASE: u64 = 0xF1000;
pub const BUF_AREA: u64 = 0x2000;
/// Indirect table of head h: `TABLE_BASE + h * TABLE_AREA`.
pub const TABLE_BASE: u64 = 0x1C_0000;
pub const TABLE_AREA: u64 = 0x400;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION_A.0), REGION_A.1),
        (GuestAddress(REGION_B.0), REGION_B.1),
    ])
    .unwrap()
}

/// A tree whose window does not contain the GPAs, so IOVA != GPA and a
/// wrong translation cannot go unnoticed.
pub fn guest_tree() -> IovaTree {
    let mut t = IovaTree::new(0x1_0000_0000, 0x1_ffff_ffff).unwrap();
    t.map(AddrSpace::Guest, REGION_A.0, REGION_A.1 as u64)
        .unwrap();
    t.map(AddrSpace::Guest, REGION_B.0, REGION_B.1 as u64)
        .unwrap();
    t
}

pub fn map_shadow(tree: &mut IovaTree, svq: &ShadowVirtqueue) {
    let m = svq.shadow_memory();
    tree.map(AddrSpace::Host, m.as_ptr() as u64, m.size() as u64)
        .unwrap();
}

pub fn unmap_shadow(tree: &mut IovaTree, svq: &ShadowVirtqueue) {
    let m = svq.shadow_memory();
    tree.unmap(AddrSpace::Host, m.as_ptr() as u64).unwrap();
}

pub fn guest_ring() -> GuestRing {
    GuestRing {
        desc: DESC_GPA,
        avail: AVAIL_GPA,
        used: USED_GPA,
        used_log: USED_GPA,
    }
}

/// Records every range marked dirty.
#[derive(Default)]
pub struct LogRecorder {
    pub ranges: RefCell<Vec<(u64, u64)>>,
}

impl DirtyLog for LogRecorder {
    fn mark(&self, gpa: u64, len: u64) {
        self.ranges.borrow_mut().push((gpa, len));
    }
}

impl LogRecorder {
    /// Is every byte of `[gpa, gpa+len)` inside some marked range?
    pub fn covers(&self, gpa: u64, len: u64) -> bool {
        let mut iv: Vec<(u64, u64)> = self
            .ranges
            .borrow()
            .iter()
            .map(|&(a, l)| (a, a + l))
            .collect();
        iv.sort_unstable();
        let mut cur = gpa;
        let end = gpa + len;
        for (a, b) in iv {
            if cur >= end {
                break;
            }
            if a <= cur && b > cur {
                cur = b;
            }
        }
        cur >= end
    }
}

/// One buffer a test chain is built from.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub gpa: u64,
    pub len: u32,
    pub write: bool,
}

#[derive(Clone, Debug)]
pub struct Outstanding {
    pub id: u64,
    pub writable: u64,
    pub bufs: Vec<Buf>,
}

/// The guest's virtio driver: the workspace's split-ring driver
/// (`testkit::ring::SplitRing`, which shares no code with this crate) at the
/// guest ring's addresses, with each head's buffers in an area of its own
/// (`bufs_for`) and its indirect table at `TABLE_BASE + head * TABLE_AREA`.
pub struct GuestDriver {
    pub ring: GuestRing,
    split: SplitRing,
    pub outstanding: HashMap<u16, Outstanding>,
    pub next_id: u64,
}

impl GuestDriver {
    pub fn new(mem: &GuestMemoryMmap, q: u16) -> Self {
        let ring = guest_ring();
        GuestDriver {
            ring,
            split: SplitRing::new(
                mem,
                q,
                GuestAddress(ring.desc),
                GuestAddress(ring.avail),
                GuestAddress(ring.used),
            ),
            outstanding: HashMap::new(),
            next_id: 0,
        }
    }

    /// Continue from `idx` (the driver's own counters; guest memory is
    /// left as it is).
    pub fn start_at(&mut self, idx: crate::RingIndexes) {
        self.split.avail_idx = idx.avail;
        self.split.last_used = idx.used;
    }

    /// The avail idx the next chain gets.
    pub fn avail_idx(&self) -> u16 {
        self.split.avail_idx
    }

    /// The used idx up to which entries were collected.
    pub fn last_used(&self) -> u16 {
        self.split.last_used
    }

    pub fn write_desc(&self, mem: &GuestMemoryMmap, table: u64, i: u16, d: Descriptor) {
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }

    /// Buffers for head `h`: `lens[i]` bytes each, packed in its area,
    /// starting `offset` bytes in. Writable after readable as in virtio.
    pub fn bufs_for(h: u16, offset: u64, lens: &[(u32, bool)]) -> Vec<Buf> {
        let mut at = BUF_BASE + h as u64 * BUF_AREA + offset;
        let mut v: Vec<Buf> = lens
            .iter()
            .map(|&(len, write)| {
                let b = Buf {
                    gpa: at,
                    len,
                    write,
                };
                at += len as u64;
                b
            })
            .collect();
        v.sort_by_key(|b| b.write);
        v
    }

    /// Add a chain and publish it; `make` builds the buffers for the head
    /// it gets. Returns None when the ring has no free descriptor for it.
    pub fn add(
        &mut self,
        _mem: &GuestMemoryMmap,
        indirect: bool,
        make: impl FnOnce(u16) -> Vec<Buf>,
    ) -> Option<(u16, u64)> {
        let head = self.split.next_head()?;
        let bufs = make(head);
        let segs: Vec<Seg> = bufs
            .iter()
            .map(|b| Seg {
                addr: GuestAddress(b.gpa),
                len: b.len,
                write: b.write,
            })
            .collect();
        let id = self.next_id;
        let added = if indirect {
            let table = GuestAddress(TABLE_BASE + head as u64 * TABLE_AREA);
            self.split.add_indirect(&segs, id, table)?
        } else {
            self.split.add(&segs, id)?
        };
        assert_eq!(added, head);
        self.split.publish();
        self.next_id += 1;
        let writable = bufs.iter().filter(|b| b.write).map(|b| b.len as u64).sum();
        self.outstanding
            .insert(head, Outstanding { id, writable, bufs });
        Some((head, id))
    }

    /// Put `head` in the next avail slot and bump avail idx (no
    /// bookkeeping: for heads the test wrote itself).
    pub fn publish_head(&mut self, _mem: &GuestMemoryMmap, head: u16) {
        self.split.push_avail_raw(head);
        self.split.publish();
    }

    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.store(
            u16::to_le(idx),
            GuestAddress(self.ring.avail + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    pub fn set_avail_flags(&self, _mem: &GuestMemoryMmap, flags: u16) {
        self.split.set_avail_flags(flags);
    }

    pub fn set_used_event(&self, _mem: &GuestMemoryMmap, v: u16) {
        self.split.set_used_event(v);
    }

    pub fn avail_event(&self, _mem: &GuestMemoryMmap) -> u16 {
        self.split.avail_event()
    }

    pub fn used_flags(&self, _mem: &GuestMemoryMmap) -> u16 {
        self.split.used_flags()
    }

    pub fn used_idx(&self, _mem: &GuestMemoryMmap) -> u16 {
        self.split.device_used_idx()
    }

    /// Reclaim used entries: (used position, head, len, the chain). The
    /// driver checks each entry (head in flight, len within the writable
    /// bytes); a bad one is an SVQ bug and fails the test.
    pub fn collect(&mut self, _mem: &GuestMemoryMmap) -> Vec<(u16, u16, u32, Outstanding)> {
        let first = self.split.last_used;
        let used = self
            .split
            .pop_used()
            .unwrap_or_else(|e| panic!("the SVQ returned a bad used entry: {e}"));
        used.into_iter()
            .zip(0u16..)
            .map(|(u, k)| {
                let o = self
                    .outstanding
                    .remove(&u.head)
                    .unwrap_or_else(|| panic!("used entry for head {} not outstanding", u.head));
                (first.wrapping_add(k), u.head, u.len, o)
            })
            .collect()
    }
}

/// A chain as the fake device took it from the shadow ring.
#[derive(Clone, Debug)]
pub struct Taken {
    pub head: u16,
    /// (iova, len, write)
    pub segs: Vec<(u64, u32, bool)>,
    pub indirect: bool,
}

impl Taken {
    pub fn writable(&self) -> u64 {
        self.segs.iter().filter(|s| s.2).map(|s| s.1 as u64).sum()
    }
}

/// The device on the shadow ring.
pub struct FakeDevice {
    pub region: Arc<MmapRegion>,
    pub size: u16,
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    pub last_avail: u16,
    pub used_idx: u16,
    pub taken: Vec<Taken>,
    /// GPA ranges written into guest memory.
    pub written: Vec<(u64, u64)>,
}

impl FakeDevice {
    pub fn new(svq: &ShadowVirtqueue) -> Self {
        let region = svq.shadow_memory();
        let base = region.as_ptr() as u64;
        let a = svq.shadow_ring_hva();
        FakeDevice {
            size: svq.config().shadow_size,
            desc: (a.desc - base) as usize,
            avail: (a.avail - base) as usize,
            used: (a.used - base) as usize,
            region,
            last_avail: 0,
            used_idx: 0,
            taken: Vec::new(),
            written: Vec::new(),
        }
    }

    fn vs(&self) -> vm_memory::VolatileSlice<'_, ()> {
        self.region.as_volatile_slice()
    }

    fn read_desc_at(&self, off: usize) -> Descriptor {
        self.vs().read_obj(off).unwrap()
    }

    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.vs().load(self.avail + 2, Ordering::Acquire).unwrap())
    }

    pub fn avail_flags(&self) -> u16 {
        u16::from_le(self.vs().read_obj(self.avail).unwrap())
    }

    pub fn used_event(&self) -> u16 {
        u16::from_le(
            self.vs()
                .read_obj(self.avail + 4 + 2 * self.size as usize)
                .unwrap(),
        )
    }

    pub fn set_used_flags(&self, f: u16) {
        self.vs().write_obj(u16::to_le(f), self.used).unwrap();
    }

    pub fn set_avail_event(&self, v: u16) {
        self.vs()
            .write_obj(u16::to_le(v), self.used + 4 + 8 * self.size as usize)
            .unwrap();
    }

    /// Resolve an IOVA range of shadow memory to an offset in the region.
    fn host_offset(&self, tree: &IovaTree, iova: u64) -> usize {
        match tree.reverse(iova) {
            Some((AddrSpace::Host, hva)) => (hva - self.region.as_ptr() as u64) as usize,
            other => panic!("indirect table IOVA {iova:#x} resolves to {other:?}"),
        }
    }

    /// Take every chain the driver made available.
    pub fn take_all(&mut self, tree: &IovaTree) -> usize {
        let idx = self.avail_idx();
        let mut n = 0;
        while self.last_avail != idx {
            let slot = (self.last_avail % self.size) as usize;
            let head: u16 = u16::from_le(self.vs().read_obj(self.avail + 4 + 2 * slot).unwrap());
            assert!(head < self.size, "shadow head {head} out of range");
            let mut segs = Vec::new();
            let d = self.read_desc_at(self.desc + 16 * head as usize);
            let indirect = d.refers_to_indirect_table();
            if indirect {
                assert!(!d.has_next());
                let base = self.host_offset(tree, d.addr().0);
                let n = d.len() as usize / 16;
                let mut i = 0;
                loop {
                    assert!(i < n);
                    let e = self.read_desc_at(base + 16 * i);
                    segs.push((e.addr().0, e.len(), e.is_write_only()));
                    if !e.has_next() {
                        break;
                    }
                    i = e.next() as usize;
                }
            } else {
                let mut cur = d;
                loop {
                    segs.push((cur.addr().0, cur.len(), cur.is_write_only()));
                    if !cur.has_next() {
                        break;
                    }
                    assert!(segs.len() <= self.size as usize, "shadow chain loops");
                    cur = self.read_desc_at(self.desc + 16 * cur.next() as usize);
                }
            }
            self.taken.push(Taken {
                head,
                segs,
                indirect,
            });
            self.last_avail = self.last_avail.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// GPA of a guest IOVA.
    pub fn gpa(tree: &IovaTree, iova: u64) -> u64 {
        match tree.reverse(iova) {
            Some((AddrSpace::Guest, gpa)) => gpa,
            other => panic!("buffer IOVA {iova:#x} resolves to {other:?}"),
        }
    }

    /// Complete `taken[i]`, writing `len` bytes (pattern `fill`) into its
    /// writable segments.
    pub fn complete(
        &mut self,
        i: usize,
        len: u32,
        fill: u8,
        mem: &GuestMemoryMmap,
        tree: &IovaTree,
    ) -> Taken {
        let t = self.taken.remove(i);
        let mut left = len as u64;
        for &(iova, l, w) in &t.segs {
            if !w || left == 0 {
                continue;
            }
            let n = left.min(l as u64);
            let gpa = Self::gpa(tree, iova);
            mem.write_slice(&vec![fill; n as usize], GuestAddress(gpa))
                .unwrap();
            self.written.push((gpa, n));
            left -= n;
        }
        self.push_used(t.head as u32, len);
        t
    }

    /// Write a raw used entry (for adversarial tests too).
    pub fn push_used(&mut self, id: u32, len: u32) {
        let slot = (self.used_idx % self.size) as usize;
        let off = self.used + 4 + 8 * slot;
        self.vs().write_obj(u32::to_le(id), off).unwrap();
        self.vs().write_obj(u32::to_le(len), off + 4).unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
        self.vs()
            .store(u16::to_le(self.used_idx), self.used + 2, Ordering::Release)
            .unwrap();
    }

    /// An IN_ORDER batch: one used entry naming `id`, the last chain of
    /// the batch, written at the used idx, which then moves by `batch`.
    pub fn push_used_batch(&mut self, id: u32, len: u32, batch: u16) {
        let slot = (self.used_idx % self.size) as usize;
        let off = self.used + 4 + 8 * slot;
        self.vs().write_obj(u32::to_le(id), off).unwrap();
        self.vs().write_obj(u32::to_le(len), off + 4).unwrap();
        self.used_idx = self.used_idx.wrapping_add(batch);
        self.vs()
            .store(u16::to_le(self.used_idx), self.used + 2, Ordering::Release)
            .unwrap();
    }
}

/// A device processing the guest ring directly (passthrough mode), built on
/// virtio-queue's own queue. Completes every chain with all its writable
/// bytes.
pub struct PassthroughDevice {
    pub queue: Queue,
    /// Used positions it wrote (not logged by the SVQ).
    pub used_positions: Vec<u16>,
}

impl PassthroughDevice {
    pub fn new(q: u16, avail: u16, used: u16) -> Self {
        let mut queue = Queue::new(q).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(DESC_GPA))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL_GPA))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(USED_GPA))
            .unwrap();
        queue.set_next_avail(avail);
        queue.set_next_used(used);
        queue.set_ready(true);
        PassthroughDevice {
            queue,
            used_positions: Vec::new(),
        }
    }

    /// Process everything available: returns (head, len) completed.
    pub fn run(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut done = Vec::new();
        while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len: u32 = chain
                .clone()
                .filter(|d| d.is_write_only())
                .map(|d| d.len())
                .sum();
            done.push((head, len));
        }
        for &(head, len) in &done {
            self.used_positions.push(self.queue.next_used());
            self.queue.add_used(mem, head, len).unwrap();
        }
        done
    }

    pub fn indexes(&self) -> crate::RingIndexes {
        crate::RingIndexes {
            avail: self.queue.next_avail(),
            used: self.queue.next_used(),
        }
    }
}
