//! A host TAP interface as the sim's wire (`SimMode::Tap`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
// _IOW('T', 202, int), _IOW('T', 216, int), _IOW('T', 208, unsigned int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

/// The tap's virtio-net header: always 12 bytes (with num_buffers), whatever
/// the driver negotiated; the sim converts.
pub(crate) const TAP_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    // struct ifreq is 40 bytes on Linux; the kernel copies all of it.
    _pad: [u8; 22],
}

pub(crate) struct Tap {
    file: File,
}

impl Tap {
    /// Attaches to (or creates) tap `ifname`. With `multi_queue` each call adds
    /// one queue of a multi-queue tap.
    pub(crate) fn open(ifname: &str, multi_queue: bool) -> io::Result<Tap> {
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {ifname:?}"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        let fd = file.as_raw_fd();
        // SAFETY: `fd` is an open /dev/net/tun descriptor; TUNSETIFF reads and
        // writes a struct ifreq, and `req` is a repr(C) struct of that size
        // that lives across the call.
        let r = unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let hdr_len = TAP_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at a live local.
        let r = unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ as _, &hdr_len as *const libc::c_int) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // The sim offers no checksum or GSO offload, so the tap must hand it
        // only complete, checksummed frames.
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, 0 as libc::c_ulong) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap { file })
    }

    /// One packet (12-byte header + frame); `WouldBlock` when none is queued.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    pub(crate) fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        (&self.file).write(pkt)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
