//! One vhost-user connection as the back-end sees it: what was offered and
//! negotiated, which requests are allowed when, and how each is answered.
//!
//! The rules follow what frontends do, not only what the specification
//! says. QEMU enables rings (`SET_VRING_ENABLE`) and may read the protocol
//! features before `SET_FEATURES`; `GET_QUEUE_NUM` needs `MQ` to have been
//! offered, not acked. A request tied to a protocol feature that was not
//! negotiated, a request this daemon does not implement, and a handler
//! error are refused (a `REPLY_ACK` failure, or the request's own failure
//! reply) and logged by name; the connection goes on. Only a message that
//! breaks the framing ends it.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{
    FrontendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfig,
    VhostUserInflight, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr,
    VhostUserVringState,
};
use vm_memory::ByteValued;

use super::request::{decode, DecodeContext, DecodeError, ReqName, Request, VringFd};
use super::wire::{self, Header, Message, WireError};

const LOG: &str = "vhost-user";

/// A handler's refusal, with the reason for the log line.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;
pub type HandlerResult<T> = std::result::Result<T, HandlerError>;

/// What the device model behind the connection does for each request. The
/// session has already checked the framing and the negotiation rules;
/// index ranges and values are the handler's to check.
pub trait RequestHandler {
    /// GET_FEATURES: the virtio (and vhost-user) feature bits offered.
    fn features(&mut self) -> u64;
    fn set_features(&mut self, features: u64) -> HandlerResult<()>;
    /// GET_PROTOCOL_FEATURES.
    fn protocol_features(&mut self) -> VhostUserProtocolFeatures;
    fn set_protocol_features(&mut self, f: VhostUserProtocolFeatures) -> HandlerResult<()>;
    fn queue_num(&mut self) -> u64;
    fn max_mem_slots(&mut self) -> u64;
    fn set_owner(&mut self) -> HandlerResult<()>;
    fn reset_owner(&mut self) -> HandlerResult<()>;
    fn reset_device(&mut self) -> HandlerResult<()>;
    /// With `postcopy`, returns this daemon's address of each region.
    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: bool,
    ) -> HandlerResult<Vec<u64>>;
    /// With `postcopy`, returns this daemon's address of the region.
    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy: bool,
    ) -> HandlerResult<u64>;
    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> HandlerResult<()>;
    fn set_vring_num(&mut self, index: u32, num: u32) -> HandlerResult<()>;
    fn set_vring_addr(&mut self, addr: &VhostUserVringAddr) -> HandlerResult<()>;
    fn set_vring_base(&mut self, index: u32, base: u32) -> HandlerResult<()>;
    fn get_vring_base(&mut self, index: u32) -> HandlerResult<u32>;
    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> HandlerResult<()>;
    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> HandlerResult<()>;
    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> HandlerResult<()>;
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> HandlerResult<()>;
    fn get_config(&mut self, offset: u32, size: u32) -> HandlerResult<Vec<u8>>;
    fn set_config(&mut self, offset: u32, data: &[u8]) -> HandlerResult<()>;
    fn set_status(&mut self, status: u8) -> HandlerResult<()>;
    fn status(&mut self) -> u8;
    fn get_inflight_fd(
        &mut self,
        req: &VhostUserInflight,
    ) -> HandlerResult<(VhostUserInflight, File)>;
    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> HandlerResult<()>;
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> HandlerResult<()>;
    fn postcopy_advise(&mut self) -> HandlerResult<File>;
    fn postcopy_listen(&mut self) -> HandlerResult<()>;
    fn postcopy_end(&mut self) -> HandlerResult<()>;
    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> HandlerResult<Option<File>>;
    fn check_device_state(&mut self) -> HandlerResult<()>;
    /// Runs after every request, answered or refused (mode events go out
    /// from here).
    fn after_request(&mut self) {}
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("malformed message: {0}")]
    Malformed(DecodeError),
    #[error("writing the reply to {req}: {source}")]
    Reply { req: String, source: std::io::Error },
}

impl SessionError {
    /// The frontend went away between messages (not an error).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, SessionError::Wire(WireError::Closed))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Postcopy {
    Inactive,
    Advised,
    Listening,
    Ended,
}

/// The answer to one request.
enum Answer {
    /// No reply unless the frontend asked for an ack.
    Ack(HandlerResult<()>),
    /// The request's own reply, sent whatever NEED_REPLY says.
    Reply { body: Vec<u8>, fd: Option<File> },
    /// Nothing at all (the postcopy acknowledgement).
    Silent,
}

fn reply<T: ByteValued>(v: &T) -> Answer {
    Answer::Reply {
        body: v.as_slice().to_vec(),
        fd: None,
    }
}

fn reply_u64(v: u64) -> Answer {
    reply(&VhostUserU64::new(v))
}

/// A failed request that has a reply of its own: an empty body, which every
/// frontend reads as a failure (QEMU: "Received bad msg size").
fn empty_reply() -> Answer {
    Answer::Reply {
        body: Vec::new(),
        fd: None,
    }
}

pub struct Session<H: RequestHandler> {
    handler: H,
    /// Protocol features offered in GET_PROTOCOL_FEATURES (None: not asked).
    offered_protocol: Option<VhostUserProtocolFeatures>,
    acked_protocol: VhostUserProtocolFeatures,
    postcopy: Postcopy,
}

impl<H: RequestHandler> Session<H> {
    pub fn new(handler: H) -> Self {
        Session {
            handler,
            offered_protocol: None,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            postcopy: Postcopy::Inactive,
        }
    }

    pub fn handler(&mut self) -> &mut H {
        &mut self.handler
    }

    /// Reads, handles and answers one request.
    pub fn serve_one(&mut self, s: &UnixStream) -> Result<(), SessionError> {
        let msg = wire::recv_request(s)?;
        let (header, answer) = self.handle(msg)?;
        self.handler.after_request();
        self.send_answer(s, header, answer)
    }

    fn handle(&mut self, msg: Message) -> Result<(Header, Answer), SessionError> {
        let header = msg.header;
        log::trace!(target: LOG, "{} flags {:#x} size {} fds {}",
            ReqName(header.request), header.flags, header.size, msg.fds.len());
        let ctx = DecodeContext {
            postcopy_listening: self.postcopy == Postcopy::Listening,
        };
        let answer = match decode(msg, ctx) {
            Ok(req) => self.dispatch(header.request, req),
            Err(e) if e.is_fatal() => return Err(SessionError::Malformed(e)),
            Err(e) => self.refuse(header.request, e.to_string()),
        };
        Ok((header, answer))
    }

    fn send_answer(&self, s: &UnixStream, h: Header, answer: Answer) -> Result<(), SessionError> {
        let name = ReqName(h.request);
        let (body, fd) = match answer {
            Answer::Silent => return Ok(()),
            Answer::Ack(r) => {
                if let Err(e) = &r {
                    log::error!(target: LOG, "{name}: {e}");
                }
                if !(h.need_reply() && self.acks(h.request)) {
                    return Ok(());
                }
                (
                    VhostUserU64::new(u64::from(r.is_err())).as_slice().to_vec(),
                    None,
                )
            }
            Answer::Reply { body, fd } => (body, fd),
        };
        let fds: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
        wire::send(s, Header::reply(h.request, body.len()), &body, &fds).map_err(|source| {
            SessionError::Reply {
                req: name.to_string(),
                source,
            }
        })
    }

    /// Whether a NEED_REPLY request gets its ack: with REPLY_ACK
    /// negotiated; the postcopy LISTEN and END always (QEMU sets NEED_REPLY
    /// on them and waits, whatever was negotiated).
    fn acks(&self, code: u32) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
            || code == u32::from(FrontendReq::POSTCOPY_LISTEN)
            || code == u32::from(FrontendReq::POSTCOPY_END)
    }

    /// The answer to a request refused before it reached the handler: the
    /// same shape as the handler's own failure for that request.
    fn refuse(&mut self, code: u32, why: String) -> Answer {
        log::error!(target: LOG, "{why}");
        failure_answer(code)
    }

    fn need(&self, code: u32, f: VhostUserProtocolFeatures) -> Result<(), String> {
        if self.acked_protocol.contains(f) {
            Ok(())
        } else {
            Err(format!(
                "{} needs the protocol feature {f:?}, which was not negotiated",
                ReqName(code)
            ))
        }
    }

    fn dispatch(&mut self, code: u32, req: Request) -> Answer {
        use VhostUserProtocolFeatures as P;
        let gate = match &req {
            Request::ResetDevice => self.need(code, P::RESET_DEVICE),
            Request::GetMaxMemSlots | Request::AddMemReg { .. } | Request::RemMemReg(_) => {
                self.need(code, P::CONFIGURE_MEM_SLOTS)
            }
            Request::SetStatus(_) | Request::GetStatus => self.need(code, P::STATUS),
            Request::GetInflightFd(_) | Request::SetInflightFd { .. } => {
                self.need(code, P::INFLIGHT_SHMFD)
            }
            Request::SetLogBase { .. } => self.need(code, P::LOG_SHMFD),
            Request::SetDeviceStateFd { .. } | Request::CheckDeviceState => {
                self.need(code, P::DEVICE_STATE)
            }
            Request::PostcopyAdvise | Request::PostcopyListen | Request::PostcopyEnd => {
                self.need(code, P::PAGEFAULT)
            }
            Request::SetBackendReqFd(_) => self.need(code, P::BACKEND_REQ),
            // "queried": offered in an answered GET_PROTOCOL_FEATURES.
            Request::GetQueueNum => match self.offered_protocol {
                Some(p) if p.contains(P::MQ) => Ok(()),
                _ => Err("GET_QUEUE_NUM before GET_PROTOCOL_FEATURES offered MQ".into()),
            },
            Request::Unsupported(c) => Err(format!("{} is not supported", ReqName(*c))),
            _ => Ok(()),
        };
        if let Err(why) = gate {
            return self.refuse(code, why);
        }
        let h = &mut self.handler;
        match req {
            Request::GetFeatures => reply_u64(h.features()),
            Request::SetFeatures(f) => Answer::Ack(h.set_features(f)),
            Request::SetOwner => Answer::Ack(h.set_owner()),
            Request::ResetOwner => Answer::Ack(h.reset_owner()),
            Request::ResetDevice => Answer::Ack(h.reset_device()),
            Request::GetProtocolFeatures => {
                let p = h.protocol_features();
                self.offered_protocol = Some(p);
                reply_u64(p.bits())
            }
            Request::SetProtocolFeatures(bits) => self.set_protocol_features(bits),
            Request::GetQueueNum => reply_u64(h.queue_num()),
            Request::GetMaxMemSlots => reply_u64(h.max_mem_slots()),
            Request::SetMemTable { regions, files } => self.set_mem_table(regions, files),
            Request::AddMemReg { region, file } => self.add_mem_region(region, file),
            Request::RemMemReg(region) => Answer::Ack(h.remove_mem_region(&region)),
            Request::PostcopyRegionsAck(0) => Answer::Silent,
            Request::PostcopyRegionsAck(v) => {
                log::error!(target: LOG, "{}: the VMM reports failure {v} registering the postcopy regions", ReqName(code));
                Answer::Silent
            }
            Request::SetVringNum(s) => Answer::Ack(h.set_vring_num(s.index, s.num)),
            Request::SetVringAddr(a) => Answer::Ack(h.set_vring_addr(&a)),
            Request::SetVringBase(s) => Answer::Ack(h.set_vring_base(s.index, s.num)),
            Request::GetVringBase(s) => match h.get_vring_base(s.index) {
                Ok(base) => reply(&VhostUserVringState::new(s.index, base)),
                Err(e) => self.failed(code, e),
            },
            Request::SetVringKick(VringFd { index, file }) => {
                Answer::Ack(h.set_vring_kick(index, file))
            }
            Request::SetVringCall(VringFd { index, file }) => {
                Answer::Ack(h.set_vring_call(index, file))
            }
            Request::SetVringErr(VringFd { index, file }) => {
                Answer::Ack(h.set_vring_err(index, file))
            }
            Request::SetVringEnable(s) => Answer::Ack(h.set_vring_enable(s.index, s.num == 1)),
            Request::GetConfig(c) => self.get_config(c),
            Request::SetConfig { hdr, data } => Answer::Ack(h.set_config(hdr.offset, &data)),
            Request::SetStatus(v) => match u8::try_from(v) {
                Ok(s) => Answer::Ack(h.set_status(s)),
                Err(_) => Answer::Ack(Err(format!("status {v:#x} is not a byte").into())),
            },
            Request::GetStatus => reply_u64(h.status().into()),
            // Accepted for frontends that send it anyway; the daemon sends
            // no backend requests, so the fd is closed.
            Request::SetBackendReqFd(_) => Answer::Ack(Ok(())),
            Request::GetInflightFd(i) => match h.get_inflight_fd(&i) {
                Ok((info, file)) => Answer::Reply {
                    body: info.as_slice().to_vec(),
                    fd: Some(file),
                },
                Err(e) => self.failed(code, e),
            },
            Request::SetInflightFd { inflight, file } => {
                Answer::Ack(h.set_inflight_fd(&inflight, file))
            }
            Request::SetLogBase { log, file } => match h.set_log_base(&log, file) {
                // QEMU waits for this reply before it lets the guest run on.
                Ok(()) => reply(&log),
                Err(e) => self.failed(code, e),
            },
            Request::PostcopyAdvise => self.postcopy_advise(),
            Request::PostcopyListen => self.postcopy_listen(),
            Request::PostcopyEnd => self.postcopy_end(),
            Request::SetDeviceStateFd {
                direction,
                phase,
                file,
            } => {
                // Bits 0..=7: 0 on success; bit 8: no fd returned.
                match h.set_device_state_fd(direction, phase, file) {
                    Ok(None) => reply_u64(0x100),
                    Ok(Some(f)) => Answer::Reply {
                        body: VhostUserU64::new(0).as_slice().to_vec(),
                        fd: Some(f),
                    },
                    Err(e) => {
                        log::error!(target: LOG, "{}: {e}", ReqName(code));
                        reply_u64(0x101)
                    }
                }
            }
            Request::CheckDeviceState => match h.check_device_state() {
                Ok(()) => reply_u64(0),
                Err(e) => {
                    log::error!(target: LOG, "{}: {e}", ReqName(code));
                    reply_u64(1)
                }
            },
            Request::Unsupported(_) => unreachable!("refused by the gate above"),
        }
    }

    /// A handler error on a request with its own reply.
    fn failed(&mut self, code: u32, e: HandlerError) -> Answer {
        self.refuse(code, format!("{}: {e}", ReqName(code)))
    }

    fn set_protocol_features(&mut self, bits: u64) -> Answer {
        let offered = self.handler.protocol_features();
        let Some(f) = VhostUserProtocolFeatures::from_bits(bits).filter(|f| offered.contains(*f))
        else {
            return Answer::Ack(Err(format!(
                "protocol features {bits:#x} include some not offered ({:#x})",
                offered.bits()
            )
            .into()));
        };
        let r = self.handler.set_protocol_features(f);
        if r.is_ok() {
            self.acked_protocol = f;
        }
        Answer::Ack(r)
    }

    fn set_mem_table(&mut self, regions: Vec<VhostUserMemoryRegion>, files: Vec<File>) -> Answer {
        let postcopy = self.postcopy == Postcopy::Listening;
        let r = self.handler.set_mem_table(&regions, files, postcopy);
        if !postcopy {
            return Answer::Ack(r.map(|_| ()));
        }
        // Postcopy: the same table back with this daemon's addresses; the
        // frontend then acknowledges it (PostcopyRegionsAck).
        match r {
            Ok(bases) if bases.len() == regions.len() => {
                let mut body = VhostUserMemory::new(regions.len() as u32)
                    .as_slice()
                    .to_vec();
                for (mut region, base) in regions.into_iter().zip(bases) {
                    region.user_addr = base;
                    body.extend_from_slice(region.as_slice());
                }
                Answer::Reply { body, fd: None }
            }
            Ok(_) => self.refuse(
                FrontendReq::SET_MEM_TABLE.into(),
                "SET_MEM_TABLE (postcopy): region count mismatch".into(),
            ),
            Err(e) => self.failed(FrontendReq::SET_MEM_TABLE.into(), e),
        }
    }

    fn add_mem_region(&mut self, region: VhostUserSingleMemoryRegion, file: File) -> Answer {
        let postcopy = self.postcopy == Postcopy::Listening;
        let r = self.handler.add_mem_region(&region, file, postcopy);
        if !postcopy {
            return Answer::Ack(r.map(|_| ()));
        }
        match r {
            Ok(base) => reply(&VhostUserSingleMemoryRegion::new(
                region.guest_phys_addr,
                region.memory_size,
                base,
                region.mmap_offset,
            )),
            Err(e) => self.failed(FrontendReq::ADD_MEM_REG.into(), e),
        }
    }

    fn get_config(&mut self, c: VhostUserConfig) -> Answer {
        let (offset, size, flags) = (c.offset, c.size, c.flags);
        let data = match self.handler.get_config(offset, size) {
            Ok(d) if d.len() == size as usize => d,
            Ok(d) => {
                log::error!(target: LOG, "GET_CONFIG: {} bytes for a {size}-byte read", d.len());
                Vec::new()
            }
            Err(e) => {
                log::error!(target: LOG, "GET_CONFIG offset {offset} size {size}: {e}");
                Vec::new()
            }
        };
        // A zero size in the reply is the specification's failure.
        let hdr = VhostUserConfig {
            offset,
            size: data.len() as u32,
            flags,
        };
        let mut body = hdr.as_slice().to_vec();
        body.extend_from_slice(&data);
        Answer::Reply { body, fd: None }
    }

    fn postcopy_advise(&mut self) -> Answer {
        if self.postcopy != Postcopy::Inactive {
            return self.refuse(
                FrontendReq::POSTCOPY_ADVISE.into(),
                format!("POSTCOPY_ADVISE: postcopy is already {:?}", self.postcopy),
            );
        }
        match self.handler.postcopy_advise() {
            Ok(uffd) => {
                self.postcopy = Postcopy::Advised;
                Answer::Reply {
                    body: Vec::new(),
                    fd: Some(uffd),
                }
            }
            // No fd in the reply is the failure QEMU recognises.
            Err(e) => self.failed(FrontendReq::POSTCOPY_ADVISE.into(), e),
        }
    }

    fn postcopy_listen(&mut self) -> Answer {
        if self.postcopy != Postcopy::Advised {
            return Answer::Ack(Err(format!(
                "POSTCOPY_LISTEN without POSTCOPY_ADVISE (postcopy is {:?})",
                self.postcopy
            )
            .into()));
        }
        let r = self.handler.postcopy_listen();
        if r.is_ok() {
            self.postcopy = Postcopy::Listening;
        }
        Answer::Ack(r)
    }

    fn postcopy_end(&mut self) -> Answer {
        if self.postcopy != Postcopy::Listening {
            return Answer::Ack(Err(format!(
                "POSTCOPY_END while postcopy is {:?}",
                self.postcopy
            )
            .into()));
        }
        self.postcopy = Postcopy::Ended;
        Answer::Ack(self.handler.postcopy_end())
    }
}

/// The failure answer for a request refused before any handler ran.
fn failure_answer(code: u32) -> Answer {
    use FrontendReq as R;
    match FrontendReq::try_from(code) {
        Ok(R::GET_CONFIG) => {
            // Offsets are unknown here; a zero-size config is the failure.
            reply(&VhostUserConfig::default())
        }
        Ok(R::SET_DEVICE_STATE_FD) => reply_u64(0x101),
        // A region of size 0 and no fd: QEMU reads it as "no in-flight
        // tracking", other frontends fail on the missing fd.
        Ok(R::GET_INFLIGHT_FD) => reply(&VhostUserInflight::default()),
        Ok(R::CHECK_DEVICE_STATE) => reply_u64(1),
        Ok(
            R::GET_FEATURES
            | R::GET_PROTOCOL_FEATURES
            | R::GET_QUEUE_NUM
            | R::GET_MAX_MEM_SLOTS
            | R::GET_VRING_BASE
            | R::GET_STATUS
            | R::SET_LOG_BASE
            | R::POSTCOPY_ADVISE,
        ) => empty_reply(),
        _ => Answer::Ack(Err("refused".into())),
    }
}
