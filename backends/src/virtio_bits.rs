//! Virtio feature and status bits the backends use, in one place.
//!
//! Plain masks (rather than virtio-bindings' bit numbers) because every use
//! here is a mask test; the values are those of the virtio 1.2 spec and
//! `linux/virtio_net.h`.

/// Feature bit masks.
pub(crate) mod bits {
    pub const NET_F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
    pub const NET_F_MTU: u64 = 1 << 3;
    pub const NET_F_MAC: u64 = 1 << 5;
    pub const NET_F_MRG_RXBUF: u64 = 1 << 15;
    pub const NET_F_STATUS: u64 = 1 << 16;
    pub const NET_F_CTRL_VQ: u64 = 1 << 17;
    pub const NET_F_CTRL_RX: u64 = 1 << 18;
    pub const NET_F_CTRL_VLAN: u64 = 1 << 19;
    pub const NET_F_CTRL_RX_EXTRA: u64 = 1 << 20;
    pub const NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
    pub const NET_F_MQ: u64 = 1 << 22;
    pub const NET_F_CTRL_MAC_ADDR: u64 = 1 << 23;
    pub const F_LOG_ALL: u64 = 1 << 26;
    pub const F_ANY_LAYOUT: u64 = 1 << 27;
    pub const RING_F_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_F_EVENT_IDX: u64 = 1 << 29;
    pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const F_VERSION_1: u64 = 1 << 32;
    pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
    pub const F_RING_PACKED: u64 = 1 << 34;
    pub const F_IN_ORDER: u64 = 1 << 35;
    pub const F_NOTIFICATION_DATA: u64 = 1 << 38;
    pub const F_RING_RESET: u64 = 1 << 40;
    pub const NET_F_HASH_REPORT: u64 = 1 << 57;
    pub const NET_F_RSS: u64 = 1 << 60;
}

/// Device status bits (VIRTIO_CONFIG_S_*).
pub(crate) mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
}
