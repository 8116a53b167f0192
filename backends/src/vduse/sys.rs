//! The VDUSE kernel interface (Linux `include/uapi/linux/vduse.h`, API
//! version 0 as Linux 6.12 has it): the structs, the ioctl numbers, and the
//! [`VduseIoctls`] trait the server is written against, so the request
//! handling runs against a fake in tests.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref};

pub const VDUSE_BASE: u32 = 0x81;
pub const API_VERSION: u64 = 0;
pub const NAME_MAX: usize = 256;
pub const CONTROL_PATH: &str = "/dev/vduse/control";

pub const ACCESS_RO: u8 = 0x1;
pub const ACCESS_WO: u8 = 0x2;
pub const ACCESS_RW: u8 = 0x3;

/// `enum vduse_req_type`.
pub const REQ_GET_VQ_STATE: u32 = 0;
pub const REQ_SET_STATUS: u32 = 1;
pub const REQ_UPDATE_IOTLB: u32 = 2;

pub const RESULT_OK: u32 = 0;
pub const RESULT_FAILED: u32 = 1;

/// `struct vduse_dev_config` without its trailing config bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevConfig {
    pub name: [u8; NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    /// ngroups, nas (API version 1 only, zero here) and reserved[11].
    pub reserved: [u32; 13],
    pub config_size: u32,
}

/// `struct vduse_iotlb_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbEntry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VqConfig {
    pub index: u32,
    pub max_size: u16,
    pub reserved1: u16,
    pub group: u32,
    pub reserved2: [u16; 10],
}

/// `struct vduse_vq_info` (split rings: only `avail_index` of the state union).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VqInfo {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    /// The state union: `split.avail_index` is the first u16.
    pub state: [u16; 4],
    pub ready: u8,
}

impl VqInfo {
    pub fn avail_index(&self) -> u16 {
        self.state[0]
    }
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VqEventfd {
    pub index: u32,
    pub fd: i32,
}

/// `struct vduse_dev_request` / `struct vduse_dev_response`: both are 152
/// bytes, a header and a 128-byte union.
pub const MSG_SIZE: usize = 152;

const _: () = assert!(std::mem::size_of::<DevConfig>() == 336);
const _: () = assert!(std::mem::size_of::<IotlbEntry>() == 32);
const _: () = assert!(std::mem::size_of::<VqConfig>() == 32);
const _: () = assert!(std::mem::size_of::<VqInfo>() == 48);
const _: () = assert!(std::mem::size_of::<VqEventfd>() == 8);

/// A request read from the device fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    GetVqState {
        id: u32,
        index: u32,
    },
    SetStatus {
        id: u32,
        status: u8,
    },
    UpdateIotlb {
        id: u32,
        start: u64,
        last: u64,
    },
    /// A type this server does not know: answered FAILED.
    Unknown {
        id: u32,
        kind: u32,
    },
}

fn u32_at(b: &[u8; MSG_SIZE], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8; MSG_SIZE], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The union starts at byte 24 (type, request_id, reserved[4]).
const BODY: usize = 24;

impl Request {
    pub fn parse(b: &[u8; MSG_SIZE]) -> Request {
        let kind = u32_at(b, 0);
        let id = u32_at(b, 4);
        match kind {
            REQ_GET_VQ_STATE => Request::GetVqState {
                id,
                index: u32_at(b, BODY),
            },
            REQ_SET_STATUS => Request::SetStatus {
                id,
                status: b[BODY],
            },
            REQ_UPDATE_IOTLB => Request::UpdateIotlb {
                id,
                start: u64_at(b, BODY),
                last: u64_at(b, BODY + 8),
            },
            _ => Request::Unknown { id, kind },
        }
    }

    pub fn id(&self) -> u32 {
        match *self {
            Request::GetVqState { id, .. }
            | Request::SetStatus { id, .. }
            | Request::UpdateIotlb { id, .. }
            | Request::Unknown { id, .. } => id,
        }
    }

    /// The bytes the kernel would send (the parser's round-trip test).
    #[cfg(test)]
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        let put32 = |b: &mut [u8; MSG_SIZE], at: usize, v: u32| {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        match *self {
            Request::GetVqState { id, index } => {
                put32(&mut b, 0, REQ_GET_VQ_STATE);
                put32(&mut b, 4, id);
                put32(&mut b, BODY, index);
            }
            Request::SetStatus { id, status } => {
                put32(&mut b, 0, REQ_SET_STATUS);
                put32(&mut b, 4, id);
                b[BODY] = status;
            }
            Request::UpdateIotlb { id, start, last } => {
                put32(&mut b, 0, REQ_UPDATE_IOTLB);
                put32(&mut b, 4, id);
                b[BODY..BODY + 8].copy_from_slice(&start.to_le_bytes());
                b[BODY + 8..BODY + 16].copy_from_slice(&last.to_le_bytes());
            }
            Request::Unknown { id, kind } => {
                put32(&mut b, 0, kind);
                put32(&mut b, 4, id);
            }
        }
        b
    }
}

/// A response: `result` and, for GET_VQ_STATE, the split avail index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub id: u32,
    pub ok: bool,
    pub avail_index: Option<u16>,
}

impl Response {
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        let result = if self.ok { RESULT_OK } else { RESULT_FAILED };
        b[4..8].copy_from_slice(&result.to_le_bytes());
        if let Some(avail) = self.avail_index {
            // vq_state: index (u32), then split.avail_index.
            b[BODY + 4..BODY + 6].copy_from_slice(&avail.to_le_bytes());
        }
        b
    }
}

/// What the server needs from `/dev/vduse/NAME`.
pub trait VduseIoctls: Send {
    /// The next request, or None when none is pending (non-blocking fd).
    fn read_request(&mut self) -> io::Result<Option<Request>>;
    fn write_response(&mut self, resp: &Response) -> io::Result<()>;
    /// VDUSE_DEV_GET_FEATURES: what the driver wrote.
    fn driver_features(&self) -> io::Result<u64>;
    /// VDUSE_VQ_GET_INFO.
    fn vq_info(&self, index: u32) -> io::Result<VqInfo>;
    /// VDUSE_VQ_SETUP_KICKFD.
    fn set_kickfd(&self, index: u32, fd: &EventFd) -> io::Result<()>;
    /// VDUSE_VQ_INJECT_IRQ.
    fn inject_irq(&self, index: u32) -> io::Result<()>;
    /// VDUSE_IOTLB_GET_FD: the first mapping overlapping `[start, last]` and
    /// a file to mmap it from, or None when nothing overlaps (EINVAL).
    fn iotlb_entry(&self, start: u64, last: u64) -> io::Result<Option<(IotlbEntry, File)>>;
    /// The fd epoll waits on for requests.
    fn request_fd(&self) -> RawFd;
}

// VDUSE ioctls, `_IOx(VDUSE_BASE, nr, type)`.
vmm_sys_util::ioctl_iow_nr!(VDUSE_SET_API_VERSION, VDUSE_BASE, 0x01, u64);
vmm_sys_util::ioctl_iow_nr!(VDUSE_CREATE_DEV, VDUSE_BASE, 0x02, DevConfig);
vmm_sys_util::ioctl_iow_nr!(VDUSE_DESTROY_DEV, VDUSE_BASE, 0x03, [u8; NAME_MAX]);
vmm_sys_util::ioctl_iowr_nr!(VDUSE_IOTLB_GET_FD, VDUSE_BASE, 0x10, IotlbEntry);
vmm_sys_util::ioctl_ior_nr!(VDUSE_DEV_GET_FEATURES, VDUSE_BASE, 0x11, u64);
vmm_sys_util::ioctl_iow_nr!(VDUSE_VQ_SETUP, VDUSE_BASE, 0x14, VqConfig);
vmm_sys_util::ioctl_iowr_nr!(VDUSE_VQ_GET_INFO, VDUSE_BASE, 0x15, VqInfo);
vmm_sys_util::ioctl_iow_nr!(VDUSE_VQ_SETUP_KICKFD, VDUSE_BASE, 0x16, VqEventfd);
vmm_sys_util::ioctl_iow_nr!(VDUSE_VQ_INJECT_IRQ, VDUSE_BASE, 0x17, u32);

fn check(rc: i32) -> io::Result<i32> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `/dev/vduse/control`: creates and destroys devices.
pub struct Control {
    file: File,
}

impl AsRawFd for Control {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

pub fn name_bytes(name: &str) -> io::Result<[u8; NAME_MAX]> {
    let mut out = [0u8; NAME_MAX];
    if name.is_empty() || name.len() >= NAME_MAX || name.contains(['/', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("VDUSE device name {name:?}: 1 to 255 bytes, no '/'"),
        ));
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

impl Control {
    pub fn open() -> io::Result<Control> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)?;
        let c = Control { file };
        let v = API_VERSION;
        // SAFETY: VDUSE_SET_API_VERSION reads one u64 from the pointer, which
        // refers to a live local; the fd is the VDUSE control device.
        check(unsafe { ioctl_with_ref(&c, VDUSE_SET_API_VERSION(), &v) })?;
        Ok(c)
    }

    /// VDUSE_CREATE_DEV with `config` followed by the config space bytes.
    pub fn create(&self, config: &DevConfig, space: &[u8]) -> io::Result<()> {
        // The kernel reads config_size bytes after the struct: they must be
        // there.
        if config.config_size as usize != space.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "config_size {} but {} config bytes",
                    config.config_size,
                    space.len()
                ),
            ));
        }
        let head = std::mem::size_of::<DevConfig>();
        let mut buf = vec![0u8; head + space.len()];
        // SAFETY: DevConfig is repr(C) plain data with no padding (its size
        // is asserted above), so viewing it as bytes is sound; `buf` has room
        // for `head` bytes at its start.
        let raw =
            unsafe { std::slice::from_raw_parts((config as *const DevConfig).cast::<u8>(), head) };
        buf[..head].copy_from_slice(raw);
        buf[head..].copy_from_slice(space);
        // SAFETY: the kernel reads sizeof(DevConfig) bytes and then
        // config_size bytes after them from `buf`, which holds exactly that
        // (config_size == space.len(), checked above); `buf` outlives the
        // call.
        check(unsafe { ioctl_with_ptr(self, VDUSE_CREATE_DEV(), buf.as_ptr()) })?;
        Ok(())
    }

    pub fn destroy(&self, name: &str) -> io::Result<()> {
        let n = name_bytes(name)?;
        // SAFETY: the kernel reads NAME_MAX bytes from a live local array.
        check(unsafe { ioctl_with_ref(self, VDUSE_DESTROY_DEV(), &n) })?;
        Ok(())
    }
}

/// `/dev/vduse/NAME`, opened non-blocking.
pub struct KernelVduse {
    file: File,
}

impl AsRawFd for KernelVduse {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl KernelVduse {
    pub fn open(name: &str) -> io::Result<KernelVduse> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(format!("/dev/vduse/{name}"))?;
        Ok(KernelVduse { file })
    }

    /// VDUSE_VQ_SETUP: the ring size limit of one queue (before the device
    /// is added to the vDPA bus).
    pub fn setup_vq(&self, index: u32, max_size: u16) -> io::Result<()> {
        let c = VqConfig {
            index,
            max_size,
            ..Default::default()
        };
        // SAFETY: the kernel reads one VqConfig from a live local.
        check(unsafe { ioctl_with_ref(self, VDUSE_VQ_SETUP(), &c) })?;
        Ok(())
    }
}

impl VduseIoctls for KernelVduse {
    fn read_request(&mut self) -> io::Result<Option<Request>> {
        use std::io::Read;
        let mut b = [0u8; MSG_SIZE];
        match self.file.read(&mut b) {
            Ok(MSG_SIZE) => Ok(Some(Request::parse(&b))),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("short VDUSE request: {n} bytes"),
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_response(&mut self, resp: &Response) -> io::Result<()> {
        use std::io::Write;
        let b = resp.encode();
        let n = self.file.write(&b)?;
        if n != MSG_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short VDUSE response write: {n} bytes"),
            ));
        }
        Ok(())
    }

    fn driver_features(&self) -> io::Result<u64> {
        let mut f = 0u64;
        // SAFETY: the kernel writes one u64 into a live local.
        check(unsafe { ioctl_with_mut_ref(self, VDUSE_DEV_GET_FEATURES(), &mut f) })?;
        Ok(f)
    }

    fn vq_info(&self, index: u32) -> io::Result<VqInfo> {
        let mut info = VqInfo {
            index,
            ..Default::default()
        };
        // SAFETY: the kernel reads the index from and writes one VqInfo into
        // a live local of exactly that layout.
        check(unsafe { ioctl_with_mut_ref(self, VDUSE_VQ_GET_INFO(), &mut info) })?;
        Ok(info)
    }

    fn set_kickfd(&self, index: u32, fd: &EventFd) -> io::Result<()> {
        let e = VqEventfd {
            index,
            fd: fd.as_raw_fd(),
        };
        // SAFETY: the kernel reads one VqEventfd from a live local and takes
        // its own reference on the eventfd.
        check(unsafe { ioctl_with_ref(self, VDUSE_VQ_SETUP_KICKFD(), &e) })?;
        Ok(())
    }

    fn inject_irq(&self, index: u32) -> io::Result<()> {
        // SAFETY: the kernel reads one u32 from a live local.
        check(unsafe { ioctl_with_ref(self, VDUSE_VQ_INJECT_IRQ(), &index) })?;
        Ok(())
    }

    fn iotlb_entry(&self, start: u64, last: u64) -> io::Result<Option<(IotlbEntry, File)>> {
        let mut e = IotlbEntry {
            start,
            last,
            ..Default::default()
        };
        // SAFETY: the kernel reads start/last from and writes one IotlbEntry
        // into a live local; on success it returns a new fd we now own.
        let rc = unsafe { ioctl_with_mut_ref(self, VDUSE_IOTLB_GET_FD(), &mut e) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::EINVAL) {
                Ok(None)
            } else {
                Err(err)
            };
        }
        // SAFETY: rc is a file descriptor the kernel just installed for this
        // process and nothing else owns it.
        let file = unsafe { File::from_raw_fd(rc) };
        Ok(Some((e, file)))
    }

    fn request_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // _IOC(dir, 0x81, nr, size): dir 1 = write, 2 = read, 3 = both.
        let ioc = |dir: u64, nr: u64, size: u64| (dir << 30) | (size << 16) | (0x81 << 8) | nr;
        assert_eq!(VDUSE_SET_API_VERSION() as u64, ioc(1, 0x01, 8));
        assert_eq!(VDUSE_CREATE_DEV() as u64, ioc(1, 0x02, 336));
        assert_eq!(VDUSE_DESTROY_DEV() as u64, ioc(1, 0x03, 256));
        assert_eq!(VDUSE_IOTLB_GET_FD() as u64, ioc(3, 0x10, 32));
        assert_eq!(VDUSE_DEV_GET_FEATURES() as u64, ioc(2, 0x11, 8));
        assert_eq!(VDUSE_VQ_SETUP() as u64, ioc(1, 0x14, 32));
        assert_eq!(VDUSE_VQ_GET_INFO() as u64, ioc(3, 0x15, 48));
        assert_eq!(VDUSE_VQ_SETUP_KICKFD() as u64, ioc(1, 0x16, 8));
        assert_eq!(VDUSE_VQ_INJECT_IRQ() as u64, ioc(1, 0x17, 4));
    }

    #[test]
    fn requests_round_trip_and_unknown_types_are_kept() {
        for r in [
            Request::GetVqState { id: 7, index: 1 },
            Request::SetStatus { id: 8, status: 0xf },
            Request::UpdateIotlb {
                id: 9,
                start: 0,
                last: u64::MAX,
            },
            Request::Unknown { id: 10, kind: 3 },
        ] {
            assert_eq!(Request::parse(&r.encode()), r);
        }
    }

    #[test]
    fn a_response_carries_the_avail_index_where_the_kernel_reads_it() {
        let b = Response {
            id: 5,
            ok: true,
            avail_index: Some(0x1234),
        }
        .encode();
        assert_eq!(&b[0..8], &[5, 0, 0, 0, 0, 0, 0, 0]);
        // vduse_dev_response.vq_state.split.avail_index: offset 24 + 4.
        assert_eq!(&b[28..30], &[0x34, 0x12]);
        let failed = Response {
            id: 6,
            ok: false,
            avail_index: None,
        }
        .encode();
        assert_eq!(&failed[4..8], &[1, 0, 0, 0]);
    }

    #[test]
    fn device_names_are_checked() {
        assert!(name_bytes("svq0").is_ok());
        assert!(name_bytes("").is_err());
        assert!(name_bytes("a/b").is_err());
        assert!(name_bytes(&"x".repeat(256)).is_err());
    }
}
