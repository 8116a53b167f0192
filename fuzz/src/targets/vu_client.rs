//! The frontend's side of a vhost-user connection, for the targets that
//! speak to the daemon's real server code: messages as fuzz input (so a
//! mutation can change any header field, body byte or fd count), the file
//! descriptors they carry, and one connection served to its end by
//! `svq_relay::server::serve_connection`, exactly as the daemon serves a VMM.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use hostmem::memfd;
use svq_relay::device::SharedDevice;
use svq_relay::protocol::wire::{self, Header, Message, NEED_REPLY, VERSION};
use vmm_sys_util::eventfd::EventFd;

use crate::input::{Reader, Writer};

/// Request codes (vhost-user.rst, "Front-end message types").
pub use testkit::raw::req;

/// Guest memory as the VMM shares it: one memfd, GPA 0, at this VMM address.
pub const GUEST_SIZE: u64 = 1 << 20;
pub const GUEST_UADDR: u64 = 0x7f00_0000_0000;
pub const SMALL_SIZE: u64 = 0x1000;
pub const QUEUES: u32 = 2;
pub const QUEUE_SIZE: u32 = 256;

/// One message as fuzz input describes it.
#[derive(Clone, Debug, Default)]
pub struct Msg {
    pub request: u32,
    pub flags: u32,
    /// The header's size when it lies about the body.
    pub size: Option<u32>,
    pub body: Vec<u8>,
    /// Which descriptors travel with it (see [`Fds::open`]).
    pub fds: Vec<u8>,
}

impl Msg {
    pub fn new(request: u32, body: &[u8]) -> Self {
        Msg {
            request,
            flags: VERSION,
            body: body.to_vec(),
            ..Msg::default()
        }
    }

    pub fn u64(request: u32, v: u64) -> Self {
        Msg::new(request, &v.to_le_bytes())
    }

    pub fn state(request: u32, index: u32, num: u32) -> Self {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&num.to_le_bytes());
        Msg::new(request, &b)
    }

    pub fn with_fd(mut self, kind: u8) -> Self {
        self.fds.push(kind);
        self
    }

    pub fn need_reply(mut self) -> Self {
        self.flags |= NEED_REPLY;
        self
    }

    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.request).u32(self.flags);
        match self.size {
            None => w.u8(0),
            Some(s) => w.u8(1).u32(s),
        };
        w.u16(self.body.len() as u16).bytes(&self.body);
        w.u8(self.fds.len() as u8).bytes(&self.fds);
    }

    pub fn decode(r: &mut Reader) -> Msg {
        let request = r.u32();
        let flags = r.u32();
        let size = (r.u8() & 1 == 1).then(|| r.u32());
        let n = usize::from(r.u16() % 0x1100);
        let body = r.bytes(n).to_vec();
        let nfds = usize::from(r.u8() % 12);
        let fds = r.bytes(nfds).to_vec();
        Msg {
            request,
            flags,
            size,
            body,
            fds,
        }
    }
}

pub fn encode_all(msgs: &[Msg]) -> Vec<u8> {
    let mut w = Writer::default();
    for m in msgs {
        m.encode(&mut w);
    }
    w.0
}

pub fn decode_all(input: &[u8], max: usize) -> Vec<Msg> {
    let mut r = Reader::new(input);
    let mut v = Vec::new();
    while !r.is_empty() && v.len() < max {
        v.push(Msg::decode(&mut r));
    }
    v
}

pub fn memory_table(nregions: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&nregions.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in [0, GUEST_SIZE, GUEST_UADDR, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

pub fn vring_addr(index: u32) -> Vec<u8> {
    let base = GUEST_UADDR + 0x1_0000 * u64::from(index);
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in [base, base + 0x2000, base + 0x1000, 0x2000] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// What QEMU sends to bring a vhost-user-net device up (vhost_dev_init,
/// then vhost_dev_start), every request asking for an answer.
pub fn bring_up(features: u64, protocol: u64) -> Vec<Msg> {
    use req::*;
    let mut m = vec![
        Msg::new(GET_FEATURES, &[]),
        Msg::new(GET_PROTOCOL_FEATURES, &[]),
        Msg::u64(SET_PROTOCOL_FEATURES, protocol).need_reply(),
        Msg::new(GET_QUEUE_NUM, &[]),
        Msg::new(GET_MAX_MEM_SLOTS, &[]),
        Msg::new(SET_OWNER, &[]).need_reply(),
        // QEMU enables the rings before it sets the features.
        Msg::state(SET_VRING_ENABLE, 0, 1).need_reply(),
        Msg::u64(SET_FEATURES, features).need_reply(),
        Msg::new(SET_MEM_TABLE, &memory_table(1))
            .with_fd(0)
            .need_reply(),
    ];
    for q in 0..QUEUES {
        m.extend([
            Msg::state(SET_VRING_NUM, q, QUEUE_SIZE).need_reply(),
            Msg::state(SET_VRING_BASE, q, 0).need_reply(),
            Msg::new(SET_VRING_ADDR, &vring_addr(q)).need_reply(),
            Msg::u64(SET_VRING_KICK, u64::from(q))
                .with_fd(2)
                .need_reply(),
            Msg::u64(SET_VRING_CALL, u64::from(q))
                .with_fd(2)
                .need_reply(),
            Msg::state(SET_VRING_ENABLE, q, 1).need_reply(),
        ]);
    }
    m.push(Msg::u64(SET_STATUS, 0xf).need_reply());
    m.push(Msg::new(GET_STATUS, &[]));
    m
}

/// The descriptors a case can attach, reused across cases.
pub struct Fds {
    guest: File,
    small: File,
}

pub fn pipe() -> std::io::Result<(File, File)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the live array `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) })
}

impl Fds {
    pub fn new() -> Result<Self, String> {
        Ok(Fds {
            guest: memfd(c"svq-fuzz-guest", GUEST_SIZE).map_err(|e| e.to_string())?,
            small: memfd(c"svq-fuzz-small", SMALL_SIZE).map_err(|e| e.to_string())?,
        })
    }

    /// Zero guest memory (a fresh guest for the next case).
    pub fn reset(&self) -> Result<(), String> {
        for (f, size) in [(&self.guest, GUEST_SIZE), (&self.small, SMALL_SIZE)] {
            f.set_len(0)
                .and_then(|()| f.set_len(size))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A descriptor of `kind` for a message with `request`. A state
    /// transfer gets only pipes whose other end is closed (the daemon waits
    /// for a transfer's end, and an eventfd never ends: that wait is bounded
    /// and tested elsewhere): an empty stream to load, or nobody reading
    /// what is saved. The device-state target passes streams itself.
    pub fn open(&self, kind: u8, request: u32) -> std::io::Result<OwnedFd> {
        if request == req::SET_DEVICE_STATE_FD {
            let (r, w) = pipe()?;
            return Ok(if kind.is_multiple_of(2) {
                r.into()
            } else {
                w.into()
            });
        }
        Ok(match kind % 4 {
            0 => self.guest.try_clone()?.into(),
            1 => self.small.try_clone()?.into(),
            2 => {
                // Already signalled: a ring that starts has a kick waiting.
                // SAFETY: eventfd takes no pointers and returns a new
                // descriptor (or -1).
                let fd = unsafe { libc::eventfd(1, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `fd` was just created and is owned by nobody else.
                unsafe { OwnedFd::from_raw_fd(fd) }
            }
            _ => pipe()?.0.into(),
        })
    }
}

/// Send `msgs` on a fresh connection, close the frontend's write side, let
/// the daemon's server serve it to the end, and return every reply.
pub fn session(
    dev: &SharedDevice,
    sig: &EventFd,
    fds: &Fds,
    msgs: &[Msg],
) -> Result<Vec<Message>, String> {
    session_with(dev, sig, msgs, |m, k| fds.open(k, m.request))
}

/// Send one message with the descriptors `open(message, kind)` gives it;
/// the header's size is the one the message claims.
fn send(
    client: &UnixStream,
    m: &Msg,
    open: &mut impl FnMut(&Msg, u8) -> std::io::Result<OwnedFd>,
) -> Result<(), String> {
    let owned: Vec<OwnedFd> = m
        .fds
        .iter()
        .map(|&k| open(m, k))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("fd for request {}: {e}", m.request))?;
    let raw: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
    let h = Header {
        request: m.request,
        flags: m.flags,
        size: m.size.unwrap_or(m.body.len() as u32),
    };
    wire::send(client, h, &m.body, &raw).map_err(|e| format!("sending request {}: {e}", m.request))
}

/// [`session`] with the caller choosing each descriptor (`open(message,
/// kind)`), for targets that keep one end of what they pass.
pub fn session_with(
    dev: &SharedDevice,
    sig: &EventFd,
    msgs: &[Msg],
    mut open: impl FnMut(&Msg, u8) -> std::io::Result<OwnedFd>,
) -> Result<Vec<Message>, String> {
    let (client, server) = UnixStream::pair().map_err(|e| e.to_string())?;
    for m in msgs {
        send(&client, m, &mut open)?;
    }
    client
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    svq_relay::server::serve_connection(server, dev, sig, &None);
    let mut replies = Vec::new();
    while let Ok(m) = wire::recv_reply(&client) {
        replies.push(m);
    }
    Ok(replies)
}

/// Send `msgs` on a connection the daemon's server keeps serving on its
/// own thread until the returned stream is closed: a VMM that stays.
pub fn stay_connected(
    dev: &SharedDevice,
    sig: &EventFd,
    fds: &Fds,
    msgs: &[Msg],
) -> Result<(UnixStream, Vec<Message>), String> {
    let (client, server) = UnixStream::pair().map_err(|e| e.to_string())?;
    let (dev, sig) = (dev.clone(), sig.try_clone().map_err(|e| e.to_string())?);
    std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || svq_relay::server::serve_connection(server, &dev, &sig, &None))
        .map_err(|e| e.to_string())?;
    let mut replies = Vec::new();
    let mut open = |m: &Msg, k| fds.open(k, m.request);
    for m in msgs {
        send(&client, m, &mut open)?;
        if m.flags & NEED_REPLY != 0 || req::has_reply(m.request) {
            replies.push(
                wire::recv_reply(&client)
                    .map_err(|e| format!("no answer to request {}: {e}", m.request))?,
            );
        }
    }
    Ok((client, replies))
}
