//! `VhostUserNet`'s messages, checked exactly against a scripted device
//! (`vhost_user_fakedev`): negotiation variants, memory table entries, ring
//! set-up order, refusals, and the replay after a reconnect.

mod vhost_user_fakedev;

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::vhost_user::{DirtyLogArea, VhostUserNet, VhostUserOptions};
use backends::{BackendError, DeviceBackend, DmaRegion, VringAddrs};
use vhost_user_fakedev::*;
use vm_memory::{Bytes, MmapRegion, VolatileMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_features::{
    F_IN_ORDER as IN_ORDER, F_LOG_ALL as LOG_ALL, F_VERSION_1 as VERSION_1, NET_F_MAC as MAC,
    NET_F_MQ as MQ, NET_F_MRG_RXBUF as MRG_RXBUF, NET_F_MTU as MTU, NET_F_STATUS as STATUS,
};

const MEM_IOVA: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x4_0000;

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let p = std::env::temp_dir().join(format!("svq-vuc-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Dir(p)
}

fn memfd(size: usize) -> Arc<MmapRegion> {
    Arc::new(hostmem::memfd_region(c"vu-control", size).unwrap())
}

/// Ring q at MEM_IOVA + q * 0x1_0000, 64 entries.
fn ring(q: usize) -> VringAddrs {
    let base = MEM_IOVA + q as u64 * 0x1_0000;
    VringAddrs {
        desc: base,
        avail: base + 0x400,
        used: base + 0x1000,
    }
}

fn set_used_idx(mem: &MmapRegion, q: usize, idx: u16) {
    let off = (ring(q).used + 2 - MEM_IOVA) as usize;
    mem.as_volatile_slice().write_obj(idx.to_le(), off).unwrap();
}

fn spec(features: u64, protocol: u64) -> FakeSpec {
    FakeSpec {
        features,
        protocol,
        queue_num: 4,
        config: vec![2, 0x11, 0x22, 0x33, 0x44, 0x55, 1, 0, 2, 0, 0x28, 0x23],
        refuse: None,
    }
}

/// Features, mapping and two rings (queue 1 polled: no call fd), then
/// DRIVER_OK.
fn bring_up(dev: &mut VhostUserNet, f: u64) -> (Arc<MmapRegion>, Vec<Arc<EventFd>>) {
    dev.set_features(f).unwrap();
    dev.set_status(1 | 2 | 8).unwrap();
    let mem = memfd(MEM_SIZE);
    dev.dma_map(DmaRegion {
        iova: MEM_IOVA,
        memory: Arc::clone(&mem),
        readonly: false,
    })
    .unwrap();
    let mut kicks = Vec::new();
    for q in 0..2 {
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        dev.set_vring_num(q, 64).unwrap();
        dev.set_vring_addr(q, ring(q)).unwrap();
        dev.set_vring_base(q, 5 * q as u16).unwrap();
        dev.set_vring_kick(q, Arc::clone(&kick)).unwrap();
        let call = (q == 0).then(|| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.set_vring_call(q, call).unwrap();
        dev.set_vring_enable(q, true).unwrap();
        kicks.push(kick);
    }
    dev.set_status(1 | 2 | 8 | 4).unwrap();
    (mem, kicks)
}

const RING_SETUP: [u32; 6] = [
    SET_VRING_NUM,
    SET_VRING_BASE,
    SET_VRING_ADDR,
    SET_VRING_KICK,
    SET_VRING_CALL,
    SET_VRING_ENABLE,
];

#[test]
fn negotiation_config_table_and_ring_order_without_reply_ack() {
    let d = dir("plain");
    let path = d.0.join("dev.sock");
    let fake = FakeDevice::start(
        &path,
        spec(
            VERSION_1 | F_PROTOCOL | MQ | MRG_RXBUF | IN_ORDER,
            P_MQ | P_CONFIG,
        ),
    );
    let mut dev = VhostUserNet::connect(&path, 2).unwrap();
    assert_eq!(
        fake.requests(1),
        [
            SET_OWNER,
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            GET_QUEUE_NUM,
            GET_CONFIG
        ]
    );
    assert_eq!(fake.log()[3].u64(), P_MQ | P_CONFIG, "only what we use");
    // The device's own config space: no synthesized MAC/STATUS/MTU bits.
    assert_eq!(dev.device_features(), VERSION_1 | MQ | MRG_RXBUF | IN_ORDER);
    let mut cfg = [0u8; 12];
    dev.get_config(0, &mut cfg).unwrap();
    assert_eq!(
        cfg,
        [2, 0x11, 0x22, 0x33, 0x44, 0x55, 1, 0, 2, 0, 0x28, 0x23]
    );
    assert!(!dev.has_dirty_log());

    let before = fake.log().len();
    let (_mem, _kicks) = bring_up(&mut dev, VERSION_1 | MQ);
    let log = fake.wait_len(before + 2 + 2 * RING_SETUP.len());
    let log = &log[before..];
    assert_eq!(log[0].req, SET_FEATURES);
    assert_eq!(log[0].u64(), VERSION_1 | MQ | F_PROTOCOL);
    // One region, guest_phys_addr = userspace_addr = IOVA, with its fd.
    assert_eq!(log[1].req, SET_MEM_TABLE);
    assert_eq!((log[1].u32_at(0), log[1].fds), (1, 1));
    assert_eq!(
        (
            log[1].u64_at(8),
            log[1].u64_at(16),
            log[1].u64_at(24),
            log[1].u64_at(32)
        ),
        (MEM_IOVA, MEM_SIZE as u64, MEM_IOVA, 0)
    );
    // Rings only at DRIVER_OK, each in the order a driver uses.
    let reqs: Vec<u32> = log[2..].iter().map(|m| m.req).collect();
    assert_eq!(reqs, [RING_SETUP, RING_SETUP].concat());
    let q1 = &log[2 + RING_SETUP.len()..];
    assert_eq!((q1[1].u32_at(0), q1[1].u32_at(4)), (1, 5), "queue 1 base");
    assert_eq!(
        (q1[2].u64_at(8), q1[2].u64_at(16), q1[2].u64_at(24)),
        (ring(1).desc, ring(1).used, ring(1).avail)
    );
    assert_eq!(q1[4].fds, 1, "a polled ring still gets a call fd");

    // Reading a running ring stops it; the other ring gets its kick fd again.
    fake.set_base(1, 9);
    let before = fake.log().len();
    assert_eq!(dev.vring_base(1).unwrap(), 9);
    let log = fake.wait_len(before + 2);
    assert_eq!(log[before].req, GET_VRING_BASE);
    assert_eq!(
        (log[before + 1].req, log[before + 1].u64()),
        (SET_VRING_KICK, 0)
    );
    // A stopped ring runs again when enabled, from where it stopped.
    dev.set_vring_enable(1, true).unwrap();
    let log = fake.wait_len(before + 2 + RING_SETUP.len());
    let again: Vec<u32> = log[before + 2..].iter().map(|m| m.req).collect();
    assert_eq!(again, RING_SETUP);
    assert_eq!(log[before + 3].u32_at(4), 9);

    // Layout changes on a running ring are refused.
    assert!(matches!(
        dev.set_vring_num(1, 128),
        Err(BackendError::InvalidState { .. })
    ));
    assert!(matches!(
        dev.set_vring_num(4, 64),
        Err(BackendError::InvalidQueue { index: 4, count: 4 })
    ));
}

#[test]
fn a_refused_request_is_a_device_error_and_the_connection_stays() {
    let d = dir("refuse");
    let path = d.0.join("dev.sock");
    let mut s = spec(VERSION_1 | F_PROTOCOL, P_REPLY_ACK);
    s.refuse = Some(SET_VRING_ADDR);
    let fake = FakeDevice::start(&path, s);
    let mut dev = VhostUserNet::connect(&path, 1).unwrap();
    dev.set_features(VERSION_1).unwrap();
    dev.set_status(1 | 2 | 8).unwrap();
    let mem = memfd(MEM_SIZE);
    dev.dma_map(DmaRegion {
        iova: MEM_IOVA,
        memory: mem,
        readonly: false,
    })
    .unwrap();
    dev.set_vring_num(0, 64).unwrap();
    dev.set_vring_addr(0, ring(0)).unwrap();
    dev.set_vring_kick(0, Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .unwrap();
    dev.set_vring_enable(0, true).unwrap();
    match dev.set_status(1 | 2 | 8 | 4) {
        Err(BackendError::Device(m)) => assert!(m.contains("refused"), "{m}"),
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert!(dev.is_connected());
    assert_eq!(dev.connection_generation(), 1);
    // The ring never ran, so suspending asks the device nothing.
    let n = fake.log().len();
    dev.suspend().unwrap();
    assert_eq!(dev.vring_base(0).unwrap(), 0);
    assert_eq!(fake.log().len(), n);
    // Synthesized config: random MAC, and the config bits are offered.
    assert_eq!(
        dev.device_features() & (MAC | STATUS | MTU),
        MAC | STATUS | MTU
    );
}

#[test]
fn reconnect_replays_features_status_table_and_rings_at_the_used_index() {
    let d = dir("replay");
    let path = d.0.join("dev.sock");
    let fake = FakeDevice::start(
        &path,
        spec(VERSION_1 | F_PROTOCOL | MQ, P_MQ | P_REPLY_ACK | P_STATUS),
    );
    let mut dev = VhostUserNet::connect(&path, 1).unwrap();
    let (mem, kicks) = bring_up(&mut dev, VERSION_1);
    assert_eq!(fake.status(), 15);

    // The device made progress, then died.
    set_used_idx(&mem, 0, 3);
    set_used_idx(&mem, 1, 7);
    fake.kick_out();
    let deadline = Instant::now() + Duration::from_secs(20);
    while dev.connection_generation() < 2 {
        assert!(Instant::now() < deadline, "no reconnection");
        std::thread::sleep(Duration::from_millis(10));
    }
    let c2: Vec<Msg> = fake.log().into_iter().filter(|m| m.conn == 2).collect();
    let reqs: Vec<u32> = c2.iter().map(|m| m.req).collect();
    let expected = [
        vec![
            SET_OWNER,
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            GET_QUEUE_NUM,
            SET_FEATURES,
            SET_STATUS,
            GET_STATUS,
            SET_MEM_TABLE,
        ],
        RING_SETUP.to_vec(),
        RING_SETUP.to_vec(),
        vec![SET_STATUS, GET_STATUS],
    ]
    .concat();
    assert_eq!(reqs, expected);
    assert_eq!(c2[6].u64(), 11, "status without DRIVER_OK first");
    assert_eq!(c2[10].u32_at(4), 3, "queue 0 restarts at its used index");
    assert_eq!(c2[16].u32_at(4), 7, "queue 1 restarts at its used index");
    assert_eq!(c2[21].u64(), 15);
    // Both ends were woken once.
    assert!(kicks.iter().all(|k| k.read().is_ok()));
    assert!(dev.is_connected());
    let _ = mem.as_ptr();
    let _ = kicks[0].as_raw_fd();
}

#[test]
fn a_device_without_protocol_features_or_mq() {
    let d = dir("legacy");
    let path = d.0.join("dev.sock");
    let fake = FakeDevice::start(&path, spec(VERSION_1 | MRG_RXBUF, 0));
    assert!(VhostUserNet::connect(&path, 2).is_err(), "2 pairs need MQ");
    let mut dev = VhostUserNet::connect_with(
        &path,
        VhostUserOptions {
            mac: Some([2, 0, 0, 0, 0, 7]),
            mtu: 9000,
            ..VhostUserOptions::default()
        },
    )
    .unwrap();
    let mut cfg = [0u8; 12];
    dev.get_config(0, &mut cfg).unwrap();
    assert_eq!(cfg, [2, 0, 0, 0, 0, 7, 1, 0, 1, 0, 0x28, 0x23]);
    dev.set_config(0, &[2, 0, 0, 0, 0, 8, 0, 0]).unwrap();
    dev.get_config(0, &mut cfg).unwrap();
    assert_eq!(
        &cfg[..8],
        &[2, 0, 0, 0, 0, 8, 1, 0],
        "only the MAC is writable"
    );

    let (_mem, _kicks) = bring_up(&mut dev, VERSION_1 | MRG_RXBUF);
    // No SET_VRING_ENABLE without PROTOCOL_FEATURES: rings start at kick.
    let setup = [
        SET_VRING_NUM,
        SET_VRING_BASE,
        SET_VRING_ADDR,
        SET_VRING_KICK,
        SET_VRING_CALL,
    ];
    let mut want = vec![SET_OWNER, GET_FEATURES, SET_FEATURES, SET_MEM_TABLE];
    want.extend(setup);
    want.extend(setup);
    // Connection 1 was the refused 2-pair attempt.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.requests(2).len() < want.len() {
        assert!(Instant::now() < deadline, "got {:?}", fake.requests(2));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fake.requests(2), want);
    let log = fake.log();
    assert_eq!(
        log.iter().find(|m| m.req == SET_FEATURES).unwrap().u64(),
        VERSION_1 | MRG_RXBUF,
        "no PROTOCOL_FEATURES bit on the wire"
    );
    // Disabling is stopping (GET_VRING_BASE).
    let before = fake.log().len();
    dev.set_vring_enable(0, false).unwrap();
    let log = fake.wait_len(before + 2);
    assert_eq!(log[before].req, GET_VRING_BASE);
    assert_eq!(log[before + 1].req, SET_VRING_KICK);
}

#[test]
fn too_few_device_queues_is_an_error() {
    let d = dir("queues");
    let path = d.0.join("dev.sock");
    let mut s = spec(VERSION_1 | F_PROTOCOL | MQ, P_MQ);
    s.queue_num = 2;
    let _fake = FakeDevice::start(&path, s);
    assert!(VhostUserNet::connect(&path, 2).is_err());
    assert!(VhostUserNet::connect(&path, 1).is_ok());
}

#[test]
fn dirty_logging_messages_and_their_replay() {
    let d = dir("log");
    let path = d.0.join("dev.sock");
    let fake = FakeDevice::start(
        &path,
        spec(VERSION_1 | F_PROTOCOL | LOG_ALL, P_REPLY_ACK | P_LOG_SHMFD),
    );
    let mut dev = VhostUserNet::connect(&path, 1).unwrap();
    assert!(dev.has_dirty_log());
    let (_mem, _kicks) = bring_up(&mut dev, VERSION_1);
    dev.set_vring_log_addr(0, Some(0x7000)).unwrap();
    let before = fake.log().len();
    let log = memfd(0x2000);
    dev.set_dirty_log(Some(DirtyLogArea { memory: log }))
        .unwrap();
    let msgs = fake.log()[before..].to_vec();
    let reqs: Vec<u32> = msgs.iter().map(|m| m.req).collect();
    assert_eq!(
        reqs,
        [SET_LOG_BASE, SET_FEATURES, SET_VRING_ADDR, SET_VRING_ADDR]
    );
    assert_eq!(
        (msgs[0].fds, msgs[0].u64_at(0), msgs[0].u64_at(8)),
        (1, 0x2000, 0)
    );
    assert_eq!(msgs[1].u64(), VERSION_1 | F_PROTOCOL | LOG_ALL);
    // Ring 0 logs its used ring at the given address; ring 1 has none.
    assert_eq!((msgs[2].u32_at(4), msgs[2].u64_at(32)), (1, 0x7000));
    assert_eq!(msgs[3].u32_at(4), 0);

    // A device that comes back gets the log before LOG_ALL.
    fake.kick_out();
    let deadline = Instant::now() + Duration::from_secs(20);
    while dev.connection_generation() < 2 {
        assert!(Instant::now() < deadline, "no reconnection");
        std::thread::sleep(Duration::from_millis(10));
    }
    let c2: Vec<Msg> = fake.log().into_iter().filter(|m| m.conn == 2).collect();
    let at = |r: u32| c2.iter().position(|m| m.req == r).unwrap();
    assert!(at(SET_LOG_BASE) < at(SET_FEATURES));
    assert_eq!(c2[at(SET_FEATURES)].u64() & LOG_ALL, LOG_ALL);
    let addr0 = c2
        .iter()
        .find(|m| m.req == SET_VRING_ADDR && m.u32_at(0) == 0)
        .unwrap();
    assert_eq!((addr0.u32_at(4), addr0.u64_at(32)), (1, 0x7000));

    // Stopping: LOG_ALL off, ring log flags off.
    let before = fake.log().len();
    dev.set_dirty_log(None).unwrap();
    let msgs = fake.log()[before..].to_vec();
    assert_eq!(msgs[0].req, SET_FEATURES);
    assert_eq!(msgs[0].u64() & LOG_ALL, 0);
    assert!(msgs[1..]
        .iter()
        .all(|m| m.req == SET_VRING_ADDR && m.u32_at(4) == 0));
}

#[test]
fn dirty_logging_needs_a_device_that_logs() {
    let d = dir("nolog");
    let path = d.0.join("dev.sock");
    let _fake = FakeDevice::start(&path, spec(VERSION_1 | F_PROTOCOL, P_REPLY_ACK));
    let mut dev = VhostUserNet::connect(&path, 1).unwrap();
    assert!(!dev.has_dirty_log());
    assert!(matches!(
        dev.set_dirty_log(Some(DirtyLogArea {
            memory: memfd(0x1000)
        })),
        Err(BackendError::Unsupported(_))
    ));
}

/// Packed rings: the device gets the low half of the vhost-user position
/// (avail index and wrap counter: all DPDK reads); GET_VRING_BASE's answer
/// comes back whole, and from a device that reports only the low half the
/// used half is taken to equal it.
#[test]
fn packed_positions_reach_the_device_and_come_back_whole() {
    let d = dir("packed");
    let path = d.0.join("dev.sock");
    let packed = virtio_features::F_RING_PACKED;
    // REPLY_ACK: every message is answered, so the log is complete when a
    // call returns.
    let fake = FakeDevice::start(
        &path,
        spec(VERSION_1 | F_PROTOCOL | packed, P_MQ | P_REPLY_ACK),
    );
    let mut dev = VhostUserNet::connect(&path, 1).unwrap();
    assert_ne!(dev.device_features() & packed, 0, "RING_PACKED passes");
    let (_mem, kicks) = bring_up(&mut dev, VERSION_1 | packed);
    let wrap = 1u32 << 15;
    // Stopped and started again the way the relay does it.
    let restart = |dev: &mut VhostUserNet, pos: u32| {
        dev.set_vring_base_packed(1, pos).unwrap();
        dev.set_vring_kick(1, Arc::clone(&kicks[1])).unwrap();
        dev.set_vring_enable(1, true).unwrap();
    };
    dev.set_vring_enable(1, false).unwrap();
    let _ = dev.vring_base_packed(1).unwrap();
    let pos = (7 | wrap) | ((6 | wrap) << 16);
    restart(&mut dev, pos);
    let sent: Vec<Msg> = fake
        .log()
        .into_iter()
        .filter(|m| m.req == SET_VRING_BASE && m.u32_at(0) == 1)
        .collect();
    assert_eq!(
        sent.last().unwrap().u32_at(4),
        7 | wrap,
        "the low half reaches the device"
    );
    // DPDK's answer: one position.
    fake.set_base(1, 9 | wrap);
    assert_eq!(
        dev.vring_base_packed(1).unwrap(),
        (9 | wrap) | ((9 | wrap) << 16)
    );
    // A device that reports both halves keeps them.
    restart(&mut dev, pos);
    let both = (12 | wrap) | (11 << 16);
    fake.set_base(1, both);
    assert_eq!(dev.vring_base_packed(1).unwrap(), both);
}
