//! `--shadow on --packed` (and `--in-order`) on a device without packed
//! rings (or IN_ORDER): the relay offers them anyway, the device gets split
//! shadow rings and the features it has, and passthrough is refused while
//! the guest's rings need the translation.

use super::*;

const WRAP: u32 = 1 << 15;

/// A device in `mode` without RING_PACKED and IN_ORDER, both asked for.
fn split_only(shadow: bool) -> (Device, Fake) {
    let (mut dev, fake) = device(shadow);
    fake.0.lock().unwrap().lacks = F_RING_PACKED | F_IN_ORDER;
    dev.set_offered_on_request(F_RING_PACKED | F_IN_ORDER);
    (dev, fake)
}

/// Everything offered negotiated, guest memory, and packed ring 1 at
/// `pos` started; the features acked.
fn start_packed(dev: &mut Device, pos: u32) -> u64 {
    let acked = dev.offered_features() & !F_LOG_ALL;
    dev.set_features(acked).unwrap();
    dev.set_mem_table(vec![region(0, MEM, UADDR)]).unwrap();
    dev.set_vring_num(1, 256).unwrap();
    dev.set_vring_base(1, pos).unwrap();
    dev.set_vring_addr(1, UADDR + 0x4000, UADDR + 0x8000, UADDR + 0x9000, None)
        .unwrap();
    dev.set_vring_kick(1, Some(eventfd())).unwrap();
    dev.set_vring_enable(1, true).unwrap();
    acked
}

#[test]
fn only_shadow_mode_offers_what_the_device_lacks() {
    let (dev, _f) = split_only(true);
    let offered = dev.offered_features();
    assert_eq!(
        offered & (F_RING_PACKED | F_IN_ORDER),
        F_RING_PACKED | F_IN_ORDER,
        "{offered:#x}"
    );
    // Passthrough needs the device to speak them.
    let (dev, _f) = split_only(false);
    assert_eq!(dev.offered_features() & (F_RING_PACKED | F_IN_ORDER), 0);
    // `--shadow auto` returns to passthrough after a migration.
    let (mut dev, _f) = split_only(true);
    dev.set_auto_shadow(true);
    assert_eq!(dev.offered_features() & (F_RING_PACKED | F_IN_ORDER), 0);
    // Not asked for: not offered.
    let (mut dev, fake) = device(true);
    fake.0.lock().unwrap().lacks = F_RING_PACKED;
    assert_eq!(dev.offered_features() & F_RING_PACKED, 0);
    dev.set_offered_on_request(F_IN_ORDER);
    assert_eq!(dev.offered_features() & F_RING_PACKED, 0);
}

#[test]
fn a_packed_guest_ring_gets_a_split_shadow_ring() {
    let (mut dev, fake) = split_only(true);
    let pos = 9 | WRAP | (9 | WRAP) << 16;
    start_packed(&mut dev, pos);
    assert_eq!(dev.query().queues[1].mode, Mode::Shadow);
    let ops = fake.ops();
    // The device was given what it has, and a split ring from index 0.
    let features = ops.iter().find_map(|o| match o {
        Op::Features(f) => Some(*f),
        _ => None,
    });
    assert_eq!(
        features.map(|f| f & (F_RING_PACKED | F_IN_ORDER)),
        Some(0),
        "{ops:?}"
    );
    assert!(ops.contains(&Op::Base(1, 0)), "{ops:?}");
    assert!(
        !ops.iter().any(|o| matches!(o, Op::BasePacked(..))),
        "{ops:?}"
    );
    let addr = ops.iter().find_map(|o| match o {
        Op::Addr(1, a) => Some(*a),
        _ => None,
    });
    let a = addr.expect("shadow ring addresses");
    assert_eq!((a.desc % 16, a.used % 4), (0, 0));

    // Passthrough cannot relay a packed guest ring to this device.
    let e = dev.set_shadow(false).unwrap_err();
    assert!(
        matches!(e, DeviceError::NeedsShadow { features } if features == F_RING_PACKED | F_IN_ORDER),
        "{e}"
    );
    assert_eq!(dev.query().queues[1].mode, Mode::Shadow);
    assert!(dev.shadow());
    // Stopping reads the device's split position and gives the VMM the
    // guest's packed one (nothing moved).
    fake.set_base(1, 0);
    assert_eq!(dev.get_vring_base(1).unwrap(), pos);
}

#[test]
fn a_device_with_the_features_keeps_getting_them() {
    let (mut dev, fake) = device(true);
    dev.set_offered_on_request(F_RING_PACKED);
    let acked = start_packed(&mut dev, WRAP | WRAP << 16);
    let ops = fake.ops();
    assert!(
        ops.contains(&Op::Features(acked & !F_PROTOCOL_FEATURES)),
        "{ops:?}"
    );
    assert!(
        ops.contains(&Op::BasePacked(1, WRAP | WRAP << 16)),
        "{ops:?}"
    );
    // Both layouts agree: passthrough is possible.
    assert!(dev.set_shadow(false).unwrap());
}

/// A packed guest migrating from a host whose device has packed rings (the
/// source relay in passthrough) to one whose device has not: the
/// destination takes the packed positions and stays in shadow mode, the
/// only one that can run them there.
#[test]
fn a_destination_without_the_features_stays_in_shadow() {
    let (mut src, _sf) = device(false);
    src.set_offered_on_request(F_RING_PACKED);
    let acked = src.offered_features() & !F_LOG_ALL;
    src.set_features(acked).unwrap();
    let pos = 3 | WRAP | (2 | WRAP) << 16;
    src.set_vring_num(1, 256).unwrap();
    src.set_vring_base(1, pos).unwrap();
    let st = src.snapshot_state().unwrap();
    assert_eq!(st.mode, crate::migration::stream::RelayMode::Passthrough);

    // QEMU loads the state before it sets the features.
    let (mut dst, _df) = split_only(true);
    dst.apply_state(st).unwrap();
    dst.set_features(acked).unwrap();
    assert!(dst.shadow(), "the destination left shadow mode");
    assert_eq!(dst.vrings[1].packed_base, pos);
    // A destination whose device has them follows the source.
    let (mut same, _f) = device(true);
    same.set_offered_on_request(F_RING_PACKED);
    same.set_features(acked).unwrap();
    same.apply_state(src.snapshot_state().unwrap()).unwrap();
    assert!(!same.shadow());
}
