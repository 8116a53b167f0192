//! Self-tests of the harness, without the daemon: the guest driver against an
//! in-process loopback device built on virtio-queue (an implementation
//! nobody here wrote), including devices with deliberate bugs the driver
//! must catch.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use testkit::mem::GuestMem;
use testkit::net::{pump_with, DriverOpts, NetPair, Until};
use testkit::ring::{wait_eventfds, Seg, SplitRing};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Bug {
    None,
    CorruptByte,
    DuplicateUsed,
    NoInterrupt,
    DropPacket,
}

fn device_queue(mem: &GuestMemoryMmap, r: &SplitRing) -> Queue {
    let mut q = Queue::new(r.size).unwrap();
    q.set_size(r.size);
    q.try_set_desc_table_address(r.desc).unwrap();
    q.try_set_avail_ring_address(r.avail).unwrap();
    q.try_set_used_ring_address(r.used).unwrap();
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// Loopback: every TX frame (header included) is copied into the next RX
/// buffer(s), num_buffers set to the number of buffers used.
fn fake_device(
    mem: GuestMemoryMmap,
    mut rxq: Queue,
    mut txq: Queue,
    fds: [EventFd; 4], // rx kick, rx call, tx kick, tx call
    stop: Arc<AtomicBool>,
    bug: Bug,
    mrg: bool,
) {
    let [rx_kick, rx_call, tx_kick, tx_call] = fds;
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        wait_eventfds(&[rx_kick.as_raw_fd(), tx_kick.as_raw_fd()], 20);
        let mut tx_done = false;
        while let Some(chain) = txq.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let mut bytes = Vec::new();
            for d in chain {
                let mut b = vec![0u8; d.len() as usize];
                mem.read_slice(&mut b, d.addr()).unwrap();
                bytes.extend_from_slice(&b);
            }
            n += 1;
            if !(bug == Bug::DropPacket && n == 5) {
                pending.push_back(bytes);
            }
            txq.add_used(&mem, head, 0).unwrap();
            if bug == Bug::DuplicateUsed && n == 7 {
                txq.add_used(&mem, head, 0).unwrap();
            }
            tx_done = true;
        }
        let mut rx_done = false;
        'packets: while let Some(pkt) = pending.front() {
            // Gather enough RX chains for the whole packet, or put them back.
            let mut chains = Vec::new();
            let mut cap = 0usize;
            while cap < pkt.len() {
                let Some(c) = rxq.pop_descriptor_chain(&mem) else {
                    for _ in 0..chains.len() {
                        rxq.go_to_previous_position();
                    }
                    break 'packets;
                };
                let descs: Vec<_> = c.clone().filter(|d| d.is_write_only()).collect();
                cap += descs.iter().map(|d| d.len() as usize).sum::<usize>();
                chains.push((c.head_index(), descs));
                assert!(mrg || cap >= pkt.len(), "fake device: RX buffer too small");
            }
            let mut pkt = pending.pop_front().unwrap();
            pkt[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
            if bug == Bug::CorruptByte && n > 3 {
                let last = pkt.len() - 1;
                pkt[last] ^= 0x40;
            }
            let mut off = 0;
            for (head, descs) in chains {
                let mut written = 0;
                for d in descs {
                    let k = (pkt.len() - off).min(d.len() as usize);
                    mem.write_slice(&pkt[off..off + k], d.addr()).unwrap();
                    off += k;
                    written += k;
                }
                rxq.add_used(&mem, head, written as u32).unwrap();
            }
            rx_done = true;
        }
        if bug != Bug::NoInterrupt {
            if tx_done && txq.needs_notification(&mem).unwrap() {
                tx_call.write(1).unwrap();
            }
            if rx_done && rxq.needs_notification(&mem).unwrap() {
                rx_call.write(1).unwrap();
            }
        }
    }
}

fn run(pairs: u16, frames: u32, opts: DriverOpts, bug: Bug) -> Result<Vec<NetPair>, String> {
    let mut mem = GuestMem::new(16 << 20);
    let mut ps: Vec<NetPair> = (0..pairs)
        .map(|k| NetPair::new(&mut mem, k, 64, &opts))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for p in ps.iter_mut() {
        p.post_rx();
        let mut rxq = device_queue(&mem.mem, &p.rx.ring);
        let mut txq = device_queue(&mem.mem, &p.tx.ring);
        rxq.set_event_idx(opts.event_idx);
        txq.set_event_idx(opts.event_idx);
        let fds = [
            p.rx.kick.try_clone().unwrap(),
            p.rx.call.try_clone().unwrap(),
            p.tx.kick.try_clone().unwrap(),
            p.tx.call.try_clone().unwrap(),
        ];
        let m = mem.mem.clone();
        let s = stop.clone();
        let mrg = opts.mrg_rxbuf;
        threads.push(thread::spawn(move || {
            fake_device(m, rxq, txq, fds, s, bug, mrg)
        }));
    }
    let r = pump_with(&mut ps, Until::Frames(frames), Duration::from_secs(2));
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }
    r.map(|_| ps)
}

fn plain() -> DriverOpts {
    DriverOpts::default()
}

#[test]
fn driver_passes_traffic_through_a_correct_loopback() {
    let all = DriverOpts {
        mrg_rxbuf: true,
        event_idx: true,
        indirect: true,
        rx_buf_size: 512,
        ..Default::default()
    };
    let no_mrg = DriverOpts {
        mrg_rxbuf: false,
        ..plain()
    };
    let long = DriverOpts {
        indirect: true,
        tx_segs: 40,
        rx_segs: 24,
        ..plain()
    };
    let batched = DriverOpts {
        event_idx: true,
        irq_batch: 16,
        ..plain()
    };
    for (pairs, opts) in [(1, plain()), (3, no_mrg), (2, all), (1, long), (1, batched)] {
        let merged_expected = opts.rx_buf_size < 1526;
        let ps = run(pairs, 500, opts, Bug::None).unwrap();
        for p in &ps {
            assert_eq!(p.next_seq, 500);
            assert!(p.quiescent());
            assert_eq!(p.tx.ring.avail_idx, 500);
            if merged_expected {
                assert!(p.rx.ring.total_used > 500);
            } else {
                assert_eq!(p.rx.ring.total_used, 500);
            }
            // RX ring wrapped several times with reposted buffers.
            assert!(p.rx.ring.avail_idx > 500);
            assert_eq!(p.n_rx_merged > 0, merged_expected);
        }
    }
}

#[test]
fn driver_detects_corruption() {
    let e = run(1, 50, plain(), Bug::CorruptByte)
        .err()
        .expect("the harness must catch this device bug");
    assert!(e.contains("byte"), "{e}");
}

#[test]
fn driver_detects_duplicate_completion() {
    let e = run(1, 50, plain(), Bug::DuplicateUsed)
        .err()
        .expect("the harness must catch this device bug");
    assert!(e.contains("not in flight") || e.contains("jumped"), "{e}");
}

#[test]
fn driver_detects_missing_interrupt() {
    let e = run(1, 50, plain(), Bug::NoInterrupt)
        .err()
        .expect("the harness must catch this device bug");
    assert!(e.contains("did not signal"), "{e}");
}

#[test]
fn driver_detects_loss() {
    // A lost frame shows up as a stall with the missing seq named.
    let e = run(1, 20, plain(), Bug::DropPacket)
        .err()
        .expect("the harness must catch this device bug");
    assert!(e.contains("first missing [4]"), "{e}");
}

#[test]
fn ring_rejects_out_of_range_used_id() {
    let mem = GuestMem::new(1 << 20);
    let mut r = SplitRing::new(
        &mem.mem,
        8,
        GuestAddress(0x1000),
        GuestAddress(0x2000),
        GuestAddress(0x3000),
    );
    let seg = Seg {
        addr: GuestAddress(0x8000),
        len: 100,
        write: true,
    };
    let head = r.add(&[seg], 1).unwrap();
    r.publish();
    // Device writes id 9 (>= size 8).
    mem.mem.write_obj(9u32, GuestAddress(0x3004)).unwrap();
    mem.mem.write_obj(1u16, GuestAddress(0x3002)).unwrap();
    assert!(r.pop_used().unwrap_err().contains(">= ring size"));
    // A correct entry with too large a len.
    let mut r = SplitRing::new(
        &mem.mem,
        8,
        GuestAddress(0x1000),
        GuestAddress(0x2000),
        GuestAddress(0x3000),
    );
    assert_eq!(r.add(&[seg], 1), Some(head));
    r.publish();
    mem.mem
        .write_obj(head as u32, GuestAddress(0x3004))
        .unwrap();
    mem.mem.write_obj(101u32, GuestAddress(0x3008)).unwrap();
    mem.mem.write_obj(1u16, GuestAddress(0x3002)).unwrap();
    assert!(r.pop_used().unwrap_err().contains("writable"));
}
