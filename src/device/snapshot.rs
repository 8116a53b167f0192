//! The device model as migration state (DESIGN.md "Live migration"):
//! what SET_DEVICE_STATE_FD(SAVE) writes and CHECK_DEVICE_STATE after a LOAD
//! applies. Canonical form: guest indexes and features only, never host
//! addresses.

use virtio_features::{F_LOG_ALL, F_PROTOCOL_FEATURES};

use super::model::{Device, LOG};
use crate::migration::stream::{
    DeviceState, Features, Limits, NicState, RelayMode, RingLayout, RxMode, VlanFilter, VringState,
};

/// Why a state cannot be saved from, or applied to, this device.
#[derive(Debug, thiserror::Error)]
pub enum StateRefused {
    #[error("rings are still running (GET_VRING_BASE first)")]
    RingsRunning,
    #[error("rings are running on the destination")]
    DestinationRunning,
    #[error("negotiated features {negotiated:#x} differ from the saved {saved:#x}")]
    Features { negotiated: u64, saved: u64 },
    #[error("{records} vring records for {queues} queues")]
    QueueCount { records: usize, queues: usize },
    #[error("queue {queue}: saved size {saved} but SET_VRING_NUM gave {set}")]
    QueueSize { queue: usize, saved: u16, set: u16 },
    #[error("saved MTU {saved} but the device has {device}")]
    Mtu { saved: u16, device: u16 },
    #[error("saved {saved} queue pairs but the device has {device}")]
    QueuePairs { saved: u16, device: usize },
    #[error("setting the saved MAC: {0}")]
    Mac(backends::BackendError),
}

/// virtio_net_config offsets.
const CFG_MAC: u32 = 0;
const CFG_MTU: u32 = 10;

impl Device {
    /// What a LOAD into this device may contain.
    pub(crate) fn state_limits(&self, protocol_offered: u64) -> Limits {
        Limits {
            queue_count: self.num_queues() as u16,
            max_queue_size: self.max_queue_size,
            features: self.offered_features(),
            protocol_features: protocol_offered,
        }
    }

    fn read_mac_mtu(&self) -> ([u8; 6], u16) {
        let mut mac = [0u8; 6];
        let mut mtu = [0u8; 2];
        let size = self.backend.config_size() as u32;
        if size >= CFG_MAC + 6 {
            let _ = self.backend.get_config(CFG_MAC, &mut mac);
        }
        if size >= CFG_MTU + 2 {
            let _ = self.backend.get_config(CFG_MTU, &mut mtu);
        }
        (mac, u16::from_le_bytes(mtu))
    }

    /// The state to save. Runs with every ring stopped (the state machine
    /// allows SAVING from STOPPED only), so `base`/`used_base`/`in_flight`
    /// are where the destination continues.
    pub(crate) fn snapshot_state(&self) -> Result<DeviceState, StateRefused> {
        if self.is_started() {
            return Err(StateRefused::RingsRunning);
        }
        let (mac, mtu) = self.read_mac_mtu();
        let packed = self.packed_negotiated();
        Ok(DeviceState {
            features: Features {
                virtio: self.acked_features.unwrap_or(0),
                protocol: self.protocol_features,
            },
            mode: if self.shadow {
                RelayMode::Shadow
            } else {
                RelayMode::Passthrough
            },
            nic: NicState {
                mac,
                mtu,
                queue_pairs: self.queue_pairs as u16,
                // The control queue is not relayed yet: the defaults a
                // freshly reset virtio-net device has.
                rx_mode: RxMode::default(),
                vlans: VlanFilter::default(),
            },
            vrings: self
                .vrings
                .iter()
                .map(|v| {
                    if packed && v.num != 0 {
                        // The vhost-user position: index and wrap counter
                        // of each half. A packed record carries no chains
                        // in flight (a stop warned of any: the device
                        // completes what it took before it answers).
                        let (avail, used) = (v.packed_base as u16, (v.packed_base >> 16) as u16);
                        return VringState {
                            size: v.num,
                            next_avail: avail & 0x7fff,
                            used_idx: used & 0x7fff,
                            enabled: v.enabled,
                            layout: RingLayout::Packed,
                            avail_wrap: avail & 0x8000 != 0,
                            used_wrap: used & 0x8000 != 0,
                            in_flight: Vec::new(),
                        };
                    }
                    VringState {
                        size: v.num,
                        next_avail: v.base,
                        used_idx: v.used_base,
                        enabled: v.enabled,
                        in_flight: v.in_flight.clone(),
                        ..Default::default()
                    }
                })
                .collect(),
        })
    }

    /// Apply a loaded, validated state. Everything that could make it fail
    /// is checked first: a refusal leaves the device exactly as it was.
    pub(crate) fn apply_state(&mut self, st: DeviceState) -> Result<(), StateRefused> {
        if self.is_started() {
            return Err(StateRefused::DestinationRunning);
        }
        // LOG_ALL and the vhost-user bit describe the source's session, not
        // the device.
        let vhost_bits = F_LOG_ALL | F_PROTOCOL_FEATURES;
        if let Some(acked) = self.acked_features {
            if acked & !vhost_bits != st.features.virtio & !vhost_bits {
                return Err(StateRefused::Features {
                    negotiated: acked & !vhost_bits,
                    saved: st.features.virtio & !vhost_bits,
                });
            }
        }
        if st.vrings.len() != self.num_queues() {
            return Err(StateRefused::QueueCount {
                records: st.vrings.len(),
                queues: self.num_queues(),
            });
        }
        for (q, (v, s)) in self.vrings.iter().zip(&st.vrings).enumerate() {
            if v.num != 0 && s.size != 0 && v.num != s.size {
                return Err(StateRefused::QueueSize {
                    queue: q,
                    saved: s.size,
                    set: v.num,
                });
            }
        }
        let (mac, mtu) = self.read_mac_mtu();
        if st.nic.mtu != mtu {
            return Err(StateRefused::Mtu {
                saved: st.nic.mtu,
                device: mtu,
            });
        }
        if usize::from(st.nic.queue_pairs) > self.queue_pairs {
            return Err(StateRefused::QueuePairs {
                saved: st.nic.queue_pairs,
                device: self.queue_pairs,
            });
        }
        if st.nic.mac != mac {
            self.backend
                .set_config(CFG_MAC, &st.nic.mac)
                .map_err(StateRefused::Mac)?;
        }
        for (q, s) in st.vrings.iter().enumerate() {
            let v = &mut self.vrings[q];
            if s.size != 0 && v.num == 0 {
                v.num = s.size;
            }
            if s.layout == RingLayout::Packed {
                let avail = s.next_avail | if s.avail_wrap { 0x8000 } else { 0 };
                let used = s.used_idx | if s.used_wrap { 0x8000 } else { 0 };
                v.set_packed_base(u32::from(avail) | (u32::from(used) << 16));
                v.in_flight.clear();
                self.stats[q].set_indexes(v.base, v.used_base);
                continue;
            }
            v.base = s.next_avail;
            v.used_base = s.used_idx;
            v.in_flight = s.in_flight.clone();
            self.stats[q].set_indexes(s.next_avail, s.used_idx);
        }
        // Under --shadow auto the mode follows this side's dirty logging;
        // otherwise the destination continues in the source's mode, unless
        // this side's device lacks what the guest's rings use (a packed
        // guest from a host whose device has packed rings): then only shadow
        // mode can run them here.
        let shadow = st.mode == RelayMode::Shadow;
        // The saved features: QEMU loads the state before it sets them.
        let translated = self.translated_in(st.features.virtio);
        if !self.auto_shadow && self.shadow != shadow {
            if !shadow && translated != 0 {
                log::info!(target: LOG, "{}: the source ran in passthrough; staying in shadow mode \
                    (this device lacks features {translated:#x} the guest negotiated)", self.name);
            } else {
                self.shadow = shadow;
                self.mode_events.push(shadow);
            }
        }
        log::info!(target: LOG, "{}: device state loaded ({} queues)",
            self.name, st.vrings.len());
        Ok(())
    }
}
