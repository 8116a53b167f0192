//! The NIC control state a backend with a control queue of its own
//! programs into the device (part of the [`crate::DeviceBackend`] contract:
//! [`crate::DeviceBackend::apply_net_ctrl`]).

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
