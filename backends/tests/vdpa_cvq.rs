//! The daemon's control virtqueue driver against the fake device, which
//! consumes the ring through the IOTLB entries it was given (in the ASID of
//! the queue's group) and writes the ack.

use std::time::Duration;

use backends::vdpa::VdpaNet;
use backends::NetCtrlState;
use backends::{BackendError, DeviceBackend};
use testkit::vdpa_fake::*;

const NEW_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const TOP: u64 = (1 << 48) - 4096;

fn running(dev: Device, pairs: u16, features: u64) -> (VdpaNet, FakeVdpa) {
    let (mut net, fake) = open(dev, pairs);
    net.set_features(features).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    (net, fake)
}

fn state(mac: Option<[u8; 6]>, queue_pairs: u16, promisc: bool, allmulti: bool) -> NetCtrlState {
    NetCtrlState {
        mac,
        queue_pairs,
        promisc,
        allmulti,
    }
}

fn no_faults(fake: &FakeVdpa) {
    let d = fake.lock();
    assert!(d.cvq_errors.is_empty(), "{:?}", d.cvq_errors);
}

#[test]
fn mac_is_set_through_the_control_queue() {
    let (mut net, fake) = running(Device::net(1), 1, RELAY);
    assert!(fake.lock().commands.is_empty());
    net.apply_net_state(&state(Some(NEW_MAC), 1, true, false))
        .unwrap();
    let d = fake.lock();
    assert_eq!(d.commands, vec![(1, 1, NEW_MAC.to_vec())]);
    assert_eq!(d.mac, NEW_MAC);
    drop(d);
    // Already there: nothing more is sent.
    net.apply_net_state(&state(Some(NEW_MAC), 1, true, false))
        .unwrap();
    assert_eq!(fake.lock().commands.len(), 1);
    no_faults(&fake);
}

#[test]
fn control_queue_memory_is_reachable_only_in_its_own_address_space() {
    let (mut net, fake) = running(Device::net(1), 1, RELAY);
    assert_eq!(net.control_queue(), Some((2, 1)));
    {
        let d = fake.lock();
        assert!(d.parent_iotlb.contains_key(&(1, TOP)));
        assert!(!d.parent_iotlb.keys().any(|&(asid, _)| asid == 0));
    }
    net.apply_net_state(&state(Some(NEW_MAC), 1, true, false))
        .unwrap();
    no_faults(&fake);
    // Take the page away from the device: the command cannot be read and
    // is never answered, which the bounded wait turns into an error.
    fake.lock().parent_iotlb.clear();
    net.set_cvq_timeout(Duration::from_millis(100));
    let e = net
        .apply_net_state(&state(Some(MAC), 1, true, false))
        .unwrap_err();
    assert!(
        matches!(e, BackendError::Device(ref m) if m.contains("no answer")),
        "{e}"
    );
    assert!(!fake.lock().cvq_errors.is_empty());
}

#[test]
fn queue_pairs_are_set_at_driver_ok_and_on_request() {
    let (mut net, fake) = running(Device::net(4), 4, RELAY | F_MQ);
    assert_eq!(fake.lock().commands, vec![(4, 0, vec![4, 0])]);
    assert_eq!(fake.lock().pairs, 4);
    net.apply_net_state(&state(None, 2, true, false)).unwrap();
    assert_eq!(fake.lock().commands[1], (4, 0, vec![2, 0]));
    assert_eq!(fake.lock().pairs, 2);
    // More than were opened.
    assert!(net.apply_net_state(&state(None, 5, true, false)).is_err());
    assert!(net.apply_net_state(&state(None, 0, true, false)).is_err());
    assert_eq!(fake.lock().commands.len(), 2);
    no_faults(&fake);
}

#[test]
fn without_mq_negotiated_only_one_pair_runs() {
    let (mut net, fake) = running(Device::net(4), 4, RELAY);
    // Control queue at index 2, no VQ_PAIRS_SET.
    assert_eq!(net.control_queue(), Some((2, 1)));
    assert!(fake.lock().commands.is_empty());
    assert!(matches!(
        net.apply_net_state(&state(None, 2, true, false)),
        Err(BackendError::Unsupported(_))
    ));
}

#[test]
fn rx_mode_commands() {
    let (mut net, fake) = running(Device::net(1), 1, RELAY);
    net.apply_net_state(&state(None, 1, false, true)).unwrap();
    {
        let d = fake.lock();
        assert_eq!(d.commands, vec![(0, 0, vec![0]), (0, 1, vec![1])]);
        assert!(!d.promisc && d.allmulti);
    }
    net.apply_net_state(&state(None, 1, true, true)).unwrap();
    assert_eq!(fake.lock().commands[2], (0, 0, vec![1]));
    assert!(fake.lock().promisc);
    no_faults(&fake);
}

#[test]
fn a_nack_is_a_typed_error_and_the_queue_keeps_working() {
    let (mut net, fake) = running(Device::net(1), 1, RELAY);
    fake.lock().cvq_ack = 1;
    let e = net
        .apply_net_state(&state(Some(NEW_MAC), 1, true, false))
        .unwrap_err();
    assert!(
        matches!(
            e,
            BackendError::CtrlNack {
                class: 1,
                cmd: 1,
                ack: 1
            }
        ),
        "{e}"
    );
    assert_eq!(fake.lock().mac, MAC);
    fake.lock().cvq_ack = 0;
    net.apply_net_state(&state(Some(NEW_MAC), 1, true, false))
        .unwrap();
    assert_eq!(fake.lock().mac, NEW_MAC);
    no_faults(&fake);
}

#[test]
fn state_set_before_driver_ok_is_sent_after_it_and_after_every_reset() {
    // A migration destination: the state arrives before the device runs.
    let (mut net, fake) = open(Device::net(2), 2);
    let s = state(Some(NEW_MAC), 2, false, true);
    net.apply_net_state(&s).unwrap();
    net.set_features(RELAY | F_MQ).unwrap();
    assert!(fake.lock().commands.is_empty());
    net.set_status(S_DRIVER_OK).unwrap();
    let expected = vec![
        (1, 1, NEW_MAC.to_vec()),
        (4, 0, vec![2, 0]),
        (0, 0, vec![0]),
        (0, 1, vec![1]),
    ];
    assert_eq!(fake.lock().commands, expected);
    // The device forgets it all at reset; the backend restores it.
    net.set_status(0).unwrap();
    assert_eq!(fake.lock().mac, MAC);
    net.set_features(RELAY | F_MQ).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    let d = fake.lock();
    assert_eq!(d.commands[4..], expected[..]);
    assert_eq!(
        (d.mac, d.pairs, d.promisc, d.allmulti),
        (NEW_MAC, 2, false, true)
    );
    drop(d);
    no_faults(&fake);
}

#[test]
fn missing_features_are_unsupported_and_nothing_is_sent() {
    let mut d = Device::net(1);
    d.offered &= !(F_CTRL_RX | F_CTRL_MAC_ADDR);
    let (mut net, fake) = running(d, 1, RELAY);
    for s in [
        state(None, 1, false, false),
        state(None, 1, true, true),
        state(Some(NEW_MAC), 1, true, false),
    ] {
        assert!(matches!(
            net.apply_net_state(&s),
            Err(BackendError::Unsupported(_))
        ));
    }
    assert!(fake.lock().commands.is_empty());
    // The defaults need no command at all.
    net.apply_net_state(&NetCtrlState::default()).unwrap();
}

#[test]
fn without_a_control_queue_only_the_defaults_apply() {
    let mut d = Device::net(1);
    d.offered &= !(F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR);
    let (mut net, fake) = running(d, 1, RELAY);
    assert_eq!(net.control_queue(), None);
    net.apply_net_state(&NetCtrlState::default()).unwrap();
    assert!(matches!(
        net.apply_net_state(&state(Some(NEW_MAC), 1, true, false)),
        Err(BackendError::Unsupported(_))
    ));
    assert!(!fake
        .lock()
        .calls
        .iter()
        .any(|c| matches!(c, Op::SetVringNum(2, _))));
}

#[test]
fn an_unanswered_command_times_out_and_blocks_the_queue_until_reset() {
    let (mut net, fake) = running(Device::net(1), 1, RELAY);
    fake.lock().cvq_silent = true;
    net.set_cvq_timeout(Duration::from_millis(50));
    let e = net
        .apply_net_state(&state(Some(NEW_MAC), 1, true, false))
        .unwrap_err();
    assert!(
        matches!(e, BackendError::Device(ref m) if m.contains("no answer")),
        "{e}"
    );
    fake.lock().cvq_silent = false;
    assert!(matches!(
        net.apply_net_state(&state(None, 1, false, false)),
        Err(BackendError::InvalidState { .. })
    ));
    // A reset gives a fresh ring; the last state asked for goes out.
    net.set_status(0).unwrap();
    net.set_features(RELAY).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    let d = fake.lock();
    assert_eq!(d.mac, MAC);
    assert!(!d.promisc);
    assert_eq!(d.commands.last(), Some(&(0, 0, vec![0])));
}

#[test]
fn commands_wrap_around_the_ring() {
    let (mut net, fake) = running(Device::net(1), 1, RELAY);
    // 16-entry ring: 40 commands take the indexes around more than twice.
    for i in 0..40u8 {
        let mac = [0x02, 0, 0, 0, 0, i];
        net.apply_net_state(&state(Some(mac), 1, true, false))
            .unwrap();
        assert_eq!(fake.lock().mac, mac);
    }
    assert_eq!(fake.lock().commands.len(), 40);
    assert_eq!(fake.lock().vrings[2].used, 40);
    no_faults(&fake);
}

#[test]
fn small_rings_still_fit_a_command() {
    let mut d = Device::net(1);
    d.vring_max = 4;
    let (mut net, fake) = running(d, 1, RELAY);
    assert!(fake.lock().calls.contains(&Op::SetVringNum(2, 4)));
    for i in 0..6u8 {
        net.apply_net_state(&state(Some([2, 0, 0, 0, 0, i]), 1, true, false))
            .unwrap();
    }
    no_faults(&fake);
}
