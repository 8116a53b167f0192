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

/// The receive-side state the VMM's driver negotiated with its virtio-net
/// device, as the daemon programs it into the hardware through the control
/// virtqueue (and restores at a migration destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetCtrlState {
    /// MAC to program (VIRTIO_NET_CTRL_MAC_ADDR_SET); `None` keeps the device's.
    pub mac: Option<[u8; 6]>,
    /// Active queue pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
    pub queue_pairs: u16,
    /// VIRTIO_NET_CTRL_RX_PROMISC
    pub promisc: bool,
    /// VIRTIO_NET_CTRL_RX_ALLMULTI
    pub allmulti: bool,
}

impl NetCtrlState {
    /// What a virtio-net device does right after reset (and so what needs no
    /// command): its own MAC, one pair, promiscuous on, all-multicast off
    /// (the same defaults QEMU's virtio-net restores from).
    pub fn after_reset() -> NetCtrlState {
        NetCtrlState {
            mac: None,
            queue_pairs: 1,
            promisc: true,
            allmulti: false,
        }
    }
}

impl Default for NetCtrlState {
    fn default() -> Self {
        NetCtrlState::after_reset()
    }
}
