//! A small virtio-net *driver* for testing the sim: split rings built by hand
//! in a memfd-backed region that is dma-mapped into the sim's IOVA space.
#![allow(dead_code)]

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::sim::{SimConfig, SimMode, SimNet};
use backends::{DeviceBackend, DmaRegion, VringAddrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// Each test binary that includes this module uses some of these.
#[allow(unused_imports)]
pub use virtio_features::{
    F_VERSION_1, NET_F_MQ as F_MQ, NET_F_MRG_RXBUF as F_MRG_RXBUF, RING_F_EVENT_IDX as F_EVENT_IDX,
    RING_F_INDIRECT_DESC as F_INDIRECT,
};

#[allow(unused_imports)]
pub use testkit::ring::{need_event, SplitRing, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

pub const HDR: usize = 12;
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the test memory sits in the device's IOVA space.
pub const IOVA_BASE: u64 = 0x4000_0000;
/// Each queue gets this much memory: ring at the start, buffers after.
pub const QUEUE_AREA: u64 = 0x10_0000;
const BUF_OFFSET: u64 = 0x1_0000;

pub fn memfd_region(size: usize) -> Arc<MmapRegion> {
    Arc::new(hostmem::memfd_region(c"sim-test", size).unwrap())
}

/// The driver's view of test memory: same addresses as the device's IOVAs.
pub fn driver_view(region: &Arc<MmapRegion>, iova: u64) -> GuestMemoryMmap {
    let r = GuestRegionMmap::with_arc(Arc::clone(region), GuestAddress(iova)).unwrap();
    GuestMemoryMmap::from_arc_regions(vec![Arc::new(r)]).unwrap()
}

/// One queue of the sim seen from the driver: the workspace's split-ring
/// driver (`testkit::ring::SplitRing`) for the ring layout, with a fixed
/// buffer per descriptor and descriptors handed out round robin, so tests
/// can also write raw (broken) descriptors at known places.
pub struct DriverQueue {
    pub ring: SplitRing,
    pub bufs: u64,
    pub buf_size: u64,
    pub kick: Arc<EventFd>,
    pub call: Arc<EventFd>,
    next_desc: u16,
}

impl DriverQueue {
    /// A ring of `size` at `base`, each descriptor owning a `buf_size` buffer.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16, buf_size: u64) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        assert!(used + 6 + 8 * u64::from(size) < base + BUF_OFFSET);
        assert!(BUF_OFFSET + buf_size * u64::from(size) <= QUEUE_AREA);
        DriverQueue {
            ring: SplitRing::new(
                mem,
                size,
                GuestAddress(desc),
                GuestAddress(avail),
                GuestAddress(used),
            ),
            bufs: base + BUF_OFFSET,
            buf_size,
            kick: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            call: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            next_desc: 0,
        }
    }

    /// A fresh ring in the same place, keeping the eventfds the device has.
    pub fn renew(&mut self) {
        let mut fresh = DriverQueue::new(self.mem(), self.desc(), self.size(), self.buf_size);
        fresh.kick = Arc::clone(&self.kick);
        fresh.call = Arc::clone(&self.call);
        fresh.ring.event_idx = self.ring.event_idx;
        *self = fresh;
    }

    /// The driver's view of the queue's memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.ring.mem()
    }

    pub fn size(&self) -> u16 {
        self.ring.size
    }

    pub fn desc(&self) -> u64 {
        self.ring.desc.0
    }

    pub fn avail(&self) -> u64 {
        self.ring.avail.0
    }

    pub fn used(&self) -> u64 {
        self.ring.used.0
    }

    pub fn addrs(&self) -> VringAddrs {
        VringAddrs {
            desc: self.desc(),
            avail: self.avail(),
            used: self.used(),
        }
    }

    /// Starts the ring at index `base` (as after a hand-over).
    pub fn start_at(&mut self, base: u16) {
        self.ring.start_at(base);
    }

    pub fn buf_addr(&self, desc: u16) -> u64 {
        self.bufs + u64::from(desc) * self.buf_size
    }

    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.ring.write_desc(i, addr, len, flags, next);
    }

    fn alloc(&mut self, n: u16) -> u16 {
        // Descriptors are handed out round-robin; tests never keep more than
        // the ring size in flight.
        let first = self.next_desc;
        self.next_desc = (self.next_desc + n) % self.size();
        assert!(
            first + n <= self.size(),
            "test chain wraps the descriptor table"
        );
        first
    }

    /// A device-readable chain carrying `data`, cut into `segs` descriptors.
    pub fn add_tx(&mut self, data: &[u8], segs: usize) -> u16 {
        let segs = segs.max(1);
        let chunk = data.len().div_ceil(segs).max(1);
        let pieces: Vec<&[u8]> = data.chunks(chunk).collect();
        let n = pieces.len() as u16;
        if n == 0 {
            let head = self.alloc(1);
            self.write_desc(head, self.buf_addr(head), 0, 0, 0);
            return head;
        }
        if self.next_desc + n > self.size() {
            self.next_desc = 0;
        }
        let head = self.alloc(n);
        for (k, p) in pieces.iter().enumerate() {
            let i = head + k as u16;
            assert!(p.len() as u64 <= self.buf_size);
            self.mem()
                .write_slice(p, GuestAddress(self.buf_addr(i)))
                .unwrap();
            let last = k + 1 == pieces.len();
            let flags = if last { 0 } else { DESC_F_NEXT };
            self.write_desc(i, self.buf_addr(i), p.len() as u32, flags, i + 1);
        }
        head
    }

    /// A device-writable chain of `segs` descriptors of `seg_len` bytes each.
    pub fn add_rx(&mut self, segs: u16, seg_len: u32) -> u16 {
        assert!(u64::from(seg_len) <= self.buf_size);
        if self.next_desc + segs > self.size() {
            self.next_desc = 0;
        }
        let head = self.alloc(segs);
        for k in 0..segs {
            let i = head + k;
            let flags = if k + 1 == segs {
                DESC_F_WRITE
            } else {
                DESC_F_WRITE | DESC_F_NEXT
            };
            self.write_desc(i, self.buf_addr(i), seg_len, flags, i + 1);
        }
        head
    }

    /// Puts `head` in the avail ring (not yet visible to the device).
    pub fn push_avail(&mut self, head: u16) {
        self.ring.push_avail_raw(head);
    }

    /// Publishes the avail idx and kicks unless the device said not to
    /// (NO_NOTIFY, or avail_event under EVENT_IDX; `old` is the avail idx
    /// at the last publish). Returns whether it kicked.
    pub fn publish(&mut self, old: u16) -> bool {
        self.ring.publish();
        let kick = if self.ring.event_idx {
            need_event(self.ring.avail_event(), self.ring.avail_idx, old)
        } else {
            self.ring.used_flags() & 1 == 0
        };
        if kick {
            self.kick.write(1).unwrap();
        }
        kick
    }

    /// push_avail + publish for each head.
    pub fn submit(&mut self, heads: &[u16]) {
        let old = self.ring.avail_idx;
        for &h in heads {
            self.push_avail(h);
        }
        self.publish(old);
    }

    pub fn used_idx(&self) -> u16 {
        self.ring.device_used_idx()
    }

    /// Waits (bounded) until the device has published `count` new used
    /// entries, and returns them as (id, len).
    pub fn wait_used(&mut self, count: u16) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + TIMEOUT;
        while self.used_idx().wrapping_sub(self.ring.last_used) < count {
            assert!(
                Instant::now() < deadline,
                "timeout: {} of {count} used entries",
                self.used_idx().wrapping_sub(self.ring.last_used)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        self.take_used(count)
    }

    /// Up to `max` used entries published and not yet taken.
    pub fn take_used(&mut self, max: u16) -> Vec<(u16, u32)> {
        self.ring.take_used_raw(max)
    }

    /// Reads `len` bytes written into the chain starting at `head` (the
    /// chains built by `add_rx` are contiguous descriptors).
    pub fn read_rx(&self, head: u16, len: u32, seg_len: u32) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let mut off = 0usize;
        let mut i = head;
        while off < out.len() {
            let n = (seg_len as usize).min(out.len() - off);
            self.mem()
                .read_slice(&mut out[off..off + n], GuestAddress(self.buf_addr(i)))
                .unwrap();
            off += n;
            i += 1;
        }
        out
    }

    pub fn set_used_event(&self, v: u16) {
        self.ring.set_used_event(v);
    }

    pub fn set_no_interrupt(&self, on: bool) {
        self.ring.set_avail_flags(u16::from(on));
    }

    /// Consumes and returns whether the call eventfd was signalled.
    pub fn called(&self) -> bool {
        self.call.read().is_ok()
    }

    /// `publish` honours EVENT_IDX; kept outside the constructor so tests
    /// can flip it after negotiation.
    pub fn with_event_idx(mut self, on: bool) -> Self {
        self.ring.event_idx = on;
        self
    }
}

/// A sim with `features` negotiated (FEATURES_OK, no DRIVER_OK yet) and a
/// queue area per queue mapped at [`IOVA_BASE`]; the region and the
/// driver's view of it.
pub fn negotiated_sim(
    pairs: u16,
    features: u64,
    mode: SimMode,
) -> (SimNet, Arc<MmapRegion>, GuestMemoryMmap) {
    let mut sim = SimNet::new(SimConfig {
        queue_pairs: pairs,
        mode,
        ..SimConfig::default()
    })
    .unwrap();
    assert_eq!(
        sim.device_features() & features,
        features,
        "feature not offered"
    );
    sim.set_features(features).unwrap();
    sim.set_status(1 | 2 | 8).unwrap();
    let region = memfd_region(QUEUE_AREA as usize * 2 * usize::from(pairs));
    sim.dma_map(DmaRegion {
        iova: IOVA_BASE,
        memory: Arc::clone(&region),
        readonly: false,
    })
    .unwrap();
    let mem = driver_view(&region, IOVA_BASE);
    (sim, region, mem)
}

pub struct Rig {
    pub sim: SimNet,
    pub region: Arc<MmapRegion>,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<DriverQueue>,
    pub features: u64,
}

pub const BUF: u64 = 2048;

impl Rig {
    pub fn new(pairs: u16, features: u64, qsize: u16) -> Rig {
        Self::with_mode(pairs, features, qsize, SimMode::Loopback)
    }

    pub fn with_mode(pairs: u16, features: u64, qsize: u16, mode: SimMode) -> Rig {
        let (mut sim, region, mem) = negotiated_sim(pairs, features, mode);
        let nq = 2 * usize::from(pairs);
        let mut queues = Vec::new();
        for q in 0..nq {
            let dq = DriverQueue::new(&mem, IOVA_BASE + q as u64 * QUEUE_AREA, qsize, BUF)
                .with_event_idx(features & F_EVENT_IDX != 0);
            sim.set_vring_num(q, qsize).unwrap();
            sim.set_vring_addr(q, dq.addrs()).unwrap();
            sim.set_vring_base(q, 0).unwrap();
            sim.set_vring_kick(q, Arc::clone(&dq.kick)).unwrap();
            sim.set_vring_call(q, Some(Arc::clone(&dq.call))).unwrap();
            sim.set_vring_enable(q, true).unwrap();
            queues.push(dq);
        }
        sim.set_status(1 | 2 | 8 | 4).unwrap();
        Rig {
            sim,
            region,
            mem,
            queues,
            features,
        }
    }

    /// Waits until the sim finished the round it may be in: every control
    /// operation takes the pair's lock, which a worker holds for a whole round.
    pub fn sync(&mut self, queue: usize) {
        self.sim.vring_base(queue).unwrap();
    }
}

/// A test packet: a 12-byte virtio-net header (num_buffers 0) + a frame of
/// `len` bytes whose content depends on `seed`.
pub fn packet(len: usize, seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; HDR + len];
    for (i, b) in p[HDR..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    p
}

/// What the RX side must see for `pkt`: the same bytes with num_buffers set.
pub fn expected_rx(pkt: &[u8], num_buffers: u16) -> Vec<u8> {
    let mut e = pkt.to_vec();
    e[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    e
}

/// Compares packet bytes, reporting the first difference instead of dumping
/// kilobytes.
#[track_caller]
pub fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: byte {i} is {:#x}, expected {:#x}", got[i], want[i]);
    }
}

pub fn raw_fd(fd: &EventFd) -> i32 {
    fd.as_raw_fd()
}
