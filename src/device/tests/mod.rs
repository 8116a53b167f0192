//! Device-model tests against a fake backend that records every call:
//! ring start/stop ordering, vhost-user message validation, mode switching.
#![allow(clippy::needless_range_loop)]

mod inflight_packed;
mod nic_control;
mod translated_layout;
mod vdpa_memory;
mod vdpa_packed;

use std::sync::{Arc, Mutex};

use backends::{BackendError, DeviceBackend, DmaRegion, IovaRange, VringAddrs};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::model::Running;
use super::{Device, DeviceError, Mode, RELAY_FEATURES};
use crate::memory::tests::region;
use virtio_features::{F_IN_ORDER, F_LOG_ALL, F_PROTOCOL_FEATURES, F_RING_PACKED};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Features(u64),
    Status(u8),
    Map(u64, u64),
    Unmap(u64, u64),
    Num(usize, u16),
    Addr(usize, VringAddrs),
    Base(usize, u16),
    BasePacked(usize, u32),
    Kick(usize, i32),
    Call(usize, Option<i32>),
    Enable(usize, bool),
    Suspend,
    Resume,
    DirtyLog(bool),
    LogAddr(usize, Option<u64>),
}

#[derive(Default)]
struct FakeState {
    ops: Vec<Op>,
    /// Per queue: what vring_base returns (set_vring_base writes it; tests
    /// move it to simulate device progress).
    bases: [u16; 4],
    /// The same for packed rings.
    packed_bases: [u32; 4],
    status: u8,
    /// The device logs dirty pages itself.
    logs: bool,
    /// ... but refuses the log it is given.
    refuse_log: bool,
    /// Features this device does not offer after all.
    lacks: u64,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn ops(&self) -> Vec<Op> {
        std::mem::take(&mut self.0.lock().unwrap().ops)
    }
    fn push(&self, op: Op) {
        self.0.lock().unwrap().ops.push(op);
    }
    fn set_base(&self, q: usize, b: u16) {
        self.0.lock().unwrap().bases[q] = b;
    }
}

fn fd_of(e: &EventFd) -> i32 {
    std::os::unix::io::AsRawFd::as_raw_fd(e)
}

impl DeviceBackend for Fake {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn device_features(&self) -> u64 {
        // IN_ORDER and RING_PACKED are offered to the VMM only on request.
        (RELAY_FEATURES | F_IN_ORDER | F_RING_PACKED) & !self.0.lock().unwrap().lacks
    }
    fn set_features(&mut self, f: u64) -> backends::Result<()> {
        self.push(Op::Features(f));
        Ok(())
    }
    fn num_queues(&self) -> usize {
        4
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn iova_range(&self) -> IovaRange {
        IovaRange {
            first: 0,
            last: (1 << 40) - 1,
        }
    }
    fn config_size(&self) -> usize {
        12
    }
    fn get_config(&self, offset: u32, buf: &mut [u8]) -> backends::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = offset as u8 + i as u8;
        }
        Ok(())
    }
    fn set_config(&mut self, _o: u32, _d: &[u8]) -> backends::Result<()> {
        Ok(())
    }
    fn set_status(&mut self, s: u8) -> backends::Result<()> {
        self.0.lock().unwrap().status = s;
        self.push(Op::Status(s));
        Ok(())
    }
    fn status(&self) -> u8 {
        self.0.lock().unwrap().status
    }
    fn dma_map(&mut self, r: DmaRegion) -> backends::Result<()> {
        self.push(Op::Map(r.iova, r.size()));
        Ok(())
    }
    fn dma_unmap(&mut self, iova: u64, size: u64) -> backends::Result<()> {
        self.push(Op::Unmap(iova, size));
        Ok(())
    }
    fn set_vring_num(&mut self, q: usize, n: u16) -> backends::Result<()> {
        self.push(Op::Num(q, n));
        Ok(())
    }
    fn set_vring_addr(&mut self, q: usize, a: VringAddrs) -> backends::Result<()> {
        self.push(Op::Addr(q, a));
        Ok(())
    }
    fn set_vring_base(&mut self, q: usize, b: u16) -> backends::Result<()> {
        self.set_base(q, b);
        self.push(Op::Base(q, b));
        Ok(())
    }
    fn vring_base(&mut self, q: usize) -> backends::Result<u16> {
        Ok(self.0.lock().unwrap().bases[q])
    }
    fn set_vring_base_packed(&mut self, q: usize, b: u32) -> backends::Result<()> {
        self.0.lock().unwrap().packed_bases[q] = b;
        self.push(Op::BasePacked(q, b));
        Ok(())
    }
    fn vring_base_packed(&mut self, q: usize) -> backends::Result<u32> {
        Ok(self.0.lock().unwrap().packed_bases[q])
    }
    fn set_vring_kick(&mut self, q: usize, fd: Arc<EventFd>) -> backends::Result<()> {
        self.push(Op::Kick(q, fd_of(&fd)));
        Ok(())
    }
    fn set_vring_call(&mut self, q: usize, fd: Option<Arc<EventFd>>) -> backends::Result<()> {
        self.push(Op::Call(q, fd.as_deref().map(fd_of)));
        Ok(())
    }
    fn set_vring_enable(&mut self, q: usize, e: bool) -> backends::Result<()> {
        if q >= 4 {
            return Err(BackendError::InvalidQueue { index: q, count: 4 });
        }
        self.push(Op::Enable(q, e));
        Ok(())
    }
    fn suspend(&mut self) -> backends::Result<()> {
        self.push(Op::Suspend);
        Ok(())
    }
    fn resume(&mut self) -> backends::Result<()> {
        self.push(Op::Resume);
        Ok(())
    }
    fn has_dirty_log(&self) -> bool {
        self.0.lock().unwrap().logs
    }
    fn set_dirty_log(&mut self, log: Option<backends::DirtyLogArea>) -> backends::Result<()> {
        if log.is_some() && self.0.lock().unwrap().refuse_log {
            return Err(BackendError::Device("no".into()));
        }
        self.push(Op::DirtyLog(log.is_some()));
        Ok(())
    }
    fn set_vring_log_addr(&mut self, q: usize, addr: Option<u64>) -> backends::Result<()> {
        self.push(Op::LogAddr(q, addr));
        Ok(())
    }
}

const UADDR: u64 = 0x7f00_0000_0000;
const MEM: u64 = 0x10_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

fn device(shadow: bool) -> (Device, Fake) {
    let fake = Fake::default();
    let dev = Device::new("net0", Box::new(fake.clone()), 2, 256, shadow).unwrap();
    (dev, fake)
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// Negotiate and configure queue `q` up to (not including) the kick.
fn configure(dev: &mut Device, q: u32, base: u16) {
    let ring = u64::from(q) * 0x4000;
    dev.set_vring_num(q, 256).unwrap();
    dev.set_vring_base(q, base.into()).unwrap();
    dev.set_vring_addr(
        q,
        UADDR + ring + DESC,
        UADDR + ring + USED,
        UADDR + ring + AVAIL,
        None,
    )
    .unwrap();
    // The guest's avail idx agrees with the base (nothing new available).
    dev.guest_mem
        .write_obj(base, GuestAddress(ring + AVAIL + 2))
        .unwrap();
    dev.guest_mem
        .write_obj(base, GuestAddress(ring + USED + 2))
        .unwrap();
}

fn negotiated(shadow: bool) -> (Device, Fake) {
    let (mut dev, fake) = device(shadow);
    let offered = dev.offered_features();
    assert_eq!(
        offered & (F_IN_ORDER | F_RING_PACKED),
        0,
        "IN_ORDER or RING_PACKED offered"
    );
    assert_ne!(offered & F_PROTOCOL_FEATURES, 0);
    // LOG_ALL is a migration request, not part of a plain negotiation.
    dev.set_features(offered & !F_LOG_ALL).unwrap();
    dev.set_mem_table(vec![region(0, MEM, UADDR)]).unwrap();
    (dev, fake)
}

#[test]
fn features_and_memory_reach_the_backend() {
    let (dev, fake) = negotiated(false);
    let ops = fake.ops();
    assert_eq!(
        ops,
        vec![
            Op::Features(dev.offered_features() & !(F_PROTOCOL_FEATURES | F_LOG_ALL)),
            Op::Map(0, MEM)
        ]
    );
}

/// A `--in-order` device with `acked` negotiated and queue 1 running.
fn in_order_started(acked: impl FnOnce(u64) -> u64) -> (Device, Fake) {
    let (mut dev, fake) = device(false);
    dev.set_offered_on_request(virtio_features::F_IN_ORDER);
    let offered = dev.offered_features();
    dev.set_features(acked(offered) & !F_LOG_ALL).unwrap();
    dev.set_mem_table(vec![region(0, MEM, UADDR)]).unwrap();
    configure(&mut dev, 1, 0);
    dev.set_vring_kick(1, Some(eventfd())).unwrap();
    dev.set_vring_enable(1, true).unwrap();
    assert!(dev.is_started());
    (dev, fake)
}

#[test]
fn in_order_is_offered_on_request_and_kept_in_shadow_mode() {
    let (mut dev, fake) = in_order_started(|offered| {
        assert_ne!(
            offered & F_IN_ORDER,
            0,
            "the device offers it: {offered:#x}"
        );
        offered
    });
    let to_device = dev.acked_features.unwrap() & !(F_PROTOCOL_FEATURES | F_LOG_ALL);
    assert_ne!(to_device & F_IN_ORDER, 0);
    assert_eq!(
        fake.ops()[0],
        Op::Features(to_device),
        "the device gets IN_ORDER"
    );
    assert!(dev.set_shadow(true).unwrap());
    assert_eq!(dev.query().queues[1].mode, Mode::Shadow);
    assert!(dev.set_shadow(false).unwrap());
    assert_eq!(dev.query().queues[1].mode, Mode::Passthrough);
}

/// `--packed`: RING_PACKED offered on request; the VMM's 32-bit packed
/// positions (QEMU: avail index and wrap counter below, used above) reach
/// the device whole and come back whole; in shadow mode the device gets a
/// packed shadow ring from its start, and the guest position survives the
/// round trip.
#[test]
fn packed_rings_are_offered_on_request_and_their_positions_pass_whole() {
    let (mut dev, fake) = device(false);
    assert_eq!(
        dev.offered_features() & F_RING_PACKED,
        0,
        "not without --packed"
    );
    dev.set_offered_on_request(F_RING_PACKED);
    let offered = dev.offered_features();
    assert_ne!(offered & F_RING_PACKED, 0, "{offered:#x}");
    assert_eq!(offered & F_IN_ORDER, 0, "only what was asked for");
    dev.set_features(offered & !F_LOG_ALL).unwrap();
    dev.set_mem_table(vec![region(0, MEM, UADDR)]).unwrap();
    let wrap = 1 << 15;
    let pos: u32 = (5 | wrap) | ((3 | wrap) << 16);
    dev.set_vring_num(1, 256).unwrap();
    dev.set_vring_base(1, pos).unwrap();
    // A packed ring's driver and device areas are 4 bytes each: placed at
    // the very end of guest memory they must still be accepted.
    let end = UADDR + MEM;
    dev.set_vring_addr(1, UADDR + 0x4000, end - 4, end - 8, None)
        .unwrap();
    dev.set_vring_kick(1, Some(eventfd())).unwrap();
    dev.set_vring_enable(1, true).unwrap();
    assert!(dev.is_started());
    let ops = fake.ops();
    assert!(ops.contains(&Op::BasePacked(1, pos)), "{ops:?}");
    assert!(!ops.iter().any(|o| matches!(o, Op::Base(..))), "{ops:?}");
    assert!(dev.set_shadow(true).unwrap());
    let ops = fake.ops();
    let shadow_start = (1 << 15) | ((1 << 15) << 16);
    assert!(ops.contains(&Op::BasePacked(1, shadow_start)), "{ops:?}");
    assert!(dev.set_shadow(false).unwrap());
    let ops = fake.ops();
    assert!(
        ops.contains(&Op::BasePacked(1, pos)),
        "the guest position again after shadow: {ops:?}"
    );
    // The device moved on: both halves come back to the VMM.
    let moved: u32 = 9 | ((9 | wrap) << 16);
    fake.0.lock().unwrap().packed_bases[1] = moved;
    assert_eq!(dev.get_vring_base(1).unwrap(), moved);
    // A migration carries the position as a packed record (wrap counters
    // apart) and a destination with packed rings takes it whole.
    let st = dev.snapshot_state().unwrap();
    let r = &st.vrings[1];
    assert_eq!(r.layout, crate::migration::stream::RingLayout::Packed);
    assert_eq!(
        (r.next_avail, r.avail_wrap, r.used_idx, r.used_wrap),
        (9, false, 9, true)
    );
    let (mut dst, _f) = device(false);
    dst.set_offered_on_request(F_RING_PACKED);
    dst.set_features(dev.acked_features.unwrap()).unwrap();
    dst.apply_state(st).unwrap();
    assert_eq!(dst.vrings[1].packed_base, moved);
    // And a restart gives the device what the VMM sets next.
    dev.set_vring_base(1, moved).unwrap();
    dev.set_vring_kick(1, Some(eventfd())).unwrap();
    dev.set_vring_enable(1, true).unwrap();
    assert!(fake.ops().contains(&Op::BasePacked(1, moved)));
}

#[test]
fn passthrough_start_gives_the_device_the_guest_ring() {
    let (mut dev, fake) = negotiated(false);
    configure(&mut dev, 1, 7);
    let kick = eventfd();
    let call = eventfd();
    let (kfd, cfd) = (fd_of(&kick), fd_of(&call));
    dev.set_vring_call(1, Some(call)).unwrap();
    dev.set_vring_kick(1, Some(kick)).unwrap();
    fake.ops();
    // Protocol features negotiated: the ring waits for SET_VRING_ENABLE.
    assert!(!dev.is_started());
    dev.set_vring_enable(1, true).unwrap();
    assert!(dev.is_started());
    let ring = 0x4000;
    assert_eq!(
        fake.ops(),
        vec![
            Op::Num(1, 256),
            Op::Addr(
                1,
                VringAddrs {
                    desc: ring + DESC,
                    avail: ring + AVAIL,
                    used: ring + USED
                }
            ),
            Op::Base(1, 7),
            Op::Kick(1, kfd),
            Op::Call(1, Some(cfd)),
            Op::Enable(1, true),
            Op::Status(15),
        ]
    );
    // Device progress, then GET_VRING_BASE stops the ring and reports it.
    fake.set_base(1, 42);
    assert_eq!(dev.get_vring_base(1).unwrap(), 42);
    assert_eq!(fake.ops(), vec![Op::Enable(1, false)]);
    assert!(!dev.is_started());
    let q = &dev.query().queues[1];
    assert_eq!((q.avail_idx, q.enabled), (42, false));
}

#[test]
fn out_of_order_and_bad_messages_are_errors() {
    let (mut dev, _fake) = device(false);
    assert!(matches!(
        dev.set_vring_addr(0, UADDR, UADDR, UADDR, None),
        Err(DeviceError::NoMemTable { queue: 0 })
    ));
    assert!(matches!(
        dev.set_vring_num(4, 256),
        Err(DeviceError::BadQueue { index: 4, count: 4 })
    ));
    assert!(matches!(
        dev.set_vring_kick(200, None),
        Err(DeviceError::BadQueue { .. })
    ));
    assert!(matches!(
        dev.set_vring_num(0, 100),
        Err(DeviceError::BadQueueSize { .. })
    ));
    assert!(matches!(
        dev.set_vring_num(0, 512),
        Err(DeviceError::BadQueueSize { .. })
    ));
    assert!(matches!(
        dev.set_vring_base(0, 70000),
        Err(DeviceError::BadBase { .. })
    ));
    assert!(matches!(
        dev.set_features(1 << 35),
        Err(DeviceError::BadFeatures { .. })
    ));
    assert!(dev.get_config(8, 8).is_err());
    assert_eq!(dev.get_config(6, 2).unwrap(), vec![6, 7]);
    let (mut dev, _fake) = negotiated(false);
    dev.set_vring_num(0, 256).unwrap();
    // Used ring runs past the end of guest memory.
    assert!(matches!(
        dev.set_vring_addr(0, UADDR, UADDR + MEM - 16, UADDR, None),
        Err(DeviceError::RingAddr { what: "used", .. })
    ));
    assert!(matches!(
        dev.set_vring_addr(0, 0x1234, UADDR, UADDR, None),
        Err(DeviceError::RingAddr {
            what: "descriptor",
            ..
        })
    ));
    assert!(matches!(dev.set_shadow(true), Err(DeviceError::NotStarted)));
}

/// Start all four queues; returns the guest (kick, call) fd numbers.
fn start_all(dev: &mut Device, fake: &Fake) -> Vec<(i32, i32)> {
    let mut fds = Vec::new();
    for q in 0..4 {
        configure(dev, q, 3 + q as u16);
        let (kick, call) = (eventfd(), eventfd());
        fds.push((fd_of(&kick), fd_of(&call)));
        dev.set_vring_call(q as u8, Some(call)).unwrap();
        dev.set_vring_kick(q as u8, Some(kick)).unwrap();
        dev.set_vring_enable(q, true).unwrap();
    }
    fake.ops();
    fds
}

#[test]
fn switching_suspends_and_swaps_rings_and_eventfds() {
    let (mut dev, fake) = negotiated(false);
    let fds = start_all(&mut dev, &fake);
    assert!(dev.set_shadow(true).unwrap());
    let ops = fake.ops();
    assert_eq!(ops.first(), Some(&Op::Suspend));
    assert_eq!(ops.last(), Some(&Op::Resume));
    for q in 0..4 {
        let mine: Vec<&Op> = ops
            .iter()
            .filter(|o| match o {
                Op::Num(x, _)
                | Op::Addr(x, _)
                | Op::Base(x, _)
                | Op::Kick(x, _)
                | Op::Call(x, _) => *x == q,
                _ => false,
            })
            .collect();
        assert_eq!(mine[0], &Op::Num(q, 256));
        // The device starts the shadow ring at 0, with the daemon's eventfds.
        assert_eq!(mine[2], &Op::Base(q, 0));
        let Op::Kick(_, k) = mine[3] else { panic!() };
        assert_ne!(*k, fds[q].0);
        let Op::Call(_, Some(c)) = mine[4] else {
            panic!()
        };
        assert_ne!(*c, fds[q].1);
        let Op::Addr(_, a) = mine[1] else { panic!() };
        // Shadow rings are daemon memory, placed outside guest memory.
        assert!(a.desc >= MEM);
    }
    // All shadow rings live in one shared area, mapped once.
    assert_eq!(ops.iter().filter(|o| matches!(o, Op::Map(..))).count(), 1);
    let qv = dev.query();
    assert_eq!(qv.mode, Mode::Shadow);
    assert_eq!(qv.queues[2].mode, Mode::Shadow);
    assert_eq!(qv.queues[2].avail_idx, 5);
    // Same mode again: nothing to do.
    assert!(!dev.set_shadow(true).unwrap());
    assert!(fake.ops().is_empty());

    // Back: the device gets the guest ring again at the SVQ's avail index.
    assert!(dev.set_shadow(false).unwrap());
    let ops = fake.ops();
    assert_eq!(ops.first(), Some(&Op::Suspend));
    assert_eq!(ops.last(), Some(&Op::Resume));
    for q in 0..4 {
        assert!(ops.contains(&Op::Base(q, 3 + q as u16)), "{ops:?}");
        assert!(ops.contains(&Op::Kick(q, fds[q].0)));
        assert!(ops.contains(&Op::Call(q, Some(fds[q].1))));
    }
    // The shared shadow area stays mapped for the next switch.
    assert_eq!(ops.iter().filter(|o| matches!(o, Op::Unmap(..))).count(), 0);
    assert_eq!(dev.query().queues[0].mode, Mode::Passthrough);
}

#[test]
fn shadow_start_and_get_vring_base() {
    let (mut dev, fake) = negotiated(true);
    let _fds = start_all(&mut dev, &fake);
    assert_eq!(dev.query().queues[3].mode, Mode::Shadow);
    // GET_VRING_BASE in shadow: the SVQ's avail index; the shared shadow
    // area stays mapped.
    assert_eq!(dev.get_vring_base(3).unwrap(), 6);
    let ops = fake.ops();
    assert_eq!(ops.first(), Some(&Op::Enable(3, false)));
    assert!(!ops.iter().any(|o| matches!(o, Op::Unmap(..))), "{ops:?}");
}

#[test]
fn call_fd_changes_reach_a_running_ring() {
    let (mut dev, fake) = negotiated(false);
    let _fds = start_all(&mut dev, &fake);
    let call = eventfd();
    let cfd = fd_of(&call);
    dev.set_vring_call(0, Some(call)).unwrap();
    assert_eq!(fake.ops(), vec![Op::Call(0, Some(cfd))]);
    dev.set_vring_call(0, None).unwrap();
    assert_eq!(fake.ops(), vec![Op::Call(0, None)]);
}

#[test]
fn disconnect_stops_rings_and_keeps_indexes() {
    let (mut dev, fake) = negotiated(false);
    let _fds = start_all(&mut dev, &fake);
    fake.set_base(2, 99);
    dev.disconnect();
    assert!(!dev.is_started());
    let ops = fake.ops();
    assert!(ops.contains(&Op::Enable(2, false)));
    assert!(ops.contains(&Op::Status(0)));
    assert!(ops.contains(&Op::Unmap(0, MEM)));
    assert_eq!(dev.query().queues[2].avail_idx, 99);
}

#[test]
fn memory_table_update_keeps_same_regions_mapped() {
    let (mut dev, fake) = negotiated(false);
    fake.ops();
    let same = dev.mem.regions()[0].clone();
    let extra = region(0x1000_0000, 0x10000, UADDR + 0x1000_0000);
    dev.set_mem_table(vec![same.clone(), extra.clone()])
        .unwrap();
    assert_eq!(fake.ops(), vec![Op::Map(0x1000_0000, 0x10000)]);
    dev.remove_mem_region(0x1000_0000, 0x10000).unwrap();
    assert_eq!(fake.ops(), vec![Op::Unmap(0x1000_0000, 0x10000)]);
    assert!(dev.remove_mem_region(0x1000_0000, 0x10000).is_err());
    dev.add_mem_region(extra.clone()).unwrap();
    assert_eq!(fake.ops(), vec![Op::Map(0x1000_0000, 0x10000)]);
    // The same region again (QEMU's second queue pair): nothing changes.
    dev.add_mem_region(extra).unwrap();
    assert_eq!(fake.ops(), vec![]);
    assert_eq!(dev.mem.regions().len(), 2);
    // An overlapping different one is still refused.
    assert!(dev
        .add_mem_region(region(0x1000_0000, 0x20000, UADDR + 0x2000_0000))
        .is_err());
    // New memory at the same GPA (a different file) replaces the old.
    dev.set_mem_table(vec![region(0, MEM, UADDR)]).unwrap();
    let ops = fake.ops();
    assert!(ops.contains(&Op::Unmap(0, MEM)) && ops.contains(&Op::Map(0, MEM)));
    assert!(ops.contains(&Op::Unmap(0x1000_0000, 0x10000)));
}

#[test]
fn renegotiation_after_stop_resets_the_backend_first() {
    let (mut dev, fake) = negotiated(false);
    let _fds = start_all(&mut dev, &fake);
    for q in 0..4 {
        dev.get_vring_base(q).unwrap();
    }
    fake.ops();
    let fewer = dev.offered_features() & !(1 << 29) & !F_LOG_ALL; // no EVENT_IDX
    dev.set_features(fewer).unwrap();
    assert_eq!(
        fake.ops(),
        vec![Op::Status(0), Op::Features(fewer & !F_PROTOCOL_FEATURES)]
    );
    // Same features again: nothing to do.
    dev.set_features(fewer).unwrap();
    assert!(fake.ops().is_empty());
}

#[test]
fn unchanged_ring_addresses_do_not_restart_a_running_ring() {
    let (mut dev, fake) = negotiated(false);
    let _fds = start_all(&mut dev, &fake);
    let ring = 0x4000;
    let (d, u, a) = (
        UADDR + ring + DESC,
        UADDR + ring + USED,
        UADDR + ring + AVAIL,
    );
    dev.set_vring_addr(1, d, u, a, Some(ring + USED)).unwrap();
    assert!(fake.ops().is_empty());
    // Moved rings restart on the new addresses.
    dev.set_vring_addr(1, d + 0x10000, u, a, None).unwrap();
    let ops = fake.ops();
    assert_eq!(ops.first(), Some(&Op::Enable(1, false)));
    assert!(ops
        .iter()
        .any(|o| matches!(o, Op::Addr(1, x) if x.desc == ring + DESC + 0x10000)));
    assert_eq!(ops.last(), Some(&Op::Enable(1, true)));
}

fn set_log(dev: &mut Device) {
    let f = hostmem::memfd(c"log", 64).unwrap();
    dev.set_log_base(f, 64, 0).unwrap();
}

/// --shadow auto: LOG_ALL switches every running queue to shadow before
/// SET_FEATURES returns, and back when cleared; each change is reported.
#[test]
fn log_all_switches_to_shadow_under_auto() {
    let (mut dev, fake) = negotiated(false);
    dev.set_auto_shadow(true);
    start_all(&mut dev, &fake);
    set_log(&mut dev);
    let acked = dev.acked_features.unwrap();
    dev.set_features(acked | F_LOG_ALL).unwrap();
    assert!(dev.shadow());
    assert!(dev.migration.logging());
    assert_eq!(dev.take_mode_events(), vec![true]);
    assert!((0..4).all(|q| matches!(dev.vrings[q].running, Running::Shadow(_))));
    assert!(!fake.ops().iter().any(|o| matches!(o, Op::DirtyLog(_))));
    // Same features again: nothing changes.
    dev.set_features(acked | F_LOG_ALL).unwrap();
    assert!(dev.take_mode_events().is_empty());
    dev.set_features(acked).unwrap();
    assert!(!dev.shadow());
    assert!(!dev.migration.logging());
    assert_eq!(dev.take_mode_events(), vec![false]);
    assert!((0..4).all(|q| matches!(dev.vrings[q].running, Running::Passthrough)));
}

/// Without --shadow auto the mode does not follow LOG_ALL.
#[test]
fn log_all_without_auto_keeps_the_mode() {
    let (mut dev, fake) = negotiated(false);
    start_all(&mut dev, &fake);
    let acked = dev.acked_features.unwrap();
    dev.set_features(acked | F_LOG_ALL).unwrap();
    assert!(!dev.shadow());
    assert!(dev.take_mode_events().is_empty());
}

/// A backend that logs by itself gets the log and the used-ring log
/// addresses; passthrough stays.
#[test]
fn a_logging_backend_gets_the_log_forwarded() {
    let (mut dev, fake) = negotiated(false);
    fake.0.lock().unwrap().logs = true;
    dev.set_auto_shadow(true);
    start_all(&mut dev, &fake);
    let acked = dev.acked_features.unwrap();
    // LOG_ALL before SET_LOG_BASE: forwarded once the log arrives.
    dev.set_features(acked | F_LOG_ALL).unwrap();
    assert!(!dev.shadow());
    assert!(fake.ops().is_empty());
    set_log(&mut dev);
    let ops = fake.ops();
    assert_eq!(ops[0], Op::DirtyLog(true));
    for q in 0..4usize {
        let used = q as u64 * 0x4000 + USED;
        assert!(ops.contains(&Op::LogAddr(q, Some(used))), "{ops:?}");
    }
    // A second log replaces the first at the device too.
    set_log(&mut dev);
    assert_eq!(fake.ops()[0], Op::DirtyLog(true));
    dev.set_features(acked).unwrap();
    assert_eq!(fake.ops(), vec![Op::DirtyLog(false)]);
    assert!(dev.take_mode_events().is_empty());
}

/// A failed device-state load (features differ) changes nothing; a good
/// one sets the ring indexes the VMM then continues from.
#[test]
fn device_state_snapshot_and_apply() {
    let (mut dev, fake) = negotiated(true);
    start_all(&mut dev, &fake);
    for q in 0..4 {
        dev.get_vring_base(q).unwrap();
    }
    let snap = dev.snapshot_state().unwrap();
    assert_eq!(snap.vrings.len(), 4);
    assert_eq!(snap.vrings[2].next_avail, 5);
    assert_eq!(snap.mode, crate::migration::stream::RelayMode::Shadow);

    let (mut dst, _f2) = negotiated(false);
    let mut other = snap.clone();
    other.features.virtio &= !(1 << 29);
    assert!(dst.apply_state(other).is_err());
    assert_eq!(dst.vrings[2].base, 0);
    dst.apply_state(snap).unwrap();
    assert_eq!((dst.vrings[2].base, dst.vrings[2].used_base), (5, 5));
    // Not --shadow auto: the destination continues in the source's mode.
    assert!(dst.shadow());
}

/// Shadow mode the operator chose stays when logging stops.
#[test]
fn log_all_off_keeps_an_operator_chosen_shadow() {
    let (mut dev, fake) = negotiated(false);
    dev.set_auto_shadow(true);
    start_all(&mut dev, &fake);
    assert!(dev.set_shadow(true).unwrap());
    let acked = dev.acked_features.unwrap();
    dev.set_features(acked | F_LOG_ALL).unwrap();
    dev.set_features(acked).unwrap();
    assert!(dev.shadow());
    assert!(dev.take_mode_events().is_empty());
}

/// `--shadow auto`, every ring started in passthrough, on a device that
/// claims to log dirty pages but refuses the log it is given.
fn started_refusing_logger() -> Device {
    let (mut dev, fake) = negotiated(false);
    {
        let mut st = fake.0.lock().unwrap();
        st.logs = true;
        st.refuse_log = true;
    }
    dev.set_auto_shadow(true);
    start_all(&mut dev, &fake);
    dev
}

/// A device that claims to log but refuses the log: the SVQs log instead.
#[test]
fn a_refused_log_falls_back_to_shadow() {
    let mut dev = started_refusing_logger();
    set_log(&mut dev);
    let acked = dev.acked_features.unwrap();
    dev.set_features(acked | F_LOG_ALL).unwrap();
    assert!(dev.shadow());
    assert_eq!(dev.take_mode_events(), vec![true]);
    dev.set_features(acked).unwrap();
    assert!(!dev.shadow());
    assert!(!dev.migration.logging());
}

/// The mode change a late, refused SET_LOG_BASE causes reaches QMP with that
/// message's own reply (the vhost-user seam's `after_request`), not with a
/// later message.
#[test]
fn a_mode_change_made_by_set_log_base_is_reported_at_once() {
    use crate::protocol::RequestHandler;
    use crate::vhost_user::VuHandler;
    use vhost::vhost_user::message::VhostUserLog;

    let dev = started_refusing_logger();
    let acked = dev.acked_features.unwrap();
    let shared = Arc::new(Mutex::new(dev));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let mut vu = VuHandler::new(
        Arc::clone(&shared),
        Some(Arc::new(move |shadow| s2.lock().unwrap().push(shadow))),
    );
    // LOG_ALL before the log: forwarding is pending, nothing changes yet.
    vu.set_features(acked | F_LOG_ALL).unwrap();
    vu.after_request();
    assert!(seen.lock().unwrap().is_empty());
    // The log comes, the device refuses it: shadow, reported now.
    let f = hostmem::memfd(c"log", 64).unwrap();
    vu.set_log_base(&VhostUserLog::new(64, 0), f).unwrap();
    vu.after_request();
    assert_eq!(*seen.lock().unwrap(), vec![true]);
    assert!(crate::device::lock(&shared).shadow());
}

/// The same when the log arrives after LOG_ALL (forwarding was pending).
#[test]
fn a_refused_late_log_falls_back_to_shadow() {
    let mut dev = started_refusing_logger();
    let acked = dev.acked_features.unwrap();
    dev.set_features(acked | F_LOG_ALL).unwrap();
    assert!(!dev.shadow());
    set_log(&mut dev);
    assert!(dev.shadow());
    assert!(dev.migration.logging());
    dev.set_features(acked).unwrap();
    assert!(!dev.shadow());
}
