//! Spawning the real `svq-relay` binary and tearing it down.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `svq-relay` binary under test: `SVQ_RELAY_BIN`, or the one cargo
/// built beside the running test (cargo builds a package's binaries before
/// its integration tests and benchmarks: `target/<profile>/svq-relay`, the
/// test being `target/<profile>/deps/<name>-<hash>`).
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SVQ_RELAY_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("the test's own path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("a test binary under target/<profile>/deps");
        profile_dir.join("svq-relay")
    })
}

/// The workspace's `target/tmp` (cargo's CARGO_TARGET_TMPDIR for
/// integration tests), for files worth keeping between test binaries.
pub fn target_tmpdir() -> PathBuf {
    let profile_dir = bin().parent().expect("target/<profile>");
    let dir = profile_dir.parent().unwrap_or(profile_dir).join("tmp");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The workspace root (scripts/ lives there).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ is a directory of the workspace")
}

/// How long the daemon gets to create its sockets. Generous because the
/// machine is shared with parallel builds; a daemon that never listens still
/// fails the test.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A per-test scratch directory under /tmp (short path: sun_path is 108 bytes).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("svqt-")
        .tempdir_in("/tmp")
        .expect("create temp dir")
}

/// Waits until `path` exists and is a socket, or `timeout` passes.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(md) = std::fs::metadata(path) {
            if md.file_type().is_socket() {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to `pid` (a child we spawned).
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid of a child process we spawned and still own
    // (not yet reaped, so the pid cannot have been reused); no memory is touched.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits for `child` to exit, at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running daemon. Killed (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub qmp: PathBuf,
    stderr_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl Daemon {
    /// Starts the daemon listening on a fresh socket with a QMP socket, plus
    /// `args`, and waits (bounded) for both sockets.
    pub fn spawn(args: &[&str]) -> Daemon {
        let dir = tempdir();
        let socket = dir.path().join("vu.sock");
        let qmp = dir.path().join("qmp.sock");
        let mut full: Vec<String> = vec![
            "--socket-path".into(),
            socket.display().to_string(),
            "--qmp".into(),
            qmp.display().to_string(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let d = Self::spawn_in(dir, socket, qmp, &full);
        d.wait_ready(true);
        d
    }

    /// Starts the daemon with exactly `args` (the caller chooses the socket
    /// options, e.g. `--client`); does not wait for anything.
    pub fn spawn_custom(dir: tempfile::TempDir, args: &[String]) -> Daemon {
        let socket = dir.path().join("vu.sock");
        let qmp = dir.path().join("qmp.sock");
        Self::spawn_in(dir, socket, qmp, args)
    }

    fn spawn_in(dir: tempfile::TempDir, socket: PathBuf, qmp: PathBuf, args: &[String]) -> Daemon {
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let has_level = args.iter().any(|a| a == "--log-level");
        let mut cmd = Command::new(bin());
        cmd.args(args);
        if !has_level {
            cmd.args(["--log-level", "info"]);
        }
        let child = cmd
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn svq-relay");
        Daemon {
            child: Some(child),
            dir,
            socket,
            qmp,
            stderr_path,
            exit: None,
        }
    }

    /// Waits for the vhost-user socket (and the QMP socket if `qmp`).
    pub fn wait_ready(&self, qmp: bool) {
        let ok = wait_for_socket(&self.socket, STARTUP_TIMEOUT)
            && (!qmp || wait_for_socket(&self.qmp, STARTUP_TIMEOUT));
        assert!(
            ok,
            "daemon did not create its sockets within {:?}; stderr:\n{}",
            STARTUP_TIMEOUT,
            self.stderr()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Panics (with the daemon's stderr) if the daemon has exited.
    pub fn assert_alive(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(st)) = child.try_wait() {
                self.exit = Some(st);
                self.child = None;
            }
        }
        assert!(
            self.child.is_some(),
            "daemon exited ({:?}); stderr:\n{}",
            self.exit,
            self.stderr()
        );
    }

    /// SIGTERM, then wait (bounded); SIGKILL if it does not exit.
    /// Returns the exit status of the SIGTERM path, None if it had to be killed.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if let Some(st) = self.exit {
            return Some(st);
        }
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            self.exit = Some(st);
            return Some(st);
        }
        signal(child.id(), libc::SIGTERM);
        let st = wait_timeout(&mut child, Duration::from_secs(10));
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.exit = st;
        st
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        if std::thread::panicking() {
            eprintln!("---- svq-relay stderr ----\n{}", self.stderr());
        }
    }
}
