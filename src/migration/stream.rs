//! The device-state stream sent over the SET_DEVICE_STATE_FD pipe: a header
//! (`"SVQR"`, version u16) then records `{type: u16, instance: u16, length:
//! u32}` + payload, little endian, closed by an end record — in the manner of
//! Xen's HVM save records.
//!
//! The loader reads the whole stream into a bounded buffer, checks every
//! length against what remains and against the type's size, rejects unknown
//! types and versions naming them, duplicates, missing records and values
//! inconsistent with each other or with the device ([`Limits`]), and returns
//! a [`DeviceState`] only when all of it checked out: the caller applies
//! nothing before that (staging).
//!
//! Record payloads. Version 1 is split rings only: in its vring records the
//! wrap bits and the layout byte are 0. Version 2 adds packed rings (wrap
//! counters in flags bits 1 and 2, layout 1). A daemon writes version 1
//! whenever every ring is split, so a daemon that reads only version 1
//! still takes those streams, and reads both.
//!
//! | type | name | instance | payload |
//! |---|---|---|---|
//! | 0 | end | 0 | empty |
//! | 1 | features | 0 | virtio u64, protocol u64 |
//! | 2 | mode | 0 | mode u8 (0 passthrough, 1 shadow), 3 reserved bytes (0) |
//! | 3 | nic | 0 | mac [6], mtu u16, queue pairs u16, rx flags u8 (bit 0 promisc, 1 allmulti), reserved u8 (0), VLAN bitmap 512 bytes (bit `v % 8` of byte `v / 8`) |
//! | 4 | vring | queue | size u16, next avail u16, used idx u16, flags u8 (bit 0 enabled, 1 avail wrap, 2 used wrap), layout u8 (0 split, 1 packed) |
//! | 5 | in-flight | queue | count u16, reserved u16 (0), count × head u16 (device's take order) |

use std::io::{Read, Write};

pub const MAGIC: [u8; 4] = *b"SVQR";
/// Split rings only.
pub const VERSION_SPLIT: u16 = 1;
/// Vring records may describe packed rings.
pub const VERSION_PACKED: u16 = 2;
/// Largest stream accepted (a full one is ~70 KiB per 32768-entry queue).
pub const MAX_STREAM: usize = 1 << 20;

const HEADER_LEN: usize = 6;
const RECORD_HEADER_LEN: usize = 8;

const T_END: u16 = 0;
const T_FEATURES: u16 = 1;
const T_MODE: u16 = 2;
const T_NIC: u16 = 3;
const T_VRING: u16 = 4;
const T_INFLIGHT: u16 = 5;

const FEATURES_LEN: usize = 16;
const MODE_LEN: usize = 4;
const NIC_LEN: usize = 12 + VLAN_BYTES;
const VRING_LEN: usize = 8;
const INFLIGHT_MAX: usize = 4 + 2 * MAX_QUEUE_SIZE as usize;

/// virtio's largest queue.
pub const MAX_QUEUE_SIZE: u16 = 32768;
const VLAN_BYTES: usize = 4096 / 8;
use virtio_features::F_RING_PACKED;
/// Smallest MTU a virtio-net device may report (virtio spec 5.1.4.1).
const MIN_MTU: u16 = 68;

const RX_PROMISC: u8 = 1;
const RX_ALLMULTI: u8 = 2;
const VRING_ENABLED: u8 = 1;
const VRING_AVAIL_WRAP: u8 = 2;
const VRING_USED_WRAP: u8 = 4;

fn type_name(t: u16) -> &'static str {
    match t {
        T_END => "end",
        T_FEATURES => "features",
        T_MODE => "mode",
        T_NIC => "nic",
        T_VRING => "vring",
        T_INFLIGHT => "in-flight",
        _ => "unknown",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("state stream is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("truncated header: {len} of {HEADER_LEN} bytes")]
    TruncatedHeader { len: usize },
    #[error("bad magic {found:02x?} (expected \"SVQR\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported stream version {found} (this daemon reads versions {VERSION_SPLIT} and {VERSION_PACKED})")]
    UnsupportedVersion { found: u16 },
    #[error("truncated record at offset {offset}: needs {need} bytes, {remaining} remain")]
    TruncatedRecord {
        offset: usize,
        need: u64,
        remaining: usize,
    },
    #[error("unknown record type {ty:#06x} at offset {offset}")]
    UnknownType { ty: u16, offset: usize },
    #[error("{name} record length {length} exceeds the type's maximum {max}")]
    RecordTooLong {
        name: &'static str,
        length: u32,
        max: usize,
    },
    #[error("{name} record length {length}, expected {expected}")]
    BadLength {
        name: &'static str,
        length: u32,
        expected: usize,
    },
    #[error("duplicate {name} record (instance {instance})")]
    Duplicate { name: &'static str, instance: u16 },
    #[error("{name} record instance {instance} is invalid: {why}")]
    BadInstance {
        name: &'static str,
        instance: u16,
        why: String,
    },
    #[error("missing {0} record")]
    Missing(String),
    #[error("stream ends without an end record")]
    MissingEnd,
    #[error("{0} bytes after the end record")]
    Trailing(usize),
    #[error("{kind} feature bits {bits:#x} are not offered by this device (offered {offered:#x})")]
    Features {
        kind: &'static str,
        bits: u64,
        offered: u64,
    },
    #[error("invalid {0}")]
    Invalid(String),
    #[error("queue {queue}: {why}")]
    Inconsistent { queue: u16, why: String },
}

/// What the loading device accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Queues the device has (every one needs a vring record).
    pub queue_count: u16,
    pub max_queue_size: u16,
    /// Virtio features the device offers (GET_FEATURES).
    pub features: u64,
    /// vhost-user protocol features it offers.
    pub protocol_features: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Features {
    /// Negotiated virtio features (SET_FEATURES).
    pub virtio: u64,
    /// Negotiated vhost-user protocol features.
    pub protocol: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RelayMode {
    #[default]
    Passthrough,
    Shadow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RxMode {
    pub promisc: bool,
    pub allmulti: bool,
}

/// The 4096 VLAN ids the guest filters on (VIRTIO_NET_CTRL_VLAN).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VlanFilter([u8; VLAN_BYTES]);

impl Default for VlanFilter {
    fn default() -> Self {
        VlanFilter([0; VLAN_BYTES])
    }
}

impl std::fmt::Debug for VlanFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.ids()).finish()
    }
}

impl VlanFilter {
    /// Ids >= 4096 are ignored (VLAN ids are 12 bits).
    pub fn set(&mut self, id: u16, on: bool) {
        if let Some(b) = self.0.get_mut(usize::from(id / 8)) {
            if on {
                *b |= 1 << (id % 8);
            } else {
                *b &= !(1 << (id % 8));
            }
        }
    }

    pub fn contains(&self, id: u16) -> bool {
        self.0
            .get(usize::from(id / 8))
            .is_some_and(|b| b & (1 << (id % 8)) != 0)
    }

    pub fn ids(&self) -> impl Iterator<Item = u16> + '_ {
        (0..4096u16).filter(|&i| self.contains(i))
    }
}

/// Control-plane state of the virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicState {
    pub mac: [u8; 6],
    pub mtu: u16,
    /// Active queue pairs (VIRTIO_NET_CTRL_MQ).
    pub queue_pairs: u16,
    pub rx_mode: RxMode,
    pub vlans: VlanFilter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RingLayout {
    #[default]
    Split,
    Packed,
}

/// One queue where the destination continues.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VringState {
    /// 0: the queue was never set up.
    pub size: u16,
    /// Next avail index the device processes (GET_VRING_BASE).
    pub next_avail: u16,
    /// Guest used idx.
    pub used_idx: u16,
    pub enabled: bool,
    pub layout: RingLayout,
    /// Packed rings only.
    pub avail_wrap: bool,
    pub used_wrap: bool,
    /// Heads the device took and never completed, in take order; the
    /// destination resubmits them. For split rings exactly
    /// `next_avail - used_idx` of them.
    pub in_flight: Vec<u16>,
}

/// Everything the destination needs to continue the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    pub features: Features,
    pub mode: RelayMode,
    pub nic: NicState,
    /// Indexed by queue.
    pub vrings: Vec<VringState>,
}

/// Bounds-checked little-endian reads over one record's payload.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { b, pos: 0 }
    }
    /// Callers checked the payload length first; a short read is a bug in
    /// the length table and yields zeros rather than a panic.
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(s) = self.b.get(self.pos..self.pos + N) {
            out.copy_from_slice(s);
        }
        self.pos += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fn record(out: &mut Vec<u8>, ty: u16, instance: u16, payload: &[u8]) {
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&instance.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Read all of `r`, at most `max` bytes.
pub fn read_bounded(r: &mut impl Read, max: usize) -> Result<Vec<u8>, StateError> {
    let mut buf = Vec::new();
    r.take(max as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > max {
        return Err(StateError::TooLarge { max });
    }
    Ok(buf)
}

impl DeviceState {
    /// Serialize. Fails (without writing a partial record) only for states
    /// no device can have: more than 65535 queues or in-flight lists longer
    /// than a queue.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        if self.vrings.len() > usize::from(u16::MAX) {
            return Err(StateError::Invalid(format!("{} queues", self.vrings.len())));
        }
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(&MAGIC);
        let packed = self
            .vrings
            .iter()
            .any(|v| v.layout == RingLayout::Packed || v.avail_wrap || v.used_wrap);
        let version = if packed {
            VERSION_PACKED
        } else {
            VERSION_SPLIT
        };
        out.extend_from_slice(&version.to_le_bytes());

        let mut p = Vec::with_capacity(FEATURES_LEN);
        p.extend_from_slice(&self.features.virtio.to_le_bytes());
        p.extend_from_slice(&self.features.protocol.to_le_bytes());
        record(&mut out, T_FEATURES, 0, &p);

        let mode = match self.mode {
            RelayMode::Passthrough => 0u8,
            RelayMode::Shadow => 1,
        };
        record(&mut out, T_MODE, 0, &[mode, 0, 0, 0]);

        let n = &self.nic;
        let mut p = Vec::with_capacity(NIC_LEN);
        p.extend_from_slice(&n.mac);
        p.extend_from_slice(&n.mtu.to_le_bytes());
        p.extend_from_slice(&n.queue_pairs.to_le_bytes());
        let rx =
            u8::from(n.rx_mode.promisc) * RX_PROMISC + u8::from(n.rx_mode.allmulti) * RX_ALLMULTI;
        p.extend_from_slice(&[rx, 0]);
        p.extend_from_slice(&n.vlans.0);
        record(&mut out, T_NIC, 0, &p);

        for (q, v) in self.vrings.iter().enumerate() {
            let q = q as u16;
            let mut p = Vec::with_capacity(VRING_LEN);
            p.extend_from_slice(&v.size.to_le_bytes());
            p.extend_from_slice(&v.next_avail.to_le_bytes());
            p.extend_from_slice(&v.used_idx.to_le_bytes());
            let flags = u8::from(v.enabled) * VRING_ENABLED
                + u8::from(v.avail_wrap) * VRING_AVAIL_WRAP
                + u8::from(v.used_wrap) * VRING_USED_WRAP;
            let layout = match v.layout {
                RingLayout::Split => 0u8,
                RingLayout::Packed => 1,
            };
            p.extend_from_slice(&[flags, layout]);
            record(&mut out, T_VRING, q, &p);
        }
        for (q, v) in self.vrings.iter().enumerate() {
            if v.in_flight.is_empty() {
                continue;
            }
            if v.in_flight.len() > usize::from(MAX_QUEUE_SIZE) {
                return Err(StateError::Inconsistent {
                    queue: q as u16,
                    why: format!("{} heads in flight", v.in_flight.len()),
                });
            }
            let mut p = Vec::with_capacity(4 + 2 * v.in_flight.len());
            p.extend_from_slice(&(v.in_flight.len() as u16).to_le_bytes());
            p.extend_from_slice(&0u16.to_le_bytes());
            for h in &v.in_flight {
                p.extend_from_slice(&h.to_le_bytes());
            }
            record(&mut out, T_INFLIGHT, q as u16, &p);
        }
        record(&mut out, T_END, 0, &[]);
        Ok(out)
    }

    /// Write the stream to `w`.
    pub fn save(&self, w: &mut impl Write) -> Result<(), StateError> {
        w.write_all(&self.to_bytes()?)?;
        w.flush()?;
        Ok(())
    }

    /// Read a stream until EOF (at most [`MAX_STREAM`] bytes) and check it.
    pub fn load(r: &mut impl Read, limits: &Limits) -> Result<DeviceState, StateError> {
        let bytes = read_bounded(r, MAX_STREAM)?;
        Self::from_bytes(&bytes, limits)
    }

    /// Check a complete stream.
    pub fn from_bytes(b: &[u8], limits: &Limits) -> Result<DeviceState, StateError> {
        if b.len() > MAX_STREAM {
            return Err(StateError::TooLarge { max: MAX_STREAM });
        }
        if b.len() < HEADER_LEN {
            return Err(StateError::TruncatedHeader { len: b.len() });
        }
        let mut h = Cursor::new(&b[..HEADER_LEN]);
        let magic = h.take::<4>();
        if magic != MAGIC {
            return Err(StateError::BadMagic { found: magic });
        }
        let version = h.u16();
        if version != VERSION_SPLIT && version != VERSION_PACKED {
            return Err(StateError::UnsupportedVersion { found: version });
        }

        let queues = usize::from(limits.queue_count);
        let mut features = None;
        let mut mode = None;
        let mut nic = None;
        let mut vrings: Vec<Option<VringState>> = vec![None; queues];
        let mut in_flight: Vec<Option<Vec<u16>>> = vec![None; queues];

        let mut pos = HEADER_LEN;
        loop {
            let remaining = b.len() - pos;
            if remaining == 0 {
                return Err(StateError::MissingEnd);
            }
            if remaining < RECORD_HEADER_LEN {
                return Err(StateError::TruncatedRecord {
                    offset: pos,
                    need: RECORD_HEADER_LEN as u64,
                    remaining,
                });
            }
            let mut rh = Cursor::new(&b[pos..pos + RECORD_HEADER_LEN]);
            let (ty, instance, length) = (rh.u16(), rh.u16(), rh.u32());
            let name = type_name(ty);
            let (min, max) = match ty {
                T_END => (0, 0),
                T_FEATURES => (FEATURES_LEN, FEATURES_LEN),
                T_MODE => (MODE_LEN, MODE_LEN),
                T_NIC => (NIC_LEN, NIC_LEN),
                T_VRING => (VRING_LEN, VRING_LEN),
                T_INFLIGHT => (4, INFLIGHT_MAX),
                _ => return Err(StateError::UnknownType { ty, offset: pos }),
            };
            if length as usize > max {
                return Err(StateError::RecordTooLong { name, length, max });
            }
            let body_len = remaining - RECORD_HEADER_LEN;
            if u64::from(length) > body_len as u64 {
                return Err(StateError::TruncatedRecord {
                    offset: pos,
                    need: RECORD_HEADER_LEN as u64 + u64::from(length),
                    remaining,
                });
            }
            if (length as usize) < min || length as usize > max {
                return Err(StateError::BadLength {
                    name,
                    length,
                    expected: max,
                });
            }
            let start = pos + RECORD_HEADER_LEN;
            let payload = &b[start..start + length as usize];
            pos = start + length as usize;
            let mut c = Cursor::new(payload);

            let single = |instance: u16| -> Result<(), StateError> {
                if instance != 0 {
                    return Err(StateError::BadInstance {
                        name,
                        instance,
                        why: "this record is per device, instance must be 0".into(),
                    });
                }
                Ok(())
            };
            let queue = |instance: u16| -> Result<usize, StateError> {
                if usize::from(instance) >= queues {
                    return Err(StateError::BadInstance {
                        name,
                        instance,
                        why: format!("queue index >= queue count {queues}"),
                    });
                }
                Ok(usize::from(instance))
            };
            let dup = || StateError::Duplicate { name, instance };

            match ty {
                T_END => {
                    single(instance)?;
                    break;
                }
                T_FEATURES => {
                    single(instance)?;
                    if features.is_some() {
                        return Err(dup());
                    }
                    features = Some(Features {
                        virtio: c.u64(),
                        protocol: c.u64(),
                    });
                }
                T_MODE => {
                    single(instance)?;
                    if mode.is_some() {
                        return Err(dup());
                    }
                    let m = c.u8();
                    let reserved = c.take::<3>();
                    if reserved != [0; 3] {
                        return Err(StateError::Invalid(format!(
                            "mode record: reserved bytes {reserved:02x?} are not zero"
                        )));
                    }
                    mode = Some(match m {
                        0 => RelayMode::Passthrough,
                        1 => RelayMode::Shadow,
                        v => return Err(StateError::Invalid(format!("relay mode {v}"))),
                    });
                }
                T_NIC => {
                    single(instance)?;
                    if nic.is_some() {
                        return Err(dup());
                    }
                    let mac = c.take::<6>();
                    let mtu = c.u16();
                    let queue_pairs = c.u16();
                    let rx = c.u8();
                    let reserved = c.u8();
                    if rx & !(RX_PROMISC | RX_ALLMULTI) != 0 || reserved != 0 {
                        return Err(StateError::Invalid(format!(
                            "nic record: unknown rx mode bits {rx:#04x} / reserved {reserved:#04x}"
                        )));
                    }
                    nic = Some(NicState {
                        mac,
                        mtu,
                        queue_pairs,
                        rx_mode: RxMode {
                            promisc: rx & RX_PROMISC != 0,
                            allmulti: rx & RX_ALLMULTI != 0,
                        },
                        vlans: VlanFilter(c.take::<VLAN_BYTES>()),
                    });
                }
                T_VRING => {
                    let q = queue(instance)?;
                    if vrings[q].is_some() {
                        return Err(dup());
                    }
                    let size = c.u16();
                    let next_avail = c.u16();
                    let used_idx = c.u16();
                    let flags = c.u8();
                    let layout = c.u8();
                    let packed_fields =
                        flags & (VRING_AVAIL_WRAP | VRING_USED_WRAP) != 0 || layout != 0;
                    if version == VERSION_SPLIT && packed_fields {
                        return Err(StateError::Inconsistent {
                            queue: instance,
                            why: format!(
                                "version {VERSION_SPLIT} vring record with packed-ring fields \
                                 (flags {flags:#04x}, layout {layout})"
                            ),
                        });
                    }
                    if flags & !(VRING_ENABLED | VRING_AVAIL_WRAP | VRING_USED_WRAP) != 0 {
                        return Err(StateError::Inconsistent {
                            queue: instance,
                            why: format!("unknown vring flags {flags:#04x}"),
                        });
                    }
                    let layout = match layout {
                        0 => RingLayout::Split,
                        1 => RingLayout::Packed,
                        v => {
                            return Err(StateError::Inconsistent {
                                queue: instance,
                                why: format!("unknown ring layout {v}"),
                            })
                        }
                    };
                    vrings[q] = Some(VringState {
                        size,
                        next_avail,
                        used_idx,
                        enabled: flags & VRING_ENABLED != 0,
                        layout,
                        avail_wrap: flags & VRING_AVAIL_WRAP != 0,
                        used_wrap: flags & VRING_USED_WRAP != 0,
                        in_flight: Vec::new(),
                    });
                }
                T_INFLIGHT => {
                    let q = queue(instance)?;
                    if in_flight[q].is_some() {
                        return Err(dup());
                    }
                    let count = c.u16();
                    let reserved = c.u16();
                    let expected = 4 + 2 * usize::from(count);
                    if length as usize != expected {
                        return Err(StateError::BadLength {
                            name,
                            length,
                            expected,
                        });
                    }
                    if reserved != 0 {
                        return Err(StateError::Invalid(format!(
                            "in-flight record: reserved {reserved:#x} is not zero"
                        )));
                    }
                    in_flight[q] = Some((0..count).map(|_| c.u16()).collect());
                }
                _ => return Err(StateError::UnknownType { ty, offset: pos }),
            }
        }
        if pos != b.len() {
            return Err(StateError::Trailing(b.len() - pos));
        }

        let features = features.ok_or_else(|| StateError::Missing("features".into()))?;
        let mode = mode.ok_or_else(|| StateError::Missing("mode".into()))?;
        let nic = nic.ok_or_else(|| StateError::Missing("nic".into()))?;
        let mut rings = Vec::with_capacity(queues);
        for (q, (v, f)) in vrings.into_iter().zip(in_flight).enumerate() {
            let mut v = v.ok_or_else(|| StateError::Missing(format!("vring (queue {q})")))?;
            v.in_flight = f.unwrap_or_default();
            rings.push(v);
        }
        let state = DeviceState {
            features,
            mode,
            nic,
            vrings: rings,
        };
        state.validate(limits)?;
        Ok(state)
    }

    /// Check values against each other and against the device.
    pub fn validate(&self, limits: &Limits) -> Result<(), StateError> {
        let f = self.features;
        if f.virtio & !limits.features != 0 {
            return Err(StateError::Features {
                kind: "virtio",
                bits: f.virtio & !limits.features,
                offered: limits.features,
            });
        }
        if f.protocol & !limits.protocol_features != 0 {
            return Err(StateError::Features {
                kind: "protocol",
                bits: f.protocol & !limits.protocol_features,
                offered: limits.protocol_features,
            });
        }
        if self.vrings.len() != usize::from(limits.queue_count) {
            return Err(StateError::Invalid(format!(
                "{} vring records for a device with {} queues",
                self.vrings.len(),
                limits.queue_count
            )));
        }
        let pairs = limits.queue_count / 2;
        let n = &self.nic;
        if n.queue_pairs == 0 || n.queue_pairs > pairs.max(1) {
            return Err(StateError::Invalid(format!(
                "nic queue pairs {} (the device has {pairs})",
                n.queue_pairs
            )));
        }
        if n.mtu < MIN_MTU {
            return Err(StateError::Invalid(format!(
                "nic MTU {} (minimum {MIN_MTU})",
                n.mtu
            )));
        }
        let packed = f.virtio & F_RING_PACKED != 0;
        for (q, v) in self.vrings.iter().enumerate() {
            let queue = q as u16;
            let bad = |why: String| Err(StateError::Inconsistent { queue, why });
            if v.size == 0 {
                if v.next_avail != 0 || v.used_idx != 0 || !v.in_flight.is_empty() {
                    return bad(
                        "queue never set up (size 0) but has indexes or in-flight heads".into(),
                    );
                }
                continue;
            }
            if !v.size.is_power_of_two() || v.size > limits.max_queue_size {
                return bad(format!(
                    "size {} (must be a power of two <= {})",
                    v.size, limits.max_queue_size
                ));
            }
            if v.in_flight.len() > usize::from(v.size) {
                return bad(format!(
                    "{} heads in flight exceed the queue size {}",
                    v.in_flight.len(),
                    v.size
                ));
            }
            let mut seen = vec![false; usize::from(v.size)];
            for &h in &v.in_flight {
                match seen.get_mut(usize::from(h)) {
                    None => return bad(format!("in-flight head {h} >= queue size {}", v.size)),
                    Some(s) if *s => return bad(format!("in-flight head {h} listed twice")),
                    Some(s) => *s = true,
                }
            }
            match v.layout {
                RingLayout::Split => {
                    if packed {
                        return bad("split ring but VIRTIO_F_RING_PACKED negotiated".into());
                    }
                    if v.avail_wrap || v.used_wrap {
                        return bad("wrap counters set on a split ring".into());
                    }
                    let outstanding = v.next_avail.wrapping_sub(v.used_idx);
                    if outstanding > v.size {
                        return bad(format!(
                            "used idx {} is ahead of next avail {} (or more than size {} apart)",
                            v.used_idx, v.next_avail, v.size
                        ));
                    }
                    if usize::from(outstanding) != v.in_flight.len() {
                        return bad(format!(
                            "{} heads in flight but next avail {} - used idx {} = {outstanding}",
                            v.in_flight.len(),
                            v.next_avail,
                            v.used_idx
                        ));
                    }
                }
                RingLayout::Packed => {
                    if !packed {
                        return bad("packed ring but VIRTIO_F_RING_PACKED not negotiated".into());
                    }
                    if v.next_avail >= v.size || v.used_idx >= v.size {
                        return bad(format!(
                            "packed indexes {}/{} not below the size {}",
                            v.next_avail, v.used_idx, v.size
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
