//! The session against a recording handler, over a real socket pair: the
//! message orders QEMU and DPDK send, refusals that keep the connection,
//! and framing errors that end it.

use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{
    FrontendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfig,
    VhostUserConfigFlags, VhostUserInflight, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures as P, VhostUserSingleMemoryRegion, VhostUserVringAddr,
    VhostUserVringState,
};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::session::{HandlerResult, RequestHandler, Session, SessionError};
use super::wire::{self, Header, Message, NEED_REPLY, REPLY, VERSION};

#[derive(Default)]
struct Recorder {
    calls: Vec<String>,
    fail: bool,
    status: u8,
}

impl Recorder {
    fn call(&mut self, what: impl Into<String>) -> HandlerResult<()> {
        self.calls.push(what.into());
        if self.fail {
            Err("the handler refuses".into())
        } else {
            Ok(())
        }
    }
}

fn devnull() -> File {
    File::open("/dev/null").unwrap()
}

impl RequestHandler for Recorder {
    fn features(&mut self) -> u64 {
        1 << 30 | 1 << 32
    }
    fn set_features(&mut self, f: u64) -> HandlerResult<()> {
        self.call(format!("features {f:#x}"))
    }
    fn protocol_features(&mut self) -> P {
        P::MQ | P::REPLY_ACK | P::STATUS | P::PAGEFAULT | P::DEVICE_STATE | P::CONFIGURE_MEM_SLOTS
    }
    fn set_protocol_features(&mut self, f: P) -> HandlerResult<()> {
        self.call(format!("protocol {:#x}", f.bits()))
    }
    fn queue_num(&mut self) -> u64 {
        2
    }
    fn max_mem_slots(&mut self) -> u64 {
        8
    }
    fn set_owner(&mut self) -> HandlerResult<()> {
        self.call("owner")
    }
    fn reset_owner(&mut self) -> HandlerResult<()> {
        self.call("reset owner")
    }
    fn reset_device(&mut self) -> HandlerResult<()> {
        self.call("reset device")
    }
    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        _files: Vec<File>,
        postcopy: bool,
    ) -> HandlerResult<Vec<u64>> {
        self.call(format!("mem table {} postcopy {postcopy}", regions.len()))?;
        Ok(regions.iter().map(|r| r.guest_phys_addr + 0x1000).collect())
    }
    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        _file: File,
        postcopy: bool,
    ) -> HandlerResult<u64> {
        self.call(format!("add {:#x} postcopy {postcopy}", {
            r.guest_phys_addr
        }))?;
        Ok(0xabc000)
    }
    fn remove_mem_region(&mut self, r: &VhostUserSingleMemoryRegion) -> HandlerResult<()> {
        self.call(format!("remove {:#x}", { r.guest_phys_addr }))
    }
    fn set_vring_num(&mut self, i: u32, n: u32) -> HandlerResult<()> {
        self.call(format!("num {i} {n}"))
    }
    fn set_vring_addr(&mut self, a: &VhostUserVringAddr) -> HandlerResult<()> {
        self.call(format!("addr {}", { a.index }))
    }
    fn set_vring_base(&mut self, i: u32, b: u32) -> HandlerResult<()> {
        self.call(format!("base {i} {b}"))
    }
    fn get_vring_base(&mut self, i: u32) -> HandlerResult<u32> {
        self.call(format!("get base {i}"))?;
        Ok(77)
    }
    fn set_vring_kick(&mut self, i: u8, f: Option<File>) -> HandlerResult<()> {
        self.call(format!("kick {i} {}", f.is_some()))
    }
    fn set_vring_call(&mut self, i: u8, f: Option<File>) -> HandlerResult<()> {
        self.call(format!("call {i} {}", f.is_some()))
    }
    fn set_vring_err(&mut self, i: u8, _f: Option<File>) -> HandlerResult<()> {
        self.call(format!("err {i}"))
    }
    fn set_vring_enable(&mut self, i: u32, e: bool) -> HandlerResult<()> {
        self.call(format!("enable {i} {e}"))
    }
    fn get_config(&mut self, offset: u32, size: u32) -> HandlerResult<Vec<u8>> {
        self.call(format!("config {offset} {size}"))?;
        Ok(vec![0x52; size as usize])
    }
    fn set_config(&mut self, offset: u32, data: &[u8]) -> HandlerResult<()> {
        self.call(format!("set config {offset} {}", data.len()))
    }
    fn set_status(&mut self, s: u8) -> HandlerResult<()> {
        self.status = s;
        self.call(format!("status {s}"))
    }
    fn status(&mut self) -> u8 {
        self.status
    }
    fn get_inflight_fd(
        &mut self,
        r: &VhostUserInflight,
    ) -> HandlerResult<(VhostUserInflight, File)> {
        self.call("get inflight")?;
        Ok((*r, devnull()))
    }
    fn set_inflight_fd(&mut self, _i: &VhostUserInflight, _f: File) -> HandlerResult<()> {
        self.call("set inflight")
    }
    fn set_log_base(&mut self, l: &VhostUserLog, _f: File) -> HandlerResult<()> {
        self.call(format!("log {}", l.mmap_size))
    }
    fn postcopy_advise(&mut self) -> HandlerResult<File> {
        self.call("advise")?;
        Ok(devnull())
    }
    fn postcopy_listen(&mut self) -> HandlerResult<()> {
        self.call("listen")
    }
    fn postcopy_end(&mut self) -> HandlerResult<()> {
        self.call("end")
    }
    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _f: File,
    ) -> HandlerResult<Option<File>> {
        self.call("state fd")?;
        Ok(None)
    }
    fn check_device_state(&mut self) -> HandlerResult<()> {
        self.call("check state")
    }
}

/// A session serving one end of a socket pair, driven from the other.
struct Peer {
    vmm: UnixStream,
    daemon: UnixStream,
    session: Session<Recorder>,
}

impl Peer {
    fn new() -> Peer {
        let (vmm, daemon) = UnixStream::pair().unwrap();
        vmm.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        Peer {
            vmm,
            daemon,
            session: Session::new(Recorder::default()),
        }
    }

    /// Sends one request and lets the session handle it.
    fn send(
        &mut self,
        req: FrontendReq,
        flags: u32,
        body: &[u8],
        fds: &[RawFd],
    ) -> Result<(), SessionError> {
        let h = Header {
            request: req.into(),
            flags: VERSION | flags,
            size: body.len() as u32,
        };
        wire::send(&self.vmm, h, body, fds).unwrap();
        self.session.serve_one(&self.daemon)
    }

    /// The next reply, which must answer `req`.
    fn reply(&self, req: FrontendReq) -> Message {
        let m = wire::recv_reply(&self.vmm).expect("a reply");
        assert_eq!(m.header.request, u32::from(req));
        assert_eq!(m.header.flags, VERSION | REPLY);
        m
    }

    fn ack(&self, req: FrontendReq) -> u64 {
        let m = self.reply(req);
        assert_eq!(m.body.len(), 8, "ack body");
        u64::from_ne_bytes(m.body[..8].try_into().unwrap())
    }

    fn no_reply(&self) {
        assert!(wire::recv_reply(&self.vmm).is_err(), "unexpected reply");
    }

    fn calls(&mut self) -> Vec<String> {
        std::mem::take(&mut self.session.handler().calls)
    }

    /// GET_PROTOCOL_FEATURES then SET_PROTOCOL_FEATURES(`f`).
    fn negotiate(&mut self, f: P) {
        self.send(FrontendReq::GET_PROTOCOL_FEATURES, 0, &[], &[])
            .unwrap();
        self.reply(FrontendReq::GET_PROTOCOL_FEATURES);
        self.send(
            FrontendReq::SET_PROTOCOL_FEATURES,
            0,
            &f.bits().to_ne_bytes(),
            &[],
        )
        .unwrap();
        self.calls();
    }
}

fn state(i: u32, n: u32) -> Vec<u8> {
    VhostUserVringState::new(i, n).as_slice().to_vec()
}

/// QEMU's virtio-net enables the queue pairs (peer_attach) before
/// SET_FEATURES, with REPLY_ACK already negotiated.
#[test]
fn qemu_enables_rings_before_set_features() {
    let mut p = Peer::new();
    p.send(FrontendReq::SET_OWNER, 0, &[], &[]).unwrap();
    p.send(FrontendReq::GET_FEATURES, 0, &[], &[]).unwrap();
    assert_eq!(
        p.reply(FrontendReq::GET_FEATURES).body,
        (1u64 << 30 | 1 << 32).to_ne_bytes()
    );
    p.negotiate(P::MQ | P::REPLY_ACK | P::STATUS);
    p.send(FrontendReq::GET_QUEUE_NUM, 0, &[], &[]).unwrap();
    assert_eq!(p.reply(FrontendReq::GET_QUEUE_NUM).body, 2u64.to_ne_bytes());
    p.send(FrontendReq::SET_VRING_ENABLE, NEED_REPLY, &state(0, 1), &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_VRING_ENABLE), 0);
    p.send(FrontendReq::SET_VRING_ENABLE, NEED_REPLY, &state(1, 1), &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_VRING_ENABLE), 0);
    p.send(
        FrontendReq::SET_FEATURES,
        NEED_REPLY,
        &(1u64 << 32).to_ne_bytes(),
        &[],
    )
    .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_FEATURES), 0);
    // vhost_user_add_status: GET_STATUS then SET_STATUS(|FEATURES_OK).
    p.send(FrontendReq::GET_STATUS, 0, &[], &[]).unwrap();
    assert_eq!(p.reply(FrontendReq::GET_STATUS).body, 0u64.to_ne_bytes());
    p.send(FrontendReq::SET_STATUS, 0, &8u64.to_ne_bytes(), &[])
        .unwrap();
    p.no_reply();
    assert_eq!(
        p.calls(),
        [
            "enable 0 true",
            "enable 1 true",
            "features 0x100000000",
            "status 8"
        ]
    );
}

#[test]
fn queue_num_needs_mq_queried_not_acked() {
    let mut p = Peer::new();
    p.send(FrontendReq::GET_QUEUE_NUM, 0, &[], &[]).unwrap();
    assert!(
        p.reply(FrontendReq::GET_QUEUE_NUM).body.is_empty(),
        "refusal"
    );
    p.send(FrontendReq::GET_PROTOCOL_FEATURES, 0, &[], &[])
        .unwrap();
    p.reply(FrontendReq::GET_PROTOCOL_FEATURES);
    p.send(FrontendReq::GET_QUEUE_NUM, 0, &[], &[]).unwrap();
    assert_eq!(p.reply(FrontendReq::GET_QUEUE_NUM).body, 2u64.to_ne_bytes());
}

#[test]
fn acks_only_with_reply_ack_negotiated() {
    let mut p = Peer::new();
    p.send(FrontendReq::SET_VRING_NUM, NEED_REPLY, &state(0, 256), &[])
        .unwrap();
    p.no_reply();
    p.negotiate(P::REPLY_ACK);
    p.send(FrontendReq::SET_VRING_NUM, 0, &state(0, 256), &[])
        .unwrap();
    p.no_reply();
    p.send(FrontendReq::SET_VRING_NUM, NEED_REPLY, &state(0, 256), &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_VRING_NUM), 0);
}

#[test]
fn refusals_keep_the_connection() {
    let mut p = Peer::new();
    p.negotiate(P::REPLY_ACK);
    // A handler error.
    p.session.handler().fail = true;
    p.send(FrontendReq::SET_VRING_NUM, NEED_REPLY, &state(9, 256), &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_VRING_NUM), 1);
    p.send(FrontendReq::GET_VRING_BASE, 0, &state(9, 0), &[])
        .unwrap();
    assert!(p.reply(FrontendReq::GET_VRING_BASE).body.is_empty());
    p.session.handler().fail = false;
    // A request the daemon does not implement, with its fd.
    let ev = EventFd::new(0).unwrap();
    p.send(FrontendReq::SET_LOG_FD, NEED_REPLY, &[], &[ev.as_raw_fd()])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_LOG_FD), 1);
    // A code nobody defined.
    wire::send(
        &p.vmm,
        Header {
            request: 200,
            flags: VERSION | NEED_REPLY,
            size: 4,
        },
        &[1, 2, 3, 4],
        &[],
    )
    .unwrap();
    p.session.serve_one(&p.daemon).unwrap();
    let m = wire::recv_reply(&p.vmm).unwrap();
    assert_eq!(
        (m.header.request, m.body),
        (200, 1u64.to_ne_bytes().to_vec())
    );
    // A request whose protocol feature was not negotiated.
    p.send(FrontendReq::GET_STATUS, 0, &[], &[]).unwrap();
    assert!(p.reply(FrontendReq::GET_STATUS).body.is_empty());
    p.send(FrontendReq::CHECK_DEVICE_STATE, 0, &[], &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::CHECK_DEVICE_STATE), 1);
    // Values out of range in a well-framed message.
    p.send(FrontendReq::SET_VRING_ENABLE, NEED_REPLY, &state(0, 7), &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_VRING_ENABLE), 1);
    // And the next request is served.
    p.send(FrontendReq::SET_VRING_NUM, NEED_REPLY, &state(0, 256), &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_VRING_NUM), 0);
    assert_eq!(p.calls(), ["num 9 256", "get base 9", "num 0 256"]);
}

#[test]
fn malformed_messages_end_the_session() {
    let mut p = Peer::new();
    let e = p
        .send(FrontendReq::SET_VRING_NUM, 0, &[0; 4], &[])
        .unwrap_err();
    assert!(matches!(e, SessionError::Malformed(_)), "{e}");
    let ev = EventFd::new(0).unwrap();
    let e = p
        .send(FrontendReq::GET_FEATURES, 0, &[], &[ev.as_raw_fd()])
        .unwrap_err();
    assert!(e.to_string().contains("file descriptors"), "{e}");
    let e = p
        .send(FrontendReq::SET_VRING_KICK, 0, &0u64.to_ne_bytes(), &[])
        .unwrap_err();
    assert!(matches!(e, SessionError::Malformed(_)), "{e}");
    wire::send(
        &p.vmm,
        Header {
            request: 1,
            flags: 2,
            size: 0,
        },
        &[],
        &[],
    )
    .unwrap();
    let e = p.session.serve_one(&p.daemon).unwrap_err();
    assert!(e.to_string().contains("version"), "{e}");
    assert!(p.calls().is_empty());
    drop(p.vmm);
    assert!(p.session.serve_one(&p.daemon).unwrap_err().is_disconnect());
}

fn region(gpa: u64) -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(gpa, 1 << 20, 0x7f00_0000_0000 + gpa, 0)
}

/// QEMU's postcopy: ADVISE (uffd in the reply), LISTEN (acked even without
/// REPLY_ACK), the memory table echoed with this side's addresses and then
/// acknowledged by the frontend, END.
#[test]
fn postcopy_sequence() {
    let mut p = Peer::new();
    p.negotiate(P::PAGEFAULT | P::CONFIGURE_MEM_SLOTS);
    p.send(FrontendReq::POSTCOPY_ADVISE, 0, &[], &[]).unwrap();
    let m = p.reply(FrontendReq::POSTCOPY_ADVISE);
    assert_eq!((m.body.len(), m.fds.len()), (0, 1));
    p.send(FrontendReq::POSTCOPY_LISTEN, NEED_REPLY, &[], &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::POSTCOPY_LISTEN), 0);
    let mut body = VhostUserMemory::new(2).as_slice().to_vec();
    body.extend_from_slice(region(0).as_slice());
    body.extend_from_slice(region(1 << 32).as_slice());
    let (a, b) = (devnull(), devnull());
    p.send(
        FrontendReq::SET_MEM_TABLE,
        0,
        &body,
        &[a.as_raw_fd(), b.as_raw_fd()],
    )
    .unwrap();
    let m = p.reply(FrontendReq::SET_MEM_TABLE);
    assert_eq!(m.body.len(), body.len());
    let second = VhostUserMemoryRegion::from_slice(&m.body[8 + 32..8 + 32 + 32]).copied();
    let user_addr = second.map(|r| r.user_addr);
    assert_eq!(user_addr, Some((1 << 32) + 0x1000));
    p.send(FrontendReq::SET_MEM_TABLE, 0, &0u64.to_ne_bytes(), &[])
        .unwrap();
    p.no_reply();
    let single = VhostUserSingleMemoryRegion::new(1 << 33, 1 << 20, 0x7f00_0000_0000, 0);
    p.send(
        FrontendReq::ADD_MEM_REG,
        0,
        single.as_slice(),
        &[a.as_raw_fd()],
    )
    .unwrap();
    let m = p.reply(FrontendReq::ADD_MEM_REG);
    assert_eq!(m.body.len(), single.as_slice().len());
    p.send(FrontendReq::ADD_MEM_REG, 0, &0u64.to_ne_bytes(), &[])
        .unwrap();
    p.no_reply();
    p.send(FrontendReq::POSTCOPY_END, NEED_REPLY, &[], &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::POSTCOPY_END), 0);
    // A second END is out of order.
    p.send(FrontendReq::POSTCOPY_END, NEED_REPLY, &[], &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::POSTCOPY_END), 1);
    assert_eq!(
        p.calls(),
        [
            "advise",
            "listen",
            "mem table 2 postcopy true",
            "add 0x200000000 postcopy true",
            "end"
        ]
    );
}

#[test]
fn config_failure_is_a_zero_size_reply() {
    let mut p = Peer::new();
    let mut body = VhostUserConfig::new(0, 6, VhostUserConfigFlags::WRITABLE)
        .as_slice()
        .to_vec();
    body.extend_from_slice(&[0; 6]);
    p.send(FrontendReq::GET_CONFIG, 0, &body, &[]).unwrap();
    let m = p.reply(FrontendReq::GET_CONFIG);
    assert_eq!(&m.body[12..], &[0x52; 6]);
    p.session.handler().fail = true;
    p.send(FrontendReq::GET_CONFIG, 0, &body, &[]).unwrap();
    let m = p.reply(FrontendReq::GET_CONFIG);
    assert_eq!(m.body.len(), 12);
    assert_eq!(
        u32::from_ne_bytes(m.body[4..8].try_into().unwrap()),
        0,
        "size"
    );
}

#[test]
fn device_state_replies() {
    let mut p = Peer::new();
    p.negotiate(P::DEVICE_STATE);
    let t = vhost::vhost_user::message::VhostUserTransferDeviceState::new(
        VhostTransferStateDirection::SAVE,
        VhostTransferStatePhase::STOPPED,
    );
    let f = devnull();
    p.send(
        FrontendReq::SET_DEVICE_STATE_FD,
        0,
        t.as_slice(),
        &[f.as_raw_fd()],
    )
    .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_DEVICE_STATE_FD), 0x100);
    p.session.handler().fail = true;
    p.send(
        FrontendReq::SET_DEVICE_STATE_FD,
        0,
        t.as_slice(),
        &[f.as_raw_fd()],
    )
    .unwrap();
    assert_eq!(p.ack(FrontendReq::SET_DEVICE_STATE_FD), 0x101);
    p.send(FrontendReq::CHECK_DEVICE_STATE, 0, &[], &[])
        .unwrap();
    assert_eq!(p.ack(FrontendReq::CHECK_DEVICE_STATE), 1);
}
