//! `vhost-user`: message streams through the daemon's own connection
//! server (`svq_relay::server::serve_connection`) on a socket pair, against
//! one device (the built-in software NIC) that lives across all cases, as
//! it lives across VMM connections in the daemon.
//!
//! Inputs start as what QEMU sends (bring-up, logging, in-flight, device
//! state, config, memory slots) and are mutated anywhere: request codes,
//! flags, sizes that lie, bodies, fd counts and kinds. Invariants: every
//! reply is well-framed and answers a request that was sent, in order; and
//! after each case a new connection brings the device up and gets exactly
//! the answers the first connection got (nothing a VMM did outlives it).

use svq_relay::backend::{self};
use svq_relay::cli::BackendSpec;
use svq_relay::device::{Device, SharedDevice};
use svq_relay::protocol::wire::{Message, REPLY, VERSION};
use vmm_sys_util::eventfd::EventFd;

use super::vu_client::{bring_up, decode_all, encode_all, req, session, Fds, Msg, QUEUES};
use crate::engine::Target;
use crate::rng::Rng;

const LOG_ALL: u64 = 1 << 26;
/// Messages per case.
const MAX_MSGS: usize = 256;

/// The daemon's device and the answers a clean bring-up gets.
pub struct Daemon {
    pub dev: SharedDevice,
    pub sig: EventFd,
    pub fds: Fds,
    pub features: u64,
    pub protocol: u64,
    baseline: Vec<(u32, u32, Vec<u8>)>,
}

/// The u64 a reply carries (u64::MAX when it carries none).
pub fn reply_u64(m: &Message) -> u64 {
    m.body
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(u64::MAX, u64::from_le_bytes)
}

impl Daemon {
    pub fn new() -> Result<Self, String> {
        let b = backend::open(&BackendSpec::SimLoopback, 1, 256).map_err(|e| e.to_string())?;
        let dev = Device::new("fuzz0", b, 1, 256, false).map_err(|e| e.to_string())?;
        let mut d = Daemon {
            dev: std::sync::Arc::new(std::sync::Mutex::new(dev)),
            sig: EventFd::new(libc::EFD_CLOEXEC).map_err(|e| e.to_string())?,
            fds: Fds::new()?,
            features: 0,
            protocol: 0,
            baseline: Vec::new(),
        };
        let probe = [
            Msg::new(req::GET_FEATURES, &[]),
            Msg::new(req::GET_PROTOCOL_FEATURES, &[]),
        ];
        let r = session(&d.dev, &d.sig, &d.fds, &probe)?;
        if r.len() != 2 {
            return Err(format!("probe got {} replies", r.len()));
        }
        d.features = reply_u64(&r[0]);
        d.protocol = reply_u64(&r[1]);
        d.baseline = d.bring_up_answers()?;
        // The baseline itself must be a working bring-up: every ack 0.
        for (code, _, body) in &d.baseline {
            if !req::has_reply(*code) && body.as_slice() != 0u64.to_le_bytes() {
                return Err(format!("bring-up: request {code} refused ({body:?})"));
            }
        }
        Ok(d)
    }

    /// QEMU's bring-up with everything offered acked except dirty logging.
    pub fn bring_up(&self) -> Vec<Msg> {
        bring_up(self.features & !LOG_ALL, self.protocol)
    }

    fn bring_up_answers(&self) -> Result<Vec<(u32, u32, Vec<u8>)>, String> {
        self.fds.reset()?;
        let mut msgs = self.bring_up();
        for q in 0..QUEUES {
            msgs.push(Msg::state(req::GET_VRING_BASE, q, 0));
        }
        let r = session(&self.dev, &self.sig, &self.fds, &msgs)?;
        Ok(r.into_iter()
            .map(|m| (m.header.request, m.header.flags, m.body))
            .collect())
    }

    /// A new connection must get exactly the first connection's answers.
    pub fn check_fresh(&self) -> Result<(), String> {
        let now = self.bring_up_answers()?;
        if now != self.baseline {
            let at = now
                .iter()
                .zip(&self.baseline)
                .position(|(a, b)| a != b)
                .unwrap_or(now.len().min(self.baseline.len()));
            return Err(format!(
                "next connection: answer {at} is {:?}, first connection got {:?}",
                now.get(at),
                self.baseline.get(at)
            ));
        }
        Ok(())
    }
}

/// The request codes the daemon reads from `msgs` on the wire: a header
/// whose size lies moves every later boundary (the body swallows the next
/// header, or the next header starts inside this body), exactly as the
/// daemon's reader sees it.
pub fn framed_requests(msgs: &[Msg]) -> Vec<u32> {
    let mut wire = Vec::new();
    for m in msgs {
        wire.extend_from_slice(&m.request.to_le_bytes());
        wire.extend_from_slice(&m.flags.to_le_bytes());
        wire.extend_from_slice(&m.size.unwrap_or(m.body.len() as u32).to_le_bytes());
        wire.extend_from_slice(&m.body);
    }
    let mut codes = Vec::new();
    let mut at = 0usize;
    while let Some(h) = wire.get(at..at + 12) {
        codes.push(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
        let size = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        at = at.saturating_add(12).saturating_add(size);
    }
    codes
}

/// Replies are framed as replies and answer requests the daemon read, in
/// order.
pub fn check_replies(sent: &[Msg], replies: &[Message]) -> Result<(), String> {
    let sent = framed_requests(sent);
    let mut next = 0;
    for r in replies {
        let h = r.header;
        if h.flags != (VERSION | REPLY) {
            return Err(format!("reply to {} has flags {:#x}", h.request, h.flags));
        }
        match sent[next..].iter().position(|&code| code == h.request) {
            Some(i) => next += i + 1,
            None => {
                return Err(format!(
                    "reply to request {} that was not sent (or out of order)",
                    h.request
                ))
            }
        }
    }
    Ok(())
}

pub struct VhostUserTarget {
    d: Daemon,
}

impl VhostUserTarget {
    pub fn new() -> Result<Self, String> {
        Ok(VhostUserTarget { d: Daemon::new()? })
    }
}

fn body(parts: &[u64]) -> Vec<u8> {
    parts.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One more request of the kinds QEMU sends after bring-up.
fn extra(rng: &mut Rng, features: u64) -> Msg {
    use req::*;
    let q = rng.below(3) as u32;
    let m = match rng.below(16) {
        0 => Msg::new(SET_LOG_BASE, &body(&[0x1000, 0])).with_fd(1),
        1 => Msg::u64(SET_FEATURES, features | LOG_ALL),
        2 => Msg::new(GET_INFLIGHT_FD, &body(&[0, 0, 0x0100_0002])[..20]),
        3 => Msg::new(SET_INFLIGHT_FD, &body(&[0x1000, 0, 0x0100_0002])[..20]).with_fd(1),
        4 => {
            let mut b = vec![0u8; 12];
            b[4] = 12;
            b.extend_from_slice(&[0; 12]);
            Msg::new(GET_CONFIG, &b)
        }
        5 => Msg::new(
            ADD_MEM_REG,
            &body(&[0, 0x20_0000, 0x1000, 0x7f10_0000_0000, 0]),
        )
        .with_fd(1),
        6 => Msg::new(
            REM_MEM_REG,
            &body(&[0, 0x20_0000, 0x1000, 0x7f10_0000_0000, 0]),
        ),
        7 => Msg::state(SET_DEVICE_STATE_FD, rng.below(2) as u32, 0).with_fd(rng.below(2) as u8),
        8 => Msg::new(CHECK_DEVICE_STATE, &[]),
        9 => Msg::state(GET_VRING_BASE, q, 0),
        10 => Msg::state(SET_VRING_ENABLE, q, rng.below(2) as u32),
        11 => Msg::u64(SET_STATUS, *rng.pick(&[0, 1, 3, 0xb, 0xf])),
        12 => Msg::state(SET_VRING_BASE, q, rng.next_u64() as u32 & 0xffff),
        13 => Msg::u64(SET_VRING_KICK, u64::from(q) | (rng.below(2) << 8)).with_fd(2),
        14 => Msg::state(SET_VRING_NUM, q, 1 << rng.below(10)),
        _ => {
            let (code, n) = (rng.below(50) as u32, rng.below(48) as usize);
            Msg::new(code, &rng.bytes(n))
        }
    };
    if rng.one_in(2) {
        m.need_reply()
    } else {
        m
    }
}

impl Target for VhostUserTarget {
    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        let mut msgs = bring_up(self.d.features, self.d.protocol);
        if rng.one_in(3) {
            msgs.truncate(rng.below(msgs.len() as u64 + 1) as usize);
        }
        for _ in 0..rng.below(12) {
            msgs.push(extra(rng, self.d.features & !LOG_ALL));
        }
        if !msgs.is_empty() && rng.one_in(4) {
            let i = rng.below(msgs.len() as u64) as usize;
            let j = rng.below(msgs.len() as u64) as usize;
            msgs.swap(i, j);
        }
        encode_all(&msgs)
    }

    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        self.d.fds.reset()?;
        let msgs = decode_all(input, MAX_MSGS);
        let replies = session(&self.d.dev, &self.d.sig, &self.d.fds, &msgs)?;
        check_replies(&msgs, &replies)?;
        self.d.check_fresh()
    }

    fn max_len(&self) -> usize {
        8192
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_a_full_bring_up() {
        let d = Daemon::new().unwrap();
        let n = bring_up(0, 0).len() + QUEUES as usize;
        assert_eq!(d.baseline.len(), n);
        let status = d.baseline.iter().find(|a| a.0 == req::GET_STATUS).unwrap();
        assert_eq!(status.2, 0xfu64.to_le_bytes());
        let bases: Vec<_> = d
            .baseline
            .iter()
            .filter(|a| a.0 == req::GET_VRING_BASE)
            .map(|a| a.2.clone())
            .collect();
        assert_eq!(
            bases,
            vec![vec![0, 0, 0, 0, 0, 0, 0, 0], vec![1, 0, 0, 0, 0, 0, 0, 0]]
        );
    }

    #[test]
    fn a_reply_nobody_asked_for_is_caught() {
        let sent = [Msg::new(req::GET_FEATURES, &[])];
        let reply = Message {
            header: svq_relay::protocol::wire::Header::reply(req::GET_QUEUE_NUM, 8),
            body: vec![0; 8],
            fds: Vec::new(),
        };
        assert!(check_replies(&sent, &[reply]).is_err());
    }

    #[test]
    fn a_size_that_lies_moves_the_next_boundary() {
        // GET_FEATURES claiming no body, with a body that is a complete
        // GET_QUEUE_NUM header: the daemon reads two requests.
        let mut hidden = req::GET_QUEUE_NUM.to_le_bytes().to_vec();
        hidden.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        let mut m = Msg::new(req::GET_FEATURES, &hidden);
        m.size = Some(0);
        assert_eq!(
            framed_requests(&[m]),
            [req::GET_FEATURES, req::GET_QUEUE_NUM]
        );
    }
}
