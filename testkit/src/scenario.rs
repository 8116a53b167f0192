//! Scenarios shared by several test files.

use crate::net::DriverOpts;
use crate::qmp::{query_until, queue_info, quiescent_queue, u64_field, Qmp};
use crate::{pump, Daemon, Until, Vmm, VmmConfig};

/// Starts a daemon with `--shadow shadow --queues pairs`, a VMM, pushes
/// `frames` frames per pair through the sim loopback (every byte checked),
/// then checks query-shadow-vq and the final GET_VRING_BASE indexes.
pub fn loopback(shadow: &str, pairs: u16, driver: DriverOpts, frames: u32) {
    let d = Daemon::spawn(&["--shadow", shadow, "--queues", &pairs.to_string()]);
    let cfg = VmmConfig {
        pairs,
        driver,
        ..Default::default()
    };
    let mut vmm = Vmm::start(&d.socket, cfg);
    assert_eq!(vmm.queue_num, 2 * pairs as u64, "GET_QUEUE_NUM");
    if let Err(e) = pump(&mut vmm.pairs, Until::Frames(frames)) {
        panic!("traffic failed: {e}");
    }
    if vmm.cfg.driver.rx_buf_size < 1526 {
        assert!(
            vmm.pairs.iter().all(|p| p.n_rx_merged > 0),
            "no merged RX frames"
        );
    }

    let mut q = Qmp::connect_ready(&d.qmp);
    let mode = if shadow == "on" {
        "shadow"
    } else {
        "passthrough"
    };
    let pairs_ref = &vmm.pairs;
    let dev = query_until(&mut q, "net0", |dev| {
        for p in pairs_ref {
            for (io, is_tx) in [(&p.rx, false), (&p.tx, true)] {
                let qi = queue_info(dev, io.index as u64);
                let relayed = u64_field(qi, "relayed");
                if shadow == "on" {
                    // Quiescent: the relay saw exactly what the driver saw,
                    // one per buffer (frames, or more with merged RX buffers).
                    if relayed != io.ring.total_used {
                        return Err(format!(
                            "queue {}: relayed {relayed} != {} completed",
                            io.index, io.ring.total_used
                        ));
                    }
                    quiescent_queue(qi, &io.ring, is_tx)
                        .map_err(|e| format!("queue {}: {e}", io.index))?;
                } else if relayed != 0 {
                    return Err(format!("queue {}: passthrough relayed {relayed}", io.index));
                }
            }
        }
        Ok(())
    });
    assert_eq!(dev["mode"], mode, "{dev}");
    assert_eq!(dev["started"], true, "{dev}");
    assert_eq!(dev["backend"], "sim", "{dev}");
    assert_eq!(
        dev["queues"].as_array().map(|a| a.len()),
        Some(2 * pairs as usize),
        "{dev}"
    );
    for p in &vmm.pairs {
        for io in [&p.rx, &p.tx] {
            let qi = queue_info(&dev, io.index as u64);
            assert_eq!(qi["mode"], mode, "queue {}: {qi}", io.index);
            assert_eq!(u64_field(qi, "errors"), 0, "queue {}: {qi}", io.index);
            assert!(qi["broken"].is_null(), "queue {}: {qi}", io.index);
        }
    }
    vmm.check_final_bases();
}
