//! One malformed ring per validation rule: the typed error comes back, the
//! queue (only) is broken and stays broken, nothing in guest memory changes,
//! and other queues keep working.

use iova::{AddrSpace, IovaTree};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::harness::{self, FakeDevice, DESC_GPA, MEM_END, REGION_B, TABLE_BASE};
use super::{Fixture, F_INDIRECT};
use crate::{GuestRing, RingIndexes, ShadowVirtqueue, SvqConfig, SvqError};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
const BUF: u64 = 0x5_0000;

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; MEM_END as usize];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

fn desc(f: &Fixture, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    f.drv
        .write_desc(&f.mem, table, i, Descriptor::new(addr, len, flags, next));
}

/// A healthy queue next to the broken one still relays.
fn other_queue_works() {
    let mut g = Fixture::new(16, 16, 0, 0);
    g.add(&[(8, true)], false);
    assert!(g.kick().unwrap());
    g.dev.take_all(&g.tree);
    g.dev.complete(0, 8, 1, &g.mem, &g.tree);
    g.call().unwrap();
    assert_eq!(g.drv.collect(&g.mem).len(), 1);
}

/// The queue is broken by `e`, reports it in stats and on every later call,
/// and can still be stopped.
fn assert_broken(f: &mut Fixture, e: &SvqError) {
    assert!(f.svq.is_broken());
    let st = f.svq.stats();
    assert_eq!(st.errors, 1);
    assert_eq!(st.broken, Some(e.to_string()));
    assert_eq!(f.kick().as_ref().unwrap_err(), e);
    assert_eq!(f.call().as_ref().unwrap_err(), e);
    assert_eq!(f.svq.stats().errors, 1, "not counted again");
    other_queue_works();
}

/// Kick a malformed guest ring: expect the error, no guest memory written,
/// and the bad chain left unconsumed for whoever handles the ring next.
fn expect_guest_error(f: &mut Fixture, check: impl Fn(&SvqError) -> bool) -> SvqError {
    let before = snapshot(&f.mem);
    let avail_before = f.svq.stats().guest_avail_idx;
    let e = f.kick().unwrap_err();
    assert!(check(&e), "unexpected error {e:?}");
    assert!(snapshot(&f.mem) == before, "guest memory changed");
    assert_eq!(f.svq.stats().guest_avail_idx, avail_before);
    assert_broken(f, &e);
    assert!(snapshot(&f.mem) == before, "guest memory changed");
    let st = f.svq.stop(&f.mem, f.dev.last_avail).unwrap();
    assert_eq!(st.indexes.avail, avail_before);
    e
}

#[test]
fn bad_head_index() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.drv.publish_head(&f.mem, 16);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::BadHeadIndex {
            head: 16,
            queue_size: 16,
        }
    });
}

#[test]
fn avail_idx_too_far_ahead() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.drv.set_avail_idx(&f.mem, 17);
    expect_guest_error(&mut f, |e| {
        matches!(e, SvqError::AvailIdxTooFarAhead { avail_idx: 17, .. })
    });
}

#[test]
fn buffer_outside_guest_memory() {
    let mut f = Fixture::new(16, 16, 0, 0);
    desc(&f, DESC_GPA, 0, MEM_END - 8, 16, WRITE, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        matches!(
            e,
            SvqError::DescOutsideMemory {
                head: 0,
                len: 16,
                ..
            }
        )
    });
}

#[test]
fn buffer_wrapping_the_address_space() {
    let mut f = Fixture::new(16, 16, 0, 0);
    desc(&f, DESC_GPA, 0, u64::MAX - 4, 16, 0, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| matches!(e, SvqError::DescOutsideMemory { .. }));
}

#[test]
fn chain_longer_than_queue_size() {
    // Two indirect tables of 16 entries in one chain: 32 > 16 descriptors.
    let mut f = Fixture::new(16, 16, F_INDIRECT, F_INDIRECT);
    for t in 0..2u64 {
        let table = TABLE_BASE + t * 0x400;
        for i in 0..16u16 {
            desc(&f, table, i, BUF, 8, if i < 15 { NEXT } else { 0 }, i + 1);
        }
    }
    desc(&f, DESC_GPA, 0, TABLE_BASE, 256, INDIRECT | NEXT, 1);
    desc(&f, DESC_GPA, 1, TABLE_BASE + 0x400, 256, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::ChainTooLong { head: 0, max: 16 }
    });
}

#[test]
fn loop_in_descriptor_table() {
    let mut f = Fixture::new(16, 16, 0, 0);
    desc(&f, DESC_GPA, 0, BUF, 8, NEXT, 1);
    desc(&f, DESC_GPA, 1, BUF, 8, NEXT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::DescriptorLoop { head: 0, index: 0 }
    });
}

#[test]
fn loop_in_indirect_table() {
    let mut f = Fixture::new(16, 16, F_INDIRECT, 0);
    desc(&f, TABLE_BASE, 0, BUF, 8, NEXT, 1);
    desc(&f, TABLE_BASE, 1, BUF, 8, NEXT, 0);
    desc(&f, DESC_GPA, 3, TABLE_BASE, 32, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 3);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::DescriptorLoop { head: 3, index: 0 }
    });
}

#[test]
fn nested_indirect() {
    let mut f = Fixture::new(16, 16, F_INDIRECT, 0);
    desc(&f, TABLE_BASE, 0, TABLE_BASE + 0x400, 16, INDIRECT, 0);
    desc(&f, TABLE_BASE + 0x400, 0, BUF, 8, 0, 0);
    desc(&f, DESC_GPA, 0, TABLE_BASE, 16, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| *e == SvqError::NestedIndirect { head: 0 });
}

#[test]
fn zero_length_indirect() {
    let mut f = Fixture::new(16, 16, F_INDIRECT, 0);
    desc(&f, DESC_GPA, 0, TABLE_BASE, 0, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| *e == SvqError::ZeroLengthIndirect { head: 0 });
}

#[test]
fn misaligned_indirect_length() {
    let mut f = Fixture::new(16, 16, F_INDIRECT, 0);
    desc(&f, TABLE_BASE, 0, BUF, 8, 0, 0);
    desc(&f, DESC_GPA, 0, TABLE_BASE, 24, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::MisalignedIndirect { head: 0, len: 24 }
    });
}

#[test]
fn indirect_table_longer_than_queue() {
    let mut f = Fixture::new(16, 16, F_INDIRECT, 0);
    desc(&f, TABLE_BASE, 0, BUF, 8, 0, 0);
    desc(&f, DESC_GPA, 0, TABLE_BASE, 17 * 16, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::IndirectTooLong {
            head: 0,
            entries: 17,
            max: 16,
        }
    });
}

#[test]
fn indirect_table_outside_memory() {
    let mut f = Fixture::new(16, 16, F_INDIRECT, 0);
    desc(&f, DESC_GPA, 0, MEM_END - 16, 32, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        matches!(e, SvqError::IndirectOutsideMemory { head: 0, .. })
    });
}

#[test]
fn next_index_outside_table() {
    let mut f = Fixture::new(16, 16, 0, 0);
    desc(&f, DESC_GPA, 0, BUF, 8, NEXT, 16);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        matches!(
            e,
            SvqError::BadNextIndex {
                next: 16,
                table_len: 16,
                ..
            }
        )
    });
}

#[test]
fn next_index_outside_indirect_table() {
    let mut f = Fixture::new(16, 16, F_INDIRECT, 0);
    desc(&f, TABLE_BASE, 0, BUF, 8, NEXT, 2);
    desc(&f, DESC_GPA, 0, TABLE_BASE, 32, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        matches!(
            e,
            SvqError::BadNextIndex {
                next: 2,
                table_len: 2,
                ..
            }
        )
    });
}

#[test]
fn readable_after_writable() {
    let mut f = Fixture::new(16, 16, 0, 0);
    desc(&f, DESC_GPA, 0, BUF, 8, WRITE | NEXT, 1);
    desc(&f, DESC_GPA, 1, BUF + 8, 8, 0, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::ReadableAfterWritable { head: 0 }
    });
}

/// A virtio-net RX queue requires room for the 12-byte header.
const NET_HDR: u32 = 12;

#[test]
fn chain_with_no_writable_descriptor_under_min_writable() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.set_min_writable(NET_HDR);
    desc(&f, DESC_GPA, 0, BUF, 2048, 0, 0);
    f.drv.publish_head(&f.mem, 0);
    let e = expect_guest_error(&mut f, |e| {
        *e == SvqError::TooFewWritableBytes {
            head: 0,
            writable: 0,
            min: NET_HDR,
        }
    });
    assert_eq!(
        e.to_string(),
        "chain 0: 0 device-writable bytes, fewer than the 12 this queue requires"
    );
    assert_eq!(f.dev.avail_idx(), 0, "nothing reached the device");
}

#[test]
fn writable_bytes_short_of_min_across_an_indirect_table() {
    // 4 + 7 = 11 writable bytes behind a readable one, one byte short.
    let mut f = Fixture::new(16, 16, F_INDIRECT, F_INDIRECT);
    f.svq.set_min_writable(NET_HDR);
    desc(&f, TABLE_BASE, 0, BUF, 64, NEXT, 1);
    desc(&f, TABLE_BASE, 1, BUF + 64, 4, WRITE | NEXT, 2);
    desc(&f, TABLE_BASE, 2, BUF + 68, 7, WRITE, 0);
    desc(&f, DESC_GPA, 0, TABLE_BASE, 48, INDIRECT, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::TooFewWritableBytes {
            head: 0,
            writable: 11,
            min: NET_HDR,
        }
    });
}

#[test]
fn chain_short_of_min_writable_after_good_ones() {
    // The good chains before it still reach the device; only the short one
    // stays on the guest ring.
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.set_min_writable(NET_HDR);
    let good = f.add(&[(NET_HDR, true)], false);
    let short = f.add(&[(NET_HDR - 1, true)], false);
    let e = f.kick().unwrap_err();
    assert_eq!(
        e,
        SvqError::TooFewWritableBytes {
            head: short,
            writable: u64::from(NET_HDR - 1),
            min: NET_HDR,
        }
    );
    assert_eq!(f.dev.take_all(&f.tree), 1);
    assert_eq!(
        FakeDevice::gpa(&f.tree, f.dev.taken[0].segs[0].0),
        f.drv.outstanding[&good].bufs[0].gpa
    );
    assert_eq!(f.svq.stats().guest_avail_idx, 1);
    assert_broken(&mut f, &e);
    let st = f.svq.stop(&f.mem, f.dev.last_avail).unwrap();
    assert_eq!(st.indexes, RingIndexes { avail: 1, used: 0 });
    assert_eq!(st.in_flight, vec![good]);
}

#[test]
fn head_made_available_twice() {
    let mut f = Fixture::new(16, 16, 0, 0);
    let h = f.add(&[(8, true)], false);
    assert!(f.kick().unwrap());
    f.drv.publish_head(&f.mem, h);
    f.dev.take_all(&f.tree);
    let before = snapshot(&f.mem);
    let e = f.kick().unwrap_err();
    assert_eq!(e, SvqError::HeadAlreadyInFlight { head: h });
    assert!(snapshot(&f.mem) == before);
    assert_broken(&mut f, &e);
    // The first copy is still reported in flight; the second not consumed.
    let st = f.svq.stop(&f.mem, 1).unwrap();
    assert_eq!(st.indexes, RingIndexes { avail: 1, used: 0 });
    assert_eq!(st.in_flight, vec![h]);
}

#[test]
fn buffer_without_iova() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.tree.unmap(AddrSpace::Guest, REGION_B.0).unwrap();
    desc(&f, DESC_GPA, 0, REGION_B.0 + 0x100, 8, WRITE, 0);
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(
        &mut f,
        |e| matches!(e, SvqError::Translation { head: 0, gpa, len: 8, .. } if *gpa == REGION_B.0 + 0x100),
    );
}

#[test]
fn over_long_chain_without_device_indirect() {
    let mut f = Fixture::new(16, 2, 0, 0);
    f.add(&[(8, false), (8, true), (8, true)], false);
    let e = expect_guest_error(&mut f, |e| {
        *e == SvqError::NeedIndirect {
            head: 0,
            segments: 3,
            shadow_size: 2,
        }
    });
    assert!(e.to_string().contains("INDIRECT_DESC"));
}

#[test]
fn chain_split_into_more_segments_than_a_table() {
    // Guest memory mapped page by page: a 0x2000-byte buffer at a page
    // offset becomes 3 segments, 16 of them 48 > 2 * 16 table entries.
    let mut f = Fixture::new(16, 16, 0, F_INDIRECT);
    let mut tree = IovaTree::new(0x1_0000_0000, 0x1_ffff_ffff).unwrap();
    for p in 0..(MEM_END / 4096) {
        tree.map(AddrSpace::Guest, p * 4096, 4096).unwrap();
    }
    harness::map_shadow(&mut tree, &f.svq);
    f.tree = tree;
    for i in 0..16u16 {
        let flags = WRITE | if i < 15 { NEXT } else { 0 };
        desc(
            &f,
            DESC_GPA,
            i,
            BUF + 0x800 + i as u64 * 0x2000,
            0x2000,
            flags,
            i + 1,
        );
    }
    f.drv.publish_head(&f.mem, 0);
    expect_guest_error(&mut f, |e| {
        *e == SvqError::TooManySegments {
            head: 0,
            segments: 48,
            max: 32,
        }
    });
}

#[test]
fn shadow_memory_not_in_the_tree() {
    let mut f = Fixture::new(16, 2, 0, F_INDIRECT);
    let m = f.svq.shadow_memory();
    f.tree.unmap(AddrSpace::Host, m.as_ptr() as u64).unwrap();
    f.add(&[(8, true), (8, true), (8, true)], false);
    let e = f.kick().unwrap_err();
    assert!(matches!(e, SvqError::ShadowTranslation { .. }), "{e:?}");
    assert_broken(&mut f, &e);
    // The chain was popped but never reached the device: stop gives it back.
    assert_eq!(f.svq.stats().parked, 1);
    let st = f.svq.stop(&f.mem, 0).unwrap();
    assert_eq!(st.indexes, RingIndexes { avail: 0, used: 0 });
}

#[test]
fn guest_ring_outside_memory() {
    let mut f = Fixture::new(16, 16, 0, 0);
    let ring = GuestRing {
        desc: MEM_END,
        avail: MEM_END + 0x1000,
        used: MEM_END + 0x2000,
        used_log: MEM_END + 0x2000,
    };
    f.svq = ShadowVirtqueue::new(f.svq.config(), ring, RingIndexes::default()).unwrap();
    expect_guest_error(&mut f, |e| {
        *e == SvqError::GuestRingAccess {
            what: "avail ring",
            addr: MEM_END + 0x1000,
        }
    });
}

#[test]
fn invalid_configurations_are_refused() {
    let ring = harness::guest_ring();
    let cfg = |q, s| SvqConfig {
        queue_size: q,
        shadow_size: s,
        guest_features: 0,
        device_features: 0,
    };
    let new = |c, r, st| ShadowVirtqueue::new(c, r, st).err();
    let z = RingIndexes::default();
    assert_eq!(
        new(cfg(0, 16), ring, z),
        Some(SvqError::InvalidQueueSize(0))
    );
    assert_eq!(
        new(cfg(24, 16), ring, z),
        Some(SvqError::InvalidQueueSize(24))
    );
    assert_eq!(
        new(cfg(16, 0), ring, z),
        Some(SvqError::InvalidShadowSize(0))
    );
    assert_eq!(
        new(cfg(16, 65535), ring, z),
        Some(SvqError::InvalidShadowSize(65535))
    );
    for (r, name) in [
        (GuestRing { desc: 8, ..ring }, "descriptor"),
        (GuestRing { avail: 1, ..ring }, "avail"),
        (GuestRing { used: 2, ..ring }, "used"),
    ] {
        assert!(matches!(
            new(cfg(16, 16), r, z),
            Some(SvqError::MisalignedRing { ring, .. }) if ring == name
        ));
    }
    let st = RingIndexes { avail: 17, used: 0 };
    assert!(matches!(
        new(cfg(16, 16), ring, st),
        Some(SvqError::InvalidStartIndexes { .. })
    ));
}

// ---- device side --------------------------------------------------------

/// One chain in flight; the device then writes `bad` used entries.
fn expect_device_error(device: impl FnOnce(&mut Fixture), check: impl Fn(&SvqError) -> bool) {
    let mut f = Fixture::new(16, 16, 0, 0);
    let h = f.add(&[(8, false), (100, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    device(&mut f);
    let before = snapshot(&f.mem);
    let e = f.call().unwrap_err();
    assert!(check(&e), "unexpected error {e:?}");
    assert!(snapshot(&f.mem) == before, "guest memory changed");
    assert!(f.log.ranges.borrow().is_empty(), "nothing logged");
    assert_eq!(f.drv.used_idx(&f.mem), 0, "no guest used entry");
    assert_broken(&mut f, &e);
    // The chain is still in flight for the daemon to deal with.
    let st = f.svq.stop(&f.mem, 1).unwrap();
    assert_eq!(st.in_flight, vec![h]);
}

#[test]
fn used_idx_too_far_ahead() {
    expect_device_error(
        |f| {
            f.dev.push_used(0, 1);
            f.dev.push_used(0, 1);
        },
        |e| {
            matches!(
                e,
                SvqError::UsedIdxTooFarAhead {
                    used_idx: 2,
                    ahead: 2,
                    in_flight: 1,
                    ..
                }
            )
        },
    );
}

#[test]
fn used_id_out_of_range() {
    expect_device_error(
        |f| f.dev.push_used(16, 0),
        |e| {
            *e == SvqError::BadUsedId {
                id: 16,
                shadow_size: 16,
            }
        },
    );
}

#[test]
fn used_id_not_in_flight() {
    expect_device_error(
        |f| f.dev.push_used(5, 0),
        |e| *e == SvqError::UsedIdNotInFlight { id: 5 },
    );
}

#[test]
fn used_len_beyond_writable_bytes() {
    expect_device_error(
        |f| f.dev.push_used(0, 101),
        |e| {
            *e == SvqError::UsedLenTooBig {
                id: 0,
                len: 101,
                max: 100,
            }
        },
    );
}

#[test]
fn used_twice() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.add(&[(8, true)], false);
    f.add(&[(8, true)], false);
    f.kick().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 8, 1, &f.mem, &f.tree);
    f.call().unwrap();
    f.dev.push_used(0, 8);
    let e = f.call().unwrap_err();
    assert_eq!(e, SvqError::UsedIdNotInFlight { id: 0 });
    assert_eq!(
        f.drv.collect(&f.mem).len(),
        1,
        "only the genuine completion"
    );
    assert_broken(&mut f, &e);
}
