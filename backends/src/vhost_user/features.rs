//! Which virtio and vhost-user protocol features the relay takes from a
//! vhost-user device, and the virtio-net config space it presents when the
//! device has none (no CONFIG protocol feature, as with DPDK's net_vhost).

use vhost::vhost_user::VhostUserProtocolFeatures;

pub(crate) use virtio_features as bits;

pub(crate) use virtio_features::status;

/// Bits the relay never passes on, whatever the device offers:
/// - PROTOCOL_FEATURES is vhost-user plumbing between us and the device.
/// - ACCESS_PLATFORM: the device would send IOTLB misses over a backend
///   channel we do not open; our memory table already is the IOVA space.
/// - NOTIFICATION_DATA, RING_RESET: kicks are plain eventfds, rings reset only
///   with the device.
/// - the control-queue family: the trait has data queues only (2 per pair),
///   like the sim; the daemon handles control commands itself.
///
/// IN_ORDER and RING_PACKED pass: rings are handed to the device as they
/// are (packed positions through `set_vring_base_packed`), and whether the
/// VMM may have them is the daemon's decision (its shadow data path keeps
/// neither).
const NEVER: u64 = bits::F_PROTOCOL_FEATURES
    | bits::F_ACCESS_PLATFORM
    | bits::F_NOTIFICATION_DATA
    | bits::F_RING_RESET
    | bits::NET_F_CTRL_GUEST_OFFLOADS
    | bits::NET_F_CTRL_VQ
    | bits::NET_F_CTRL_RX
    | bits::NET_F_CTRL_VLAN
    | bits::NET_F_CTRL_RX_EXTRA
    | bits::NET_F_GUEST_ANNOUNCE
    | bits::NET_F_CTRL_MAC_ADDR
    | bits::NET_F_HASH_REPORT
    | bits::NET_F_RSS;

/// Config fields we fill in ourselves when the device has no config space.
/// These bits only describe the config space, so offering them costs the
/// device nothing; they are never sent to the device.
pub(crate) const SYNTHESIZED: u64 = bits::NET_F_MAC | bits::NET_F_STATUS | bits::NET_F_MTU;

/// The virtio features the relay offers upward, from what the device offers
/// on the wire. MQ is kept only with more than one pair (as the sim does).
pub(crate) fn relay_features(device_offer: u64, synthesized_config: bool, pairs: u16) -> u64 {
    let mut f = device_offer & !NEVER;
    if synthesized_config {
        f |= SYNTHESIZED;
    }
    if pairs <= 1 {
        f &= !bits::NET_F_MQ;
    }
    f
}

/// What goes into SET_FEATURES for the features the relay acked: only bits
/// the device itself offered, plus PROTOCOL_FEATURES when it offered that
/// (without it SET_VRING_ENABLE does not exist and rings start at kick).
pub(crate) fn wire_features(acked: u64, device_offer: u64) -> u64 {
    (acked & device_offer) | (device_offer & bits::F_PROTOCOL_FEATURES)
}

/// Protocol features we ask for, out of what the device offers.
/// LOG_SHMFD is taken so that dirty-log forwarding can be added without a
/// renegotiation; BACKEND_REQ and friends are not (no backend channel).
pub(crate) fn wanted_protocol(offered: VhostUserProtocolFeatures) -> VhostUserProtocolFeatures {
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::STATUS;
    offered & want
}

/// The device can log the pages it writes: it offers LOG_ALL and takes the
/// log as a shared-memory fd.
pub(crate) fn device_logs_dirty_pages(device_offer: u64, proto: VhostUserProtocolFeatures) -> bool {
    device_offer & bits::F_LOG_ALL != 0 && proto.contains(VhostUserProtocolFeatures::LOG_SHMFD)
}

const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// mac[6], status, max_virtqueue_pairs, mtu.
pub(crate) const CONFIG_SIZE: usize = 12;

pub(crate) fn config_bytes(mac: [u8; 6], queue_pairs: u16, mtu: u16) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    c[0..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
    c[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

/// A random unicast, locally administered MAC address.
pub(crate) fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: the pointer and length describe `mac`, which lives across the
    // call; getrandom writes at most that many bytes.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        // Entropy is not a correctness matter here; a fixed tail is still a
        // valid address, and the pid keeps two daemons apart.
        let pid = std::process::id().to_le_bytes();
        mac = [0x02, 0x53, pid[0], pid[1], pid[2], pid[3]];
    }
    mac[0] = (mac[0] & !0x01) | 0x02;
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Roughly what DPDK 22.11 net_vhost offers: the relay features seen from
    /// testpmd on this machine (0x1_3c01_e7eb, MAC and STATUS synthesized)
    /// plus the bits masked on the way (PEERS.md lists them).
    const DPDK_OFFER: u64 = (0x1_3c01_e7eb & !(bits::NET_F_MAC | bits::NET_F_STATUS))
        | bits::F_IN_ORDER
        | bits::F_RING_PACKED
        | bits::NET_F_GUEST_ANNOUNCE;

    #[test]
    fn protocol_and_ctrl_vq_are_masked_in_order_and_packed_pass() {
        let offer = DPDK_OFFER
            | bits::F_PROTOCOL_FEATURES
            | bits::NET_F_CTRL_VQ
            | bits::NET_F_CTRL_RX
            | bits::F_ACCESS_PLATFORM
            | bits::NET_F_MQ;
        let f = relay_features(offer, false, 2);
        for b in [
            bits::F_PROTOCOL_FEATURES,
            bits::NET_F_CTRL_VQ,
            bits::NET_F_CTRL_RX,
            bits::F_ACCESS_PLATFORM,
        ] {
            assert_eq!(f & b, 0, "bit {:#x} must be masked", b);
        }
        assert_ne!(f & bits::NET_F_MQ, 0);
        assert_ne!(f & bits::F_IN_ORDER, 0);
        assert_ne!(f & bits::F_RING_PACKED, 0);
        // Everything else the device offers passes.
        assert_eq!(f, offer & !NEVER);
    }

    #[test]
    fn mq_only_with_several_pairs_and_config_bits_when_synthesized() {
        let offer = (1 << 32) | bits::NET_F_MQ | bits::F_LOG_ALL;
        assert_eq!(relay_features(offer, false, 1), (1 << 32) | bits::F_LOG_ALL);
        assert_eq!(
            relay_features(offer, true, 4),
            offer | bits::NET_F_MAC | bits::NET_F_STATUS | bits::NET_F_MTU
        );
    }

    #[test]
    fn wire_features_keep_only_device_bits_and_protocol_bit() {
        let offer = (1 << 32) | bits::F_PROTOCOL_FEATURES | (1 << 15);
        let acked = (1 << 32) | bits::NET_F_MAC | bits::NET_F_STATUS;
        assert_eq!(
            wire_features(acked, offer),
            (1 << 32) | bits::F_PROTOCOL_FEATURES
        );
        assert_eq!(wire_features(1 << 32, 1 << 32), 1 << 32);
    }

    #[test]
    fn wanted_protocol_features_are_a_subset_of_the_offer() {
        let dpdk = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MTU
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::BACKEND_SEND_FD
            | VhostUserProtocolFeatures::HOST_NOTIFIER
            | VhostUserProtocolFeatures::STATUS;
        assert_eq!(
            wanted_protocol(dpdk),
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::STATUS
        );
        assert!(wanted_protocol(VhostUserProtocolFeatures::empty()).is_empty());
    }

    #[test]
    fn dirty_log_needs_log_all_and_log_shmfd() {
        let p = VhostUserProtocolFeatures::LOG_SHMFD;
        assert!(device_logs_dirty_pages(bits::F_LOG_ALL, p));
        assert!(!device_logs_dirty_pages(0, p));
        assert!(!device_logs_dirty_pages(
            bits::F_LOG_ALL,
            VhostUserProtocolFeatures::MQ
        ));
    }

    #[test]
    fn config_layout_and_random_mac() {
        let c = config_bytes([1, 2, 3, 4, 5, 6], 2, 1500);
        assert_eq!(c, [1, 2, 3, 4, 5, 6, 1, 0, 2, 0, 0xdc, 0x05]);
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02, "unicast, locally administered");
    }
}
