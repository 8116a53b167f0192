//! DPDK testpmd as a peer: one builder for every role the tests give it (a
//! vhost-user device with `net_vhost`, listening or connecting; a guest
//! driver with `net_virtio_user`), one way to tell it is ready, read its
//! counters and stop it.
//!
//! How testpmd behaves here (PEERS.md): no hugepages (`--no-huge -m 256`),
//! no PCI, one EAL file prefix per instance (instances of one test binary
//! run in parallel, and EAL leaves `/var/run/dpdk/<prefix>` behind, removed
//! here); it prints its final "Accumulated forward statistics" on SIGINT.
//! Every instance runs under `timeout -s KILL` in a process group of its
//! own, so a testpmd a test forgets cannot outlive the run, and dropping
//! the handle kills the group (killing `timeout` alone would leave testpmd
//! running).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::peers::TESTPMD;

/// How long testpmd gets to become ready, answer a signal, or move traffic.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// What testpmd prints when its forwarding streams start; packets that
/// arrive before are drained and dropped.
pub const FORWARDING: &str = "forwards packets on";

/// Tests that run several testpmds (and the daemon) on two CPUs take this
/// lock, so one scenario runs at a time in a test binary.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The testpmd port.
#[derive(Clone, Debug)]
enum Port {
    /// `net_vhost` listening on the socket (a vhost-user device).
    VhostServer(PathBuf),
    /// `net_vhost` connecting to the socket (`client=1`; it retries about
    /// once a second until the socket exists).
    VhostClient(PathBuf),
    /// `net_virtio_user` connecting to the socket (a guest driver).
    VirtioUser(PathBuf),
}

/// Port counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub rx: u64,
    pub tx: u64,
}

/// The final "Accumulated forward statistics for all ports".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinalStats {
    pub rx: u64,
    pub rx_dropped: u64,
    pub tx: u64,
    pub tx_dropped: u64,
}

#[derive(Clone, Debug)]
pub struct Builder {
    port: Port,
    role: String,
    dir: PathBuf,
    queues: u16,
    lcores: String,
    forward: String,
    tx_first: bool,
    vdev_opts: String,
    lifetime: Duration,
}

impl Builder {
    fn new(port: Port, role: &str) -> Builder {
        Builder {
            port,
            role: role.to_string(),
            dir: std::env::temp_dir(),
            queues: 1,
            lcores: "0@0,1@0".into(),
            forward: "io".into(),
            tx_first: false,
            vdev_opts: String::new(),
            lifetime: Duration::from_secs(300),
        }
    }

    /// Where the log goes (removed with the test's directory).
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = dir.to_path_buf();
        self
    }

    /// Queue pairs on the port, one forwarding stream each.
    pub fn queues(mut self, n: u16) -> Self {
        self.queues = n;
        self
    }

    /// Main and forwarding lcore both on `cpu`.
    pub fn cpu(mut self, cpu: usize) -> Self {
        self.lcores = format!("0@{cpu},1@{cpu}");
        self
    }

    /// `--forward-mode` (default `io`).
    pub fn forward(mut self, mode: &str) -> Self {
        self.forward = mode.to_string();
        self
    }

    /// `--tx-first`: one burst per queue goes out when forwarding starts.
    pub fn tx_first(mut self) -> Self {
        self.tx_first = true;
        self
    }

    /// Appended to the vdev arguments (e.g. `,packed_vq=1`).
    pub fn vdev_opts(mut self, opts: &str) -> Self {
        self.vdev_opts = opts.to_string();
        self
    }

    /// The longest testpmd may live before `timeout` kills it.
    pub fn lifetime(mut self, d: Duration) -> Self {
        self.lifetime = d;
        self
    }

    fn vdev(&self) -> String {
        let q = self.queues;
        let o = &self.vdev_opts;
        match &self.port {
            Port::VhostServer(s) => format!("net_vhost0,iface={},queues={q}{o}", s.display()),
            Port::VhostClient(s) => {
                format!("net_vhost0,iface={},queues={q},client=1{o}", s.display())
            }
            Port::VirtioUser(s) => format!("net_virtio_user0,path={},queues={q}{o}", s.display()),
        }
    }

    /// Starts testpmd; nothing is waited for (see [`Testpmd::wait_forwarding`]
    /// and [`Testpmd::wait_listening`]).
    pub fn spawn(self) -> Testpmd {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "svqt{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            self.role
        );
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
        if let Port::VhostServer(s) = &self.port {
            let _ = std::fs::remove_file(s);
        }
        let log = self.dir.join(format!("{prefix}.log"));
        let out = File::create(&log).expect("create the testpmd log");
        let q = self.queues.to_string();
        let mut cmd = Command::new("timeout");
        cmd.process_group(0);
        cmd.args(["-s", "KILL", &self.lifetime.as_secs().to_string(), TESTPMD])
            .args([
                "--lcores",
                &self.lcores,
                "--no-huge",
                "-m",
                "256",
                "--no-pci",
            ])
            .args(["--file-prefix", &prefix, "--vdev", &self.vdev(), "--"])
            .args([
                "--total-num-mbufs=8192",
                "--stats-period",
                "1",
                "--auto-start",
            ])
            .arg(format!("--forward-mode={}", self.forward))
            .arg(format!("--rxq={q}"))
            .arg(format!("--txq={q}"));
        if self.tx_first {
            cmd.arg("--tx-first");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup the log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn dpdk-testpmd");
        Testpmd {
            child: Some(child),
            log,
            prefix,
            role: self.role,
            port: self.port,
        }
    }
}

/// A running testpmd.
pub struct Testpmd {
    child: Option<Child>,
    log: PathBuf,
    prefix: String,
    role: String,
    port: Port,
}

impl Testpmd {
    /// A vhost-user device listening on `sock`.
    pub fn vhost(sock: &Path) -> Builder {
        Builder::new(Port::VhostServer(sock.to_path_buf()), "device")
    }

    /// A vhost-user device that connects to `sock`.
    pub fn vhost_client(sock: &Path) -> Builder {
        Builder::new(Port::VhostClient(sock.to_path_buf()), "device")
    }

    /// A guest driver (virtio-user) on the vhost-user socket `sock`.
    pub fn virtio_user(sock: &Path) -> Builder {
        Builder::new(Port::VirtioUser(sock.to_path_buf()), "guest")
    }

    /// Everything testpmd printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `ready` holds; fails early, with the log, if
    /// testpmd exits or the time is up.
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut(&Testpmd) -> bool) {
        let deadline = Instant::now() + PEER_TIMEOUT;
        while !ready(self) {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "{} testpmd exited ({st}) before {what}:\n{}",
                    self.role,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} testpmd: no {what} within {PEER_TIMEOUT:?}:\n{}",
                self.role,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&mut self, needle: &str) {
        self.wait_until(&format!("{needle:?}"), |t| t.log().contains(needle));
    }

    /// Waits until forwarding runs.
    pub fn wait_forwarding(&mut self) -> &mut Self {
        self.wait_log(FORWARDING);
        self
    }

    /// A listening device: waits until its socket accepts a connection.
    /// The probe counts as a frontend that came and went; testpmd is given
    /// a moment to forget it.
    pub fn wait_listening(&mut self) -> &mut Self {
        let Port::VhostServer(sock) = self.port.clone() else {
            panic!("{} testpmd does not listen", self.role);
        };
        self.wait_until(&format!("listening on {}", sock.display()), |_| {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        std::thread::sleep(Duration::from_millis(200));
        self
    }

    /// Port counters from the latest periodic statistics screen.
    pub fn port_counts(&self) -> Counts {
        let log = self.log();
        Counts {
            rx: last_number(&log, "RX-packets:").unwrap_or(0),
            tx: last_number(&log, "TX-packets:").unwrap_or(0),
        }
    }

    /// Waits (bounded) until the port received and sent `n` packets more
    /// than `from`.
    pub fn wait_traffic(&self, from: Counts, n: u64, what: &str) -> Counts {
        let deadline = Instant::now() + PEER_TIMEOUT;
        loop {
            let c = self.port_counts();
            if c.rx >= from.rx + n && c.tx >= from.tx + n {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} testpmd counters stuck at {c:?} (from {from:?})",
                self.role
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGINT (testpmd prints its final statistics and exits), bounded
    /// wait; returns the log. A testpmd that does not exit is killed and
    /// the test fails.
    pub fn stop_log(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGINT);
            if wait_timeout(&mut child, PEER_TIMEOUT).is_none() {
                signal_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "{} testpmd did not exit on SIGINT:\n{}",
                    self.role,
                    self.log()
                );
            }
            let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
        }
        self.log()
    }

    /// Stops testpmd and returns its final statistics.
    pub fn stop(&mut self) -> FinalStats {
        let log = self.stop_log();
        final_stats(&log).unwrap_or_else(|| {
            panic!(
                "{} testpmd: no final statistics in its output:\n{log}",
                self.role
            )
        })
    }

    /// SIGKILL, no statistics: a device that dies rather than exits.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal_group(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let running = self.child.is_some();
        self.kill();
        if running && std::thread::panicking() {
            eprintln!(
                "---- {} testpmd log (tail) ----\n{}",
                self.role,
                log_tail(&self.log(), 120)
            );
        }
    }
}

/// The last `n` lines of a log, minus testpmd's statistics screens.
fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            !l.trim().is_empty()
                && !l.contains("pps")
                && !l.contains("###")
                && !l.contains("[2J")
                && !l.contains("Port statistics")
                && !l.contains("Throughput")
                && !l.contains("-errors:")
                && !l.contains("-nombuf:")
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The "Accumulated forward statistics for all ports" block of testpmd's
/// final output.
pub fn final_stats(log: &str) -> Option<FinalStats> {
    let at = log.rfind("Accumulated forward statistics")?;
    let block = &log[at..];
    let num = |key: &str| -> Option<u64> {
        let i = block.find(key)? + key.len();
        block[i..].split_whitespace().next()?.parse().ok()
    };
    Some(FinalStats {
        rx: num("RX-packets:")?,
        rx_dropped: num("RX-dropped:")?,
        tx: num("TX-packets:")?,
        tx_dropped: num("TX-dropped:")?,
    })
}

/// The number after the last occurrence of `key`.
pub fn last_number(text: &str, key: &str) -> Option<u64> {
    let at = text.rfind(key)? + key.len();
    text[at..].split_whitespace().next()?.parse().ok()
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill takes no pointers; the pid is our own child, not yet
        // reaped, so it cannot have been reused.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Sends `sig` to the process group our child `pgid` leads.
fn signal_group(pgid: u32, sig: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        // SAFETY: kill takes no pointers; a negative pid names the group our
        // unreaped child leads, so it cannot have been reused.
        unsafe { libc::kill(-pgid, sig) };
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_statistics_are_read_from_the_accumulated_block() {
        let log = "Port statistics\n  RX-packets: 5 RX-missed: 0\n\
            ---------------------- Forward statistics for port 0 ----------------------\n\
            \n  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++\n\
            \x20 RX-packets: 1000           RX-dropped: 2             RX-total: 1002\n\
            \x20 TX-packets: 998            TX-dropped: 0             TX-total: 998\n";
        assert_eq!(
            final_stats(log),
            Some(FinalStats {
                rx: 1000,
                rx_dropped: 2,
                tx: 998,
                tx_dropped: 0
            })
        );
        assert_eq!(last_number(log, "RX-packets:"), Some(1000));
        assert_eq!(final_stats("no statistics"), None);
    }
}
