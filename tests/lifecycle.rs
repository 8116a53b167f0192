//! Process lifecycle: capabilities, argument errors, socket permissions,
//! signals, VMM reconnects, --client and --fd modes.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::daemon::{self, bin, tempdir, wait_for_socket, wait_timeout};
use testkit::vmm::IO_TIMEOUT;
use testkit::{pump, Daemon, Qmp, Until, Vmm, VmmConfig};

#[test]
fn print_capabilities() {
    let out = Command::new(bin())
        .arg("--print-capabilities")
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("capabilities are JSON");
    assert_eq!(v["type"], "net", "{v}");
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    let dir = tempdir();
    let sock = dir.path().join("s.sock").display().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--socket-path", &sock, "--queues", "0"],
        vec!["--socket-path", &sock, "--queues", "17"],
        vec!["--socket-path", &sock, "--queues", "two"],
        vec!["--socket-path", &sock, "--queue-size", "100"],
        vec!["--socket-path", &sock, "--queue-size", "65536"],
        vec!["--socket-path", &sock, "--shadow", "maybe"],
        vec![
            "--socket-path",
            &sock,
            "--backend",
            "vdpa:/dev/vhost-vdpa-0",
        ],
        vec![
            "--socket-path",
            &sock,
            "--backend",
            "vhost-user:/tmp/x.sock",
        ],
        vec!["--socket-path", &sock, "--backend", "bogus"],
        vec!["--socket-path", &sock, "--fd", "3"],
        vec!["--client", "--fd", "3"],
        vec!["--socket-path", &sock, "--log-level", "loud"],
        vec!["--socket-path", &sock, "--frobnicate"],
        vec!["--socket-path", "/nonexistent-dir/x/y.sock"],
    ];
    for args in cases {
        let mut child = Command::new(bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let st = wait_timeout(&mut child, Duration::from_secs(10));
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?}: did not exit");
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: status {:?}, stderr {err:?}",
            out.status
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err:?}"
        );
        assert!(err.starts_with("svq-relay: error: "), "{args:?}: {err:?}");
    }
}

#[test]
fn sockets_are_private() {
    let d = Daemon::spawn(&[]);
    for p in [&d.socket, &d.qmp] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempdir();
    let sock = dir.path().join("vu.sock");
    let qmp = dir.path().join("qmp.sock");
    // A left-over socket from a dead process.
    drop(UnixListener::bind(&sock).unwrap());
    drop(UnixListener::bind(&qmp).unwrap());
    let args: Vec<String> = vec![
        "--socket-path".into(),
        sock.display().to_string(),
        "--qmp".into(),
        qmp.display().to_string(),
    ];
    let mut d = Daemon::spawn_custom(dir, &args);
    // The stale files exist already, so wait for the daemon to answer.
    let deadline = Instant::now() + daemon::STARTUP_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&qmp).is_err() {
        d.assert_alive();
        assert!(Instant::now() < deadline, "QMP socket never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
}

fn signal_exits_cleanly(sig: libc::c_int) {
    let mut d = Daemon::spawn(&["--shadow", "on"]);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
    let _q = Qmp::connect_ready(&d.qmp);
    daemon::signal(d.pid(), sig);
    let mut child = d.child.take().unwrap();
    let st = wait_timeout(&mut child, Duration::from_secs(10));
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let st = st.unwrap_or_else(|| {
        panic!(
            "no exit within 10s of signal {sig}; stderr:\n{}",
            d.stderr()
        )
    });
    assert_eq!(
        st.code(),
        Some(0),
        "signal {sig}: {st:?}; stderr:\n{}",
        d.stderr()
    );
    assert!(!d.socket.exists(), "vhost-user socket not removed");
    assert!(!d.qmp.exists(), "QMP socket not removed");
}

#[test]
fn sigterm_exits_0_and_removes_sockets() {
    signal_exits_cleanly(libc::SIGTERM);
}

#[test]
fn sigint_exits_0_and_removes_sockets() {
    signal_exits_cleanly(libc::SIGINT);
}

fn reconnect(shadow: &str) {
    let mut d = Daemon::spawn(&["--shadow", shadow, "--queues", "2"]);
    for round in 0..3 {
        let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(2));
        pump(&mut vmm.pairs, Until::Frames(300)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        if round == 1 {
            // Leave frames in flight and vanish without GET_VRING_BASE.
            vmm.pairs[0].send(50);
        } else {
            vmm.check_final_bases();
        }
        drop(vmm);
        d.assert_alive();
    }
    let mut q = Qmp::connect_ready(&d.qmp);
    q.query("net0");
}

#[test]
fn vmm_reconnect_passthrough() {
    reconnect("off");
}

#[test]
fn vmm_reconnect_shadow() {
    reconnect("on");
}

#[test]
fn vmm_reconnect_after_switching_to_shadow() {
    let d = Daemon::spawn(&["--shadow", "off"]);
    let mut q = Qmp::connect_ready(&d.qmp);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
    assert_eq!(
        q.enable_shadow("net0", true),
        serde_json::json!({"return": {}})
    );
    pump(&mut vmm.pairs, Until::Frames(200)).unwrap();
    drop(vmm);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    pump(&mut vmm.pairs, Until::Frames(200)).unwrap();
    vmm.check_final_bases();
}

/// Accepts one connection on `l` within `timeout`.
fn accept_within(l: &UnixListener, timeout: Duration) -> Option<std::os::unix::net::UnixStream> {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                return Some(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

#[test]
fn client_mode_connects_and_reconnects() {
    let dir = tempdir();
    let sock = dir.path().join("vu.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let args: Vec<String> = vec![
        "--socket-path".into(),
        sock.display().to_string(),
        "--client".into(),
        "--qmp".into(),
        qmp.display().to_string(),
    ];
    let mut d = Daemon::spawn_custom(dir, &args);
    for round in 0..2 {
        let s = accept_within(&listener, Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "round {round}: daemon did not connect; stderr:\n{}",
                d.stderr()
            )
        });
        let mut vmm = Vmm::negotiate(s, VmmConfig::default());
        vmm.set_mem_table().unwrap();
        for q in 0..2 {
            vmm.setup_queue(q).unwrap();
        }
        pump(&mut vmm.pairs, Until::Frames(200)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        vmm.check_final_bases();
        // The VMM goes away; the daemon must come back.
        drop(vmm);
        d.assert_alive();
    }
    assert!(wait_for_socket(&qmp, Duration::from_secs(1)));
}

#[test]
fn inherited_listening_fd() {
    let dir = tempdir();
    let sock = dir.path().join("vu.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(bin());
    cmd.args(["--fd", "3", "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only calls
    // dup2/fcntl, which are async-signal-safe; `fd` is open in the parent
    // (the listener outlives the spawn) and hence in the child.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps FD_CLOEXEC, so clear it explicitly.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn with --fd");
    drop(listener);
    let r = std::panic::catch_unwind(|| {
        let mut vmm = Vmm::start(&sock, VmmConfig::default());
        pump(&mut vmm.pairs, Until::Frames(200)).unwrap();
    });
    daemon::signal(child.id(), libc::SIGTERM);
    let st = wait_timeout(&mut child, Duration::from_secs(10));
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
    assert_eq!(st.and_then(|s| s.code()), Some(0));
}

/// In --client mode the daemon may start before the VMM listens, and the VMM
/// may go away and come back on a new socket file.
#[test]
fn client_mode_waits_for_a_late_vmm() {
    let dir = tempdir();
    let sock = dir.path().join("vu.sock");
    let qmp = dir.path().join("qmp.sock");
    let args: Vec<String> = vec![
        "--socket-path".into(),
        sock.display().to_string(),
        "--client".into(),
        "--qmp".into(),
        qmp.display().to_string(),
    ];
    let mut d = Daemon::spawn_custom(dir, &args);
    assert!(
        wait_for_socket(&qmp, daemon::STARTUP_TIMEOUT),
        "no QMP socket"
    );
    // Nobody listens yet: the daemon retries without dying.
    std::thread::sleep(Duration::from_millis(700));
    d.assert_alive();
    for round in 0..2 {
        let listener = UnixListener::bind(&sock).unwrap();
        let s = accept_within(&listener, Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "round {round}: daemon did not connect; stderr:\n{}",
                d.stderr()
            )
        });
        let mut vmm = Vmm::negotiate(s, VmmConfig::default());
        vmm.set_mem_table().unwrap();
        for q in 0..2 {
            vmm.setup_queue(q).unwrap();
        }
        pump(&mut vmm.pairs, Until::Frames(200)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        // The VMM exits and its socket file disappears for a while.
        drop(vmm);
        drop(listener);
        std::fs::remove_file(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        d.assert_alive();
    }
}

/// SIGTERM while traffic flows in shadow mode and a switch may be under way.
#[test]
fn sigterm_under_traffic_exits_0() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut d = Daemon::spawn(&["--shadow", "on", "--queues", "2"]);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(2));
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let traffic = std::thread::spawn(move || {
        // Ends with an error once the daemon is gone; only the daemon's exit
        // matters here.
        let _ =
            testkit::net::pump_with(&mut vmm.pairs, Until::Flag(&stop2), Duration::from_secs(3));
        vmm
    });
    let mut q = Qmp::connect_ready(&d.qmp);
    std::thread::sleep(Duration::from_millis(300));
    q.send_raw(b"{\"execute\": \"enable-shadow-vq\", \"arguments\": {\"name\": \"net0\", \"enable\": false}}\r\n");
    daemon::signal(d.pid(), libc::SIGTERM);
    let mut child = d.child.take().unwrap();
    let st = wait_timeout(&mut child, Duration::from_secs(10));
    stop.store(true, Ordering::Release);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _vmm = traffic.join();
    let st = st.unwrap_or_else(|| panic!("no exit within 10s of SIGTERM; stderr:\n{}", d.stderr()));
    assert_eq!(st.code(), Some(0), "{st:?}; stderr:\n{}", d.stderr());
    assert!(
        !d.socket.exists() && !d.qmp.exists(),
        "socket files left behind"
    );
}

/// At the default log level a normal session (traffic, switches, a VMM
/// reconnect, QMP) writes nothing to stderr.
#[test]
fn quiet_when_all_is_well() {
    let mut d = Daemon::spawn(&["--log-level", "warn", "--queues", "2"]);
    let mut q = Qmp::connect_ready(&d.qmp);
    for round in 0..2 {
        let mut vmm = Vmm::start(&d.socket, VmmConfig::pairs(2));
        pump(&mut vmm.pairs, Until::Frames(200)).unwrap();
        assert_eq!(
            q.enable_shadow("net0", true),
            serde_json::json!({"return": {}})
        );
        pump(&mut vmm.pairs, Until::Frames(400)).unwrap();
        assert_eq!(
            q.enable_shadow("net0", false),
            serde_json::json!({"return": {}})
        );
        pump(&mut vmm.pairs, Until::Frames(600)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        vmm.check_final_bases();
    }
    let st = d.terminate();
    assert_eq!(st.and_then(|s| s.code()), Some(0));
    assert_eq!(d.stderr(), "", "stderr of a healthy session");
}

/// --shadow auto (the default) is passthrough until dirty logging starts.
#[test]
fn default_shadow_policy_is_passthrough() {
    let d = Daemon::spawn(&[]);
    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    pump(&mut vmm.pairs, Until::Frames(100)).unwrap();
    let mut q = Qmp::connect_ready(&d.qmp);
    let dev = q.query("net0");
    assert_eq!(dev["mode"], "passthrough", "{dev}");
}
