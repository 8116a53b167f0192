//! One worker thread per queue pair: waits on the kick eventfds, the tap and
//! a control eventfd, and moves packets while holding the pair's lock.
//!
//! The lock is released only between rounds, when every chain the worker
//! popped has been completed (or given back by rewinding next_avail). So a
//! control operation that takes the lock always sees a quiescent pair, which
//! is what suspend, vring_base and dma_unmap rely on.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, Chain, MAX_PACKET};
use super::config::{bits, net_hdr_len};
use super::iotlb::IotlbView;
use super::tap::{Tap, TAP_HDR_LEN};
use super::vq::{Broken, Vq};

/// Chains handled per round before the lock is let go, so control operations
/// never wait behind a busy ring for long.
const ROUND_BUDGET: usize = 256;

const TOKEN_WAKE: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_TAP: u64 = 2;

pub(crate) struct PairState {
    pub(crate) view: Arc<IotlbView>,
    pub(crate) rx: Vq,
    pub(crate) tx: Vq,
    pub(crate) features: u64,
    pub(crate) driver_ok: bool,
    pub(crate) suspended: bool,
    /// Bumped when a kick eventfd changes, so the worker re-registers.
    pub(crate) fds_gen: u64,
    /// A packet read from the tap that is waiting for RX buffers.
    tap_pending: Option<Vec<u8>>,
    /// RX had no room last time: stop polling the tap until RX is kicked.
    tap_starved: bool,
}

impl PairState {
    pub(crate) fn new(view: Arc<IotlbView>, rx: Vq, tx: Vq) -> Self {
        PairState {
            view,
            rx,
            tx,
            features: 0,
            driver_ok: false,
            suspended: false,
            fds_gen: 0,
            tap_pending: None,
            tap_starved: false,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.rx.reset();
        self.tx.reset();
        self.features = 0;
        self.driver_ok = false;
        self.suspended = false;
        self.tap_pending = None;
        self.tap_starved = false;
    }

    pub(crate) fn running(&self) -> bool {
        self.driver_ok && !self.suspended
    }
}

pub(crate) struct Pair {
    pub(crate) state: Mutex<PairState>,
    pub(crate) wake: EventFd,
    pub(crate) stop: AtomicBool,
}

impl Pair {
    /// Tells the worker to look at the state again.
    pub(crate) fn poke(&self) {
        if let Err(e) = self.wake.write(1) {
            log::warn!(target: "sim", "waking worker failed: {e}");
        }
    }
}

enum Deliver {
    Done,
    /// Did not fit one RX chain and MRG_RXBUF is off.
    Dropped,
    /// Not enough RX buffers; `seen` is where the next one would be (a
    /// [`Vq::mark`]).
    NoRoom {
        seen: u16,
    },
    Broken,
}

pub(crate) struct Worker {
    pair: Arc<Pair>,
    tap: Option<Tap>,
    epoll: Epoll,
    kicks: Vec<Arc<EventFd>>,
    tap_registered: bool,
    fds_gen: Option<u64>,
    tap_buf: Vec<u8>,
}

impl Worker {
    pub(crate) fn new(pair: Arc<Pair>, tap: Option<Tap>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            pair.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        Ok(Worker {
            pair,
            tap,
            epoll,
            kicks: Vec::new(),
            tap_registered: false,
            fds_gen: None,
            tap_buf: Vec::new(),
        })
    }

    pub(crate) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 8];
        let mut timeout = -1;
        loop {
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!(target: "sim", "epoll_wait failed, worker stops: {e}");
                    return;
                }
            };
            let mut kicked = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => drain(&self.pair.wake),
                    TOKEN_KICK => kicked = true,
                    _ => {}
                }
            }
            if self.pair.stop.load(Ordering::Acquire) {
                return;
            }
            let pair = Arc::clone(&self.pair);
            let Ok(mut st) = pair.state.lock() else {
                return;
            };
            // Kicks are drained only under the lock and after the watched
            // set follows the state: a kick eventfd the relay took back
            // (SET_VRING_KICK while suspended, e.g. for shadow rings) is never
            // read here again, so no kick meant for its new owner is lost.
            self.sync_kicks(&st);
            if kicked {
                self.kicks.iter().for_each(|k| drain(k));
            }
            let more = self.round(&mut st);
            let want_tap =
                self.tap.is_some() && st.running() && !st.tap_starved && st.tap_pending.is_none();
            drop(st);
            self.set_tap_polling(want_tap);
            timeout = if more { 0 } else { -1 };
        }
    }

    /// Watches exactly the pair's kick eventfds. A relay may give both queues
    /// the same eventfd; it is watched once (every wake processes both rings).
    fn sync_kicks(&mut self, st: &PairState) {
        if self.fds_gen == Some(st.fds_gen) {
            return;
        }
        self.fds_gen = Some(st.fds_gen);
        let mut want: Vec<Arc<EventFd>> = Vec::with_capacity(2);
        for k in [&st.rx.kick, &st.tx.kick].into_iter().flatten() {
            if !want.iter().any(|w| w.as_raw_fd() == k.as_raw_fd()) {
                want.push(Arc::clone(k));
            }
        }
        self.kicks.retain(|old| {
            if want.iter().any(|w| Arc::ptr_eq(w, old)) {
                return true;
            }
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old.as_raw_fd(),
                EpollEvent::default(),
            );
            false
        });
        for new in want {
            if self.kicks.iter().any(|k| Arc::ptr_eq(k, &new)) {
                continue;
            }
            match self.epoll.ctl(
                ControlOperation::Add,
                new.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_KICK),
            ) {
                Ok(()) => self.kicks.push(new),
                Err(e) => log::error!(
                    target: "sim",
                    "queues {}/{}: cannot watch kick eventfd {}: {e}",
                    st.rx.index,
                    st.tx.index,
                    new.as_raw_fd()
                ),
            }
        }
    }

    fn set_tap_polling(&mut self, want: bool) {
        let Some(tap) = &self.tap else { return };
        if want == self.tap_registered {
            return;
        }
        let res = if want {
            self.epoll.ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TAP),
            )
        } else {
            self.epoll.ctl(
                ControlOperation::Delete,
                tap.as_raw_fd(),
                EpollEvent::default(),
            )
        };
        match res {
            Ok(()) => self.tap_registered = want,
            Err(e) => log::error!(target: "sim", "tap polling change failed: {e}"),
        }
    }

    /// One round over both rings. Returns true if work was left for the next
    /// round.
    fn round(&mut self, st: &mut PairState) -> bool {
        if !st.running() {
            return false;
        }
        let view = Arc::clone(&st.view);
        let more = if self.tap.is_some() {
            let tx_more = self.tx_to_tap(st, &view);
            let rx_more = self.tap_to_rx(st, &view);
            tx_more || rx_more
        } else {
            tx_loopback(st, &view)
        };
        st.rx.signal_used(&view);
        st.tx.signal_used(&view);
        more
    }

    fn tx_to_tap(&mut self, st: &mut PairState, view: &IotlbView) -> bool {
        let hdr_len = net_hdr_len(st.features);
        let Some(tap) = &self.tap else { return false };
        let mut out = Vec::new();
        each_tx_packet(st, view, |st, pkt| {
            if pkt.len() < hdr_len {
                st.tx.counters.error();
                return TxOutcome::Consumed;
            }
            out.clear();
            out.extend_from_slice(&[0u8; TAP_HDR_LEN]);
            out.extend_from_slice(&pkt[hdr_len..]);
            match tap.send(&out) {
                Ok(_) => st.tx.counters.packet(pkt.len() - hdr_len),
                Err(e) => {
                    log::debug!(target: "sim", "queue {}: tap write failed: {e}", st.tx.index);
                    st.tx.counters.drop_one();
                }
            }
            TxOutcome::Consumed
        })
    }

    fn tap_to_rx(&mut self, st: &mut PairState, view: &IotlbView) -> bool {
        let Some(tap) = &self.tap else { return false };
        if !st.rx.ready(view) {
            // Nothing can take a packet: leave them in the tap.
            st.tap_starved = true;
            return false;
        }
        let hdr_len = net_hdr_len(st.features);
        if self.tap_buf.len() != TAP_HDR_LEN + 65_536 {
            self.tap_buf = vec![0u8; TAP_HDR_LEN + 65_536];
        }
        for _ in 0..ROUND_BUDGET {
            let pkt = match st.tap_pending.take() {
                Some(p) => p,
                None => {
                    let Ok(has_avail) = st.rx.has_avail(view) else {
                        return false;
                    };
                    if !has_avail {
                        let at = st.rx.mark();
                        if st.rx.arm_kick(view, at) {
                            continue;
                        }
                        st.tap_starved = true;
                        return false;
                    }
                    match tap.recv(&mut self.tap_buf) {
                        Ok(n) if n >= TAP_HDR_LEN => {
                            // Fresh header: the sim negotiates no offloads, so
                            // nothing from the tap's header applies.
                            let mut p = vec![0u8; hdr_len + n - TAP_HDR_LEN];
                            p[hdr_len..].copy_from_slice(&self.tap_buf[TAP_HDR_LEN..n]);
                            p
                        }
                        Ok(_) => {
                            st.rx.counters.error();
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            st.tap_starved = false;
                            return false;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::warn!(target: "sim", "tap read failed: {e}");
                            st.rx.counters.error();
                            st.tap_starved = false;
                            return false;
                        }
                    }
                }
            };
            match deliver(&mut st.rx, view, &pkt, st.features) {
                Deliver::Done => st.rx.counters.packet(pkt.len() - hdr_len),
                Deliver::Dropped => st.rx.counters.drop_one(),
                Deliver::NoRoom { seen } => {
                    st.tap_pending = Some(pkt);
                    if st.rx.arm_kick(view, seen) {
                        continue;
                    }
                    st.tap_starved = true;
                    return false;
                }
                Deliver::Broken => {
                    st.tap_pending = Some(pkt);
                    return false;
                }
            }
        }
        st.tap_starved = false;
        true
    }
}

/// Reads an eventfd's counter if it is set, without ever blocking: the fd may
/// be blocking and shared with a relay that reads it too.
fn drain(fd: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd that lives across the call; timeout 0.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r == 1 && pfd.revents & libc::POLLIN != 0 {
        let _ = fd.read();
    }
}

enum TxOutcome {
    Consumed,
    /// Put the chain back and stop: the destination has no room.
    Retry,
    /// Put the chain back and try again at once (room appeared meanwhile).
    RetryNow,
}

/// Pops TX chains and hands each packet (header included) to `f`. Returns
/// true if the round budget ran out with work left.
fn each_tx_packet<F>(st: &mut PairState, view: &IotlbView, mut f: F) -> bool
where
    F: FnMut(&mut PairState, &[u8]) -> TxOutcome,
{
    if !st.tx.ready(view) || st.tx.disable_kicks(view).is_err() {
        return false;
    }
    for _ in 0..ROUND_BUDGET {
        let start = st.tx.mark();
        let Ok(next) = st.tx.pop(view) else {
            return false;
        };
        let Some(c) = next else {
            // Ask for a kick at the next chain; one may have come meanwhile.
            if st.tx.arm_kick(view, start) {
                continue;
            }
            return false;
        };
        match chain::read_readable(view, &c, MAX_PACKET) {
            Ok(Some(pkt)) => match f(st, &pkt) {
                TxOutcome::Consumed => {}
                TxOutcome::Retry => {
                    st.tx.rewind(start);
                    return false;
                }
                TxOutcome::RetryNow => {
                    st.tx.rewind(start);
                    continue;
                }
            },
            Ok(None) => {
                log::debug!(target: "sim", "queue {}: packet of {} bytes dropped", st.tx.index, c.read_len);
                st.tx.counters.error();
            }
            Err(e) => {
                st.tx.rewind(start);
                st.tx
                    .break_queue(&format_args!("reading chain {}: {e}", c.head));
                return false;
            }
        }
        if !st.tx.add_used(view, &c, 0) {
            return false;
        }
    }
    true
}

/// Loopback: TX of the pair goes to RX of the same pair. TX waits (is not
/// consumed) while RX has no room.
fn tx_loopback(st: &mut PairState, view: &IotlbView) -> bool {
    if !st.rx.ready(view) {
        return false;
    }
    let hdr_len = net_hdr_len(st.features);
    each_tx_packet(st, view, |st, pkt| {
        if pkt.len() < hdr_len {
            st.tx.counters.error();
            return TxOutcome::Consumed;
        }
        let frame = pkt.len() - hdr_len;
        match deliver(&mut st.rx, view, pkt, st.features) {
            Deliver::Done => {
                st.tx.counters.packet(frame);
                st.rx.counters.packet(frame);
                TxOutcome::Consumed
            }
            Deliver::Dropped => {
                st.tx.counters.packet(frame);
                st.rx.counters.drop_one();
                TxOutcome::Consumed
            }
            Deliver::NoRoom { seen } => {
                if st.rx.arm_kick(view, seen) {
                    TxOutcome::RetryNow
                } else {
                    TxOutcome::Retry
                }
            }
            Deliver::Broken => TxOutcome::Retry,
        }
    })
}

/// Copies one packet (virtio-net header + frame) into RX chains, setting
/// num_buffers. Consumes nothing unless the whole packet fits.
fn deliver(rx: &mut Vq, view: &IotlbView, pkt: &[u8], features: u64) -> Deliver {
    let mrg = features & bits::NET_F_MRG_RXBUF != 0;
    let hdr_len = net_hdr_len(features);
    let start = rx.mark();
    let mut chains: Vec<Chain> = Vec::new();
    let mut cap = 0u64;
    let mut error = None;
    let outcome = loop {
        if cap >= pkt.len() as u64 {
            break None;
        }
        let seen = rx.mark();
        match rx.pop(view) {
            Err(Broken) => break Some(Deliver::Broken),
            Ok(None) => break Some(Deliver::NoRoom { seen }),
            // The device must always be able to write the header (a
            // driver MUST with MRG_RXBUF; without it a smaller chain
            // holds no packet either). Such a chain is a malformed ring,
            // not a lack of room: waiting would wait forever, and with
            // MRG_RXBUF it would be merged as an empty buffer.
            Ok(Some(c)) if c.write_len < hdr_len as u64 => {
                error = Some(chain::ChainError::NoRoomForHeader {
                    head: c.head,
                    writable: c.write_len,
                    need: hdr_len,
                });
                break Some(Deliver::Broken);
            }
            Ok(Some(c)) => {
                if !mrg && c.write_len < pkt.len() as u64 {
                    break Some(Deliver::Dropped);
                }
                cap += c.write_len;
                chains.push(c);
            }
        }
    };
    if let Some(outcome) = outcome {
        rx.rewind(start);
        if let Some(e) = error {
            rx.break_queue(&e);
        }
        return outcome;
    }
    let mut data = pkt.to_vec();
    if hdr_len == 12 {
        let nb = if mrg { chains.len() as u16 } else { 1 };
        data[10..12].copy_from_slice(&nb.to_le_bytes());
    }
    let mut off = 0usize;
    for c in &chains {
        let n = match chain::write_writable(view, c, &data[off..]) {
            Ok(n) => n,
            Err(e) => {
                rx.break_queue(&format_args!("writing chain {}: {e}", c.head));
                return Deliver::Broken;
            }
        };
        off += n;
        // n <= MAX_PACKET, so it fits a u32.
        if !rx.add_used(view, c, n as u32) {
            return Deliver::Broken;
        }
    }
    Deliver::Done
}
