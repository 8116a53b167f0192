//! The NIC control state (MAC, queue pairs) from the VMM's messages to a
//! vDPA device's control queue, against the fake vDPA kernel.

use crate::device::Device;
use testkit::vdpa_fake::{self, *};
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
