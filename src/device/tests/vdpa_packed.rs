//! Packed rings from the VMM to a vDPA device (the fake vhost-vdpa
//! kernel) through the device model: the VMM's 32-bit positions reach the
//! device's rings in the kernel's layout, the device's come back to the
//! VMM whole, and shadow mode gives the device packed shadow rings from
//! their start.

use super::*;
use testkit::vdpa_fake::{self, Op as KOp, S_ACK, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK};

const WRAP: u32 = 1 << 15;

fn halves(v: &vdpa_fake::FakeVring) -> u32 {
    u32::from(v.base) | u32::from(v.used) << 16
}

#[test]
fn packed_positions_pass_between_the_vmm_and_a_vdpa_device() {
    let mut kdev = vdpa_fake::Device::net(1);
    kdev.offered |= F_RING_PACKED;
    let (net, fake) = vdpa_fake::open(kdev, 1);
    let mut dev = Device::new("net0", Box::new(net), 1, 256, false).unwrap();
    dev.set_offered_on_request(F_RING_PACKED);
    let offered = dev.offered_features();
    assert_ne!(offered & F_RING_PACKED, 0, "{offered:#x}");
    dev.set_features(offered & !F_LOG_ALL).unwrap();
    dev.set_mem_table(vec![region(0, MEM, UADDR)]).unwrap();
    // RX mid-lap on the second lap with a chain in flight, TX at its start.
    let pos = [7 | (5 << 16), WRAP | WRAP << 16];
    for q in 0..2u32 {
        let ring = UADDR + u64::from(q) * 0x4000;
        dev.set_vring_num(q, 256).unwrap();
        dev.set_vring_base(q, pos[q as usize]).unwrap();
        dev.set_vring_addr(q, ring + DESC, ring + USED, ring + AVAIL, None)
            .unwrap();
        dev.set_vring_call(q as u8, Some(eventfd())).unwrap();
        dev.set_vring_kick(q as u8, Some(eventfd())).unwrap();
        dev.set_vring_enable(q, true).unwrap();
    }
    dev.backend
        .set_status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
        .unwrap();
    assert!(dev.is_started());
    {
        let k = fake.lock();
        assert_eq!(k.features & F_RING_PACKED, F_RING_PACKED);
        assert_eq!(halves(&k.vrings[0]), pos[0]);
        assert_eq!(halves(&k.vrings[1]), pos[1]);
    }
    // The device ran RX on: both halves come back to the VMM.
    let moved = 40 | (39 << 16);
    {
        let mut k = fake.lock();
        k.vrings[0].base = 40;
        k.vrings[0].used = 39;
    }
    fake.lock().calls.clear();
    assert!(dev.set_shadow(true).unwrap());
    // Shadow rings start empty, wrap counters 1, in the kernel's layout.
    let calls = fake.lock().take_calls();
    for q in 0..2 {
        assert!(
            calls.contains(&KOp::SetVringBase(q, 0x8000_8000)),
            "{calls:?}"
        );
    }
    assert!(dev.set_shadow(false).unwrap());
    // The guest's rings again, RX where the device had left it.
    assert_eq!(halves(&fake.lock().vrings[0]), moved);
    assert_eq!(dev.get_vring_base(0).unwrap(), moved);
}
