//! Guest memory tables reaching a vDPA device (the fake vhost-vdpa
//! kernel, which refuses overlapping mappings as the kernel does).

use crate::device::Device;
use crate::memory::tests::region;
use testkit::vdpa_fake;

/// A memory table that swaps one region for another: the IOVA tree may
/// give the new region IOVAs the old one leaves (here: the old region sat
/// at IOVA 0 by first fit, its GPA being above the device's range, and
/// the new one takes IOVA 0 as its identity), which the device still holds
/// until the swap is done. The old mapping must leave the device first: a
/// vDPA device (or a relay behind this one) refuses overlapping mappings.
/// Found with a relay in front of another relay.
#[test]
fn a_region_swapped_for_one_at_its_iova_reaches_the_device() {
    let (net, fake) = vdpa_fake::open(vdpa_fake::Device::net(1), 1);
    let mut dev = Device::new("net0", Box::new(net), 1, 256, false).unwrap();
    let high = 1u64 << 50;
    dev.set_mem_table(vec![region(high, 0x1000, 0x7f00_0000_0000)])
        .unwrap();
    let first: Vec<u64> = fake
        .lock()
        .kernel_iotlb
        .keys()
        .filter(|k| k.0 == 0)
        .map(|k| k.1)
        .collect();
    assert_eq!(first, [0], "the region above the range is at IOVA 0");
    dev.set_mem_table(vec![region(0, 0x1000, 0x7f00_1000_0000)])
        .unwrap();
    let k = fake.lock();
    let mapped: Vec<_> = k
        .kernel_iotlb
        .iter()
        .filter(|((asid, _), _)| *asid == 0)
        .collect();
    assert_eq!(mapped.len(), 1, "{mapped:?}");
}
