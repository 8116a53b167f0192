//! Dirty logging forwarded to a device that logs by itself (DESIGN.md "Live
//! migration"): test VMM -> svq-relay --backend vhost-user -> DPDK testpmd
//! net_vhost (offers LOG_ALL + LOG_SHMFD), forwarding every packet back in
//! `io` mode. With LOG_ALL on, passthrough stays and testpmd marks the pages
//! it writes in the VMM's log: every page the test driver saw written is in
//! it.
//!
//! Skipped (with a message) when dpdk-testpmd is missing, failed when
//! SVQ_RELAY_REQUIRE_PEERS=1 (CI).

mod common;

use common::peers::{testpmd_or_skip, TESTPMD};

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::tempdir;
use common::migrate::{migration_proto, pages_of, set_log_base, Log, F_LOG_ALL};
use common::{pump, Daemon, Qmp, Until, Vmm, VmmConfig};
use vhost::VhostBackend;

/// testpmd net_vhost on `sock`, killed with its `timeout` wrapper on drop.
struct Device {
    child: Child,
    log: std::path::PathBuf,
    prefix: String,
}

impl Device {
    fn spawn(dir: &Path, sock: &Path) -> Device {
        let prefix = format!("svqmig-{}", std::process::id());
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
        let log = dir.join("testpmd.log");
        let out = File::create(&log).unwrap();
        let vdev = format!("net_vhost0,iface={},queues=1", sock.display());
        let mut cmd = Command::new("timeout");
        cmd.process_group(0);
        cmd.args(["-s", "KILL", "120", TESTPMD])
            .args(["--lcores", "0@0,1@0", "--no-huge", "-m", "256", "--no-pci"])
            .args(["--file-prefix", &prefix, "--vdev", &vdev, "--"])
            .args(["--total-num-mbufs=8192", "--stats-period", "1"])
            .args(["--auto-start", "--forward-mode=io"]);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn dpdk-testpmd");
        let d = Device { child, log, prefix };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.text().contains("forwards packets on") {
            assert!(
                Instant::now() < deadline,
                "testpmd not ready:\n{}",
                d.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: no pointers; the negative pid names the group our
            // unreaped child leads.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- testpmd log ----\n{}", self.text());
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

#[test]
fn log_forwarded_to_testpmd_in_passthrough() {
    if !testpmd_or_skip() {
        return;
    }
    let dir = tempdir();
    let dev_sock = dir.path().join("dev.sock");
    let _device = Device::spawn(dir.path(), &dev_sock);
    let backend = format!("vhost-user:{}", dev_sock.display());
    let d = Daemon::spawn(&["--backend", &backend]);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let mut vmm = Vmm::start_with(&d.socket, VmmConfig::default(), migration_proto());
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap_or_else(|e| panic!("before: {e}"));

    let log = Log::new(vmm.mem.size);
    vmm.record_written(true);
    set_log_base(&vmm.fe, &log);
    vmm.acked |= F_LOG_ALL;
    vmm.fe
        .set_features(vmm.acked)
        .expect("SET_FEATURES +LOG_ALL");
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
