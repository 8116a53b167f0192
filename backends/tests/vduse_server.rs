//! The VDUSE server's request handling against a fake kernel: the requests
//! Linux 6.12 sends (SET_STATUS, GET_VQ_STATE, UPDATE_IOTLB over the whole
//! space), the ioctls the server answers them with, and packets through the
//! sim behind it. The real kernel is driven by tests/vdpa_kernel.rs inside a
//! guest.

mod sim_driver;
mod tap_socket;

use std::fs::File;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use backends::sim::{SimConfig, SimMode, SimNet};
use backends::vduse::sys::{IotlbEntry, Request, VduseIoctls, VqInfo, ACCESS_RO, ACCESS_RW};
use backends::vduse::{vduse_features, VduseNet};
use sim_driver::{driver_view, memfd_region, packet, DriverQueue, BUF, HDR, QUEUE_AREA};
use virtio_features::{self as bits, status};
use vm_memory::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

const IOVA: u64 = 0x8000_0000;
const QSIZE: u16 = 64;

/// What the fake kernel holds and what it saw.
#[derive(Default)]
struct Kernel {
    driver_features: u64,
    vqs: Vec<VqInfo>,
    /// (entry, memory it maps).
    iotlb: Vec<(IotlbEntry, Arc<MmapRegion>)>,
    kickfds: Vec<(u32, EventFd)>,
    irqs: Vec<u32>,
    /// Entries returned whatever is asked (a kernel sending nonsense).
    bogus: Option<IotlbEntry>,
}

#[derive(Clone, Default)]
struct FakeVduse(Arc<Mutex<Kernel>>);

impl VduseIoctls for FakeVduse {
    fn read_request(&mut self) -> io::Result<Option<Request>> {
        Ok(None)
    }
    fn write_response(&mut self, _: &backends::vduse::sys::Response) -> io::Result<()> {
        Ok(())
    }
    fn driver_features(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().driver_features)
    }
    fn vq_info(&self, index: u32) -> io::Result<VqInfo> {
        let k = self.0.lock().unwrap();
        k.vqs
            .get(index as usize)
            .copied()
            .ok_or(io::Error::from_raw_os_error(libc::EINVAL))
    }
    fn set_kickfd(&self, index: u32, fd: &EventFd) -> io::Result<()> {
        let dup = fd.try_clone()?;
        self.0.lock().unwrap().kickfds.push((index, dup));
        Ok(())
    }
    fn inject_irq(&self, index: u32) -> io::Result<()> {
        self.0.lock().unwrap().irqs.push(index);
        Ok(())
    }
    fn iotlb_entry(&self, start: u64, last: u64) -> io::Result<Option<(IotlbEntry, File)>> {
        let k = self.0.lock().unwrap();
        let file_of = |m: &Arc<MmapRegion>| -> io::Result<File> {
            m.file_offset().unwrap().file().try_clone()
        };
        if let Some(b) = k.bogus {
            return Ok(Some((b, file_of(&k.iotlb[0].1)?)));
        }
        let hit = k
            .iotlb
            .iter()
            .filter(|(e, _)| e.start <= last && start <= e.last)
            .min_by_key(|(e, _)| e.start);
        match hit {
            Some((e, m)) => Ok(Some((*e, file_of(m)?))),
            None => Ok(None),
        }
    }
    fn request_fd(&self) -> RawFd {
        -1
    }
}

fn entry(start: u64, size: u64, perm: u8) -> IotlbEntry {
    IotlbEntry {
        offset: 0,
        start,
        last: start + size - 1,
        perm,
    }
}

fn ok(r: backends::vduse::sys::Response) -> backends::vduse::sys::Response {
    assert!(r.ok, "request failed: {r:?}");
    r
}

struct Rig {
    fake: FakeVduse,
    server: VduseNet<FakeVduse>,
    region: Arc<MmapRegion>,
    next_id: u32,
}

impl Rig {
    fn new() -> Rig {
        Self::with_mode(SimMode::Loopback).unwrap()
    }

    /// None: the sim could not be created (no /dev/net/tun for a tap).
    fn with_mode(mode: SimMode) -> Option<Rig> {
        let sim = SimNet::new(SimConfig {
            max_queue_size: 256,
            mode,
            ..SimConfig::default()
        })
        .ok()?;
        let fake = FakeVduse::default();
        let region = memfd_region(2 * QUEUE_AREA as usize);
        fake.0.lock().unwrap().iotlb.push((
            entry(IOVA, region.size() as u64, ACCESS_RW),
            Arc::clone(&region),
        ));
        let server = VduseNet::new(fake.clone(), sim).unwrap();
        Some(Rig {
            fake,
            server,
            region,
            next_id: 0,
        })
    }

    fn send(&mut self, make: impl FnOnce(u32) -> Request) -> backends::vduse::sys::Response {
        self.next_id += 1;
        self.server.handle(make(self.next_id))
    }

    fn status(&mut self, s: u8) -> backends::vduse::sys::Response {
        self.send(|id| Request::SetStatus { id, status: s })
    }

    fn update_iotlb(&mut self) -> backends::vduse::sys::Response {
        self.send(|id| Request::UpdateIotlb {
            id,
            start: 0,
            last: u64::MAX,
        })
    }

    /// The driver's two rings in the mapped memory, announced to the fake
    /// kernel as vhost-vdpa would have set them.
    fn rings(&self, base: [u16; 2]) -> Vec<DriverQueue> {
        let mem = driver_view(&self.region, IOVA);
        let mut qs = Vec::new();
        let mut k = self.fake.0.lock().unwrap();
        k.vqs.clear();
        for (i, b) in base.iter().enumerate() {
            let mut dq = DriverQueue::new(&mem, IOVA + i as u64 * QUEUE_AREA, QSIZE, BUF);
            dq.start_at(*b);
            k.vqs.push(VqInfo {
                index: i as u32,
                num: u32::from(QSIZE),
                desc_addr: dq.desc(),
                driver_addr: dq.avail(),
                device_addr: dq.used(),
                state: [*b, 0, 0, 0],
                ready: 1,
            });
            qs.push(dq);
        }
        qs
    }

    fn negotiate(&mut self, features: u64) {
        self.fake.0.lock().unwrap().driver_features = features;
        ok(self.status(status::ACKNOWLEDGE | status::DRIVER));
        ok(self.status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
    }

    fn driver_ok(&mut self) {
        ok(self.status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        ));
    }

    /// Kicks queue `q` the way the kernel does: through the eventfd the
    /// server registered last.
    fn kick(&self, q: u32) {
        let k = self.fake.0.lock().unwrap();
        let (_, fd) = k
            .kickfds
            .iter()
            .rev()
            .find(|(i, _)| *i == q)
            .expect("the server registered a kick eventfd for this queue");
        fd.write(1).unwrap();
    }

    /// Lets the server forward the sim's signal on queue `q` (waiting,
    /// bounded, for the sim to give it).
    fn forward_call(&mut self, q: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let before = self.server.stats().irqs;
        while self.server.stats().irqs == before {
            assert!(
                std::time::Instant::now() < deadline,
                "the sim never signalled queue {q}"
            );
            self.server.forward_call(q);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

const FEATURES: u64 = bits::F_VERSION_1 | bits::F_ACCESS_PLATFORM | bits::NET_F_MRG_RXBUF;

#[test]
fn the_device_is_created_with_access_platform_and_without_a_control_queue() {
    let sim = SimNet::new(SimConfig::default()).unwrap();
    let f = vduse_features(&sim);
    assert_ne!(
        f & bits::F_ACCESS_PLATFORM,
        0,
        "VDUSE refuses a device without it"
    );
    assert_ne!(
        f & bits::F_VERSION_1,
        0,
        "VDUSE refuses a net device without it"
    );
    assert_eq!(
        f & bits::NET_F_CTRL_VQ,
        0,
        "Linux 6.12's VDUSE refuses CTRL_VQ"
    );
}

#[test]
fn a_packet_goes_round_through_the_kernel_interface() {
    let mut rig = Rig::new();
    ok(rig.update_iotlb());
    assert_eq!(
        rig.server.mappings(),
        vec![(IOVA, IOVA + 2 * QUEUE_AREA - 1, ACCESS_RW)]
    );
    rig.negotiate(FEATURES);
    let mut qs = rig.rings([0, 0]);
    rig.driver_ok();
    // Both rings got a kick eventfd registered with the kernel.
    let kicked: Vec<u32> = rig
        .fake
        .0
        .lock()
        .unwrap()
        .kickfds
        .iter()
        .map(|k| k.0)
        .collect();
    assert_eq!(kicked, vec![0, 1]);

    let rx = qs[0].add_rx(1, BUF as u32);
    qs[0].submit(&[rx]);
    rig.kick(0);
    let frame = packet(100, 7);
    let mut data = vec![0u8; HDR];
    data.extend_from_slice(&frame);
    let tx = qs[1].add_tx(&data, 2);
    qs[1].submit(&[tx]);
    rig.kick(1);

    let used = qs[0].wait_used(1);
    assert_eq!(used[0].0, rx);
    assert_eq!(used[0].1 as usize, HDR + frame.len());
    assert_eq!(qs[0].read_rx(rx, used[0].1, BUF as u32)[HDR..], frame[..]);
    assert_eq!(qs[1].wait_used(1)[0].0, tx);
    rig.forward_call(0);
    assert!(
        rig.fake.0.lock().unwrap().irqs.contains(&0),
        "RX interrupt injected"
    );

    // GET_VQ_STATE: the sim's next avail index.
    let r = ok(rig.send(|id| Request::GetVqState { id, index: 1 }));
    assert_eq!(r.avail_index, Some(1));
    let stats = rig.server.queue_stats(1).unwrap();
    assert_eq!((stats.packets, stats.bytes), (1, frame.len() as u64));
}

#[test]
fn rings_start_at_the_base_the_driver_set_and_a_reset_registers_kicks_again() {
    let mut rig = Rig::new();
    ok(rig.update_iotlb());
    rig.negotiate(FEATURES);
    let _qs = rig.rings([40, 9]);
    // Before DRIVER_OK the state is the kernel's.
    let r = ok(rig.send(|id| Request::GetVqState { id, index: 1 }));
    assert_eq!(r.avail_index, Some(9));
    rig.driver_ok();
    let r = ok(rig.send(|id| Request::GetVqState { id, index: 0 }));
    assert_eq!(r.avail_index, Some(40));

    ok(rig.status(0));
    assert_eq!(rig.server.stats().resets, 1);
    assert_eq!(rig.server.status(), 0);
    // The mappings survive a reset, as the kernel's do.
    assert_eq!(rig.server.mappings().len(), 1);
    rig.negotiate(FEATURES);
    let _qs = rig.rings([3, 4]);
    rig.driver_ok();
    let k = rig.fake.0.lock().unwrap();
    assert_eq!(
        k.kickfds.len(),
        4,
        "kick eventfds registered again after the reset"
    );
    drop(k);
    let r = ok(rig.send(|id| Request::GetVqState { id, index: 1 }));
    assert_eq!(r.avail_index, Some(4));
}

#[test]
fn an_iotlb_update_changes_only_what_changed() {
    let mut rig = Rig::new();
    let second = memfd_region(0x4000);
    rig.fake
        .0
        .lock()
        .unwrap()
        .iotlb
        .push((entry(0x1000_0000, 0x4000, ACCESS_RO), Arc::clone(&second)));
    ok(rig.update_iotlb());
    assert_eq!(rig.server.stats().maps, 2);
    // The same table again: nothing is remapped.
    ok(rig.update_iotlb());
    assert_eq!((rig.server.stats().maps, rig.server.stats().unmaps), (2, 0));
    // One mapping removed, another one moved: one unmap for the removed,
    // an unmap and a map for the moved.
    {
        let mut k = rig.fake.0.lock().unwrap();
        k.iotlb.remove(1);
        k.iotlb[0].0.start = 0x9000_0000;
        k.iotlb[0].0.last = 0x9000_0000 + 2 * QUEUE_AREA - 1;
    }
    ok(rig.update_iotlb());
    let s = rig.server.stats();
    assert_eq!((s.maps, s.unmaps), (3, 2));
    assert_eq!(
        rig.server.mappings(),
        vec![(0x9000_0000, 0x9000_0000 + 2 * QUEUE_AREA - 1, ACCESS_RW)]
    );
}

#[test]
fn nonsense_from_the_kernel_fails_the_request_and_nothing_else() {
    let mut rig = Rig::new();
    // An entry that ends before the query (it would loop forever).
    rig.fake.0.lock().unwrap().bogus = Some(IotlbEntry {
        offset: 0,
        start: 0x2000,
        last: 0x1fff,
        perm: ACCESS_RW,
    });
    assert!(!rig.update_iotlb().ok);
    // A permission that does not exist.
    rig.fake.0.lock().unwrap().bogus = Some(IotlbEntry {
        offset: 0,
        start: 0,
        last: 0xfff,
        perm: 9,
    });
    assert!(!rig.update_iotlb().ok);
    // Unaligned offset: cannot be mmapped.
    rig.fake.0.lock().unwrap().bogus = Some(IotlbEntry {
        offset: 0x10,
        start: 0,
        last: 0xfff,
        perm: ACCESS_RW,
    });
    assert!(!rig.update_iotlb().ok);
    assert!(rig.server.mappings().is_empty());
    // An unknown request type, a queue that does not exist, a status that
    // clears bits without a reset.
    assert!(!rig.send(|id| Request::Unknown { id, kind: 77 }).ok);
    assert!(!rig.send(|id| Request::GetVqState { id, index: 5 }).ok);
    rig.fake.0.lock().unwrap().bogus = None;
    ok(rig.update_iotlb());
    rig.negotiate(FEATURES);
    assert!(!rig.status(status::ACKNOWLEDGE).ok);
    // A ring of size 0 at DRIVER_OK fails the status, the device still answers.
    let _qs = rig.rings([0, 0]);
    rig.fake.0.lock().unwrap().vqs[0].num = 0;
    assert!(
        !rig.status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK)
            .ok
    );
    assert_eq!(rig.server.stats().failed, 7);
    ok(rig.status(0));
}

#[test]
fn a_ring_enabled_after_driver_ok_starts_at_its_first_kick() {
    let mut rig = Rig::new();
    ok(rig.update_iotlb());
    rig.negotiate(FEATURES);
    let mut qs = rig.rings([0, 0]);
    rig.fake.0.lock().unwrap().vqs[1].ready = 0;
    rig.fake.0.lock().unwrap().vqs[1].state[0] = 6;
    rig.driver_ok();
    assert_eq!(rig.server.waiting_queues(), vec![1]);
    // Its position is still the one the driver set.
    let r = ok(rig.send(|id| Request::GetVqState { id, index: 1 }));
    assert_eq!(r.avail_index, Some(6));
    rig.fake.0.lock().unwrap().vqs[1].state[0] = 0;
    // A kick while still disabled changes nothing.
    rig.kick(1);
    rig.server.kick_while_waiting(1);
    assert_eq!(rig.server.waiting_queues(), vec![1]);

    rig.fake.0.lock().unwrap().vqs[1].ready = 1;
    let rx = qs[0].add_rx(1, BUF as u32);
    qs[0].submit(&[rx]);
    rig.kick(0);
    let mut data = vec![0u8; HDR];
    data.extend_from_slice(&packet(60, 1));
    let tx = qs[1].add_tx(&data, 1);
    qs[1].submit(&[tx]);
    rig.kick(1);
    rig.server.kick_while_waiting(1);
    assert!(rig.server.waiting_queues().is_empty());
    assert_eq!(qs[1].wait_used(1)[0].0, tx);
    assert_eq!(qs[0].wait_used(1)[0].0, rx);
}

/// `svq-vduse-net --tap`: the sim behind the VDUSE server on a host tap,
/// frames both ways. Skips (with the reason) without /dev/net/tun.
#[test]
fn tap_mode_carries_frames_both_ways() {
    let ifname = format!("svqvd{}", std::process::id() % 100_000);
    let Some(mut rig) = Rig::with_mode(SimMode::Tap(ifname.clone())) else {
        println!("SKIP: cannot create tap {ifname}");
        return;
    };
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
    let up = std::process::Command::new("ip")
        .args(["link", "set", "dev", &ifname, "up"])
        .status();
    if !up.is_ok_and(|s| s.success()) {
        println!("SKIP: cannot bring {ifname} up");
        return;
    }
    let sock = match tap_socket::PacketSocket::open(&ifname) {
        Ok(s) => s,
        Err(e) => {
            println!("SKIP: AF_PACKET on {ifname}: {e}");
            return;
        }
    };
    ok(rig.update_iotlb());
    rig.negotiate(FEATURES);
    let mut qs = rig.rings([0, 0]);
    rig.driver_ok();

    // TX through the kernel interface -> the tap.
    let f = tap_socket::frame(200, 9);
    let mut pkt = vec![0u8; HDR];
    pkt.extend_from_slice(&f);
    let tx = qs[1].add_tx(&pkt, 1);
    qs[1].submit(&[tx]);
    rig.kick(1);
    assert_eq!(qs[1].wait_used(1)[0].0, tx);
    sock.expect(&f);

    // The tap -> RX, and the driver interrupted.
    let rx = qs[0].add_rx(1, BUF as u32);
    qs[0].submit(&[rx]);
    rig.kick(0);
    let f = tap_socket::frame(300, 10);
    sock.send(&f);
    let used = qs[0].wait_used(1);
    assert_eq!(used[0].1 as usize, HDR + f.len());
    assert_eq!(qs[0].read_rx(rx, used[0].1, BUF as u32)[HDR..], f[..]);
    rig.forward_call(0);
    assert!(rig.fake.0.lock().unwrap().irqs.contains(&0));
}
