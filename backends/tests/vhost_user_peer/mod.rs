//! DPDK testpmd as the vhost-user device (net_vhost, see shared/PEERS.md),
//! and a split-ring driver rig on top of `VhostUserNet`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::vhost_user::VhostUserNet;
use backends::{DeviceBackend, DmaRegion};
use vm_memory::{GuestMemoryMmap, MmapRegion};

use crate::sim_driver::*;

pub const RX: usize = 0;
pub const TX: usize = 1;
/// Bound on every wait for testpmd (start, stop, reconnect).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

pub use testkit::peers::testpmd_or_skip;
pub use testkit::testpmd::{last_number, serial, Testpmd};

/// testpmd with a net_vhost port listening on `sock`, `queues` pairs (one
/// forwarding stream per queue: RX queue k goes back out on TX queue k),
/// `io` forwarding, once it accepts connections and forwards.
pub fn device_pmd(sock: &Path, dir: &Path, queues: u16) -> Testpmd {
    let mut p = Testpmd::vhost(sock).dir(dir).queues(queues).spawn();
    p.wait_listening().wait_forwarding();
    p
}

/// testpmd whose net_vhost port connects to `sock` (`client=1`) and
/// reconnects about once a second; nothing to wait for here.
pub fn client_pmd(sock: &Path, dir: &Path) -> Testpmd {
    Testpmd::vhost_client(sock).dir(dir).spawn()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("svq-vu-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PEER_TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timeout waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A virtio-net driver on one pair of `VhostUserNet`, in a memfd mapped at
/// `iova`.
pub struct VuRig {
    pub dev: VhostUserNet,
    pub region: Arc<MmapRegion>,
    pub mem: GuestMemoryMmap,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
    /// Queues of pairs 1.. (index q - 2).
    pub extra: Vec<DriverQueue>,
    pub iova: u64,
}

pub const QSIZE: u16 = 256;

impl VuRig {
    pub fn new(sock: &Path, iova: u64) -> VuRig {
        Self::with_pairs(sock, iova, 1)
    }

    pub fn with_pairs(sock: &Path, iova: u64, pairs: u16) -> VuRig {
        let dev = VhostUserNet::connect(sock, pairs).expect("connecting to testpmd");
        Self::on(dev, iova, pairs)
    }

    /// Drives an already connected device.
    pub fn on(mut dev: VhostUserNet, iova: u64, pairs: u16) -> VuRig {
        assert_eq!(dev.kind(), "vhost-user");
        let nq = 2 * usize::from(pairs);
        assert_eq!(dev.num_queues(), nq);
        let features = if pairs > 1 {
            F_VERSION_1 | F_MQ
        } else {
            F_VERSION_1
        };
        assert_eq!(dev.device_features() & features, features);
        dev.set_features(features).unwrap();
        dev.set_status(1 | 2 | 8).unwrap();
        let region = memfd_region(nq * QUEUE_AREA as usize);
        dev.dma_map(DmaRegion {
            iova,
            memory: Arc::clone(&region),
            readonly: false,
        })
        .unwrap();
        let mem = driver_view(&region, iova);
        let rx = DriverQueue::new(&mem, iova, QSIZE, BUF);
        let tx = DriverQueue::new(&mem, iova + QUEUE_AREA, QSIZE, BUF);
        let extra = (2..nq)
            .map(|q| DriverQueue::new(&mem, iova + q as u64 * QUEUE_AREA, QSIZE, BUF))
            .collect();
        let mut rig = VuRig {
            dev,
            region,
            mem,
            rx,
            tx,
            extra,
            iova,
        };
        for q in 0..nq {
            rig.program(q);
        }
        rig.dev.set_status(1 | 2 | 8 | 4).unwrap();
        rig
    }

    pub fn queue(&mut self, q: usize) -> &mut DriverQueue {
        match q {
            RX => &mut self.rx,
            TX => &mut self.tx,
            _ => &mut self.extra[q - 2],
        }
    }

    /// `exchange` on pair `k`.
    pub fn exchange_on(&mut self, k: usize, pkts: &[Vec<u8>]) {
        let (rxq, txq) = (2 * k, 2 * k + 1);
        let rx_heads: Vec<u16> = pkts
            .iter()
            .map(|_| self.queue(rxq).add_rx(1, 2048))
            .collect();
        self.queue(rxq).submit(&rx_heads);
        let heads: Vec<u16> = pkts.iter().map(|p| self.queue(txq).add_tx(p, 1)).collect();
        self.queue(txq).submit(&heads);
        let used = self.queue(txq).wait_used(heads.len() as u16);
        assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), heads);
        let used = self.queue(rxq).wait_used(pkts.len() as u16);
        for ((&(id, len), &head), p) in used.iter().zip(&rx_heads).zip(pkts) {
            assert_eq!(id, head, "pair {k}: RX chains are used in order");
            let got = self.queue(rxq).read_rx(id, len, 2048);
            assert_bytes(&got[HDR..], &p[HDR..], &format!("pair {k}: frame bytes"));
        }
    }

    /// Gives ring `q` to the device at the driver's current position.
    pub fn program(&mut self, q: usize) {
        let (addrs, base, kick, call) = {
            let dq = self.queue(q);
            (
                dq.addrs(),
                dq.ring.last_used,
                Arc::clone(&dq.kick),
                Arc::clone(&dq.call),
            )
        };
        self.dev.set_vring_num(q, QSIZE).unwrap();
        self.dev.set_vring_addr(q, addrs).unwrap();
        self.dev.set_vring_base(q, base).unwrap();
        self.dev.set_vring_kick(q, kick).unwrap();
        self.dev.set_vring_call(q, Some(call)).unwrap();
        self.dev.set_vring_enable(q, true).unwrap();
    }

    /// Posts one RX buffer per packet, sends the packets, and checks that
    /// each comes back whole and in order (testpmd io/macswap forwarding on
    /// one port sends it back to the same port).
    /// Returns the RX heads that received the packets.
    pub fn exchange(&mut self, pkts: &[Vec<u8>]) -> Vec<u16> {
        let rx_heads: Vec<u16> = pkts.iter().map(|_| self.rx.add_rx(1, 2048)).collect();
        self.rx.submit(&rx_heads);
        self.send(pkts);
        self.expect_rx(&rx_heads, pkts);
        rx_heads
    }

    pub fn send(&mut self, pkts: &[Vec<u8>]) {
        let heads: Vec<u16> = pkts.iter().map(|p| self.tx.add_tx(p, 1)).collect();
        self.tx.submit(&heads);
        let used = self.tx.wait_used(heads.len() as u16);
        let ids: Vec<u16> = used.iter().map(|u| u.0).collect();
        assert_eq!(ids, heads, "TX chains are used in order");
    }

    pub fn expect_rx(&mut self, rx_heads: &[u16], pkts: &[Vec<u8>]) {
        let used = self.rx.wait_used(pkts.len() as u16);
        for ((&(id, len), &head), p) in used.iter().zip(rx_heads).zip(pkts) {
            assert_eq!(id, head, "RX chains are used in order");
            assert_eq!(len as usize, p.len(), "RX length (header + frame)");
            let got = self.rx.read_rx(id, len, 2048);
            assert_eq!(&got[..10], &[0u8; 10], "no offloads in the header");
            assert_bytes(&got[HDR..], &p[HDR..], "frame bytes");
        }
    }
}

/// Frames with a broadcast destination so nothing along the way filters
/// them, and distinct payloads so a mix-up shows.
pub fn frames(sizes: &[usize], seed: u8) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut p = packet(n, seed.wrapping_add(i as u8));
            p[HDR..HDR + 6].copy_from_slice(&[0xff; 6]);
            p[HDR + 6..HDR + 12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            p
        })
        .collect()
}
