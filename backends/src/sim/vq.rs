//! One device-side virtqueue of the sim: virtio-queue's `Queue` plus what the
//! vhost-like control plane set on it, and notification helpers.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::iotlb::IotlbView;
use crate::VringAddrs;

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Per-queue counters the daemon reports over QMP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimQueueStats {
    /// Packets completed on this queue (sent for TX, received for RX).
    pub packets: u64,
    /// Frame bytes of those packets, virtio-net header excluded.
    pub bytes: u64,
    /// Guest errors seen on this queue: malformed rings or chains, packets
    /// shorter than the header or longer than the sim handles.
    pub errors: u64,
    /// Packets dropped on their way into this queue (RX: did not fit one
    /// buffer without MRG_RXBUF; TX: the tap refused them).
    pub dropped: u64,
    /// The queue stopped on a malformed ring; it restarts when reconfigured
    /// (set_vring_num/addr/base, enable, reset).
    pub broken: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) packets: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) broken: AtomicBool,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SimQueueStats {
        SimQueueStats {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            broken: self.broken.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn packet(&self, bytes: usize) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) struct Vq {
    pub(crate) index: usize,
    pub(crate) queue: Queue,
    pub(crate) addrs: Option<VringAddrs>,
    pub(crate) kick: Option<Arc<EventFd>>,
    pub(crate) call: Option<Arc<EventFd>>,
    pub(crate) enabled: bool,
    pub(crate) broken: bool,
    /// The ring areas were found outside the IOTLB (see `ready`).
    rings_unmapped: bool,
    /// Used entries were added since the driver was last considered for an
    /// interrupt.
    pub(crate) added: bool,
    pub(crate) counters: Arc<Counters>,
}

impl Vq {
    pub(crate) fn new(index: usize, max_size: u16, counters: Arc<Counters>) -> Option<Self> {
        Some(Vq {
            index,
            queue: Queue::new(max_size).ok()?,
            addrs: None,
            kick: None,
            call: None,
            enabled: false,
            broken: false,
            rings_unmapped: false,
            added: false,
            counters,
        })
    }

    /// Forget ring state (device reset); the eventfds stay, as they do on a
    /// vhost-vdpa reset (they belong to the vhost layer, not to the device).
    pub(crate) fn reset(&mut self) {
        self.queue.reset();
        self.addrs = None;
        self.enabled = false;
        self.added = false;
        self.set_broken(false);
    }

    pub(crate) fn set_broken(&mut self, broken: bool) {
        self.broken = broken;
        if !broken {
            self.rings_unmapped = false;
        }
        self.counters.broken.store(broken, Ordering::Relaxed);
    }

    /// Stops the queue after a guest error. Logged once per breakage.
    pub(crate) fn break_queue(&mut self, why: &dyn std::fmt::Display) {
        if !self.broken {
            log::error!(target: "sim", "queue {}: {why}; queue stopped until it is reconfigured", self.index);
        }
        self.counters.error();
        self.set_broken(true);
    }

    /// Queue is configured and its ring areas are inside the IOTLB. Rings
    /// outside the IOTLB hold the queue (reported as broken, counted once)
    /// until a later dma_map makes them reachable: mapping order is the
    /// relay's business, and nothing was taken from the ring yet.
    pub(crate) fn ready(&mut self, view: &IotlbView) -> bool {
        if !self.enabled || self.broken || self.addrs.is_none() {
            return false;
        }
        let size = u64::from(self.queue.size());
        let desc = self.queue.desc_table();
        let avail = self.queue.avail_ring();
        let used = self.queue.used_ring();
        let problem = if !view.readable(desc, 16 * size) {
            Some(("descriptor table", desc))
        } else if !view.readable(avail, 6 + 2 * size) {
            Some(("avail ring", avail))
        } else if !view.writable(used, 6 + 8 * size) {
            Some(("used ring", used))
        } else {
            None
        };
        match problem {
            Some((what, addr)) => {
                if !self.rings_unmapped {
                    log::error!(target: "sim", "queue {}: {what} at IOVA {addr:#x} is not mapped (writable); queue held until it is", self.index);
                    self.counters.error();
                    self.rings_unmapped = true;
                    self.counters.broken.store(true, Ordering::Relaxed);
                }
                false
            }
            None => {
                if self.rings_unmapped {
                    self.rings_unmapped = false;
                    self.counters.broken.store(false, Ordering::Relaxed);
                }
                true
            }
        }
    }

    /// Interrupts the driver for the used entries added since the last call,
    /// unless it suppressed interrupts (used_event under EVENT_IDX,
    /// VRING_AVAIL_F_NO_INTERRUPT otherwise).
    pub(crate) fn signal_used(&mut self, view: &IotlbView) {
        if !self.added {
            return;
        }
        self.added = false;
        let notify = if self.queue.event_idx_enabled() {
            match self.queue.needs_notification(&view.mem) {
                Ok(n) => n,
                Err(e) => {
                    self.break_queue(&format_args!("reading used_event: {e}"));
                    true
                }
            }
        } else {
            // Order the used idx store before reading the driver's flags.
            fence(Ordering::SeqCst);
            match view
                .mem
                .load::<u16>(GuestAddress(self.queue.avail_ring()), Ordering::Relaxed)
            {
                Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
                Err(e) => {
                    self.break_queue(&format_args!("reading avail flags: {e}"));
                    true
                }
            }
        };
        if notify {
            if let Some(call) = &self.call {
                if let Err(e) = call.write(1) {
                    log::warn!(target: "sim", "queue {}: call eventfd write failed: {e}", self.index);
                }
            }
        }
    }

    /// Asks the driver to kick once more buffers arrive, given that the device
    /// has seen avail index `seen`. Returns true if buffers arrived meanwhile
    /// (the caller retries instead of waiting).
    pub(crate) fn arm_kick(&mut self, view: &IotlbView, seen: u16) -> bool {
        let res = if self.queue.event_idx_enabled() {
            // avail_event = seen: the driver's next avail idx increment crosses it.
            let off = 4 + 8 * u64::from(self.queue.size());
            view.mem
                .store(
                    seen.to_le(),
                    GuestAddress(self.queue.used_ring().wrapping_add(off)),
                    Ordering::Relaxed,
                )
                .map_err(|e| e.to_string())
        } else {
            view.mem
                .store(
                    0u16,
                    GuestAddress(self.queue.used_ring()),
                    Ordering::Relaxed,
                )
                .map_err(|e| e.to_string())
        };
        if let Err(e) = res {
            self.break_queue(&format_args!("writing notification state: {e}"));
            return false;
        }
        fence(Ordering::SeqCst);
        match self.queue.avail_idx(&view.mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != seen,
            Err(e) => {
                self.break_queue(&format_args!("reading avail idx: {e}"));
                false
            }
        }
    }

    pub(crate) fn avail_idx(&mut self, view: &IotlbView) -> Option<u16> {
        match self.queue.avail_idx(&view.mem, Ordering::Acquire) {
            Ok(idx) => Some(idx.0),
            Err(e) => {
                self.break_queue(&format_args!("reading avail idx: {e}"));
                None
            }
        }
    }

    /// Leaves the ring asking for kicks, so whoever drives it next (a relay's
    /// shadow queue after a hand-over) is not left waiting for a kick the
    /// driver was told not to send.
    pub(crate) fn release_notifications(&mut self, view: &IotlbView) {
        let used_len = 6 + 8 * u64::from(self.queue.size());
        if self.enabled
            && !self.broken
            && self.addrs.is_some()
            && view.writable(self.queue.used_ring(), used_len)
        {
            let next = self.queue.next_avail();
            let _ = self.arm_kick(view, next);
        }
    }

    pub(crate) fn add_used(&mut self, view: &IotlbView, head: u16, len: u32) -> bool {
        match self.queue.add_used(&view.mem, head, len) {
            Ok(()) => {
                self.added = true;
                true
            }
            Err(e) => {
                self.break_queue(&format_args!("writing used entry: {e}"));
                false
            }
        }
    }
}
