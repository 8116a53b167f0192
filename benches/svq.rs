//! The SVQ's own cost per descriptor, without threads, eventfds or a real
//! device: a guest driver posts chains of one 64-byte writable buffer, and a
//! fake device completes them, either
//!
//! * `direct`: the device works on the guest ring itself (the baseline), or
//! * `shadow`: guest ring → `handle_guest_kick` → shadow ring → the device →
//!   `handle_device_call` → guest used ring, with a dirty log that counts.
//!
//! Both run the same driver and the same device code, so `shadow - direct`
//! is what the SVQ adds. Each runs on split rings and on packed rings
//! (`direct-packed`, `shadow-packed`: a packed guest ring relayed to a
//! packed shadow ring). After criterion's own report the bench times the
//! loops again, interleaved, and prints the differences and ratios.
//!
//! For deterministic instruction counts (the machine is shared and noisy):
//!
//! ```text
//! SVQ_BENCH_ROUNDS=20000 SVQ_BENCH_MODE=shadow SVQ_BENCH_BATCH=32 \   # or shadow-packed
//!   valgrind --tool=callgrind --toggle-collect='*handle_guest_kick*' \
//!   --toggle-collect='*handle_device_call*' target/release/deps/svq-HASH
//! ```
//!
//! runs a fixed number of rounds of one mode and exits without criterion.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use iova::{AddrSpace, IovaTree};
use svq::{GuestRing, RingIndexes, ShadowVirtqueue, SvqConfig};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, MmapRegion, VolatileMemory,
    VolatileSlice,
};

const QSIZE: u16 = 256;
const BUF_LEN: u32 = 64;
const DESC_GPA: u64 = 0x0;
const AVAIL_GPA: u64 = 0x1000;
const USED_GPA: u64 = 0x2000;
const BUF_GPA: u64 = 0x1_0000;
const MEM_SIZE: usize = 4 << 20;
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;
const F_RING_PACKED: u64 = 1 << VIRTIO_F_RING_PACKED;
const PACKED_AVAIL: u16 = 1 << 7;
const PACKED_USED: u16 = 1 << 15;

/// The two ends of a ring layout.
trait Layout {
    const FEATURES: u64;
    type Driver: RingDriver;
    type Device: RingDevice;
}

trait RingDriver {
    fn new(ring: RingAt) -> Self;
    fn add(&mut self, m: &VolatileSlice<()>, n: usize);
    fn collect(&mut self, m: &VolatileSlice<()>) -> u64;
}

trait RingDevice {
    fn new(ring: RingAt) -> Self;
    fn run(&mut self, m: &VolatileSlice<()>) -> usize;
}

struct Split;
impl Layout for Split {
    const FEATURES: u64 = FEATURES;
    type Driver = Driver;
    type Device = Device;
}

struct Packed;
impl Layout for Packed {
    const FEATURES: u64 = FEATURES | F_RING_PACKED;
    type Driver = PackedDriver;
    type Device = PackedDevice;
}

/// A packed ring position and its wrap counter.
#[derive(Clone, Copy)]
struct Pos {
    pos: u16,
    wrap: bool,
}

impl Pos {
    fn start() -> Self {
        Pos { pos: 0, wrap: true }
    }

    fn next(&mut self, size: u16) {
        self.pos += 1;
        if self.pos == size {
            self.pos = 0;
            self.wrap = !self.wrap;
        }
    }

    fn avail_flags(self) -> u16 {
        if self.wrap {
            PACKED_AVAIL
        } else {
            PACKED_USED
        }
    }

    fn used_flags(self) -> u16 {
        if self.wrap {
            PACKED_AVAIL | PACKED_USED
        } else {
            0
        }
    }
}

/// The guest's packed driver: one descriptor per chain, id = position.
struct PackedDriver {
    ring: RingAt,
    avail: Pos,
    used: Pos,
}

impl RingDriver for PackedDriver {
    fn new(ring: RingAt) -> Self {
        PackedDriver {
            ring,
            avail: Pos::start(),
            used: Pos::start(),
        }
    }

    fn add(&mut self, m: &VolatileSlice<()>, n: usize) {
        let r = self.ring;
        for _ in 0..n {
            let p = self.avail;
            let d = r.desc + 16 * p.pos as usize;
            let addr = BUF_GPA + p.pos as u64 * 0x800;
            m.store(addr.to_le(), d, Ordering::Relaxed).unwrap();
            m.store(BUF_LEN.to_le(), d + 8, Ordering::Relaxed).unwrap();
            m.store(p.pos.to_le(), d + 12, Ordering::Relaxed).unwrap();
            let flags = VRING_DESC_F_WRITE as u16 | p.avail_flags();
            m.store(flags.to_le(), d + 14, Ordering::Release).unwrap();
            self.avail.next(r.size);
        }
    }

    fn collect(&mut self, m: &VolatileSlice<()>) -> u64 {
        let r = self.ring;
        let mut bytes = 0u64;
        loop {
            let d = r.desc + 16 * self.used.pos as usize;
            let flags = u16::from_le(m.load(d + 14, Ordering::Acquire).unwrap());
            if flags & (PACKED_AVAIL | PACKED_USED) != self.used.used_flags() {
                return bytes;
            }
            let id = u16::from_le(m.load(d + 12, Ordering::Relaxed).unwrap());
            assert!(id < r.size, "bad used id {id}");
            bytes += u32::from_le(m.load(d + 8, Ordering::Relaxed).unwrap()) as u64;
            self.used.next(r.size);
        }
    }
}

/// A packed device completing every chain of one descriptor with all its
/// bytes, in order.
struct PackedDevice {
    ring: RingAt,
    avail: Pos,
    used: Pos,
}

impl RingDevice for PackedDevice {
    fn new(ring: RingAt) -> Self {
        PackedDevice {
            ring,
            avail: Pos::start(),
            used: Pos::start(),
        }
    }

    fn run(&mut self, m: &VolatileSlice<()>) -> usize {
        let r = self.ring;
        let mut n = 0;
        loop {
            let d = r.desc + 16 * self.avail.pos as usize;
            let flags = u16::from_le(m.load(d + 14, Ordering::Acquire).unwrap());
            if flags & (PACKED_AVAIL | PACKED_USED) != self.avail.avail_flags() {
                return n;
            }
            let len = u32::from_le(m.load(d + 8, Ordering::Relaxed).unwrap());
            let id = u16::from_le(m.load(d + 12, Ordering::Relaxed).unwrap());
            let u = r.desc + 16 * self.used.pos as usize;
            m.store(len.to_le(), u + 8, Ordering::Relaxed).unwrap();
            m.store(id.to_le(), u + 12, Ordering::Relaxed).unwrap();
            m.store(self.used.used_flags().to_le(), u + 14, Ordering::Release)
                .unwrap();
            self.avail.next(r.size);
            self.used.next(r.size);
            n += 1;
        }
    }
}

/// Offsets of a split ring inside one volatile slice.
#[derive(Clone, Copy)]
struct RingAt {
    desc: usize,
    avail: usize,
    used: usize,
    size: u16,
}

/// The guest's driver: one descriptor per chain, head = avail slot.
struct Driver {
    ring: RingAt,
    avail_idx: u16,
    last_used: u16,
}

impl RingDriver for Driver {
    fn new(ring: RingAt) -> Self {
        Driver {
            ring,
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn add(&mut self, m: &VolatileSlice<()>, n: usize) {
        let r = self.ring;
        for _ in 0..n {
            let head = self.avail_idx % r.size;
            let d = r.desc + 16 * head as usize;
            let addr = BUF_GPA + head as u64 * 0x800;
            m.store(addr.to_le(), d, Ordering::Relaxed).unwrap();
            m.store(BUF_LEN.to_le(), d + 8, Ordering::Relaxed).unwrap();
            m.store(
                (VRING_DESC_F_WRITE as u16).to_le(),
                d + 12,
                Ordering::Relaxed,
            )
            .unwrap();
            m.store(0u16, d + 14, Ordering::Relaxed).unwrap();
            m.store(
                head.to_le(),
                r.avail + 4 + 2 * head as usize,
                Ordering::Relaxed,
            )
            .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        m.store(self.avail_idx.to_le(), r.avail + 2, Ordering::Release)
            .unwrap();
    }

    /// Reclaim used entries; returns the bytes the device reported.
    fn collect(&mut self, m: &VolatileSlice<()>) -> u64 {
        let r = self.ring;
        let idx = u16::from_le(m.load(r.used + 2, Ordering::Acquire).unwrap());
        let mut bytes = 0u64;
        while self.last_used != idx {
            let e = r.used + 4 + 8 * (self.last_used % r.size) as usize;
            let id = u32::from_le(m.load(e, Ordering::Relaxed).unwrap());
            let len = u32::from_le(m.load(e + 4, Ordering::Relaxed).unwrap());
            assert!(id < r.size as u32, "bad used id {id}");
            bytes += len as u64;
            self.last_used = self.last_used.wrapping_add(1);
        }
        bytes
    }
}

/// A device completing every chain with all its writable bytes, without
/// touching the buffers (neither mode pays for data).
struct Device {
    ring: RingAt,
    last_avail: u16,
    used_idx: u16,
}

impl RingDevice for Device {
    fn new(ring: RingAt) -> Self {
        Device {
            ring,
            last_avail: 0,
            used_idx: 0,
        }
    }

    fn run(&mut self, m: &VolatileSlice<()>) -> usize {
        let r = self.ring;
        let idx = u16::from_le(m.load(r.avail + 2, Ordering::Acquire).unwrap());
        let mut n = 0;
        while self.last_avail != idx {
            let slot = r.avail + 4 + 2 * (self.last_avail % r.size) as usize;
            let head = u16::from_le(m.load(slot, Ordering::Relaxed).unwrap());
            let mut i = head;
            let mut len = 0u32;
            loop {
                let d = r.desc + 16 * (i % r.size) as usize;
                let dl = u32::from_le(m.load(d + 8, Ordering::Relaxed).unwrap());
                let flags = u16::from_le(m.load(d + 12, Ordering::Relaxed).unwrap());
                if flags & VRING_DESC_F_WRITE as u16 != 0 {
                    len += dl;
                }
                if flags & VRING_DESC_F_NEXT as u16 == 0 {
                    break;
                }
                i = u16::from_le(m.load(d + 14, Ordering::Relaxed).unwrap());
            }
            let e = r.used + 4 + 8 * (self.used_idx % r.size) as usize;
            m.store((head as u32).to_le(), e, Ordering::Relaxed)
                .unwrap();
            m.store(len.to_le(), e + 4, Ordering::Relaxed).unwrap();
            self.used_idx = self.used_idx.wrapping_add(1);
            self.last_avail = self.last_avail.wrapping_add(1);
            n += 1;
        }
        m.store(self.used_idx.to_le(), r.used + 2, Ordering::Release)
            .unwrap();
        n
    }
}

fn guest_ring_at() -> RingAt {
    RingAt {
        desc: DESC_GPA as usize,
        avail: AVAIL_GPA as usize,
        used: USED_GPA as usize,
        size: QSIZE,
    }
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

fn guest_slice(mem: &GuestMemoryMmap) -> VolatileSlice<'_, ()> {
    mem.get_slice(GuestAddress(0), 0x3000)
        .expect("rings in one region")
}

/// Driver and device on the guest ring, no SVQ.
struct Direct<L: Layout> {
    mem: GuestMemoryMmap,
    drv: L::Driver,
    dev: L::Device,
}

impl<L: Layout> Direct<L> {
    fn new() -> Self {
        Direct {
            mem: guest_memory(),
            drv: L::Driver::new(guest_ring_at()),
            dev: L::Device::new(guest_ring_at()),
        }
    }

    fn round(&mut self, batch: usize) {
        let m = guest_slice(&self.mem);
        self.drv.add(&m, batch);
        let n = self.dev.run(&m);
        let bytes = self.drv.collect(&m);
        debug_assert_eq!((n, bytes), (batch, batch as u64 * BUF_LEN as u64));
        black_box(bytes);
    }
}

/// The same driver and device with an SVQ between them.
struct Shadow<L: Layout> {
    mem: GuestMemoryMmap,
    tree: IovaTree,
    svq: ShadowVirtqueue,
    shadow: std::sync::Arc<MmapRegion>,
    drv: L::Driver,
    dev: L::Device,
    marked: Cell<u64>,
}

impl<L: Layout> Shadow<L> {
    fn new() -> Self {
        let mem = guest_memory();
        // IOVA != GPA, as behind a vDPA device with a high window.
        let mut tree = IovaTree::new(1 << 32, (1 << 40) - 1).expect("window");
        tree.map(AddrSpace::Guest, 0, MEM_SIZE as u64)
            .expect("map guest");
        let cfg = SvqConfig {
            queue_size: QSIZE,
            shadow_size: QSIZE,
            guest_features: L::FEATURES,
            device_features: L::FEATURES,
        };
        let ring = GuestRing {
            desc: DESC_GPA,
            avail: AVAIL_GPA,
            used: USED_GPA,
            used_log: USED_GPA,
        };
        let svq = ShadowVirtqueue::new(cfg, ring, RingIndexes::default()).expect("svq");
        let shadow = svq.shadow_memory();
        let base = shadow.as_ptr() as u64;
        tree.map(AddrSpace::Host, base, shadow.size() as u64)
            .expect("map shadow");
        let hva = svq.shadow_ring_hva();
        let dev = L::Device::new(RingAt {
            desc: (hva.desc - base) as usize,
            avail: (hva.avail - base) as usize,
            used: (hva.used - base) as usize,
            size: QSIZE,
        });
        Shadow {
            mem,
            tree,
            svq,
            shadow,
            drv: L::Driver::new(guest_ring_at()),
            dev,
            marked: Cell::new(0),
        }
    }

    fn round(&mut self, batch: usize) {
        let g = guest_slice(&self.mem);
        self.drv.add(&g, batch);
        let kick = self
            .svq
            .handle_guest_kick(&self.mem, &self.tree)
            .expect("kick");
        debug_assert!(kick);
        let n = self.dev.run(&self.shadow.as_volatile_slice());
        let log = |_gpa: u64, len: u64| self.marked.set(self.marked.get() + len);
        let out = self
            .svq
            .handle_device_call(&self.mem, &self.tree, &log)
            .expect("call");
        debug_assert!(out.notify_guest && !out.kick_device);
        let bytes = self.drv.collect(&g);
        debug_assert_eq!((n, bytes), (batch, batch as u64 * BUF_LEN as u64));
        black_box(bytes);
    }
}

/// ns per descriptor of `rounds` rounds.
fn time_rounds(rounds: u32, batch: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for _ in 0..rounds {
        f(batch);
    }
    t.elapsed().as_nanos() as f64 / (rounds as f64 * batch as f64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Interleaved direct/shadow timings; prints the SVQ's added cost.
fn added_cost() {
    added_cost_of::<Split>("split");
    added_cost_of::<Packed>("packed");
}

fn added_cost_of<L: Layout>(layout: &str) {
    for batch in [1usize, 32] {
        let (mut d, mut s) = (Direct::<L>::new(), Shadow::<L>::new());
        let rounds = (200_000 / batch) as u32;
        let (mut dv, mut sv) = (Vec::new(), Vec::new());
        for _ in 0..11 {
            dv.push(time_rounds(rounds, batch, |b| d.round(b)));
            sv.push(time_rounds(rounds, batch, |b| s.round(b)));
        }
        // The minimum is the run least disturbed by other load on a shared
        // machine; the median shows how typical that is.
        let (dm, sm) = (median(&mut dv), median(&mut sv));
        let (dn, sn) = (dv[0], sv[0]);
        println!(
            "svq added cost, {layout} rings, batch {batch}: min: direct {dn:.1} ns/desc, shadow {sn:.1} ns/desc, \
             SVQ adds {:.1} ns/desc ({:.2}x); median: direct {dm:.1}, shadow {sm:.1}, \
             SVQ adds {:.1} ns/desc ({:.2}x) (11 interleaved runs)",
            sn - dn,
            sn / dn,
            sm - dm,
            sm / dm
        );
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("svq_handlers");
    for batch in [1usize, 32] {
        group.throughput(Throughput::Elements(batch as u64));
        let mut d = Direct::<Split>::new();
        group.bench_function(BenchmarkId::new("direct", batch), |b| {
            b.iter(|| d.round(batch))
        });
        let mut s = Shadow::<Split>::new();
        group.bench_function(BenchmarkId::new("shadow", batch), |b| {
            b.iter(|| s.round(batch))
        });
        let mut d = Direct::<Packed>::new();
        group.bench_function(BenchmarkId::new("direct-packed", batch), |b| {
            b.iter(|| d.round(batch))
        });
        let mut s = Shadow::<Packed>::new();
        group.bench_function(BenchmarkId::new("shadow-packed", batch), |b| {
            b.iter(|| s.round(batch))
        });
    }
    group.finish();
}

/// Fixed work for callgrind: `SVQ_BENCH_ROUNDS` rounds of `SVQ_BENCH_MODE`
/// (`shadow`, `direct`, `shadow-packed` or `direct-packed`) at
/// `SVQ_BENCH_BATCH` (default 32).
fn fixed_rounds(rounds: u32) {
    let env = |k: &str| std::env::var(k).ok();
    let batch: usize = env("SVQ_BENCH_BATCH")
        .and_then(|b| b.parse().ok())
        .unwrap_or(32);
    match env("SVQ_BENCH_MODE").as_deref() {
        Some("direct") => {
            let mut d = Direct::<Split>::new();
            (0..rounds).for_each(|_| d.round(batch));
        }
        Some("direct-packed") => {
            let mut d = Direct::<Packed>::new();
            (0..rounds).for_each(|_| d.round(batch));
        }
        Some("shadow-packed") => {
            let mut s = Shadow::<Packed>::new();
            (0..rounds).for_each(|_| s.round(batch));
        }
        _ => {
            let mut s = Shadow::<Split>::new();
            (0..rounds).for_each(|_| s.round(batch));
        }
    }
}

fn main() {
    if let Some(rounds) = std::env::var("SVQ_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        fixed_rounds(rounds);
        return;
    }
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    // `cargo bench -- --list` and friends only want criterion's output.
    if !std::env::args().any(|a| a == "--list" || a == "--test") {
        added_cost();
    }
}
