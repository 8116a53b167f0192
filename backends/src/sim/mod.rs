//! Built-in software virtio-net device, processing rings through its own
//! IOTLB exactly as a vDPA device does.
//!
//! - Loopback ([`SimMode::Loopback`]): every packet sent on TX queue 2k+1 is
//!   received on RX queue 2k, like the kernel's vdpa_sim_net. TX waits (its
//!   chain stays in the avail ring) while RX has no room: backpressure, never
//!   loss. Without MRG_RXBUF a packet larger than one RX chain is dropped and
//!   counted ([`SimQueueStats::dropped`]); the RX chain is left for the next one.
//! - TAP ([`SimMode::Tap`]): TX goes to a host tap interface (IFF_VNET_HDR,
//!   12-byte header, no offloads), the tap's packets go to RX; the tap is not
//!   read while RX has no buffers.
//!
//! Behaviour a relay can rely on:
//! - Ring addresses are IOVAs; only memory given to `dma_map` is reachable.
//!   Once `dma_unmap` returns, no worker touches that memory any more.
//! - A ring is processed only while the status has DRIVER_OK, the queue is
//!   enabled and has addresses, and the device is not suspended (as with vDPA
//!   hardware). Enabling a queue, setting DRIVER_OK and `resume` each process
//!   the rings once without waiting for a kick.
//! - Between control operations nothing is in flight inside the device: every
//!   chain taken from an avail ring is completed before the worker lets go of
//!   the pair. So after `suspend` (or with the queue disabled) `vring_base` is
//!   both the next avail index and the published used index.
//! - Ring layout (num, addresses, base) cannot change under a running queue;
//!   re-sending identical values is accepted.
//! - `set_status(0)` resets features and ring state (`vring_base` reads 0
//!   afterwards: read it before resetting) but keeps IOVA mappings and the
//!   kick/call eventfds.
//! - A malformed ring (descriptor loop, bad index, buffer outside the IOTLB,
//!   write into a read-only mapping, avail index running ahead, an RX chain
//!   too small for the virtio-net header) stops only its own queue: the
//!   offending chain is given back (not completed), an error is logged with
//!   target "sim", and [`SimQueueStats::broken`] is set until the queue is
//!   reconfigured (num/addr/base set, enable, reset). Ring areas outside the
//!   IOTLB hold the queue the same way, but only until a dma_map makes them
//!   reachable.
//! - An RX chain must have at least the header's size (12 bytes with
//!   VERSION_1 or MRG_RXBUF, else 10) of device-writable bytes; it is checked
//!   when a packet reaches it. A smaller one (a read-only chain too) is not
//!   "no room", which would hold TX forever, nor merged as an empty buffer.
//! - MQ is offered with more than one pair, without CTRL_VQ (no control
//!   queue): all pairs run. IN_ORDER is never offered.
//! - Split and packed rings (RING_PACKED, offered): with packed rings the
//!   base is the avail and used positions with their wrap counters
//!   (`vring_base_packed`); both are equal whenever a control operation
//!   looks, the sim holding no chain between rounds.
//!
//! One worker thread per queue pair; dropping [`SimNet`] stops and joins them.

mod chain;
mod config;
mod iotlb;
mod packed;
mod tap;
mod vq;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{BackendError, DeviceBackend, DmaRegion, IovaRange, Result, VringAddrs};
use config::{bits, status, CONFIG_SIZE};
use iotlb::{Iotlb, IotlbView, IOVA_RANGE};
use vq::{Counters, Vq};
use worker::{Pair, PairState, Worker};

pub use vq::SimQueueStats;

/// Where the sim's packets go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimMode {
    /// TX of pair k comes back on RX of pair k.
    Loopback,
    /// A host tap interface (created if it does not exist; multi-queue when
    /// there is more than one pair).
    Tap(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Queue pairs (1..=0x8000); MQ is offered when more than one.
    pub queue_pairs: u16,
    /// Largest ring size accepted (power of two, up to 32768).
    pub max_queue_size: u16,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub mode: SimMode,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            queue_pairs: 1,
            max_queue_size: 1024,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 1500,
            mode: SimMode::Loopback,
        }
    }
}

/// The software virtio-net device. Dropping it stops and joins its threads.
pub struct SimNet {
    cfg: SimConfig,
    offered: u64,
    features: u64,
    status: u8,
    mac: [u8; 6],
    iotlb: Iotlb,
    pairs: Vec<Arc<Pair>>,
    threads: Vec<JoinHandle<()>>,
    counters: Vec<Arc<Counters>>,
}

impl SimNet {
    pub fn new(cfg: SimConfig) -> Result<SimNet> {
        let max = cfg.max_queue_size;
        if max == 0 || !max.is_power_of_two() || max > 32768 {
            return Err(BackendError::InvalidQueueSize(max, 32768));
        }
        if cfg.queue_pairs == 0 || cfg.queue_pairs > 0x8000 {
            return Err(BackendError::Device(format!(
                "sim: {} queue pairs requested, 1..=32768 supported",
                cfg.queue_pairs
            )));
        }
        let view = Arc::new(IotlbView::empty());
        let mut sim = SimNet {
            offered: config::device_features(cfg.queue_pairs),
            features: 0,
            status: 0,
            mac: cfg.mac,
            iotlb: Iotlb::default(),
            pairs: Vec::new(),
            threads: Vec::new(),
            counters: Vec::new(),
            cfg,
        };
        // On an error below, Drop stops the workers already started.
        for k in 0..usize::from(sim.cfg.queue_pairs) {
            let rxc = Arc::new(Counters::default());
            let txc = Arc::new(Counters::default());
            sim.counters.push(Arc::clone(&rxc));
            sim.counters.push(Arc::clone(&txc));
            let bad_size = || BackendError::InvalidQueueSize(max, 32768);
            let rx = Vq::new(2 * k, max, rxc).ok_or_else(bad_size)?;
            let tx = Vq::new(2 * k + 1, max, txc).ok_or_else(bad_size)?;
            let pair = Arc::new(Pair {
                state: Mutex::new(PairState::new(Arc::clone(&view), rx, tx)),
                wake: EventFd::new(EFD_NONBLOCK)?,
                stop: AtomicBool::new(false),
            });
            let tap = match &sim.cfg.mode {
                SimMode::Loopback => None,
                SimMode::Tap(ifname) => Some(tap::Tap::open(ifname, sim.cfg.queue_pairs > 1)?),
            };
            let worker = Worker::new(Arc::clone(&pair), tap)?;
            let handle = std::thread::Builder::new()
                .name(format!("sim-pair{k}"))
                .spawn(move || worker.run())?;
            sim.pairs.push(pair);
            sim.threads.push(handle);
        }
        Ok(sim)
    }

    /// Counters of one data queue (RX of pair k is 2k, TX is 2k + 1).
    pub fn queue_stats(&self, queue: usize) -> Option<SimQueueStats> {
        self.counters.get(queue).map(|c| c.snapshot())
    }

    fn pair_of(&self, queue: usize) -> Result<&Arc<Pair>> {
        self.pairs.get(queue / 2).ok_or(BackendError::InvalidQueue {
            index: queue,
            count: self.pairs.len() * 2,
        })
    }

    fn lock(pair: &Pair) -> Result<MutexGuard<'_, PairState>> {
        pair.state
            .lock()
            .map_err(|_| BackendError::Device("sim worker thread panicked".into()))
    }

    /// Runs `f` on one queue with its pair locked (so the worker is between
    /// rounds), then lets the worker look at the result if the pair runs.
    /// A suspended pair is not woken: nothing it would do changes until
    /// `resume`, which wakes every pair, so a relay reprogramming all
    /// queues while suspended (a mode switch) costs no wake-up per call.
    fn with_vq<R>(
        &self,
        queue: usize,
        f: impl FnOnce(&mut PairState, bool) -> Result<R>,
    ) -> Result<R> {
        let pair = self.pair_of(queue)?;
        let (r, running) = {
            let mut st = Self::lock(pair)?;
            (f(&mut st, queue % 2 == 1), st.running())
        };
        if running {
            pair.poke();
        }
        r
    }

    fn each_pair(&self, mut f: impl FnMut(&mut PairState)) -> Result<()> {
        for pair in &self.pairs {
            {
                let mut st = Self::lock(pair)?;
                f(&mut st);
            }
            pair.poke();
        }
        Ok(())
    }

    /// Sets a ring's position (split: the low 16 bits; packed: avail and
    /// used positions with wrap counters), unless it would move a running
    /// ring.
    fn set_base(&self, queue: usize, base: u32, packed_call: bool) -> Result<()> {
        self.with_vq(queue, |st, tx| {
            let is_active = active(st, tx);
            let vq = vq_mut(st, tx);
            if packed_call && !vq.is_packed() {
                return Err(BackendError::InvalidState {
                    op: "set_vring_base_packed",
                    why: "the ring is split (RING_PACKED not negotiated)",
                });
            }
            let base = if vq.is_packed() { base } else { base & 0xffff };
            if is_active && vq.base() != base {
                return Err(BackendError::InvalidState {
                    op: "set_vring_base",
                    why: BUSY,
                });
            }
            if !vq.set_base(base) {
                return Err(BackendError::InvalidState {
                    op: "set_vring_base",
                    why: "packed ring position outside the ring",
                });
            }
            Ok(())
        })
    }

    fn publish_iotlb(&self) -> Result<()> {
        let view = Arc::new(self.iotlb.view()?);
        // Taking each pair's lock also waits out a round still using the old
        // view: once this returns, no worker touches unmapped memory.
        self.each_pair(|st| st.view = Arc::clone(&view))
    }
}

fn vq_mut(st: &mut PairState, tx: bool) -> &mut Vq {
    if tx {
        &mut st.tx
    } else {
        &mut st.rx
    }
}

/// The worker may be processing the queue right now, so its ring layout may
/// not change. A queue without addresses or a broken one is not processed.
fn active(st: &PairState, tx: bool) -> bool {
    let vq = if tx { &st.tx } else { &st.rx };
    st.driver_ok && !st.suspended && vq.enabled && vq.addrs.is_some() && !vq.broken
}

const BUSY: &str = "the queue is running (disable it or suspend the device first)";

impl DeviceBackend for SimNet {
    fn kind(&self) -> &'static str {
        match self.cfg.mode {
            SimMode::Loopback => "sim",
            SimMode::Tap(_) => "tap",
        }
    }

    fn in_process(&self) -> bool {
        true
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let extra = features & !self.offered;
        if extra != 0 {
            return Err(BackendError::UnsupportedFeatures(extra));
        }
        if self.status & status::FEATURES_OK != 0 {
            return Err(BackendError::InvalidState {
                op: "set_features",
                why: "features are fixed once FEATURES_OK is set (reset first)",
            });
        }
        self.features = features;
        let event_idx = features & bits::RING_F_EVENT_IDX != 0;
        let packed = features & bits::F_RING_PACKED != 0;
        self.each_pair(|st| {
            st.features = features;
            st.rx.set_features(packed, event_idx);
            st.tx.set_features(packed, event_idx);
        })
    }

    fn num_queues(&self) -> usize {
        2 * usize::from(self.cfg.queue_pairs)
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.max_queue_size
    }

    fn iova_range(&self) -> IovaRange {
        IOVA_RANGE
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn get_config(&self, offset: u32, buf: &mut [u8]) -> Result<()> {
        let c = config::config_bytes(self.mac, self.cfg.queue_pairs, self.cfg.mtu);
        let range = crate::config_range(offset, buf.len(), CONFIG_SIZE)?;
        buf.copy_from_slice(&c[range]);
        Ok(())
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let range = crate::config_range(offset, data.len(), CONFIG_SIZE)?;
        // Only the MAC is writable (legacy drivers set it this way); writes to
        // the read-only fields are ignored, as virtio-net devices do.
        for (i, b) in range.zip(data) {
            if i < 6 {
                self.mac[i] = *b;
            }
        }
        Ok(())
    }

    fn set_status(&mut self, new: u8) -> Result<()> {
        if new == 0 {
            self.status = 0;
            self.features = 0;
            return self.each_pair(|st| st.reset());
        }
        if self.status & !new != 0 {
            return Err(BackendError::InvalidState {
                op: "set_status",
                why: "status bits can only be cleared by a reset (status 0)",
            });
        }
        self.status = new;
        let driver_ok = new & status::DRIVER_OK != 0;
        self.each_pair(|st| st.driver_ok = driver_ok)
    }

    fn status(&self) -> u8 {
        self.status
    }

    fn dma_map(&mut self, region: DmaRegion) -> Result<()> {
        self.iotlb.map(region)?;
        self.publish_iotlb()
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        self.iotlb.unmap(iova, size)?;
        self.publish_iotlb()
    }

    fn set_vring_num(&mut self, queue: usize, num: u16) -> Result<()> {
        let max = self.cfg.max_queue_size;
        if num == 0 || !num.is_power_of_two() || num > max {
            return Err(BackendError::InvalidQueueSize(num, max));
        }
        self.with_vq(queue, |st, tx| {
            let is_active = active(st, tx);
            let vq = vq_mut(st, tx);
            if vq.size() == num {
                return Ok(());
            }
            if is_active {
                return Err(BackendError::InvalidState {
                    op: "set_vring_num",
                    why: BUSY,
                });
            }
            vq.set_size(num);
            Ok(())
        })
    }

    fn set_vring_addr(&mut self, queue: usize, addrs: VringAddrs) -> Result<()> {
        self.with_vq(queue, |st, tx| {
            let is_active = active(st, tx);
            let vq = vq_mut(st, tx);
            if vq.addrs == Some(addrs) {
                return Ok(());
            }
            if is_active {
                return Err(BackendError::InvalidState {
                    op: "set_vring_addr",
                    why: BUSY,
                });
            }
            if !vq.set_addrs(addrs) {
                return Err(BackendError::InvalidState {
                    op: "set_vring_addr",
                    why: "ring addresses must be aligned (desc 16, avail 2 (packed: driver area 4), used 4)",
                });
            }
            Ok(())
        })
    }

    fn set_vring_base(&mut self, queue: usize, base: u16) -> Result<()> {
        // A packed ring given a 16-bit base (avail position and wrap
        // counter) has nothing in flight: used is the same.
        self.set_base(queue, u32::from(base) | u32::from(base) << 16, false)
    }

    fn vring_base(&mut self, queue: usize) -> Result<u16> {
        self.with_vq(queue, |st, tx| Ok(vq_mut(st, tx).base() as u16))
    }

    fn set_vring_base_packed(&mut self, queue: usize, base: u32) -> Result<()> {
        self.set_base(queue, base, true)
    }

    fn vring_base_packed(&mut self, queue: usize) -> Result<u32> {
        self.with_vq(queue, |st, tx| {
            let vq = vq_mut(st, tx);
            if !vq.is_packed() {
                return Err(BackendError::InvalidState {
                    op: "vring_base_packed",
                    why: "the ring is split (RING_PACKED not negotiated)",
                });
            }
            Ok(vq.base())
        })
    }

    fn set_vring_kick(&mut self, queue: usize, fd: Arc<EventFd>) -> Result<()> {
        self.with_vq(queue, |st, tx| {
            vq_mut(st, tx).kick = Some(fd);
            st.fds_gen += 1;
            Ok(())
        })
    }

    fn set_vring_call(&mut self, queue: usize, fd: Option<Arc<EventFd>>) -> Result<()> {
        self.with_vq(queue, |st, tx| {
            vq_mut(st, tx).call = fd;
            Ok(())
        })
    }

    fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<()> {
        self.with_vq(queue, |st, tx| {
            let view = Arc::clone(&st.view);
            let vq = vq_mut(st, tx);
            if vq.enabled == enable {
                return Ok(());
            }
            if !enable {
                vq.release_notifications(&view);
            } else {
                vq.set_broken(false);
            }
            vq.enabled = enable;
            vq.set_ready(enable);
            Ok(())
        })
    }

    fn suspend(&mut self) -> Result<()> {
        self.each_pair(|st| {
            if !st.suspended {
                st.suspended = true;
                let view = Arc::clone(&st.view);
                st.rx.release_notifications(&view);
                st.tx.release_notifications(&view);
            }
        })
    }

    fn resume(&mut self) -> Result<()> {
        self.each_pair(|st| st.suspended = false)
    }
}

impl Drop for SimNet {
    fn drop(&mut self) {
        for pair in &self.pairs {
            pair.stop.store(true, Ordering::Release);
            pair.poke();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!(target: "sim", "a sim worker thread panicked");
            }
        }
    }
}
