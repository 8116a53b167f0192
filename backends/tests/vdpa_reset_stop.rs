//! VdpaNet's `suspend` on a device without VHOST_BACKEND_F_SUSPEND (VDUSE):
//! stopped by a reset, ring positions read back from the used index in ring
//! memory, and `resume` setting the device up again, against the fake
//! vhost-vdpa device.

use std::sync::Arc;

use backends::vdpa::{backend_bits, VdpaIoctls, VdpaNet};
use backends::{BackendError, DeviceBackend, DmaRegion, NetCtrlState, VringAddrs};
use testkit::vdpa_fake::*;
use vm_memory::{Bytes, VolatileMemory};
use vmm_sys_util::eventfd::EventFd;

/// What the backend negotiates for [`RELAY`] on `Device::net`.
const ACKED: u64 = RELAY | F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR | F_ACCESS_PLATFORM;

/// A device as VDUSE offers it: neither SUSPEND nor RESUME.
fn vduse_like(pairs: u16) -> Device {
    let mut d = Device::net(pairs);
    d.backend_offered &= !(bf(backend_bits::SUSPEND) | bf(backend_bits::RESUME));
    d
}

/// Maps `size` bytes at queue `q`'s ring area and returns the region.
fn map_ring(net: &mut VdpaNet, q: usize, size: usize) -> DmaRegion {
    let r = region(ring_addrs(q).desc, size, false);
    net.dma_map(r.clone()).unwrap();
    r
}

/// Writes the used index of a ring whose area starts at `r`.
fn set_used_idx(r: &DmaRegion, idx: u16) {
    r.memory
        .get_slice(0x2002, 2)
        .unwrap()
        .write_obj(idx.to_le(), 0)
        .unwrap();
}

/// Sets one ring up the way the daemon does (enabled when `enable`).
fn setup_ring(net: &mut VdpaNet, q: usize, base: u16, enable: bool) {
    net.set_vring_num(q, 256).unwrap();
    net.set_vring_addr(q, ring_addrs(q)).unwrap();
    net.set_vring_base(q, base).unwrap();
    net.set_vring_kick(q, Arc::new(EventFd::new(0).unwrap()))
        .unwrap();
    net.set_vring_call(q, Some(Arc::new(EventFd::new(0).unwrap())))
        .unwrap();
    if enable {
        net.set_vring_enable(q, true).unwrap();
    }
}

/// One pair running; the used rings say 7 (RX) and 3 (TX) while the
/// device's own positions say 9 and 11.
fn running_pair(d: Device) -> (VdpaNet, FakeVdpa) {
    let (mut net, fake) = open(d, 1);
    let rx = map_ring(&mut net, 0, 0x3000);
    let tx = map_ring(&mut net, 1, 0x3000);
    set_used_idx(&rx, 7);
    set_used_idx(&tx, 3);
    net.set_features(RELAY).unwrap();
    for q in 0..2 {
        setup_ring(&mut net, q, 0, true);
    }
    net.set_status(S_DRIVER_OK).unwrap();
    {
        let mut d = fake.lock();
        d.vrings[0].base = 9;
        d.vrings[1].base = 11;
        d.calls.clear();
    }
    (net, fake)
}

fn ring_setup(q: u32, base: u16) -> Vec<Op> {
    use Op::*;
    vec![
        SetVringNum(q, 256),
        SetVringAddr(q, ring_addrs(q as usize)),
        SetVringBase(q, u32::from(base)),
        SetVringKick(q, true),
        SetVringCall(q, true),
        SetVringEnable(q, true),
    ]
}

fn asked_the_device(calls: &[Op]) -> bool {
    calls
        .iter()
        .any(|c| matches!(c, Op::GetVringBase(_) | Op::Suspend | Op::Resume))
}

#[test]
fn suspend_resets_and_the_base_is_the_used_index() {
    let mut d = vduse_like(1);
    // The reset also drops the parent's translations: they must come back.
    d.backend_offered &= !bf(backend_bits::IOTLB_PERSIST);
    let (mut net, fake) = running_pair(d);
    let mac = [0x02, 9, 9, 9, 9, 9];
    net.apply_net_state(&NetCtrlState {
        mac: Some(mac),
        ..Default::default()
    })
    .unwrap();
    fake.lock().calls.clear();

    net.suspend().unwrap();
    {
        let d = fake.lock();
        assert_eq!(d.calls.first(), Some(&Op::SetStatus(0)), "{:?}", d.calls);
        assert!(!asked_the_device(&d.calls), "{:?}", d.calls);
        // Reset: ring state gone, back at ACKNOWLEDGE|DRIVER, mappings back.
        assert_eq!(d.status, S_ACK | S_DRIVER);
        assert!(!d.vrings[0].enabled && d.vrings[0].addrs.is_none());
        assert!(d.parent_iotlb.contains_key(&(0, 0x10_0000)));
        assert!(d.parent_iotlb.contains_key(&(0, 0x20_0000)));
    }
    // The relay still sees the device it ran; a second suspend is a no-op.
    assert_eq!(net.status(), 0xf);
    fake.lock().calls.clear();
    net.suspend().unwrap();
    assert_eq!(net.vring_base(0).unwrap(), 7);
    assert_eq!(net.vring_base(1).unwrap(), 3);
    assert!(fake.lock().take_calls().is_empty());

    net.resume().unwrap();
    use Op::*;
    let calls = fake.lock().take_calls();
    // No second reset: the device is still as the stop left it.
    assert!(!calls.contains(&SetStatus(0)), "{calls:?}");
    assert!(!asked_the_device(&calls), "{calls:?}");
    let i = calls.iter().position(|c| *c == SetFeatures(ACKED)).unwrap();
    let j = calls
        .iter()
        .position(|c| *c == SetVringNum(0, 256))
        .unwrap();
    assert!(i < j);
    let mut want = ring_setup(0, 7);
    want.extend(ring_setup(1, 3));
    assert_eq!(calls[j..j + 12], want[..]);
    let k = calls
        .iter()
        .position(|c| *c == SetStatus(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK))
        .unwrap();
    assert!(k > j + 12);
    let d = fake.lock();
    assert_eq!(d.status, 0xf);
    assert_eq!(d.features, ACKED);
    for (q, base) in [(0, 7), (1, 3)] {
        let v = &d.vrings[q];
        assert_eq!((v.num, v.addrs, v.base), (256, Some(ring_addrs(q)), base));
        assert!(v.enabled && v.kick.is_some() && v.call.is_some());
    }
    // The control state came back after the reset.
    assert_eq!(d.mac, mac);
    assert!(d.cvq_errors.is_empty(), "{:?}", d.cvq_errors);
    drop(d);
    assert_eq!(net.status(), 0xf);
    // Running again: the device answers for its rings, resume is a no-op.
    net.resume().unwrap();
    assert_eq!(net.vring_base(0).unwrap(), 7);
    assert_eq!(fake.lock().take_calls(), vec![GetVringBase(0)]);
}

#[test]
fn a_base_set_while_stopped_wins_over_the_used_index() {
    let (mut net, fake) = running_pair(vduse_like(1));
    net.suspend().unwrap();
    fake.lock().calls.clear();
    // The relay moves RX to other rings (as a switch to shadow does); TX's
    // position is never read before resume.
    let moved = VringAddrs {
        desc: 0x80_0000,
        avail: 0x80_1000,
        used: 0x80_2000,
    };
    net.set_vring_addr(0, moved).unwrap();
    net.set_vring_base(0, 5).unwrap();
    assert_eq!(net.vring_base(0).unwrap(), 5);
    assert!(fake.lock().take_calls().is_empty());

    net.resume().unwrap();
    use Op::*;
    let calls = fake.lock().take_calls();
    let j = calls
        .iter()
        .position(|c| *c == SetVringNum(0, 256))
        .unwrap();
    let mut want = ring_setup(0, 5);
    want[1] = SetVringAddr(0, moved);
    want.extend(ring_setup(1, 3));
    assert_eq!(calls[j..j + 12], want[..]);
    let d = fake.lock();
    assert_eq!((d.vrings[0].base, d.vrings[1].base), (5, 3));
    assert_eq!(d.status, 0xf);
}

#[test]
fn an_unmapped_used_index_is_an_error_of_vring_base_and_resume() {
    let (mut net, fake) = open(vduse_like(1), 1);
    // RX's used ring is not mapped at all; TX's region ends one byte into
    // its used index.
    let tx = region(ring_addrs(1).desc, 0x2003, false);
    net.dma_map(tx).unwrap();
    net.set_features(RELAY).unwrap();
    for q in 0..2 {
        setup_ring(&mut net, q, 0, true);
    }
    net.set_status(S_DRIVER_OK).unwrap();
    // Suspending does not need the ring memory.
    net.suspend().unwrap();
    fake.lock().calls.clear();
    for (q, at) in [(0, 0x10_2002u64), (1, 0x20_2002)] {
        let e = net.vring_base(q).unwrap_err();
        assert!(
            matches!(e, BackendError::NotMapped { iova, size: 2 } if iova == at),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("{at:#x}")), "{e}");
    }
    // Resume cannot place the rings either: nothing reaches the device and
    // it stays stopped.
    let e = net.resume().unwrap_err();
    assert!(matches!(e, BackendError::NotMapped { .. }), "{e:?}");
    assert!(fake.lock().take_calls().is_empty());
    assert_eq!(net.status(), 0xf);
    // Once the relay says where the rings continue, resume works.
    net.set_vring_base(0, 4).unwrap();
    net.set_vring_base(1, 6).unwrap();
    net.resume().unwrap();
    let d = fake.lock();
    assert_eq!((d.vrings[0].base, d.vrings[1].base), (4, 6));
    assert_eq!(d.status, 0xf);
}

#[test]
fn rings_the_device_did_not_run_report_their_set_base() {
    let (mut net, fake) = open(vduse_like(2), 2);
    let rx = map_ring(&mut net, 0, 0x3000);
    set_used_idx(&rx, 7);
    let q3 = map_ring(&mut net, 3, 0x3000);
    set_used_idx(&q3, 3);
    net.set_features(RELAY | F_MQ).unwrap();
    setup_ring(&mut net, 0, 0, true);
    // Queue 3 is set up at 12 but never enabled; queue 1 and 2 never set up.
    setup_ring(&mut net, 3, 12, false);
    net.set_status(S_DRIVER_OK).unwrap();
    net.suspend().unwrap();
    fake.lock().calls.clear();
    assert_eq!(net.vring_base(0).unwrap(), 7);
    assert_eq!(net.vring_base(1).unwrap(), 0);
    assert_eq!(net.vring_base(2).unwrap(), 0);
    assert_eq!(net.vring_base(3).unwrap(), 12);
    assert!(fake.lock().take_calls().is_empty());
    net.resume().unwrap();
    let d = fake.lock();
    assert!(d.calls.contains(&Op::SetVringBase(3, 12)));
    assert!(!d.calls.contains(&Op::SetVringEnable(3, true)));
    assert!(!d
        .calls
        .iter()
        .any(|c| matches!(c, Op::SetVringNum(1 | 2, _))));
    assert_eq!(d.vrings[0].base, 7);
}

#[test]
fn while_stopped_the_status_is_the_running_one() {
    let (mut net, fake) = running_pair(vduse_like(1));
    net.suspend().unwrap();
    fake.lock().calls.clear();
    // Nothing to add; features cannot change; no status bit reaches the
    // reset device.
    net.set_status(S_DRIVER_OK).unwrap();
    assert_eq!(net.negotiated_features(), Some(ACKED));
    assert!(matches!(
        net.set_features(RELAY),
        Err(BackendError::InvalidState { .. })
    ));
    assert!(matches!(
        net.set_status(0xf | 0x80),
        Err(BackendError::InvalidState { .. })
    ));
    assert!(fake.lock().take_calls().is_empty());
    // A reset ends the stop: nothing left to resume.
    net.set_status(0).unwrap();
    assert_eq!(net.status(), S_ACK | S_DRIVER);
    fake.lock().calls.clear();
    net.resume().unwrap();
    assert!(fake.lock().take_calls().is_empty());
}

#[test]
fn a_device_that_is_not_running_is_left_alone() {
    let (mut net, fake) = open(vduse_like(1), 1);
    net.set_features(RELAY).unwrap();
    setup_ring(&mut net, 0, 4, true);
    fake.lock().calls.clear();
    net.suspend().unwrap();
    net.resume().unwrap();
    assert!(fake.lock().take_calls().is_empty());
    // Not stopped: the device answers for its ring.
    assert_eq!(net.vring_base(0).unwrap(), 4);
    assert_eq!(fake.lock().take_calls(), vec![Op::GetVringBase(0)]);
}

/// The relay starts rings one at a time, as the VMM starts them, and sets
/// DRIVER_OK with the first one; Linux refuses SET_VRING_ADDR/BASE on a
/// running device (found on the real kernel, tests/vdpa_kernel.rs). A ring
/// set up later stops the device, goes in with the others, and the device
/// restarts with every ring at its position.
#[test]
fn a_ring_set_up_after_driver_ok_restarts_the_device_with_it() {
    let (mut net, fake) = open(vduse_like(1), 1);
    let rx = map_ring(&mut net, 0, 0x3000);
    map_ring(&mut net, 1, 0x3000);
    net.set_features(RELAY).unwrap();
    setup_ring(&mut net, 0, 0, true);
    net.set_status(S_DRIVER_OK).unwrap();
    // RX ran: the device used 5 buffers.
    set_used_idx(&rx, 5);
    fake.lock().calls.clear();

    setup_ring(&mut net, 1, 4, true);
    let d = fake.lock();
    let calls = d.calls.clone();
    let reset = calls.iter().position(|c| *c == Op::SetStatus(0));
    let addr = calls
        .iter()
        .position(|c| matches!(c, Op::SetVringAddr(1, _)));
    assert!(
        reset.is_some() && addr.is_some() && reset < addr,
        "ring 1 not programmed after a reset: {calls:?}"
    );
    assert_eq!(
        d.status & S_DRIVER_OK,
        S_DRIVER_OK,
        "running again: {calls:?}"
    );
    assert!(d.vrings[0].enabled && d.vrings[1].enabled);
    assert_eq!(d.vrings[0].base, 5, "RX restarted at its used index");
    assert_eq!(d.vrings[1].base, 4, "TX at the base the relay set");
    assert_eq!(d.vrings[1].addrs, Some(ring_addrs(1)));
    drop(d);
    assert_eq!(net.status() & S_DRIVER_OK, S_DRIVER_OK);
    // Nothing stays stopped: a later suspend is a real stop again.
    net.suspend().unwrap();
    assert_eq!(net.vring_base(0).unwrap(), 5);
    net.resume().unwrap();
    assert_eq!(fake.lock().status & S_DRIVER_OK, S_DRIVER_OK);
}

#[test]
fn the_fake_refuses_ring_changes_on_a_running_device_as_linux_does() {
    let (mut net, fake) = open(vduse_like(1), 1);
    net.set_features(RELAY).unwrap();
    setup_ring(&mut net, 0, 0, true);
    net.set_status(S_DRIVER_OK).unwrap();
    let d = fake.clone();
    let err = d.set_vring_addr(1, &ring_addrs(1)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    assert_eq!(
        d.set_vring_base(1, 0).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
}

/// Disabling one ring of a running device: VDUSE never tells its device,
/// which keeps processing the ring (the relay then lost chains the device
/// completed after it read the position: found on the real kernel). The
/// device is stopped, the position read, and it restarts without the ring.
#[test]
fn disabling_a_running_ring_stops_the_device_and_restarts_it_without_the_ring() {
    let (mut net, fake) = running_pair(vduse_like(1));
    net.set_vring_enable(0, false).unwrap();
    {
        let d = fake.lock();
        assert!(
            d.calls.contains(&Op::SetStatus(0)),
            "stopped: {:?}",
            d.calls
        );
        assert_eq!(
            d.status & S_DRIVER_OK,
            S_DRIVER_OK,
            "running again: {:?}",
            d.calls
        );
        assert!(!d.vrings[0].enabled, "RX stays disabled");
        assert!(d.vrings[1].enabled, "TX runs again");
        assert_eq!(d.vrings[1].base, 3, "TX restarted at its used index");
    }
    // The stopped ring's position is where it stopped, not the device's 9.
    fake.lock().calls.clear();
    assert_eq!(net.vring_base(0).unwrap(), 7);
    assert!(!asked_the_device(&fake.lock().calls));
    // Set up again (as the relay does after a switch): it runs from there.
    setup_ring(&mut net, 0, 7, true);
    let d = fake.lock();
    assert!(d.vrings[0].enabled && d.vrings[1].enabled);
    assert_eq!(d.status & S_DRIVER_OK, S_DRIVER_OK);
    assert_eq!(d.vrings[0].base, 7);
}
