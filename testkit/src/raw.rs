//! Hand-made vhost-user messages on a raw socket, for inputs the vhost
//! crate's Frontend refuses to produce.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const VERSION: u32 = 0x1;
pub const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;

/// Request codes (vhost-user.rst, "Front-end message types"), from the
/// vhost crate's table.
pub mod req {
    use vhost::vhost_user::message::FrontendReq;
    pub const GET_FEATURES: u32 = FrontendReq::GET_FEATURES as u32;
    pub const SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
    pub const SET_OWNER: u32 = FrontendReq::SET_OWNER as u32;
    pub const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
    pub const SET_LOG_BASE: u32 = FrontendReq::SET_LOG_BASE as u32;
    pub const SET_LOG_FD: u32 = FrontendReq::SET_LOG_FD as u32;
    pub const SET_VRING_NUM: u32 = FrontendReq::SET_VRING_NUM as u32;
    pub const SET_VRING_ADDR: u32 = FrontendReq::SET_VRING_ADDR as u32;
    pub const SET_VRING_BASE: u32 = FrontendReq::SET_VRING_BASE as u32;
    pub const GET_VRING_BASE: u32 = FrontendReq::GET_VRING_BASE as u32;
    pub const SET_VRING_KICK: u32 = FrontendReq::SET_VRING_KICK as u32;
    pub const SET_VRING_CALL: u32 = FrontendReq::SET_VRING_CALL as u32;
    pub const GET_PROTOCOL_FEATURES: u32 = FrontendReq::GET_PROTOCOL_FEATURES as u32;
    pub const SET_PROTOCOL_FEATURES: u32 = FrontendReq::SET_PROTOCOL_FEATURES as u32;
    pub const GET_QUEUE_NUM: u32 = FrontendReq::GET_QUEUE_NUM as u32;
    pub const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
    pub const GET_CONFIG: u32 = FrontendReq::GET_CONFIG as u32;
    pub const SET_CONFIG: u32 = FrontendReq::SET_CONFIG as u32;
    pub const RESET_DEVICE: u32 = FrontendReq::RESET_DEVICE as u32;
    pub const SET_STATUS: u32 = FrontendReq::SET_STATUS as u32;
    pub const GET_STATUS: u32 = FrontendReq::GET_STATUS as u32;
    pub const GET_INFLIGHT_FD: u32 = FrontendReq::GET_INFLIGHT_FD as u32;
    pub const SET_INFLIGHT_FD: u32 = FrontendReq::SET_INFLIGHT_FD as u32;
    pub const GET_MAX_MEM_SLOTS: u32 = FrontendReq::GET_MAX_MEM_SLOTS as u32;
    pub const ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
    pub const REM_MEM_REG: u32 = FrontendReq::REM_MEM_REG as u32;
    pub const SET_DEVICE_STATE_FD: u32 = FrontendReq::SET_DEVICE_STATE_FD as u32;
    pub const CHECK_DEVICE_STATE: u32 = FrontendReq::CHECK_DEVICE_STATE as u32;
    /// Requests whose answer is a reply of their own, not an ack.
    pub fn has_reply(code: u32) -> bool {
        matches!(
            code,
            GET_FEATURES
                | GET_PROTOCOL_FEATURES
                | GET_QUEUE_NUM
                | GET_VRING_BASE
                | GET_CONFIG
                | GET_INFLIGHT_FD
                | GET_MAX_MEM_SLOTS
                | GET_STATUS
                | SET_DEVICE_STATE_FD
                | CHECK_DEVICE_STATE
                | SET_LOG_BASE
        )
    }
}

pub use req::*;

pub fn header(req: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&req.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

/// VhostUserVringState {index: u32, num: u32}.
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

/// Sends one message asking for a reply-ack.
pub fn send(s: &UnixStream, req: u32, body: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut msg = header(req, VERSION | NEED_REPLY, body.len() as u32);
    msg.extend_from_slice(body);
    if fds.is_empty() {
        (&*s).write_all(&msg)
    } else {
        s.send_with_fds(&[&msg[..]], fds)
            .map(|_| ())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// What came back for a request.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// A reply message for the request with this body.
    Msg(Vec<u8>),
    /// The daemon closed the connection.
    Closed,
    /// Nothing within the socket's read timeout.
    Silent,
    /// The daemon answered with something that is not a reply to it.
    Bogus(String),
}

impl Reply {
    /// An ack (u64) with a non-zero status, or a closed connection: the
    /// daemon refused the request.
    pub fn is_refusal(&self) -> bool {
        match self {
            Reply::Closed => true,
            Reply::Msg(b) if b.len() == 8 => u64::from_le_bytes(b[..8].try_into().unwrap()) != 0,
            _ => false,
        }
    }
}

impl Reply {
    /// The u64 of an 8-byte reply.
    pub fn u64(&self) -> Option<u64> {
        match self {
            Reply::Msg(b) if b.len() == 8 => Some(u64::from_le_bytes(b[..8].try_into().unwrap())),
            _ => None,
        }
    }
}

/// Sends one message without NEED_REPLY (as QEMU sends most of them).
pub fn send_plain(s: &UnixStream, req: u32, body: &[u8]) -> std::io::Result<()> {
    let mut msg = header(req, VERSION, body.len() as u32);
    msg.extend_from_slice(body);
    (&*s).write_all(&msg)
}

pub fn recv(s: &UnixStream, req: u32) -> Reply {
    let mut h = [0u8; 12];
    if let Err(e) = (&*s).read_exact(&mut h) {
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Reply::Silent,
            _ => Reply::Closed,
        };
    }
    let r = u32::from_le_bytes(h[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(h[4..8].try_into().unwrap());
    let size = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if r != req || flags & REPLY == 0 || size > 4096 {
        return Reply::Bogus(format!(
            "req {r} flags {flags:#x} size {size} for request {req}"
        ));
    }
    let mut body = vec![0u8; size as usize];
    if (&*s).read_exact(&mut body).is_err() {
        return Reply::Closed;
    }
    Reply::Msg(body)
}

/// Sends a request and returns what came back.
pub fn request(s: &UnixStream, req: u32, body: &[u8], fds: &[RawFd]) -> Reply {
    if send(s, req, body, fds).is_err() {
        return Reply::Closed;
    }
    recv(s, req)
}

/// Waits (bounded by the read timeout) for the daemon to close `s`;
/// true if it did. Anything it sends meanwhile is ignored.
pub fn wait_closed(s: &UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match (&*s).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}
