//! Translate latency of the IOVA tree as the number of mappings grows.
//!
//! 509 guest regions is the vhost-user maximum; each bench also carries 32
//! host mappings (shadow rings) like a device with 16 queue pairs would.

use criterion::{black_box, criterion_group, BenchmarkId, Criterion};
use iova::{AddrSpace, IovaTree, Segment};

const REGION: u64 = 2 << 20;
const STRIDE: u64 = 4 << 20;

fn tree_with(regions: u64) -> IovaTree {
    let mut t = IovaTree::new(0, (1 << 48) - 1).expect("window");
    for i in 0..regions {
        t.map(AddrSpace::Guest, i * STRIDE, REGION)
            .expect("guest map");
    }
    for i in 0..32u64 {
        t.map(AddrSpace::Host, 0x7f00_0000_0000 + i * 0x10_0000, 3 * 4096)
            .expect("host map");
    }
    t
}

fn addrs(regions: u64) -> Vec<u64> {
    (0..1024u64)
        .map(|i| (i * 7919 % regions) * STRIDE + (i * 613) % (REGION - 1500))
        .collect()
}

fn translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("iova_translate");
    for regions in [1u64, 64, 509] {
        let tree = tree_with(regions);
        let mut out: Vec<Segment> = Vec::with_capacity(4);
        // Walk addresses across all regions so the lookup is not always the
        // same cached path.
        let addrs = addrs(regions);
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(regions), &regions, |b, _| {
            b.iter(|| {
                out.clear();
                let addr = addrs[i & 1023];
                i = i.wrapping_add(1);
                tree.translate(AddrSpace::Guest, black_box(addr), 1500, &mut out)
                    .expect("mapped");
                black_box(&out);
            })
        });
    }
    group.finish();
}

/// `IOVA_BENCH_ROUNDS=N IOVA_BENCH_REGIONS=509`: N translates over the same
/// addresses without criterion, for instruction counts under callgrind
/// (`--toggle-collect='*IovaTree::translate*'`).
fn fixed_rounds(rounds: usize) {
    let regions = std::env::var("IOVA_BENCH_REGIONS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(509);
    let tree = tree_with(regions);
    let addrs = addrs(regions);
    let mut out: Vec<Segment> = Vec::with_capacity(4);
    for i in 0..rounds {
        out.clear();
        tree.translate(AddrSpace::Guest, black_box(addrs[i & 1023]), 1500, &mut out)
            .expect("mapped");
        black_box(&out);
    }
}

criterion_group!(benches, translate);

fn main() {
    if let Some(rounds) = std::env::var("IOVA_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        fixed_rounds(rounds);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
