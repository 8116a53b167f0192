//! Dirty logging forwarded to a device that logs by itself (DESIGN.md "Live
//! migration"): test VMM -> svq-relay --backend vhost-user -> DPDK testpmd
//! net_vhost (offers LOG_ALL + LOG_SHMFD), forwarding every packet back in
//! `io` mode. With LOG_ALL on, passthrough stays and testpmd marks the pages
//! it writes in the VMM's log: every page the test driver saw written is in
//! it.
//!
//! Skipped (with a message) when dpdk-testpmd is missing, failed when
//! SVQ_RELAY_REQUIRE_PEERS=1 (CI).

use testkit::daemon::tempdir;
use testkit::migrate::{migration_proto, pages_of, Log};
use testkit::peers::testpmd_or_skip;
use testkit::testpmd::Testpmd;
use testkit::{pump, Daemon, Qmp, Until, Vmm, VmmConfig};

#[test]
fn log_forwarded_to_testpmd_in_passthrough() {
    if !testpmd_or_skip() {
        return;
    }
    let dir = tempdir();
    let dev_sock = dir.path().join("dev.sock");
    let mut device = Testpmd::vhost(&dev_sock).dir(dir.path()).spawn();
    device.wait_forwarding();
    let backend = format!("vhost-user:{}", dev_sock.display());
    let d = Daemon::spawn(&["--backend", &backend]);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let mut vmm = Vmm::start_with(&d.socket, VmmConfig::default(), migration_proto());
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap_or_else(|e| panic!("before: {e}"));

    let log = Log::new(vmm.mem.size);
    vmm.start_logging(&log);
    assert_eq!(qmp.query("net0")["mode"], "passthrough");
    pump(&mut vmm.pairs, Until::Frames(600)).unwrap_or_else(|e| panic!("logging: {e}"));
    vmm.get_vring_bases();
    let expected = pages_of(&vmm.written_ranges());
    let logged = log.pages();
    let missed: Vec<u64> = expected.difference(&logged).copied().collect();
    assert!(
        missed.is_empty(),
        "{} of {} pages testpmd wrote are not in the log, first {:x?}",
        missed.len(),
        expected.len(),
        &missed[..missed.len().min(10)]
    );
    eprintln!(
        "testpmd logged {} pages, {} written, {} false positives",
        logged.len(),
        expected.len(),
        logged.difference(&expected).count()
    );
    assert!(d.stderr().contains("dirty log forwarded"), "{}", d.stderr());
}
