//! Live-migration costs, measured on the real daemon over real sockets with
//! the test VMM (tests/common):
//!
//! - `dirty_log/{off,on}`: shadow-mode throughput with VHOST_F_LOG_ALL off
//!   and on (`--shadow on`, so the mode is the same; only logging differs),
//!   two daemons in the same run.
//! - `switch/<pairs>p_<mem>`: the SET_FEATURES(+LOG_ALL) round trip under
//!   `--shadow auto`, which returns only after every queue switched from
//!   passthrough to shadow: an upper bound of the switch blackout (it also
//!   contains the message round trip). Switching back (LOG_ALL cleared) is
//!   not timed. 1, 4 and 16 queue pairs; 256 MiB and 4 GiB of guest memory
//!   (sparse memfds: nothing is touched, the daemon maps all of it).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vhost::VhostBackend;

use testkit::migrate::{migration_proto, set_log_base, Log, F_LOG_ALL};
use testkit::{pump, Daemon, Until, Vmm, VmmConfig};

/// Frames per pair per iteration.
const FRAMES: u32 = 512;

fn dirty_log(c: &mut Criterion) {
    let mut g = c.benchmark_group("dirty_log");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(FRAMES as u64));
    for on in [false, true] {
        let d = Daemon::spawn(&["--shadow", "on", "--log-level", "warn"]);
        let mut vmm = Vmm::start_with(&d.socket, VmmConfig::default(), migration_proto());
        let log = Log::new(vmm.mem.size);
        if on {
            set_log_base(&vmm.fe, &log);
            vmm.fe
                .set_features(vmm.acked | F_LOG_ALL)
                .expect("SET_FEATURES +LOG_ALL");
        }
        pump(&mut vmm.pairs, Until::Frames(FRAMES)).expect("warm-up");
        g.bench_function(if on { "on" } else { "off" }, |b| {
            b.iter(|| {
                let n = vmm.pairs[0].next_seq + FRAMES;
                pump(&mut vmm.pairs, Until::Frames(n)).expect("traffic");
            })
        });
        if on {
            assert!(!log.pages().is_empty(), "nothing was logged");
        }
    }
    g.finish();
}

fn switch(c: &mut Criterion) {
    let mut g = c.benchmark_group("switch");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for mem_mib in [256usize, 4096] {
        for pairs in [1u16, 4, 16] {
            let d = Daemon::spawn(&["--queues", &pairs.to_string(), "--log-level", "warn"]);
            let cfg = VmmConfig {
                pairs,
                mem_size: mem_mib << 20,
                ..Default::default()
            };
            let mut vmm = Vmm::start_with(&d.socket, cfg, migration_proto());
            pump(&mut vmm.pairs, Until::Frames(64)).expect("warm-up");
            let log = Log::new(vmm.mem.size);
            set_log_base(&vmm.fe, &log);
            let id = BenchmarkId::new(format!("{pairs}p"), format!("{mem_mib}MiB"));
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        vmm.fe
                            .set_features(vmm.acked | F_LOG_ALL)
                            .expect("SET_FEATURES +LOG_ALL");
                        total += t.elapsed();
                        vmm.fe.set_features(vmm.acked).expect("SET_FEATURES");
                    }
                    total
                })
            });
            // The rings still work after all the switching.
            let n = vmm.pairs[0].next_seq + 64;
            pump(&mut vmm.pairs, Until::Frames(n)).expect("traffic after switching");
        }
    }
    g.finish();
}

criterion_group!(benches, dirty_log, switch);
criterion_main!(benches);
