//! The INFLIGHT_SHMFD region with packed rings, through the device model
//! and its workers (the test VMM drives split rings only): a daemon in
//! shadow mode records the chains the device took, a new daemon given the
//! same region and guest memory resubmits exactly those from the region's
//! descriptor copies, and the guest's packed driver (testkit) sees every
//! chain completed once.

use std::fs::File;
use std::time::{Duration, Instant};

use iova::AddrSpace;
use testkit::packed_ring::{PackedDevice, PackedRing};
use testkit::ring::Seg;
use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::{GuestAddress, MmapRegion};

use super::*;
use crate::memory::{GuestRegion, RegionDesc};
use crate::migration::inflight_region::Layout;
use crate::migration::inflight_region_packed::packed_queue_region_size;

const Q: u32 = 1;
const SIZE: u16 = 8;
const RING: u64 = 0x8000;
const BUFS: u64 = 0x9000;
const WRAP: u16 = 1 << 15;

/// A shadow-mode device with packed rings on guest memory `mem` (shared by
/// the "old" and the "new" daemon, as the VMM's memory is).
fn packed_device(mem: &File) -> (Device, Fake) {
    let (mut dev, fake) = device(true);
    dev.set_offered_on_request(F_RING_PACKED);
    let offered = dev.offered_features();
    dev.set_features(offered & !F_LOG_ALL).unwrap();
    let desc = RegionDesc {
        gpa: 0,
        size: MEM,
        user_addr: UADDR,
        mmap_offset: 0,
    };
    let region = GuestRegion::map(desc, mem.try_clone().unwrap()).unwrap();
    dev.set_mem_table(vec![region]).unwrap();
    (dev, fake)
}

/// Ring `Q` at `base` (the VMM's 32-bit packed vring base), started.
fn start(dev: &mut Device, base: u32) -> (EventFd, EventFd) {
    dev.set_vring_num(Q, u32::from(SIZE)).unwrap();
    dev.set_vring_base(Q, base).unwrap();
    // desc, device area (used), driver area (avail).
    dev.set_vring_addr(
        Q,
        UADDR + RING,
        UADDR + RING + 0x100,
        UADDR + RING + 0x80,
        None,
    )
    .unwrap();
    let (kick, call) = (eventfd(), eventfd());
    dev.set_vring_call(Q as u8, Some(call.try_clone().unwrap()))
        .unwrap();
    dev.set_vring_kick(Q as u8, Some(kick.try_clone().unwrap()))
        .unwrap();
    dev.set_vring_enable(Q, true).unwrap();
    assert_eq!(dev.query().queues[Q as usize].mode, Mode::Shadow);
    (kick, call)
}

/// The device on ring `Q`'s shadow ring: the fake backend was given its
/// IOVAs; they are daemon memory, found through the tree.
struct ShadowDevice {
    ring: PackedDevice,
    mem: Arc<MmapRegion>,
    call: Arc<EventFd>,
}

impl ShadowDevice {
    fn new(dev: &Device, ops: &[Op]) -> Self {
        let Some(Op::Addr(_, a)) = ops
            .iter()
            .rev()
            .find(|o| matches!(o, Op::Addr(q, _) if *q == Q as usize))
        else {
            panic!("no ring address: {ops:?}")
        };
        let Running::Shadow(res) = &dev.vrings[Q as usize].running else {
            panic!("not in shadow")
        };
        let base = res.mem.as_ptr() as u64;
        let off = |iova| match dev.tree.reverse(iova) {
            Some((AddrSpace::Host, hva)) => hva - base,
            other => panic!("{iova:#x}: {other:?}"),
        };
        ShadowDevice {
            ring: PackedDevice::new(SIZE, off(a.desc), off(a.avail), off(a.used)),
            mem: res.mem.clone(),
            call: res.dev_call.clone(),
        }
    }

    /// Take what the SVQ placed: `(id, slots, guest addresses)` of each.
    fn take(&mut self, dev: &Device) -> Vec<(u16, u16, Vec<u64>)> {
        let taken = self.ring.take_all(&*self.mem, &|a| a).unwrap();
        taken
            .into_iter()
            .map(|t| {
                let gpas = t
                    .segs
                    .iter()
                    .map(|s| match dev.tree.reverse(s.0) {
                        Some((AddrSpace::Guest, gpa)) => gpa,
                        other => panic!("{:#x}: {other:?}", s.0),
                    })
                    .collect();
                (t.id, t.slots, gpas)
            })
            .collect()
    }

    fn complete(&mut self, id: u16, slots: u16) {
        self.ring.push_used(&*self.mem, id, 0, slots);
        self.call.write(1).unwrap();
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Buffer ids of the chains the region holds for ring `Q`.
fn region_ids(dev: &Device) -> Vec<u16> {
    let r = dev.migration.inflight().unwrap();
    let q = r.packed_queue(Q as u16).unwrap();
    q.chains().unwrap().iter().map(|c| c.id()).collect()
}

/// Readable buffers for a chain (TX: the device only reads).
fn bufs(n: u64, lens: &[u32]) -> Vec<Seg> {
    lens.iter()
        .enumerate()
        .map(|(i, &len)| Seg {
            addr: GuestAddress(BUFS + 0x100 * n + 0x40 * i as u64),
            len,
            write: false,
        })
        .collect()
}

/// Where the old daemon stopped in the middle of completing a: not at all,
/// after the region's completion step (before the guest ring saw it), or
/// after the guest ring saw it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Crash {
    None,
    BeforeGuestSawA,
    AfterGuestSawA,
}

#[test]
fn packed_chains_in_flight_survive_a_daemon_restart() {
    for crash in [Crash::None, Crash::BeforeGuestSawA, Crash::AfterGuestSawA] {
        restart_with(crash);
    }
}

fn restart_with(crash: Crash) {
    let mem = crate::memory::tests::memfd(MEM);
    let (mut old, fake) = packed_device(&mem);
    let (reply, region) = old
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 4, SIZE))
        .unwrap();
    // The packed layout, as the features negotiated said.
    assert_eq!(reply.mmap_size, 4 * packed_queue_region_size(SIZE));
    assert_eq!(old.migration.inflight().unwrap().layout(), Layout::Packed);
    let start_pos = u32::from(WRAP) | (u32::from(WRAP) << 16);
    let (kick, call) = start(&mut old, start_pos);
    let mut shadow = ShadowDevice::new(&old, &fake.ops());
    let mut drv = PackedRing::new(
        &old.guest_mem,
        SIZE,
        GuestAddress(RING),
        GuestAddress(RING + 0x80),
        GuestAddress(RING + 0x100),
    );
    let a = drv.add(&bufs(0, &[14, 100]), 0).unwrap();
    let b = drv.add(&bufs(1, &[60]), 1).unwrap();
    let c = drv.add(&bufs(2, &[30, 30]), 2).unwrap();
    kick.write(1).unwrap();
    wait_for("three chains in the region", || region_ids(&old).len() == 3);
    assert_eq!(region_ids(&old), [a, b, c]);
    let taken = shadow.take(&old);
    assert_eq!(taken.len(), 3);
    // b completes: its used descriptor goes where a's first one was.
    shadow.complete(taken[1].0, taken[1].1);
    let mut used = Vec::new();
    wait_for("b completed", || {
        used.extend(drv.pop_used().unwrap().into_iter().map(|u| u.tag));
        !used.is_empty()
    });
    assert_eq!(used, [1]);
    let _ = call.read();
    wait_for("b out of the region", || region_ids(&old) == [a, c]);
    // The VMM stops the ring (the device holds a and c: its position is
    // past all three) and the daemon goes away.
    let pos = u32::from(4 | WRAP) | (u32::from(1 | WRAP) << 16);
    fake.0.lock().unwrap().packed_bases[Q as usize] = pos;
    old.get_vring_base(Q).unwrap();
    assert_eq!(region_ids(&old), [a, c], "still in flight after the stop");
    if crash != Crash::None {
        // The region's half of a completion of a (entries freed, used
        // position past its 2 slots), as the worker does it before writing
        // the used descriptor.
        let r = old.migration.inflight().unwrap();
        let pq = r.packed_queue(Q as u16).unwrap();
        let entry = pq.chains().unwrap()[0].entry;
        pq.completing(entry).unwrap();
    }
    if crash == Crash::AfterGuestSawA {
        // ... and the used descriptor, at the used position (1, wrap 1).
        drv.write_desc(1, 0, 0, a, 0x80 | 0x8000);
    }
    drop(old);

    // A new daemon, the same region; the VMM gives the used position as
    // the base (what it knows after losing the back-end).
    let (mut new, fake) = packed_device(&mem);
    new.set_inflight_fd(&reply, &region).unwrap();
    let used_pos = u32::from(1 | WRAP) | (u32::from(1 | WRAP) << 16);
    let (_kick, _call) = start(&mut new, used_pos);
    // Avail continues past a and c (3 slots), where the driver is; the
    // used position is past a if the guest saw it.
    let q = &new.query().queues[Q as usize];
    assert_eq!(q.avail_idx, drv.avail_position(), "{crash:?}");
    let used_now = if crash == Crash::AfterGuestSawA { 3 } else { 1 };
    assert_eq!(q.used_idx, used_now | WRAP, "{crash:?}");
    let mut shadow = ShadowDevice::new(&new, &fake.ops());
    let again = shadow.take(&new);
    let want =
        |n: u64, lens: &[u32]| -> Vec<u64> { bufs(n, lens).iter().map(|s| s.addr.0).collect() };
    let (resubmitted, ids) = if crash == Crash::AfterGuestSawA {
        (vec![want(2, &[30, 30])], vec![c])
    } else {
        (vec![want(0, &[14, 100]), want(2, &[30, 30])], vec![a, c])
    };
    assert_eq!(
        again.iter().map(|t| t.2.clone()).collect::<Vec<_>>(),
        resubmitted,
        "oldest first, from the guest's buffers ({crash:?})"
    );
    assert_eq!(region_ids(&new), ids, "resubmitted: the same entries");
    for t in &again {
        shadow.complete(t.0, t.1);
    }
    let mut used = Vec::new();
    wait_for("a and c completed", || {
        used.extend(drv.pop_used().unwrap().into_iter().map(|u| u.tag));
        used.len() >= 2
    });
    assert_eq!(used, [0, 2], "each once ({crash:?})");
    assert_eq!(drv.num_inflight(), 0);
    wait_for("an empty region", || region_ids(&new).is_empty());
    // The ring goes on: a new chain is relayed and tracked.
    let d = drv.add(&bufs(3, &[10]), 3).unwrap();
    _kick.write(1).unwrap();
    wait_for("d in the region", || region_ids(&new) == [d]);
    let t = shadow.take(&new);
    shadow.complete(t[0].0, t[0].1);
    wait_for("d completed", || {
        drv.pop_used().unwrap().iter().any(|u| u.tag == 3)
    });
    wait_for("an empty region again", || region_ids(&new).is_empty());
}

/// A region the VMM got while the rings were split is not used once
/// packed rings are negotiated: its layout is the other one. And a split
/// region given to packed rings is refused (it is too small for them).
#[test]
fn a_region_of_the_other_layout_is_not_used() {
    let mem = crate::memory::tests::memfd(MEM);
    let (mut dev, _fake) = device(true);
    let offered = dev.offered_features();
    dev.set_features(offered & !F_LOG_ALL).unwrap();
    let (reply, region) = dev
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 4, SIZE))
        .unwrap();
    assert_eq!(dev.migration.inflight().unwrap().layout(), Layout::Split);
    assert!(dev.inflight_region().is_some());
    dev.set_offered_on_request(F_RING_PACKED);
    let offered = dev.offered_features();
    dev.set_features(offered & !F_LOG_ALL).unwrap();
    assert!(dev.inflight_region().is_none());
    let (mut packed, _fake) = packed_device(&mem);
    let e = packed.set_inflight_fd(&reply, &region).unwrap_err();
    assert!(e.to_string().contains("needed for 4 queues of 8"), "{e}");
}
