//! Packed rings on the vdpa backend, against the fake vhost-vdpa device:
//! RING_PACKED offered only where a ring's position can always be asked of
//! the device (SUSPEND), positions in the kernel's 32-bit layout (avail
//! and used halves with their wrap counters) through every stop and
//! restart, and the daemon's control queue as a packed ring (RING_PACKED
//! applies to every queue of the device).
//!
//! No kernel on these machines has a packed vDPA net device with SUSPEND
//! (vdpa_sim_net is split-only, VDUSE cannot suspend), so the fake is as
//! far as these run.

use std::time::Duration;

use backends::vdpa::backend_bits;
use backends::{BackendError, DeviceBackend, NetCtrlState};
use testkit::vdpa_fake::*;

const WRAP: u16 = 1 << 15;
/// Position 0, both wrap counters 1: an empty packed ring.
const START: u32 = 0x8000_8000;
const PACKED: u64 = RELAY | F_RING_PACKED;

fn packed_device(pairs: u16) -> Device {
    let mut d = Device::net(pairs);
    d.offered |= F_RING_PACKED;
    d
}

/// The device ran ring `q` to avail `avail` and used `used` (both with
/// their wrap counters): what it reports from here.
fn device_ran(fake: &FakeVdpa, q: usize, avail: u16, used: u16) {
    let mut d = fake.lock();
    d.vrings[q].base = avail;
    d.vrings[q].used = used;
}

fn no_faults(fake: &FakeVdpa) {
    let d = fake.lock();
    assert!(d.cvq_errors.is_empty(), "{:?}", d.cvq_errors);
}

#[test]
fn packed_rings_are_offered_only_with_suspend() {
    let (net, _fake) = open(packed_device(1), 1);
    assert_eq!(net.device_features() & F_RING_PACKED, F_RING_PACKED);

    // Without SUSPEND a stop is a reset and the position would have to come
    // from ring memory, which a packed ring does not keep it in.
    let mut d = packed_device(1);
    d.backend_offered &= !bf(backend_bits::SUSPEND);
    let (mut net, _fake) = open(d, 1);
    assert_eq!(net.device_features() & F_RING_PACKED, 0);
    assert!(matches!(
        net.set_features(PACKED),
        Err(BackendError::UnsupportedFeatures(F_RING_PACKED))
    ));

    // A device that does not offer it.
    let (net, _fake) = open(Device::net(1), 1);
    assert_eq!(net.device_features() & F_RING_PACKED, 0);
}

#[test]
fn packed_positions_reach_the_device_in_the_kernel_layout() {
    let (mut net, fake) = open(packed_device(1), 1);
    start_pair(&mut net, PACKED);
    assert!(fake.lock().calls.contains(&Op::SetVringBase(0, START)));
    {
        let d = fake.lock();
        assert_eq!((d.vrings[1].base, d.vrings[1].used), (WRAP, WRAP));
    }
    // The device took 300 descriptors of RX (one lap and more: wrap counter
    // 0) and completed 290 of them.
    device_ran(&fake, 0, 300 - 256, 290 - 256);
    net.suspend().unwrap();
    assert_eq!(
        net.vring_base_packed(0).unwrap(),
        u32::from(300 - 256u16) | u32::from(290 - 256u16) << 16
    );
    // The one-position call gets the avail half.
    assert_eq!(net.vring_base(0).unwrap(), 300 - 256);
    assert_eq!(net.vring_base_packed(1).unwrap(), START);
    net.resume().unwrap();
}

#[test]
fn one_position_on_a_packed_ring_means_nothing_in_flight() {
    let (mut net, fake) = open(packed_device(1), 1);
    net.set_features(PACKED).unwrap();
    fake.lock().calls.clear();
    net.set_vring_num(0, 256).unwrap();
    net.set_vring_base(0, 7 | WRAP).unwrap();
    assert_eq!(
        fake.lock().take_calls(),
        vec![Op::SetVringNum(0, 256), Op::SetVringBase(0, 0x8007_8007)]
    );
}

#[test]
fn packed_calls_on_split_rings_are_refused() {
    let (mut net, fake) = open(packed_device(1), 1);
    start_pair(&mut net, RELAY);
    let e = net.set_vring_base_packed(0, START).unwrap_err();
    assert!(
        matches!(
            e,
            BackendError::InvalidState {
                op: "set_vring_base_packed",
                ..
            }
        ),
        "{e}"
    );
    assert!(net.vring_base_packed(0).is_err());
    // Nothing reached the device's rings.
    assert!(!fake
        .lock()
        .calls
        .iter()
        .any(|c| matches!(c, Op::SetVringBase(_, b) if *b > 0xffff)));
}

#[test]
fn a_restart_without_resume_sets_both_packed_halves_again() {
    let mut d = packed_device(1);
    d.backend_offered &= !bf(backend_bits::RESUME);
    let (mut net, fake) = open(d, 1);
    start_pair(&mut net, PACKED);
    device_ran(&fake, 0, 12 | WRAP, 9 | WRAP);
    device_ran(&fake, 1, 3, 250 | WRAP);
    net.suspend().unwrap();
    // The relay reads RX (as a switch does) and leaves TX to the restart.
    let rx = net.vring_base_packed(0).unwrap();
    assert_eq!(rx, 0x8009_800c);
    fake.lock().calls.clear();
    net.resume().unwrap();
    let calls = fake.lock().take_calls();
    // TX read before the reset lost it, then both set again as they were.
    assert_eq!(calls[..2], [Op::GetVringBase(1), Op::SetStatus(0)]);
    assert!(calls.contains(&Op::SetVringBase(0, rx)), "{calls:?}");
    assert!(
        calls.contains(&Op::SetVringBase(1, 3 | u32::from(250 | WRAP) << 16)),
        "{calls:?}"
    );
    let d = fake.lock();
    assert_eq!((d.vrings[0].base, d.vrings[0].used), (12 | WRAP, 9 | WRAP));
    assert_eq!((d.vrings[1].base, d.vrings[1].used), (3, 250 | WRAP));
    assert_eq!(d.status, 0xf);
}

#[test]
fn a_packed_ring_disabled_while_running_reports_where_it_stopped() {
    let (mut net, fake) = open(packed_device(1), 1);
    start_pair(&mut net, PACKED);
    device_ran(&fake, 1, 40, 38);
    fake.lock().calls.clear();
    net.set_vring_enable(1, false).unwrap();
    let calls = fake.lock().take_calls();
    assert_eq!(
        calls[..3],
        [
            Op::Suspend,
            Op::GetVringBase(1),
            Op::SetVringEnable(1, false)
        ]
    );
    // The device moves on with the other ring; the disabled one stays put.
    device_ran(&fake, 1, 0, 0);
    assert_eq!(net.vring_base_packed(1).unwrap(), 40 | 38 << 16);
}

#[test]
fn the_control_queue_is_a_packed_ring_when_the_rings_are() {
    let (mut net, fake) = open(packed_device(2), 2);
    start_pair(&mut net, PACKED | F_MQ);
    let cvq = net.control_queue().unwrap().0;
    assert!(fake.lock().calls.contains(&Op::SetVringBase(cvq, START)));
    // Both pairs were opened with VQ_PAIRS_SET at DRIVER_OK; then enough
    // commands (three descriptors each, 16 slots) to wrap the ring twice.
    let macs: Vec<[u8; 6]> = (1..=12u8).map(|i| [0x52, 0x54, 0, 0, 0, i]).collect();
    for (i, mac) in macs.iter().enumerate() {
        let pairs = 1 + (i % 2) as u16;
        net.apply_net_state(&NetCtrlState {
            mac: Some(*mac),
            queue_pairs: pairs,
            promisc: true,
            allmulti: false,
        })
        .unwrap();
        let d = fake.lock();
        assert_eq!((d.mac, d.pairs), (*mac, pairs), "command {i}");
    }
    no_faults(&fake);
    let d = fake.lock();
    // 1 + 12 MAC + 12 pairs commands, 3 slots each: 75 slots, 4 laps
    // (the wrap counters flipped back to 1) and 11.
    assert_eq!(d.commands.len(), 25);
    let v = &d.vrings[cvq as usize];
    assert_eq!((v.base, v.used), (11 | WRAP, 11 | WRAP));
}

#[test]
fn the_packed_control_queue_starts_over_after_a_reset() {
    let (mut net, fake) = open(packed_device(1), 1);
    start_pair(&mut net, PACKED);
    for i in 0..7u8 {
        net.apply_net_state(&NetCtrlState {
            mac: Some([0x52, 0, 0, 0, 0, i]),
            ..NetCtrlState::after_reset()
        })
        .unwrap();
    }
    // Reset, and this time the relay negotiates split rings: the control
    // queue follows.
    net.set_status(0).unwrap();
    net.set_features(RELAY).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    let cvq = net.control_queue().unwrap().0;
    assert!(fake.lock().calls.contains(&Op::SetVringBase(cvq, 0)));
    // The MAC asked for last came back over the split ring.
    assert_eq!(fake.lock().mac, [0x52, 0, 0, 0, 0, 6]);
    // And packed again.
    net.set_status(0).unwrap();
    net.set_features(PACKED).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    net.apply_net_state(&NetCtrlState {
        mac: Some([0x52, 0, 0, 0, 0, 0x77]),
        ..NetCtrlState::after_reset()
    })
    .unwrap();
    assert_eq!(fake.lock().mac, [0x52, 0, 0, 0, 0, 0x77]);
    no_faults(&fake);
}

#[test]
fn an_unanswered_packed_command_breaks_the_control_queue_only() {
    let (mut net, fake) = open(packed_device(1), 1);
    start_pair(&mut net, PACKED);
    net.set_cvq_timeout(Duration::from_millis(50));
    fake.lock().cvq_silent = true;
    let mac = |i| NetCtrlState {
        mac: Some([0x52, 0, 0, 0, 0, i]),
        ..NetCtrlState::after_reset()
    };
    let e = net.apply_net_state(&mac(1)).unwrap_err();
    assert!(e.to_string().contains("no answer"), "{e}");
    // Its descriptors may still be the device's: nothing more is sent.
    fake.lock().cvq_silent = false;
    let e = net.apply_net_state(&mac(2)).unwrap_err();
    assert!(matches!(e, BackendError::InvalidState { .. }), "{e}");
    // The data rings are untouched and a reset brings the queue back.
    assert_eq!(net.vring_base_packed(0).unwrap(), START);
    net.set_status(0).unwrap();
    net.set_features(PACKED).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    assert_eq!(fake.lock().mac, [0x52, 0, 0, 0, 0, 2]);
    no_faults(&fake);
}
