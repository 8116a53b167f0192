//! Real QEMU guests for the tests: Debian's cloud kernel (Linux 6.1) and an
//! initramfs built here from busybox-static and the kernel's virtio-net
//! modules, booted under TCG with `-netdev vhost-user`. The test talks to
//! the guest's shell over its serial port: `Guest::run` sends one command
//! and returns its output and exit status.
//!
//! Assets come from `scripts/qemu-assets.sh` (run on first use; directory
//! `SVQ_RELAY_QEMU_ASSETS` or `target/qemu-assets`). QEMU 7.2 is the
//! system's `qemu-system-x86_64` (it needs `vectors=0` under TCG: MSI-X
//! without KVM crashes it); QEMU 10 runs from the assets with `-L`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::testpmd::Testpmd;

/// How long a TCG boot to the shell may take.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const GUEST_IP: &str = "10.0.2.15";
pub const PEER_IP: &str = "10.0.2.2";

/// Modules virtio-net needs on the cloud kernel, in load order.
const MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
];

pub struct Assets {
    pub kernel: PathBuf,
    pub modules: PathBuf,
    /// Linux 6.12 with vDPA, vhost-vdpa and VDUSE (as modules).
    pub vdpa_kernel: PathBuf,
    pub vdpa_modules: PathBuf,
    pub qemu10: PathBuf,
    pub qemu10_data: PathBuf,
}

fn root() -> PathBuf {
    crate::daemon::workspace_root().to_path_buf()
}

/// The guest assets, fetched once per test binary. None (after printing
/// why) when they cannot be had and SVQ_RELAY_REQUIRE_PEERS is unset.
pub fn assets() -> Option<&'static Assets> {
    static A: OnceLock<Result<Assets, String>> = OnceLock::new();
    let r = A.get_or_init(|| {
        let out = Command::new(root().join("scripts/qemu-assets.sh"))
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("scripts/qemu-assets.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!("scripts/qemu-assets.sh failed: {}", out.status));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(PathBuf::from)
                .ok_or(format!("qemu-assets.sh printed no {k}="))
        };
        Ok(Assets {
            kernel: get("KERNEL")?,
            modules: get("MODULES")?,
            vdpa_kernel: get("VDPA_KERNEL")?,
            vdpa_modules: get("VDPA_MODULES")?,
            qemu10: get("QEMU10")?,
            qemu10_data: get("QEMU10_DATA")?,
        })
    });
    match r {
        Ok(a) => Some(a),
        Err(e) => {
            crate::peers::missing_peer(e);
            None
        }
    }
}

/// True when QEMU 7.2, busybox and the guest assets are all there.
pub fn qemu_or_skip() -> bool {
    for (bin, why) in [
        ("qemu-system-x86_64", "qemu-system-x86 not installed"),
        ("/bin/busybox", "busybox-static not installed"),
    ] {
        let found = if bin.starts_with('/') {
            Path::new(bin).exists()
        } else {
            Command::new(bin).arg("--version").output().is_ok()
        };
        if !found {
            crate::peers::missing_peer(why);
            return false;
        }
    }
    assets().is_some()
}

// --- initramfs --------------------------------------------------------------

/// One newc cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/svq/*.ko; do insmod "$m" || echo "insmod $m failed"; done
ip link set lo up
ip=$(sed -n 's/.*svq.ip=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$ip" ]; then
  n=0
  while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  ip addr add $ip/24 dev eth0
  ip link set eth0 up
fi
stty -echo 2>/dev/null
echo SVQ-GUEST-READY
while read -r line; do
  eval "$line"
  echo "@@END $?"
done
"#;

/// Builds the initramfs of the virtio-net guests: busybox, the cloud
/// kernel's virtio-net modules, /init.
pub fn build_initramfs(a: &Assets, path: &Path) {
    let mut fs = Initramfs::new();
    for m in MODULES {
        fs = fs.module(&a.modules.join(m));
    }
    fs.build(path);
}

/// A guest's root filesystem: busybox, kernel modules loaded by /init in
/// the order given, and host programs copied in with the shared libraries
/// `ldd` lists for them (at the same paths), debug info stripped when
/// `strip` is there.
#[derive(Default)]
pub struct Initramfs {
    modules: Vec<PathBuf>,
    /// (path in the guest, path on the host)
    programs: Vec<(String, PathBuf)>,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// A module (`.ko`, or `.ko.xz` decompressed here with `xz`).
    pub fn module(mut self, path: &Path) -> Self {
        self.modules.push(path.to_path_buf());
        self
    }

    /// `host` at `guest` (relative to the root), with its libraries.
    pub fn program(mut self, guest: &str, host: &Path) -> Self {
        self.programs.push((
            guest.trim_start_matches('/').to_string(),
            host.to_path_buf(),
        ));
        self
    }

    fn module_bytes(path: &Path) -> Vec<u8> {
        if path.extension().is_some_and(|e| e == "xz") {
            let out = Command::new("xz")
                .arg("-dc")
                .arg(path)
                .output()
                .unwrap_or_else(|e| panic!("xz -dc {}: {e}", path.display()));
            assert!(out.status.success(), "xz -dc {} failed", path.display());
            out.stdout
        } else {
            std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        }
    }

    /// The libraries `ldd` names for `exe` (the dynamic loader included).
    fn libraries(exe: &Path) -> Vec<PathBuf> {
        let out = Command::new("ldd")
            .arg(exe)
            .output()
            .unwrap_or_else(|e| panic!("ldd {}: {e}", exe.display()));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let path = match l.split_once("=>") {
                    Some((_, rest)) => rest.split_whitespace().next()?,
                    None => l.split_whitespace().next()?,
                };
                path.starts_with('/').then(|| PathBuf::from(path))
            })
            .collect()
    }

    /// `host`'s bytes, without debug info when `strip` can do it.
    fn program_bytes(host: &Path) -> Vec<u8> {
        let tmp = crate::daemon::target_tmpdir().join(format!(
            "initramfs-strip-{}-{}",
            std::process::id(),
            host.file_name().unwrap().to_string_lossy()
        ));
        let stripped = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&tmp)
            .arg(host)
            .output()
            .is_ok_and(|o| o.status.success());
        let bytes = if stripped {
            std::fs::read(&tmp)
        } else {
            std::fs::read(host)
        }
        .unwrap_or_else(|e| panic!("{}: {e}", host.display()));
        let _ = std::fs::remove_file(&tmp);
        bytes
    }

    pub fn build(&self, path: &Path) {
        let mut cpio = Cpio::default();
        for d in ["bin", "proc", "sys", "dev", "lib", "lib/svq", "tmp"] {
            cpio.parents_of(&format!("{d}/x"));
        }
        let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
        cpio.add("bin/busybox", 0o100755, &busybox);
        cpio.add("bin/sh", 0o120777, b"busybox");
        for (i, m) in self.modules.iter().enumerate() {
            let data = Self::module_bytes(m);
            let base = m.file_name().unwrap().to_string_lossy();
            let base = base.trim_end_matches(".xz");
            cpio.add(&format!("lib/svq/{i:02}{base}"), 0o100644, &data);
        }
        let mut copied = std::collections::BTreeSet::new();
        for (guest, host) in &self.programs {
            cpio.parents_of(guest);
            cpio.add(guest, 0o100755, &Self::program_bytes(host));
            for lib in Self::libraries(host) {
                let name = lib.to_string_lossy().trim_start_matches('/').to_string();
                if copied.insert(name.clone()) {
                    // The file itself, symlinks resolved.
                    let data =
                        std::fs::read(&lib).unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
                    cpio.parents_of(&name);
                    cpio.add(&name, 0o100755, &data);
                }
            }
        }
        cpio.add("init", 0o100755, INIT.as_bytes());
        cpio_entry(&mut cpio.out, 0, "TRAILER!!!", 0, &[]);
        std::fs::write(path, cpio.out).expect("write initramfs");
    }
}

/// A newc archive being written: entries, and the directories made so far.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
}

impl Cpio {
    fn add(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        cpio_entry(&mut self.out, self.ino, name, mode, data);
    }

    /// Directory entries for every parent of `file` not written yet.
    fn parents_of(&mut self, file: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = file.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if self.dirs.insert(acc.clone()) {
                self.add(&acc.clone(), 0o040755, &[]);
            }
        }
    }
}

// --- QEMU --------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuVersion {
    /// Debian 12's system QEMU.
    V7,
    /// bookworm-backports' QEMU 10, from the assets.
    V10,
}

#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub qemu: QemuVersion,
    pub mem_mb: u32,
    pub pairs: u16,
    pub cpus: u32,
    pub ip: String,
    /// `-incoming` URI (a migration destination).
    pub incoming: Option<String>,
    /// `packed=on` on the virtio-net device: packed virtqueues.
    pub packed: bool,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            qemu: QemuVersion::V7,
            mem_mb: 256,
            pairs: 1,
            cpus: 1,
            ip: GUEST_IP.into(),
            incoming: None,
            packed: false,
        }
    }
}

/// The serial console: everything the guest printed, shared with a reader
/// thread.
struct Console {
    text: Mutex<String>,
    grew: Condvar,
}

pub struct Guest {
    child: Child,
    pub dir: PathBuf,
    serial: UnixStream,
    console: Arc<Console>,
    pub qmp: QemuQmp,
    /// Consumed part of the console.
    seen: usize,
    next_cmd: u32,
}

/// The initramfs, built once per test binary.
fn initramfs_path() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let a = assets().expect("assets");
            // Built into a per-process file and renamed into place under
            // the target directory: a parallel test binary never reads a
            // half-written archive, and no file per run piles up in /tmp.
            let dir = crate::daemon::target_tmpdir();
            let ver = a.modules.file_name().unwrap().to_string_lossy().to_string();
            let p = dir.join(format!("svq-initramfs-{ver}.cpio"));
            let tmp = dir.join(format!("svq-initramfs-{ver}.{}.tmp", std::process::id()));
            build_initramfs(a, &tmp);
            std::fs::rename(&tmp, &p).expect("rename the initramfs into place");
            p
        })
        .clone()
}

impl Guest {
    /// Starts QEMU with its NIC on the vhost-user socket `vu_sock`, in
    /// `dir` (serial and QMP sockets go there). A destination (`incoming`)
    /// does not boot; `wait_ready` it only through `migrated_from`.
    pub fn start(dir: &Path, vu_sock: &Path, cfg: &GuestConfig) -> Guest {
        let a = assets().expect("guest assets");
        Self::boot(dir, &a.kernel, &initramfs_path(), cfg, Some(vu_sock))
    }

    /// Boots `kernel` with `initrd` (an [`Initramfs`] whose /init is this
    /// module's), with a virtio-net NIC on the vhost-user socket `nic` or
    /// with no NIC at all.
    pub fn boot(
        dir: &Path,
        kernel: &Path,
        initrd: &Path,
        cfg: &GuestConfig,
        nic: Option<&Path>,
    ) -> Guest {
        let a = assets().expect("guest assets");
        let serial_path = dir.join("serial.sock");
        let _ = std::fs::remove_file(&serial_path);
        let listener = UnixListener::bind(&serial_path).expect("bind serial socket");
        let qmp_path = dir.join("qemu-qmp.sock");
        let (bin, mut extra, vectors): (PathBuf, Vec<String>, &str) = match cfg.qemu {
            QemuVersion::V7 => ("qemu-system-x86_64".into(), vec![], ",vectors=0"),
            QemuVersion::V10 => (
                a.qemu10.clone(),
                vec!["-L".into(), a.qemu10_data.display().to_string()],
                "",
            ),
        };
        let mq = if cfg.pairs > 1 {
            format!(",mq=on,vectors={}", 2 * cfg.pairs + 2)
        } else {
            format!(",mq=off{vectors}")
        };
        let mq = if cfg.pairs > 1 && cfg.qemu == QemuVersion::V7 {
            // MSI-X crashes 7.2 under TCG; without vectors MQ still works.
            ",mq=on,vectors=0".to_string()
        } else {
            mq
        };
        let mem = format!("{}M", cfg.mem_mb);
        let mut args: Vec<String> = vec![
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-smp",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        args.push(cfg.cpus.to_string());
        args.extend(["-m".into(), mem.clone()]);
        args.extend([
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            match nic {
                Some(_) => format!("console=ttyS0 quiet loglevel=1 panic=-1 svq.ip={}", cfg.ip),
                None => "console=ttyS0 quiet loglevel=1 panic=-1".to_string(),
            },
            "-chardev".into(),
            format!("socket,id=ser0,path={}", serial_path.display()),
            "-serial".into(),
            "chardev:ser0".into(),
        ]);
        if let Some(vu_sock) = nic {
            args.extend([
                "-chardev".into(),
                format!("socket,id=vu0,path={}", vu_sock.display()),
                "-netdev".into(),
                format!("vhost-user,id=net0,chardev=vu0,queues={}", cfg.pairs),
                "-device".into(),
                format!(
                    "virtio-net-pci,netdev=net0,mac={GUEST_MAC},romfile={mq}{}",
                    if cfg.packed { ",packed=on" } else { "" }
                ),
            ]);
        }
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
        ]);
        if let Some(uri) = &cfg.incoming {
            args.extend(["-incoming".into(), uri.clone()]);
        }
        args.append(&mut extra);
        let child = Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.join("qemu.log")).unwrap(),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("qemu.err")).unwrap(),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let serial = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!(
                    "QEMU never connected its serial port ({e}): {}",
                    std::fs::read_to_string(dir.join("qemu.err")).unwrap_or_default()
                ),
            }
        };
        serial.set_nonblocking(false).unwrap();
        let console = Arc::new(Console {
            text: Mutex::new(String::new()),
            grew: Condvar::new(),
        });
        let reader = serial.try_clone().unwrap();
        let c2 = console.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            while let Ok(n) = r.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                c2.text
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf));
                c2.grew.notify_all();
                buf.clear();
            }
        });
        let qmp = QemuQmp::connect(&qmp_path);
        Guest {
            child,
            dir: dir.to_path_buf(),
            serial,
            console,
            qmp,
            seen: 0,
            next_cmd: 0,
        }
    }

    /// Everything the guest printed so far (for failure messages).
    pub fn console(&self) -> String {
        self.console.text.lock().unwrap().clone()
    }

    /// Waits for a console line satisfying `f` after what was consumed;
    /// consumes up to and including it.
    fn wait_line(&mut self, timeout: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut text = self.console.text.lock().unwrap();
        loop {
            let mut pos = self.seen;
            for line in text[self.seen..].split_inclusive('\n') {
                if !line.ends_with('\n') {
                    break;
                }
                pos += line.len();
                if f(line.trim_end()) {
                    let found = line.trim_end().to_string();
                    self.seen = pos;
                    return Some(found);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            text = self
                .console
                .grew
                .wait_timeout(text, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Waits until /init has eth0 configured and its shell listens.
    pub fn wait_ready(&mut self) {
        if self
            .wait_line(BOOT_TIMEOUT, |l| l.contains("SVQ-GUEST-READY"))
            .is_none()
        {
            panic!(
                "guest did not boot within {BOOT_TIMEOUT:?}; console:\n{}\nqemu: {}",
                self.console(),
                std::fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default()
            );
        }
    }

    /// Runs `cmd` in the guest shell; returns (exit status, output).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        self.next_cmd += 1;
        let start_mark = format!("@@BEGIN {}", self.next_cmd);
        let line = format!("echo '{start_mark}'; {cmd}\n");
        (&self.serial)
            .write_all(line.as_bytes())
            .expect("write to the guest console");
        self.wait_line(timeout, |l| l == start_mark)
            .unwrap_or_else(|| panic!("guest never started {cmd:?}; console:\n{}", self.console()));
        let begin = self.seen;
        let end = self
            .wait_line(timeout, |l| l.starts_with("@@END "))
            .unwrap_or_else(|| {
                panic!(
                    "guest command {cmd:?} did not finish in {timeout:?}; console:\n{}",
                    self.console()
                )
            });
        let text = self.console.text.lock().unwrap();
        let out: String = text[begin..self.seen]
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("@@END "))
            .collect();
        let rc = end
            .trim_start_matches("@@END ")
            .trim()
            .parse()
            .unwrap_or(-1);
        (rc, out)
    }

    /// `run`, asserting success.
    pub fn sh(&mut self, cmd: &str) -> String {
        let (rc, out) = self.run(cmd, Duration::from_secs(120));
        assert_eq!(rc, 0, "guest: {cmd:?} failed with {rc}:\n{out}");
        out
    }

    /// A guest interface counter (/sys/class/net/IF/statistics/NAME).
    pub fn counter(&mut self, ifname: &str, name: &str) -> u64 {
        self.sh(&format!("cat /sys/class/net/{ifname}/statistics/{name}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The guest's interrupt counts (summed over its CPUs) by action name,
    /// e.g. `virtio0-input.1`: one per queue with MSI-X (QEMU 10); with
    /// `vectors=0` (QEMU 7.2) all queues share one INTx line.
    pub fn interrupts(&mut self) -> std::collections::HashMap<String, u64> {
        let out = self.sh("cat /proc/interrupts");
        let mut lines = out.lines();
        let cpus = lines
            .next()
            .map(|l| l.split_whitespace().count())
            .unwrap_or(0);
        let mut m = std::collections::HashMap::new();
        for l in lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < cpus + 2 {
                continue;
            }
            let n = f[1..=cpus]
                .iter()
                .filter_map(|v| v.parse::<u64>().ok())
                .sum();
            m.insert(f[f.len() - 1].to_string(), n);
        }
        m
    }

    /// After this QEMU received the guest by migration: the console is the
    /// destination's from now on (the shell keeps reading from it).
    pub fn adopt_console_after_migration(&mut self) {
        self.seen = self.console.text.lock().unwrap().len();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parsed busybox ping summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingStats {
    pub sent: u32,
    pub received: u32,
}

pub fn parse_ping(out: &str) -> Option<PingStats> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    Some(PingStats {
        sent: *nums.first()?,
        received: *nums.get(1)?,
    })
}

// --- QEMU's QMP ----------------------------------------------------------------

pub struct QemuQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl QemuQmp {
    fn connect(path: &Path) -> QemuQmp {
        let s = crate::vmm::connect_stream(path);
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = QemuQmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        q.read(); // greeting
        q.execute("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QEMU QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QEMU QMP {line:?}: {e}"))
    }

    /// Runs a command; panics on an error reply.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                panic!("QEMU {cmd}: {e}");
            }
            return v["return"].clone();
        }
    }

    /// Polls query-migrate until completed (or failed: panics).
    pub fn wait_migrated(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.execute("query-migrate", json!({}));
            match m["status"].as_str() {
                Some("completed") => return m,
                Some("failed") | Some("cancelled") | Some("postcopy-paused") => {
                    panic!("migration failed: {m}")
                }
                _ => {}
            }
            assert!(Instant::now() < deadline, "migration did not complete: {m}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// --- testpmd icmpecho ------------------------------------------------------

/// DPDK testpmd as a vhost-user device answering ARP and ICMP echo
/// (`--forward-mode=icmpecho`), listening on `sock`.
pub struct EchoPmd {
    pub sock: PathBuf,
    pmd: Testpmd,
}

impl EchoPmd {
    pub fn spawn(dir: &Path, name: &str, pairs: u16) -> EchoPmd {
        let sock = dir.join(format!("{name}.sock"));
        let mut pmd = Testpmd::vhost(&sock)
            .dir(dir)
            .queues(pairs)
            .forward("icmpecho")
            .spawn();
        pmd.wait_listening();
        EchoPmd { sock, pmd }
    }

    pub fn log(&self) -> String {
        self.pmd.log()
    }

    /// Stops testpmd; its final statistics.
    pub fn stop(&mut self) -> crate::testpmd::FinalStats {
        self.pmd.stop()
    }
}
