//! Feature bits and the virtio-net config space the sim presents.

pub(crate) use virtio_features as bits;

pub(crate) use virtio_features::status;

const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// mac[6], status, max_virtqueue_pairs, mtu: the fields up to and including
/// the last one the sim offers a feature for.
pub(crate) const CONFIG_SIZE: usize = 12;

/// Features offered. MQ is offered only with more than one pair. The spec
/// makes MQ depend on CTRL_VQ, which the sim does not implement: a relay that
/// negotiates MQ simply uses every pair (there is no VQ_PAIRS_SET to wait for),
/// and a guest driver that insists on CTRL_VQ falls back to one pair. Packed
/// rings are offered (the sim completes in order, which a packed device may
/// do without IN_ORDER); IN_ORDER is never offered.
pub(crate) fn device_features(queue_pairs: u16) -> u64 {
    let mut f = bits::F_VERSION_1
        | bits::F_ANY_LAYOUT
        | bits::NET_F_MAC
        | bits::NET_F_MTU
        | bits::NET_F_STATUS
        | bits::NET_F_MRG_RXBUF
        | bits::RING_F_EVENT_IDX
        | bits::RING_F_INDIRECT_DESC
        | bits::F_RING_PACKED;
    if queue_pairs > 1 {
        f |= bits::NET_F_MQ;
    }
    f
}

/// Length of the virtio-net header in front of every frame: 12 bytes with
/// VERSION_1 or MRG_RXBUF (num_buffers present), 10 for a legacy driver.
pub(crate) fn net_hdr_len(features: u64) -> usize {
    if features & (bits::F_VERSION_1 | bits::NET_F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

pub(crate) fn config_bytes(mac: [u8; 6], queue_pairs: u16, mtu: u16) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    c[0..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
    c[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_is_little_endian() {
        let c = config_bytes([1, 2, 3, 4, 5, 6], 0x0102, 1500);
        assert_eq!(c, [1, 2, 3, 4, 5, 6, 1, 0, 2, 1, 0xdc, 0x05]);
    }

    #[test]
    fn mq_only_with_several_pairs() {
        assert_eq!(device_features(1) & bits::NET_F_MQ, 0);
        assert_ne!(device_features(2) & bits::NET_F_MQ, 0);
        // IN_ORDER (35) is never offered.
        assert_eq!(device_features(4) & (1 << 35), 0);
    }
}
