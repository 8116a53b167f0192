//! The SVQ against a guest driver and fake devices: one file per kind of
//! test (unit rules, adversarial rings, polling, property tests against a
//! model, resubmission); `Fixture` wires a driver, an SVQ and a device.

mod adversarial;
mod harness;
mod in_order;
mod packed;
mod polling;
mod prop;
mod resubmit;
mod unit;

use iova::IovaTree;
use vm_memory::GuestMemoryMmap;

use crate::{CallOutcome, RingIndexes, ShadowVirtqueue, SvqConfig, SvqError};
use harness::{FakeDevice, GuestDriver, LogRecorder};

pub const F_EVENT_IDX: u64 = crate::F_EVENT_IDX;
pub const F_INDIRECT: u64 = crate::F_INDIRECT_DESC;
pub const F_VERSION_1: u64 = virtio_features::F_VERSION_1;

/// A guest driver, an SVQ and a fake device wired together.
pub struct Fixture {
    pub mem: GuestMemoryMmap,
    pub tree: IovaTree,
    pub svq: ShadowVirtqueue,
    pub dev: FakeDevice,
    pub drv: GuestDriver,
    pub log: LogRecorder,
}

impl Fixture {
    pub fn new(q: u16, s: u16, guest_features: u64, device_features: u64) -> Self {
        Self::with_start(
            q,
            s,
            guest_features,
            device_features,
            RingIndexes::default(),
        )
    }

    pub fn with_start(
        q: u16,
        s: u16,
        guest_features: u64,
        device_features: u64,
        start: RingIndexes,
    ) -> Self {
        let mem = harness::guest_memory();
        let mut tree = harness::guest_tree();
        let cfg = SvqConfig {
            queue_size: q,
            shadow_size: s,
            guest_features: guest_features | F_VERSION_1,
            device_features: device_features | F_VERSION_1,
        };
        let svq = ShadowVirtqueue::new(cfg, harness::guest_ring(), start).unwrap();
        harness::map_shadow(&mut tree, &svq);
        let dev = FakeDevice::new(&svq);
        let mut drv = GuestDriver::new(&mem, q);
        drv.start_at(start);
        Fixture {
            mem,
            tree,
            svq,
            dev,
            drv,
            log: LogRecorder::default(),
        }
    }

    pub fn kick(&mut self) -> Result<bool, SvqError> {
        self.svq.handle_guest_kick(&self.mem, &self.tree)
    }

    pub fn call(&mut self) -> Result<CallOutcome, SvqError> {
        self.svq
            .handle_device_call(&self.mem, &self.tree, &self.log)
    }

    /// Heads of the used entries the guest has not seen yet, in ring order.
    pub fn used_heads(&mut self) -> Vec<u16> {
        self.drv.collect(&self.mem).iter().map(|u| u.1).collect()
    }

    /// Add a chain of buffers with the given (len, writable) in head's area.
    pub fn add(&mut self, lens: &[(u32, bool)], indirect: bool) -> u16 {
        self.drv
            .add(&self.mem, indirect, |h| GuestDriver::bufs_for(h, 0, lens))
            .expect("guest ring full")
            .0
    }
}
