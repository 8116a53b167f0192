//! Switching between passthrough and shadow at run time, under continuous
//! traffic: every buffer completes exactly once (the driver checks ids,
//! lengths, duplicates and every byte), and the indexes the daemon reports
//! (query-shadow-vq, GET_VRING_BASE) match what the driver saw.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::json;
use testkit::qmp::{queue_info, u64_field};
use testkit::{pump, Daemon, DriverOpts, Qmp, Until, Vmm, VmmConfig};

/// Runs `switches` mode changes (shadow on, off, on, ...) from a second
/// thread while the driver pushes traffic, then checks everything.
fn switch_under_traffic(pairs: u16, switches: usize, driver: DriverOpts) {
    switch_under_traffic_with(pairs, switches, driver, &[]);
}

/// As `switch_under_traffic`, with more daemon arguments.
fn switch_under_traffic_with(pairs: u16, switches: usize, driver: DriverOpts, extra: &[&str]) {
    let q = pairs.to_string();
    let mut args = vec!["--shadow", "off", "--queues", &q];
    args.extend_from_slice(extra);
    let d = Daemon::spawn(&args);
    let cfg = VmmConfig {
        pairs,
        driver,
        ..Default::default()
    };
    let mut vmm = Vmm::start(&d.socket, cfg);
    // Traffic flows before the first switch.
    pump(&mut vmm.pairs, Until::Frames(200)).unwrap_or_else(|e| panic!("warm-up: {e}"));

    let stop = Arc::new(AtomicBool::new(false));
    let qmp_path = d.qmp.clone();
    let stop2 = stop.clone();
    let switcher = thread::spawn(move || {
        // Set `stop` whatever happens, or the traffic loop would run forever.
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _guard = SetOnDrop(stop2);
        let mut q = Qmp::connect_ready(&qmp_path);
        for i in 0..switches {
            // Let some traffic through in each mode (pacing only; nothing
            // below depends on timing).
            thread::sleep(Duration::from_millis(3));
            let enable = i % 2 == 0;
            let r = q.enable_shadow("net0", enable);
            assert_eq!(r, json!({"return": {}}), "switch {i} (enable={enable})");
            if i % 10 == 0 {
                let dev = q.query("net0");
                let mode = if enable { "shadow" } else { "passthrough" };
                assert_eq!(dev["mode"], mode, "after switch {i}: {dev}");
            }
        }
        // One event per mode change.
        let mut events = 0;
        while events < switches {
            match q.wait_event("SHADOW_VQ_CHANGED", Duration::from_secs(10)) {
                Some(e) => {
                    assert_eq!(e["data"]["name"], "net0", "{e}");
                    events += 1;
                }
                None => panic!("only {events} SHADOW_VQ_CHANGED events for {switches} switches"),
            }
        }
    });
    let traffic = pump(&mut vmm.pairs, Until::Flag(&stop));
    let switched = switcher.join();
    if let Err(e) = traffic {
        panic!("traffic across switches failed: {e}");
    }
    if let Err(e) = switched {
        std::panic::resume_unwind(e);
    }
    let total: u64 = vmm.pairs.iter().map(|p| p.next_seq as u64).sum();
    eprintln!("{switches} switches with {total} frames across them");

    let mut q = Qmp::connect_ready(&d.qmp);
    let final_mode = if switches % 2 == 1 {
        "shadow"
    } else {
        "passthrough"
    };
    // Quiescent: once the reported indexes caught up with the driver's, the
    // counters published with them are final too (queried once more).
    let pairs_ref = &vmm.pairs;
    testkit::qmp::query_until(&mut q, "net0", |dev| {
        if dev["mode"] != "shadow" {
            return Ok(());
        }
        for p in pairs_ref {
            for (j, io) in [&p.rx, &p.tx].into_iter().enumerate() {
                let qi = queue_info(dev, io.index as u64);
                testkit::qmp::quiescent_queue(qi, &io.ring, j == 1)
                    .map_err(|e| format!("queue {}: {e}", io.index))?;
            }
        }
        Ok(())
    });
    let dev = q.query("net0");
    assert_eq!(dev["mode"], final_mode, "{dev}");
    let mut relayed_before = Vec::new();
    for p in &vmm.pairs {
        for io in [&p.rx, &p.tx] {
            let qi = queue_info(&dev, io.index as u64);
            let relayed = u64_field(qi, "relayed");
            // The relay cannot have completed more than the guest got back.
            assert!(
                relayed <= io.ring.total_used,
                "queue {}: relayed {} > {} completed: {qi}",
                io.index,
                relayed,
                io.ring.total_used
            );
            assert_eq!(u64_field(qi, "errors"), 0, "queue {}: {qi}", io.index);
            assert!(qi["broken"].is_null(), "queue {}: {qi}", io.index);
            relayed_before.push(relayed);
        }
    }
    assert!(
        relayed_before.iter().sum::<u64>() > 0 || switches < 2,
        "no buffer went through the shadow path during {switches} switches: {dev}"
    );

    // An exact phase: from quiescence, N frames per pair in shadow mode must
    // show up as exactly N relayed buffers on each queue.
    if final_mode == "passthrough" {
        assert_eq!(q.enable_shadow("net0", true), json!({"return": {}}));
    }
    let start: Vec<u32> = vmm.pairs.iter().map(|p| p.next_seq).collect();
    let used_before: Vec<u64> = vmm
        .pairs
        .iter()
        .flat_map(|p| [p.rx.ring.total_used, p.tx.ring.total_used])
        .collect();
    let target = start.iter().max().unwrap() + 300;
    pump(&mut vmm.pairs, Until::Frames(target)).unwrap_or_else(|e| panic!("shadow phase: {e}"));
    let pairs_ref = &vmm.pairs;
    let dev = testkit::qmp::query_until(&mut q, "net0", |dev| {
        for (k, p) in pairs_ref.iter().enumerate() {
            let frames = target - start[k];
            for (j, io) in [&p.rx, &p.tx].into_iter().enumerate() {
                let qi = queue_info(dev, io.index as u64);
                let n = io.ring.total_used - used_before[2 * k + j];
                let delta = u64_field(qi, "relayed").checked_sub(relayed_before[2 * k + j]);
                if delta != Some(n) {
                    return Err(format!(
                        "queue {}: relayed delta {delta:?} over {frames} frames ({n} buffers)",
                        io.index
                    ));
                }
                testkit::qmp::quiescent_queue(qi, &io.ring, j == 1)
                    .map_err(|e| format!("queue {}: {e}", io.index))?;
            }
        }
        Ok(())
    });
    assert_eq!(dev["mode"], "shadow", "{dev}");

    // Back to passthrough: traffic still flows, and the bases the VMM reads
    // at the end match the driver's view.
    assert_eq!(q.enable_shadow("net0", false), json!({"return": {}}));
    pump(&mut vmm.pairs, Until::Frames(target + 300))
        .unwrap_or_else(|e| panic!("final passthrough phase: {e}"));
    vmm.check_final_bases();
}

#[test]
fn thousand_switches_under_traffic_two_pairs() {
    switch_under_traffic(2, 1000, DriverOpts::default());
}

#[test]
fn switches_under_traffic_four_pairs_without_mrg_rxbuf() {
    switch_under_traffic(
        4,
        21,
        DriverOpts {
            mrg_rxbuf: false,
            ..Default::default()
        },
    );
}

#[test]
fn switches_under_traffic_event_idx_indirect_small_rx_buffers() {
    switch_under_traffic(
        2,
        41,
        DriverOpts {
            mrg_rxbuf: true,
            event_idx: true,
            indirect: true,
            rx_buf_size: 512,
            irq_batch: 8,
            ..Default::default()
        },
    );
}

/// Polling workers under switches: the driver kicks only when the used
/// flags allow it and the software NIC in passthrough never polls, so a
/// ring handed back with NO_NOTIFY set, or a chain added while kicks were
/// off and never looked at, stops the traffic.
#[test]
fn switches_under_traffic_with_adaptive_polling() {
    switch_under_traffic_with(2, 200, DriverOpts::default(), &["--poll", "adaptive"]);
}

/// The same under EVENT_IDX (suppression through avail_event and
/// used_event) with a worker that polls whenever it holds a queue.
#[test]
fn switches_under_traffic_event_idx_always_polling() {
    switch_under_traffic_with(
        2,
        101,
        DriverOpts {
            event_idx: true,
            irq_batch: 4,
            ..Default::default()
        },
        &["--poll", "always"],
    );
}

/// Mode switches keep coming while VMMs connect, push traffic and vanish
/// (sometimes with frames in flight). Each switch either succeeds or says
/// the device is not started; the daemon never wedges, and every VMM's
/// traffic is intact.
#[test]
fn switches_while_vmms_come_and_go() {
    let mut d = Daemon::spawn(&["--shadow", "off", "--queues", "2"]);
    let stop = Arc::new(AtomicBool::new(false));
    let qmp_path = d.qmp.clone();
    let stop2 = stop.clone();
    let switcher = thread::spawn(move || {
        let mut q = Qmp::connect_ready(&qmp_path);
        let mut ok = 0;
        let mut enable = true;
        while !stop2.load(Ordering::Acquire) {
            let r = q.enable_shadow("net0", enable);
            if r == json!({"return": {}}) {
                ok += 1;
                enable = !enable;
            } else {
                let desc = r["error"]["desc"].as_str().unwrap_or("");
                assert_eq!(r["error"]["class"], "GenericError", "{r}");
                assert!(!desc.is_empty(), "{r}");
            }
            thread::sleep(Duration::from_millis(2));
        }
        ok
    });
    for round in 0..6 {
        let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(2));
        let r = pump(&mut vmm.pairs, Until::Frames(400));
        if let Err(e) = r {
            stop.store(true, Ordering::Release);
            panic!("round {round}: {e}");
        }
        if round % 2 == 1 {
            vmm.pairs[1].send(40);
        } else {
            vmm.check_final_bases();
        }
        drop(vmm);
        d.assert_alive();
    }
    stop.store(true, Ordering::Release);
    let switched = switcher
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    eprintln!("{switched} successful switches during 6 VMM sessions");
    let mut q = Qmp::connect_ready(&d.qmp);
    q.query("net0");
    let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(2));
    pump(&mut vmm.pairs, Until::Frames(200)).unwrap_or_else(|e| panic!("final VMM: {e}"));
}
