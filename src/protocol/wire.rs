//! vhost-user framing on a Unix stream socket: the 12-byte header, the body
//! whose size it announces, and the file descriptors that travel with the
//! message as `SCM_RIGHTS` control data.
//!
//! Nothing here knows what a request means; a header that breaks the
//! framing rules (version, reserved bits, size) is a `WireError`, after
//! which the stream cannot be trusted and the connection ends.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const HEADER_SIZE: usize = 12;
/// Protocol version 1 in bits 0..=1 of the flags.
pub const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
pub const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;
const RESERVED: u32 = !0xf;
/// Largest body a frontend may send (the specification's and QEMU's
/// `VHOST_USER_PAYLOAD_SIZE` bound).
pub const MAX_PAYLOAD: usize = MAX_MSG_SIZE;
pub const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Header {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// The header of the reply to `request` carrying `size` body bytes.
    pub fn reply(request: u32, size: usize) -> Header {
        Header {
            request,
            flags: VERSION | REPLY,
            size: size as u32,
        }
    }

    pub fn need_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }

    /// The framing rules for a message from the frontend.
    pub fn check_request(&self) -> Result<(), WireError> {
        let flags = self.flags;
        if flags & VERSION_MASK != VERSION {
            return Err(WireError::BadVersion { flags });
        }
        if flags & RESERVED != 0 {
            return Err(WireError::ReservedFlags { flags });
        }
        if flags & REPLY != 0 {
            return Err(WireError::ReplyFlag { flags });
        }
        if self.size as usize > MAX_PAYLOAD {
            return Err(WireError::Oversized { size: self.size });
        }
        Ok(())
    }
}

/// One message as it came off the socket.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the VMM closed the connection")]
    Closed,
    #[error("connection ended {got} bytes into a {want}-byte message")]
    Truncated { got: usize, want: usize },
    #[error("header flags {flags:#x}: protocol version {}, expected 1", flags & VERSION_MASK)]
    BadVersion { flags: u32 },
    #[error("header flags {flags:#x}: reserved bits are set")]
    ReservedFlags { flags: u32 },
    #[error("header flags {flags:#x}: the REPLY flag is set on a request")]
    ReplyFlag { flags: u32 },
    #[error("a {size}-byte payload is larger than the {MAX_PAYLOAD}-byte limit")]
    Oversized { size: u32 },
    #[error("more than {MAX_FDS} file descriptors attached to one message")]
    TooManyFds,
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// Reads into `buf` until it is full, keeping every fd that arrives.
/// `done` is how much of the whole message was read before this part.
fn recv_exact(
    s: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<File>,
    done: usize,
    total: usize,
) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the one iovec points at `rest`, a live, writable slice of
        // exactly `iov_len` bytes; recvmsg writes at most that much into it.
        let r = unsafe { s.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match r {
            Ok(v) => v,
            Err(e) if e.errno() == libc::EINTR => continue,
            // The control data did not fit: more fds than any request takes
            // (vmm-sys-util closed them).
            Err(e) if e.errno() == libc::ENOBUFS => return Err(WireError::TooManyFds),
            Err(e) if done + got > 0 && is_timeout(e.errno()) => {
                return Err(WireError::Truncated {
                    got: done + got,
                    want: total,
                })
            }
            Err(e) => return Err(WireError::Io(io::Error::from_raw_os_error(e.errno()))),
        };
        for &fd in &raw[..nfds] {
            // SAFETY: recvmsg just installed `fd` in this process's table for
            // this message; nothing else refers to it, so the File owns it.
            fds.push(unsafe { File::from_raw_fd(fd) });
        }
        if fds.len() > MAX_FDS {
            return Err(WireError::TooManyFds);
        }
        if n == 0 {
            return Err(if done + got == 0 {
                WireError::Closed
            } else {
                WireError::Truncated {
                    got: done + got,
                    want: total,
                }
            });
        }
        got += n;
    }
    Ok(())
}

fn is_timeout(errno: i32) -> bool {
    errno == libc::EAGAIN || errno == libc::EWOULDBLOCK
}

/// Reads one request: the header, its framing checked, then the body.
pub fn recv_request(s: &UnixStream) -> Result<Message, WireError> {
    recv_checked(s, Header::check_request)
}

/// Reads one reply (the frontend's side of the conversation, for tests and
/// tools): only the size is checked.
pub fn recv_reply(s: &UnixStream) -> Result<Message, WireError> {
    recv_checked(s, |h| {
        if h.size as usize > MAX_PAYLOAD {
            return Err(WireError::Oversized { size: h.size });
        }
        Ok(())
    })
}

fn recv_checked(
    s: &UnixStream,
    check: impl Fn(&Header) -> Result<(), WireError>,
) -> Result<Message, WireError> {
    let mut fds = Vec::new();
    let mut hb = [0u8; HEADER_SIZE];
    recv_exact(s, &mut hb, &mut fds, 0, HEADER_SIZE)?;
    let header = Header::from_bytes(&hb);
    check(&header)?;
    let mut body = vec![0u8; header.size as usize];
    let total = HEADER_SIZE + body.len();
    recv_exact(s, &mut body, &mut fds, HEADER_SIZE, total)?;
    Ok(Message { header, body, fds })
}

/// Writes one message (header and body in one `sendmsg`, with `fds`).
pub fn send(s: &UnixStream, header: Header, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let hb = header.to_bytes();
    if fds.is_empty() {
        let mut buf = Vec::with_capacity(HEADER_SIZE + body.len());
        buf.extend_from_slice(&hb);
        buf.extend_from_slice(body);
        return (&*s).write_all(&buf);
    }
    let total = HEADER_SIZE + body.len();
    let n = s
        .send_with_fds(&[&hb[..], body], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if n != total {
        // The fds went with the first part; the rest is plain bytes.
        let mut rest = Vec::with_capacity(total);
        rest.extend_from_slice(&hb);
        rest.extend_from_slice(body);
        (&*s).write_all(&rest[n..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    fn hdr(request: u32, flags: u32, size: u32) -> Header {
        Header {
            request,
            flags,
            size,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = hdr(5, VERSION | NEED_REPLY, 264);
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        assert!(h.need_reply());
        assert_eq!(Header::reply(5, 8).flags, VERSION | REPLY);
    }

    #[test]
    fn framing_rules() {
        assert!(hdr(1, VERSION, 0).check_request().is_ok());
        assert!(hdr(1, VERSION | NEED_REPLY, 4096).check_request().is_ok());
        assert!(matches!(
            hdr(1, 0x2, 0).check_request(),
            Err(WireError::BadVersion { flags: 2 })
        ));
        assert!(matches!(
            hdr(1, 0, 0).check_request(),
            Err(WireError::BadVersion { .. })
        ));
        assert!(matches!(
            hdr(1, VERSION | 0x10, 0).check_request(),
            Err(WireError::ReservedFlags { .. })
        ));
        assert!(matches!(
            hdr(1, VERSION | REPLY, 0).check_request(),
            Err(WireError::ReplyFlag { .. })
        ));
        assert!(matches!(
            hdr(5, VERSION, 4097).check_request(),
            Err(WireError::Oversized { size: 4097 })
        ));
    }

    #[test]
    fn message_with_fds_arrives_whole() {
        let (a, b) = pair();
        let ev = EventFd::new(0).unwrap();
        send(
            &a,
            hdr(13, VERSION, 8),
            &9u64.to_ne_bytes(),
            &[ev.as_raw_fd()],
        )
        .unwrap();
        let m = recv_request(&b).unwrap();
        assert_eq!(m.header, hdr(13, VERSION, 8));
        assert_eq!(m.body, 9u64.to_ne_bytes());
        assert_eq!(m.fds.len(), 1);
    }

    #[test]
    fn message_split_across_writes() {
        let (a, b) = pair();
        let h = hdr(2, VERSION, 8).to_bytes();
        (&a).write_all(&h[..5]).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            (&a).write_all(&h[5..]).unwrap();
            (&a).write_all(&7u64.to_ne_bytes()).unwrap();
            a
        });
        let m = recv_request(&b).unwrap();
        assert_eq!(m.body, 7u64.to_ne_bytes());
        drop(t.join());
    }

    #[test]
    fn end_of_stream() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(recv_request(&b), Err(WireError::Closed)));
        let (a, b) = pair();
        (&a).write_all(&hdr(2, VERSION, 8).to_bytes()[..7]).unwrap();
        drop(a);
        assert!(matches!(
            recv_request(&b),
            Err(WireError::Truncated { got: 7, want: 12 })
        ));
        let (a, b) = pair();
        (&a).write_all(&hdr(2, VERSION, 8).to_bytes()).unwrap();
        (&a).write_all(&[1, 2, 3]).unwrap();
        drop(a);
        assert!(matches!(
            recv_request(&b),
            Err(WireError::Truncated { got: 15, want: 20 })
        ));
    }

    #[test]
    fn bad_header_is_refused_before_the_body_is_read() {
        let (a, b) = pair();
        (&a).write_all(&hdr(5, VERSION, 0x7fff_ffff).to_bytes())
            .unwrap();
        assert!(matches!(recv_request(&b), Err(WireError::Oversized { .. })));
    }

    #[test]
    fn too_many_fds() {
        let (a, b) = pair();
        let evs: Vec<EventFd> = (0..MAX_FDS + 1).map(|_| EventFd::new(0).unwrap()).collect();
        let raw: Vec<RawFd> = evs.iter().map(|e| e.as_raw_fd()).collect();
        send(&a, hdr(5, VERSION, 0), &[], &raw).unwrap();
        assert!(matches!(recv_request(&b), Err(WireError::TooManyFds)));
    }
}
