//! Relay cost: the same guest driver and the same software NIC, once with the
//! device on the guest's rings (passthrough) and once through shadow
//! virtqueues run by the daemon's own worker thread (shadow); each with
//! split rings and with packed rings (the guest, the shadow rings and the
//! software NIC all packed: `passthrough-packed`, `shadow-packed`).
//!
//! Everything is event driven as in production: the driver kicks eventfds and
//! sleeps in poll() on its call eventfds; the sim device and the worker wake on
//! theirs. Criterion reports each mode; the README quotes shadow/passthrough
//! ratios measured in the same run.

use std::sync::Arc;
use std::time::Duration;

use backends::sim::{SimConfig, SimNet};
use backends::{DeviceBackend, DmaRegion, VringAddrs};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iova::{AddrSpace, IovaTree};
use svq::{GuestRing, RingIndexes, ShadowVirtqueue, SvqConfig};
use svq_relay::stats::QueueStats;
use svq_relay::worker::{Attach, WorkerHandle};
use virtio_features::{status, F_RING_PACKED, F_VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use testkit::mem::GuestMem;
use testkit::packed_ring::PackedRing;
use testkit::ring::{Seg, SplitRing, Used};

const QSIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const HDR: u32 = 12;
const RX_BUF: u32 = 2048;
const FEATURES: u64 = F_VERSION_1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Passthrough,
    Shadow,
    PassthroughPacked,
    ShadowPacked,
}

impl Mode {
    const ALL: [Mode; 4] = [
        Mode::Passthrough,
        Mode::Shadow,
        Mode::PassthroughPacked,
        Mode::ShadowPacked,
    ];

    fn packed(self) -> bool {
        matches!(self, Mode::PassthroughPacked | Mode::ShadowPacked)
    }

    fn shadow(self) -> bool {
        matches!(self, Mode::Shadow | Mode::ShadowPacked)
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Passthrough => "passthrough",
            Mode::Shadow => "shadow",
            Mode::PassthroughPacked => "passthrough-packed",
            Mode::ShadowPacked => "shadow-packed",
        }
    }

    fn features(self) -> u64 {
        if self.packed() {
            FEATURES | F_RING_PACKED
        } else {
            FEATURES
        }
    }
}

/// The guest driver's ring: the workspace's split or packed test driver.
enum DriverRing {
    Split(SplitRing),
    Packed(PackedRing),
}

impl DriverRing {
    /// (desc, avail / driver area, used / device area).
    fn addrs(&self) -> (u64, u64, u64) {
        match self {
            DriverRing::Split(r) => (r.desc.0, r.avail.0, r.used.0),
            DriverRing::Packed(r) => (r.desc.0, r.driver.0, r.device.0),
        }
    }

    fn add(&mut self, seg: Seg, tag: u64) {
        match self {
            DriverRing::Split(r) => r.add(&[seg], tag),
            DriverRing::Packed(r) => r.add(&[seg], tag),
        }
        .expect("descriptor free");
    }

    /// Makes the added chains visible (a packed ring's are already).
    fn publish(&mut self) {
        if let DriverRing::Split(r) = self {
            r.publish();
        }
    }

    fn pop_used(&mut self) -> Vec<Used> {
        match self {
            DriverRing::Split(r) => r.pop_used().expect("valid used ring"),
            DriverRing::Packed(r) => r.pop_used().expect("valid used ring"),
        }
    }
}

/// One guest with one queue pair on a loopback sim, in one mode.
struct Rig {
    _guest: GuestMem,
    rings: [DriverRing; 2],
    kicks: [Arc<EventFd>; 2],
    calls: [Arc<EventFd>; 2],
    tx_buf: GuestAddress,
    rx_bufs: Vec<GuestAddress>,
    // Dropped last: the worker and the device still reference the memory.
    _worker: Option<WorkerHandle>,
    _device: SimNet,
}

fn eventfd() -> Arc<EventFd> {
    Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))
}

impl Rig {
    fn new(mode: Mode) -> Rig {
        let mut guest = GuestMem::new(16 << 20);
        let mut device = SimNet::new(SimConfig::default()).expect("sim");
        let range = device.iova_range();
        let mut tree = IovaTree::new(range.first, range.last).expect("iova window");
        let region = guest.mem.find_region(GuestAddress(0)).expect("region");
        let gm = tree
            .map(AddrSpace::Guest, 0, guest.size)
            .expect("map guest");
        device
            .dma_map(DmaRegion {
                iova: gm.iova,
                memory: region.get_mmap(),
                readonly: false,
            })
            .expect("dma map guest");
        let st = status::ACKNOWLEDGE | status::DRIVER;
        device.set_status(st).unwrap();
        device.set_features(mode.features()).unwrap();
        let st = st | status::FEATURES_OK;
        device.set_status(st).unwrap();

        let rings = [0, 1].map(|_| {
            if mode.packed() {
                let (d, dr, dv) = testkit::packed_ring::packed_ring_bytes(QSIZE);
                let desc = guest.alloc(d, 4096);
                let driver = guest.alloc(dr, 64);
                let device = guest.alloc(dv, 64);
                DriverRing::Packed(PackedRing::new(&guest.mem, QSIZE, desc, driver, device))
            } else {
                let (d, a, u) = testkit::ring::ring_bytes(QSIZE);
                let desc = guest.alloc(d, 4096);
                let avail = guest.alloc(a, 4096);
                let used = guest.alloc(u, 4096);
                DriverRing::Split(SplitRing::new(&guest.mem, QSIZE, desc, avail, used))
            }
        });
        // Where a ring starts: index 0 (split), or position 0 with both wrap
        // counters 1 (packed).
        let start: u16 = if mode.packed() { 0x8000 } else { 0 };
        let set_base = |device: &mut SimNet, q: usize| {
            if mode.packed() {
                device.set_vring_base_packed(q, 0x8000_8000).unwrap();
            } else {
                device.set_vring_base(q, 0).unwrap();
            }
        };
        let kicks = [eventfd(), eventfd()];
        let calls = [eventfd(), eventfd()];
        let tx_buf = guest.alloc(2048, 64);
        let rx_bufs = (0..QSIZE).map(|_| guest.alloc(RX_BUF as u64, 64)).collect();
        let packet = vec![0x5au8; 1514];
        guest.mem.write_slice(&packet, tx_buf).unwrap();

        let mem = Arc::new(guest.mem.clone());
        let worker = if !mode.shadow() {
            for q in [RX, TX] {
                let (desc, avail, used) = rings[q].addrs();
                device.set_vring_num(q, QSIZE).unwrap();
                device
                    .set_vring_addr(q, VringAddrs { desc, avail, used })
                    .unwrap();
                set_base(&mut device, q);
                device.set_vring_kick(q, kicks[q].clone()).unwrap();
                device.set_vring_call(q, Some(calls[q].clone())).unwrap();
            }
            None
        } else {
            let worker = WorkerHandle::spawn(0).expect("worker");
            let mut svqs = Vec::new();
            for q in [RX, TX] {
                let (desc, avail, used) = rings[q].addrs();
                let cfg = SvqConfig {
                    queue_size: QSIZE,
                    shadow_size: QSIZE,
                    guest_features: mode.features(),
                    device_features: mode.features(),
                };
                let gring = GuestRing {
                    desc,
                    avail,
                    used,
                    used_log: used,
                };
                let at = RingIndexes {
                    avail: start,
                    used: start,
                };
                let svq = ShadowVirtqueue::new(cfg, gring, at).expect("svq");
                let shadow = svq.shadow_memory();
                let m = tree
                    .map(
                        AddrSpace::Host,
                        shadow.as_ptr() as u64,
                        shadow.size() as u64,
                    )
                    .expect("map shadow");
                device
                    .dma_map(DmaRegion {
                        iova: m.iova,
                        memory: shadow,
                        readonly: false,
                    })
                    .expect("dma map shadow");
                let hva = svq.shadow_ring_hva();
                let iova = |a| {
                    tree.translate_contiguous(AddrSpace::Host, a, 1)
                        .expect("shadow ring mapped")
                };
                let (dev_kick, dev_call) = (eventfd(), eventfd());
                device.set_vring_num(q, QSIZE).unwrap();
                device
                    .set_vring_addr(
                        q,
                        VringAddrs {
                            desc: iova(hva.desc),
                            avail: iova(hva.avail),
                            used: iova(hva.used),
                        },
                    )
                    .unwrap();
                set_base(&mut device, q);
                device.set_vring_kick(q, dev_kick.clone()).unwrap();
                device.set_vring_call(q, Some(dev_call.clone())).unwrap();
                svqs.push((q, svq, dev_kick, dev_call));
            }
            let tree = Arc::new(tree);
            for (q, svq, dev_kick, dev_call) in svqs {
                worker
                    .attach(Attach {
                        queue: q,
                        svq: Box::new(svq),
                        guest_kick: kicks[q].clone(),
                        guest_call: Some(calls[q].clone()),
                        dev_kick,
                        dev_call,
                        mem: mem.clone(),
                        tree: tree.clone(),
                        stats: Arc::new(QueueStats::default()),
                    })
                    .expect("attach");
            }
            Some(worker)
        };
        for q in [RX, TX] {
            device.set_vring_enable(q, true).unwrap();
        }
        device.set_status(st | status::DRIVER_OK).unwrap();
        Rig {
            _guest: guest,
            rings,
            kicks,
            calls,
            tx_buf,
            rx_bufs,
            _worker: worker,
            _device: device,
        }
    }

    /// Send `batch` packets of `len` bytes (header included) through the
    /// loopback and wait until every RX and TX buffer came back used.
    fn round_trip(&mut self, batch: usize, len: u32) {
        for i in 0..batch {
            let rx = self.rx_bufs[i];
            let [rx_ring, tx_ring] = &mut self.rings;
            rx_ring.add(
                Seg {
                    addr: rx,
                    len: RX_BUF,
                    write: true,
                },
                i as u64,
            );
            tx_ring.add(
                Seg {
                    addr: self.tx_buf,
                    len: len.max(HDR),
                    write: false,
                },
                i as u64,
            );
        }
        for q in [RX, TX] {
            self.rings[q].publish();
            self.kicks[q].write(1).unwrap();
        }
        let mut done = [0usize; 2];
        let fds = [
            std::os::fd::AsRawFd::as_raw_fd(self.calls[RX].as_ref()),
            std::os::fd::AsRawFd::as_raw_fd(self.calls[TX].as_ref()),
        ];
        while done[RX] < batch || done[TX] < batch {
            for q in [RX, TX] {
                done[q] += self.rings[q].pop_used().len();
            }
            if done[RX] < batch || done[TX] < batch {
                // Bounded: a lost interrupt shows as a stall, not a hang.
                let woke = testkit::ring::wait_eventfds(&fds, 2000);
                assert!(woke.iter().any(|w| *w) || self.progress(), "relay stalled");
            }
        }
    }

    /// A used entry the driver has not taken yet (an interrupt may have
    /// been suppressed while the driver was reading the ring).
    fn progress(&self) -> bool {
        self.rings.iter().any(|r| match r {
            DriverRing::Split(r) => r.device_used_idx() != r.last_used,
            DriverRing::Packed(r) => r.used_ready(),
        })
    }
}

fn latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("relay_latency");
    for len in [64u32, 1500] {
        for mode in Mode::ALL {
            let mut rig = Rig::new(mode);
            group.bench_with_input(BenchmarkId::new(mode.name(), len), &len, |b, &len| {
                b.iter(|| rig.round_trip(1, len + HDR))
            });
        }
    }
    group.finish();
}

fn throughput(c: &mut Criterion) {
    const BATCH: usize = 32;
    let mut group = c.benchmark_group("relay_throughput");
    // Descriptors relayed per iteration: BATCH TX plus BATCH RX chains.
    group.throughput(Throughput::Elements(2 * BATCH as u64));
    for mode in Mode::ALL {
        let mut rig = Rig::new(mode);
        group.bench_function(BenchmarkId::new(mode.name(), BATCH), |b| {
            b.iter(|| rig.round_trip(BATCH, 64 + HDR))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4));
    targets = latency, throughput
}
criterion_main!(benches);
