//! IOTLB traffic of VdpaNet against the fake device: UPDATE/INVALIDATE
//! messages, batching, ASIDs, range and overlap checks, failures, and
//! mappings across a reset.

use std::sync::Arc;

use backends::vdpa::{backend_bits, IotlbKind, IotlbMsg, ACCESS_RO, ACCESS_RW};
use backends::{BackendError, DeviceBackend};
use testkit::vdpa_fake::*;

const TOP: u64 = (1 << 48) - 4096;

fn begin(asid: u32) -> IotlbMsg {
    IotlbMsg::batch(IotlbKind::BatchBegin, asid)
}

fn end(asid: u32) -> IotlbMsg {
    IotlbMsg::batch(IotlbKind::BatchEnd, asid)
}

fn update(r: &backends::DmaRegion) -> IotlbMsg {
    IotlbMsg {
        asid: 0,
        kind: IotlbKind::Update,
        iova: r.iova,
        size: r.size(),
        uaddr: r.memory.as_ptr() as u64,
        perm: if r.readonly { ACCESS_RO } else { ACCESS_RW },
    }
}

fn invalidate(iova: u64, size: u64) -> IotlbMsg {
    IotlbMsg {
        asid: 0,
        kind: IotlbKind::Invalidate,
        iova,
        size,
        uaddr: 0,
        perm: 0,
    }
}

#[test]
fn map_and_unmap_are_batched_updates_and_invalidates() {
    let (mut net, fake) = open(Device::net(1), 1);
    let rw = region(0x10_0000, 0x4000, false);
    let ro = region(0x20_0000, 0x1000, true);
    net.dma_map(rw.clone()).unwrap();
    net.dma_map(ro.clone()).unwrap();
    assert_eq!(
        fake.lock().iotlb_calls(),
        vec![begin(0), update(&rw), end(0), begin(0), update(&ro), end(0)]
    );
    assert_eq!(fake.lock().kernel_iotlb.len(), 2);
    // The backend holds the memory while the device may reach it.
    assert_eq!(Arc::strong_count(&rw.memory), 2);
    fake.lock().calls.clear();
    net.dma_unmap(0x10_0000, 0x4000).unwrap();
    assert_eq!(
        fake.lock().iotlb_calls(),
        vec![begin(0), invalidate(0x10_0000, 0x4000), end(0)]
    );
    assert_eq!(Arc::strong_count(&rw.memory), 1);
    assert_eq!(Arc::strong_count(&ro.memory), 2);
    assert_eq!(fake.lock().kernel_iotlb.len(), 1);
}

#[test]
fn without_batch_support_messages_go_alone() {
    let mut d = Device::net(1);
    d.backend_offered &= !bf(backend_bits::IOTLB_BATCH);
    let (mut net, fake) = open(d, 1);
    let r = region(0x1000, 0x1000, false);
    net.dma_map(r.clone()).unwrap();
    net.dma_unmap(0x1000, 0x1000).unwrap();
    assert_eq!(
        fake.lock().iotlb_calls(),
        vec![update(&r), invalidate(0x1000, 0x1000)]
    );
}

#[test]
fn map_all_is_one_batch_and_all_or_nothing() {
    let (mut net, fake) = open(Device::net(1), 1);
    let a = region(0x1000, 0x1000, false);
    let b = region(0x3000, 0x2000, false);
    net.dma_map_all(vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(
        fake.lock().iotlb_calls(),
        vec![begin(0), update(&a), update(&b), end(0)]
    );
    fake.lock().calls.clear();
    net.dma_map_all(Vec::new()).unwrap();
    // Overlap inside the request: nothing is sent.
    let c = region(0x10000, 0x2000, false);
    let d = region(0x11000, 0x1000, false);
    assert!(matches!(
        net.dma_map_all(vec![c, d]),
        Err(BackendError::MappingOverlap { iova: 0x11000, .. })
    ));
    assert!(fake.lock().calls.is_empty());
    // One unmap covering both removes both, in one batch.
    net.dma_unmap(0x1000, 0x4000).unwrap();
    assert_eq!(
        fake.lock().iotlb_calls(),
        vec![
            begin(0),
            invalidate(0x1000, 0x1000),
            invalidate(0x3000, 0x2000),
            end(0)
        ]
    );
    assert!(fake.lock().kernel_iotlb.is_empty());
}

#[test]
fn out_of_range_and_overlaps_are_rejected_before_the_kernel() {
    let mut d = Device::net(1);
    d.iova_range.first = 0x1000;
    let (mut net, fake) = open(d, 1);
    net.dma_map(region(0x10000, 0x2000, false)).unwrap();
    fake.lock().calls.clear();
    for (iova, size) in [(0xf000, 0x2000), (0x10000, 0x1000), (0x11000, 0x1000)] {
        assert!(matches!(
            net.dma_map(region(iova, size, false)),
            Err(BackendError::MappingOverlap { .. })
        ));
    }
    // Below the range, into the control queue's page, past the end.
    for (iova, size) in [(0, 0x1000), (TOP - 0x1000, 0x2000), (TOP, 0x1000)] {
        assert!(
            matches!(
                net.dma_map(region(iova, size, false)),
                Err(BackendError::IovaOutOfRange { .. })
            ),
            "{iova:#x}"
        );
    }
    // A region at the very top of 64 bits would wrap.
    assert!(net
        .dma_map(region(u64::MAX - 0xfff, 0x2000, false))
        .is_err());
    // An IOVA whose page offset differs from the memory's.
    assert!(matches!(
        net.dma_map(region(0x20800, 0x1000, false)),
        Err(BackendError::InvalidState { op: "dma_map", .. })
    ));
    assert!(fake.lock().calls.is_empty());
    // The last page below the control queue's is fine.
    net.dma_map(region(TOP - 0x1000, 0x1000, false)).unwrap();
}

#[test]
fn unmap_takes_whole_mappings_only() {
    let (mut net, fake) = open(Device::net(1), 1);
    net.dma_map(region(0x10000, 0x2000, false)).unwrap();
    fake.lock().calls.clear();
    for (iova, size) in [
        (0x11000, 0x1000),
        (0x10000, 0x1000),
        (0x20000, 0x1000),
        (0, 0),
    ] {
        assert!(matches!(
            net.dma_unmap(iova, size),
            Err(BackendError::NotMapped { .. })
        ));
    }
    assert!(fake.lock().calls.is_empty());
}

#[test]
fn a_refused_update_leaves_nothing_mapped() {
    let (mut net, fake) = open(Device::net(1), 1);
    fake.lock().fail.insert("IOTLB_UPDATE", libc::ENOMEM);
    let r = region(0x1000, 0x1000, false);
    let e = net.dma_map(r.clone()).unwrap_err();
    assert!(e.to_string().contains("IOTLB UPDATE"), "{e}");
    // The batch is still closed, and the memory is not held.
    assert_eq!(
        fake.lock().iotlb_calls(),
        vec![begin(0), update(&r), end(0)]
    );
    assert_eq!(Arc::strong_count(&r.memory), 1);
    fake.lock().fail.clear();
    net.dma_map(r).unwrap();
}

#[test]
fn a_failed_batch_end_is_undone() {
    let (mut net, fake) = open(Device::net(1), 1);
    fake.lock().fail.insert("IOTLB_BATCH_END", libc::ENOMEM);
    let r = region(0x1000, 0x1000, false);
    assert!(net.dma_map(r.clone()).is_err());
    fake.lock().fail.clear();
    // The kernel accepted the update: it is told to forget it again.
    let calls = fake.lock().iotlb_calls();
    assert_eq!(
        calls,
        vec![
            begin(0),
            update(&r),
            end(0),
            begin(0),
            invalidate(0x1000, 0x1000),
            end(0)
        ]
    );
    assert!(fake.lock().kernel_iotlb.is_empty());
    assert_eq!(Arc::strong_count(&r.memory), 1);
}

#[test]
fn a_failed_invalidate_keeps_the_mapping() {
    let (mut net, fake) = open(Device::net(1), 1);
    let r = region(0x1000, 0x1000, false);
    net.dma_map(r.clone()).unwrap();
    fake.lock().fail.insert("IOTLB_INVALIDATE", libc::EIO);
    assert!(net.dma_unmap(0x1000, 0x1000).is_err());
    assert_eq!(Arc::strong_count(&r.memory), 2);
    fake.lock().fail.clear();
    net.dma_unmap(0x1000, 0x1000).unwrap();
    assert_eq!(Arc::strong_count(&r.memory), 1);
}

#[test]
fn mappings_are_replayed_after_a_reset_without_iotlb_persist() {
    let mut d = Device::net(1);
    d.backend_offered &= !bf(backend_bits::IOTLB_PERSIST);
    let (mut net, fake) = open(d, 1);
    let r = region(0x1000, 0x1000, false);
    net.dma_map(r.clone()).unwrap();
    net.set_features(RELAY).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    fake.lock().calls.clear();
    net.set_status(0).unwrap();
    let d = fake.lock();
    let cvq_update = d
        .kernel_iotlb
        .get(&(1, TOP))
        .copied()
        .map(|m| m.uaddr)
        .is_some();
    // The control queue page is dropped (re-mapped at the next start), the
    // relay's mappings are sent again.
    assert!(!cvq_update);
    assert_eq!(
        d.iotlb_calls(),
        vec![
            begin(1),
            IotlbMsg {
                asid: 1,
                kind: IotlbKind::Invalidate,
                iova: TOP,
                size: 4096,
                uaddr: 0,
                perm: 0
            },
            end(1),
            begin(0),
            invalidate(0x1000, 0x1000),
            end(0),
            begin(0),
            update(&r),
            end(0),
        ]
    );
    // The parent translates again.
    assert!(d.parent_iotlb.contains_key(&(0, 0x1000)));
}

#[test]
fn mappings_stay_put_across_a_reset_with_iotlb_persist() {
    let (mut net, fake) = open(Device::net(1), 1);
    net.dma_map(region(0x1000, 0x1000, false)).unwrap();
    net.set_features(RELAY).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    fake.lock().calls.clear();
    net.set_status(0).unwrap();
    assert!(fake.lock().iotlb_calls().is_empty());
    // At the next start the control queue page is where it was: not sent again.
    net.set_features(RELAY).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    assert!(fake.lock().iotlb_calls().is_empty());
}

#[test]
fn control_queue_page_moves_when_its_address_space_changes() {
    let (mut net, fake) = open(Device::net(1), 1);
    net.set_features(RELAY).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    assert!(fake.lock().kernel_iotlb.contains_key(&(1, TOP)));
    // After a reset the device no longer isolates the control queue.
    net.set_status(0).unwrap();
    fake.lock().cvq_isolated = false;
    fake.lock().calls.clear();
    net.set_features(RELAY).unwrap();
    net.set_status(S_DRIVER_OK).unwrap();
    let d = fake.lock();
    assert!(!d.kernel_iotlb.contains_key(&(1, TOP)));
    assert!(d.kernel_iotlb.contains_key(&(0, TOP)));
    let kinds: Vec<(u32, IotlbKind)> = d.iotlb_calls().iter().map(|m| (m.asid, m.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (1, IotlbKind::BatchBegin),
            (1, IotlbKind::Invalidate),
            (1, IotlbKind::BatchEnd),
            (0, IotlbKind::BatchBegin),
            (0, IotlbKind::Update),
            (0, IotlbKind::BatchEnd),
        ]
    );
}
