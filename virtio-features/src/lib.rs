//! The feature and status bits of virtio and vhost that the workspace uses,
//! as masks, in one table.
//!
//! Values come from `virtio-bindings` (the kernel's `virtio_config.h`,
//! `virtio_ring.h`, `virtio_net.h`); the two vhost bits that live in the
//! virtio feature word but are not virtio features (`VHOST_F_LOG_ALL`,
//! `VHOST_USER_F_PROTOCOL_FEATURES`) are not in those headers and are
//! spelled out here. Every use in the daemon is a mask test, hence masks
//! rather than bit numbers.

use virtio_bindings::virtio_config as cfg;
use virtio_bindings::virtio_net as net;
use virtio_bindings::virtio_ring as ring;

const fn bit(n: u32) -> u64 {
    1 << n
}

// --- virtio-net device features --------------------------------------------
pub const NET_F_CSUM: u64 = bit(net::VIRTIO_NET_F_CSUM);
pub const NET_F_CTRL_GUEST_OFFLOADS: u64 = bit(net::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
pub const NET_F_MTU: u64 = bit(net::VIRTIO_NET_F_MTU);
pub const NET_F_MAC: u64 = bit(net::VIRTIO_NET_F_MAC);
pub const NET_F_MRG_RXBUF: u64 = bit(net::VIRTIO_NET_F_MRG_RXBUF);
pub const NET_F_STATUS: u64 = bit(net::VIRTIO_NET_F_STATUS);
pub const NET_F_CTRL_VQ: u64 = bit(net::VIRTIO_NET_F_CTRL_VQ);
pub const NET_F_CTRL_RX: u64 = bit(net::VIRTIO_NET_F_CTRL_RX);
pub const NET_F_CTRL_VLAN: u64 = bit(net::VIRTIO_NET_F_CTRL_VLAN);
pub const NET_F_CTRL_RX_EXTRA: u64 = bit(net::VIRTIO_NET_F_CTRL_RX_EXTRA);
pub const NET_F_GUEST_ANNOUNCE: u64 = bit(net::VIRTIO_NET_F_GUEST_ANNOUNCE);
pub const NET_F_MQ: u64 = bit(net::VIRTIO_NET_F_MQ);
pub const NET_F_CTRL_MAC_ADDR: u64 = bit(net::VIRTIO_NET_F_CTRL_MAC_ADDR);
pub const NET_F_HASH_REPORT: u64 = bit(net::VIRTIO_NET_F_HASH_REPORT);
pub const NET_F_RSS: u64 = bit(net::VIRTIO_NET_F_RSS);

// --- transport and ring features -------------------------------------------
pub const F_ANY_LAYOUT: u64 = bit(cfg::VIRTIO_F_ANY_LAYOUT);
pub const RING_F_INDIRECT_DESC: u64 = bit(ring::VIRTIO_RING_F_INDIRECT_DESC);
pub const RING_F_EVENT_IDX: u64 = bit(ring::VIRTIO_RING_F_EVENT_IDX);
pub const F_VERSION_1: u64 = bit(cfg::VIRTIO_F_VERSION_1);
pub const F_ACCESS_PLATFORM: u64 = bit(cfg::VIRTIO_F_ACCESS_PLATFORM);
pub const F_RING_PACKED: u64 = bit(cfg::VIRTIO_F_RING_PACKED);
pub const F_IN_ORDER: u64 = bit(cfg::VIRTIO_F_IN_ORDER);
pub const F_NOTIFICATION_DATA: u64 = bit(cfg::VIRTIO_F_NOTIFICATION_DATA);
pub const F_RING_RESET: u64 = bit(cfg::VIRTIO_F_RING_RESET);

/// The transport feature range (virtio 1.2 section 6: bits 24 to 40); the
/// bits below and above belong to the device class.
pub const TRANSPORT_MASK: u64 = ((1u64 << 41) - 1) & !((1u64 << 24) - 1);

// --- vhost bits in the virtio feature word ---------------------------------
/// VHOST_F_LOG_ALL: the VMM asks the device to log the pages it writes.
pub const F_LOG_ALL: u64 = bit(26);
/// VHOST_USER_F_PROTOCOL_FEATURES: the vhost-user protocol feature word is
/// negotiated (and rings start disabled until SET_VRING_ENABLE).
pub const F_PROTOCOL_FEATURES: u64 = bit(30);

/// Device status bits (VIRTIO_CONFIG_S_*).
pub mod status {
    use super::cfg;

    pub const ACKNOWLEDGE: u8 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    pub const DRIVER: u8 = cfg::VIRTIO_CONFIG_S_DRIVER as u8;
    pub const DRIVER_OK: u8 = cfg::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    pub const FEATURES_OK: u8 = cfg::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    pub const NEEDS_RESET: u8 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    pub const FAILED: u8 = cfg::VIRTIO_CONFIG_S_FAILED as u8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_the_specification_bits() {
        // Spot checks against the numbers in the virtio 1.2 specification,
        // so a wrong import shows here rather than in a negotiation.
        assert_eq!(NET_F_MAC, 1 << 5);
        assert_eq!(NET_F_MQ, 1 << 22);
        assert_eq!(RING_F_EVENT_IDX, 1 << 29);
        assert_eq!(F_VERSION_1, 1 << 32);
        assert_eq!(F_RING_PACKED, 1 << 34);
        assert_eq!(F_IN_ORDER, 1 << 35);
        assert_eq!(status::DRIVER_OK, 4);
        assert_eq!(status::FEATURES_OK, 8);
        assert_ne!(TRANSPORT_MASK & F_ANY_LAYOUT, 0);
        assert_eq!(TRANSPORT_MASK & NET_F_RSS, 0);
    }
}
