//! A guest virtio-net driver for one queue pair on top of `SplitRing`:
//! posts RX buffers and TX frames, checks every byte that comes back and
//! that every buffer completes exactly once.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mem::GuestMem;
use super::packet::{self, NET_HDR_LEN};
use super::ring::{ring_bytes, wait_eventfds, Seg, SplitRing};

pub const BUF_SIZE: u64 = 2048;

/// One virtqueue as the VMM/guest sees it: ring plus its kick/call eventfds.
pub struct QueueIo {
    pub index: usize,
    pub ring: SplitRing,
    pub kick: EventFd,
    pub call: EventFd,
}

impl QueueIo {
    pub fn new(mem: &mut GuestMem, index: usize, size: u16) -> QueueIo {
        let (d, a, u) = ring_bytes(size);
        let desc = mem.alloc(d, 4096);
        let avail = mem.alloc(a, 4096);
        let used = mem.alloc(u, 4096);
        QueueIo {
            index,
            ring: SplitRing::new(&mem.mem, size, desc, avail, used),
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }
}

pub struct NetPair {
    pub pair: u16,
    pub rx: QueueIo,
    pub tx: QueueIo,
    pub mrg_rxbuf: bool,
    mem: vm_memory::GuestMemoryMmap,
    rx_bufs: GuestAddress,
    tx_bufs: GuestAddress,
    rx_free: Vec<u32>,
    tx_free: Vec<u32>,
    rx_posted: usize,
    window: u64,
    /// Sequence number of the next frame to send (= frames sent).
    pub next_seq: u32,
    pub tx_completed: Vec<bool>,
    pub rx_received: Vec<bool>,
    pub n_tx_completed: u64,
    pub n_rx_received: u64,
}

impl NetPair {
    pub fn new(mem: &mut GuestMem, pair: u16, ring_size: u16, mrg_rxbuf: bool) -> NetPair {
        let rx = QueueIo::new(mem, 2 * pair as usize, ring_size);
        let tx = QueueIo::new(mem, 2 * pair as usize + 1, ring_size);
        let rx_bufs = mem.alloc(BUF_SIZE * ring_size as u64, 4096);
        let tx_bufs = mem.alloc(BUF_SIZE * ring_size as u64, 4096);
        NetPair {
            pair,
            rx,
            tx,
            mrg_rxbuf,
            mem: mem.mem.clone(),
            rx_bufs,
            tx_bufs,
            rx_free: (0..ring_size as u32).rev().collect(),
            tx_free: (0..ring_size as u32).rev().collect(),
            rx_posted: 0,
            window: 0,
            next_seq: 0,
            tx_completed: Vec::new(),
            rx_received: Vec::new(),
            n_tx_completed: 0,
            n_rx_received: 0,
        }
    }

    fn rx_segs(&self, b: u32) -> Vec<Seg> {
        let addr = GuestAddress(self.rx_bufs.0 + b as u64 * BUF_SIZE);
        if b & 1 == 0 {
            vec![Seg {
                addr,
                len: BUF_SIZE as u32,
                write: true,
            }]
        } else {
            // Header in its own descriptor (ANY_LAYOUT / VERSION_1).
            vec![
                Seg {
                    addr,
                    len: NET_HDR_LEN as u32,
                    write: true,
                },
                Seg {
                    addr: GuestAddress(addr.0 + NET_HDR_LEN as u64),
                    len: (BUF_SIZE - NET_HDR_LEN as u64) as u32,
                    write: true,
                },
            ]
        }
    }

    /// Fills the RX ring with buffers and publishes them (no kick).
    /// Call once before traffic; sets the send window so the device never
    /// runs out of RX buffers (a lack of RX buffers may legitimately drop).
    pub fn post_rx(&mut self) {
        while let Some(b) = self.rx_free.pop() {
            let segs = self.rx_segs(b);
            if self.rx.ring.add(&segs, b as u64).is_none() {
                self.rx_free.push(b);
                break;
            }
            self.rx_posted += 1;
        }
        self.rx.ring.publish();
        self.window = (self.rx_posted as u64 / 2).max(1);
    }

    /// Frames sent and not yet received back.
    pub fn outstanding(&self) -> u64 {
        self.next_seq as u64 - self.n_rx_received
    }

    /// Sends up to `max` frames (bounded by the window and free TX space).
    pub fn send(&mut self, max: u32) -> u32 {
        let mut sent = 0;
        while sent < max && self.outstanding() < self.window {
            let Some(b) = self.tx_free.pop() else { break };
            let seq = self.next_seq;
            let f = packet::frame(self.pair, seq);
            let addr = GuestAddress(self.tx_bufs.0 + b as u64 * BUF_SIZE);
            let mut bytes = vec![0u8; NET_HDR_LEN];
            bytes.extend_from_slice(&f);
            self.mem.write_slice(&bytes, addr).expect("write tx frame");
            let total = bytes.len() as u32;
            let at = |off: u32| GuestAddress(addr.0 + off as u64);
            let segs = match seq % 3 {
                0 => vec![Seg {
                    addr,
                    len: total,
                    write: false,
                }],
                1 => vec![
                    Seg {
                        addr,
                        len: NET_HDR_LEN as u32,
                        write: false,
                    },
                    Seg {
                        addr: at(NET_HDR_LEN as u32),
                        len: total - NET_HDR_LEN as u32,
                        write: false,
                    },
                ],
                _ => vec![
                    Seg {
                        addr,
                        len: NET_HDR_LEN as u32 + 20,
                        write: false,
                    },
                    Seg {
                        addr: at(NET_HDR_LEN as u32 + 20),
                        len: total - NET_HDR_LEN as u32 - 20,
                        write: false,
                    },
                ],
            };
            if self
                .tx
                .ring
                .add(&segs, ((b as u64) << 32) | seq as u64)
                .is_none()
            {
                self.tx_free.push(b);
                break;
            }
            self.tx_completed.push(false);
            self.rx_received.push(false);
            self.next_seq += 1;
            sent += 1;
        }
        if sent > 0 {
            self.tx.ring.publish();
            self.tx.kick();
        }
        sent
    }

    /// Consumes used entries of both queues, checking them. Ok(true) if
    /// anything completed.
    pub fn service(&mut self) -> Result<bool, String> {
        let p = self.pair;
        let mut progress = false;
        for u in self
            .tx
            .ring
            .pop_used()
            .map_err(|e| format!("pair {p} TX: {e}"))?
        {
            let b = (u.tag >> 32) as u32;
            let seq = u.tag as u32;
            if std::mem::replace(&mut self.tx_completed[seq as usize], true) {
                return Err(format!("pair {p} TX: seq {seq} completed twice"));
            }
            self.n_tx_completed += 1;
            self.tx_free.push(b);
            progress = true;
        }
        let used = self
            .rx
            .ring
            .pop_used()
            .map_err(|e| format!("pair {p} RX: {e}"))?;
        let reposted = !used.is_empty();
        for u in used {
            let data = self.rx.ring.read_written(&u);
            if data.len() < NET_HDR_LEN + packet::MIN_FRAME {
                return Err(format!(
                    "pair {p} RX: used len {} too short for a frame",
                    u.len
                ));
            }
            packet::check_rx_hdr(&data[..NET_HDR_LEN], self.mrg_rxbuf)
                .map_err(|e| format!("pair {p} RX: {e}"))?;
            let (fp, seq) = packet::check_frame(&data[NET_HDR_LEN..])
                .map_err(|e| format!("pair {p} RX: {e}"))?;
            if fp != p {
                return Err(format!("pair {p} RX: got frame of pair {fp} seq {seq}"));
            }
            if seq >= self.next_seq {
                return Err(format!("pair {p} RX: got seq {seq} which was never sent"));
            }
            if std::mem::replace(&mut self.rx_received[seq as usize], true) {
                return Err(format!("pair {p} RX: seq {seq} received twice"));
            }
            self.n_rx_received += 1;
            let b = u.tag as u32;
            let segs = self.rx_segs(b);
            self.rx.ring.add(&segs, b as u64).expect("repost rx buffer");
            progress = true;
        }
        if reposted {
            self.rx.ring.publish();
            self.rx.kick();
        }
        Ok(progress)
    }

    /// Every frame sent came back and every TX buffer completed.
    pub fn quiescent(&self) -> bool {
        self.n_rx_received == self.next_seq as u64 && self.n_tx_completed == self.next_seq as u64
    }

    /// True if the device wrote used entries the driver has not consumed.
    pub fn has_unconsumed_used(&self) -> bool {
        self.rx.ring.device_used_idx() != self.rx.ring.last_used
            || self.tx.ring.device_used_idx() != self.tx.ring.last_used
    }

    pub fn describe(&self) -> String {
        let missing: Vec<u32> = (0..self.next_seq)
            .filter(|&s| !self.rx_received[s as usize])
            .take(10)
            .collect();
        format!(
            "pair {}: sent {}, tx completed {}, rx received {} (first missing {:?}); \
             TX avail {} used(dev {} seen {}); RX avail {} used(dev {} seen {})",
            self.pair,
            self.next_seq,
            self.n_tx_completed,
            self.n_rx_received,
            missing,
            self.tx.ring.avail_idx,
            self.tx.ring.device_used_idx(),
            self.tx.ring.last_used,
            self.rx.ring.avail_idx,
            self.rx.ring.device_used_idx(),
            self.rx.ring.last_used
        )
    }

    pub fn call_fds(&self) -> [RawFd; 2] {
        [self.rx.call.as_raw_fd(), self.tx.call.as_raw_fd()]
    }
}

/// What `pump` should do.
pub enum Until<'a> {
    /// Send this many frames per pair, then drain.
    Frames(u32),
    /// Send continuously until the flag is set, then drain.
    Flag(&'a AtomicBool),
}

/// How long the data path may make no progress at all before the test fails.
pub const STALL: Duration = Duration::from_secs(15);
/// A call eventfd that stays silent this long while used entries are
/// waiting means the device forgot to signal.
const IRQ_WAIT_MS: i32 = 3000;

/// Drives traffic on all pairs until `until` is satisfied and everything
/// sent has come back. Err describes the first device misbehaviour.
pub fn pump(pairs: &mut [NetPair], until: Until) -> Result<(), String> {
    pump_with(pairs, until, STALL)
}

/// `pump` with a chosen stall limit.
pub fn pump_with(pairs: &mut [NetPair], until: Until, stall: Duration) -> Result<(), String> {
    let fds: Vec<RawFd> = pairs.iter().flat_map(|p| p.call_fds()).collect();
    let mut last_progress = Instant::now();
    loop {
        let sending = match until {
            Until::Frames(n) => pairs.iter().any(|p| p.next_seq < n),
            Until::Flag(f) => !f.load(Ordering::Acquire),
        };
        let mut progress = false;
        for p in pairs.iter_mut() {
            if sending {
                let max = match until {
                    Until::Frames(n) => n - p.next_seq.min(n),
                    Until::Flag(_) => 64,
                };
                progress |= p.send(max) > 0;
            }
            progress |= p.service()?;
        }
        if !sending && pairs.iter().all(|p| p.quiescent()) {
            return Ok(());
        }
        if progress {
            last_progress = Instant::now();
            continue;
        }
        let ready = wait_eventfds(&fds, IRQ_WAIT_MS);
        if !ready.iter().any(|&r| r) {
            if let Some(p) = pairs.iter().find(|p| p.has_unconsumed_used()) {
                return Err(format!(
                    "device wrote used entries but did not signal the call eventfd for {} ms: {}",
                    IRQ_WAIT_MS,
                    p.describe()
                ));
            }
        }
        if last_progress.elapsed() > stall {
            let states: Vec<String> = pairs.iter().map(|p| p.describe()).collect();
            return Err(format!(
                "no progress for {:?}: {}",
                stall,
                states.join(" | ")
            ));
        }
    }
}
