//! The NIC control state the VMM negotiated, handed to a device backend
//! whose control queue the daemon drives (vDPA: MAC and queue pairs are
//! programmed through the device's CVQ, which the VMM never sees).
//!
//! Over vhost-user the VMM runs the guest's control queue itself and tells
//! the backend the outcome: the MAC by SET_CONFIG (with the CONFIG protocol
//! feature), the number of active queue pairs by which rings it enables
//! (SET_VRING_ENABLE, QEMU's `vhost_set_vring_enable` on a VQ_PAIRS_SET).
//! The daemon derives a [`NetCtrlState`] from those two and gives it to the
//! backend whenever it changes; the backend sends the commands (after
//! DRIVER_OK, and again after every device reset). RX mode is not carried
//! by vhost-user, so it stays at the device default (promiscuous).
//!
//! Rings the daemon itself stops and starts (mode switches, GET_VRING_BASE)
//! do not count: only the VMM's SET_VRING_ENABLE does. A VMM that disables
//! every ring (shutting down) leaves the state as it was.

use backends::vdpa::NetCtrlState;
use backends::BackendError;

use crate::device::{Device, LOG};

/// What the VMM said, and what the backend last accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NetCtrl {
    /// MAC the VMM wrote to the config space.
    mac: Option<[u8; 6]>,
    /// Last state the backend accepted (or does not support).
    sent: Option<NetCtrlState>,
}

impl Device {
    /// A config-space write from the VMM: remember the MAC bytes it covers.
    pub(crate) fn net_ctrl_config_written(&mut self, offset: u32, data: &[u8]) {
        let (start, end) = (offset as usize, offset as usize + data.len());
        if start >= 6 || data.is_empty() {
            return;
        }
        let mut mac = match self.net_ctrl.mac {
            Some(m) => m,
            None => {
                let mut m = [0u8; 6];
                if self.backend.get_config(0, &mut m).is_err() {
                    return;
                }
                m
            }
        };
        for (i, b) in (start..end.min(6)).zip(data) {
            mac[i] = *b;
        }
        self.net_ctrl.mac = Some(mac);
        self.sync_net_ctrl();
    }

    /// Queue pairs the VMM has enabled: one past the highest pair with an
    /// enabled ring (all of them when the VMM does not use SET_VRING_ENABLE,
    /// i.e. without protocol features); `None` when no ring is enabled.
    fn vmm_enabled_pairs(&self) -> Option<u16> {
        if !self.protocol_negotiated() {
            return u16::try_from(self.queue_pairs).ok();
        }
        let top = (0..self.queue_pairs)
            .rev()
            .find(|&k| self.vrings[2 * k].enabled || self.vrings[2 * k + 1].enabled)?;
        u16::try_from(top + 1).ok()
    }

    /// Gives the backend the state the VMM negotiated, if it changed.
    pub(crate) fn sync_net_ctrl(&mut self) {
        let all = self.queue_pairs as u16;
        let pairs = match (self.vmm_enabled_pairs(), self.net_ctrl.sent) {
            (Some(p), _) => p,
            // Nothing enabled (yet, or any more): the pairs stay as they
            // are; only a MAC change is worth sending.
            (None, Some(sent)) if self.net_ctrl.mac != sent.mac => sent.queue_pairs,
            (None, None) if self.net_ctrl.mac.is_some() => all,
            (None, _) => return,
        };
        let state = NetCtrlState {
            mac: self.net_ctrl.mac,
            queue_pairs: pairs,
            ..NetCtrlState::after_reset()
        };
        if self.net_ctrl.sent == Some(state) {
            return;
        }
        match self.backend.apply_net_ctrl(&state) {
            Ok(()) => {
                log::debug!(target: LOG, "{}: NIC control state {state:?}", self.name);
            }
            Err(BackendError::Unsupported(what)) => {
                log::debug!(target: LOG, "{}: NIC control state not programmed: {what}", self.name);
            }
            Err(e) => {
                // The backend keeps the wanted state and sends it again at
                // the next DRIVER_OK; the data path is not affected.
                log::warn!(target: LOG, "{}: programming {state:?}: {e}", self.name);
            }
        }
        self.net_ctrl.sent = Some(state);
    }
}

#[cfg(test)]
#[path = "../backends/tests/vdpa_fake/mod.rs"]
mod vdpa_fake;

#[cfg(test)]
mod tests {
    use super::vdpa_fake::{self, *};
    use crate::device::Device;
    use virtio_features::F_PROTOCOL_FEATURES;

    const NEW_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    const ALL_OK: u8 = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;

    /// The daemon's device on a VdpaNet over the fake vDPA device.
    fn daemon_on_vdpa(pairs: u16) -> (Device, FakeVdpa) {
        let (net, fake) = vdpa_fake::open(vdpa_fake::Device::net(pairs), pairs);
        let dev = Device::new("net0", Box::new(net), pairs, 256, false).unwrap();
        (dev, fake)
    }

    fn commands(fake: &FakeVdpa) -> Vec<(u8, u8, Vec<u8>)> {
        std::mem::take(&mut fake.lock().commands)
    }

    #[test]
    fn mac_and_pairs_from_the_vmm_reach_the_device_cvq() {
        let (mut dev, fake) = daemon_on_vdpa(2);
        let f = dev.offered_features();
        assert_eq!(f & F_MQ, F_MQ, "MQ offered to the VMM: {f:#x}");
        dev.set_features(f | F_PROTOCOL_FEATURES).unwrap();
        // The VMM writes the MAC in two pieces, then enables both pairs.
        dev.set_config(0, &NEW_MAC[..2]).unwrap();
        dev.set_config(2, &NEW_MAC[2..]).unwrap();
        for q in 0..4 {
            dev.set_vring_enable(q, true).unwrap();
        }
        // Nothing goes out before DRIVER_OK (the rings are not complete).
        assert!(commands(&fake).is_empty());
        dev.backend.set_status(ALL_OK).unwrap();
        assert_eq!(
            commands(&fake),
            vec![(1, 1, NEW_MAC.to_vec()), (4, 0, vec![2, 0])]
        );
        // The VMM's driver goes down to one pair (QEMU disables pair 1).
        dev.set_vring_enable(2, false).unwrap();
        dev.set_vring_enable(3, false).unwrap();
        assert_eq!(commands(&fake), vec![(4, 0, vec![1, 0])]);
        {
            let d = fake.lock();
            assert_eq!((d.mac, d.pairs), (NEW_MAC, 1));
        }
        // Shutting down (every ring disabled) changes nothing on the device.
        dev.set_vring_enable(0, false).unwrap();
        dev.set_vring_enable(1, false).unwrap();
        assert!(commands(&fake).is_empty());
        // A reset (migration destination, VMM restart) gets it all again.
        dev.backend.set_status(0).unwrap();
        dev.backend.set_features(dev.device_features()).unwrap();
        dev.backend.set_status(ALL_OK).unwrap();
        assert_eq!(commands(&fake), vec![(1, 1, NEW_MAC.to_vec())]);
    }

    #[test]
    fn without_protocol_features_every_pair_runs() {
        let (mut dev, fake) = daemon_on_vdpa(2);
        let f = dev.offered_features();
        dev.set_features(f & !F_PROTOCOL_FEATURES).unwrap();
        dev.set_vring_enable(2, false).unwrap();
        dev.backend.set_status(ALL_OK).unwrap();
        // VdpaNet's own default: all open pairs.
        assert_eq!(commands(&fake), vec![(4, 0, vec![2, 0])]);
    }
}
