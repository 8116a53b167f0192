//! Decoding a framed message into a typed request: payload sizes and the
//! file descriptors each request carries are checked here, in one place,
//! before any handler sees the message.
//!
//! Two kinds of failure: a payload or fd count that does not match the
//! request (`DecodeError::is_fatal`: the sender and this daemon disagree
//! on the framing, so nothing after it can be trusted) and a well-framed
//! payload whose values are invalid (refused, the connection goes on).

use std::fmt;
use std::fs::File;

use vhost::vhost_user::message::{
    FrontendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfig,
    VhostUserInflight, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion, VhostUserMsgValidator,
    VhostUserSingleMemoryRegion, VhostUserTransferDeviceState, VhostUserU64, VhostUserVringAddr,
    VhostUserVringState,
};
use vm_memory::ByteValued;

use super::wire::Message;

/// The name of a request code for log lines (`SET_FEATURES`, `request 99`).
pub struct ReqName(pub u32);

impl fmt::Display for ReqName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match FrontendReq::try_from(self.0) {
            Ok(r) => write!(f, "{r:?}"),
            Err(_) => write!(f, "request {}", self.0),
        }
    }
}

/// SET_VRING_KICK/CALL/ERR: a queue index and its eventfd (None: the
/// frontend set the "no fd" bit, i.e. polling).
#[derive(Debug)]
pub struct VringFd {
    pub index: u8,
    pub file: Option<File>,
}

/// Bit 8 of the vring fd messages: no file descriptor is attached.
const VRING_NOFD: u64 = 0x100;
/// Bits 0..=7: the queue index.
const VRING_IDX_MASK: u64 = 0xff;

pub enum Request {
    GetFeatures,
    SetFeatures(u64),
    SetOwner,
    ResetOwner,
    ResetDevice,
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    GetQueueNum,
    GetMaxMemSlots,
    SetMemTable {
        regions: Vec<VhostUserMemoryRegion>,
        files: Vec<File>,
    },
    AddMemReg {
        region: VhostUserSingleMemoryRegion,
        file: File,
    },
    RemMemReg(VhostUserSingleMemoryRegion),
    /// While postcopy listens: the frontend's "0 = ok" after it received
    /// the region addresses of a SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG.
    PostcopyRegionsAck(u64),
    SetVringNum(VhostUserVringState),
    SetVringAddr(VhostUserVringAddr),
    SetVringBase(VhostUserVringState),
    GetVringBase(VhostUserVringState),
    SetVringKick(VringFd),
    SetVringCall(VringFd),
    SetVringErr(VringFd),
    SetVringEnable(VhostUserVringState),
    GetConfig(VhostUserConfig),
    SetConfig {
        hdr: VhostUserConfig,
        data: Vec<u8>,
    },
    SetStatus(u64),
    GetStatus,
    SetBackendReqFd(File),
    GetInflightFd(VhostUserInflight),
    SetInflightFd {
        inflight: VhostUserInflight,
        file: File,
    },
    SetLogBase {
        log: VhostUserLog,
        file: File,
    },
    PostcopyAdvise,
    PostcopyListen,
    PostcopyEnd,
    SetDeviceStateFd {
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    },
    CheckDeviceState,
    /// A request code this daemon does not implement (a known one, such as
    /// SET_LOG_FD or IOTLB_MSG, or one it has never heard of). Its fds are
    /// closed when this is dropped.
    Unsupported(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{req}: {got}-byte payload, expected {want}")]
    Size {
        req: String,
        got: usize,
        want: String,
    },
    #[error("{req}: {got} file descriptors attached, expected {want}")]
    Fds {
        req: String,
        got: usize,
        want: usize,
    },
    #[error("{req}: {why}")]
    Invalid { req: String, why: String },
}

impl DecodeError {
    /// The message does not frame like the request it names: the
    /// connection cannot go on.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, DecodeError::Invalid { .. })
    }
}

/// What decoding needs to know about the session: while postcopy listens,
/// an 8-byte memory-table message is the frontend's acknowledgement.
#[derive(Clone, Copy, Default)]
pub struct DecodeContext {
    pub postcopy_listening: bool,
}

/// A payload struct read from the body (which may be unaligned).
fn read_obj<T: ByteValued + Default>(body: &[u8]) -> T {
    let mut v = T::default();
    v.as_mut_slice()
        .copy_from_slice(&body[..std::mem::size_of::<T>()]);
    v
}

struct Decoder {
    code: u32,
    body: Vec<u8>,
    fds: Vec<File>,
}

impl Decoder {
    fn name(&self) -> String {
        ReqName(self.code).to_string()
    }

    fn size_err(&self, want: impl Into<String>) -> DecodeError {
        DecodeError::Size {
            req: self.name(),
            got: self.body.len(),
            want: want.into(),
        }
    }

    fn invalid(&self, why: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            req: self.name(),
            why: why.into(),
        }
    }

    fn fds(&mut self, want: usize) -> Result<Vec<File>, DecodeError> {
        if self.fds.len() != want {
            return Err(DecodeError::Fds {
                req: self.name(),
                got: self.fds.len(),
                want,
            });
        }
        Ok(std::mem::take(&mut self.fds))
    }

    fn one_fd(&mut self) -> Result<File, DecodeError> {
        Ok(self.fds(1)?.remove(0))
    }

    fn empty(&mut self) -> Result<(), DecodeError> {
        if !self.body.is_empty() {
            return Err(self.size_err("0"));
        }
        self.fds(0).map(|_| ())
    }

    /// A fixed-size payload, no fds.
    fn body<T: ByteValued + Default + VhostUserMsgValidator>(&mut self) -> Result<T, DecodeError> {
        self.fds(0)?;
        self.body_with_fds()
    }

    /// A fixed-size payload; the caller checks the fds.
    fn body_with_fds<T: ByteValued + Default + VhostUserMsgValidator>(
        &self,
    ) -> Result<T, DecodeError> {
        let want = std::mem::size_of::<T>();
        if self.body.len() != want {
            return Err(self.size_err(want.to_string()));
        }
        let v: T = read_obj(&self.body);
        if !v.is_valid() {
            return Err(self.invalid("invalid payload values"));
        }
        Ok(v)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(self.body::<VhostUserU64>()?.value)
    }

    fn vring_fd(&mut self) -> Result<VringFd, DecodeError> {
        let want = std::mem::size_of::<VhostUserU64>();
        if self.body.len() != want {
            return Err(self.size_err(want.to_string()));
        }
        let v = read_obj::<VhostUserU64>(&self.body).value;
        let nofd = v & VRING_NOFD != 0;
        let file = if nofd {
            self.fds(0)?;
            None
        } else {
            Some(self.one_fd()?)
        };
        if v & !(VRING_NOFD | VRING_IDX_MASK) != 0 {
            return Err(self.invalid(format!("reserved bits set in {v:#x}")));
        }
        Ok(VringFd {
            index: (v & VRING_IDX_MASK) as u8,
            file,
        })
    }

    fn mem_table(&mut self) -> Result<Request, DecodeError> {
        let hdr = std::mem::size_of::<VhostUserMemory>();
        let each = std::mem::size_of::<VhostUserMemoryRegion>();
        if self.body.len() < hdr {
            return Err(self.size_err(format!("at least {hdr}")));
        }
        let table: VhostUserMemory = read_obj(&self.body);
        let n = table.num_regions as usize;
        if n > super::wire::MAX_FDS || self.body.len() != hdr + n * each {
            return Err(self.size_err(format!("{hdr} + {each} per region ({n} regions)")));
        }
        let files = self.fds(n)?;
        if !table.is_valid() {
            return Err(self.invalid(format!("{n} regions")));
        }
        let regions: Vec<VhostUserMemoryRegion> = self.body[hdr..]
            .chunks_exact(each)
            .map(read_obj::<VhostUserMemoryRegion>)
            .collect();
        if let Some(i) = regions.iter().position(|r| !r.is_valid()) {
            return Err(self.invalid(format!("region {i}: empty or wrapping around")));
        }
        Ok(Request::SetMemTable { regions, files })
    }

    fn single_region(&self) -> Result<VhostUserSingleMemoryRegion, DecodeError> {
        let r: VhostUserSingleMemoryRegion = self.body_with_fds()?;
        if !r.is_valid() {
            return Err(self.invalid("region empty or wrapping around"));
        }
        Ok(r)
    }

    fn config(&self) -> Result<(VhostUserConfig, Vec<u8>), DecodeError> {
        let hdr = std::mem::size_of::<VhostUserConfig>();
        if self.body.len() < hdr {
            return Err(self.size_err(format!("at least {hdr}")));
        }
        let c: VhostUserConfig = read_obj(&self.body);
        let data = self.body[hdr..].to_vec();
        let size = c.size as usize;
        if data.len() != size {
            return Err(self.size_err(format!("{hdr} + {size}")));
        }
        if !c.is_valid() {
            let (offset, size, flags) = (c.offset, c.size, c.flags);
            return Err(self.invalid(format!(
                "offset {offset} size {size} flags {flags:#x} out of range"
            )));
        }
        Ok((c, data))
    }

    fn decode(mut self, ctx: DecodeContext) -> Result<Request, DecodeError> {
        use FrontendReq as R;
        let Ok(req) = FrontendReq::try_from(self.code) else {
            return Ok(Request::Unsupported(self.code));
        };
        let is_ack = ctx.postcopy_listening
            && self.body.len() == std::mem::size_of::<VhostUserU64>()
            && matches!(req, R::SET_MEM_TABLE | R::ADD_MEM_REG | R::REM_MEM_REG);
        if is_ack {
            return Ok(Request::PostcopyRegionsAck(self.u64()?));
        }
        Ok(match req {
            R::GET_FEATURES => self.empty().map(|_| Request::GetFeatures)?,
            R::SET_FEATURES => Request::SetFeatures(self.u64()?),
            R::SET_OWNER => self.empty().map(|_| Request::SetOwner)?,
            R::RESET_OWNER => self.empty().map(|_| Request::ResetOwner)?,
            R::RESET_DEVICE => self.empty().map(|_| Request::ResetDevice)?,
            R::GET_PROTOCOL_FEATURES => self.empty().map(|_| Request::GetProtocolFeatures)?,
            R::SET_PROTOCOL_FEATURES => Request::SetProtocolFeatures(self.u64()?),
            R::GET_QUEUE_NUM => self.empty().map(|_| Request::GetQueueNum)?,
            R::GET_MAX_MEM_SLOTS => self.empty().map(|_| Request::GetMaxMemSlots)?,
            R::SET_MEM_TABLE => self.mem_table()?,
            R::ADD_MEM_REG => {
                let file = self.one_fd()?;
                let region = self.single_region()?;
                Request::AddMemReg { region, file }
            }
            R::REM_MEM_REG => {
                // QEMU before 6.0 attached the region's fd; it means nothing.
                if self.fds.len() > 1 {
                    self.fds(1)?;
                }
                Request::RemMemReg(self.single_region()?)
            }
            R::SET_VRING_NUM => Request::SetVringNum(self.body()?),
            R::SET_VRING_ADDR => Request::SetVringAddr(self.body()?),
            R::SET_VRING_BASE => Request::SetVringBase(self.body()?),
            R::GET_VRING_BASE => Request::GetVringBase(self.body()?),
            R::SET_VRING_KICK => Request::SetVringKick(self.vring_fd()?),
            R::SET_VRING_CALL => Request::SetVringCall(self.vring_fd()?),
            R::SET_VRING_ERR => Request::SetVringErr(self.vring_fd()?),
            R::SET_VRING_ENABLE => {
                let s: VhostUserVringState = self.body()?;
                if s.num > 1 {
                    let num = s.num;
                    return Err(self.invalid(format!("enable value {num} is neither 0 nor 1")));
                }
                Request::SetVringEnable(s)
            }
            R::GET_CONFIG => {
                self.fds(0)?;
                Request::GetConfig(self.config()?.0)
            }
            R::SET_CONFIG => {
                self.fds(0)?;
                let (hdr, data) = self.config()?;
                Request::SetConfig { hdr, data }
            }
            R::SET_STATUS => Request::SetStatus(self.u64()?),
            R::GET_STATUS => self.empty().map(|_| Request::GetStatus)?,
            R::SET_BACKEND_REQ_FD => {
                let file = self.one_fd()?;
                if !self.body.is_empty() {
                    return Err(self.size_err("0"));
                }
                Request::SetBackendReqFd(file)
            }
            R::GET_INFLIGHT_FD => Request::GetInflightFd(self.body()?),
            R::SET_INFLIGHT_FD => {
                let file = self.one_fd()?;
                let inflight = self.body_with_fds()?;
                Request::SetInflightFd { inflight, file }
            }
            R::SET_LOG_BASE => {
                let want = std::mem::size_of::<VhostUserLog>();
                if self.body.len() != want {
                    // The old form (a u64 address, no fd) needs a shared log
                    // the daemon does not offer.
                    return Err(self.size_err(format!("{want} (LOG_SHMFD form)")));
                }
                let file = self.one_fd()?;
                let log = self.body_with_fds()?;
                Request::SetLogBase { log, file }
            }
            R::POSTCOPY_ADVISE => self.empty().map(|_| Request::PostcopyAdvise)?,
            R::POSTCOPY_LISTEN => self.empty().map(|_| Request::PostcopyListen)?,
            R::POSTCOPY_END => self.empty().map(|_| Request::PostcopyEnd)?,
            R::SET_DEVICE_STATE_FD => {
                let file = self.one_fd()?;
                let t: VhostUserTransferDeviceState = self.body_with_fds()?;
                let (Ok(direction), Ok(phase)) = (
                    VhostTransferStateDirection::try_from(t.direction),
                    VhostTransferStatePhase::try_from(t.phase),
                ) else {
                    return Err(self.invalid("unknown direction or phase"));
                };
                Request::SetDeviceStateFd {
                    direction,
                    phase,
                    file,
                }
            }
            R::CHECK_DEVICE_STATE => self.empty().map(|_| Request::CheckDeviceState)?,
            _ => Request::Unsupported(self.code),
        })
    }
}

/// Decodes `msg` (its framing already checked by the wire layer).
pub fn decode(msg: Message, ctx: DecodeContext) -> Result<Request, DecodeError> {
    Decoder {
        code: msg.header.request,
        body: msg.body,
        fds: msg.fds,
    }
    .decode(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::{Header, VERSION};
    use vhost::vhost_user::message::VhostUserConfigFlags;

    fn msg(code: FrontendReq, body: Vec<u8>, nfds: usize) -> Message {
        Message {
            header: Header {
                request: code.into(),
                flags: VERSION,
                size: body.len() as u32,
            },
            body,
            fds: (0..nfds).map(|_| tempfile_like()).collect(),
        }
    }

    fn tempfile_like() -> File {
        File::open("/dev/null").unwrap()
    }

    fn dec(code: FrontendReq, body: Vec<u8>, nfds: usize) -> Result<Request, DecodeError> {
        decode(msg(code, body, nfds), DecodeContext::default())
    }

    fn u64b(v: u64) -> Vec<u8> {
        v.to_ne_bytes().to_vec()
    }

    fn state(index: u32, num: u32) -> Vec<u8> {
        VhostUserVringState::new(index, num).as_slice().to_vec()
    }

    fn fatal(r: Result<Request, DecodeError>) -> bool {
        matches!(r, Err(e) if e.is_fatal())
    }

    fn refused(r: Result<Request, DecodeError>) -> bool {
        matches!(r, Err(e) if !e.is_fatal())
    }

    #[test]
    fn fixed_payloads() {
        assert!(matches!(
            dec(FrontendReq::SET_FEATURES, u64b(1 << 32), 0),
            Ok(Request::SetFeatures(v)) if v == 1 << 32
        ));
        assert!(matches!(
            dec(FrontendReq::SET_VRING_NUM, state(3, 256), 0),
            Ok(Request::SetVringNum(s)) if s.index == 3 && s.num == 256
        ));
        assert!(fatal(dec(FrontendReq::SET_VRING_NUM, vec![0; 4], 0)));
        assert!(fatal(dec(FrontendReq::SET_FEATURES, vec![0; 16], 0)));
        assert!(fatal(dec(FrontendReq::GET_FEATURES, vec![0; 8], 0)));
        assert!(matches!(
            dec(FrontendReq::GET_STATUS, vec![], 0),
            Ok(Request::GetStatus)
        ));
        assert!(matches!(
            dec(FrontendReq::SET_STATUS, u64b(15), 0),
            Ok(Request::SetStatus(15))
        ));
    }

    #[test]
    fn fds_only_where_the_request_takes_them() {
        assert!(fatal(dec(FrontendReq::GET_FEATURES, vec![], 4)));
        assert!(fatal(dec(FrontendReq::SET_VRING_NUM, state(0, 256), 1)));
        // Kick without the "no fd" bit needs exactly one fd.
        assert!(fatal(dec(FrontendReq::SET_VRING_KICK, u64b(0), 0)));
        assert!(fatal(dec(FrontendReq::SET_VRING_KICK, u64b(0), 2)));
        assert!(matches!(
            dec(FrontendReq::SET_VRING_KICK, u64b(1), 1),
            Ok(Request::SetVringKick(VringFd {
                index: 1,
                file: Some(_)
            }))
        ));
        assert!(matches!(
            dec(FrontendReq::SET_VRING_CALL, u64b(0x102), 0),
            Ok(Request::SetVringCall(VringFd {
                index: 2,
                file: None
            }))
        ));
        assert!(fatal(dec(FrontendReq::SET_VRING_CALL, u64b(0x102), 1)));
        assert!(refused(dec(FrontendReq::SET_VRING_CALL, u64b(0x1_0000), 1)));
        assert!(fatal(dec(FrontendReq::SET_LOG_BASE, vec![0; 16], 0)));
        assert!(fatal(dec(FrontendReq::SET_INFLIGHT_FD, vec![0; 24], 0)));
    }

    fn mem_table(n: u32, regions: &[VhostUserMemoryRegion]) -> Vec<u8> {
        let mut b = VhostUserMemory::new(n).as_slice().to_vec();
        for r in regions {
            b.extend_from_slice(r.as_slice());
        }
        b
    }

    #[test]
    fn memory_tables() {
        let r = VhostUserMemoryRegion::new(0, 1 << 20, 0x7f00_0000_0000, 0);
        assert!(matches!(
            dec(FrontendReq::SET_MEM_TABLE, mem_table(2, &[r, r]), 2),
            Ok(Request::SetMemTable { regions, files }) if regions.len() == 2 && files.len() == 2
        ));
        // One fd per region, a body that matches the count.
        assert!(fatal(dec(
            FrontendReq::SET_MEM_TABLE,
            mem_table(2, &[r, r]),
            1
        )));
        assert!(fatal(dec(
            FrontendReq::SET_MEM_TABLE,
            mem_table(2, &[r]),
            1
        )));
        assert!(fatal(dec(
            FrontendReq::SET_MEM_TABLE,
            mem_table(1000, &[r]),
            1
        )));
        assert!(fatal(dec(FrontendReq::SET_MEM_TABLE, vec![0; 4], 0)));
        // An empty region is a bad value, not bad framing.
        let empty = VhostUserMemoryRegion::new(0, 0, 0, 0);
        assert!(refused(dec(
            FrontendReq::SET_MEM_TABLE,
            mem_table(1, &[empty]),
            1
        )));
    }

    #[test]
    fn postcopy_acks_only_while_listening() {
        let listening = DecodeContext {
            postcopy_listening: true,
        };
        for code in [
            FrontendReq::SET_MEM_TABLE,
            FrontendReq::ADD_MEM_REG,
            FrontendReq::REM_MEM_REG,
        ] {
            assert!(matches!(
                decode(msg(code, u64b(0), 0), listening),
                Ok(Request::PostcopyRegionsAck(0))
            ));
            // Otherwise an 8-byte body is no region (a zero-region table
            // is refused, a single region is 40 bytes).
            assert!(dec(code, u64b(0), 0).is_err());
        }
    }

    #[test]
    fn config_payloads() {
        let mut b = VhostUserConfig::new(0, 6, VhostUserConfigFlags::WRITABLE)
            .as_slice()
            .to_vec();
        assert!(fatal(dec(FrontendReq::GET_CONFIG, b.clone(), 0)));
        b.extend_from_slice(&[0; 6]);
        assert!(matches!(
            dec(FrontendReq::GET_CONFIG, b, 0),
            Ok(Request::GetConfig(c)) if { c.size } == 6
        ));
        let mut big = VhostUserConfig::new(0x1000, 4, VhostUserConfigFlags::WRITABLE)
            .as_slice()
            .to_vec();
        big.extend_from_slice(&[0; 4]);
        assert!(refused(dec(FrontendReq::SET_CONFIG, big, 0)));
    }

    #[test]
    fn unknown_and_unimplemented_codes_are_not_framing_errors() {
        let m = Message {
            header: Header {
                request: 999,
                flags: VERSION,
                size: 3,
            },
            body: vec![1, 2, 3],
            fds: vec![tempfile_like()],
        };
        assert!(matches!(
            decode(m, DecodeContext::default()),
            Ok(Request::Unsupported(999))
        ));
        assert!(matches!(
            dec(FrontendReq::IOTLB_MSG, vec![0; 40], 0),
            Ok(Request::Unsupported(22))
        ));
        assert_eq!(ReqName(39).to_string(), "SET_STATUS");
        assert_eq!(ReqName(999).to_string(), "request 999");
    }

    #[test]
    fn enable_is_zero_or_one() {
        assert!(refused(dec(FrontendReq::SET_VRING_ENABLE, state(0, 2), 0)));
    }
}
