//! `--backend tap:IFNAME`: frames the guest sends leave through a real host
//! tap interface (captured with an AF_PACKET socket), and frames the host
//! sends into the tap reach the guest, byte for byte, in passthrough, in
//! shadow and across a switch. Skipped when tap devices cannot be created.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::packet::{check_frame, ETHERTYPE, MAX_FRAME};
use testkit::{pump, Daemon, Qmp, Until, Vmm, VmmConfig};

const ETH_P_ALL: u16 = 0x0003;

/// A raw packet socket bound to one interface.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn bind(ifname: &str) -> PacketSocket {
        let ifindex = std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
            .expect("ifindex")
            .trim()
            .parse()
            .unwrap();
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                ETH_P_ALL.to_be() as i32,
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll and the length passed is its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        PacketSocket { fd, ifindex }
    }

    /// One frame if any is waiting.
    fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: recv writes at most buf.len() bytes into buf, which we own.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n <= 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    /// Transmits `frame` on the interface: for a tap, that hands it to the
    /// tap's reader, the daemon.
    fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and sll are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn unique_ifname() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "svqt{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether this host lets us create tap devices (root, /dev/net/tun, ip).
fn tap_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/dev/net/tun").exists()
        && Command::new("ip").arg("-V").output().is_ok()
}

fn run(shadow: &str, switch: bool) {
    if !tap_usable() {
        eprintln!("skipping: cannot create tap devices here");
        return;
    }
    let ifname = unique_ifname();
    let d = Daemon::spawn(&["--shadow", shadow, "--backend", &format!("tap:{ifname}")]);
    let sys = format!("/sys/class/net/{ifname}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&sys).exists() {
        assert!(Instant::now() < deadline, "tap {ifname} never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Keep the kernel's own IPv6 chatter off the interface.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
    let st = Command::new("ip")
        .args(["link", "set", "dev", &ifname, "up"])
        .status()
        .unwrap();
    assert!(st.success(), "ip link set {ifname} up");
    let sock = PacketSocket::bind(&ifname);

    let mut vmm = Vmm::start(&d.socket, VmmConfig::default());
    let frames = 60u32;
    // Guest -> host: every frame leaves through the tap.
    let p = &mut vmm.pairs[0];
    p.set_ignore_foreign(true);
    assert_eq!(p.send(frames), frames, "window too small");
    let mut captured: Vec<Vec<u8>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while captured.len() < frames as usize {
        testkit::ring::wait_eventfds(&p.call_fds(), 50);
        p.service_tx().unwrap_or_else(|e| panic!("TX: {e}"));
        while let Some(f) = sock.try_recv() {
            if f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ETHERTYPE {
                check_frame(&f).unwrap_or_else(|e| panic!("frame on the tap: {e}"));
                assert!(f.len() <= MAX_FRAME);
                captured.push(f);
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {frames} frames left through the tap: {}",
            captured.len(),
            p.describe()
        );
    }
    let mut seqs: Vec<u32> = captured.iter().map(|f| check_frame(f).unwrap().1).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), frames as usize, "duplicate frames on the tap");

    if switch {
        let mut q = Qmp::connect_ready(&d.qmp);
        let enable = shadow != "on";
        assert_eq!(q.enable_shadow("net0", enable), json!({"return": {}}));
    }
    // Host -> guest: the same frames go back in through the tap.
    for f in &captured {
        sock.send(f);
    }
    pump(&mut vmm.pairs, Until::Frames(frames)).unwrap_or_else(|e| panic!("host -> guest: {e}"));
    vmm.check_final_bases();
}

#[test]
fn tap_passthrough() {
    run("off", false);
}

#[test]
fn tap_shadow() {
    run("on", false);
}

#[test]
fn tap_across_a_switch() {
    run("off", true);
}
