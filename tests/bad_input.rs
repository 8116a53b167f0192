//! Bad input on the vhost-user socket and in the guest rings. Each must be
//! refused (an error reply, a dropped connection, or a broken queue), and the
//! daemon must go on serving: a new connection negotiates and passes
//! traffic, the other queues keep working, QMP answers.

use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsRawFd;

use testkit::raw::{self, Reply};
use testkit::ring::{SplitRing, DESC_F_INDIRECT, DESC_F_NEXT};
use testkit::vmm::connect_stream;
use testkit::{pump, Daemon, DriverOpts, Qmp, Until, Vmm, VmmConfig};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::Bytes;

/// The daemon is alive, answers QMP, and serves a new VMM with `pairs`
/// pairs end to end.
fn assert_serves(d: &mut Daemon, pairs: u16) {
    d.assert_alive();
    let mut q = Qmp::connect_ready(&d.qmp);
    q.query("net0");
    let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(pairs));
    pump(&mut vmm.pairs, Until::Frames(200)).unwrap_or_else(|e| panic!("new connection: {e}"));
    vmm.check_final_bases();
    d.assert_alive();
}

/// Waits (bounded) for a WARN or ERROR line of the daemon containing all
/// of `needles`.
fn assert_logged(d: &Daemon, needles: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let log = d.stderr();
        if log.lines().any(|l| {
            (l.contains("WARN") || l.contains("ERROR")) && needles.iter().all(|n| l.contains(n))
        }) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no WARN/ERROR line with {needles:?} in the daemon log:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn warn_error_lines(d: &Daemon) -> usize {
    d.stderr()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count()
}

/// Waits (bounded) until the daemon logged a WARN/ERROR line beyond the
/// first `before` ones.
fn assert_new_error_logged(d: &Daemon, before: usize, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while warn_error_lines(d) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: nothing logged at WARN/ERROR:\n{}",
            d.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn garbage_on_the_socket_drops_the_connection() {
    let mut d = Daemon::spawn(&[]);
    let mut huge_mem_table = raw::header(raw::SET_MEM_TABLE, raw::VERSION, 0x7fff_ffff);
    huge_mem_table.extend_from_slice(&[0u8; 64]);
    let mut lcg = 0x1234_5678u32;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            lcg = lcg.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (lcg >> 16) as u8 | 0x80
        })
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("all ones", vec![0xff; 64]),
        ("noise", noise),
        ("bad version", raw::header(raw::GET_FEATURES, 0x2, 0)),
        (
            "reply flag on a request",
            raw::header(raw::GET_FEATURES, 0x5, 0),
        ),
        ("huge SET_MEM_TABLE", huge_mem_table),
    ];
    for (what, bytes) in cases {
        let logged = warn_error_lines(&d);
        let s = connect_stream(&d.socket);
        let _ = (&s).write_all(&bytes);
        assert!(
            raw::wait_closed(&s),
            "{what}: daemon neither closed the connection nor stopped talking"
        );
        drop(s);
        d.assert_alive();
        assert_new_error_logged(&d, logged, what);
    }
    assert_serves(&mut d, 1);
}

#[test]
fn truncated_messages() {
    let mut d = Daemon::spawn(&[]);
    // Connection closes in the middle of a header / of a body.
    for cut in [6usize, 16] {
        let s = connect_stream(&d.socket);
        let mut m = raw::header(raw::SET_FEATURES, raw::VERSION, 8);
        m.extend_from_slice(&(1u64 << 32).to_le_bytes());
        let _ = (&s).write_all(&m[..cut]);
        s.shutdown(Shutdown::Write).unwrap();
        assert!(raw::wait_closed(&s), "cut at {cut}: connection not closed");
        d.assert_alive();
    }
    // A complete message whose declared size is too small for its type.
    let vmm = Vmm::negotiate(connect_stream(&d.socket), VmmConfig::default());
    let r = raw::request(&vmm.raw, raw::SET_VRING_NUM, &[0, 0, 0, 0], &[]);
    assert!(r.is_refusal(), "SET_VRING_NUM with a 4-byte body: {r:?}");
    drop(vmm);
    // A message with fds it should not carry.
    let vmm = Vmm::negotiate(connect_stream(&d.socket), VmmConfig::default());
    let fds: Vec<_> = (0..4)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    let raw_fds: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let r = raw::request(&vmm.raw, raw::GET_FEATURES, &[], &raw_fds);
    assert!(
        matches!(&r, Reply::Msg(b) if b.len() == 8) || r == Reply::Closed,
        "GET_FEATURES with fds: {r:?}"
    );
    drop(vmm);
    assert_serves(&mut d, 1);
}

/// The VMM goes away in the middle of a message while traffic runs (frames
/// in flight both ways, in each mode): the daemon stops that session's
/// rings, stays up, keeps its mode, and the next VMM gets a working device.
fn vmm_gone_mid_message_under_traffic(shadow: &str) {
    let mut d = Daemon::spawn(&["--shadow", shadow]);
    for (round, cut) in [3usize, 12, 17].into_iter().enumerate() {
        let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(1));
        pump(&mut vmm.pairs, Until::Frames(200)).unwrap_or_else(|e| panic!("warm-up: {e}"));
        let stop = std::sync::atomic::AtomicBool::new(false);
        let raw = vmm.raw.try_clone().expect("clone the VMM socket");
        let traffic = std::thread::scope(|s| {
            let t = s.spawn(|| {
                testkit::net::pump_with(
                    &mut vmm.pairs,
                    Until::Flag(&stop),
                    std::time::Duration::from_secs(2),
                )
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SET_VRING_BASE, cut inside the header (3), after it (12) or
            // inside the body (17); then the VMM is gone.
            let mut m = raw::header(raw::SET_VRING_BASE, raw::VERSION, 8);
            m.extend_from_slice(&[0u8; 8]);
            let _ = (&raw).write_all(&m[..cut]);
            let _ = raw.shutdown(Shutdown::Both);
            stop.store(true, std::sync::atomic::Ordering::Release);
            t.join().expect("traffic thread")
        });
        // Frames still in flight when the rings stopped never come back;
        // anything else the driver checks (ids, lengths, bytes) must hold.
        if let Err(e) = traffic {
            assert!(e.starts_with("no progress"), "round {round}: {e}");
        }
        drop(vmm);
        let mut q = Qmp::connect_ready(&d.qmp);
        let dev = testkit::qmp::query_until(&mut q, "net0", |dev| match dev["started"] {
            serde_json::Value::Bool(false) => Ok(()),
            _ => Err(format!("still started: {dev}")),
        });
        let mode = if shadow == "on" {
            "shadow"
        } else {
            "passthrough"
        };
        assert_eq!(dev["mode"], mode, "round {round}: {dev}");
        assert_serves(&mut d, 1);
    }
}

#[test]
fn vmm_gone_mid_message_under_traffic_passthrough() {
    vmm_gone_mid_message_under_traffic("off");
}

#[test]
fn vmm_gone_mid_message_under_traffic_shadow() {
    vmm_gone_mid_message_under_traffic("on");
}

/// Framing errors the protocol layer catches: reserved flag bits, a memory
/// table whose fd count does not match its regions, more fds than any
/// message takes, a vring fd message without its fd. Each ends that
/// connection with one error line naming it; the next connection works.
#[test]
fn framing_errors_end_only_their_connection() {
    let mut d = Daemon::spawn(&[]);
    let fds: Vec<_> = (0..33)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    let raw_fds: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // VhostUserMemory {2 regions} + two 32-byte regions.
    let mut table = 2u32.to_le_bytes().to_vec();
    table.extend_from_slice(&[0u8; 4]);
    for gpa in [0u64, 1 << 30] {
        for v in [gpa, 1 << 20, 0x7f00_0000_0000 + gpa, 0] {
            table.extend_from_slice(&v.to_le_bytes());
        }
    }
    /// (what, request, flags, body, fds, what the log line must say)
    type Case<'a> = (&'a str, u32, u32, Vec<u8>, &'a [i32], &'a str);
    let cases: Vec<Case> = vec![
        (
            "reserved flags",
            raw::GET_FEATURES,
            raw::VERSION | 0x100,
            vec![],
            &[],
            "reserved bits",
        ),
        (
            "mem table, 2 regions, 1 fd",
            raw::SET_MEM_TABLE,
            raw::VERSION,
            table,
            &raw_fds[..1],
            "SET_MEM_TABLE: 1 file descriptors attached, expected 2",
        ),
        (
            "33 fds",
            raw::SET_VRING_CALL,
            raw::VERSION,
            0u64.to_le_bytes().to_vec(),
            &raw_fds[..],
            "more than 32",
        ),
        (
            "kick without its fd",
            raw::SET_VRING_KICK,
            raw::VERSION,
            0u64.to_le_bytes().to_vec(),
            &[],
            "SET_VRING_KICK: 0 file descriptors",
        ),
    ];
    for (what, req, flags, body, fds, needle) in cases {
        let s = connect_stream(&d.socket);
        let mut msg = raw::header(req, flags, body.len() as u32);
        msg.extend_from_slice(&body);
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        if fds.is_empty() {
            (&s).write_all(&msg).unwrap();
        } else {
            s.send_with_fds(&[&msg[..]], fds).unwrap();
        }
        assert!(raw::wait_closed(&s), "{what}: connection not closed");
        assert_logged(&d, &["dropping the VMM connection", needle]);
        d.assert_alive();
    }
    assert_serves(&mut d, 1);
}

#[test]
fn set_vring_addr_before_set_mem_table() {
    let mut d = Daemon::spawn(&[]);
    let vmm = Vmm::negotiate(connect_stream(&d.socket), VmmConfig::default());
    vmm.fe.set_vring_num(0, 256).ok();
    let r = vmm.fe.set_vring_addr(0, &vmm.vring_config(0));
    assert!(
        r.is_err(),
        "SET_VRING_ADDR before SET_MEM_TABLE was accepted"
    );
    drop(vmm);
    assert_serves(&mut d, 1);
}

#[test]
fn queue_index_out_of_range() {
    let mut d = Daemon::spawn(&["--queues", "1"]);
    let call = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let cases: Vec<(&str, u32, Vec<u8>, Vec<i32>)> = vec![
        (
            "SET_VRING_NUM 2",
            raw::SET_VRING_NUM,
            raw::vring_state(2, 256),
            vec![],
        ),
        ("SET_VRING_ADDR 2", raw::SET_VRING_ADDR, vec![], vec![]),
        (
            "SET_VRING_BASE 255",
            raw::SET_VRING_BASE,
            raw::vring_state(255, 0),
            vec![],
        ),
        (
            "SET_VRING_ENABLE 7",
            raw::SET_VRING_ENABLE,
            raw::vring_state(7, 1),
            vec![],
        ),
        (
            "SET_VRING_CALL 9",
            raw::SET_VRING_CALL,
            9u64.to_le_bytes().to_vec(),
            vec![call.as_raw_fd()],
        ),
        (
            "SET_VRING_KICK 200",
            raw::SET_VRING_KICK,
            200u64.to_le_bytes().to_vec(),
            vec![call.as_raw_fd()],
        ),
    ];
    for (what, req, mut body, fds) in cases {
        // A fresh connection each time: the daemon may drop the connection
        // after refusing.
        let vmm = Vmm::negotiate(connect_stream(&d.socket), VmmConfig::default());
        vmm.set_mem_table().expect("SET_MEM_TABLE");
        if req == raw::SET_VRING_ADDR {
            // VhostUserVringAddr {index 2, flags, desc, used, avail, log}
            // with queue 0's valid addresses.
            let cfg = vmm.vring_config(0);
            body = raw::vring_state(2, 0)[..4].to_vec();
            body.extend_from_slice(&0u32.to_le_bytes());
            for a in [
                cfg.desc_table_addr,
                cfg.used_ring_addr,
                cfg.avail_ring_addr,
                0,
            ] {
                body.extend_from_slice(&a.to_le_bytes());
            }
        }
        let logged = warn_error_lines(&d);
        let r = raw::request(&vmm.raw, req, &body, &fds);
        assert!(r.is_refusal(), "{what}: {r:?}");
        assert_new_error_logged(&d, logged, what);
        drop(vmm);
        d.assert_alive();
    }
    assert_serves(&mut d, 1);
}

/// Sets up queue 0 of a fresh connection with `patch` applied to its ring
/// addresses: the daemon must refuse at some step, or report the queue
/// broken (or erroring) in query-shadow-vq.
fn bad_ring_addr(d: &mut Daemon, shadow: bool, patch: impl Fn(&mut vhost::VringConfigData, u64)) {
    let mut vmm = Vmm::negotiate(connect_stream(&d.socket), VmmConfig::default());
    vmm.set_mem_table().expect("SET_MEM_TABLE");
    let mut cfg = vmm.vring_config(0);
    let base = vmm.mem.vmm_addr(vm_memory::GuestAddress(0));
    patch(&mut cfg, base + vmm.mem.size);
    let logged = warn_error_lines(d);
    let fe = &mut vmm.fe;
    let q0 = &vmm.pairs[0].rx;
    let refused = fe.set_vring_num(0, 256).is_err()
        || fe.set_vring_addr(0, &cfg).is_err()
        || fe.set_vring_base(0, 0).is_err()
        || fe.set_vring_call(0, &q0.call).is_err()
        || fe.set_vring_kick(0, &q0.kick).is_err()
        || fe.set_vring_enable(0, true).is_err();
    if !refused {
        if shadow {
            // The TX queue too, so the device counts as started.
            vmm.setup_queue(1).ok();
        }
        let mut q = Qmp::connect_ready(&d.qmp);
        testkit::qmp::query_until(&mut q, "net0", |dev| {
            let qi = testkit::qmp::queue_info(dev, 0);
            if qi["broken"].is_null() && testkit::qmp::u64_field(qi, "errors") == 0 {
                return Err("ring outside guest memory accepted and not reported".into());
            }
            Ok(())
        });
    }
    assert_new_error_logged(d, logged, "ring outside guest memory");
    drop(vmm);
    d.assert_alive();
}

fn rings_outside_guest_memory(shadow: &str) {
    let mut d = Daemon::spawn(&["--shadow", shadow]);
    let on = shadow == "on";
    bad_ring_addr(&mut d, on, |c, end| c.desc_table_addr = end + 0x1000);
    bad_ring_addr(&mut d, on, |c, end| c.used_ring_addr = end + 0x10_0000);
    bad_ring_addr(&mut d, on, |c, end| c.avail_ring_addr = end - 2); // straddles the end
    bad_ring_addr(&mut d, on, |c, end| c.desc_table_addr = end - 16); // 256 descs do not fit
    bad_ring_addr(&mut d, on, |c, _| c.desc_table_addr = u64::MAX - 15); // wraps around
    assert_serves(&mut d, 1);
}

#[test]
fn rings_outside_guest_memory_passthrough() {
    rings_outside_guest_memory("off");
}

#[test]
fn rings_outside_guest_memory_shadow() {
    rings_outside_guest_memory("on");
}

/// Breaks pair 1's TX ring with `corrupt` (descriptors and avail ring
/// written raw), checks pair 0 keeps working, QMP answers, the queue is
/// reported broken (shadow) and the error logged, and a new connection works
/// on all queues.
fn broken_guest_ring(shadow: &str, corrupt: fn(&mut SplitRing, u64)) {
    let mut d = Daemon::spawn(&["--shadow", shadow, "--queues", "2"]);
    let cfg = VmmConfig {
        pairs: 2,
        driver: DriverOpts {
            indirect: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut vmm = Vmm::start(&d.socket, cfg);
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap_or_else(|e| panic!("warm-up: {e}"));
    let mem_size = vmm.mem.size;
    {
        let tx = &mut vmm.pairs[1].tx;
        // Everything completed, so every descriptor is free.
        assert_eq!(tx.ring.num_inflight(), 0);
        corrupt(&mut tx.ring, mem_size);
        tx.kick();
    }
    // Pair 0 is unaffected.
    pump(&mut vmm.pairs[..1], Until::Frames(400))
        .unwrap_or_else(|e| panic!("pair 0 after pair 1 broke: {e}"));
    let mut q = Qmp::connect_ready(&d.qmp);
    let dev = if shadow == "on" {
        let dev = testkit::qmp::query_until(&mut q, "net0", |dev| {
            if testkit::qmp::queue_info(dev, 3)["broken"].is_null() {
                return Err("shadow: the bad chain on queue 3 must break it".into());
            }
            Ok(())
        });
        let q0 = testkit::qmp::queue_info(&dev, 1);
        assert!(q0["broken"].is_null(), "queue 1 must stay healthy: {dev}");
        dev
    } else {
        q.query("net0")
    };
    eprintln!("view after the bad chain: {dev}");
    // Either way the daemon says what happened to which queue.
    assert_logged(&d, &["queue 3"]);
    drop(vmm);
    assert_serves(&mut d, 2);
}

/// Offers descriptor 0 as the next chain.
fn offer_head0(r: &mut SplitRing) {
    r.push_avail_raw(0);
    r.publish();
}

fn buf_of(r: &SplitRing) -> u64 {
    r.desc.0 + 0x10_0000
}

fn descriptor_loop(r: &mut SplitRing, _mem_size: u64) {
    let buf = buf_of(r);
    r.write_desc(0, buf, 64, DESC_F_NEXT, 1);
    r.write_desc(1, buf + 64, 64, DESC_F_NEXT, 0);
    offer_head0(r);
}

fn descriptor_outside_memory(r: &mut SplitRing, mem_size: u64) {
    r.write_desc(0, mem_size + 0x1000, 100, 0, 0);
    offer_head0(r);
}

fn descriptor_next_out_of_range(r: &mut SplitRing, _mem_size: u64) {
    r.write_desc(0, buf_of(r), 64, DESC_F_NEXT, 4000);
    offer_head0(r);
}

fn descriptor_length_past_the_end(r: &mut SplitRing, _mem_size: u64) {
    r.write_desc(0, buf_of(r), 0xffff_f000, 0, 0);
    offer_head0(r);
}

fn avail_index_runs_ahead(r: &mut SplitRing, _mem_size: u64) {
    // More new entries than the ring has slots.
    for _ in 0..r.size as u32 + 5 {
        r.push_avail_raw(0);
    }
    r.write_desc(0, buf_of(r), 64, 0, 0);
    r.publish();
}

fn head_index_out_of_range(r: &mut SplitRing, _mem_size: u64) {
    r.push_avail_raw(r.size + 3);
    r.publish();
}

fn indirect_table_bad_length(r: &mut SplitRing, _mem_size: u64) {
    let table = buf_of(r);
    r.write_desc(0, table, 20, DESC_F_INDIRECT, 0);
    offer_head0(r);
}

fn indirect_table_outside_memory(r: &mut SplitRing, mem_size: u64) {
    r.write_desc(0, mem_size - 16, 64, DESC_F_INDIRECT, 0);
    offer_head0(r);
}

fn nested_indirect(r: &mut SplitRing, _mem_size: u64) {
    let table = buf_of(r);
    // The table's only entry is itself an INDIRECT descriptor.
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&(table + 0x1000).to_le_bytes());
    raw[8..12].copy_from_slice(&32u32.to_le_bytes());
    raw[12..14].copy_from_slice(&DESC_F_INDIRECT.to_le_bytes());
    r.mem()
        .write_slice(&raw, vm_memory::GuestAddress(table))
        .unwrap();
    r.write_desc(0, table, 16, DESC_F_INDIRECT, 0);
    offer_head0(r);
}

fn indirect_loop(r: &mut SplitRing, _mem_size: u64) {
    let table = buf_of(r);
    let data = table + 0x1000;
    for (i, next) in [(0u64, 1u16), (1, 0)] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&(data + 64 * i).to_le_bytes());
        raw[8..12].copy_from_slice(&64u32.to_le_bytes());
        raw[12..14].copy_from_slice(&DESC_F_NEXT.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        r.mem()
            .write_slice(&raw, vm_memory::GuestAddress(table + 16 * i))
            .unwrap();
    }
    r.write_desc(0, table, 32, DESC_F_INDIRECT, 0);
    offer_head0(r);
}

#[test]
fn descriptor_loop_passthrough() {
    broken_guest_ring("off", descriptor_loop);
}

#[test]
fn descriptor_loop_shadow() {
    broken_guest_ring("on", descriptor_loop);
}

#[test]
fn descriptor_outside_memory_shadow() {
    broken_guest_ring("on", descriptor_outside_memory);
}

#[test]
fn descriptor_next_out_of_range_shadow() {
    broken_guest_ring("on", descriptor_next_out_of_range);
}

#[test]
fn ring_larger_than_queue_size_is_refused() {
    let mut d = Daemon::spawn(&["--queue-size", "128"]);
    let cfg = VmmConfig {
        ring_size: 256,
        ..Default::default()
    };
    let vmm = Vmm::negotiate(connect_stream(&d.socket), cfg);
    vmm.set_mem_table().expect("SET_MEM_TABLE");
    let logged = warn_error_lines(&d);
    let r = vmm.fe.set_vring_num(0, 256);
    assert!(
        r.is_err(),
        "SET_VRING_NUM 256 accepted with --queue-size 128"
    );
    assert_new_error_logged(&d, logged, "ring larger than --queue-size");
    drop(vmm);
    // Not a power of two.
    let vmm = Vmm::negotiate(connect_stream(&d.socket), VmmConfig::default());
    let r = vmm.fe.set_vring_num(0, 100);
    assert!(r.is_err(), "SET_VRING_NUM 100 accepted");
    drop(vmm);
    // A ring of exactly --queue-size works.
    let cfg = VmmConfig {
        ring_size: 128,
        ..Default::default()
    };
    let mut vmm = Vmm::start(&d.socket, cfg);
    pump(&mut vmm.pairs, Until::Frames(300)).unwrap_or_else(|e| panic!("ring of 128: {e}"));
    vmm.check_final_bases();
    d.assert_alive();
}

#[test]
fn descriptor_length_past_the_end_shadow() {
    broken_guest_ring("on", descriptor_length_past_the_end);
}

#[test]
fn avail_index_runs_ahead_shadow() {
    broken_guest_ring("on", avail_index_runs_ahead);
}

#[test]
fn avail_index_runs_ahead_passthrough() {
    broken_guest_ring("off", avail_index_runs_ahead);
}

#[test]
fn head_index_out_of_range_shadow() {
    broken_guest_ring("on", head_index_out_of_range);
}

#[test]
fn indirect_table_bad_length_shadow() {
    broken_guest_ring("on", indirect_table_bad_length);
}

#[test]
fn indirect_table_outside_memory_shadow() {
    broken_guest_ring("on", indirect_table_outside_memory);
}

#[test]
fn nested_indirect_shadow() {
    broken_guest_ring("on", nested_indirect);
}

#[test]
fn indirect_loop_shadow() {
    broken_guest_ring("on", indirect_loop);
}

#[test]
fn indirect_loop_passthrough() {
    broken_guest_ring("off", indirect_loop);
}

/// An RX "buffer" the device may only read: the frame must not be written
/// into it (the queue breaks instead), and its bytes stay as they were.
fn read_only_rx_buffer(shadow: &str, require_log: bool) {
    let mut d = Daemon::spawn(&["--shadow", shadow, "--queues", "2"]);
    let cfg = VmmConfig {
        pairs: 2,
        ring_size: 64,
        ..Default::default()
    };
    let mut vmm = Vmm::negotiate(connect_stream(&d.socket), cfg);
    vmm.set_mem_table().unwrap();
    // Pair 1's RX ring gets one read-only buffer and nothing else.
    let ro = vm_memory::GuestAddress(vmm.pairs[1].rx.ring.desc.0 + 0x10_0000);
    vmm.mem.mem.write_slice(&[0xab; 2048], ro).unwrap();
    {
        let rx = &mut vmm.pairs[1].rx.ring;
        rx.write_desc(0, ro.0, 2048, 0, 0);
        rx.push_avail_raw(0);
        rx.publish();
    }
    for q in [0, 1] {
        vmm.setup_queue(q).unwrap();
    }
    for q in [2, 3] {
        vmm.restart_queue(q, 0).unwrap();
    }
    // One frame on pair 1 (its RX ring holds only the read-only buffer).
    let p1 = &mut vmm.pairs[1];
    p1.force_window(1);
    assert_eq!(p1.send(1), 1);
    pump(&mut vmm.pairs[..1], Until::Frames(300)).unwrap_or_else(|e| panic!("pair 0: {e}"));
    let mut back = vec![0u8; 2048];
    vmm.mem.mem.read_slice(&mut back, ro).unwrap();
    assert!(
        back.iter().all(|&b| b == 0xab),
        "the device wrote into a read-only RX buffer"
    );
    assert_eq!(
        vmm.pairs[1].rx.ring.device_used_idx(),
        0,
        "read-only RX buffer completed"
    );
    if require_log {
        assert_logged(&d, &["queue 2"]);
    }
    if shadow == "on" {
        // The relay catches it itself: the queue is reported broken whatever
        // the device behind it would have done.
        let mut q = Qmp::connect_ready(&d.qmp);
        testkit::qmp::query_until(&mut q, "net0", |dev| {
            if testkit::qmp::queue_info(dev, 2)["broken"].is_null() {
                return Err("shadow: a read-only RX chain must break queue 2".into());
            }
            Ok(())
        });
    }
    drop(vmm);
    assert_serves(&mut d, 2);
}

#[test]
fn read_only_rx_buffer_shadow() {
    read_only_rx_buffer("on", false);
}

#[test]
fn read_only_rx_buffer_passthrough() {
    read_only_rx_buffer("off", false);
}

#[test]
fn read_only_rx_buffer_is_logged() {
    read_only_rx_buffer("on", true);
}
