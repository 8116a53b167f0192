//! A guest virtio-net driver for one queue pair on top of `SplitRing`:
//! posts RX buffers and TX frames, checks every byte that comes back and
//! that every buffer completes exactly once.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::mem::GuestMem;
use crate::packet::{self, NET_HDR_LEN};
use crate::ring::{ring_bytes, wait_eventfds, Seg, SplitRing};

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

/// How the guest driver lays out its buffers.
#[derive(Clone, Debug)]
pub struct DriverOpts {
    pub mrg_rxbuf: bool,
    pub event_idx: bool,
    /// Some chains go through INDIRECT descriptor tables.
    pub indirect: bool,
    /// Bytes per RX buffer (header included). Below a full frame only with
    /// MRG_RXBUF: frames then span several buffers.
    pub rx_buf_size: u32,
    /// Guest memory region holding the packet buffers (rings stay in 0).
    pub buf_region: usize,
    /// Split every TX chain into this many segments (0: a mix of 1 and 2).
    pub tx_segs: u16,
    /// Split every RX buffer into this many segments (0: a mix of 1 and 2).
    pub rx_segs: u16,
    /// With EVENT_IDX, ask for interrupts only every this many completions
    /// (as far as that many are sure to come).
    pub irq_batch: u16,
}

impl Default for DriverOpts {
    fn default() -> Self {
        DriverOpts {
            mrg_rxbuf: true,
            event_idx: false,
            indirect: false,
            rx_buf_size: BUF_SIZE as u32,
            buf_region: 0,
            tx_segs: 0,
            rx_segs: 0,
            irq_batch: 0,
        }
    }
}

#[allow(dead_code)] // each test binary uses its own subset
impl DriverOpts {
    /// Without MRG_RXBUF: every frame must fit one RX chain.
    pub fn no_mrg() -> Self {
        DriverOpts {
            mrg_rxbuf: false,
            ..Default::default()
        }
    }

    /// EVENT_IDX notification suppression, INDIRECT tables, and RX buffers of
    /// 512 bytes so most frames span several merged buffers.
    pub fn all_features() -> Self {
        DriverOpts {
            mrg_rxbuf: true,
            event_idx: true,
            indirect: true,
            rx_buf_size: 512,
            ..Default::default()
        }
    }
}

/// `total` bytes at `addr` as `n` segments (fewer if there are fewer bytes).
fn split(addr: GuestAddress, total: u32, n: u16, write: bool) -> Vec<Seg> {
    let n = (n as u32).clamp(1, total);
    let piece = total / n;
    (0..n)
        .map(|i| {
            let len = if i + 1 == n { total - piece * i } else { piece };
            Seg {
                addr: GuestAddress(addr.0 + (piece * i) as u64),
                len,
                write,
            }
        })
        .collect()
}

pub struct NetPair {
    pub pair: u16,
    pub rx: QueueIo,
    pub tx: QueueIo,
    pub opts: DriverOpts,
    mem: vm_memory::GuestMemoryMmap,
    rx_bufs: GuestAddress,
    tx_bufs: GuestAddress,
    rx_tables: GuestAddress,
    tx_tables: GuestAddress,
    /// Bytes of indirect table per buffer slot.
    table_size: u64,
    rx_free: Vec<u32>,
    tx_free: Vec<u32>,
    rx_posted: usize,
    window: u64,
    /// A frame whose first RX buffers arrived: (num_buffers, bytes, buffers so far).
    rx_partial: Option<(u16, Vec<u8>, u16)>,
    /// Sequence number of the next frame to send (= frames sent).
    pub next_seq: u32,
    pub tx_completed: Vec<bool>,
    pub rx_received: Vec<bool>,
    pub n_tx_completed: u64,
    pub n_rx_received: u64,
    /// RX frames that used more than one buffer.
    pub n_rx_merged: u64,
    /// Skip received frames that are not test frames (a real network).
    ignore_foreign: bool,
    pub n_rx_foreign: u64,
}

impl NetPair {
    pub fn new(mem: &mut GuestMem, pair: u16, ring_size: u16, opts: &DriverOpts) -> NetPair {
        assert!(opts.rx_buf_size as u64 <= BUF_SIZE && opts.rx_buf_size > 2 * NET_HDR_LEN as u32);
        assert!(
            opts.mrg_rxbuf || opts.rx_buf_size as usize >= NET_HDR_LEN + packet::MAX_FRAME,
            "RX buffers smaller than a frame need MRG_RXBUF"
        );
        let mut rx = QueueIo::new(mem, 2 * pair as usize, ring_size);
        let mut tx = QueueIo::new(mem, 2 * pair as usize + 1, ring_size);
        rx.ring.event_idx = opts.event_idx;
        tx.ring.event_idx = opts.event_idx;
        rx.ring.irq_batch = opts.irq_batch;
        tx.ring.irq_batch = opts.irq_batch;
        let r = opts.buf_region;
        let rx_bufs = mem.alloc_in(r, BUF_SIZE * ring_size as u64, 4096);
        let tx_bufs = mem.alloc_in(r, BUF_SIZE * ring_size as u64, 4096);
        let table_size = 16 * opts.tx_segs.max(opts.rx_segs).max(4) as u64;
        let rx_tables = mem.alloc_in(r, table_size * ring_size as u64, 4096);
        let tx_tables = mem.alloc_in(r, table_size * ring_size as u64, 4096);
        NetPair {
            pair,
            rx,
            tx,
            opts: opts.clone(),
            mem: mem.mem.clone(),
            rx_bufs,
            tx_bufs,
            rx_tables,
            tx_tables,
            table_size,
            rx_free: (0..ring_size as u32).rev().collect(),
            tx_free: (0..ring_size as u32).rev().collect(),
            rx_posted: 0,
            window: 0,
            rx_partial: None,
            next_seq: 0,
            tx_completed: Vec::new(),
            rx_received: Vec::new(),
            n_tx_completed: 0,
            n_rx_received: 0,
            n_rx_merged: 0,
            ignore_foreign: false,
            n_rx_foreign: 0,
        }
    }

    fn rx_segs(&self, b: u32) -> Vec<Seg> {
        let addr = GuestAddress(self.rx_bufs.0 + b as u64 * BUF_SIZE);
        let size = self.opts.rx_buf_size;
        if self.opts.rx_segs > 0 {
            split(addr, size, self.opts.rx_segs, true)
        } else if b & 1 == 0 {
            vec![Seg {
                addr,
                len: size,
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
                    len: size - NET_HDR_LEN as u32,
                    write: true,
                },
            ]
        }
    }

    fn add_rx(&mut self, b: u32) -> Option<u16> {
        let segs = self.rx_segs(b);
        if self.opts.indirect && (b >> 1) & 1 == 1 {
            let table = GuestAddress(self.rx_tables.0 + b as u64 * self.table_size);
            self.rx.ring.add_indirect(&segs, b as u64, table)
        } else {
            self.rx.ring.add(&segs, b as u64)
        }
    }

    /// Fills the RX ring with buffers and publishes them (no kick).
    /// Call once before traffic; sets the send window so the device never
    /// runs out of RX buffers (a lack of RX buffers may legitimately drop).
    pub fn post_rx(&mut self) {
        while let Some(b) = self.rx_free.pop() {
            if self.add_rx(b).is_none() {
                self.rx_free.push(b);
                break;
            }
            self.rx_posted += 1;
        }
        self.rx.ring.publish_and_check_kick();
        let per_frame = (NET_HDR_LEN + packet::MAX_FRAME).div_ceil(self.opts.rx_buf_size as usize);
        self.window = (self.rx_posted as u64 / per_frame as u64 / 2).max(1);
    }

    /// Received frames with another ethertype are counted and skipped.
    pub fn set_ignore_foreign(&mut self, on: bool) {
        self.ignore_foreign = on;
    }

    /// Overrides the send window (for tests that post their own RX buffers).
    pub fn force_window(&mut self, w: u64) {
        self.window = w;
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
            let seg = |off: u32, len: u32| Seg {
                addr: GuestAddress(addr.0 + off as u64),
                len,
                write: false,
            };
            let h = NET_HDR_LEN as u32;
            let segs = match seq % 3 {
                _ if self.opts.tx_segs > 0 => split(addr, total, self.opts.tx_segs, false),
                0 => vec![seg(0, total)],
                1 => vec![seg(0, h), seg(h, total - h)],
                _ => vec![seg(0, h + 20), seg(h + 20, total - h - 20)],
            };
            let tag = ((b as u64) << 32) | seq as u64;
            let added = if self.opts.indirect && seq % 4 >= 2 {
                let table = GuestAddress(self.tx_tables.0 + b as u64 * self.table_size);
                self.tx.ring.add_indirect(&segs, tag, table)
            } else {
                self.tx.ring.add(&segs, tag)
            };
            if added.is_none() {
                self.tx_free.push(b);
                break;
            }
            self.tx_completed.push(false);
            self.rx_received.push(false);
            self.next_seq += 1;
            sent += 1;
        }
        if sent > 0 && self.tx.ring.publish_and_check_kick() {
            self.tx.kick();
        }
        sent
    }

    /// Consumes used entries of both queues, checking them. Ok(true) if
    /// anything completed.
    pub fn service(&mut self) -> Result<bool, String> {
        Ok(self.service_tx()? | self.service_rx()?)
    }

    /// Consumes TX used entries.
    pub fn service_tx(&mut self) -> Result<bool, String> {
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
        Ok(progress)
    }

    /// Consumes RX used entries: checks every byte, reposts the buffers.
    pub fn service_rx(&mut self) -> Result<bool, String> {
        let p = self.pair;
        let mut progress = false;
        // Every frame not yet received needs at least one more RX entry.
        self.rx.ring.coming = Some(self.outstanding() as usize);
        let used = self
            .rx
            .ring
            .pop_used()
            .map_err(|e| format!("pair {p} RX: {e}"))?;
        let reposted = !used.is_empty();
        for u in used {
            let data = self.rx.ring.read_written(&u);
            self.add_rx(u.tag as u32).expect("repost rx buffer");
            progress = true;
            let (n, mut acc, got) = match self.rx_partial.take() {
                None => {
                    let n = packet::check_rx_hdr(&data).map_err(|e| format!("pair {p} RX: {e}"))?;
                    let n = if self.opts.mrg_rxbuf { n } else { 1 };
                    if n == 0 {
                        return Err(format!("pair {p} RX: num_buffers 0"));
                    }
                    (n, Vec::new(), 0)
                }
                Some(partial) => partial,
            };
            acc.extend_from_slice(&data);
            if got + 1 < n {
                self.rx_partial = Some((n, acc, got + 1));
                continue;
            }
            if n > 1 {
                self.n_rx_merged += 1;
            }
            let eth = &acc[NET_HDR_LEN..];
            if self.ignore_foreign
                && (eth.len() < 14 || u16::from_be_bytes([eth[12], eth[13]]) != packet::ETHERTYPE)
            {
                self.n_rx_foreign += 1;
                continue;
            }
            let (fp, seq) = packet::check_frame(&acc[NET_HDR_LEN..])
                .map_err(|e| format!("pair {p} RX ({n} buffers): {e}"))?;
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
        }
        if reposted && self.rx.ring.publish_and_check_kick() {
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
/// sent has come back. Like a real guest driver it looks at a used ring only
/// after that queue's call eventfd fired, so a device that forgets to
/// signal is caught. Err describes the first device misbehaviour.
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
        if sending {
            for p in pairs.iter_mut() {
                let max = match until {
                    Until::Frames(n) => n - p.next_seq.min(n),
                    Until::Flag(_) => 64,
                };
                if p.send(max) > 0 {
                    last_progress = Instant::now();
                }
            }
        } else if pairs.iter().all(|p| p.quiescent()) {
            return Ok(());
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
        for (i, p) in pairs.iter_mut().enumerate() {
            // call_fds() order: RX, TX.
            if ready[2 * i] && p.service_rx()? {
                last_progress = Instant::now();
            }
            if ready[2 * i + 1] && p.service_tx()? {
                last_progress = Instant::now();
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
