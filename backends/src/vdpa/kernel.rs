//! [`VdpaIoctls`] over a real `/dev/vhost-vdpa-N` file descriptor.
//!
//! Ioctl numbers and argument structs come from the vhost crate's bindings.
//! The crate's own `VhostKernVdpa` is not used: it needs a guest memory object
//! the relay does not have (addresses here are IOVAs the relay chose), its
//! `set_group_asid` issues VHOST_VDPA_GET_VRING_GROUP instead of
//! VHOST_VDPA_SET_GROUP_ASID (vhost 0.18), and its IOTLB messages carry
//! neither an ASID nor batch hints.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::raw::{c_int, c_uint};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

use vhost::vhost_kern::vhost_binding::{
    vhost_vdpa_iova_range, vhost_vring_addr, vhost_vring_file, vhost_vring_state,
    VHOST_GET_BACKEND_FEATURES, VHOST_GET_FEATURES, VHOST_GET_VRING_BASE,
    VHOST_SET_BACKEND_FEATURES, VHOST_SET_FEATURES, VHOST_SET_OWNER, VHOST_SET_VRING_ADDR,
    VHOST_SET_VRING_BASE, VHOST_SET_VRING_CALL, VHOST_SET_VRING_KICK, VHOST_SET_VRING_NUM,
    VHOST_VDPA_GET_AS_NUM, VHOST_VDPA_GET_CONFIG, VHOST_VDPA_GET_CONFIG_SIZE,
    VHOST_VDPA_GET_DEVICE_ID, VHOST_VDPA_GET_GROUP_NUM, VHOST_VDPA_GET_IOVA_RANGE,
    VHOST_VDPA_GET_STATUS, VHOST_VDPA_GET_VQS_COUNT, VHOST_VDPA_GET_VRING_GROUP,
    VHOST_VDPA_GET_VRING_NUM, VHOST_VDPA_SET_CONFIG, VHOST_VDPA_SET_CONFIG_CALL,
    VHOST_VDPA_SET_GROUP_ASID, VHOST_VDPA_SET_STATUS, VHOST_VDPA_SET_VRING_ENABLE,
    VHOST_VDPA_SUSPEND, VHOST_VIRTIO,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref,
};

use super::sys::{IotlbMsg, VdpaIoctls};
use crate::{IovaRange, VringAddrs};

// The vhost crate (0.18) has no binding for this one:
// #define VHOST_VDPA_RESUME _IO(VHOST_VIRTIO, 0x7E)   (SUSPEND is 0x7D)
vmm_sys_util::ioctl_io_nr!(VHOST_VDPA_RESUME, VHOST_VIRTIO, 0x7e);

/// VHOST_FILE_UNBIND: the fd value that detaches an eventfd.
const FILE_UNBIND: c_int = -1;

/// An open vhost-vdpa character device.
pub struct KernelVdpa {
    file: File,
}

impl KernelVdpa {
    pub fn open(path: &Path) -> io::Result<KernelVdpa> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(KernelVdpa { file })
    }
}

impl AsRawFd for KernelVdpa {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn raw_fd(fd: Option<&EventFd>) -> c_int {
    fd.map_or(FILE_UNBIND, |f| f.as_raw_fd())
}

/// `struct vhost_vdpa_config` (off, len, then `len` bytes) in one buffer.
fn config_buf(offset: u32, len: usize) -> io::Result<Vec<u8>> {
    let len32 = u32::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut buf = vec![0u8; 8 + len];
    buf[0..4].copy_from_slice(&offset.to_ne_bytes());
    buf[4..8].copy_from_slice(&len32.to_ne_bytes());
    Ok(buf)
}

impl KernelVdpa {
    fn get_u64(&self, req: libc::c_ulong) -> io::Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: `req` is a _IOR ioctl whose argument is a __u64; `v` is a
        // live u64 the kernel writes into, and the return value is checked.
        check(unsafe { ioctl_with_mut_ref(self, req, &mut v) })?;
        Ok(v)
    }

    fn set_u64(&self, req: libc::c_ulong, v: u64) -> io::Result<()> {
        // SAFETY: `req` is a _IOW ioctl whose argument is a __u64 the kernel
        // only reads; the return value is checked.
        check(unsafe { ioctl_with_ref(self, req, &v) })
    }

    fn get_u32(&self, req: libc::c_ulong) -> io::Result<u32> {
        let mut v: c_uint = 0;
        // SAFETY: `req` is a _IOR ioctl whose argument is a __u32; `v` is a
        // live u32 the kernel writes into, and the return value is checked.
        check(unsafe { ioctl_with_mut_ref(self, req, &mut v) })?;
        Ok(v)
    }

    fn vring_state(&self, req: libc::c_ulong, index: u32, num: u32) -> io::Result<()> {
        let s = vhost_vring_state { index, num };
        // SAFETY: `req` is a _IOW ioctl taking a struct vhost_vring_state,
        // which `s` is; the kernel only reads it. The return value is checked.
        check(unsafe { ioctl_with_ref(self, req, &s) })
    }

    fn vring_file(&self, req: libc::c_ulong, index: u32, fd: Option<&EventFd>) -> io::Result<()> {
        let f = vhost_vring_file {
            index,
            fd: raw_fd(fd),
        };
        // SAFETY: `req` is a _IOW ioctl taking a struct vhost_vring_file,
        // which `f` is; the kernel only reads it and takes its own reference
        // on the eventfd. The return value is checked.
        check(unsafe { ioctl_with_ref(self, req, &f) })
    }

    /// GET_VRING_GROUP and GET_VRING_BASE read `num` back for `index`.
    fn vring_state_read(&self, req: libc::c_ulong, index: u32) -> io::Result<u32> {
        let mut s = vhost_vring_state { index, num: 0 };
        // SAFETY: `req` is a _IOWR ioctl taking a struct vhost_vring_state,
        // which `s` is; the kernel reads `index` and writes `num`. The return
        // value is checked.
        check(unsafe { ioctl_with_mut_ref(self, req, &mut s) })?;
        Ok(s.num)
    }
}

impl VdpaIoctls for KernelVdpa {
    fn set_owner(&self) -> io::Result<()> {
        // SAFETY: VHOST_SET_OWNER takes no argument; the return value is checked.
        check(unsafe { ioctl(self, VHOST_SET_OWNER()) })
    }

    fn get_features(&self) -> io::Result<u64> {
        self.get_u64(VHOST_GET_FEATURES())
    }

    fn set_features(&self, features: u64) -> io::Result<()> {
        self.set_u64(VHOST_SET_FEATURES(), features)
    }

    fn get_backend_features(&self) -> io::Result<u64> {
        self.get_u64(VHOST_GET_BACKEND_FEATURES())
    }

    fn set_backend_features(&self, features: u64) -> io::Result<()> {
        self.set_u64(VHOST_SET_BACKEND_FEATURES(), features)
    }

    fn get_device_id(&self) -> io::Result<u32> {
        self.get_u32(VHOST_VDPA_GET_DEVICE_ID())
    }

    fn get_status(&self) -> io::Result<u8> {
        let mut s: u8 = 0;
        // SAFETY: VHOST_VDPA_GET_STATUS writes one __u8 into `s`, which is
        // live for the call; the return value is checked.
        check(unsafe { ioctl_with_mut_ref(self, VHOST_VDPA_GET_STATUS(), &mut s) })?;
        Ok(s)
    }

    fn set_status(&self, status: u8) -> io::Result<()> {
        // SAFETY: VHOST_VDPA_SET_STATUS reads one __u8; the return value is checked.
        check(unsafe { ioctl_with_ref(self, VHOST_VDPA_SET_STATUS(), &status) })
    }

    fn get_config_size(&self) -> io::Result<u32> {
        self.get_u32(VHOST_VDPA_GET_CONFIG_SIZE())
    }

    fn get_config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()> {
        let mut c = config_buf(offset, buf.len())?;
        // SAFETY: `c` is a struct vhost_vdpa_config header (off, len) followed
        // by exactly `len` bytes, so the kernel's copy_to_user of `len` bytes
        // into `c->buf` stays inside the Vec. The return value is checked.
        check(unsafe { ioctl_with_mut_ptr(self, VHOST_VDPA_GET_CONFIG(), c.as_mut_ptr()) })?;
        buf.copy_from_slice(&c[8..]);
        Ok(())
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()> {
        let mut c = config_buf(offset, data.len())?;
        c[8..].copy_from_slice(data);
        // SAFETY: `c` is a struct vhost_vdpa_config header followed by `len`
        // bytes the kernel reads; the return value is checked.
        check(unsafe { ioctl_with_ptr(self, VHOST_VDPA_SET_CONFIG(), c.as_ptr()) })
    }

    fn get_vring_num(&self) -> io::Result<u16> {
        let mut n: u16 = 0;
        // SAFETY: VHOST_VDPA_GET_VRING_NUM writes one __u16 into `n`; the
        // return value is checked.
        check(unsafe { ioctl_with_mut_ref(self, VHOST_VDPA_GET_VRING_NUM(), &mut n) })?;
        Ok(n)
    }

    fn get_iova_range(&self) -> io::Result<IovaRange> {
        let mut r = vhost_vdpa_iova_range { first: 0, last: 0 };
        // SAFETY: VHOST_VDPA_GET_IOVA_RANGE writes a struct
        // vhost_vdpa_iova_range, which `r` is; the return value is checked.
        check(unsafe { ioctl_with_mut_ref(self, VHOST_VDPA_GET_IOVA_RANGE(), &mut r) })?;
        Ok(IovaRange {
            first: r.first,
            last: r.last,
        })
    }

    fn get_vqs_count(&self) -> io::Result<u32> {
        self.get_u32(VHOST_VDPA_GET_VQS_COUNT())
    }

    fn get_group_num(&self) -> io::Result<u32> {
        self.get_u32(VHOST_VDPA_GET_GROUP_NUM())
    }

    fn get_as_num(&self) -> io::Result<u32> {
        self.get_u32(VHOST_VDPA_GET_AS_NUM())
    }

    fn get_vring_group(&self, queue: u32) -> io::Result<u32> {
        self.vring_state_read(VHOST_VDPA_GET_VRING_GROUP(), queue)
    }

    fn set_group_asid(&self, group: u32, asid: u32) -> io::Result<()> {
        self.vring_state(VHOST_VDPA_SET_GROUP_ASID(), group, asid)
    }

    fn set_vring_num(&self, queue: u32, num: u16) -> io::Result<()> {
        self.vring_state(VHOST_SET_VRING_NUM(), queue, u32::from(num))
    }

    fn set_vring_addr(&self, queue: u32, addrs: &VringAddrs) -> io::Result<()> {
        let a = vhost_vring_addr {
            index: queue,
            flags: 0,
            desc_user_addr: addrs.desc,
            used_user_addr: addrs.used,
            avail_user_addr: addrs.avail,
            log_guest_addr: 0,
        };
        // SAFETY: VHOST_SET_VRING_ADDR reads a struct vhost_vring_addr, which
        // `a` is; the return value is checked.
        check(unsafe { ioctl_with_ref(self, VHOST_SET_VRING_ADDR(), &a) })
    }

    fn set_vring_base(&self, queue: u32, base: u32) -> io::Result<()> {
        self.vring_state(VHOST_SET_VRING_BASE(), queue, base)
    }

    fn get_vring_base(&self, queue: u32) -> io::Result<u32> {
        self.vring_state_read(VHOST_GET_VRING_BASE(), queue)
    }

    fn set_vring_kick(&self, queue: u32, fd: Option<&EventFd>) -> io::Result<()> {
        self.vring_file(VHOST_SET_VRING_KICK(), queue, fd)
    }

    fn set_vring_call(&self, queue: u32, fd: Option<&EventFd>) -> io::Result<()> {
        self.vring_file(VHOST_SET_VRING_CALL(), queue, fd)
    }

    fn set_vring_enable(&self, queue: u32, enable: bool) -> io::Result<()> {
        self.vring_state(VHOST_VDPA_SET_VRING_ENABLE(), queue, u32::from(enable))
    }

    fn suspend(&self) -> io::Result<()> {
        // SAFETY: VHOST_VDPA_SUSPEND takes no argument; the return value is checked.
        check(unsafe { ioctl(self, VHOST_VDPA_SUSPEND()) })
    }

    fn resume(&self) -> io::Result<()> {
        // SAFETY: VHOST_VDPA_RESUME (defined above) takes no argument; the
        // return value is checked.
        check(unsafe { ioctl(self, VHOST_VDPA_RESUME()) })
    }

    fn set_config_call(&self, fd: Option<&EventFd>) -> io::Result<()> {
        let fd = raw_fd(fd);
        // SAFETY: VHOST_VDPA_SET_CONFIG_CALL reads one int (an eventfd or -1);
        // the return value is checked.
        check(unsafe { ioctl_with_ref(self, VHOST_VDPA_SET_CONFIG_CALL(), &fd) })
    }

    fn send_iotlb(&self, msg: &IotlbMsg) -> io::Result<()> {
        let bytes = msg.to_bytes();
        // The kernel consumes one whole message per write and reports a
        // failed update as the write's error.
        let n = (&self.file).write(&bytes)?;
        if n != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short IOTLB write: {n} of {} bytes", bytes.len()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_buffer_is_header_then_bytes() {
        let b = config_buf(10, 2).unwrap();
        assert_eq!(b.len(), 10);
        assert_eq!(&b[0..4], &10u32.to_ne_bytes());
        assert_eq!(&b[4..8], &2u32.to_ne_bytes());
    }

    #[test]
    fn opening_a_missing_device_fails_cleanly() {
        let e = KernelVdpa::open(Path::new("/dev/vhost-vdpa-does-not-exist"))
            .err()
            .map(|e| e.kind());
        assert_eq!(e, Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn resume_is_io_0x7e_on_vhost() {
        // _IO(0xAF, 0x7E): no direction, no size.
        assert_eq!(VHOST_VDPA_RESUME(), 0xaf7e);
        assert_eq!(VHOST_VDPA_SUSPEND(), 0xaf7d);
    }
}
