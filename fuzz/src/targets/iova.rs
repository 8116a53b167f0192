//! `iova`: map/unmap/translate/reverse sequences against the IOVA tree and a
//! model that is obviously right (a list searched linearly), compared after
//! every operation.

use iova::{AddrSpace, IovaError, IovaTree, Mapping, Segment, PAGE_SIZE};

use crate::engine::Target;
use crate::input::{Reader, Writer};
use crate::rng::Rng;

pub struct IovaTarget;

const WINDOWS: [(u64, u64); 3] = [
    (0, u64::MAX),
    (0x1_0000_0000, 0x1_ffff_ffff),
    (0x1000, 0x2_0fff),
];
const OPS: usize = 64;

/// The naive tree.
struct Model {
    first: u64,
    last: u64,
    maps: Vec<Mapping>,
}

fn align_down(a: u64) -> u64 {
    a & !(PAGE_SIZE - 1)
}

/// The IOVA pages a mapping holds, inclusive.
fn alloc(m: &Mapping) -> (u64, u64) {
    let base = align_down(m.iova);
    let len = (m.iova - base + m.size).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    (base, base + (len - 1))
}

impl Model {
    fn in_space(&self, space: AddrSpace) -> impl Iterator<Item = &Mapping> {
        self.maps.iter().filter(move |m| m.space == space)
    }

    fn find(&self, space: AddrSpace, addr: u64) -> Option<Mapping> {
        self.in_space(space)
            .find(|m| addr >= m.addr && addr <= m.last_addr())
            .copied()
    }

    fn iova_free(&self, lo: u64, hi: u64) -> bool {
        self.maps.iter().all(|m| {
            let (a, b) = alloc(m);
            b < lo || a > hi
        })
    }

    /// Lowest page-aligned free IOVA range of `len` bytes in the window.
    fn first_fit(&self, len: u64) -> Option<u64> {
        let mut ranges: Vec<(u64, u64)> = self.maps.iter().map(alloc).collect();
        ranges.sort_unstable();
        let mut cand = self.first;
        for (a, b) in ranges {
            if a > cand && a - cand >= len {
                break;
            }
            if b >= cand {
                cand = b.checked_add(1)?;
            }
        }
        let end = cand.checked_add(len - 1)?;
        (end <= self.last).then_some(cand)
    }

    fn translate(&self, space: AddrSpace, addr: u64, len: u64) -> Result<Vec<Segment>, u64> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if addr.checked_add(len - 1).is_none() {
            return Err(u64::MAX);
        }
        let mut out = Vec::new();
        let (mut cur, mut left) = (addr, len);
        while left > 0 {
            let m = self.find(space, cur).ok_or(cur)?;
            let take = (m.last_addr() - cur + 1).min(left);
            out.push(Segment {
                iova: m.iova + (cur - m.addr),
                len: take,
            });
            left -= take;
            cur = cur.wrapping_add(take);
        }
        Ok(out)
    }
}

fn space(r: &mut Reader) -> AddrSpace {
    if r.u8() & 1 == 0 {
        AddrSpace::Guest
    } else {
        AddrSpace::Host
    }
}

fn addr(r: &mut Reader) -> u64 {
    match r.u8() % 4 {
        0 => r.u64(),
        1 => u64::from(r.u16()) << 12,
        2 => u64::from(r.u32()),
        _ => (u64::from(r.u8()) << 12) + u64::from(r.u16() % 0x1000),
    }
}

fn size(r: &mut Reader) -> u64 {
    match r.u8() % 4 {
        0 => r.u64(),
        1 => u64::from(r.u8()) << 12,
        2 => u64::from(r.u16()),
        _ => (u64::from(r.u8() % 16) << 12) + u64::from(r.u16() % 0x1000),
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn op_map(t: &mut IovaTree, m: &mut Model, sp: AddrSpace, a: u64, s: u64) -> Result<(), String> {
    let got = t.map(sp, a, s);
    let expect_err = if s == 0 {
        Some(IovaError::ZeroSize { space: sp, addr: a })
    } else if a.checked_add(s - 1).is_none() {
        Some(IovaError::Wraps {
            space: sp,
            addr: a,
            size: s,
        })
    } else if m
        .in_space(sp)
        .any(|x| x.addr <= a + (s - 1) && x.last_addr() >= a)
    {
        Some(IovaError::Overlap {
            space: sp,
            addr: a,
            size: s,
        })
    } else {
        None
    };
    if let Some(e) = expect_err {
        return check(got.as_ref() == Err(&e), || {
            format!("map({sp:?}, {a:#x}, {s:#x}) = {got:?}, model says {e:?}")
        });
    }
    let offset = a % PAGE_SIZE;
    let Some(alloc_len) = (offset + s)
        .checked_next_multiple_of(PAGE_SIZE)
        .filter(|l| *l != 0)
    else {
        return check(matches!(got, Err(IovaError::Wraps { .. })), || {
            format!("map({sp:?}, {a:#x}, {s:#x}) = {got:?}, its pages wrap")
        });
    };
    let identity = align_down(a);
    let want_base = if sp == AddrSpace::Guest
        && identity >= m.first
        && identity
            .checked_add(alloc_len - 1)
            .is_some_and(|e| e <= m.last && m.iova_free(identity, e))
    {
        Some(identity)
    } else {
        m.first_fit(alloc_len)
    };
    match (got, want_base) {
        (Ok(g), Some(base)) => {
            let want = Mapping {
                space: sp,
                addr: a,
                size: s,
                iova: base + offset,
            };
            check(g == want, || {
                format!("map({sp:?}, {a:#x}, {s:#x}) = {g:?}, model says {want:?}")
            })?;
            m.maps.push(g);
            Ok(())
        }
        (Err(IovaError::Exhausted { .. }), None) => Ok(()),
        (got, want) => Err(format!(
            "map({sp:?}, {a:#x}, {s:#x}) = {got:?}, model's base {want:?}"
        )),
    }
}

fn op(t: &mut IovaTree, m: &mut Model, r: &mut Reader) -> Result<(), String> {
    match r.u8() % 6 {
        0 => {
            let (sp, a, s) = (space(r), addr(r), size(r));
            op_map(t, m, sp, a, s)?;
        }
        1 => {
            let (sp, a) = (space(r), addr(r));
            let got = t.unmap(sp, a);
            match m.maps.iter().position(|x| x.space == sp && x.addr == a) {
                Some(i) => {
                    let want = m.maps.remove(i);
                    check(got == Ok(want), || {
                        format!("unmap({sp:?}, {a:#x}) = {got:?}, model says {want:?}")
                    })?;
                }
                None => check(
                    got == Err(IovaError::NoSuchMapping { space: sp, addr: a }),
                    || format!("unmap({sp:?}, {a:#x}) = {got:?}, nothing starts there"),
                )?,
            }
        }
        2 => {
            let (sp, a, l) = (space(r), addr(r), size(r));
            let mut out = vec![Segment { iova: 7, len: 7 }];
            let got = t.translate(sp, a, l, &mut out);
            let want = m.translate(sp, a, l);
            let ok = match (&got, &want) {
                (Ok(()), Ok(segs)) => out.len() == segs.len() + 1 && out[1..] == segs[..],
                (Err(IovaError::NotMapped { missing, .. }), Err(w)) => {
                    missing == w && out.len() == 1
                }
                _ => false,
            };
            check(ok, || {
                format!("translate({sp:?}, {a:#x}, {l:#x}) = {got:?} {out:?}, model {want:?}")
            })?;
        }
        3 => {
            let (sp, a, l) = (space(r), addr(r), size(r));
            let got = t.translate_contiguous(sp, a, l);
            let want = match m.find(sp, a) {
                None => Err("not mapped"),
                Some(x) if l > 0 && x.last_addr() - a < l - 1 => Err("not contiguous"),
                Some(x) => Ok(x.iova + (a - x.addr)),
            };
            let ok = match (&got, want) {
                (Ok(g), Ok(w)) => *g == w,
                (Err(IovaError::NotMapped { .. }), Err("not mapped")) => true,
                (Err(IovaError::NotContiguous { .. }), Err("not contiguous")) => true,
                _ => false,
            };
            check(ok, || {
                format!("translate_contiguous({sp:?}, {a:#x}, {l:#x}) = {got:?}, model {want:?}")
            })?;
        }
        4 => {
            // Near an existing mapping's IOVA, so reverse hits as well as misses.
            let base = match m.maps.len() {
                0 => 0,
                n => m.maps[r.u8() as usize % n].iova,
            };
            let i = base.wrapping_add(addr(r) % 0x3000).wrapping_sub(0x1000);
            let got = t.reverse(i);
            let want = m
                .maps
                .iter()
                .find(|x| i >= x.iova && i <= x.last_iova())
                .map(|x| (x.space, x.addr + (i - x.iova)));
            check(got == want, || {
                format!("reverse({i:#x}) = {got:?}, model {want:?}")
            })?;
        }
        _ => {
            let (sp, a) = (space(r), addr(r));
            let got = t.find(sp, a).copied();
            let want = m.find(sp, a);
            check(got == want, || {
                format!("find({sp:?}, {a:#x}) = {got:?}, model {want:?}")
            })?;
        }
    }
    let n = t.len();
    check(n == m.maps.len(), || {
        format!("tree holds {n} mappings, model {}", m.maps.len())
    })
}

impl Target for IovaTarget {
    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(rng.below(3) as u8);
        // Addresses from a small pool so maps collide, translations hit and
        // ranges straddle neighbours.
        let pool = [0u64, 0x1000, 0x2000, 0x3800, 0x10000, 0x10fff, 0x20000];
        let sizes = [0x1000u64, 0x800, 0x10000, 0x1, 0x2801, 0xf000];
        for _ in 0..rng.range(4, 40) {
            let op = rng.below(6) as u8;
            w.u8(op).u8(rng.below(4) as u8 / 3);
            if op == 4 {
                w.u8(rng.next_u64() as u8)
                    .u8(2)
                    .u32(rng.below(0x3000) as u32);
                continue;
            }
            w.u8(2)
                .u32(*rng.pick(&pool) as u32 + rng.below(3) as u32 * 0x100);
            if op != 1 && op != 5 {
                w.u8(2).u16(*rng.pick(&sizes) as u16);
            }
        }
        w.0
    }

    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(input);
        let (first, last) = match r.u8() % 4 {
            3 => (r.u64(), r.u64()),
            i => WINDOWS[i as usize],
        };
        let mut t = match IovaTree::new(first, last) {
            Ok(t) => t,
            Err(IovaError::InvalidWindow { .. }) => return Ok(()),
            Err(e) => return Err(format!("new({first:#x}, {last:#x}): {e:?}")),
        };
        let (f, l) = t.window();
        check(
            f >= first && l <= last && f % PAGE_SIZE == 0 && l.wrapping_add(1) % PAGE_SIZE == 0,
            || format!("window {f:#x}..={l:#x} of {first:#x}..={last:#x}"),
        )?;
        let mut m = Model {
            first: f,
            last: l,
            maps: Vec::new(),
        };
        for _ in 0..OPS {
            if r.is_empty() {
                break;
            }
            op(&mut t, &mut m, &mut r)?;
        }
        Ok(())
    }

    fn max_len(&self) -> usize {
        1024
    }
}
