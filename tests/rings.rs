//! Ring state across stop/resume (GET_VRING_BASE then SET_VRING_BASE with
//! buffers in flight), guest memory added and removed at run time
//! (CONFIGURE_MEM_SLOTS), and the device config space (GET_CONFIG).

use serde_json::json;
use testkit::ring::wait_eventfds;
use testkit::vmm::connect_stream;
use testkit::{pump, Daemon, DriverOpts, Qmp, Until, Vmm, VmmConfig};
use vhost::vhost_user::VhostUserFrontend;

/// Stops all rings while frames are in flight, checks the bases against the
/// used indexes in guest memory, resumes at those bases, and checks that
/// every buffer then completes exactly once.
fn stop_and_resume(shadow: &str) {
    let d = Daemon::spawn(&["--shadow", shadow, "--queues", "2"]);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(2));
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap_or_else(|e| panic!("warm-up: {e}"));
    for round in 0..5 {
        for p in vmm.pairs.iter_mut() {
            p.send(1000);
        }
        let bases = vmm.get_vring_bases();
        for p in &vmm.pairs {
            for io in [&p.rx, &p.tx] {
                let base = bases[io.index] as u16;
                // What the device consumed is exactly what it completed: a
                // buffer taken and not completed would be lost for good.
                assert_eq!(
                    base,
                    io.ring.device_used_idx(),
                    "round {round} queue {}: base vs used idx in guest memory",
                    io.index
                );
                assert!(
                    io.ring.avail_idx.wrapping_sub(base) as usize <= io.ring.num_inflight(),
                    "round {round} queue {}: base {base} beyond avail {}",
                    io.index,
                    io.ring.avail_idx
                );
            }
        }
        for (q, base) in bases.iter().enumerate() {
            vmm.restart_queue(q, *base as u16)
                .unwrap_or_else(|e| panic!("round {round}: restart queue {q}: {e}"));
        }
        let target = vmm.pairs.iter().map(|p| p.next_seq).max().unwrap() + 50;
        pump(&mut vmm.pairs, Until::Frames(target))
            .unwrap_or_else(|e| panic!("round {round}: after resume: {e}"));
    }
    let mut q = Qmp::connect_ready(&d.qmp);
    let mode = if shadow == "on" {
        "shadow"
    } else {
        "passthrough"
    };
    assert_eq!(q.query("net0")["mode"], mode);
    vmm.check_final_bases();
}

#[test]
fn stop_and_resume_with_frames_in_flight_passthrough() {
    stop_and_resume("off");
}

#[test]
fn stop_and_resume_with_frames_in_flight_shadow() {
    stop_and_resume("on");
}

const GIB: u64 = 1 << 30;

/// Packet buffers live in a region added with ADD_MEM_REG; another region is
/// added and removed while traffic runs, across mode switches; after the
/// buffer region is removed, a chain pointing into it must be refused.
fn memory_hotplug(shadow: &str) {
    let d = Daemon::spawn(&["--shadow", shadow]);
    let cfg = VmmConfig {
        extra_regions: vec![(GIB, 8 << 20), (2 * GIB, 4 << 20)],
        mem_slots: true,
        driver: DriverOpts {
            buf_region: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut vmm = Vmm::negotiate(connect_stream(&d.socket), cfg);
    let slots = vmm.fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
    assert!(slots >= 3, "only {slots} memory slots");
    vmm.set_mem_table_of(&[0]).expect("SET_MEM_TABLE");
    let r1 = vmm.mem.region_info_of(1);
    let r2 = vmm.mem.region_info_of(2);
    vmm.fe.add_mem_region(&r1).expect("ADD_MEM_REG 1");
    for q in 0..2 {
        vmm.setup_queue(q)
            .unwrap_or_else(|e| panic!("queue {q}: {e}"));
    }
    pump(&mut vmm.pairs, Until::Frames(300)).unwrap_or_else(|e| panic!("buffers in region 1: {e}"));

    let mut q = Qmp::connect_ready(&d.qmp);
    // A region comes and goes while the rings run, in both modes.
    for (i, enable) in [shadow != "on", shadow == "on"].into_iter().enumerate() {
        vmm.fe.add_mem_region(&r2).expect("ADD_MEM_REG 2");
        let target = 600 + 300 * i as u32;
        pump(&mut vmm.pairs, Until::Frames(target)).unwrap_or_else(|e| panic!("after add: {e}"));
        assert_eq!(q.enable_shadow("net0", enable), json!({"return": {}}));
        pump(&mut vmm.pairs, Until::Frames(target + 150))
            .unwrap_or_else(|e| panic!("after switch: {e}"));
        vmm.fe.remove_mem_region(&r2).expect("REM_MEM_REG 2");
        pump(&mut vmm.pairs, Until::Frames(target + 300))
            .unwrap_or_else(|e| panic!("after remove: {e}"));
    }
    let dev = q.query("net0");
    let mode = if shadow == "on" {
        "shadow"
    } else {
        "passthrough"
    };
    assert_eq!(dev["mode"], mode, "{dev}");

    // Quiescent: remove the buffers' region, then offer a frame from it.
    vmm.fe.remove_mem_region(&r1).expect("REM_MEM_REG 1");
    let p = &mut vmm.pairs[0];
    let used_before = p.tx.ring.device_used_idx();
    assert_eq!(p.send(1), 1);
    let fds = p.call_fds();
    wait_eventfds(&fds, 1000);
    let dev = if shadow == "on" {
        testkit::qmp::query_until(&mut q, "net0", |dev| {
            let tx = testkit::qmp::queue_info(dev, 1);
            if tx["broken"].is_null() && testkit::qmp::u64_field(tx, "errors") == 0 {
                return Err("a chain in removed memory was not refused".into());
            }
            Ok(())
        })
    } else {
        q.query("net0")
    };
    let tx = testkit::qmp::queue_info(&dev, 1).clone();
    // Whatever happened, no frame came back from unmapped memory.
    let p = &mut vmm.pairs[0];
    assert_eq!(
        p.rx.ring.device_used_idx(),
        p.rx.ring.last_used,
        "RX got a frame from removed memory"
    );
    eprintln!(
        "{mode}: after REM_MEM_REG, TX used {} -> {}: {tx}",
        used_before,
        p.tx.ring.device_used_idx()
    );
    drop(vmm);
    // And the daemon serves the next VMM.
    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    pump(&mut vmm.pairs, Until::Frames(200)).unwrap_or_else(|e| panic!("next VMM: {e}"));
}

#[test]
fn memory_hotplug_passthrough() {
    memory_hotplug("off");
}

#[test]
fn memory_hotplug_shadow() {
    memory_hotplug("on");
}

#[test]
fn device_config_space() {
    let d = Daemon::spawn(&["--queues", "3"]);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(3));
    // CONFIG is not offered (QEMU's net device has no use for it), so the
    // vhost crate's Frontend will not send GET_CONFIG; the daemon answers
    // it all the same. VhostUserConfig {offset 0, size 12, flags 0} + room.
    let mut body = [0u32, 12, 0].map(u32::to_le_bytes).concat();
    body.extend_from_slice(&[0u8; 12]);
    let reply = match testkit::raw::request(&vmm.raw, 24, &body, &[]) {
        testkit::raw::Reply::Msg(b) => b,
        r => panic!("GET_CONFIG: {r:?}"),
    };
    assert_eq!(reply.len(), 24, "GET_CONFIG reply {reply:?}");
    let size = u32::from_le_bytes(reply[4..8].try_into().unwrap());
    assert_eq!(size, 12);
    let payload = &reply[12..];
    if vmm.offered & testkit::vmm::F_MAC != 0 {
        let mac = &payload[0..6];
        assert!(mac.iter().any(|&b| b != 0), "MAC offered but zero: {mac:?}");
        assert_eq!(mac[0] & 1, 0, "multicast MAC {mac:?}");
    }
    let max_pairs = u16::from_le_bytes([payload[8], payload[9]]);
    assert_eq!(max_pairs, 3, "max_virtqueue_pairs in {payload:?}");
    // Traffic is unaffected.
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
    drop(vmm);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(3));
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
}

/// A mode switch requested while the VMM has its rings stopped (between
/// GET_VRING_BASE and the restart) either is refused or takes effect; the
/// restarted rings work in whatever mode the daemon then reports.
#[test]
fn switch_while_rings_are_stopped() {
    let d = Daemon::spawn(&["--shadow", "off", "--queues", "2"]);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(2));
    let mut q = Qmp::connect_ready(&d.qmp);
    let mut target = 0;
    for (round, enable) in [true, false, true, false].into_iter().enumerate() {
        target += 200;
        pump(&mut vmm.pairs, Until::Frames(target))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let bases = vmm.get_vring_bases();
        let r = q.enable_shadow("net0", enable);
        let before = q.query("net0");
        for (qi, base) in bases.iter().enumerate() {
            vmm.restart_queue(qi, *base as u16)
                .unwrap_or_else(|e| panic!("round {round}: restart {qi}: {e}"));
        }
        target += 200;
        pump(&mut vmm.pairs, Until::Frames(target))
            .unwrap_or_else(|e| panic!("round {round} after restart ({r}, {before}): {e}"));
        let dev = q.query("net0");
        if r == json!({"return": {}}) {
            let mode = if enable { "shadow" } else { "passthrough" };
            assert_eq!(dev["mode"], mode, "round {round}: {dev}");
        } else {
            assert!(r["error"]["desc"].is_string(), "round {round}: {r}");
        }
    }
    vmm.check_final_bases();
}
