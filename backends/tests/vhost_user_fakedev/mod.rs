//! A scripted vhost-user device that records every message, for the paths
//! DPDK does not take (no REPLY_ACK, CONFIG, no PROTOCOL_FEATURES, refused
//! requests) and for checking message order exactly.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub use testkit::raw::req::*;

pub const P_MQ: u64 = 1;
pub const P_LOG_SHMFD: u64 = 2;
pub const P_REPLY_ACK: u64 = 8;
pub const P_CONFIG: u64 = 0x200;
pub const P_STATUS: u64 = 0x1_0000;

pub use virtio_features::F_PROTOCOL_FEATURES as F_PROTOCOL;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    /// Which connection (1 = first).
    pub conn: u32,
    pub req: u32,
    pub body: Vec<u8>,
    pub fds: usize,
}

impl Msg {
    pub fn u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.body[..8]);
        u64::from_le_bytes(b)
    }

    pub fn u32_at(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.body[i..i + 4].try_into().unwrap())
    }

    pub fn u64_at(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.body[i..i + 8].try_into().unwrap())
    }
}

#[derive(Clone, Debug)]
pub struct FakeSpec {
    pub features: u64,
    pub protocol: u64,
    pub queue_num: u64,
    pub config: Vec<u8>,
    /// Answer this request with a failed ack (needs REPLY_ACK).
    pub refuse: Option<u32>,
}

#[derive(Default)]
pub struct FakeState {
    pub log: Vec<Msg>,
    pub bases: [u32; 16],
    pub status: u8,
    current: Option<UnixStream>,
    conns: u32,
}

pub struct FakeDevice {
    pub path: PathBuf,
    pub state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDevice {
    pub fn start(path: &Path, spec: FakeSpec) -> FakeDevice {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        sock.set_nonblocking(false).unwrap();
                        sock.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        let n = {
                            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                            s.conns += 1;
                            s.current = Some(sock.try_clone().unwrap());
                            s.conns
                        };
                        serve(sock, n, &spec, &st, &sp);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeDevice {
            path: path.to_path_buf(),
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> u8 {
        self.state().status
    }

    pub fn set_base(&self, q: usize, base: u32) {
        self.state().bases[q] = base;
    }

    pub fn log(&self) -> Vec<Msg> {
        self.state().log.clone()
    }

    /// Requests of connection `conn`, in order.
    pub fn requests(&self, conn: u32) -> Vec<u32> {
        self.log()
            .iter()
            .filter(|m| m.conn == conn)
            .map(|m| m.req)
            .collect()
    }

    /// Waits (bounded) until `n` messages were received in all.
    pub fn wait_len(&self, n: usize) -> Vec<Msg> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.len() >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "fake device got {} of {n} messages: {:?}",
                log.len(),
                log.iter().map(|m| m.req).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Closes the current connection, as a device that restarts.
    pub fn kick_out(&self) {
        if let Some(s) = self.state().current.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.kick_out();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn reply(sock: &mut UnixStream, req: u32, body: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&req.to_le_bytes());
    m.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    let _ = sock.write_all(&m);
}

fn serve(
    mut sock: UnixStream,
    conn: u32,
    spec: &FakeSpec,
    st: &Arc<Mutex<FakeState>>,
    stop: &AtomicBool,
) {
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let mut hdr = [0u8; 12];
        let mut fds: [RawFd; 8] = [-1; 8];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        }];
        // SAFETY: the iovec points at `hdr`, which outlives the call and may
        // hold any bytes.
        let got = unsafe { sock.recv_with_fds(&mut iov, &mut fds) };
        let (n, nfds) = match got {
            Ok((0, _)) => return,
            Ok(x) => x,
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => continue,
            Err(_) => return,
        };
        for &fd in &fds[..nfds] {
            // SAFETY: recvmsg gave us these descriptors; nothing else owns them.
            drop(unsafe { File::from_raw_fd(fd) });
        }
        if n < 12 && sock.read_exact(&mut hdr[n..]).is_err() {
            return;
        }
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let (req, flags, size) = (word(0), word(4), word(8) as usize);
        let mut body = vec![0u8; size];
        if sock.read_exact(&mut body).is_err() {
            return;
        }
        let msg = Msg {
            conn,
            req,
            body: body.clone(),
            fds: nfds,
        };
        let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
        s.log.push(msg.clone());
        let answered = match req {
            GET_FEATURES => {
                reply(&mut sock, req, &spec.features.to_le_bytes());
                true
            }
            GET_PROTOCOL_FEATURES => {
                reply(&mut sock, req, &spec.protocol.to_le_bytes());
                true
            }
            GET_QUEUE_NUM => {
                reply(&mut sock, req, &spec.queue_num.to_le_bytes());
                true
            }
            GET_VRING_BASE => {
                let q = msg.u32_at(0) as usize;
                let mut b = Vec::new();
                b.extend_from_slice(&(q as u32).to_le_bytes());
                b.extend_from_slice(&s.bases[q % 16].to_le_bytes());
                reply(&mut sock, req, &b);
                true
            }
            GET_CONFIG => {
                let (off, len) = (msg.u32_at(0) as usize, msg.u32_at(4) as usize);
                let mut b = body[..12].to_vec();
                b.extend_from_slice(&spec.config[off..off + len]);
                reply(&mut sock, req, &b);
                true
            }
            GET_STATUS => {
                reply(&mut sock, req, &u64::from(s.status).to_le_bytes());
                true
            }
            SET_LOG_BASE => {
                // As DPDK: an empty reply, whatever the flags.
                reply(&mut sock, req, &[]);
                true
            }
            SET_VRING_BASE => {
                let q = msg.u32_at(0) as usize;
                s.bases[q % 16] = msg.u32_at(4);
                false
            }
            SET_STATUS => {
                s.status = msg.u64() as u8;
                false
            }
            _ => false,
        };
        drop(s);
        if !answered && flags & 0x8 != 0 {
            let nack = u64::from(spec.refuse == Some(req));
            reply(&mut sock, req, &nack.to_le_bytes());
        }
    }
}
