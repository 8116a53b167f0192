//! An AF_PACKET socket on a host interface, for the tests that put the
//! sim on a tap: it sees what the interface receives (what the sim wrote
//! into the tap) and sends frames the tap then reads.
#![allow(dead_code)]

use std::io;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);
pub const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental

/// An AF_PACKET socket on one interface: sees what the interface receives
/// (what the sim wrote into the tap) and sends frames the tap then reads.
pub struct PacketSocket {
    fd: i32,
    ifindex: i32,
}

impl PacketSocket {
    pub fn open(ifname: &str) -> io::Result<Self> {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2) call.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = PacketSocket { fd, ifindex };
        let addr = s.sockaddr();
        // SAFETY: `addr` is a valid sockaddr_ll and its size is passed.
        let r = unsafe {
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    fn sockaddr(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        a.sll_family = libc::AF_PACKET as u16;
        a.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        a.sll_ifindex = self.ifindex;
        a.sll_halen = 6;
        a
    }

    pub fn send(&self, frame: &[u8]) {
        let addr = self.sockaddr();
        // SAFETY: `frame` and `addr` are valid for the lengths passed.
        let r = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            r,
            frame.len() as isize,
            "sendto: {}",
            io::Error::last_os_error()
        );
    }

    /// Waits (bounded) for a received frame equal to `want`.
    pub fn expect(&self, want: &[u8]) {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "frame never seen on the interface");
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            if r <= 0 {
                continue;
            }
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && &buf[..n as usize] == want {
                return;
            }
        }
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is owned by this struct.
        unsafe { libc::close(self.fd) };
    }
}

pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(seed);
    }
    f
}
