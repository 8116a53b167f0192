//! Feature negotiation with the VMM (GET/SET_FEATURES, the vhost-user
//! protocol features offered) and what the device behind the relay is given.

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_features::{self as vf, F_LOG_ALL, F_PROTOCOL_FEATURES, TRANSPORT_MASK};

use super::error::{DeviceError, Result};
use super::model::Device;

/// Virtio feature bits the relay can carry (device-class and transport).
/// IN_ORDER and packed rings only on request (`--in-order`, `--packed`, see
/// [`Device::set_offered_on_request`]).
pub const RELAY_FEATURES: u64 = vf::F_VERSION_1
    | vf::F_ANY_LAYOUT
    | vf::NET_F_MAC
    | vf::NET_F_MTU
    | vf::NET_F_STATUS
    | vf::NET_F_MRG_RXBUF
    | vf::RING_F_EVENT_IDX
    | vf::RING_F_INDIRECT_DESC
    | vf::NET_F_MQ;

/// Features offered only on request.
pub const ON_REQUEST: u64 = vf::F_IN_ORDER | vf::F_RING_PACKED;

/// Of those, what the SVQ gives the guest whatever the device does: a
/// packed guest ring relayed to a split shadow ring, used entries returned
/// in the guest's order from a device that completes out of order. Offered
/// without the device under `--shadow on`, where only shadow mode runs.
pub const SHADOW_TRANSLATED: u64 = vf::F_IN_ORDER | vf::F_RING_PACKED;

impl Device {
    /// LOG_ALL is always offered: the SVQ logs what the device writes (and a
    /// backend that logs by itself gets the log forwarded).
    pub fn offered_features(&self) -> u64 {
        let transport_ok = svq::SUPPORTED_FEATURES | !TRANSPORT_MASK;
        let mut offered =
            self.backend.device_features() & ((RELAY_FEATURES & transport_ok) | self.on_request);
        if self.shadow_only() {
            offered |= self.on_request & SHADOW_TRANSLATED & transport_ok;
        }
        offered | F_PROTOCOL_FEATURES | F_LOG_ALL
    }

    /// `--shadow on`: the data path never leaves shadow mode by itself
    /// (`--shadow auto` returns to passthrough after a migration).
    fn shadow_only(&self) -> bool {
        self.shadow && !self.auto_shadow
    }

    /// What the VMM negotiated that the device lacks and the SVQ provides:
    /// while non-zero, only shadow mode can run the rings.
    pub(crate) fn shadow_translated(&self) -> u64 {
        self.translated_in(self.acked_features.unwrap_or(0))
    }

    /// Of `features`, what only the SVQ can give the guest on this device.
    pub(crate) fn translated_in(&self, features: u64) -> u64 {
        features & SHADOW_TRANSLATED & !self.backend.device_features()
    }

    /// The device's rings are packed: the VMM's, unless the SVQ relays
    /// them to split shadow rings.
    pub(crate) fn device_packed(&self) -> bool {
        self.device_features() & vf::F_RING_PACKED != 0
    }

    /// `--in-order` and `--packed`: offer VIRTIO_F_IN_ORDER and
    /// VIRTIO_F_RING_PACKED (any of [`ON_REQUEST`]) when the device offers
    /// them. Both are relayed in either mode: the shadow ring has the
    /// guest's layout and the SVQ keeps the order on both sides.
    pub fn set_offered_on_request(&mut self, features: u64) {
        self.on_request = features & ON_REQUEST;
    }

    /// The VMM negotiated packed rings.
    pub(crate) fn packed_negotiated(&self) -> bool {
        self.acked_features
            .is_some_and(|f| f & vf::F_RING_PACKED != 0)
    }

    pub fn set_features(&mut self, acked: u64) -> Result<()> {
        let offered = self.offered_features();
        if acked & !offered != 0 {
            return Err(DeviceError::BadFeatures { acked, offered });
        }
        let old = self.acked_features;
        self.acked_features = Some(acked);
        // Rings already running keep the features they started with; the
        // backend gets the new set when the next ring starts. LOG_ALL is a
        // vhost bit, not a device feature: toggling it alone changes nothing
        // the backend sees.
        if !self.is_started() {
            self.push_backend_features()?;
        }
        if let Err(e) = self.set_logging(acked & F_LOG_ALL != 0) {
            self.acked_features = old;
            return Err(e);
        }
        Ok(())
    }

    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated (rings then start
    /// disabled until SET_VRING_ENABLE).
    pub(crate) fn protocol_negotiated(&self) -> bool {
        self.acked_features
            .is_some_and(|f| f & F_PROTOCOL_FEATURES != 0)
    }

    /// Features negotiated with the device: the guest's minus vhost-user
    /// bits and minus what the SVQ translates for a device without it.
    pub(crate) fn device_features(&self) -> u64 {
        self.acked_features.unwrap_or(0)
            & !(F_PROTOCOL_FEATURES | F_LOG_ALL)
            & !self.shadow_translated()
    }

    pub(crate) fn push_backend_features(&mut self) -> Result<()> {
        let f = self.device_features();
        if self.backend_features != Some(f) {
            // Features are fixed once the device saw FEATURES_OK; with every
            // ring stopped (the only time this runs) a reset is harmless and
            // keeps the IOVA mappings.
            if self.backend.status() != 0 {
                self.backend.set_status(0)?;
            }
            self.backend.set_features(f)?;
            self.backend_features = Some(f);
        }
        Ok(())
    }

    pub fn set_protocol_features(&mut self, f: u64) {
        self.protocol_features = f;
    }
}

/// Protocol features offered besides the migration ones. CONFIG is not:
/// QEMU's virtio-net has no use for the back-end's config space (it warns
/// "supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not"); GET_CONFIG
/// is still answered for frontends that read it anyway.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Everything offered: the above plus LOG_SHMFD, DEVICE_STATE,
/// INFLIGHT_SHMFD, and PAGEFAULT when the host passed the postcopy check
/// (`migration::userfaultfd::offer`).
impl Device {
    pub fn offered_protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features() | self.migration.protocol_features()
    }
}
