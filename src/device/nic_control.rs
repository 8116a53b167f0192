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

use backends::NetCtrlState;

/// What the VMM said, and what the backend last accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NetCtrl {
    /// MAC the VMM wrote to the config space.
    mac: Option<[u8; 6]>,
    /// Last state given to the backend (accepted, or not supported by it).
    sent: Option<NetCtrlState>,
}

impl NetCtrl {
    /// A config-space write of `data` at `offset`: remember the MAC bytes
    /// it covers. `device_mac` reads the device's MAC, the base for a write
    /// that covers only part of it. Returns whether the write touched the
    /// MAC.
    pub(crate) fn config_written(
        &mut self,
        offset: u32,
        data: &[u8],
        device_mac: impl FnOnce() -> Option<[u8; 6]>,
    ) -> bool {
        let (start, end) = (offset as usize, offset as usize + data.len());
        if start >= 6 || data.is_empty() {
            return false;
        }
        let Some(mut mac) = self.mac.or_else(device_mac) else {
            return false;
        };
        for (i, b) in (start..end.min(6)).zip(data) {
            mac[i] = *b;
        }
        self.mac = Some(mac);
        true
    }

    /// The state to give the backend now, if it changed: `enabled_pairs` is
    /// what the VMM runs (`None`: no ring enabled), `all` the device's
    /// number of pairs. The caller reports back with [`NetCtrl::sent`].
    pub(crate) fn wanted(&self, enabled_pairs: Option<u16>, all: u16) -> Option<NetCtrlState> {
        let pairs = match (enabled_pairs, self.sent) {
            (Some(p), _) => p,
            // Nothing enabled (yet, or any more): the pairs stay as they
            // are; only a MAC change is worth sending.
            (None, Some(sent)) if self.mac != sent.mac => sent.queue_pairs,
            (None, None) if self.mac.is_some() => all,
            (None, _) => return None,
        };
        let state = NetCtrlState {
            mac: self.mac,
            queue_pairs: pairs,
            ..NetCtrlState::after_reset()
        };
        (self.sent != Some(state)).then_some(state)
    }

    /// `state` was given to the backend (whatever it answered: a backend
    /// that failed keeps it and retries at its next DRIVER_OK).
    pub(crate) fn sent(&mut self, state: NetCtrlState) {
        self.sent = Some(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];

    #[test]
    fn a_partial_mac_write_starts_from_the_device_mac() {
        let mut c = NetCtrl::default();
        assert!(c.config_written(4, &[0xcd, 0xef], || Some([0x52, 0x54, 0, 0xab, 0, 0])));
        assert_eq!(c.mac, Some(MAC));
        // Past the MAC: not a MAC write.
        assert!(!c.config_written(6, &[1, 2], || unreachable!()));
    }

    #[test]
    fn nothing_is_sent_twice_and_nothing_before_it_is_known() {
        let mut c = NetCtrl::default();
        assert_eq!(c.wanted(None, 4), None, "nothing enabled, no MAC");
        let s = c.wanted(Some(2), 4).unwrap();
        assert_eq!((s.mac, s.queue_pairs), (None, 2));
        c.sent(s);
        assert_eq!(c.wanted(Some(2), 4), None);
        // Every ring disabled: the pairs stay, no command.
        assert_eq!(c.wanted(None, 4), None);
        assert!(c.config_written(0, &MAC, || Some([0; 6])));
        let s = c.wanted(None, 4).unwrap();
        assert_eq!((s.mac, s.queue_pairs), (Some(MAC), 2));
    }
}
