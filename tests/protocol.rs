//! The vhost-user protocol layer as real frontends drive it: QEMU's message
//! order (rings enabled before SET_FEATURES, GET_QUEUE_NUM before
//! SET_PROTOCOL_FEATURES), the STATUS protocol feature (QEMU 7.2 resets
//! with SET_STATUS(0) before GET_VRING_BASE), and requests the daemon does
//! not implement, which are refused without losing the connection.

use testkit::raw::{self, Reply};
use testkit::vmm::connect_stream;
use testkit::{pump, Daemon, Qmp, Until, Vmm, VmmConfig};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::VhostBackend;

fn u64b(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
const DRIVER_OK: u64 = 15;

fn started(q: &mut Qmp) -> bool {
    q.query("net0")["started"] == true
}

/// QEMU's handshake up to (not including) SET_FEATURES, then the rings of
/// pair 0 enabled as virtio-net's peer_attach does.
fn qemu_preamble(d: &Daemon, proto: u64) -> std::os::unix::net::UnixStream {
    let s = connect_stream(&d.socket);
    raw::send_plain(&s, raw::SET_OWNER, &[]).unwrap();
    let features = raw::request(&s, raw::GET_FEATURES, &[], &[]);
    assert!(
        features.u64().is_some_and(|f| f & (1 << 30) != 0),
        "{features:?}"
    );
    let offered = raw::request(&s, raw::GET_PROTOCOL_FEATURES, &[], &[])
        .u64()
        .expect("GET_PROTOCOL_FEATURES");
    assert_eq!(offered & proto, proto, "offered {offered:#x}");
    assert_eq!(
        offered & VhostUserProtocolFeatures::CONFIG.bits(),
        0,
        "CONFIG must not be offered"
    );
    raw::send_plain(&s, raw::SET_PROTOCOL_FEATURES, &u64b(proto)).unwrap();
    let n = raw::request(&s, raw::GET_QUEUE_NUM, &[], &[]);
    assert_eq!(n.u64(), Some(2), "GET_QUEUE_NUM: {n:?}");
    for q in 0..2 {
        let r = raw::request(&s, raw::SET_VRING_ENABLE, &raw::vring_state(q, 1), &[]);
        assert_eq!(
            r.u64(),
            Some(0),
            "SET_VRING_ENABLE {q} before SET_FEATURES: {r:?}"
        );
    }
    s
}

#[test]
fn qemu_order_and_status_start_and_reset() {
    for shadow in ["off", "on"] {
        let d = Daemon::spawn(&["--shadow", shadow]);
        let mut q = Qmp::connect_ready(&d.qmp);
        let proto = (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::STATUS)
            .bits();
        let s = qemu_preamble(&d, proto);
        let mut vmm = Vmm::start_on(
            s.try_clone().unwrap(),
            VmmConfig::default(),
            VhostUserProtocolFeatures::STATUS,
        );
        // With STATUS negotiated the rings wait for DRIVER_OK.
        assert!(!started(&mut q), "{shadow}: rings started before DRIVER_OK");
        let st = raw::request(&s, raw::GET_STATUS, &[], &[]);
        assert_eq!(st.u64(), Some(0), "GET_STATUS: {st:?}");
        let r = raw::request(&s, raw::SET_STATUS, &u64b(DRIVER_OK), &[]);
        assert_eq!(r.u64(), Some(0), "SET_STATUS: {r:?}");
        assert_eq!(
            raw::request(&s, raw::GET_STATUS, &[], &[]).u64(),
            Some(DRIVER_OK)
        );
        assert!(
            started(&mut q),
            "{shadow}: DRIVER_OK did not start the rings"
        );
        pump(&mut vmm.pairs, Until::Frames(300)).unwrap();
        // QEMU 7.2's stop: SET_STATUS(0) first, then GET_VRING_BASE, which
        // must still report where the rings were.
        let r = raw::request(&s, raw::SET_STATUS, &u64b(0), &[]);
        assert_eq!(r.u64(), Some(0));
        assert!(
            !started(&mut q),
            "{shadow}: SET_STATUS(0) left rings running"
        );
        let tx = vmm.get_vring_base(1);
        let rx = vmm.get_vring_base(0);
        assert_eq!(
            tx as u16, vmm.pairs[0].tx.ring.avail_idx,
            "{shadow}: TX base"
        );
        assert_eq!(
            rx as u16, vmm.pairs[0].rx.ring.last_used,
            "{shadow}: RX base"
        );
        // And the device restarts from there at the next DRIVER_OK.
        vmm.restart_queue(0, rx as u16).unwrap();
        vmm.restart_queue(1, tx as u16).unwrap();
        assert!(!started(&mut q));
        let r = raw::request(&s, raw::SET_STATUS, &u64b(DRIVER_OK), &[]);
        assert_eq!(r.u64(), Some(0));
        pump(&mut vmm.pairs, Until::Frames(600)).unwrap();
        vmm.check_final_bases();
    }
}

#[test]
fn unsupported_requests_are_refused_and_the_connection_goes_on() {
    let d = Daemon::spawn(&[]);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    pump(&mut vmm.pairs, Until::Frames(50)).unwrap();
    let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    use std::os::unix::io::AsRawFd;
    let r = raw::request(&vmm.raw, raw::SET_LOG_FD, &[], &[ev.as_raw_fd()]);
    assert!(matches!(r.u64(), Some(v) if v != 0), "SET_LOG_FD: {r:?}");
    let r = raw::request(&vmm.raw, 99, &[1, 2, 3], &[]);
    assert!(matches!(r.u64(), Some(v) if v != 0), "request 99: {r:?}");
    // STATUS was not negotiated on this connection: refused, not dropped.
    let r = raw::request(&vmm.raw, raw::GET_STATUS, &[], &[]);
    assert_eq!(r, Reply::Msg(Vec::new()), "GET_STATUS without STATUS");
    let r = raw::request(&vmm.raw, raw::RESET_DEVICE, &[], &[]);
    assert!(r.is_refusal(), "RESET_DEVICE without RESET_DEVICE: {r:?}");
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
    let log = d.stderr();
    for name in [
        "SET_LOG_FD is not supported",
        "request 99 is not supported",
        "GET_STATUS needs",
    ] {
        assert!(log.contains(name), "no log line naming {name:?}:\n{log}");
    }
    assert!(!log.contains("dropping the VMM connection"), "{log}");
}

/// Repeated SET_FEATURES (LOG_ALL on and off, as QEMU does around a
/// migration) and a repeated SET_MEM_TABLE while rings run.
#[test]
fn repeated_features_and_mem_table_while_running() {
    for shadow in ["off", "on"] {
        let d = Daemon::spawn(&["--shadow", shadow]);
        let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
        pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
        for round in 0..3u32 {
            vmm.fe.set_features(vmm.acked).expect("SET_FEATURES again");
            vmm.set_mem_table().expect("SET_MEM_TABLE again");
            pump(&mut vmm.pairs, Until::Frames(200 + 100 * round))
                .unwrap_or_else(|e| panic!("{shadow} round {round}: {e}"));
        }
        vmm.check_final_bases();
    }
}

/// RESET_DEVICE (QEMU 10 sends it when it initialises the device) resets
/// the rings and the status but not the connection: STATUS stays
/// negotiated, so after the reset the rings again wait for DRIVER_OK.
#[test]
fn reset_device_keeps_the_connection_state() {
    let d = Daemon::spawn(&[]);
    let mut q = Qmp::connect_ready(&d.qmp);
    let extra = VhostUserProtocolFeatures::STATUS | VhostUserProtocolFeatures::RESET_DEVICE;
    let mut vmm = Vmm::start_with(&d.socket, VmmConfig::default(), extra);
    let s = vmm.raw.try_clone().unwrap();
    assert_eq!(
        raw::request(&s, raw::SET_STATUS, &u64b(DRIVER_OK), &[]).u64(),
        Some(0)
    );
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
    let r = raw::request(&s, raw::RESET_DEVICE, &[], &[]);
    assert_eq!(r.u64(), Some(0), "RESET_DEVICE: {r:?}");
    assert!(!started(&mut q), "rings still running after RESET_DEVICE");
    assert_eq!(raw::request(&s, raw::GET_STATUS, &[], &[]).u64(), Some(0));
    // The frontend initialises the device again, same rings, same memory.
    vmm.fe.set_features(vmm.acked).unwrap();
    for qi in 0..2 {
        let base = if qi == 0 {
            vmm.pairs[0].rx.ring.last_used
        } else {
            vmm.pairs[0].tx.ring.avail_idx
        };
        vmm.restart_queue(qi, base).unwrap();
    }
    assert!(
        !started(&mut q),
        "rings started before DRIVER_OK after the reset"
    );
    assert_eq!(
        raw::request(&s, raw::SET_STATUS, &u64b(DRIVER_OK), &[]).u64(),
        Some(0)
    );
    pump(&mut vmm.pairs, Until::Frames(300)).unwrap();
    vmm.check_final_bases();
}
