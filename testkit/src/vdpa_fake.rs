//! A vhost-vdpa virtio-net device played in memory for the vdpa tests.
//!
//! It records every call in order, enforces the rules the kernel enforces
//! (owner, status bits cleared only by reset, FEATURES_OK, ASIDs, batches,
//! overlapping IOTLB updates), and runs the control virtqueue on a thread of
//! its own: woken by the queue's kick eventfd, it reads the ring and the
//! command through the IOTLB entries it was sent (only what was mapped, in
//! the ASID of the queue's group), writes the ack and the used entry, and
//! signals the call eventfd, like a real device.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use backends::vdpa::{backend_bits, IotlbKind, IotlbMsg, VdpaIoctls, ACCESS_RO};
use backends::{IovaRange, VringAddrs};
use vm_memory::{Bytes, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

pub use virtio_features::status::{
    ACKNOWLEDGE as S_ACK, DRIVER as S_DRIVER, DRIVER_OK as S_DRIVER_OK,
    FEATURES_OK as S_FEATURES_OK,
};
pub use virtio_features::{
    F_ACCESS_PLATFORM, F_RING_PACKED, F_VERSION_1, NET_F_CTRL_MAC_ADDR as F_CTRL_MAC_ADDR,
    NET_F_CTRL_RX as F_CTRL_RX, NET_F_CTRL_VLAN as F_CTRL_VLAN, NET_F_CTRL_VQ as F_CTRL_VQ,
    NET_F_MAC as F_MAC, NET_F_MQ as F_MQ, NET_F_MRG_RXBUF as F_MRG_RXBUF, NET_F_MTU as F_MTU,
    NET_F_STATUS as F_STATUS, RING_F_EVENT_IDX as F_EVENT_IDX,
};

/// Packed descriptor flags (virtio 1.2, 2.8.1), spelled out here rather
/// than taken from the relay's packed-ring crate: the fake checks the
/// relay's packed control queue against its own reading of the spec.
const PACKED_F_AVAIL: u16 = 1 << 7;
const PACKED_F_USED: u16 = 1 << 15;
const PACKED_WRAP: u16 = 1 << 15;

pub const fn bf(bit: u32) -> u64 {
    1 << bit
}

/// Every backend feature the kernel knows of (as a recent kernel offers them).
pub const ALL_BACKEND: u64 = bf(backend_bits::IOTLB_MSG_V2)
    | bf(backend_bits::IOTLB_BATCH)
    | bf(backend_bits::IOTLB_ASID)
    | bf(backend_bits::SUSPEND)
    | bf(backend_bits::RESUME)
    | bf(backend_bits::ENABLE_AFTER_DRIVER_OK)
    | bf(backend_bits::IOTLB_PERSIST);

pub const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    SetOwner,
    GetFeatures,
    SetFeatures(u64),
    GetBackendFeatures,
    SetBackendFeatures(u64),
    GetDeviceId,
    GetStatus,
    SetStatus(u8),
    GetConfigSize,
    GetConfig(u32, usize),
    SetConfig(u32, Vec<u8>),
    GetVringNum,
    GetIovaRange,
    GetVqsCount,
    GetGroupNum,
    GetAsNum,
    GetVringGroup(u32),
    SetGroupAsid(u32, u32),
    SetVringNum(u32, u16),
    SetVringAddr(u32, VringAddrs),
    SetVringBase(u32, u32),
    GetVringBase(u32),
    /// queue, bound (false = unbind)
    SetVringKick(u32, bool),
    SetVringCall(u32, bool),
    SetVringEnable(u32, bool),
    Suspend,
    Resume,
    SetConfigCall(bool),
    Iotlb(IotlbMsg),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::SetOwner => "SET_OWNER",
            Op::GetFeatures => "GET_FEATURES",
            Op::SetFeatures(_) => "SET_FEATURES",
            Op::GetBackendFeatures => "GET_BACKEND_FEATURES",
            Op::SetBackendFeatures(_) => "SET_BACKEND_FEATURES",
            Op::GetDeviceId => "GET_DEVICE_ID",
            Op::GetStatus => "GET_STATUS",
            Op::SetStatus(_) => "SET_STATUS",
            Op::GetConfigSize => "GET_CONFIG_SIZE",
            Op::GetConfig(..) => "GET_CONFIG",
            Op::SetConfig(..) => "SET_CONFIG",
            Op::GetVringNum => "GET_VRING_NUM",
            Op::GetIovaRange => "GET_IOVA_RANGE",
            Op::GetVqsCount => "GET_VQS_COUNT",
            Op::GetGroupNum => "GET_GROUP_NUM",
            Op::GetAsNum => "GET_AS_NUM",
            Op::GetVringGroup(_) => "GET_VRING_GROUP",
            Op::SetGroupAsid(..) => "SET_GROUP_ASID",
            Op::SetVringNum(..) => "SET_VRING_NUM",
            Op::SetVringAddr(..) => "SET_VRING_ADDR",
            Op::SetVringBase(..) => "SET_VRING_BASE",
            Op::GetVringBase(_) => "GET_VRING_BASE",
            Op::SetVringKick(..) => "SET_VRING_KICK",
            Op::SetVringCall(..) => "SET_VRING_CALL",
            Op::SetVringEnable(..) => "SET_VRING_ENABLE",
            Op::Suspend => "SUSPEND",
            Op::Resume => "RESUME",
            Op::SetConfigCall(_) => "SET_CONFIG_CALL",
            Op::Iotlb(m) => match m.kind {
                IotlbKind::Update => "IOTLB_UPDATE",
                IotlbKind::Invalidate => "IOTLB_INVALIDATE",
                IotlbKind::BatchBegin => "IOTLB_BATCH_BEGIN",
                IotlbKind::BatchEnd => "IOTLB_BATCH_END",
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub size: u64,
    pub uaddr: u64,
    pub perm: u8,
}

#[derive(Default)]
pub struct FakeVring {
    pub num: u16,
    pub addrs: Option<VringAddrs>,
    /// Next avail index the device reads (packed: position, wrap counter
    /// in bit 15).
    pub base: u16,
    /// Next used index (packed: position and wrap counter) the device
    /// writes.
    pub used: u16,
    pub kick: Option<EventFd>,
    pub call: Option<EventFd>,
    pub enabled: bool,
}

/// The device, with public fields for tests to set up and inspect.
pub struct Device {
    pub calls: Vec<Op>,
    pub owner: bool,
    pub device_id: u32,
    pub offered: u64,
    pub backend_offered: u64,
    pub backend_acked: u64,
    pub features: u64,
    pub status: u8,
    /// FEATURES_OK does not stick when the features include one of these.
    pub refuse_features: u64,
    pub vring_max: u16,
    pub iova_range: IovaRange,
    pub vqs: u32,
    /// The control queue (at its index under the negotiated features) is
    /// in group 1, every other queue in group 0 (as mlx5 does); otherwise
    /// all share group 0.
    pub cvq_isolated: bool,
    pub group_num: u32,
    pub as_num: u32,
    pub group_asid: BTreeMap<u32, u32>,
    pub config: Vec<u8>,
    pub config_call: bool,
    pub vrings: Vec<FakeVring>,
    pub suspended: bool,
    /// vhost-vdpa's own table, keyed by (asid, iova).
    pub kernel_iotlb: BTreeMap<(u32, u64), Mapping>,
    /// What the parent driver translates with (lost at a reset without
    /// IOTLB_PERSIST, like vdpa_sim).
    pub parent_iotlb: BTreeMap<(u32, u64), Mapping>,
    pub in_batch: Option<u32>,
    /// Ack the control queue answers with.
    pub cvq_ack: u8,
    /// Never answer the control queue.
    pub cvq_silent: bool,
    /// (class, command, data) of every control command seen.
    pub commands: Vec<(u8, u8, Vec<u8>)>,
    /// Faults in the control queue chain (a bug of the driver).
    pub cvq_errors: Vec<String>,
    pub mac: [u8; 6],
    pub pairs: u16,
    pub promisc: bool,
    pub allmulti: bool,
    /// Calls that fail with this errno (by name, e.g. "IOTLB_UPDATE").
    pub fail: BTreeMap<&'static str, i32>,
}

impl Device {
    /// A virtio-net device with `max_pairs` pairs, a control queue in its own
    /// group, two address spaces and every backend feature.
    pub fn net(max_pairs: u16) -> Device {
        let vqs = 2 * u32::from(max_pairs) + 1;
        let mut offered = F_VERSION_1
            | F_ACCESS_PLATFORM
            | F_MAC
            | F_MTU
            | F_STATUS
            | F_MRG_RXBUF
            | F_EVENT_IDX
            | F_CTRL_VQ
            | F_CTRL_RX
            | F_CTRL_VLAN
            | F_CTRL_MAC_ADDR;
        if max_pairs > 1 {
            offered |= F_MQ;
        }
        let mut config = Vec::new();
        config.extend_from_slice(&MAC);
        config.extend_from_slice(&1u16.to_le_bytes());
        config.extend_from_slice(&max_pairs.to_le_bytes());
        config.extend_from_slice(&1500u16.to_le_bytes());
        Device {
            calls: Vec::new(),
            owner: false,
            device_id: 1,
            offered,
            backend_offered: ALL_BACKEND,
            backend_acked: 0,
            features: 0,
            status: 0,
            refuse_features: 0,
            vring_max: 256,
            iova_range: IovaRange {
                first: 0,
                last: (1 << 48) - 1,
            },
            vqs,
            cvq_isolated: true,
            group_num: 2,
            as_num: 2,
            group_asid: BTreeMap::new(),
            config,
            config_call: false,
            vrings: (0..vqs).map(|_| FakeVring::default()).collect(),
            suspended: false,
            kernel_iotlb: BTreeMap::new(),
            parent_iotlb: BTreeMap::new(),
            in_batch: None,
            cvq_ack: 0,
            cvq_silent: false,
            commands: Vec::new(),
            cvq_errors: Vec::new(),
            mac: MAC,
            pairs: 1,
            promisc: true,
            allmulti: false,
            fail: BTreeMap::new(),
        }
    }

    pub fn max_pairs(&self) -> u16 {
        u16::from_le_bytes([self.config[8], self.config[9]])
    }

    /// Index of the control queue under the negotiated features.
    pub fn cvq_index(&self) -> u32 {
        if self.features & F_MQ != 0 {
            2 * u32::from(self.max_pairs())
        } else {
            2
        }
    }

    pub fn take_calls(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.calls)
    }

    pub fn iotlb_calls(&self) -> Vec<IotlbMsg> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Op::Iotlb(m) => Some(*m),
                _ => None,
            })
            .collect()
    }

    fn reset(&mut self) {
        self.status = 0;
        self.features = 0;
        self.suspended = false;
        self.group_asid.clear();
        for v in &mut self.vrings {
            v.num = 0;
            v.addrs = None;
            v.base = 0;
            v.used = 0;
            v.enabled = false;
        }
        self.mac = MAC;
        self.pairs = 1;
        self.promisc = true;
        self.allmulti = false;
        if self.backend_acked & bf(backend_bits::IOTLB_PERSIST) == 0 {
            self.parent_iotlb.clear();
        }
    }

    /// Linux (since 6.7, drivers/vhost/vdpa.c) refuses VHOST_SET_VRING_ADDR
    /// and VHOST_SET_VRING_BASE with EINVAL once DRIVER_OK is set, unless
    /// the device is suspended: found when the relay first ran on a real
    /// vhost-vdpa (tests/vdpa_kernel.rs).
    fn refuse_ring_change_while_running(&self) -> io::Result<()> {
        if self.status & S_DRIVER_OK != 0 && !self.suspended {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    fn vring(&mut self, q: u32) -> io::Result<&mut FakeVring> {
        self.vrings
            .get_mut(q as usize)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOBUFS))
    }

    pub fn group_of(&self, q: u32) -> u32 {
        u32::from(self.cvq_isolated && q == self.cvq_index())
    }

    fn asid_of(&self, q: u32) -> u32 {
        self.group_asid.get(&self.group_of(q)).copied().unwrap_or(0)
    }

    fn iotlb(&mut self, m: IotlbMsg) -> io::Result<()> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        if !self.owner {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if m.asid != 0 && self.backend_acked & bf(backend_bits::IOTLB_ASID) == 0 {
            return Err(einval());
        }
        if m.asid >= self.as_num.max(1) {
            return Err(einval());
        }
        match m.kind {
            IotlbKind::BatchBegin => {
                if self.backend_acked & bf(backend_bits::IOTLB_BATCH) == 0 {
                    return Err(einval());
                }
                self.in_batch = Some(m.asid);
            }
            IotlbKind::BatchEnd => {
                // The kernel applies the batch of the END's ASID: a mismatch
                // would leave updates unapplied.
                if self.in_batch != Some(m.asid) {
                    return Err(einval());
                }
                self.in_batch = None;
            }
            IotlbKind::Update => {
                if m.size == 0 || m.iova.checked_add(m.size - 1).is_none() {
                    return Err(einval());
                }
                let r = self.iova_range;
                if m.iova < r.first || m.iova + (m.size - 1) > r.last {
                    return Err(einval());
                }
                let last = m.iova + (m.size - 1);
                let overlaps = self
                    .kernel_iotlb
                    .iter()
                    .any(|(&(a, s), e)| a == m.asid && s <= last && m.iova <= s + (e.size - 1));
                if overlaps {
                    return Err(io::Error::from_raw_os_error(libc::EEXIST));
                }
                let e = Mapping {
                    size: m.size,
                    uaddr: m.uaddr,
                    perm: m.perm,
                };
                self.kernel_iotlb.insert((m.asid, m.iova), e);
                self.parent_iotlb.insert((m.asid, m.iova), e);
            }
            IotlbKind::Invalidate => {
                let last = m.iova.saturating_add(m.size.saturating_sub(1));
                let gone: Vec<(u32, u64)> = self
                    .kernel_iotlb
                    .iter()
                    .filter(|(&(a, s), e)| a == m.asid && s <= last && m.iova <= s + (e.size - 1))
                    .map(|(k, _)| *k)
                    .collect();
                for k in gone {
                    self.kernel_iotlb.remove(&k);
                    self.parent_iotlb.remove(&k);
                }
            }
        }
        Ok(())
    }

    /// The process memory behind `iova..iova+len` in `asid`, if one parent
    /// mapping covers it (and allows writing when `write`).
    fn translate(
        &self,
        asid: u32,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Option<VolatileSlice<'_>> {
        let (&(a, start), e) = self.parent_iotlb.range(..=(asid, iova)).next_back()?;
        let off = iova.checked_sub(start)?;
        let end = off.checked_add(len as u64)?;
        if a != asid || end > e.size || (write && e.perm == ACCESS_RO) {
            return None;
        }
        // SAFETY: VdpaNet keeps the memory of every mapping alive until it
        // has sent the INVALIDATE that removes it from this table, and the
        // table is only read under the device lock; the range lies inside
        // the mapping. That is the contract under test: a VdpaNet that broke
        // it would make this read freed memory.
        Some(unsafe { VolatileSlice::new((e.uaddr + off) as *mut u8, len) })
    }

    fn read_u16(&self, asid: u32, iova: u64) -> Option<u16> {
        self.translate(asid, iova, 2, false)?
            .load::<u16>(0, Ordering::Acquire)
            .ok()
            .map(u16::from_le)
    }

    /// Runs every control command the driver made available.
    pub fn process_cvq(&mut self) {
        if self.status & S_DRIVER_OK == 0 || self.suspended || self.cvq_silent {
            return;
        }
        let q = self.cvq_index();
        let asid = self.asid_of(q);
        let Some(v) = self.vrings.get(q as usize) else {
            return;
        };
        let (Some(addrs), true) = (v.addrs, v.enabled) else {
            return;
        };
        let num = v.num;
        if self.features & F_RING_PACKED != 0 {
            return self.process_packed_cvq(q as usize, asid, addrs, num);
        }
        let Some(avail) = self.read_u16(asid, addrs.avail + 2) else {
            self.cvq_errors.push("avail index not mapped".into());
            return;
        };
        while self.vrings[q as usize].base != avail {
            let last = self.vrings[q as usize].base;
            let slot = u64::from(last % num);
            let Some(head) = self.read_u16(asid, addrs.avail + 4 + 2 * slot) else {
                self.cvq_errors.push("avail ring not mapped".into());
                return;
            };
            let (written, ok) = self.run_command(asid, addrs.desc, head, num);
            let used = self.vrings[q as usize].used;
            let elem = addrs.used + 4 + 8 * u64::from(used % num);
            let Some(e) = self.translate(asid, elem, 8, true) else {
                self.cvq_errors.push("used ring not mapped".into());
                return;
            };
            let _ = e.write_obj(u32::from(head).to_le(), 0);
            let _ = e.write_obj(written.to_le(), 4);
            let Some(u) = self.translate(asid, addrs.used + 2, 2, true) else {
                return;
            };
            let _ = u.store(used.wrapping_add(1).to_le(), 0, Ordering::Release);
            let v = &mut self.vrings[q as usize];
            v.used = used.wrapping_add(1);
            v.base = last.wrapping_add(1);
            if !ok {
                return;
            }
        }
        if let Some(call) = &self.vrings[q as usize].call {
            let _ = call.write(1);
        }
    }

    /// Walks one split chain; returns (bytes written, chain well formed).
    fn run_command(&mut self, asid: u32, desc: u64, head: u16, num: u16) -> (u32, bool) {
        let mut segs = Vec::new();
        let mut i = head;
        for _ in 0..num {
            let Some(d) = self.translate(asid, desc + 16 * u64::from(i), 16, false) else {
                self.cvq_errors.push(format!("descriptor {i} not mapped"));
                return (0, false);
            };
            let addr = u64::from_le(d.read_obj::<u64>(0).unwrap_or(0));
            let len = u32::from_le(d.read_obj::<u32>(8).unwrap_or(0));
            let flags = u16::from_le(d.read_obj::<u16>(12).unwrap_or(0));
            let next = u16::from_le(d.read_obj::<u16>(14).unwrap_or(0));
            segs.push((addr, len, flags & 2 != 0));
            if flags & 1 == 0 {
                break;
            }
            i = next;
        }
        self.execute(asid, &segs)
    }

    /// Runs every chain made available on the packed control queue: each
    /// descriptor must carry the avail flags of its own slot's lap, the used
    /// descriptor goes in the used position with the last descriptor's id.
    fn process_packed_cvq(&mut self, q: usize, asid: u32, addrs: VringAddrs, num: u16) {
        let pos = |v: u16| (v & !PACKED_WRAP, v & PACKED_WRAP != 0);
        let next = |(p, w): (u16, bool)| if p + 1 == num { (0, !w) } else { (p + 1, w) };
        let avail_at = |w: bool, flags: u16| {
            (flags & PACKED_F_AVAIL != 0) == w && (flags & PACKED_F_USED != 0) != w
        };
        loop {
            let start = pos(self.vrings[q].base);
            let mut at = start;
            let mut segs = Vec::new();
            let mut id = 0;
            for n in 0..num {
                let Some(d) = self.translate(asid, addrs.desc + 16 * u64::from(at.0), 16, false)
                else {
                    self.cvq_errors
                        .push(format!("descriptor {} not mapped", at.0));
                    return;
                };
                let flags = u16::from_le(d.load::<u16>(14, Ordering::Acquire).unwrap_or(0));
                if !avail_at(at.1, flags) {
                    if n == 0 {
                        // Nothing (more) made available.
                        if let Some(call) = &self.vrings[q].call {
                            let _ = call.write(1);
                        }
                        return;
                    }
                    self.cvq_errors
                        .push(format!("chain continues into slot {} not available", at.0));
                    return;
                }
                let addr = u64::from_le(d.read_obj::<u64>(0).unwrap_or(0));
                let len = u32::from_le(d.read_obj::<u32>(8).unwrap_or(0));
                id = u16::from_le(d.read_obj::<u16>(12).unwrap_or(0));
                segs.push((addr, len, flags & 2 != 0));
                at = next(at);
                if flags & 1 == 0 {
                    break;
                }
            }
            let (written, ok) = self.execute(asid, &segs);
            let used = pos(self.vrings[q].used);
            let slot = addrs.desc + 16 * u64::from(used.0);
            let Some(u) = self.translate(asid, slot, 16, true) else {
                self.cvq_errors
                    .push("used descriptor slot not mapped".into());
                return;
            };
            let _ = u.write_obj(written.to_le(), 8);
            let _ = u.write_obj(id.to_le(), 12);
            let flags = if used.1 {
                PACKED_F_AVAIL | PACKED_F_USED
            } else {
                0
            };
            let _ = u.store(flags.to_le(), 14, Ordering::Release);
            let mut u_at = used;
            for _ in 0..segs.len() {
                u_at = next(u_at);
            }
            let enc = |(p, w): (u16, bool)| p | if w { PACKED_WRAP } else { 0 };
            let v = &mut self.vrings[q];
            v.used = enc(u_at);
            v.base = enc(at);
            if !ok {
                return;
            }
        }
    }

    /// Runs one command from its chain's segments (address, length,
    /// device-writable); returns (bytes written, chain well formed).
    fn execute(&mut self, asid: u32, segs: &[(u64, u32, bool)]) -> (u32, bool) {
        let mut out = Vec::new();
        let mut ack_at = None;
        for &(addr, len, writable) in segs {
            if writable {
                if self.translate(asid, addr, len as usize, true).is_none() || len == 0 {
                    self.cvq_errors.push("ack buffer not writable".into());
                    return (0, false);
                }
                ack_at = ack_at.or(Some(addr));
            } else {
                if ack_at.is_some() {
                    self.cvq_errors.push("readable after writable".into());
                    return (0, false);
                }
                let Some(s) = self.translate(asid, addr, len as usize, false) else {
                    self.cvq_errors.push("command buffer not mapped".into());
                    return (0, false);
                };
                let mut b = vec![0u8; len as usize];
                let _ = s.read_slice(&mut b, 0);
                out.extend_from_slice(&b);
            }
        }
        let Some(ack_at) = ack_at else {
            self.cvq_errors.push("no ack buffer".into());
            return (0, false);
        };
        if out.len() < 2 {
            self.cvq_errors
                .push("command shorter than its header".into());
            return (0, false);
        }
        let (class, cmd, data) = (out[0], out[1], out[2..].to_vec());
        self.commands.push((class, cmd, data.clone()));
        let mut ack = self.cvq_ack;
        if ack == 0 && !self.apply(class, cmd, &data) {
            ack = 1;
        }
        if let Some(s) = self.translate(asid, ack_at, 1, true) {
            let _ = s.write_obj(ack, 0);
        }
        (1, true)
    }

    fn apply(&mut self, class: u8, cmd: u8, data: &[u8]) -> bool {
        let f = self.features;
        match (class, cmd, data) {
            (1, 1, &[a, b, c, d, e, g]) if f & F_CTRL_MAC_ADDR != 0 => {
                self.mac = [a, b, c, d, e, g];
                true
            }
            (4, 0, &[lo, hi]) if f & F_MQ != 0 => {
                let n = u16::from_le_bytes([lo, hi]);
                if n == 0 || n > self.max_pairs() {
                    return false;
                }
                self.pairs = n;
                true
            }
            (0, 0, &[on]) if f & F_CTRL_RX != 0 => {
                self.promisc = on != 0;
                true
            }
            (0, 1, &[on]) if f & F_CTRL_RX != 0 => {
                self.allmulti = on != 0;
                true
            }
            _ => false,
        }
    }
}

/// A handle on the shared device; clones see the same device.
#[derive(Clone)]
pub struct FakeVdpa {
    dev: Arc<Mutex<Device>>,
}

impl FakeVdpa {
    pub fn new(dev: Device) -> FakeVdpa {
        let dev = Arc::new(Mutex::new(dev));
        let weak = Arc::downgrade(&dev);
        std::thread::spawn(move || cvq_thread(weak));
        FakeVdpa { dev }
    }

    pub fn lock(&self) -> MutexGuard<'_, Device> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn call<T>(&self, c: Op, f: impl FnOnce(&mut Device) -> io::Result<T>) -> io::Result<T> {
        let mut d = self.lock();
        let name = c.name();
        d.calls.push(c);
        if let Some(&errno) = d.fail.get(name) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        f(&mut d)
    }
}

/// The device side of the control queue: wakes on the queue's kick.
fn cvq_thread(weak: Weak<Mutex<Device>>) {
    loop {
        let kick = {
            let Some(dev) = weak.upgrade() else {
                return;
            };
            let d = dev.lock().unwrap_or_else(|e| e.into_inner());
            let q = d.cvq_index() as usize;
            d.vrings
                .get(q)
                .and_then(|v| v.kick.as_ref()?.try_clone().ok())
        };
        let Some(kick) = kick else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let mut p = libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, alive across the call.
        let n = unsafe { libc::poll(&mut p, 1, 20) };
        if n > 0 && kick.read().is_ok() {
            let Some(dev) = weak.upgrade() else {
                return;
            };
            dev.lock().unwrap_or_else(|e| e.into_inner()).process_cvq();
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl VdpaIoctls for FakeVdpa {
    fn set_owner(&self) -> io::Result<()> {
        self.call(Op::SetOwner, |d| {
            if d.owner {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            d.owner = true;
            Ok(())
        })
    }

    fn get_features(&self) -> io::Result<u64> {
        self.call(Op::GetFeatures, |d| Ok(d.offered))
    }

    fn set_features(&self, features: u64) -> io::Result<()> {
        self.call(Op::SetFeatures(features), |d| {
            if d.status & S_FEATURES_OK != 0 {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            if features & !d.offered != 0 {
                return Err(einval());
            }
            d.features = features;
            Ok(())
        })
    }

    fn get_backend_features(&self) -> io::Result<u64> {
        self.call(Op::GetBackendFeatures, |d| Ok(d.backend_offered))
    }

    fn set_backend_features(&self, features: u64) -> io::Result<()> {
        self.call(Op::SetBackendFeatures(features), |d| {
            if features & !d.backend_offered != 0 {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            d.backend_acked = features;
            Ok(())
        })
    }

    fn get_device_id(&self) -> io::Result<u32> {
        self.call(Op::GetDeviceId, |d| Ok(d.device_id))
    }

    fn get_status(&self) -> io::Result<u8> {
        self.call(Op::GetStatus, |d| Ok(d.status))
    }

    fn set_status(&self, status: u8) -> io::Result<()> {
        self.call(Op::SetStatus(status), |d| {
            if status == 0 {
                d.reset();
                return Ok(());
            }
            if d.status & !status != 0 {
                return Err(einval());
            }
            let mut s = status;
            if s & S_FEATURES_OK != 0
                && d.status & S_FEATURES_OK == 0
                && d.features & d.refuse_features != 0
            {
                s &= !S_FEATURES_OK;
            }
            d.status = s;
            Ok(())
        })
    }

    fn get_config_size(&self) -> io::Result<u32> {
        self.call(Op::GetConfigSize, |d| Ok(d.config.len() as u32))
    }

    fn get_config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()> {
        self.call(Op::GetConfig(offset, buf.len()), |d| {
            let o = offset as usize;
            if buf.is_empty() || o + buf.len() > d.config.len() {
                return Err(einval());
            }
            buf.copy_from_slice(&d.config[o..o + buf.len()]);
            Ok(())
        })
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()> {
        self.call(Op::SetConfig(offset, data.to_vec()), |d| {
            let o = offset as usize;
            if data.is_empty() || o + data.len() > d.config.len() {
                return Err(einval());
            }
            d.config[o..o + data.len()].copy_from_slice(data);
            Ok(())
        })
    }

    fn get_vring_num(&self) -> io::Result<u16> {
        self.call(Op::GetVringNum, |d| Ok(d.vring_max))
    }

    fn get_iova_range(&self) -> io::Result<IovaRange> {
        self.call(Op::GetIovaRange, |d| Ok(d.iova_range))
    }

    fn get_vqs_count(&self) -> io::Result<u32> {
        self.call(Op::GetVqsCount, |d| Ok(d.vqs))
    }

    fn get_group_num(&self) -> io::Result<u32> {
        self.call(Op::GetGroupNum, |d| Ok(d.group_num))
    }

    fn get_as_num(&self) -> io::Result<u32> {
        self.call(Op::GetAsNum, |d| Ok(d.as_num))
    }

    fn get_vring_group(&self, queue: u32) -> io::Result<u32> {
        self.call(Op::GetVringGroup(queue), |d| {
            if queue >= d.vqs {
                return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
            }
            Ok(d.group_of(queue))
        })
    }

    fn set_group_asid(&self, group: u32, asid: u32) -> io::Result<()> {
        self.call(Op::SetGroupAsid(group, asid), |d| {
            if group >= d.group_num || asid >= d.as_num {
                return Err(einval());
            }
            d.group_asid.insert(group, asid);
            Ok(())
        })
    }

    fn set_vring_num(&self, queue: u32, num: u16) -> io::Result<()> {
        self.call(Op::SetVringNum(queue, num), |d| {
            d.vring(queue)?.num = num;
            Ok(())
        })
    }

    fn set_vring_addr(&self, queue: u32, addrs: &VringAddrs) -> io::Result<()> {
        self.call(Op::SetVringAddr(queue, *addrs), |d| {
            d.refuse_ring_change_while_running()?;
            d.vring(queue)?.addrs = Some(*addrs);
            Ok(())
        })
    }

    /// drivers/vhost/vhost.c: a packed ring's base is avail in the low
    /// half and used in the high half, a split ring's the avail index.
    fn set_vring_base(&self, queue: u32, base: u32) -> io::Result<()> {
        self.call(Op::SetVringBase(queue, base), |d| {
            d.refuse_ring_change_while_running()?;
            let packed = d.features & F_RING_PACKED != 0;
            let v = d.vring(queue)?;
            v.base = base as u16;
            v.used = if packed {
                (base >> 16) as u16
            } else {
                base as u16
            };
            Ok(())
        })
    }

    fn get_vring_base(&self, queue: u32) -> io::Result<u32> {
        self.call(Op::GetVringBase(queue), |d| {
            let packed = d.features & F_RING_PACKED != 0;
            let v = d.vring(queue)?;
            Ok(if packed {
                u32::from(v.base) | u32::from(v.used) << 16
            } else {
                u32::from(v.base)
            })
        })
    }

    fn set_vring_kick(&self, queue: u32, fd: Option<&EventFd>) -> io::Result<()> {
        self.call(Op::SetVringKick(queue, fd.is_some()), |d| {
            let fd = fd.map(|f| f.try_clone()).transpose()?;
            d.vring(queue)?.kick = fd;
            Ok(())
        })
    }

    fn set_vring_call(&self, queue: u32, fd: Option<&EventFd>) -> io::Result<()> {
        self.call(Op::SetVringCall(queue, fd.is_some()), |d| {
            let fd = fd.map(|f| f.try_clone()).transpose()?;
            d.vring(queue)?.call = fd;
            Ok(())
        })
    }

    fn set_vring_enable(&self, queue: u32, enable: bool) -> io::Result<()> {
        self.call(Op::SetVringEnable(queue, enable), |d| {
            d.vring(queue)?.enabled = enable;
            Ok(())
        })
    }

    fn suspend(&self) -> io::Result<()> {
        self.call(Op::Suspend, |d| {
            if d.backend_acked & bf(backend_bits::SUSPEND) == 0 {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            d.suspended = true;
            Ok(())
        })
    }

    fn resume(&self) -> io::Result<()> {
        self.call(Op::Resume, |d| {
            if d.backend_acked & bf(backend_bits::RESUME) == 0 {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            d.suspended = false;
            Ok(())
        })
    }

    fn set_config_call(&self, fd: Option<&EventFd>) -> io::Result<()> {
        self.call(Op::SetConfigCall(fd.is_some()), |d| {
            d.config_call = fd.is_some();
            Ok(())
        })
    }

    fn send_iotlb(&self, msg: &IotlbMsg) -> io::Result<()> {
        // What reaches the kernel is the bytes: parse them back.
        let parsed = IotlbMsg::from_bytes(&msg.to_bytes()).ok_or_else(einval)?;
        self.call(Op::Iotlb(parsed), |d| d.iotlb(parsed))
    }
}

/// Opens a VdpaNet on a fresh fake device; the handle stays with the test.
pub fn open(dev: Device, pairs: u16) -> (backends::vdpa::VdpaNet, FakeVdpa) {
    let fake = FakeVdpa::new(dev);
    let net = backends::vdpa::VdpaNet::with_ioctls(Box::new(fake.clone()), pairs)
        .expect("open the fake device");
    fake.lock().calls.clear();
    (net, fake)
}

/// Ring addresses of queue `q` in the vdpa tests: each queue in its own
/// 1 MiB at (q+1) MiB.
pub fn ring_addrs(q: usize) -> VringAddrs {
    let base = 0x10_0000 * (q as u64 + 1);
    VringAddrs {
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
    }
}

/// What the daemon does to start one pair: features, both rings at their
/// start (packed: position 0, both wrap counters 1), DRIVER_OK.
pub fn start_pair(net: &mut backends::vdpa::VdpaNet, features: u64) {
    use backends::DeviceBackend;
    net.set_features(features).unwrap();
    for q in 0..2 {
        net.set_vring_num(q, 256).unwrap();
        net.set_vring_addr(q, ring_addrs(q)).unwrap();
        if features & F_RING_PACKED != 0 {
            net.set_vring_base_packed(q, 0x8000_8000).unwrap();
        } else {
            net.set_vring_base(q, 0).unwrap();
        }
        net.set_vring_kick(q, Arc::new(EventFd::new(0).unwrap()))
            .unwrap();
        net.set_vring_call(q, Some(Arc::new(EventFd::new(0).unwrap())))
            .unwrap();
        net.set_vring_enable(q, true).unwrap();
    }
    net.set_status(S_DRIVER_OK).unwrap();
}

/// A memfd-less anonymous region of `size` bytes mapped at `iova`.
pub fn region(iova: u64, size: usize, readonly: bool) -> backends::DmaRegion {
    backends::DmaRegion {
        iova,
        memory: Arc::new(vm_memory::MmapRegion::new(size).expect("mmap")),
        readonly,
    }
}

/// Features a relay typically acks (what the daemon's RELAY_FEATURES allow).
pub const RELAY: u64 = F_VERSION_1 | F_MAC | F_MTU | F_STATUS | F_MRG_RXBUF | F_EVENT_IDX;
