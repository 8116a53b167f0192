//! `--backend vhost-user:` / `vhost-user-server:` / `vdpa:` when the device
//! is not there: one line naming the backend and the reason, exit code 2,
//! and no VMM socket left behind (the VMM must not connect to a daemon that
//! cannot serve it). Needs no peer.

use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::daemon::{bin, tempdir, wait_timeout};

/// Runs the daemon with `backend`; returns its stderr after it exited 2.
fn fails_with(backend: &str) -> String {
    let dir = tempdir();
    let sock = dir.path().join("vm.sock");
    let mut child = Command::new(bin())
        .args(["--socket-path", &sock.display().to_string()])
        .args(["--backend", backend])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let st = wait_timeout(&mut child, Duration::from_secs(20));
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{backend}: did not exit");
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{backend}: {err:?}");
    assert_eq!(err.lines().count(), 1, "{backend}: one line: {err:?}");
    assert!(
        err.starts_with(&format!("svq-relay: error: backend {backend}: ")),
        "{backend}: {err:?}"
    );
    assert!(!sock.exists(), "{backend}: VMM socket left behind");
    err
}

#[test]
fn missing_vdpa_device() {
    let err = fails_with("vdpa:/dev/vhost-vdpa-svq-test-missing");
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn vhost_user_device_not_listening() {
    let dir = tempdir();
    let missing = dir.path().join("nobody.sock");
    let err = fails_with(&format!("vhost-user:{}", missing.display()));
    assert!(err.contains("No such file"), "{err}");
    // A socket file nobody accepts on: refused, not hung.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let err = fails_with(&format!("vhost-user:{}", stale.display()));
    assert!(err.contains("refused"), "{err}");
}

#[test]
fn vhost_user_device_that_never_answers() {
    // Accepts the connection, then says nothing: the daemon's reply timeout
    // (5 s) ends the wait.
    let dir = tempdir();
    let sock = dir.path().join("mute.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let c = l.accept().map(|(c, _)| c);
        // Silent, but connected, until the daemon gave up.
        let _ = wait.recv_timeout(Duration::from_secs(30));
        drop(c);
    });
    let err = fails_with(&format!("vhost-user:{}", sock.display()));
    assert!(err.contains("no answer within 5s"), "{err}");
    done.send(()).unwrap();
    t.join().unwrap();
}
