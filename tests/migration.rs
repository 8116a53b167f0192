//! Live migration end to end (issue 4), real binaries over real sockets: a
//! test VMM migrates a running device from one daemon to a second. Every
//! frame sent before, during and after arrives exactly once (the driver
//! checks ids, bytes and duplicates), every guest page the device wrote
//! while logging is in the dirty logs, replaced logs stay untouched, and bad
//! state streams are refused by name without changing the device.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use svq_relay::migration::stream::{
    DeviceState, Features, NicState, RelayMode, RxMode, VlanFilter, VringState,
};
use testkit::migrate::{
    load_state, migration_proto, pages_of, save_state, set_log_base, Log, F_LOG_ALL,
};
use testkit::qmp::{queue_info, u64_field};
use testkit::{pump, Daemon, DriverOpts, Qmp, Until, Vmm, VmmConfig};
use vhost::VhostBackend;

/// Sets the flag when dropped, so a failing control thread cannot leave the
/// traffic loop running forever.
struct SetOnDrop(Arc<AtomicBool>);
impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn assert_mode(q: &mut Qmp, mode: &str, queues: usize) {
    let dev = q.query("net0");
    assert_eq!(dev["mode"], mode, "{dev}");
    for i in 0..queues {
        let qi = queue_info(&dev, i as u64);
        assert_eq!(qi["mode"], mode, "queue {i}: {dev}");
        assert_eq!(u64_field(qi, "errors"), 0, "queue {i}: {dev}");
    }
}

fn wait_mode_event(q: &mut Qmp, enabled: bool) {
    let e = q
        .wait_event("SHADOW_VQ_CHANGED", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no SHADOW_VQ_CHANGED (enabled={enabled})"));
    assert_eq!(e["data"]["name"], "net0", "{e}");
    assert_eq!(e["data"]["enabled"], enabled, "{e}");
}

fn migrate(pairs: u16, swaps: usize) {
    migrate_with(pairs, swaps, DriverOpts::default());
}

fn migrate_with(pairs: u16, swaps: usize, driver: DriverOpts) {
    let queues = 2 * pairs as usize;
    let src = Daemon::spawn(&["--queues", &pairs.to_string()]);
    let mut qmp = Qmp::connect_ready(&src.qmp);
    let cfg = VmmConfig {
        pairs,
        driver,
        ..Default::default()
    };
    let mut vmm = Vmm::start_with(&src.socket, cfg, migration_proto());
    assert_ne!(vmm.offered & F_LOG_ALL, 0, "LOG_ALL not offered");

    // Before: passthrough (--shadow auto), traffic drained.
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap_or_else(|e| panic!("before: {e}"));
    assert_mode(&mut qmp, "passthrough", queues);

    // Logging on: the SET_FEATURES reply comes with every queue shadowed.
    let logs: Vec<Arc<Log>> = (0..=swaps)
        .map(|_| Arc::new(Log::new(vmm.mem.size)))
        .collect();
    vmm.record_written(true);
    set_log_base(&vmm.fe, &logs[0]);
    vmm.acked |= F_LOG_ALL;
    vmm.fe
        .set_features(vmm.acked)
        .expect("SET_FEATURES +LOG_ALL");
    assert_mode(&mut qmp, "shadow", queues);
    wait_mode_event(&mut qmp, true);
    // As QEMU does right after (vhost_dev_set_log): every running ring's
    // addresses again, now with VHOST_VRING_F_LOG and the used ring's GPA.
    for q in 0..queues {
        let mut c = vmm.vring_config(q);
        let p = &vmm.pairs[q / 2];
        let ring = if q % 2 == 0 { &p.rx.ring } else { &p.tx.ring };
        c.flags = 1;
        c.log_addr = Some(ring.used.0);
        vmm.fe
            .set_vring_addr(q, &c)
            .unwrap_or_else(|e| panic!("SET_VRING_ADDR {q} with F_LOG: {e}"));
    }

    // During: dirty-sync passes (one SET_LOG_BASE each) under traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let fe = vmm.fe.clone();
    let logs2 = logs.clone();
    let guard = SetOnDrop(stop.clone());
    let control = thread::spawn(move || {
        let _guard = guard;
        let mut snapshots = Vec::new();
        for i in 1..logs2.len() {
            // Pacing only: let traffic reach each log.
            thread::sleep(Duration::from_millis(20));
            set_log_base(&fe, &logs2[i]);
            // Replied: the previous log is final from here on.
            snapshots.push((i - 1, logs2[i - 1].bytes()));
        }
        thread::sleep(Duration::from_millis(20));
        snapshots
    });
    let traffic = pump(&mut vmm.pairs, Until::Flag(&stop));
    let snapshots = control.join().expect("control thread");
    traffic.unwrap_or_else(|e| panic!("during logging: {e}"));

    let bases = vmm.stop_with_frames_in_flight();
    let state = save_state(&vmm.fe).unwrap_or_else(|e| panic!("{e}\n{}", src.stderr()));

    for (i, snap) in &snapshots {
        assert!(
            logs[*i].bytes() == *snap,
            "log {i} changed after the reply to the SET_LOG_BASE that replaced it"
        );
    }
    let expected = pages_of(&vmm.written_ranges());
    vmm.record_written(false);
    let logged: BTreeSet<u64> = logs.iter().flat_map(|l| l.pages()).collect();
    let missed: Vec<u64> = expected.difference(&logged).copied().collect();
    assert!(
        missed.is_empty(),
        "{} of {} written pages missing from the logs, first {:x?}",
        missed.len(),
        expected.len(),
        &missed[..missed.len().min(10)]
    );
    eprintln!(
        "{pairs} pair(s), {} logs: {} pages written, {} logged, {} false positives",
        logs.len(),
        expected.len(),
        logged.len(),
        logged.difference(&expected).count()
    );
    for (i, l) in logs.iter().enumerate() {
        assert!(!l.pages().is_empty(), "log {i} got nothing");
    }

    // Destination: same memory, loaded state, rings continue at the bases.
    let dst = Daemon::spawn(&["--queues", &pairs.to_string()]);
    vmm.move_to(&dst.socket);
    load_state(&vmm.fe, &state).unwrap_or_else(|e| panic!("{e}\n{}", dst.stderr()));
    for (q, &b) in bases.iter().enumerate() {
        vmm.restart_queue(q, b as u16)
            .unwrap_or_else(|e| panic!("restart queue {q} at {b}: {e}"));
    }
    let sent = vmm.pairs.iter().map(|p| p.next_seq).max().unwrap_or(0);
    pump(&mut vmm.pairs, Until::Frames(sent + 200))
        .unwrap_or_else(|e| panic!("after migration: {e}\n{}", dst.stderr()));
    for p in &vmm.pairs {
        assert!(p.quiescent(), "{}", p.describe());
        assert!(p.rx_received.iter().all(|&r| r), "{}", p.describe());
    }
    vmm.check_final_bases();
    assert!(
        !src.stderr().contains("ERROR") && !dst.stderr().contains("ERROR"),
        "errors logged:\n{}\n{}",
        src.stderr(),
        dst.stderr()
    );
}

#[test]
fn migrate_one_pair_with_log_swaps() {
    migrate(1, 4);
}

#[test]
fn migrate_two_pairs_with_log_swaps() {
    migrate(2, 3);
}

/// EVENT_IDX (the SVQ writes avail_event into guest memory), indirect
/// tables, small RX buffers (frames over several merged buffers).
#[test]
fn migrate_event_idx_indirect_merged_rx() {
    migrate_with(
        1,
        3,
        DriverOpts {
            event_idx: true,
            indirect: true,
            rx_buf_size: 512,
            irq_batch: 4,
            ..Default::default()
        },
    );
}

/// LOG_ALL cleared (migration cancelled): every queue back in passthrough,
/// traffic continues, events both ways.
#[test]
fn log_all_off_switches_back_to_passthrough() {
    let d = Daemon::spawn(&["--queues", "2"]);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let mut vmm = Vmm::start_with(&d.socket, VmmConfig::pairs(2), migration_proto());
    pump(&mut vmm.pairs, Until::Frames(50)).unwrap();
    let log = Log::new(vmm.mem.size);
    set_log_base(&vmm.fe, &log);
    vmm.fe.set_features(vmm.acked | F_LOG_ALL).unwrap();
    assert_mode(&mut qmp, "shadow", 4);
    wait_mode_event(&mut qmp, true);
    pump(&mut vmm.pairs, Until::Frames(150)).unwrap();
    vmm.fe.set_features(vmm.acked).unwrap();
    assert_mode(&mut qmp, "passthrough", 4);
    wait_mode_event(&mut qmp, false);
    let before = log.bytes();
    pump(&mut vmm.pairs, Until::Frames(300)).unwrap();
    assert!(
        log.bytes() == before,
        "the log changed after LOG_ALL was cleared"
    );
    let dev = qmp.query("net0");
    for q in 0..4 {
        assert!(u64_field(queue_info(&dev, q), "relayed") > 0, "{dev}");
    }
    vmm.check_final_bases();
}

/// `--shadow off`: logging does not switch modes (the operator said so).
#[test]
fn shadow_off_policy_stays_in_passthrough() {
    let d = Daemon::spawn(&["--shadow", "off"]);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let mut vmm = Vmm::start_with(&d.socket, VmmConfig::default(), migration_proto());
    vmm.fe.set_features(vmm.acked | F_LOG_ALL).unwrap();
    assert_mode(&mut qmp, "passthrough", 2);
    pump(&mut vmm.pairs, Until::Frames(50)).unwrap();
}

/// Ring state survives RESET_OWNER until GET_VRING_BASE (a VMM without the
/// STATUS protocol feature resets the device this way before reading the
/// bases).
#[test]
fn ring_state_survives_reset_owner() {
    let d = Daemon::spawn(&["--shadow", "on"]);
    let mut vmm = Vmm::start_with(&d.socket, VmmConfig::default(), migration_proto());
    pump(&mut vmm.pairs, Until::Frames(77)).unwrap();
    vmm.fe.reset_owner().expect("RESET_OWNER");
    let tx = vmm.fe.get_vring_base(1).expect("GET_VRING_BASE");
    let rx = vmm.fe.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(tx as u16, vmm.pairs[0].tx.ring.avail_idx);
    assert_eq!(rx as u16, vmm.pairs[0].rx.ring.last_used);
}

const SIM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn good_state(acked: u64, base: u16) -> DeviceState {
    DeviceState {
        features: Features {
            virtio: acked,
            protocol: 0,
        },
        mode: RelayMode::Passthrough,
        nic: NicState {
            mac: SIM_MAC,
            mtu: 1500,
            queue_pairs: 1,
            rx_mode: RxMode::default(),
            vlans: VlanFilter::default(),
        },
        vrings: (0..2)
            .map(|_| VringState {
                size: 256,
                next_avail: base,
                used_idx: base,
                ..Default::default()
            })
            .collect(),
    }
}

fn avail_idx(q: &mut Qmp, queue: u64) -> u64 {
    u64_field(queue_info(&q.query("net0"), queue), "avail_idx")
}

/// Each class of bad stream fails CHECK_DEVICE_STATE with a log line naming
/// the problem; the device keeps its ring state and takes a good stream
/// afterwards.
#[test]
fn bad_state_streams_are_refused_by_name() {
    let d = Daemon::spawn(&[]);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let vmm = Vmm::negotiate_with(
        testkit::vmm::connect_stream(&d.socket),
        VmmConfig::default(),
        migration_proto(),
    );
    vmm.set_mem_table().unwrap();
    vmm.fe.set_vring_num(0, 256).unwrap();
    vmm.fe.set_vring_base(0, 7).unwrap();
    assert_eq!(avail_idx(&mut qmp, 0), 7);

    let good = good_state(vmm.acked, 5).to_bytes().unwrap();
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 3);
    let mut too_large = good.clone();
    too_large.resize(svq_relay::migration::stream::MAX_STREAM + 1, 0);
    let mut long_record = good.clone();
    // The first record (features) claims a huge length.
    long_record[10..14].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    let mut version = good.clone();
    version[4..6].copy_from_slice(&3u16.to_le_bytes());
    let mut unknown = good[..good.len() - 8].to_vec();
    unknown.extend_from_slice(&0x77u16.to_le_bytes());
    unknown.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    unknown.extend_from_slice(&good[good.len() - 8..]);
    let mut bad_head = good_state(vmm.acked, 5);
    bad_head.vrings[0].next_avail = 6;
    bad_head.vrings[0].in_flight = vec![300];
    let inconsistent = bad_head.to_bytes().unwrap();

    let cases: [(&str, &[u8], &str); 6] = [
        ("truncated", &truncated, "truncated record"),
        (
            "oversized",
            &too_large,
            "state stream is larger than 1048576 bytes",
        ),
        (
            "oversized record",
            &long_record,
            "exceeds the type's maximum",
        ),
        ("wrong version", &version, "unsupported stream version 3"),
        ("unknown type", &unknown, "unknown record type 0x0077"),
        (
            "inconsistent",
            &inconsistent,
            "in-flight head 300 >= queue size 256",
        ),
    ];
    for (what, bytes, message) in cases {
        let r = load_state(&vmm.fe, bytes);
        assert!(r.is_err(), "{what}: loaded");
        let log = d.stderr();
        assert!(
            log.lines()
                .any(|l| l.contains("CHECK_DEVICE_STATE") && l.contains(message)),
            "{what}: no log line with {message:?}:\n{log}"
        );
        assert_eq!(avail_idx(&mut qmp, 0), 7, "{what}: device state changed");
    }
    load_state(&vmm.fe, &good).unwrap_or_else(|e| panic!("{e}\n{}", d.stderr()));
    assert_eq!(avail_idx(&mut qmp, 0), 5);
    assert_eq!(avail_idx(&mut qmp, 1), 5);
}

/// A state whose features differ from what the destination negotiated is
/// refused before anything changes (the device stays usable).
#[test]
fn state_with_other_features_is_refused() {
    let d = Daemon::spawn(&[]);
    let mut qmp = Qmp::connect_ready(&d.qmp);
    let vmm = Vmm::negotiate_with(
        testkit::vmm::connect_stream(&d.socket),
        VmmConfig::default(),
        migration_proto(),
    );
    vmm.set_mem_table().unwrap();
    vmm.fe.set_vring_base(0, 9).unwrap();
    let other = good_state(vmm.acked & !testkit::vmm::F_MRG_RXBUF, 3);
    assert!(load_state(&vmm.fe, &other.to_bytes().unwrap()).is_err());
    assert!(
        d.stderr().contains("differ from the saved"),
        "{}",
        d.stderr()
    );
    assert_eq!(avail_idx(&mut qmp, 0), 9);
    let good = good_state(vmm.acked, 3);
    load_state(&vmm.fe, &good.to_bytes().unwrap()).unwrap();
    assert_eq!(avail_idx(&mut qmp, 0), 3);
}

/// `--print-capabilities` says whether postcopy is offered, and why not.
#[test]
fn print_capabilities_reports_postcopy() {
    let out = std::process::Command::new(testkit::daemon::bin())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "net", "{v}");
    assert_eq!(v["migration"]["dirty-log"], true, "{v}");
    match v["postcopy"]["supported"].as_bool() {
        Some(true) => assert!(v["postcopy"].get("reason").is_none(), "{v}"),
        Some(false) => assert!(
            v["postcopy"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{v}"
        ),
        None => panic!("no postcopy entry: {v}"),
    }
}

/// INFLIGHT_SHMFD: the daemon allocates the region on GET_INFLIGHT_FD and
/// maps one handed back with SET_INFLIGHT_FD (as after a VMM restart); a
/// geometry it cannot hold is refused.
#[test]
fn inflight_region_round_trip() {
    use vhost::vhost_user::message::VhostUserInflight;
    use vhost::vhost_user::VhostUserFrontend;
    let d = Daemon::spawn(&[]);
    let mut vmm = Vmm::start_with(&d.socket, VmmConfig::default(), migration_proto());
    let (reply, file) = vmm
        .fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 2, 256))
        .expect("GET_INFLIGHT_FD");
    assert!(reply.mmap_size > 0);
    assert_eq!((reply.num_queues, reply.queue_size), (2, 256));
    assert!(file.metadata().unwrap().len() >= reply.mmap_size);
    vmm.fe
        .set_inflight_fd(&reply, std::os::fd::AsRawFd::as_raw_fd(&file))
        .expect("SET_INFLIGHT_FD");
    assert!(vmm
        .fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 9, 256))
        .is_err());
}

/// struct uffdio_copy and _IOWR(0xAA, 0x03, struct uffdio_copy).
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
const UFFDIO_COPY: u64 = (3 << 30) | (40 << 16) | (0xAA << 8) | 0x03;

/// UFFDIO_COPY of one page of `byte` to `dst` in the daemon through `uffd`.
fn uffd_copy(uffd: &std::fs::File, dst: u64, byte: u8) -> std::io::Result<()> {
    let page = vec![byte; 4096];
    let mut c = UffdioCopy {
        dst,
        src: page.as_ptr() as u64,
        len: 4096,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY reads and writes one struct uffdio_copy (`c`) and
    // reads `len` bytes from `src`, which `page` holds; it writes into the
    // daemon's address space only.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(uffd),
            UFFDIO_COPY as _,
            &mut c,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Postcopy: ADVISE hands out a userfaultfd, the memory table sent while
/// listening comes back with the daemon's addresses of each region, which
/// are registered on it: a page the VMM copies in through the fd lands in
/// guest memory. After END the daemon's mappings are no longer registered.
/// Skipped (with the reason) where the host fails the postcopy check.
#[test]
fn postcopy_advise_listen_end() {
    use vhost::vhost_user::message::FrontendReq;
    use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
    use vm_memory::{Bytes, GuestAddress};
    let out = std::process::Command::new(testkit::daemon::bin())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if caps["postcopy"]["supported"] != true {
        let why = caps["postcopy"]["reason"].as_str().unwrap_or("");
        assert!(!why.is_empty(), "{caps}");
        eprintln!("skipping: postcopy not supported here: {why}");
        return;
    }
    let d = Daemon::spawn(&[]);
    let mut vmm = Vmm::negotiate_with(
        testkit::vmm::connect_stream(&d.socket),
        VmmConfig::default(),
        migration_proto() | VhostUserProtocolFeatures::PAGEFAULT,
    );
    let uffd = vmm.fe.postcopy_advise().expect("POSTCOPY_ADVISE");
    let link = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&uffd)
    ))
    .unwrap();
    assert!(link.to_string_lossy().contains("userfaultfd"), "{link:?}");
    vmm.fe.postcopy_listen().expect("POSTCOPY_LISTEN");
    let region = vmm.mem.region_info();
    let bases = vmm
        .fe
        .set_mem_table(&[region])
        .expect("SET_MEM_TABLE while listening")
        .expect("region addresses in the reply");
    vmm.fe
        .postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE)
        .expect("ack");
    assert_eq!(bases.len(), 1);
    // A page nobody touched (the test allocates from the start of region 0).
    let off = vmm.mem.size - 4096;
    uffd_copy(&uffd, bases[0] + off, 0xab)
        .unwrap_or_else(|e| panic!("UFFDIO_COPY into the daemon's mapping: {e}"));
    let got: u8 = vmm.mem.mem.read_obj(GuestAddress(off + 100)).unwrap();
    assert_eq!(got, 0xab);
    vmm.fe.postcopy_end().expect("POSTCOPY_END");
    assert!(
        uffd_copy(&uffd, bases[0] + off - 4096, 0xcd).is_err(),
        "still registered after POSTCOPY_END"
    );
    let caps_line = d.stderr();
    assert!(!caps_line.contains("ERROR"), "{caps_line}");
}
