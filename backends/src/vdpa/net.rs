//! virtio-net definitions the vDPA backend needs (virtio 1.2, 5.1).

pub(crate) use virtio_features as bits;

pub(crate) use virtio_features::status;

/// VIRTIO_ID_NET
pub(crate) const VIRTIO_ID_NET: u32 = 1;

/// Bits the backend keeps to itself: the control queue belongs to the daemon
/// (through [`super::VdpaNet::apply_net_state`]), never to the relay's guest;
/// ACCESS_PLATFORM is what makes the device translate through the IOTLB;
/// LOG_ALL is a vhost bit vDPA devices do not implement.
pub(crate) const BACKEND_OWNED: u64 = bits::NET_F_CTRL_VQ
    | bits::NET_F_CTRL_RX
    | bits::NET_F_CTRL_VLAN
    | bits::NET_F_CTRL_RX_EXTRA
    | bits::NET_F_GUEST_ANNOUNCE
    | bits::NET_F_CTRL_MAC_ADDR
    | bits::F_ACCESS_PLATFORM
    | bits::F_LOG_ALL;

/// Of those, what the backend negotiates whenever the device offers it.
/// CTRL_VLAN is left out on purpose: with it the device drops every VLAN
/// until told otherwise. GUEST_ANNOUNCE and CTRL_RX_EXTRA are not used.
pub(crate) const BACKEND_ACKED: u64 =
    bits::NET_F_CTRL_VQ | bits::NET_F_CTRL_RX | bits::NET_F_CTRL_MAC_ADDR | bits::F_ACCESS_PLATFORM;

/// Control virtqueue command classes and commands (virtio 1.2, 5.1.6.5).
pub(crate) mod ctrl {
    pub const CLASS_RX: u8 = 0;
    pub const RX_PROMISC: u8 = 0;
    pub const RX_ALLMULTI: u8 = 1;
    pub const CLASS_MAC: u8 = 1;
    pub const MAC_ADDR_SET: u8 = 1;
    pub const CLASS_MQ: u8 = 4;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    /// VIRTIO_NET_OK
    pub const ACK_OK: u8 = 0;
}

/// Config space offsets.
pub(crate) mod cfg {
    pub const MAX_VIRTQUEUE_PAIRS: u32 = 8;
}
