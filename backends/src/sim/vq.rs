//! One device-side virtqueue of the sim: its ring (virtio-queue's split
//! `Queue`, or the sim's packed one), what the vhost-like control plane set
//! on it, and the operations the worker needs, the same for both layouts.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, Chain};
use super::iotlb::IotlbView;
use super::packed::PackedQueue;
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
    /// The split ring (virtio-queue) and the packed one; `packed` says
    /// which the driver negotiated. Both get every size and address, so
    /// the layout can change with the features alone.
    queue: Queue,
    ring: PackedQueue,
    packed: bool,
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

/// The queue broke (the reason is logged and counted by `break_queue`).
pub(crate) struct Broken;

impl Vq {
    pub(crate) fn new(index: usize, max_size: u16, counters: Arc<Counters>) -> Option<Self> {
        Some(Vq {
            index,
            queue: Queue::new(max_size).ok()?,
            ring: PackedQueue::new(max_size),
            packed: false,
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
        self.ring.reset(self.queue.size());
        self.packed = false;
        self.addrs = None;
        self.enabled = false;
        self.added = false;
        self.set_broken(false);
    }

    /// The ring layout and notification rules the driver negotiated.
    pub(crate) fn set_features(&mut self, packed: bool, event_idx: bool) {
        self.packed = packed;
        self.queue.set_event_idx(event_idx);
        self.ring.set_event_idx(event_idx);
    }

    pub(crate) fn is_packed(&self) -> bool {
        self.packed
    }

    pub(crate) fn size(&self) -> u16 {
        self.queue.size()
    }

    pub(crate) fn set_size(&mut self, num: u16) {
        self.queue.set_size(num);
        self.ring.set_size(num);
        self.set_broken(false);
    }

    /// Alignment as the layout needs it: split desc 16, avail 2, used 4;
    /// packed desc 16, driver and device areas 4.
    pub(crate) fn set_addrs(&mut self, addrs: VringAddrs) -> bool {
        let avail_align = if self.packed { 3 } else { 1 };
        if addrs.desc & 15 != 0 || addrs.avail & avail_align != 0 || addrs.used & 3 != 0 {
            return false;
        }
        let split_ok = self
            .queue
            .try_set_desc_table_address(GuestAddress(addrs.desc))
            .and_then(|_| {
                self.queue
                    .try_set_avail_ring_address(GuestAddress(addrs.avail))
            })
            .and_then(|_| {
                self.queue
                    .try_set_used_ring_address(GuestAddress(addrs.used))
            })
            .is_ok();
        if !split_ok {
            return false;
        }
        self.ring.set_addrs(addrs.desc, addrs.avail, addrs.used);
        self.addrs = Some(addrs);
        self.set_broken(false);
        true
    }

    /// The ring position in vhost's layout: the next avail index (split;
    /// the used index is the same, the sim holding nothing between rounds),
    /// or avail and used positions with their wrap counters (packed, low
    /// and high 16 bits).
    pub(crate) fn base(&self) -> u32 {
        if self.packed {
            self.ring.base()
        } else {
            u32::from(self.queue.next_avail())
        }
    }

    /// Sets the position `base` reads back; false for a packed position
    /// outside the ring.
    pub(crate) fn set_base(&mut self, base: u32) -> bool {
        if self.packed {
            if !self.ring.set_base(base) {
                return false;
            }
        } else {
            self.queue.set_next_avail(base as u16);
            self.queue.set_next_used(base as u16);
        }
        self.set_broken(false);
        true
    }

    pub(crate) fn set_ready(&mut self, ready: bool) {
        self.queue.set_ready(ready);
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
        match self.unmapped_area(view) {
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

    fn unmapped_area(&self, view: &IotlbView) -> Option<(&'static str, u64)> {
        if self.packed {
            return self.ring.unmapped_area(view);
        }
        let size = u64::from(self.queue.size());
        let desc = self.queue.desc_table();
        let avail = self.queue.avail_ring();
        let used = self.queue.used_ring();
        if !view.readable(desc, 16 * size) {
            Some(("descriptor table", desc))
        } else if !view.readable(avail, 6 + 2 * size) {
            Some(("avail ring", avail))
        } else if !view.writable(used, 6 + 8 * size) {
            Some(("used ring", used))
        } else {
            None
        }
    }

    /// Interrupts the driver for the used entries added since the last call,
    /// unless it suppressed interrupts (split: used_event under EVENT_IDX,
    /// VRING_AVAIL_F_NO_INTERRUPT otherwise; packed: the driver area).
    pub(crate) fn signal_used(&mut self, view: &IotlbView) {
        if !self.added {
            return;
        }
        self.added = false;
        let notify = if self.packed {
            self.ring
                .needs_notification(view)
                .map_err(|e| e.to_string())
        } else if self.queue.event_idx_enabled() {
            self.queue
                .needs_notification(&view.mem)
                .map_err(|e| e.to_string())
        } else {
            // Order the used idx store before reading the driver's flags.
            fence(Ordering::SeqCst);
            view.mem
                .load::<u16>(GuestAddress(self.queue.avail_ring()), Ordering::Relaxed)
                .map(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
                .map_err(|e| e.to_string())
        };
        let notify = notify.unwrap_or_else(|e| {
            self.break_queue(&format_args!(
                "reading the driver's notification state: {e}"
            ));
            true
        });
        if notify {
            if let Some(call) = &self.call {
                if let Err(e) = call.write(1) {
                    log::warn!(target: "sim", "queue {}: call eventfd write failed: {e}", self.index);
                }
            }
        }
    }

    /// Where the next chain would be taken from; [`rewind`](Self::rewind)
    /// to it gives back every chain taken since (none of them completed),
    /// [`arm_kick`](Self::arm_kick) at it waits for the driver to add one.
    pub(crate) fn mark(&self) -> u16 {
        if self.packed {
            self.ring.mark()
        } else {
            self.queue.next_avail()
        }
    }

    pub(crate) fn rewind(&mut self, mark: u16) {
        if self.packed {
            self.ring.rewind(mark);
        } else {
            self.queue.set_next_avail(mark);
        }
    }

    /// Takes the next available chain, every buffer checked against the
    /// IOTLB. A malformed ring breaks the queue, with the chain left where
    /// it was.
    pub(crate) fn pop(&mut self, view: &IotlbView) -> Result<Option<Chain>, Broken> {
        let start = self.mark();
        let res = if self.packed {
            self.ring.pop(view).map_err(|e| e.to_string())
        } else {
            match self.queue.iter(&view.mem) {
                Ok(mut it) => match it.next() {
                    Some(dc) => chain::walk(view, dc).map(Some).map_err(|e| e.to_string()),
                    None => Ok(None),
                },
                Err(e) => Err(format!("avail ring: {e}")),
            }
        };
        res.map_err(|e| {
            self.rewind(start);
            self.break_queue(&e);
            Broken
        })
    }

    /// Whether a chain is available (without taking it).
    pub(crate) fn has_avail(&mut self, view: &IotlbView) -> Result<bool, Broken> {
        let res = if self.packed {
            self.ring.has_avail(view).map_err(|e| e.to_string())
        } else {
            self.queue
                .avail_idx(&view.mem, Ordering::Acquire)
                .map(|idx| idx.0 != self.queue.next_avail())
                .map_err(|e| e.to_string())
        };
        res.map_err(|e| {
            self.break_queue(&format_args!("reading the avail ring: {e}"));
            Broken
        })
    }

    /// No kicks wanted: the worker is taking chains anyway.
    pub(crate) fn disable_kicks(&mut self, view: &IotlbView) -> Result<(), Broken> {
        let res = if self.packed {
            self.ring.disable_kicks(view).map_err(|e| e.to_string())
        } else {
            self.queue
                .disable_notification(&view.mem)
                .map_err(|e| e.to_string())
        };
        res.map_err(|e| {
            self.break_queue(&format_args!("writing notification state: {e}"));
            Broken
        })
    }

    /// Asks the driver to kick once it adds a chain at `mark` (see
    /// [`mark`](Self::mark)). Returns true if one arrived meanwhile (the
    /// caller retries instead of waiting).
    pub(crate) fn arm_kick(&mut self, view: &IotlbView, mark: u16) -> bool {
        if self.packed {
            return match self.ring.arm_kick(view, mark) {
                Ok(more) => more,
                Err(e) => {
                    self.break_queue(&format_args!("writing notification state: {e}"));
                    false
                }
            };
        }
        let res = if self.queue.event_idx_enabled() {
            // avail_event = mark: the driver's next avail idx increment crosses it.
            let off = 4 + 8 * u64::from(self.queue.size());
            view.mem
                .store(
                    mark.to_le(),
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
            Ok(idx) => idx.0 != mark,
            Err(e) => {
                self.break_queue(&format_args!("reading avail idx: {e}"));
                false
            }
        }
    }

    /// Leaves the ring asking for kicks, so whoever drives it next (a relay's
    /// shadow queue after a hand-over) is not left waiting for a kick the
    /// driver was told not to send.
    pub(crate) fn release_notifications(&mut self, view: &IotlbView) {
        if self.enabled
            && !self.broken
            && self.addrs.is_some()
            && self.unmapped_area(view).is_none()
        {
            if self.packed {
                let _ = self.ring.release(view);
            } else {
                let next = self.queue.next_avail();
                let _ = self.arm_kick(view, next);
            }
        }
    }

    pub(crate) fn add_used(&mut self, view: &IotlbView, chain: &Chain, len: u32) -> bool {
        let res = if self.packed {
            self.ring
                .add_used(view, chain, len)
                .map_err(|e| e.to_string())
        } else {
            self.queue
                .add_used(&view.mem, chain.head, len)
                .map_err(|e| e.to_string())
        };
        match res {
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
