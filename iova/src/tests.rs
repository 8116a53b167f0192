//! The IOVA tree against a naive model (property tests) and its edge cases.

use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

#[test]
fn guest_memory_is_identity_mapped_when_free() {
    let mut t = IovaTree::new(0, u64::MAX).unwrap();
    let m = t.map(AddrSpace::Guest, 0x1_0000_0000, 64 * MIB).unwrap();
    assert_eq!(m.iova, 0x1_0000_0000);
    let mut out = Vec::new();
    t.translate(AddrSpace::Guest, 0x1_0000_1000, 100, &mut out)
        .unwrap();
    assert_eq!(
        out,
        vec![Segment {
            iova: 0x1_0000_1000,
            len: 100
        }]
    );
}

#[test]
fn guest_memory_outside_window_is_relocated() {
    // A device that only reaches the low 1 GiB, guest memory at 4 GiB.
    let mut t = IovaTree::new(0x1000, (1 << 30) - 1).unwrap();
    let m = t.map(AddrSpace::Guest, 4 << 30, 16 * MIB).unwrap();
    assert_eq!(m.iova, 0x1000, "first fit at the bottom of the window");
    assert_eq!(
        t.reverse(0x1000 + 5),
        Some((AddrSpace::Guest, (4 << 30) + 5))
    );
}

#[test]
fn host_memory_is_first_fit_and_skips_guest_identity_ranges() {
    let mut t = IovaTree::new(0, u64::MAX).unwrap();
    t.map(AddrSpace::Guest, 0, 2 * MIB).unwrap();
    let h = t
        .map(AddrSpace::Host, 0x7f00_0000_0000, 3 * PAGE_SIZE)
        .unwrap();
    assert_eq!(h.iova, 2 * MIB);
    // A guest region whose identity range is now taken by host memory moves.
    let g = t.map(AddrSpace::Guest, 2 * MIB, MIB).unwrap();
    assert_ne!(g.iova, 2 * MIB);
    assert_eq!(g.iova % PAGE_SIZE, 0);
}

#[test]
fn translation_splits_across_mappings() {
    let mut t = IovaTree::new(0, (1 << 40) - 1).unwrap();
    // Two adjacent guest regions; force the second one away from identity
    // by occupying its identity range with host memory first.
    t.map(AddrSpace::Guest, 0, MIB).unwrap();
    let h = t.map(AddrSpace::Host, 0xdead_0000, MIB).unwrap();
    assert_eq!(h.iova, MIB);
    let g2 = t.map(AddrSpace::Guest, MIB, MIB).unwrap();
    let mut out = Vec::new();
    t.translate(AddrSpace::Guest, MIB - 16, 48, &mut out)
        .unwrap();
    assert_eq!(
        out,
        vec![
            Segment {
                iova: MIB - 16,
                len: 16
            },
            Segment {
                iova: g2.iova,
                len: 32
            },
        ]
    );
}

#[test]
fn unmapped_bytes_are_an_error_and_leave_output_untouched() {
    let mut t = IovaTree::new(0, u64::MAX).unwrap();
    t.map(AddrSpace::Guest, 0, MIB).unwrap();
    let mut out = vec![Segment { iova: 1, len: 1 }];
    let err = t
        .translate(AddrSpace::Guest, MIB - 8, 16, &mut out)
        .unwrap_err();
    assert_eq!(
        err,
        IovaError::NotMapped {
            space: AddrSpace::Guest,
            addr: MIB - 8,
            len: 16,
            missing: MIB
        }
    );
    assert_eq!(out, vec![Segment { iova: 1, len: 1 }]);
    // Host space is separate: the guest mapping does not cover HVA 0.
    assert!(t.translate(AddrSpace::Host, 0, 1, &mut out).is_err());
}

#[test]
fn overlap_zero_size_wrap_and_exhaustion_are_errors() {
    let mut t = IovaTree::new(0, 16 * PAGE_SIZE - 1).unwrap();
    t.map(AddrSpace::Guest, 0, 8 * PAGE_SIZE).unwrap();
    assert!(matches!(
        t.map(AddrSpace::Guest, 4 * PAGE_SIZE, PAGE_SIZE),
        Err(IovaError::Overlap { .. })
    ));
    assert!(matches!(
        t.map(AddrSpace::Host, 0, 0),
        Err(IovaError::ZeroSize { .. })
    ));
    assert!(matches!(
        t.map(AddrSpace::Host, u64::MAX - 10, 100),
        Err(IovaError::Wraps { .. })
    ));
    assert!(matches!(
        t.map(AddrSpace::Host, 0x10_0000, 9 * PAGE_SIZE),
        Err(IovaError::Exhausted { .. })
    ));
    t.map(AddrSpace::Host, 0x10_0000, 8 * PAGE_SIZE).unwrap();
    assert!(matches!(
        t.map(AddrSpace::Host, 0x20_0000, 1),
        Err(IovaError::Exhausted { .. })
    ));
}

#[test]
fn unmap_frees_the_range_for_reuse() {
    let mut t = IovaTree::new(0, 4 * PAGE_SIZE - 1).unwrap();
    let a = t.map(AddrSpace::Host, 0x5000, 4 * PAGE_SIZE).unwrap();
    assert!(t.map(AddrSpace::Host, 0x9_0000, 1).is_err());
    assert_eq!(t.unmap(AddrSpace::Host, 0x5000).unwrap(), a);
    assert!(matches!(
        t.unmap(AddrSpace::Host, 0x5000),
        Err(IovaError::NoSuchMapping { .. })
    ));
    assert_eq!(t.map(AddrSpace::Host, 0x9_0000, 1).unwrap().iova, 0);
    assert!(t.reverse(PAGE_SIZE).is_none());
}

#[test]
fn unaligned_host_addresses_keep_their_page_offset() {
    let mut t = IovaTree::new(0, u64::MAX).unwrap();
    let m = t.map(AddrSpace::Host, 0x7000_0123, PAGE_SIZE).unwrap();
    assert_eq!(m.iova % PAGE_SIZE, 0x123);
    // Two pages are reserved: the mapping straddles a page boundary.
    let next = t.map(AddrSpace::Host, 0x9000_0000, 1).unwrap();
    assert_eq!(next.iova, 2 * PAGE_SIZE);
}

#[test]
fn contiguous_translation_rejects_ranges_that_leave_the_mapping() {
    let mut t = IovaTree::new(0, u64::MAX).unwrap();
    t.map(AddrSpace::Host, 0x4000, PAGE_SIZE).unwrap();
    assert_eq!(
        t.translate_contiguous(AddrSpace::Host, 0x4010, 16).unwrap(),
        0x10
    );
    assert!(matches!(
        t.translate_contiguous(AddrSpace::Host, 0x4ff0, 32),
        Err(IovaError::NotContiguous { .. })
    ));
}

#[test]
fn window_must_hold_a_page() {
    assert!(IovaTree::new(10, 20).is_err());
    assert!(IovaTree::new(5, 0).is_err());
    assert_eq!(
        IovaTree::new(1, 3 * PAGE_SIZE).unwrap().window(),
        (PAGE_SIZE, 3 * PAGE_SIZE - 1)
    );
}

#[test]
fn max_guest_regions_plus_rings() {
    // 509 guest regions (the vhost-user maximum) and 64 ring areas.
    let mut t = IovaTree::new(0, (1 << 48) - 1).unwrap();
    for i in 0..509u64 {
        let m = t.map(AddrSpace::Guest, i * 4 * MIB, 2 * MIB).unwrap();
        assert_eq!(m.iova, i * 4 * MIB);
    }
    for i in 0..64u64 {
        t.map(
            AddrSpace::Host,
            0x7f00_0000_0000 + i * 0x10_0000,
            3 * PAGE_SIZE,
        )
        .unwrap();
    }
    assert_eq!(t.len(), 573);
    let mut out = Vec::new();
    t.translate(AddrSpace::Guest, 508 * 4 * MIB + 100, 1500, &mut out)
        .unwrap();
    assert_eq!(
        out,
        vec![Segment {
            iova: 508 * 4 * MIB + 100,
            len: 1500
        }]
    );
}

// ---- property tests against a naive model ----

#[derive(Clone, Debug)]
enum Op {
    Map(AddrSpace, u64, u64),
    Unmap(usize),
    Translate(AddrSpace, u64, u64),
}

fn space() -> impl Strategy<Value = AddrSpace> {
    prop_oneof![Just(AddrSpace::Guest), Just(AddrSpace::Host)]
}

fn op() -> impl Strategy<Value = Op> {
    // Small address spaces so collisions and exhaustion happen often.
    prop_oneof![
        4 => (space(), 0u64..64 * PAGE_SIZE, 1u64..6 * PAGE_SIZE).prop_map(|(s, a, l)| Op::Map(s, a, l)),
        1 => (0usize..32).prop_map(Op::Unmap),
        4 => (space(), 0u64..70 * PAGE_SIZE, 0u64..8 * PAGE_SIZE).prop_map(|(s, a, l)| Op::Translate(s, a, l)),
    ]
}

/// The model: a flat list of mappings. Coverage is checked exactly (walking
/// mapping by mapping); IOVAs are compared at sampled offsets.
fn model_translate(maps: &[Mapping], space: AddrSpace, addr: u64, len: u64) -> Option<Vec<u64>> {
    let lookup = |b: u64| {
        maps.iter()
            .find(|m| m.space == space && m.addr <= b && b <= m.last_addr())
    };
    let mut cur = addr;
    while cur < addr + len {
        cur = lookup(cur)?.last_addr() + 1;
    }
    Some(
        (addr..addr + len)
            .step_by(509)
            .chain((len > 0).then(|| addr + len - 1))
            .map(|b| {
                let m = lookup(b).expect("covered");
                m.iova + (b - m.addr)
            })
            .collect(),
    )
}

fn iova_at(segs: &[Segment], off: u64) -> u64 {
    let mut off = off;
    for s in segs {
        if off < s.len {
            return s.iova + off;
        }
        off -= s.len;
    }
    panic!("offset beyond segments");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn behaves_like_the_naive_model(first_page in 0u64..4, pages in 8u64..48, ops in prop::collection::vec(op(), 1..80)) {
        let first = first_page * PAGE_SIZE;
        let last = first + pages * PAGE_SIZE - 1;
        let mut t = IovaTree::new(first, last).unwrap();
        let mut model: Vec<Mapping> = Vec::new();
        for op in ops {
            match op {
                Op::Map(space, addr, size) => {
                    let overlaps = model.iter().any(|m| m.space == space && addr <= m.last_addr() && m.addr < addr + size);
                    match t.map(space, addr, size) {
                        Ok(m) => {
                            prop_assert!(!overlaps, "mapped over an existing range");
                            prop_assert_eq!((m.space, m.addr, m.size), (space, addr, size));
                            prop_assert_eq!(m.iova % PAGE_SIZE, addr % PAGE_SIZE);
                            prop_assert!(m.iova >= first && m.last_iova() <= last, "outside window");
                            // No two mappings share an IOVA page.
                            for o in &model {
                                let (a0, a1) = (m.iova / PAGE_SIZE, m.last_iova() / PAGE_SIZE);
                                let (b0, b1) = (o.iova / PAGE_SIZE, o.last_iova() / PAGE_SIZE);
                                prop_assert!(a1 < b0 || b1 < a0, "IOVA overlap {:?} {:?}", m, o);
                            }
                            if space == AddrSpace::Guest && m.iova != addr {
                                // Identity was refused: it must really have been unavailable.
                                let base = addr & !(PAGE_SIZE - 1);
                                let end = (addr + size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
                                let taken = base < first || end - 1 > last || model.iter().any(|o| {
                                    let (b0, b1) = (o.iova & !(PAGE_SIZE - 1), o.last_iova() | (PAGE_SIZE - 1));
                                    base <= b1 && b0 < end
                                });
                                prop_assert!(taken, "identity placement was possible for {:?}", m);
                            }
                            model.push(m);
                        }
                        Err(IovaError::Overlap { .. }) => prop_assert!(overlaps),
                        Err(IovaError::Exhausted { .. }) => {
                            prop_assert!(!overlaps);
                            // Exhaustion only when the free pages really are too few.
                            let need = (addr % PAGE_SIZE + size).div_ceil(PAGE_SIZE);
                            let mut free = vec![true; pages as usize];
                            for m in &model {
                                for p in (m.iova / PAGE_SIZE)..=(m.last_iova() / PAGE_SIZE) {
                                    free[(p - first_page) as usize] = false;
                                }
                            }
                            let longest = free.split(|f| !f).map(|run| run.len() as u64).max().unwrap_or(0);
                            prop_assert!(longest < need, "exhausted with {} free pages in a row, needed {}", longest, need);
                        }
                        Err(e) => prop_assert!(false, "unexpected error {:?}", e),
                    }
                }
                Op::Unmap(i) => {
                    if model.is_empty() { continue; }
                    let m = model.remove(i % model.len());
                    prop_assert_eq!(t.unmap(m.space, m.addr).unwrap(), m);
                    prop_assert!(t.reverse(m.iova).is_none());
                }
                Op::Translate(space, addr, len) => {
                    let mut out = Vec::new();
                    let got = t.translate(space, addr, len, &mut out);
                    match model_translate(&model, space, addr, len) {
                        Some(expect) => {
                            prop_assert!(got.is_ok(), "{:?}", got);
                            prop_assert_eq!(out.iter().map(|s| s.len).sum::<u64>(), len);
                            let offs = (0..len).step_by(509).chain((len > 0).then(|| len - 1));
                            for (off, want) in offs.zip(expect) {
                                let iova = iova_at(&out, off);
                                prop_assert_eq!(iova, want);
                                // Round trip back to the address.
                                prop_assert_eq!(t.reverse(iova), Some((space, addr + off)));
                            }
                        }
                        None => {
                            prop_assert!(
                                matches!(got, Err(IovaError::NotMapped { .. })),
                                "expected NotMapped, got {:?}",
                                got
                            );
                            prop_assert!(out.is_empty());
                        }
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Many mappings over a wide, uneven span (the lookup's bucket table is
    /// used above a few mappings): `find` agrees with a linear scan for
    /// addresses in, between, before and after the mappings, also after
    /// removals.
    #[test]
    fn find_agrees_with_a_scan_over_many_mappings(
        gaps in prop::collection::vec(
            (prop_oneof![0u64..1 << 14, 0u64..1 << 24, 0u64..1 << 40], 1u64..1 << 30),
            1..600,
        ),
        probes in prop::collection::vec((any::<u64>(), any::<prop::sample::Index>(), 0u64..1 << 30), 1..200),
        unmap_every in 2usize..9,
    ) {
        let mut t = IovaTree::new(0, u64::MAX).unwrap();
        let mut maps: Vec<(u64, u64)> = Vec::new();
        let mut at = 0u64;
        for (n, (gap, size)) in gaps.into_iter().enumerate() {
            let Some(addr) = at.checked_add(gap) else { break };
            if addr.checked_add(size).is_none() { break; }
            let space = if n % 3 == 0 { AddrSpace::Host } else { AddrSpace::Guest };
            if t.map(space, addr, size).is_ok() && space == AddrSpace::Guest {
                maps.push((addr, size));
            }
            at = addr + size;
        }
        let check = |t: &IovaTree, maps: &[(u64, u64)], addr: u64| -> std::result::Result<(), TestCaseError> {
            let want = maps.iter().find(|&&(a, s)| addr >= a && addr - a < s).copied();
            let got = t.find(AddrSpace::Guest, addr).map(|m| (m.addr, m.size));
            prop_assert_eq!(got, want, "find({:#x})", addr);
            let mut out = Vec::new();
            let r = t.translate(AddrSpace::Guest, addr, 1, &mut out);
            prop_assert_eq!(r.is_ok(), want.is_some());
            Ok(())
        };
        for round in 0..2 {
            for (raw, pick, off) in &probes {
                check(&t, &maps, *raw)?;
                if !maps.is_empty() {
                    let (a, s) = maps[pick.index(maps.len())];
                    check(&t, &maps, a)?;
                    check(&t, &maps, a + s - 1)?;
                    check(&t, &maps, a.saturating_sub(*off))?;
                    check(&t, &maps, (a + s - 1).saturating_add(*off))?;
                }
            }
            if round == 0 {
                let mut i = 0;
                maps.retain(|&(a, _)| {
                    i += 1;
                    if i % unmap_every == 0 {
                        t.unmap(AddrSpace::Guest, a).unwrap();
                        false
                    } else {
                        true
                    }
                });
            }
        }
    }
}
