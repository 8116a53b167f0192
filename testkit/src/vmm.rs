//! The test VMM: a `vhost::vhost_user::Frontend` connected to the daemon,
//! negotiating like QEMU does, with memfd guest memory and `NetPair` drivers.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};

use crate::mem::GuestMem;
use crate::net::{DriverOpts, NetPair};

pub use virtio_features::{
    F_IN_ORDER, F_PROTOCOL_FEATURES, F_VERSION_1, NET_F_MAC as F_MAC, NET_F_MQ as F_MQ,
    NET_F_MRG_RXBUF as F_MRG_RXBUF, NET_F_STATUS as F_STATUS, RING_F_EVENT_IDX as F_EVENT_IDX,
    RING_F_INDIRECT_DESC as F_INDIRECT_DESC,
};

/// Bound on every reply from the daemon: a hung daemon fails the test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct VmmConfig {
    pub pairs: u16,
    pub ring_size: u16,
    pub mem_size: usize,
    /// More guest memory regions `(gpa, size)` above region 0.
    pub extra_regions: Vec<(u64, usize)>,
    /// Negotiate CONFIGURE_MEM_SLOTS.
    pub mem_slots: bool,
    pub driver: DriverOpts,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            pairs: 1,
            ring_size: 256,
            mem_size: 32 << 20,
            extra_regions: Vec::new(),
            mem_slots: false,
            driver: DriverOpts::default(),
        }
    }
}

impl VmmConfig {
    pub fn pairs(n: u16) -> Self {
        VmmConfig {
            pairs: n,
            ..Default::default()
        }
    }
}

/// Connects to a listening vhost-user socket with I/O timeouts set.
pub fn connect_stream(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("connect {}: {e}", path.display()),
        }
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

pub struct Vmm {
    pub fe: Frontend,
    /// The same connection, for hand-made messages (never used while a
    /// Frontend call is in progress).
    pub raw: UnixStream,
    pub mem: GuestMem,
    pub cfg: VmmConfig,
    pub offered: u64,
    pub acked: u64,
    pub proto: VhostUserProtocolFeatures,
    pub queue_num: u64,
    pub pairs: Vec<NetPair>,
}

impl Vmm {
    /// Connects, negotiates, maps memory, sets up and starts every queue,
    /// and posts RX buffers.
    pub fn start(path: &Path, cfg: VmmConfig) -> Vmm {
        Vmm::start_with(path, cfg, VhostUserProtocolFeatures::empty())
    }

    /// `start`, also negotiating the protocol features in `extra`.
    pub fn start_with(path: &Path, cfg: VmmConfig, extra: VhostUserProtocolFeatures) -> Vmm {
        Vmm::start_on(connect_stream(path), cfg, extra)
    }

    /// `start_with` on a connection that is already open.
    pub fn start_on(stream: UnixStream, cfg: VmmConfig, extra: VhostUserProtocolFeatures) -> Vmm {
        let mut v = Vmm::negotiate_with(stream, cfg, extra);
        v.set_mem_table().expect("SET_MEM_TABLE");
        for q in 0..2 * v.cfg.pairs as usize {
            v.setup_queue(q)
                .unwrap_or_else(|e| panic!("set up queue {q}: {e}"));
        }
        v
    }

    /// SET_OWNER, features, protocol features, queue count, SET_FEATURES.
    /// Allocates the guest rings (not yet given to the daemon).
    pub fn negotiate(stream: UnixStream, cfg: VmmConfig) -> Vmm {
        Vmm::negotiate_with(stream, cfg, VhostUserProtocolFeatures::empty())
    }

    /// `negotiate`, also negotiating the protocol features in `extra`.
    pub fn negotiate_with(
        stream: UnixStream,
        cfg: VmmConfig,
        extra: VhostUserProtocolFeatures,
    ) -> Vmm {
        let raw = stream.try_clone().expect("clone socket");
        let mut fe = Frontend::from_stream(stream, 2 * cfg.pairs as u64);
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        assert!(
            offered & F_VERSION_1 != 0,
            "VERSION_1 not offered: {offered:#x}"
        );
        assert!(
            offered & F_PROTOCOL_FEATURES != 0,
            "PROTOCOL_FEATURES not offered: {offered:#x}"
        );
        assert!(
            offered & F_IN_ORDER == 0,
            "IN_ORDER must never be offered: {offered:#x}"
        );
        let mut want = F_VERSION_1 | F_PROTOCOL_FEATURES;
        for (on, bit, name) in [
            (cfg.driver.mrg_rxbuf, F_MRG_RXBUF, "MRG_RXBUF"),
            (cfg.driver.event_idx, F_EVENT_IDX, "EVENT_IDX"),
            (cfg.driver.indirect, F_INDIRECT_DESC, "INDIRECT_DESC"),
        ] {
            if on {
                assert!(offered & bit != 0, "{name} not offered: {offered:#x}");
                want |= bit;
            }
        }
        if cfg.pairs > 1 {
            assert!(offered & F_MQ != 0, "MQ not offered: {offered:#x}");
            want |= F_MQ;
        }
        let offered_proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        // CONFIG is not offered (QEMU's net device has no use for it);
        // GET_CONFIG is answered all the same.
        let mut want_proto = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if cfg.mem_slots {
            want_proto |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        }
        want_proto |= extra;
        assert!(
            offered_proto.contains(want_proto),
            "protocol features {offered_proto:?} lack some of {want_proto:?}"
        );
        fe.set_protocol_features(want_proto)
            .expect("SET_PROTOCOL_FEATURES");
        // Ask for an ack on every message so errors come back as replies.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let queue_num = fe.get_queue_num().expect("GET_QUEUE_NUM");
        fe.set_features(want).expect("SET_FEATURES");
        let mut layout = vec![(0, cfg.mem_size)];
        layout.extend_from_slice(&cfg.extra_regions);
        let mut mem = GuestMem::with_regions(&layout);
        let pairs = (0..cfg.pairs)
            .map(|k| NetPair::new(&mut mem, k, cfg.ring_size, &cfg.driver))
            .collect();
        Vmm {
            fe,
            raw,
            mem,
            cfg,
            offered,
            acked: want,
            proto: want_proto,
            queue_num,
            pairs,
        }
    }

    /// SET_MEM_TABLE with every region.
    pub fn set_mem_table(&self) -> vhost::Result<()> {
        let regions: Vec<_> = (0..self.mem.num_regions())
            .map(|i| self.mem.region_info_of(i))
            .collect();
        self.fe.set_mem_table(&regions).map(|_| ())
    }

    /// SET_MEM_TABLE with the given regions only.
    pub fn set_mem_table_of(&self, which: &[usize]) -> vhost::Result<()> {
        let regions: Vec<_> = which.iter().map(|&i| self.mem.region_info_of(i)).collect();
        self.fe.set_mem_table(&regions).map(|_| ())
    }

    fn queue(&self, q: usize) -> &crate::net::QueueIo {
        let p = &self.pairs[q / 2];
        if q & 1 == 0 {
            &p.rx
        } else {
            &p.tx
        }
    }

    /// The SET_VRING_ADDR payload for queue `q` (VMM virtual addresses).
    pub fn vring_config(&self, q: usize) -> VringConfigData {
        let r = &self.queue(q).ring;
        VringConfigData {
            queue_max_size: r.size,
            queue_size: r.size,
            flags: 0,
            desc_table_addr: self.mem.vmm_addr(r.desc),
            used_ring_addr: self.mem.vmm_addr(r.used),
            avail_ring_addr: self.mem.vmm_addr(r.avail),
            log_addr: None,
        }
    }

    /// NUM, ADDR, BASE, CALL, KICK, ENABLE for queue `q`; RX queues get
    /// their buffers posted first.
    pub fn setup_queue(&mut self, q: usize) -> vhost::Result<()> {
        if q & 1 == 0 {
            self.pairs[q / 2].post_rx();
        }
        let base = self.queue(q).ring.last_used;
        self.restart_queue(q, base)
    }

    /// Restarts a stopped queue at `base` (after GET_VRING_BASE), same rings.
    pub fn restart_queue(&mut self, q: usize, base: u16) -> vhost::Result<()> {
        let size = self.queue(q).ring.size;
        let cfg = self.vring_config(q);
        self.fe.set_vring_num(q, size)?;
        self.fe.set_vring_addr(q, &cfg)?;
        self.fe.set_vring_base(q, base)?;
        self.fe.set_vring_call(q, &self.queue(q).call)?;
        self.fe.set_vring_kick(q, &self.queue(q).kick)?;
        self.fe.set_vring_enable(q, true)?;
        // Buffers may already be waiting.
        self.queue(q).kick();
        Ok(())
    }

    /// SET_VRING_ENABLE(q, 0).
    pub fn fe_enable_off(&mut self, q: usize) {
        self.fe
            .set_vring_enable(q, false)
            .unwrap_or_else(|e| panic!("SET_VRING_ENABLE {q} 0: {e}"));
    }

    /// GET_VRING_BASE(q).
    pub fn get_vring_base(&mut self, q: usize) -> u32 {
        self.fe
            .get_vring_base(q)
            .unwrap_or_else(|e| panic!("GET_VRING_BASE {q}: {e}"))
    }

    /// Stops every queue the way QEMU does (disable, GET_VRING_BASE).
    pub fn get_vring_bases(&mut self) -> Vec<u32> {
        (0..2 * self.cfg.pairs as usize)
            .map(|q| {
                self.fe
                    .set_vring_enable(q, false)
                    .unwrap_or_else(|e| panic!("SET_VRING_ENABLE {q} 0: {e}"));
                self.fe
                    .get_vring_base(q)
                    .unwrap_or_else(|e| panic!("GET_VRING_BASE {q}: {e}"))
            })
            .collect()
    }

    /// After traffic has fully drained: the bases the daemon returns must be
    /// what the driver saw — TX consumed everything published, RX consumed
    /// exactly the buffers that came back used.
    pub fn check_final_bases(&mut self) {
        let bases = self.get_vring_bases();
        for p in &self.pairs {
            let rx = bases[2 * p.pair as usize];
            let tx = bases[2 * p.pair as usize + 1];
            assert_eq!(
                tx as u16, p.tx.ring.avail_idx,
                "pair {}: TX base {} != avail idx published {}",
                p.pair, tx, p.tx.ring.avail_idx
            );
            assert_eq!(
                tx as u16, p.tx.ring.last_used,
                "pair {}: TX base vs used",
                p.pair
            );
            assert_eq!(
                rx as u16, p.rx.ring.last_used,
                "pair {}: RX base {} != used idx seen {}",
                p.pair, rx, p.rx.ring.last_used
            );
        }
    }
}
