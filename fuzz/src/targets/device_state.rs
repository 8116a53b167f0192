//! `device-state`: `SVQR` streams loaded into the daemon the way a migration
//! destination receives them, over SET_DEVICE_STATE_FD(LOAD) and
//! CHECK_DEVICE_STATE on a real connection (`serve_connection`).
//!
//! Each case: bring the device up and stop its rings, LOAD the state the
//! device started with (so every case starts from the same device), SAVE
//! (must give that state back byte for byte), LOAD the input, SAVE again.
//! Invariants: a refused stream changes nothing (the second SAVE equals the
//! first) and leaves the transfer machine usable (the SAVE works); an
//! accepted one is what the device now is (its rings' indexes and in-flight
//! heads, mode and MAC read back from the SAVE).
//!
//! Inputs start from the device's own stream with records edited (indexes,
//! in-flight lists consistent or not, modes, MTU, queue pairs, features),
//! duplicated, dropped, reordered, added with unknown types or instances,
//! length fields that lie, other versions; then byte mutation.

use std::io::Read;
use std::os::fd::OwnedFd;

use svq_relay::migration::stream::{DeviceState, Limits};

use super::vhost_user::{check_replies, reply_u64, Daemon};
use super::vu_client::{pipe, req, session_with, Msg, QUEUES, QUEUE_SIZE};
use crate::engine::Target;
use crate::rng::Rng;

const SAVE: u32 = 0;
const LOAD: u32 = 1;
/// The pipe carries at most this much (its default capacity): the whole
/// stream is written before the daemon reads it.
const PIPE_BYTES: usize = 0xffff;

pub struct DeviceStateTarget {
    d: Daemon,
    /// The stream of the device as it was built.
    start: Vec<u8>,
    limits: Limits,
}

/// One case's descriptors: LOADs read `streams` in order, SAVEs write into
/// pipes whose read ends are kept in `saved`.
struct Pipes<'a> {
    streams: Vec<&'a [u8]>,
    saved: Vec<std::fs::File>,
}

impl Pipes<'_> {
    fn open(&mut self, m: &Msg) -> std::io::Result<OwnedFd> {
        let (r, mut w) = pipe()?;
        let direction = m.body.first().copied().unwrap_or(0);
        if u32::from(direction) == LOAD {
            let s = if self.streams.is_empty() {
                &[][..]
            } else {
                self.streams.remove(0)
            };
            std::io::Write::write_all(&mut w, &s[..s.len().min(PIPE_BYTES)])?;
            Ok(r.into())
        } else {
            self.saved.push(r);
            Ok(w.into())
        }
    }
}

impl DeviceStateTarget {
    pub fn new() -> Result<Self, String> {
        let d = Daemon::new()?;
        let limits = Limits {
            queue_count: QUEUES as u16,
            max_queue_size: QUEUE_SIZE as u16,
            features: d.features,
            protocol_features: d.protocol,
        };
        let mut t = DeviceStateTarget {
            d,
            start: Vec::new(),
            limits,
        };
        let (checks, saves) = t.session(&[], &[SAVE])?;
        if checks != [0] || saves.len() != 1 {
            return Err(format!("first SAVE: CHECK answered {checks:?}"));
        }
        DeviceState::from_bytes(&saves[0], &t.limits)
            .map_err(|e| format!("the device's own stream does not load: {e}"))?;
        t.start = saves.into_iter().next().unwrap_or_default();
        Ok(t)
    }

    /// Bring up, stop the rings, then one transfer + CHECK per entry of
    /// `ops` (LOADs take `streams` in order). Returns every CHECK's answer
    /// and what each SAVE wrote.
    fn session(&self, streams: &[&[u8]], ops: &[u32]) -> Result<(Vec<u64>, Vec<Vec<u8>>), String> {
        self.d.fds.reset()?;
        let mut msgs = self.d.bring_up();
        for q in 0..QUEUES {
            msgs.push(Msg::state(req::GET_VRING_BASE, q, 0));
        }
        for &dir in ops {
            msgs.push(Msg::state(req::SET_DEVICE_STATE_FD, dir, 0).with_fd(0));
            msgs.push(Msg::new(req::CHECK_DEVICE_STATE, &[]));
        }
        let mut pipes = Pipes {
            streams: streams.to_vec(),
            saved: Vec::new(),
        };
        let fds = &self.d.fds;
        let replies = session_with(&self.d.dev, &self.d.sig, &msgs, |m, k| {
            if m.request == req::SET_DEVICE_STATE_FD {
                pipes.open(m)
            } else {
                fds.open(k, m.request)
            }
        })?;
        check_replies(&msgs, &replies)?;
        let checks: Vec<u64> = replies
            .iter()
            .filter(|m| m.header.request == req::CHECK_DEVICE_STATE)
            .map(reply_u64)
            .collect();
        if checks.len() != ops.len() {
            return Err(format!(
                "{} CHECK_DEVICE_STATE answers for {} transfers",
                checks.len(),
                ops.len()
            ));
        }
        let mut saves = Vec::new();
        for mut r in pipes.saved {
            let mut b = Vec::new();
            r.read_to_end(&mut b)
                .map_err(|e| format!("reading a SAVE: {e}"))?;
            saves.push(b);
        }
        Ok((checks, saves))
    }
}

/// A stream as records, to edit at that level.
#[derive(Clone)]
struct Rec {
    ty: u16,
    instance: u16,
    /// The length field when it lies.
    len: Option<u32>,
    payload: Vec<u8>,
}

fn parse(b: &[u8]) -> (u16, Vec<Rec>) {
    let version = b.get(4..6).map_or(1, |v| u16::from_le_bytes([v[0], v[1]]));
    let mut recs = Vec::new();
    let mut at = 6;
    while let Some(h) = b.get(at..at + 8) {
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let Some(payload) = b.get(at + 8..at + 8 + len) else {
            break;
        };
        recs.push(Rec {
            ty: u16::from_le_bytes([h[0], h[1]]),
            instance: u16::from_le_bytes([h[2], h[3]]),
            len: None,
            payload: payload.to_vec(),
        });
        at += 8 + len;
    }
    (version, recs)
}

fn encode(version: u16, recs: &[Rec]) -> Vec<u8> {
    let mut out = b"SVQR".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    for r in recs {
        out.extend_from_slice(&r.ty.to_le_bytes());
        out.extend_from_slice(&r.instance.to_le_bytes());
        let len = r.len.unwrap_or(r.payload.len() as u32);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&r.payload);
    }
    out
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    if let Some(s) = p.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Records edited here may have been cut short by an earlier edit.
fn put8(p: &mut [u8], at: usize, v: u8) {
    if let Some(b) = p.get_mut(at) {
        *b = v;
    }
}

fn flip(p: &mut [u8], at: usize, bit: u64) {
    if let Some(b) = p.get_mut(at) {
        *b ^= 1 << bit;
    }
}

/// An in-flight record for `queue`: `count` heads (as the header says) and
/// `heads` listed.
fn in_flight(queue: u16, count: u16, heads: &[u16]) -> Rec {
    let mut payload = count.to_le_bytes().to_vec();
    payload.extend_from_slice(&[0, 0]);
    for h in heads {
        payload.extend_from_slice(&h.to_le_bytes());
    }
    Rec {
        ty: 5,
        instance: queue,
        len: None,
        payload,
    }
}

/// Distinct heads below the queue size, sometimes not.
fn heads(rng: &mut Rng, n: usize) -> Vec<u16> {
    let mut v: Vec<u16> = Vec::new();
    while v.len() < n {
        let h = if rng.one_in(16) {
            rng.below(65536) as u16
        } else {
            rng.below(u64::from(QUEUE_SIZE)) as u16
        };
        if !v.contains(&h) || rng.one_in(16) {
            v.push(h);
        }
    }
    v
}

fn edit(rng: &mut Rng, version: &mut u16, recs: &mut Vec<Rec>) {
    let find = |recs: &Vec<Rec>, ty: u16| recs.iter().position(|r| r.ty == ty);
    match rng.below(14) {
        // A ring stopped elsewhere, with the heads it had in flight.
        0..=3 => {
            let extra = u64::from(rng.one_in(8));
            let q = rng.below(u64::from(QUEUES) + extra) as u16;
            let used = rng.below(65536) as u16;
            let n = if rng.one_in(4) {
                0
            } else {
                rng.below(9) as u16
            };
            let avail = used.wrapping_add(n);
            if let Some(r) = recs.iter_mut().find(|r| r.ty == 4 && r.instance == q) {
                put16(&mut r.payload, 2, avail);
                put16(&mut r.payload, 4, used);
            }
            recs.retain(|r| !(r.ty == 5 && r.instance == q));
            if n > 0 {
                let count = if rng.one_in(6) {
                    rng.below(10) as u16
                } else {
                    n
                };
                let listed = if rng.one_in(6) {
                    rng.below(10)
                } else {
                    u64::from(n)
                };
                let h = heads(rng, listed as usize);
                let at = find(recs, 0).unwrap_or(recs.len());
                recs.insert(at, in_flight(q, count, &h));
            }
        }
        // Ring size, flags, layout.
        4 => {
            if let Some(r) = recs
                .iter_mut()
                .filter(|r| r.ty == 4)
                .nth(rng.below(2) as usize)
            {
                match rng.below(3) {
                    0 => put16(
                        &mut r.payload,
                        0,
                        [0, 1, 255, 256, 512, 32768][rng.below(6) as usize],
                    ),
                    1 => put8(&mut r.payload, 6, rng.below(8) as u8),
                    _ => put8(&mut r.payload, 7, rng.below(3) as u8),
                }
            }
        }
        // Mode.
        5 => {
            if let Some(i) = find(recs, 2) {
                put8(&mut recs[i].payload, 0, [0, 1, 1, 2][rng.below(4) as usize]);
                if rng.one_in(8) {
                    put8(&mut recs[i].payload, 1, 1);
                }
            }
        }
        // NIC: MAC, MTU, queue pairs, rx flags, VLANs.
        6 => {
            if let Some(i) = find(recs, 3) {
                let p = &mut recs[i].payload;
                match rng.below(5) {
                    0 => {
                        for (k, b) in rng.bytes(6).into_iter().enumerate() {
                            put8(p, k, b);
                        }
                    }
                    1 => put16(p, 6, [0, 67, 68, 1500, 9000, 65535][rng.below(6) as usize]),
                    2 => put16(p, 8, rng.below(4) as u16),
                    3 => put8(p, 10, rng.below(8) as u8),
                    _ => {
                        let v = 12 + rng.below(512) as usize;
                        flip(p, v, rng.below(8));
                    }
                }
            }
        }
        // Features.
        7 => {
            if let Some(i) = find(recs, 1) {
                let p = &mut recs[i].payload;
                let at = if rng.one_in(2) { 0 } else { 8 };
                let (byte, bit) = (at + rng.below(8) as usize, rng.below(8));
                flip(p, byte, bit);
            }
        }
        // Duplicate, drop, reorder.
        8 => {
            if !recs.is_empty() {
                let r = recs[rng.below(recs.len() as u64) as usize].clone();
                let at = rng.below(recs.len() as u64 + 1) as usize;
                recs.insert(at, r);
            }
        }
        9 => {
            if !recs.is_empty() {
                recs.remove(rng.below(recs.len() as u64) as usize);
            }
        }
        10 => {
            if recs.len() > 1 {
                let i = rng.below(recs.len() as u64) as usize;
                let j = rng.below(recs.len() as u64) as usize;
                recs.swap(i, j);
            }
        }
        // Unknown type or instance.
        11 => {
            let at = rng.below(recs.len() as u64 + 1) as usize;
            let n = rng.below(24) as usize;
            recs.insert(
                at,
                Rec {
                    ty: rng.below(8) as u16,
                    instance: rng.below(4) as u16,
                    len: None,
                    payload: rng.bytes(n),
                },
            );
        }
        // A length field that lies, or records after the end.
        12 => {
            if !recs.is_empty() {
                let i = rng.below(recs.len() as u64) as usize;
                let n = recs[i].payload.len() as u32;
                recs[i].len = Some(match rng.below(3) {
                    0 => n + 1 + rng.below(8) as u32,
                    1 => n.saturating_sub(1 + rng.below(8) as u32),
                    _ => u32::MAX - rng.below(8) as u32,
                });
            }
        }
        _ => {
            *version = [0, 1, 1, 2, 0xffff][rng.below(5) as usize];
        }
    }
}

impl Target for DeviceStateTarget {
    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        let (mut version, mut recs) = parse(&self.start);
        for _ in 0..1 + rng.below(3) {
            edit(rng, &mut version, &mut recs);
        }
        let mut out = encode(version, &recs);
        if rng.one_in(16) {
            out.truncate(rng.below(out.len() as u64 + 1) as usize);
        }
        out
    }

    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let (checks, saves) = self.session(&[&self.start, input], &[LOAD, SAVE, LOAD, SAVE])?;
        if checks[0] != 0 || checks[1] != 0 || checks[3] != 0 {
            return Err(format!(
                "CHECK_DEVICE_STATE answers {checks:?} (only the fuzzed LOAD, the third, may fail)"
            ));
        }
        let [before, after] = &saves[..] else {
            return Err(format!("{} SAVE streams for two SAVEs", saves.len()));
        };
        if *before != self.start {
            return Err("loading the device's own stream and saving it gave other bytes".into());
        }
        // A stream the pipe cut is a truncated stream: it must be refused.
        let loaded = &input[..input.len().min(PIPE_BYTES)];
        let parsed = DeviceState::from_bytes(loaded, &self.limits);
        if checks[2] != 0 {
            if after != before {
                return Err(format!(
                    "a refused stream changed the device (parses as {parsed:?})"
                ));
            }
            return Ok(());
        }
        let l = parsed.map_err(|e| format!("a stream the parser refuses ({e}) was accepted"))?;
        let now = DeviceState::from_bytes(after, &self.limits)
            .map_err(|e| format!("after an accepted LOAD the SAVE does not load: {e}"))?;
        for (q, (a, b)) in l.vrings.iter().zip(&now.vrings).enumerate() {
            if (a.next_avail, a.used_idx, &a.in_flight) != (b.next_avail, b.used_idx, &b.in_flight)
            {
                return Err(format!(
                    "queue {q}: loaded {a:?} but the device saves {b:?}"
                ));
            }
        }
        if l.mode != now.mode || l.nic.mac != now.nic.mac {
            return Err(format!(
                "loaded mode {:?} MAC {:02x?}, device saves {:?} {:02x?}",
                l.mode, l.nic.mac, now.mode, now.nic.mac
            ));
        }
        Ok(())
    }

    fn max_len(&self) -> usize {
        8192
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_round_trips_its_own_stream() {
        let mut t = DeviceStateTarget::new().expect("target");
        let s = t.start.clone();
        t.run(&s).expect("own stream");
        let (v, recs) = parse(&s);
        assert_eq!(encode(v, &recs), s, "record parser and encoder agree");
    }

    #[test]
    fn a_refused_stream_that_changed_the_device_is_caught() {
        // A stream refused only at CHECK time cannot be told from one that
        // never applied unless SAVE reads the device: check that an accepted
        // stream with other indexes shows up in the second SAVE.
        let mut t = DeviceStateTarget::new().expect("target");
        let (v, mut recs) = parse(&t.start);
        let r = recs.iter_mut().find(|r| r.ty == 4).expect("a vring record");
        put16(&mut r.payload, 2, 7);
        put16(&mut r.payload, 4, 7);
        let other = encode(v, &recs);
        let (checks, saves) = t.session(&[&other], &[LOAD, SAVE]).expect("session");
        assert_eq!(checks, [0, 0]);
        assert_ne!(saves[0], t.start, "the load shows in the save");
        t.run(&other).expect("an accepted stream is consistent");
    }
}
