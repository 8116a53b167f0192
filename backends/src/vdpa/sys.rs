//! The kernel interface of vhost-vdpa as a trait: one method per ioctl (and
//! one for the IOTLB messages written to the device fd), so everything above
//! it can run against a fake device in tests.
//!
//! Numbers and layouts follow Linux `include/uapi/linux/vhost.h` and
//! `vhost_types.h`.

use std::io;

use vmm_sys_util::eventfd::EventFd;

use crate::{IovaRange, VringAddrs};

/// Bit numbers of the vhost backend features (VHOST_BACKEND_F_*). The kernel
/// mask is `1 << bit`.
pub mod backend_bits {
    /// IOTLB messages are `struct vhost_msg_v2` (with an ASID field).
    pub const IOTLB_MSG_V2: u32 = 0x1;
    /// IOTLB updates may be grouped between BATCH_BEGIN and BATCH_END.
    pub const IOTLB_BATCH: u32 = 0x2;
    /// The `asid` field of an IOTLB v2 message selects an address space.
    pub const IOTLB_ASID: u32 = 0x3;
    /// VHOST_VDPA_SUSPEND works.
    pub const SUSPEND: u32 = 0x4;
    /// VHOST_VDPA_RESUME works.
    pub const RESUME: u32 = 0x5;
    /// Rings may be enabled after DRIVER_OK.
    pub const ENABLE_AFTER_DRIVER_OK: u32 = 0x6;
    /// Mappings survive a device reset (the parent does not restore its
    /// default mapping at reset).
    pub const IOTLB_PERSIST: u32 = 0x8;
}

/// `struct vhost_iotlb_msg.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbKind {
    Update,
    Invalidate,
    BatchBegin,
    BatchEnd,
}

impl IotlbKind {
    pub fn raw(self) -> u8 {
        match self {
            IotlbKind::Update => 2,
            IotlbKind::Invalidate => 3,
            IotlbKind::BatchBegin => 5,
            IotlbKind::BatchEnd => 6,
        }
    }

    pub fn from_raw(raw: u8) -> Option<IotlbKind> {
        match raw {
            2 => Some(IotlbKind::Update),
            3 => Some(IotlbKind::Invalidate),
            5 => Some(IotlbKind::BatchBegin),
            6 => Some(IotlbKind::BatchEnd),
            _ => None,
        }
    }
}

/// VHOST_ACCESS_RO / VHOST_ACCESS_RW.
pub const ACCESS_RO: u8 = 1;
pub const ACCESS_RW: u8 = 3;

/// One IOTLB message as written to the vhost-vdpa fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbMsg {
    pub asid: u32,
    pub kind: IotlbKind,
    pub iova: u64,
    pub size: u64,
    /// Process virtual address of the first byte (UPDATE only).
    pub uaddr: u64,
    /// ACCESS_RO or ACCESS_RW (UPDATE only; 0 otherwise).
    pub perm: u8,
}

/// `sizeof(struct vhost_msg_v2)`: type, asid, then a 64-byte union whose
/// first member is `struct vhost_iotlb_msg` (8-byte aligned).
pub const IOTLB_MSG_V2_LEN: usize = 72;
/// VHOST_IOTLB_MSG_V2, the `type` of a v2 message.
pub const VHOST_IOTLB_MSG_V2: u32 = 2;

impl IotlbMsg {
    pub fn batch(kind: IotlbKind, asid: u32) -> IotlbMsg {
        IotlbMsg {
            asid,
            kind,
            iova: 0,
            size: 0,
            uaddr: 0,
            perm: 0,
        }
    }

    /// The bytes of `struct vhost_msg_v2` in host byte order.
    pub fn to_bytes(&self) -> [u8; IOTLB_MSG_V2_LEN] {
        let mut b = [0u8; IOTLB_MSG_V2_LEN];
        b[0..4].copy_from_slice(&VHOST_IOTLB_MSG_V2.to_ne_bytes());
        b[4..8].copy_from_slice(&self.asid.to_ne_bytes());
        b[8..16].copy_from_slice(&self.iova.to_ne_bytes());
        b[16..24].copy_from_slice(&self.size.to_ne_bytes());
        b[24..32].copy_from_slice(&self.uaddr.to_ne_bytes());
        b[32] = self.perm;
        b[33] = self.kind.raw();
        b
    }

    /// Parses what [`to_bytes`](Self::to_bytes) produces (used by fakes).
    pub fn from_bytes(b: &[u8]) -> Option<IotlbMsg> {
        if b.len() != IOTLB_MSG_V2_LEN {
            return None;
        }
        let u32_at = |o: usize| b.get(o..o + 4)?.try_into().ok().map(u32::from_ne_bytes);
        let u64_at = |o: usize| b.get(o..o + 8)?.try_into().ok().map(u64::from_ne_bytes);
        if u32_at(0)? != VHOST_IOTLB_MSG_V2 {
            return None;
        }
        Some(IotlbMsg {
            asid: u32_at(4)?,
            iova: u64_at(8)?,
            size: u64_at(16)?,
            uaddr: u64_at(24)?,
            perm: b[32],
            kind: IotlbKind::from_raw(b[33])?,
        })
    }
}

/// The vhost-vdpa operations [`super::VdpaNet`] uses, one per kernel call.
/// Errors are the raw `io::Error` of the call; the caller adds context.
///
/// Queue indexes are device indexes (the control queue included).
pub trait VdpaIoctls: Send {
    /// VHOST_SET_OWNER
    fn set_owner(&self) -> io::Result<()>;
    /// VHOST_GET_FEATURES
    fn get_features(&self) -> io::Result<u64>;
    /// VHOST_SET_FEATURES
    fn set_features(&self, features: u64) -> io::Result<()>;
    /// VHOST_GET_BACKEND_FEATURES
    fn get_backend_features(&self) -> io::Result<u64>;
    /// VHOST_SET_BACKEND_FEATURES
    fn set_backend_features(&self, features: u64) -> io::Result<()>;
    /// VHOST_VDPA_GET_DEVICE_ID
    fn get_device_id(&self) -> io::Result<u32>;
    /// VHOST_VDPA_GET_STATUS
    fn get_status(&self) -> io::Result<u8>;
    /// VHOST_VDPA_SET_STATUS
    fn set_status(&self, status: u8) -> io::Result<()>;
    /// VHOST_VDPA_GET_CONFIG_SIZE
    fn get_config_size(&self) -> io::Result<u32>;
    /// VHOST_VDPA_GET_CONFIG
    fn get_config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()>;
    /// VHOST_VDPA_SET_CONFIG
    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()>;
    /// VHOST_VDPA_GET_VRING_NUM: the largest ring size.
    fn get_vring_num(&self) -> io::Result<u16>;
    /// VHOST_VDPA_GET_IOVA_RANGE
    fn get_iova_range(&self) -> io::Result<IovaRange>;
    /// VHOST_VDPA_GET_VQS_COUNT
    fn get_vqs_count(&self) -> io::Result<u32>;
    /// VHOST_VDPA_GET_GROUP_NUM
    fn get_group_num(&self) -> io::Result<u32>;
    /// VHOST_VDPA_GET_AS_NUM
    fn get_as_num(&self) -> io::Result<u32>;
    /// VHOST_VDPA_GET_VRING_GROUP
    fn get_vring_group(&self, queue: u32) -> io::Result<u32>;
    /// VHOST_VDPA_SET_GROUP_ASID
    fn set_group_asid(&self, group: u32, asid: u32) -> io::Result<()>;
    /// VHOST_SET_VRING_NUM
    fn set_vring_num(&self, queue: u32, num: u16) -> io::Result<()>;
    /// VHOST_SET_VRING_ADDR (IOVAs, no log address)
    fn set_vring_addr(&self, queue: u32, addrs: &VringAddrs) -> io::Result<()>;
    /// VHOST_SET_VRING_BASE. Split rings: the next avail index (low 16
    /// bits). Packed rings (RING_PACKED negotiated): the avail position with
    /// its wrap counter in bit 15, the used position with its wrap counter
    /// in bits 16..=31 (drivers/vhost/vhost.c, the vhost-user layout too).
    fn set_vring_base(&self, queue: u32, base: u32) -> io::Result<()>;
    /// VHOST_GET_VRING_BASE, in the layout of `set_vring_base`.
    fn get_vring_base(&self, queue: u32) -> io::Result<u32>;
    /// VHOST_SET_VRING_KICK (`None` unbinds)
    fn set_vring_kick(&self, queue: u32, fd: Option<&EventFd>) -> io::Result<()>;
    /// VHOST_SET_VRING_CALL (`None` unbinds)
    fn set_vring_call(&self, queue: u32, fd: Option<&EventFd>) -> io::Result<()>;
    /// VHOST_VDPA_SET_VRING_ENABLE
    fn set_vring_enable(&self, queue: u32, enable: bool) -> io::Result<()>;
    /// VHOST_VDPA_SUSPEND
    fn suspend(&self) -> io::Result<()>;
    /// VHOST_VDPA_RESUME
    fn resume(&self) -> io::Result<()>;
    /// VHOST_VDPA_SET_CONFIG_CALL (`None` unbinds)
    fn set_config_call(&self, fd: Option<&EventFd>) -> io::Result<()>;
    /// write(2) of one `struct vhost_msg_v2` to the device fd.
    fn send_iotlb(&self, msg: &IotlbMsg) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iotlb_v2_layout() {
        let m = IotlbMsg {
            asid: 1,
            kind: IotlbKind::Update,
            iova: 0x1000,
            size: 0x2000,
            uaddr: 0x7f00_0000_0000,
            perm: ACCESS_RW,
        };
        let b = m.to_bytes();
        assert_eq!(&b[0..4], &2u32.to_ne_bytes());
        assert_eq!(&b[4..8], &1u32.to_ne_bytes());
        assert_eq!(&b[8..16], &0x1000u64.to_ne_bytes());
        assert_eq!(&b[16..24], &0x2000u64.to_ne_bytes());
        assert_eq!(&b[24..32], &0x7f00_0000_0000u64.to_ne_bytes());
        assert_eq!((b[32], b[33]), (3, 2));
        assert!(b[34..].iter().all(|&x| x == 0));
        assert_eq!(IotlbMsg::from_bytes(&b), Some(m));
        assert_eq!(IotlbMsg::from_bytes(&b[..71]), None);
    }
}
