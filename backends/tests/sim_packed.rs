//! The sim as a packed-ring device, driven by the workspace's independent
//! packed driver (`testkit::packed_ring::PackedRing`, written from the spec,
//! Linux's and DPDK's drivers, not from the sim).

mod sim_driver;

use std::sync::Arc;
use std::time::Instant;

use backends::sim::{SimMode, SimNet};
use backends::{DeviceBackend, VringAddrs};
use sim_driver::*;
use testkit::packed_ring::{
    encode_position, PackedRing, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, PACKED_F_AVAIL,
    PACKED_F_USED,
};
use testkit::ring::{Seg, Used, DESC_F_INDIRECT, DESC_F_NEXT};
use virtio_features::F_RING_PACKED;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const RX: usize = 0;
const TX: usize = 1;
/// Buffers of a queue start here inside its area; indirect tables after.
const BUFS: u64 = 0x1_0000;
const TABLES: u64 = 0x8_0000;

struct Queue {
    ring: PackedRing,
    base: u64,
    kick: Arc<EventFd>,
    call: Arc<EventFd>,
}

impl Queue {
    fn addrs(&self) -> VringAddrs {
        VringAddrs {
            desc: self.ring.desc.0,
            avail: self.ring.driver.0,
            used: self.ring.device.0,
        }
    }

    /// The `n`th buffer of this queue (2 KiB each).
    fn buf(&self, n: u64) -> GuestAddress {
        GuestAddress(self.base + BUFS + (n % 128) * BUF)
    }

    fn kick_if_needed(&mut self) {
        if self.ring.kick_needed() {
            self.kick.write(1).unwrap();
        }
    }

    /// Waits (bounded) for `count` used buffers, validated by the driver.
    fn wait_used(&mut self, count: usize) -> Vec<Used> {
        let deadline = Instant::now() + TIMEOUT;
        let mut out = Vec::new();
        while out.len() < count {
            out.extend(
                self.ring
                    .pop_used()
                    .expect("the sim wrote a bad used descriptor"),
            );
            assert!(
                Instant::now() < deadline,
                "timeout: {} of {count} used buffers",
                out.len()
            );
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        assert_eq!(out.len(), count, "more used buffers than chains given");
        out
    }
}

struct PackedRig {
    sim: SimNet,
    _region: Arc<MmapRegion>,
    mem: GuestMemoryMmap,
    q: Vec<Queue>,
}

impl PackedRig {
    fn new(features: u64, size: u16) -> PackedRig {
        let features = features | F_RING_PACKED;
        let (mut sim, region, mem) = negotiated_sim(1, features, SimMode::Loopback);
        let mut q = Vec::new();
        for i in 0..2 {
            let base = IOVA_BASE + i as u64 * QUEUE_AREA;
            let desc = base;
            let driver = desc + 16 * u64::from(size);
            let mut ring = PackedRing::new(
                &mem,
                size,
                GuestAddress(desc),
                GuestAddress(driver),
                GuestAddress(driver + 4),
            );
            ring.event_idx = features & F_EVENT_IDX != 0;
            let queue = Queue {
                ring,
                base,
                kick: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                call: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            };
            sim.set_vring_num(i, size).unwrap();
            sim.set_vring_addr(i, queue.addrs()).unwrap();
            sim.set_vring_base_packed(i, 0x8000_8000).unwrap();
            sim.set_vring_kick(i, Arc::clone(&queue.kick)).unwrap();
            sim.set_vring_call(i, Some(Arc::clone(&queue.call)))
                .unwrap();
            sim.set_vring_enable(i, true).unwrap();
            q.push(queue);
        }
        sim.set_status(1 | 2 | 8 | 4).unwrap();
        PackedRig {
            sim,
            _region: region,
            mem,
            q,
        }
    }

    /// One packet of `len` bytes sent in `tx_segs` descriptors and
    /// received whole in one RX buffer.
    fn echo(&mut self, n: u64, len: usize, tx_segs: usize) {
        let pkt = packet(len, n as u8);
        self.post_rx(n, 1, 2048);
        self.send(n, &pkt, tx_segs, false);
        self.q[TX].wait_used(1);
        let rx = self.q[RX].wait_used(1);
        assert_bytes(
            &self.q[RX].ring.read_written(&rx[0]),
            &expected_rx(&pkt, 1),
            &format!("packet {n}"),
        );
    }

    /// Posts one RX chain of `segs` buffers of `seg_len` bytes.
    fn post_rx(&mut self, n: u64, segs: u64, seg_len: u32) -> u16 {
        let q = &mut self.q[RX];
        let s: Vec<Seg> = (0..segs)
            .map(|k| Seg {
                addr: q.buf(n * 4 + k),
                len: seg_len,
                write: true,
            })
            .collect();
        let id = q.ring.add(&s, n).expect("RX ring full");
        q.kick_if_needed();
        id
    }

    /// Sends `pkt` on TX cut into `segs` descriptors, as an indirect table
    /// when `indirect`.
    fn send(&mut self, n: u64, pkt: &[u8], segs: usize, indirect: bool) -> u16 {
        let q = &mut self.q[TX];
        let chunk = pkt.len().div_ceil(segs);
        let s: Vec<Seg> = pkt
            .chunks(chunk)
            .enumerate()
            .map(|(k, piece)| {
                let addr = q.buf(n * 4 + k as u64);
                self.mem.write_slice(piece, addr).unwrap();
                Seg {
                    addr,
                    len: piece.len() as u32,
                    write: false,
                }
            })
            .collect();
        let id = if indirect {
            let table = GuestAddress(q.base + TABLES + (n % 64) * 256);
            q.ring.add_indirect(&s, n, table)
        } else {
            q.ring.add(&s, n)
        }
        .expect("TX ring full");
        q.kick_if_needed();
        id
    }
}

/// 200 packets through an 8-entry ring (50 wraps): chains of 1 to 3
/// descriptors and indirect tables on TX, chains of 2 descriptors on RX,
/// each packet's bytes checked, every used buffer validated by the driver
/// (ids in flight, lengths), and the positions the sim reports equal to
/// the driver's.
#[test]
fn packets_cross_many_wraps_of_a_small_packed_ring() {
    for features in [F_VERSION_1, F_VERSION_1 | F_EVENT_IDX | F_INDIRECT] {
        let mut rig = PackedRig::new(features, 8);
        let indirect = features & F_INDIRECT != 0;
        let mut bytes = 0u64;
        for n in 0..200u64 {
            let len = [60, 1500, 333, 1][n as usize % 4];
            let pkt = packet(len, n as u8);
            let rx_id = rig.post_rx(n, 2, 1024);
            let segs = 1 + n as usize % 3;
            let tx_id = rig.send(n, &pkt, segs, indirect && n % 2 == 1);
            let tx = rig.q[TX].wait_used(1);
            assert_eq!((tx[0].head, tx[0].len, tx[0].tag), (tx_id, 0, n));
            let rx = rig.q[RX].wait_used(1);
            assert_eq!((rx[0].head, rx[0].tag), (rx_id, n));
            assert_bytes(
                &rig.q[RX].ring.read_written(&rx[0]),
                &expected_rx(&pkt, 1),
                &format!("packet {n}"),
            );
            bytes += len as u64;
        }
        for (i, q) in rig.q.iter().enumerate() {
            let pos = u32::from(q.ring.avail_position());
            assert_eq!(q.ring.avail_position(), q.ring.used_position());
            assert_eq!(rig.sim.vring_base_packed(i).unwrap(), pos | pos << 16);
        }
        let tx = rig.sim.queue_stats(TX).unwrap();
        let rx = rig.sim.queue_stats(RX).unwrap();
        assert_eq!((tx.packets, tx.bytes, tx.errors), (200, bytes, 0));
        assert_eq!((rx.packets, rx.bytes, rx.errors), (200, bytes, 0));
    }
}

/// With MRG_RXBUF a packet spans several RX chains, num_buffers says how
/// many, and they are used in the order they were made available.
#[test]
fn mergeable_buffers_span_packed_chains_in_order() {
    let mut rig = PackedRig::new(F_VERSION_1 | F_MRG_RXBUF, 16);
    let pkt = packet(1500, 9);
    let ids: Vec<u16> = (0..6).map(|n| rig.post_rx(n, 1, 300)).collect();
    rig.send(0, &pkt, 2, false);
    rig.q[TX].wait_used(1);
    let used = rig.q[RX].wait_used(6);
    assert_eq!(used.iter().map(|u| u.head).collect::<Vec<_>>(), ids);
    let got: Vec<u8> = used
        .iter()
        .flat_map(|u| rig.q[RX].ring.read_written(u))
        .collect();
    assert_bytes(&got, &expected_rx(&pkt, 6), "merged packet");
}

/// TX waits while RX has no buffer (backpressure, never loss), and the
/// sim asks for a kick at the RX position it needs; the packet goes out
/// once RX gets a buffer.
#[test]
fn tx_waits_for_rx_buffers_and_asks_for_the_kick() {
    let mut rig = PackedRig::new(F_VERSION_1 | F_EVENT_IDX, 8);
    let pkt = packet(100, 3);
    rig.send(0, &pkt, 1, false);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(rig.q[TX].ring.pop_used().unwrap().is_empty(), "TX waited");
    rig.sim.vring_base_packed(RX).unwrap();
    assert_eq!(
        rig.q[RX].ring.device_event(),
        (EVENT_DESC, rig.q[RX].ring.avail_position()),
        "RX asks for a kick at the next chain"
    );
    rig.post_rx(0, 1, 2048);
    rig.q[TX].wait_used(1);
    let rx = rig.q[RX].wait_used(1);
    assert_bytes(
        &rig.q[RX].ring.read_written(&rx[0]),
        &expected_rx(&pkt, 1),
        "packet",
    );
}

/// The driver area decides interrupts: DISABLE gets none, ENABLE one per
/// round, DESC (EVENT_IDX) one when the used position passes the offset.
#[test]
fn interrupts_follow_the_driver_area() {
    let mut rig = PackedRig::new(F_VERSION_1 | F_EVENT_IDX, 8);
    let roundtrip = |rig: &mut PackedRig, n: u64| {
        rig.echo(n, 64, 1);
        rig.sim.vring_base_packed(TX).unwrap();
    };
    // Let pop_used leave the driver areas alone from here.
    rig.q[TX].ring.event_idx = false;
    let _ = rig.q[TX].call.read();
    rig.q[TX].ring.set_driver_event(EVENT_DISABLE, 0);
    roundtrip(&mut rig, 0);
    assert!(rig.q[TX].call.read().is_err(), "DISABLE: no interrupt");
    rig.q[TX].ring.set_driver_event(EVENT_ENABLE, 0);
    roundtrip(&mut rig, 1);
    assert!(rig.q[TX].call.read().is_ok(), "ENABLE: interrupt");
    // DESC at two chains ahead: none for the next, one for the one after.
    let at = rig.q[TX].ring.used_position() + 1;
    rig.q[TX].ring.set_driver_event(EVENT_DESC, at);
    roundtrip(&mut rig, 2);
    assert!(rig.q[TX].call.read().is_err(), "DESC not reached yet");
    roundtrip(&mut rig, 3);
    assert!(rig.q[TX].call.read().is_ok(), "DESC reached");
}

/// A hand-over at any position: the sim continues the ring from the avail
/// and used positions (wrap counter 0 here) it is given, and reports them
/// back; a position past the ring is refused.
#[test]
fn the_ring_continues_from_a_packed_base() {
    let mut rig = PackedRig::new(F_VERSION_1, 8);
    rig.sim.suspend().unwrap();
    let at = encode_position(5, false);
    for i in [RX, TX] {
        rig.q[i].ring.start_at(at, at);
        let base = u32::from(at) | u32::from(at) << 16;
        rig.sim.set_vring_base_packed(i, base).unwrap();
        assert_eq!(rig.sim.vring_base_packed(i).unwrap(), base);
    }
    assert!(rig.sim.set_vring_base_packed(RX, 8 | 8 << 16).is_err());
    rig.sim.resume().unwrap();
    for n in 0..6 {
        rig.echo(n, 200, 2);
    }
    // 5 + 6 slots: position 3 in the next lap (wrap counter 1 again).
    let end = u32::from(encode_position(3, true));
    assert_eq!(rig.sim.vring_base_packed(RX).unwrap(), end | end << 16);
}

/// Malformed packed rings stop their own queue with nothing completed; a
/// good chain before them is relayed, and the queue runs again once it is
/// reconfigured.
#[test]
fn malformed_packed_chains_break_only_their_queue() {
    type Corrupt = fn(&PackedRing, u16, u64);
    let cases: [(&str, Corrupt); 4] = [
        ("id past the ring", |r, pos, buf| {
            r.write_desc(pos, buf, 64, 8, r.avail_flags_now())
        }),
        ("continuation not available", |r, pos, buf| {
            r.write_desc(pos + 1, buf, 64, 1, 0);
            r.write_desc(pos, buf, 64, 1, DESC_F_NEXT | r.avail_flags_now());
        }),
        ("indirect with next", |r, pos, buf| {
            r.write_desc(
                pos,
                buf,
                16,
                1,
                DESC_F_INDIRECT | DESC_F_NEXT | r.avail_flags_now(),
            )
        }),
        ("chain longer than the ring", |r, pos, buf| {
            // Every slot available in its own lap, every one saying NEXT.
            let (this_lap, next_lap) = (
                r.avail_flags_now(),
                r.avail_flags_now() ^ (PACKED_F_AVAIL | PACKED_F_USED),
            );
            for k in (0..8).rev() {
                let lap = if pos + k < 8 { this_lap } else { next_lap };
                r.write_desc((pos + k) % 8, buf, 64, 1, DESC_F_NEXT | lap);
            }
        }),
    ];
    for (what, corrupt) in cases {
        let mut rig = PackedRig::new(F_VERSION_1, 8);
        rig.echo(0, 64, 1);
        // Broken TX chain at the driver's next position.
        let pos = rig.q[TX].ring.avail_position() & 0x7fff;
        let buf = rig.q[TX].buf(100).0;
        corrupt(&rig.q[TX].ring, pos, buf);
        rig.q[TX].kick.write(1).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !rig.sim.queue_stats(TX).unwrap().broken {
            assert!(Instant::now() < deadline, "{what}: queue not broken");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let tx = rig.sim.queue_stats(TX).unwrap();
        assert_eq!((tx.packets, tx.errors), (1, 1), "{what}");
        assert!(rig.q[TX].ring.pop_used().unwrap().is_empty(), "{what}");
        assert!(!rig.sim.queue_stats(RX).unwrap().broken, "{what}: RX runs");
        // The chain is given back: the position did not move.
        let p = rig.sim.vring_base_packed(TX).unwrap();
        assert_eq!(p as u16, rig.q[TX].ring.avail_position(), "{what}");
        // Reconfigured at a fresh position, the queue runs again.
        rig.sim.set_vring_enable(TX, false).unwrap();
        let fresh = PackedRing::new(
            &rig.mem,
            8,
            rig.q[TX].ring.desc,
            rig.q[TX].ring.driver,
            rig.q[TX].ring.device,
        );
        rig.q[TX].ring = fresh;
        rig.sim.set_vring_base_packed(TX, 0x8000_8000).unwrap();
        rig.sim.set_vring_enable(TX, true).unwrap();
        rig.echo(1, 64, 1);
        assert!(!rig.sim.queue_stats(TX).unwrap().broken, "{what}");
    }
}

/// A split-only call on a packed ring and the reverse are refused, and
/// the 16-bit base of a packed ring sets both positions.
#[test]
fn packed_and_split_bases_are_not_mixed_up() {
    let mut rig = PackedRig::new(F_VERSION_1, 8);
    rig.sim.suspend().unwrap();
    let at = encode_position(3, false);
    rig.sim.set_vring_base(RX, at).unwrap();
    assert_eq!(
        rig.sim.vring_base_packed(RX).unwrap(),
        u32::from(at) | u32::from(at) << 16
    );
    let split = Rig::new(1, F_VERSION_1, 8);
    let mut sim = split.sim;
    assert!(sim.vring_base_packed(RX).is_err());
    assert!(sim.set_vring_base_packed(RX, 0x8000_8000).is_err());
}
