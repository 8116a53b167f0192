//! A minimal driver for the device's control virtqueue, in memory the daemon
//! owns.
//!
//! One 4 KiB memfd page holds the ring and the buffers of one command: the
//! daemon sends one command at a time and waits for its used entry. The
//! chain is three descriptors (class+command, data, ack), the layout the
//! virtio spec requires of legacy drivers and accepts from every driver.
//! Split rings (heads 0 -> 1 -> 2) or, when the device negotiated
//! RING_PACKED (which applies to every queue, this one included), a packed
//! ring: the chain takes the next three slots, its head's flags are written
//! last, and the device's used descriptor comes back in the head's slot.
//!
//! The page is mapped RW in the IOVA space the control queue's group uses
//! (ASID 1 when the device can isolate it, otherwise ASID 0 at an IOVA the
//! backend keeps out of the range it reports).

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, MmapRegion, VolatileMemory, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use packed_ring::Pos;

use super::net::ctrl;
use crate::{BackendError, DmaRegion, Result, VringAddrs};

pub(crate) const CVQ_MEM_SIZE: usize = 4096;
/// Ring size used when the device allows it; three descriptors are needed.
const RING_NUM: u16 = 16;
const MIN_RING_NUM: u16 = 4;

const DESC_OFF: usize = 0x000; // 16 * 16 bytes
const AVAIL_OFF: usize = 0x100; // 6 + 2 * 16 bytes
const USED_OFF: usize = 0x200; // 6 + 8 * 16 bytes
const HDR_OFF: usize = 0x400;
const DATA_OFF: usize = 0x440;
const ACK_OFF: usize = 0x800;
const MAX_DATA: usize = ACK_OFF - DATA_OFF;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
/// The buffer id of every command (one is outstanding at a time).
const PACKED_ID: u16 = 0;

/// How long a command may stay unanswered; devices answer synchronously in
/// practice, so this only bounds a broken device.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest sleep between two looks at the used ring when the device does
/// not signal its call eventfd.
const POLL_SLICE: Duration = Duration::from_millis(10);

pub(crate) struct Cvq {
    mem: Arc<MmapRegion>,
    pub(crate) iova: u64,
    pub(crate) num: u16,
    /// Address space the page is mapped in, if it is.
    pub(crate) mapped_asid: Option<u32>,
    next_avail: u16,
    last_used: u16,
    /// Packed layout: where the next chain goes (and its used descriptor
    /// comes back, one command being outstanding at a time).
    packed: Option<Pos>,
    pub(crate) kick: Arc<EventFd>,
    pub(crate) call: Arc<EventFd>,
    /// A command went unanswered: its descriptors may still be in use.
    broken: bool,
}

impl Cvq {
    /// `None` when the device's rings are too small for a command.
    pub(crate) fn new(iova: u64, max_queue_size: u16) -> Result<Option<Cvq>> {
        if max_queue_size < MIN_RING_NUM {
            return Ok(None);
        }
        let mem = hostmem::memfd_region(c"svq-relay-cvq", CVQ_MEM_SIZE)?;
        Ok(Some(Cvq {
            mem: Arc::new(mem),
            iova,
            num: RING_NUM.min(max_queue_size),
            mapped_asid: None,
            next_avail: 0,
            last_used: 0,
            packed: None,
            kick: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            call: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            broken: false,
        }))
    }

    pub(crate) fn region(&self) -> DmaRegion {
        DmaRegion {
            iova: self.iova,
            memory: Arc::clone(&self.mem),
            readonly: false,
        }
    }

    pub(crate) fn addrs(&self) -> VringAddrs {
        VringAddrs {
            desc: self.iova + DESC_OFF as u64,
            avail: self.iova + AVAIL_OFF as u64,
            used: self.iova + USED_OFF as u64,
        }
    }

    /// Back to an empty ring at index 0, split or packed; the device starts
    /// there too after SET_VRING_BASE with [`base`](Self::base).
    pub(crate) fn reset_ring(&mut self, packed: bool) -> Result<()> {
        self.slice()
            .write_slice(&[0u8; CVQ_MEM_SIZE], 0)
            .map_err(mem_err)?;
        self.next_avail = 0;
        self.last_used = 0;
        self.packed = packed.then_some(Pos::START);
        self.broken = false;
        Ok(())
    }

    /// The VHOST_SET_VRING_BASE value of an empty ring.
    pub(crate) fn base(&self) -> u32 {
        if self.packed.is_some() {
            packed_ring::EMPTY_RING_BASE
        } else {
            0
        }
    }

    fn slice(&self) -> VolatileSlice<'_, impl BitmapSlice + '_> {
        self.mem.as_volatile_slice()
    }

    fn write_desc(&self, i: usize, off: usize, len: u32, flags: u16, next: u16) -> Result<()> {
        let m = self.slice();
        let d = DESC_OFF + 16 * i;
        m.write_obj((self.iova + off as u64).to_le(), d)
            .and_then(|_| m.write_obj(len.to_le(), d + 8))
            .and_then(|_| m.write_obj(flags.to_le(), d + 12))
            .and_then(|_| m.write_obj(next.to_le(), d + 14))
            .map_err(mem_err)
    }

    /// Sends one command and waits (at most `timeout`) for the device to use
    /// it. A NACK is [`BackendError::CtrlNack`].
    pub(crate) fn command(
        &mut self,
        class: u8,
        cmd: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<()> {
        if self.broken {
            return Err(BackendError::InvalidState {
                op: "control command",
                why: "an earlier command was never answered; reset the device",
            });
        }
        if data.is_empty() || data.len() > MAX_DATA {
            return Err(BackendError::Device(format!(
                "control command of {} data bytes",
                data.len()
            )));
        }
        let mem = Arc::clone(&self.mem);
        let m = mem.as_volatile_slice();
        m.write_slice(&[class, cmd], HDR_OFF)
            .and_then(|_| m.write_slice(data, DATA_OFF))
            .and_then(|_| m.write_obj(0xffu8, ACK_OFF))
            .map_err(mem_err)?;
        let len = match self.packed {
            Some(at) => self.send_packed(at, data.len() as u32, timeout)?,
            None => self.send_split(data.len() as u32, timeout)?,
        };
        if len < 1 {
            return Err(BackendError::Device(format!(
                "control queue: device wrote no ack for class {class} command {cmd}"
            )));
        }
        let ack = m.read_obj::<u8>(ACK_OFF).map_err(mem_err)?;
        if ack != ctrl::ACK_OK {
            return Err(BackendError::CtrlNack { class, cmd, ack });
        }
        Ok(())
    }

    /// The command's chain on the split ring; the length the device wrote.
    fn send_split(&mut self, data_len: u32, timeout: Duration) -> Result<u32> {
        let mem = Arc::clone(&self.mem);
        let m = mem.as_volatile_slice();
        self.write_desc(0, HDR_OFF, 2, VRING_DESC_F_NEXT, 1)?;
        self.write_desc(1, DATA_OFF, data_len, VRING_DESC_F_NEXT, 2)?;
        self.write_desc(2, ACK_OFF, 1, VRING_DESC_F_WRITE, 0)?;
        let num = usize::from(self.num);
        let slot = usize::from(self.next_avail) % num;
        m.write_obj(0u16.to_le(), AVAIL_OFF + 4 + 2 * slot)
            .map_err(mem_err)?;
        // used_event: with EVENT_IDX the device signals the entry we wait for.
        m.write_obj(self.last_used.to_le(), AVAIL_OFF + 4 + 2 * num)
            .map_err(mem_err)?;
        // The descriptors and the ring slot must be visible before the index.
        fence(Ordering::SeqCst);
        let avail = self.next_avail.wrapping_add(1);
        m.store(avail.to_le(), AVAIL_OFF + 2, Ordering::Release)
            .map_err(mem_err)?;
        self.next_avail = avail;
        fence(Ordering::SeqCst);
        self.kick.write(1)?;
        let used = self
            .wait_until(timeout, |m| {
                let used: u16 = m.load(USED_OFF + 2, Ordering::Acquire).map_err(mem_err)?;
                let used = u16::from_le(used);
                Ok((used != self.last_used).then_some(used))
            })
            .inspect_err(|_| self.broken = true)?;
        if used != self.last_used.wrapping_add(1) {
            self.broken = true;
            return Err(BackendError::Device(format!(
                "control queue: used index moved from {} to {used} for one command",
                self.last_used
            )));
        }
        let elem = USED_OFF + 4 + 8 * (usize::from(self.last_used) % num);
        let id = u32::from_le(m.read_obj::<u32>(elem).map_err(mem_err)?);
        let len = u32::from_le(m.read_obj::<u32>(elem + 4).map_err(mem_err)?);
        self.last_used = used;
        if id != 0 {
            self.broken = true;
            return Err(BackendError::Device(format!(
                "control queue: device used descriptor {id}, only 0 was made available"
            )));
        }
        Ok(len)
    }

    /// The command's chain in the next three slots of the packed ring at
    /// `at`; the length the device wrote.
    fn send_packed(&mut self, at: Pos, data_len: u32, timeout: Duration) -> Result<u32> {
        let num = self.num;
        let chain = [
            (HDR_OFF, 2, VRING_DESC_F_NEXT),
            (DATA_OFF, data_len, VRING_DESC_F_NEXT),
            (ACK_OFF, 1, VRING_DESC_F_WRITE),
        ];
        // The tail first, then the head's address, length and id: the head's
        // flags publish the whole chain.
        let mem = Arc::clone(&self.mem);
        let m = mem.as_volatile_slice();
        let mut head_flags = 0;
        for (i, &(off, len, flags)) in chain.iter().enumerate().rev() {
            let p = at.add(i as u16, num);
            let flags = flags | p.avail_flags();
            let d = DESC_OFF + 16 * usize::from(p.pos);
            m.write_obj((self.iova + off as u64).to_le(), d)
                .and_then(|_| m.write_obj(len.to_le(), d + 8))
                .and_then(|_| m.write_obj(PACKED_ID.to_le(), d + 12))
                .map_err(mem_err)?;
            if i == 0 {
                head_flags = flags;
            } else {
                m.write_obj(flags.to_le(), d + 14).map_err(mem_err)?;
            }
        }
        let head = DESC_OFF + 16 * usize::from(at.pos);
        fence(Ordering::SeqCst);
        m.store(head_flags.to_le(), head + 14, Ordering::Release)
            .map_err(mem_err)?;
        fence(Ordering::SeqCst);
        self.kick.write(1)?;
        self.wait_until(timeout, |m| {
            let flags: u16 = m.load(head + 14, Ordering::Acquire).map_err(mem_err)?;
            Ok(at.is_used(u16::from_le(flags)).then_some(()))
        })
        .inspect_err(|_| self.broken = true)?;
        // The slots of the chain are the driver's again.
        self.packed = Some(at.add(chain.len() as u16, num));
        let id = u16::from_le(m.read_obj::<u16>(head + 12).map_err(mem_err)?);
        let len = u32::from_le(m.read_obj::<u32>(head + 8).map_err(mem_err)?);
        if id != PACKED_ID {
            self.broken = true;
            return Err(BackendError::Device(format!(
                "control queue: device used buffer id {id}, only {PACKED_ID} was made available"
            )));
        }
        Ok(len)
    }

    /// Polls the ring with `done` until it gives a value, or a timeout
    /// error.
    fn wait_until<T>(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&VolatileSlice<'_, ()>) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mem = Arc::clone(&self.mem);
        loop {
            if let Some(v) = done(&mem.as_volatile_slice())? {
                // Drain the interrupt this entry raised, if any.
                let _ = self.call.read();
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(BackendError::Device(format!(
                    "control queue: no answer within {timeout:?}"
                )));
            }
            wait_readable(&self.call, (deadline - now).min(POLL_SLICE));
        }
    }
}

fn mem_err(e: vm_memory::volatile_memory::Error) -> BackendError {
    BackendError::Device(format!("control queue memory access: {e}"))
}

/// Sleeps until `fd` is readable or `max` passed; errors count as a wake-up
/// (the caller looks at the ring and the clock again anyway).
fn wait_readable(fd: &EventFd, max: Duration) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = max.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: `p` is one valid pollfd that lives across the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}
