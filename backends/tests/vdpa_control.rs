//! VdpaNet's control path against the fake vhost-vdpa device: the ioctl
//! sequence of open, feature negotiation and DRIVER_OK, status rules,
//! suspend/resume, vring state, config space.

use std::sync::Arc;

use backends::vdpa::{backend_bits, IotlbKind, IotlbMsg, VdpaNet, ACCESS_RW};
use backends::{BackendError, DeviceBackend, IovaRange, VringAddrs};
use testkit::vdpa_fake::*;
use vmm_sys_util::eventfd::EventFd;

const TOP: u64 = (1 << 48) - 4096;

#[test]
fn open_follows_the_vhost_vdpa_sequence() {
    let fake = FakeVdpa::new(Device::net(4));
    let net = VdpaNet::with_ioctls(Box::new(fake.clone()), 2).unwrap();
    use Op::*;
    assert_eq!(
        fake.lock().take_calls(),
        vec![
            SetOwner,
            GetBackendFeatures,
            SetBackendFeatures(ALL_BACKEND),
            GetDeviceId,
            GetFeatures,
            SetStatus(0),
            GetVringNum,
            GetIovaRange,
            GetVqsCount,
            GetConfigSize,
            GetConfig(8, 2),
            GetStatus,
            SetStatus(S_ACK | S_DRIVER),
            GetStatus,
        ]
    );
    assert_eq!(net.kind(), "vdpa");
    assert_eq!(net.num_queues(), 4);
    assert_eq!(net.max_queue_pairs(), 4);
    assert_eq!(net.max_queue_size(), 256);
    assert_eq!(net.config_size(), 12);
    assert_eq!(net.status(), S_ACK | S_DRIVER);
    // The control queue's bits are the backend's, not the relay's.
    let f = net.device_features();
    assert_eq!(
        f & (F_CTRL_VQ | F_CTRL_RX | F_CTRL_VLAN | F_CTRL_MAC_ADDR),
        0
    );
    assert_eq!(f & F_ACCESS_PLATFORM, 0);
    assert_eq!(f & (F_MQ | F_VERSION_1 | F_MAC), F_MQ | F_VERSION_1 | F_MAC);
    // The top page is kept for the control queue.
    assert_eq!(
        net.iova_range(),
        IovaRange {
            first: 0,
            last: TOP - 1
        }
    );
    assert_eq!(net.device_iova_range().last, (1 << 48) - 1);
}

#[test]
fn only_offered_backend_features_are_acked() {
    let mut d = Device::net(1);
    d.backend_offered = bf(backend_bits::IOTLB_MSG_V2) | bf(backend_bits::SUSPEND) | (1 << 7);
    d.offered &= !F_CTRL_VQ;
    let fake = FakeVdpa::new(d);
    let net = VdpaNet::with_ioctls(Box::new(fake.clone()), 1).unwrap();
    assert!(fake.lock().calls.contains(&Op::SetBackendFeatures(
        bf(backend_bits::IOTLB_MSG_V2) | bf(backend_bits::SUSPEND)
    )));
    assert_eq!(
        net.backend_features(),
        bf(backend_bits::IOTLB_MSG_V2) | bf(backend_bits::SUSPEND)
    );
    // No control queue, no page kept back; one pair, no MQ: no config read.
    assert_eq!(net.iova_range().last, (1 << 48) - 1);
    assert!(!fake
        .lock()
        .calls
        .iter()
        .any(|c| matches!(c, Op::GetConfig(..))));
}

#[test]
fn open_rejects_what_it_cannot_drive() {
    let mut d = Device::net(1);
    d.backend_offered = bf(backend_bits::IOTLB_BATCH);
    let r = VdpaNet::with_ioctls(Box::new(FakeVdpa::new(d)), 1);
    assert!(matches!(r, Err(BackendError::Unsupported(_))));

    let mut d = Device::net(1);
    d.device_id = 2;
    let r = VdpaNet::with_ioctls(Box::new(FakeVdpa::new(d)), 1);
    assert!(matches!(r, Err(BackendError::Device(m)) if m.contains("device id 2")));

    let r = VdpaNet::with_ioctls(Box::new(FakeVdpa::new(Device::net(2))), 3);
    assert!(matches!(r, Err(BackendError::Device(m)) if m.contains("3 queue pairs")));
    let r = VdpaNet::with_ioctls(Box::new(FakeVdpa::new(Device::net(1))), 2);
    assert!(matches!(r, Err(BackendError::Device(m)) if m.contains("no VIRTIO_NET_F_MQ")));
    let r = VdpaNet::with_ioctls(Box::new(FakeVdpa::new(Device::net(1))), 0);
    assert!(r.is_err());

    // A failing ioctl names itself.
    let mut d = Device::net(1);
    d.fail.insert("GET_IOVA_RANGE", libc::ENOTTY);
    let Err(BackendError::Io(e)) = VdpaNet::with_ioctls(Box::new(FakeVdpa::new(d)), 1) else {
        panic!("expected an I/O error");
    };
    assert!(e.to_string().contains("VHOST_VDPA_GET_IOVA_RANGE"), "{e}");
}

#[test]
fn ring_size_is_rounded_down_to_a_power_of_two() {
    let mut d = Device::net(1);
    d.vring_max = 1000;
    let (net, _fake) = open(d, 1);
    assert_eq!(net.max_queue_size(), 512);
}

#[test]
fn config_size_falls_back_to_the_features() {
    let mut d = Device::net(2);
    d.fail.insert("GET_CONFIG_SIZE", libc::ENOTTY);
    let (net, _fake) = open(d, 1);
    assert_eq!(net.config_size(), 12);
}

#[test]
fn negotiation_and_driver_ok_with_an_isolated_control_queue() {
    let (mut net, fake) = open(Device::net(4), 2);
    use Op::*;
    net.set_features(RELAY | F_MQ).unwrap();
    let acked = RELAY | F_MQ | F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR | F_ACCESS_PLATFORM;
    let mut want = vec![
        SetFeatures(acked),
        GetStatus,
        SetStatus(S_ACK | S_DRIVER | S_FEATURES_OK),
        GetStatus,
        GetAsNum,
        GetGroupNum,
        GetVringGroup(8),
    ];
    want.extend((0..8).map(GetVringGroup));
    want.push(SetGroupAsid(1, 1));
    assert_eq!(fake.lock().take_calls(), want);
    assert_eq!(net.negotiated_features(), Some(acked));
    assert_eq!(net.control_queue(), Some((8, 1)));
    assert_eq!(fake.lock().features, acked);

    net.set_status(S_DRIVER_OK).unwrap();
    let calls = fake.lock().take_calls();
    let cvq_addrs = VringAddrs {
        desc: TOP,
        avail: TOP + 0x100,
        used: TOP + 0x200,
    };
    let Iotlb(update) = calls[1] else {
        panic!("{calls:?}")
    };
    assert_eq!(
        calls,
        vec![
            Iotlb(IotlbMsg::batch(IotlbKind::BatchBegin, 1)),
            Iotlb(IotlbMsg {
                asid: 1,
                kind: IotlbKind::Update,
                iova: TOP,
                size: 4096,
                uaddr: update.uaddr,
                perm: ACCESS_RW,
            }),
            Iotlb(IotlbMsg::batch(IotlbKind::BatchEnd, 1)),
            SetVringNum(8, 16),
            SetVringAddr(8, cvq_addrs),
            SetVringBase(8, 0),
            SetVringKick(8, true),
            SetVringCall(8, true),
            SetVringEnable(8, true),
            GetStatus,
            SetStatus(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK),
            GetStatus,
        ]
    );
    assert_ne!(update.uaddr, 0);
    assert_eq!(update.uaddr % 4096, 0);
    assert_eq!(net.status(), 0xf);
    // Both open pairs run: VQ_PAIRS_SET went out right after DRIVER_OK.
    let d = fake.lock();
    assert_eq!(d.commands, vec![(4, 0, vec![2, 0])]);
    assert_eq!(d.pairs, 2);
    assert!(d.cvq_errors.is_empty(), "{:?}", d.cvq_errors);
}

#[test]
fn control_queue_shares_asid_0_when_not_isolated() {
    let mut d = Device::net(1);
    d.cvq_isolated = false;
    let (mut net, fake) = open(d, 1);
    net.set_features(RELAY).unwrap();
    // Without MQ the control queue is index 2.
    assert_eq!(net.control_queue(), Some((2, 0)));
    assert!(!fake
        .lock()
        .calls
        .iter()
        .any(|c| matches!(c, Op::SetGroupAsid(..))));
    net.set_status(S_DRIVER_OK).unwrap();
    let d = fake.lock();
    let upd: Vec<_> = d
        .iotlb_calls()
        .into_iter()
        .filter(|m| m.kind == IotlbKind::Update)
        .collect();
    assert_eq!(upd.len(), 1);
    assert_eq!((upd[0].asid, upd[0].iova), (0, TOP));
    // One pair and default RX mode: nothing to send.
    assert!(d.commands.is_empty());
}

#[test]
fn no_asid_feature_means_no_isolation_probe() {
    let mut d = Device::net(1);
    d.backend_offered &= !bf(backend_bits::IOTLB_ASID);
    let (mut net, fake) = open(d, 1);
    net.set_features(RELAY).unwrap();
    assert_eq!(net.control_queue(), Some((2, 0)));
    assert!(!fake
        .lock()
        .calls
        .iter()
        .any(|c| matches!(c, Op::GetAsNum | Op::SetGroupAsid(..))));
}

#[test]
fn features_are_checked() {
    let (mut net, fake) = open(Device::net(1), 1);
    // Bits the device lacks, and bits the backend keeps, are refused.
    for f in [1u64 << 40, F_CTRL_VQ, F_ACCESS_PLATFORM] {
        assert!(matches!(
            net.set_features(RELAY | f),
            Err(BackendError::UnsupportedFeatures(x)) if x == f
        ));
    }
    assert!(fake.lock().calls.is_empty());
}

#[test]
fn features_ok_that_does_not_stick_is_an_error() {
    let mut d = Device::net(1);
    d.refuse_features = F_EVENT_IDX;
    let (mut net, _fake) = open(d, 1);
    let e = net.set_features(RELAY).unwrap_err();
    assert!(
        matches!(e, BackendError::Device(ref m) if m.contains("0x8")),
        "{e}"
    );
    assert_eq!(net.negotiated_features(), None);
    assert!(net.set_status(S_DRIVER_OK).is_err());
}

#[test]
fn changing_features_before_driver_ok_resets_first() {
    let (mut net, fake) = open(Device::net(1), 1);
    net.set_features(RELAY).unwrap();
    fake.lock().calls.clear();
    net.set_features(F_VERSION_1).unwrap();
    let calls = fake.lock().take_calls();
    assert_eq!(calls[0], Op::SetStatus(0));
    assert!(calls.contains(&Op::SetFeatures(
        F_VERSION_1 | F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR | F_ACCESS_PLATFORM
    )));
    assert_eq!(net.status(), S_ACK | S_DRIVER | S_FEATURES_OK);
    start_running(&mut net);
    assert!(matches!(
        net.set_features(RELAY),
        Err(BackendError::InvalidState { .. })
    ));
}

fn start_running(net: &mut VdpaNet) {
    net.set_status(S_DRIVER_OK).unwrap();
    assert_eq!(net.status() & S_DRIVER_OK, S_DRIVER_OK);
}

#[test]
fn status_rules() {
    let (mut net, fake) = open(Device::net(1), 1);
    // DRIVER_OK needs features.
    assert!(matches!(
        net.set_status(S_DRIVER_OK),
        Err(BackendError::InvalidState { .. })
    ));
    start_pair(&mut net, RELAY);
    assert_eq!(fake.lock().status, 0xf);
    // Re-sending the same bits is a no-op; clearing one needs a reset.
    fake.lock().calls.clear();
    net.set_status(S_DRIVER_OK).unwrap();
    net.set_status(0xf).unwrap();
    assert!(fake.lock().calls.is_empty());
    assert!(matches!(
        net.set_status(S_ACK),
        Err(BackendError::InvalidState { .. })
    ));
    // Reset: status 0, then ACKNOWLEDGE|DRIVER again; features forgotten.
    net.set_status(0).unwrap();
    let calls = fake.lock().take_calls();
    assert_eq!(calls[0], Op::SetStatus(0));
    assert!(calls.contains(&Op::SetStatus(S_ACK | S_DRIVER)));
    assert_eq!(net.status(), S_ACK | S_DRIVER);
    assert_eq!(net.negotiated_features(), None);
    assert_eq!(net.control_queue(), None);
    // And the device can be brought up again.
    start_pair(&mut net, RELAY);
    assert_eq!(net.status(), 0xf);
}

#[test]
fn driver_ok_that_does_not_stick_is_an_error() {
    let (mut net, fake) = open(Device::net(1), 1);
    net.set_features(RELAY).unwrap();
    fake.lock().fail.insert("SET_STATUS", libc::EIO);
    let e = net.set_status(S_DRIVER_OK).unwrap_err();
    assert!(e.to_string().contains("VHOST_VDPA_SET_STATUS"), "{e}");
    assert_eq!(net.status() & S_DRIVER_OK, 0);
}

#[test]
fn suspend_and_resume_when_offered() {
    let (mut net, fake) = open(Device::net(1), 1);
    start_pair(&mut net, RELAY);
    fake.lock().vrings[0].base = 17;
    fake.lock().vrings[1].base = 42;
    fake.lock().calls.clear();
    net.suspend().unwrap();
    net.suspend().unwrap();
    assert!(fake.lock().suspended);
    assert_eq!(net.vring_base(0).unwrap(), 17);
    assert_eq!(net.vring_base(1).unwrap(), 42);
    net.resume().unwrap();
    net.resume().unwrap();
    assert!(!fake.lock().suspended);
    use Op::*;
    assert_eq!(
        fake.lock().take_calls(),
        vec![Suspend, GetVringBase(0), GetVringBase(1), Resume]
    );
}

#[test]
fn suspend_without_the_backend_feature_resets_the_device() {
    // The full behaviour (bases from ring memory) is in vdpa_reset_stop.rs.
    let mut d = Device::net(1);
    d.backend_offered &= !(bf(backend_bits::SUSPEND) | bf(backend_bits::RESUME));
    let (mut net, fake) = open(d, 1);
    start_pair(&mut net, RELAY);
    fake.lock().calls.clear();
    net.suspend().unwrap();
    let calls = fake.lock().take_calls();
    assert_eq!(calls.first(), Some(&Op::SetStatus(0)), "{calls:?}");
    assert!(!calls.contains(&Op::Suspend));
    assert_eq!(fake.lock().status, S_ACK | S_DRIVER);
    assert_eq!(net.status(), 0xf);
    // Rings set at 0 whose used rings are not mapped: the relay says where
    // they continue, and resume brings the device back up.
    net.set_vring_base(0, 0).unwrap();
    net.set_vring_base(1, 0).unwrap();
    net.resume().unwrap();
    assert_eq!(fake.lock().status, 0xf);
    assert!(fake.lock().vrings[1].enabled);
}

#[test]
fn resume_without_the_backend_feature_restarts_the_device() {
    let mut d = Device::net(1);
    d.backend_offered &= !bf(backend_bits::RESUME);
    let (mut net, fake) = open(d, 1);
    start_pair(&mut net, RELAY);
    let mac = [0x02, 9, 9, 9, 9, 9];
    net.apply_net_state(&backends::NetCtrlState {
        mac: Some(mac),
        ..Default::default()
    })
    .unwrap();
    fake.lock().vrings[0].base = 17;
    fake.lock().vrings[1].base = 42;
    net.suspend().unwrap();
    fake.lock().calls.clear();
    // The relay reads RX's base and moves RX to other rings; TX is left alone.
    assert_eq!(net.vring_base(0).unwrap(), 17);
    let moved = VringAddrs {
        desc: 0x80_0000,
        avail: 0x80_1000,
        used: 0x80_2000,
    };
    net.set_vring_addr(0, moved).unwrap();
    net.set_vring_base(0, 5).unwrap();
    assert_eq!(net.vring_base(0).unwrap(), 5);
    // Only the first read reached the device; the changes wait for resume.
    assert_eq!(fake.lock().take_calls(), vec![Op::GetVringBase(0)]);

    net.resume().unwrap();
    use Op::*;
    let calls = fake.lock().take_calls();
    let acked = RELAY | F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR | F_ACCESS_PLATFORM;
    // TX's position is read before the reset loses it.
    assert_eq!(calls[..2], [GetVringBase(1), SetStatus(0)]);
    let i = calls.iter().position(|c| *c == SetFeatures(acked)).unwrap();
    let j = calls
        .iter()
        .position(|c| *c == SetVringNum(0, 256))
        .unwrap();
    assert!(i < j);
    assert_eq!(
        calls[j..j + 12],
        [
            SetVringNum(0, 256),
            SetVringAddr(0, moved),
            SetVringBase(0, 5),
            SetVringKick(0, true),
            SetVringCall(0, true),
            SetVringEnable(0, true),
            SetVringNum(1, 256),
            SetVringAddr(
                1,
                VringAddrs {
                    desc: 0x20_0000,
                    avail: 0x20_1000,
                    used: 0x20_2000
                }
            ),
            SetVringBase(1, 42),
            SetVringKick(1, true),
            SetVringCall(1, true),
            SetVringEnable(1, true),
        ]
    );
    assert!(calls.ends_with(&[
        GetStatus,
        SetStatus(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK),
        GetStatus
    ]));
    let d = fake.lock();
    assert!(!d.suspended);
    assert_eq!(d.status, 0xf);
    assert_eq!((d.vrings[0].base, d.vrings[1].base), (5, 42));
    assert_eq!(d.vrings[0].addrs, Some(moved));
    // The control state came back after the reset.
    assert_eq!(d.mac, mac);
    assert_eq!(d.commands.len(), 2);
    drop(d);
    assert_eq!(net.status(), 0xf);
    // A second resume has nothing to do.
    net.resume().unwrap();
    assert!(fake.lock().calls.is_empty());
}

#[test]
fn a_reset_forgets_the_rings() {
    let mut d = Device::net(1);
    d.backend_offered &= !bf(backend_bits::RESUME);
    let (mut net, fake) = open(d, 1);
    start_pair(&mut net, RELAY);
    net.set_status(0).unwrap();
    net.set_features(RELAY).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    net.suspend().unwrap();
    fake.lock().calls.clear();
    net.resume().unwrap();
    // No data ring was set up since the reset: none is set up again.
    assert!(!fake
        .lock()
        .calls
        .iter()
        .any(|c| matches!(c, Op::SetVringNum(0 | 1, _) | Op::GetVringBase(_))));
}

#[test]
fn vring_state_goes_to_the_right_queue() {
    let (mut net, fake) = open(Device::net(2), 2);
    net.set_features(RELAY | F_MQ).unwrap();
    fake.lock().calls.clear();
    net.set_vring_num(3, 128).unwrap();
    net.set_vring_base(3, 0x1234).unwrap();
    assert_eq!(net.vring_base(3).unwrap(), 0x1234);
    let a = VringAddrs {
        desc: 0x1000,
        avail: 0x2002,
        used: 0x3004,
    };
    net.set_vring_addr(2, a).unwrap();
    net.set_vring_enable(2, false).unwrap();
    net.set_vring_call(2, None).unwrap();
    use Op::*;
    assert_eq!(
        fake.lock().take_calls(),
        vec![
            SetVringNum(3, 128),
            SetVringBase(3, 0x1234),
            GetVringBase(3),
            SetVringAddr(2, a),
            SetVringEnable(2, false),
            SetVringCall(2, false),
        ]
    );
    assert_eq!(fake.lock().vrings[3].base, 0x1234);
}

#[test]
fn vring_arguments_are_checked_before_the_kernel() {
    let (mut net, fake) = open(Device::net(2), 2);
    assert!(matches!(
        net.set_vring_num(4, 64),
        Err(BackendError::InvalidQueue { index: 4, count: 4 })
    ));
    for n in [0, 100, 512] {
        assert!(matches!(
            net.set_vring_num(0, n),
            Err(BackendError::InvalidQueueSize(x, 256)) if x == n
        ));
    }
    let bad = VringAddrs {
        desc: 0x1008,
        avail: 0x2000,
        used: 0x3000,
    };
    assert!(net.set_vring_addr(0, bad).is_err());
    // Without MQ, index 2 is the control queue, not a data queue.
    net.set_features(RELAY).unwrap();
    fake.lock().calls.clear();
    assert!(matches!(
        net.set_vring_base(2, 0),
        Err(BackendError::InvalidQueue { index: 2, count: 2 })
    ));
    assert!(fake.lock().calls.is_empty());
}

#[test]
fn config_space_reads_writes_and_bounds() {
    let (mut net, fake) = open(Device::net(2), 1);
    let mut mac = [0u8; 6];
    net.get_config(0, &mut mac).unwrap();
    assert_eq!(mac, MAC);
    let mut mtu = [0u8; 2];
    net.get_config(10, &mut mtu).unwrap();
    assert_eq!(u16::from_le_bytes(mtu), 1500);
    net.set_config(0, &[1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!(&fake.lock().config[..6], &[1, 2, 3, 4, 5, 6]);
    fake.lock().calls.clear();
    let mut four = [0u8; 4];
    assert!(matches!(
        net.get_config(10, &mut four),
        Err(BackendError::ConfigOutOfRange {
            offset: 10,
            len: 4,
            size: 12
        })
    ));
    assert!(net.set_config(u32::MAX, &[0]).is_err());
    // Empty accesses never reach the kernel (it would say EINVAL).
    net.get_config(12, &mut []).unwrap();
    assert!(fake.lock().calls.is_empty());
}

#[test]
fn config_interrupt() {
    let (mut net, fake) = open(Device::net(1), 1);
    net.set_config_call(Some(Arc::new(EventFd::new(0).unwrap())))
        .unwrap();
    assert!(fake.lock().config_call);
    net.set_config_call(None).unwrap();
    assert!(!fake.lock().config_call);
    assert_eq!(
        fake.lock().take_calls(),
        vec![Op::SetConfigCall(true), Op::SetConfigCall(false)]
    );
}
