//! The QMP server: framing, capabilities negotiation, errors (the connection
//! stays usable after each), several clients, events.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::{Daemon, Qmp, Vmm, VmmConfig};

fn error_of(r: &Value) -> (String, String) {
    let e = r
        .get("error")
        .unwrap_or_else(|| panic!("expected an error response, got {r}"));
    (
        e["class"].as_str().unwrap_or_default().to_string(),
        e["desc"].as_str().unwrap_or_default().to_string(),
    )
}

/// A command that must still work: the connection is usable.
fn assert_usable(q: &mut Qmp) {
    let r = q.execute("query-shadow-vq", None);
    assert!(
        r["return"].is_array(),
        "connection not usable after an error: {r}"
    );
}

#[test]
fn greeting_and_capabilities_negotiation() {
    let d = Daemon::spawn(&[]);
    let mut q = Qmp::connect(&d.qmp);
    let g = &q.greeting["QMP"];
    assert!(g["version"]["qemu"]["major"].is_u64(), "{}", q.greeting);
    assert!(g["version"]["qemu"]["minor"].is_u64(), "{}", q.greeting);
    assert!(g["version"]["qemu"]["micro"].is_u64(), "{}", q.greeting);
    assert!(
        g["version"]["package"]
            .as_str()
            .unwrap_or("")
            .contains("svq-relay"),
        "{}",
        q.greeting
    );
    assert_eq!(g["capabilities"], json!([]), "{}", q.greeting);

    // Nothing but qmp_capabilities before negotiation.
    let r = q.execute("query-shadow-vq", None);
    let (class, desc) = error_of(&r);
    assert_eq!(class, "CommandNotFound", "{r}");
    assert!(desc.contains("qmp_capabilities"), "{r}");

    assert_eq!(q.execute("qmp_capabilities", None), json!({"return": {}}));
    let r = q.execute_ok("query-shadow-vq", None);
    let dev = &r[0];
    assert_eq!(dev["name"], "net0", "{r}");
    assert_eq!(dev["started"], false, "no VMM yet: {r}");
    assert_eq!(dev["backend"], "sim", "{r}");

    // "id" is echoed.
    q.send_raw(b"{\"execute\": \"query-shadow-vq\", \"id\": \"abc-1\"}\r\n");
    let r = q.read_response();
    assert_eq!(r["id"], "abc-1", "{r}");
    assert!(r["return"].is_array(), "{r}");
    q.send_raw(b"{\"execute\": \"nope\", \"id\": 7}\r\n");
    let r = q.read_response();
    assert_eq!(r["id"], 7, "{r}");
    assert!(r.get("error").is_some(), "{r}");
}

#[test]
fn errors_leave_the_connection_usable() {
    let d = Daemon::spawn(&["--name", "eth7"]);
    let mut q = Qmp::connect_ready(&d.qmp);

    let r = q.enable_shadow("net0", true);
    let (class, desc) = error_of(&r);
    assert_eq!(class, "DeviceNotFound", "{r}");
    assert_eq!(desc, "Device 'net0' not found", "{r}");
    assert_usable(&mut q);

    let r = q.enable_shadow("eth7", true);
    let (class, desc) = error_of(&r);
    assert_eq!(class, "GenericError", "{r}");
    assert_eq!(desc, "Device is not started", "{r}");
    assert_usable(&mut q);

    let r = q.execute("foo", None);
    let (class, desc) = error_of(&r);
    assert_eq!(class, "CommandNotFound", "{r}");
    assert_eq!(desc, "The command foo has not been found", "{r}");
    assert_usable(&mut q);

    q.send_raw(b"{\"execute\": \"query-shadow-vq\"\r\n");
    let r = q.read_response();
    let (class, desc) = error_of(&r);
    assert_eq!(class, "GenericError", "{r}");
    assert!(desc.starts_with("JSON parse error"), "{r}");
    assert_usable(&mut q);

    q.send_raw(b"this is not json at all\r\n");
    let r = q.read_response();
    let (_, desc) = error_of(&r);
    assert!(desc.starts_with("JSON parse error"), "{r}");
    assert_usable(&mut q);

    // Valid JSON that is not a command.
    q.send_raw(b"[1, 2, 3]\r\n");
    error_of(&q.read_response());
    assert_usable(&mut q);
    q.send_raw(b"{\"hello\": 1}\r\n");
    error_of(&q.read_response());
    assert_usable(&mut q);

    for (args, param, what) in [
        (json!({"name": "eth7"}), "enable", "is missing"),
        (json!({"enable": true}), "name", "is missing"),
        (
            json!({"name": "eth7", "enable": "yes"}),
            "enable",
            "boolean",
        ),
        (json!({"name": 5, "enable": true}), "name", "string"),
    ] {
        let r = q.execute("enable-shadow-vq", Some(args.clone()));
        let (class, desc) = error_of(&r);
        assert_eq!(class, "GenericError", "{args}: {r}");
        assert!(desc.contains(&format!("'{param}'")), "{args}: {r}");
        assert!(desc.contains(what), "{args}: {r}");
        assert_usable(&mut q);
    }
    let r = q.execute("enable-shadow-vq", Some(json!("not an object")));
    error_of(&r);
    assert_usable(&mut q);
    let r = q.execute("enable-shadow-vq", None);
    let (_, desc) = error_of(&r);
    assert!(desc.contains("'name'") || desc.contains("'enable'"), "{r}");
    assert_usable(&mut q);
}

#[test]
fn two_clients_and_mode_change_events() {
    let d = Daemon::spawn(&["--shadow", "off"]);
    let mut a = Qmp::connect_ready(&d.qmp);
    let mut b = Qmp::connect_ready(&d.qmp);
    // A third client that never negotiates must not get events nor block others.
    let mut c = Qmp::connect(&d.qmp);

    let r = a.enable_shadow("net0", true);
    assert_eq!(error_of(&r).1, "Device is not started", "{r}");

    let vmm = Vmm::start(&d.socket, VmmConfig::default());
    let dev = b.query("net0");
    assert_eq!(dev["started"], true, "{dev}");
    assert_eq!(dev["mode"], "passthrough", "{dev}");

    assert_eq!(a.enable_shadow("net0", true), json!({"return": {}}));
    for q in [&mut a, &mut b] {
        let e = q
            .wait_event("SHADOW_VQ_CHANGED", Duration::from_secs(10))
            .expect("SHADOW_VQ_CHANGED after enabling");
        assert_eq!(e["data"], json!({"name": "net0", "enabled": true}), "{e}");
        assert!(e["timestamp"]["seconds"].is_u64(), "{e}");
        assert!(e["timestamp"]["microseconds"].is_u64(), "{e}");
    }
    assert_eq!(b.query("net0")["mode"], "shadow");

    // The alias, from the other client.
    let r = b.execute(
        "x-vhost-enable-shadow-vq",
        Some(json!({"name": "net0", "enable": false})),
    );
    assert_eq!(r, json!({"return": {}}));
    for q in [&mut a, &mut b] {
        let e = q
            .wait_event("SHADOW_VQ_CHANGED", Duration::from_secs(10))
            .expect("SHADOW_VQ_CHANGED after disabling");
        assert_eq!(e["data"], json!({"name": "net0", "enabled": false}), "{e}");
    }
    assert_eq!(a.query("net0")["mode"], "passthrough");

    // The un-negotiated client got no event and still gets the negotiation error.
    let r = c.execute("query-shadow-vq", None);
    assert_eq!(error_of(&r).0, "CommandNotFound", "{r}");
    assert!(c.take_events().is_empty());
    drop(vmm);
}

#[test]
fn client_disconnect_midline_does_not_hurt_others() {
    let d = Daemon::spawn(&[]);
    let mut a = Qmp::connect_ready(&d.qmp);
    {
        let mut b = Qmp::connect_ready(&d.qmp);
        b.send_raw(b"{\"execute\": \"query-sha");
    }
    assert_usable(&mut a);
    let mut c = Qmp::connect_ready(&d.qmp);
    assert_usable(&mut c);
}

#[test]
fn overlong_line_gets_an_error_and_the_connection_stays_usable() {
    let d = Daemon::spawn(&[]);
    let mut q = Qmp::connect_ready(&d.qmp);
    let mut long = b"{\"execute\": \"".to_vec();
    long.extend(std::iter::repeat_n(b'x', 100_000));
    long.extend_from_slice(b"\"}\r\n");
    q.send_raw(&long);
    error_of(&q.read_response());
    assert_usable(&mut q);
}

/// A client that sends commands and never reads the answers must not stall
/// the daemon: other clients get answers and a VMM can still connect.
#[test]
fn a_client_that_never_reads_does_not_stall_others() {
    let d = Daemon::spawn(&[]);
    let hog = Qmp::connect_ready(&d.qmp);
    // Several MB of answers nobody reads. Written from a thread because the
    // daemon may (rightly) stop reading from this client.
    let mut w = hog.writer_clone();
    let flood = std::thread::spawn(move || {
        use std::io::Write;
        let line = b"{\"execute\": \"query-shadow-vq\"}\r\n".repeat(100);
        for _ in 0..100 {
            if w.write_all(&line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut a = Qmp::connect_ready(&d.qmp);
    assert_usable(&mut a);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    testkit::pump(&mut vmm.pairs, testkit::Until::Frames(100)).unwrap();
    assert_eq!(a.enable_shadow("net0", true), json!({"return": {}}));
    assert_usable(&mut a);
    drop(hog);
    let _ = flood.join();
    assert_usable(&mut a);
}

#[test]
fn many_clients() {
    let d = Daemon::spawn(&[]);
    let mut clients: Vec<Qmp> = (0..20).map(|_| Qmp::connect_ready(&d.qmp)).collect();
    for c in clients.iter_mut().rev() {
        assert_usable(c);
    }
}
