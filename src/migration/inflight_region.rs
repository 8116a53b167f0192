//! The vhost-user in-flight region (INFLIGHT_SHMFD: GET_INFLIGHT_FD /
//! SET_INFLIGHT_FD), so that after the daemon (or the VMM)
//! restarts, buffers the device took but never completed are resubmitted.
//!
//! Source of the layout and the procedure: QEMU `docs/interop/vhost-user.rst`,
//! section "Inflight I/O tracking" (read through the project's reference
//! search, cross-checked with libvhost-user's `VuDescStateSplit` /
//! `VuVirtqInflight`). The region has the layout of the rings negotiated
//! when it is allocated or mapped ([`Layout`]); this file is the split one,
//! `inflight_region_packed.rs` the packed one. One region per queue, back
//! to back:
//!
//! ```text
//! QueueRegionSplit { features: u64, version: u16 (1; 0 = uninitialized),
//!                    desc_num: u16, last_batch_head: u16, used_idx: u16,
//!                    desc: [DescStateSplit; desc_num] }
//! DescStateSplit   { inflight: u8, padding: [u8; 5], next: u16, counter: u64 }
//! ```
//!
//! i.e. a 16-byte header and 16 bytes per descriptor. The per-queue size is
//! rounded up to 64 bytes, as DPDK's `get_pervq_shm_size_split` does (the
//! front-end only stores the buffer; the back-end that allocated it decides
//! the stride, and gets the same geometry back with SET_INFLIGHT_FD).
//!
//! The back-end is the only writer; the shared memory only has to survive
//! the back-end. Accesses are atomic anyway (the bytes are shared memory).

use std::fs::File;
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::VhostUserInflight;

use hostmem::memfd;

use super::inflight_region_packed::{packed_queue_region_size, PackedInflightQueue};
use super::mapping::{MapError, SharedMapping, Window};

const LOG: &str = "inflight";

pub const INFLIGHT_VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: u64 = 64;

// Offsets inside a queue region / a descriptor entry.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH: usize = 12;
const OFF_USED_IDX: usize = 14;
const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 6;
const D_COUNTER: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("in-flight region for {num_queues} queues: the device has {max}")]
    TooManyQueues { num_queues: u16, max: u16 },
    #[error("in-flight queue size {0} (must be a power of two <= {1})")]
    BadQueueSize(u16, u16),
    #[error("in-flight region of {have:#x} bytes, {need:#x} needed for {num_queues} queues of {queue_size}")]
    TooSmall {
        have: u64,
        need: u64,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("in-flight region: {0}")]
    Map(#[from] MapError),
    #[error("cannot allocate the in-flight region: {0}")]
    Alloc(std::io::Error),
    #[error("queue {queue}: in-flight region version {version} is not supported (only {INFLIGHT_VERSION})")]
    Version { queue: u16, version: u16 },
    #[error(
        "queue {queue}: in-flight region holds {desc_num} descriptors, the queue has {queue_size}"
    )]
    DescNum {
        queue: u16,
        desc_num: u16,
        queue_size: u16,
    },
    #[error("queue {queue}: head {head} out of range (queue size {size})")]
    BadHead { queue: u16, head: u16, size: u16 },
    #[error("queue {queue}: in-flight region not initialized")]
    Uninitialized { queue: u16 },
    #[error("queue {queue}: in-flight region is corrupt: {what} (entry {entry})")]
    Corrupt {
        queue: u16,
        what: &'static str,
        entry: u16,
    },
    #[error(
        "queue {queue}: a chain of {descs} descriptors for the in-flight region (1 to {size})"
    )]
    ChainLength { queue: u16, descs: usize, size: u16 },
    #[error("queue {queue}: in-flight region has no free entry left")]
    NoFreeEntry { queue: u16 },
    #[error("queue {queue}: in-flight entry {entry} is not in flight")]
    NotInFlight { queue: u16, entry: u16 },
    #[error("queue {queue}: cannot read the guest ring at position {position} to finish an interrupted completion")]
    GuestRingUnreadable { queue: u16, position: u16 },
}

/// Which layout a region has: the one of the rings negotiated when the
/// VMM asked for it (DPDK: `vq_is_packed(dev)` in GET/SET_INFLIGHT_FD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Split,
    Packed,
}

impl Layout {
    /// Bytes of one queue's region.
    pub fn queue_region_size(self, queue_size: u16) -> u64 {
        match self {
            Layout::Split => queue_region_size(queue_size),
            Layout::Packed => packed_queue_region_size(queue_size),
        }
    }
}

/// Bytes of one queue's region in the split layout.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = (HEADER + DESC * usize::from(queue_size)) as u64;
    raw.div_ceil(ALIGN) * ALIGN
}

/// The mapped in-flight buffer of all queues.
#[derive(Debug)]
pub struct InflightRegion {
    map: SharedMapping,
    num_queues: u16,
    queue_size: u16,
    stride: usize,
    layout: Layout,
}

fn check_geometry(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_size: u16,
) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > max_queues {
        return Err(InflightError::TooManyQueues {
            num_queues,
            max: max_queues,
        });
    }
    if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > max_size {
        return Err(InflightError::BadQueueSize(queue_size, max_size));
    }
    Ok(())
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: allocate a zeroed region for the geometry the VMM
    /// asks for. Returns the region, the reply and the fd to send.
    pub fn allocate(
        req: &VhostUserInflight,
        max_queues: u16,
        max_queue_size: u16,
        layout: Layout,
    ) -> Result<(Self, VhostUserInflight, File), InflightError> {
        check_geometry(req.num_queues, req.queue_size, max_queues, max_queue_size)?;
        let size = layout.queue_region_size(req.queue_size) * u64::from(req.num_queues);
        let file = memfd(c"svq-relay-inflight", size).map_err(InflightError::Alloc)?;
        let region = Self::map_checked(&file, size, 0, req.num_queues, req.queue_size, layout)?;
        for q in 0..req.num_queues {
            region.init_queue(q);
        }
        let reply = VhostUserInflight::new(size, 0, req.num_queues, req.queue_size);
        Ok((region, reply, file))
    }

    /// SET_INFLIGHT_FD: map a region the VMM kept (from a previous
    /// GET_INFLIGHT_FD, possibly of an earlier daemon instance). Queues whose
    /// region is uninitialized (version 0) are initialized; others must match
    /// the geometry.
    pub fn map(
        req: &VhostUserInflight,
        file: &File,
        max_queues: u16,
        max_queue_size: u16,
        layout: Layout,
    ) -> Result<Self, InflightError> {
        check_geometry(req.num_queues, req.queue_size, max_queues, max_queue_size)?;
        let need = layout.queue_region_size(req.queue_size) * u64::from(req.num_queues);
        if req.mmap_size < need {
            return Err(InflightError::TooSmall {
                have: req.mmap_size,
                need,
                num_queues: req.num_queues,
                queue_size: req.queue_size,
            });
        }
        let region = Self::map_checked(
            file,
            req.mmap_size,
            req.mmap_offset,
            req.num_queues,
            req.queue_size,
            layout,
        )?;
        for q in 0..req.num_queues {
            // Both layouts start with features, version, desc_num.
            let (version, desc_num) = region.header(q);
            match version {
                0 => region.init_queue(q),
                INFLIGHT_VERSION => {
                    if desc_num != req.queue_size {
                        return Err(InflightError::DescNum {
                            queue: q,
                            desc_num,
                            queue_size: req.queue_size,
                        });
                    }
                }
                version => return Err(InflightError::Version { queue: q, version }),
            }
        }
        Ok(region)
    }

    fn init_queue(&self, q: u16) {
        if let Some(r) = self.queue(q) {
            r.init();
        }
        if let Some(r) = self.packed_queue(q) {
            r.init();
        }
    }

    /// Queue `q`'s version and desc_num, whatever the layout.
    fn header(&self, q: u16) -> (u16, u16) {
        match (self.queue(q), self.packed_queue(q)) {
            (Some(r), _) => (r.version(), r.desc_num()),
            (_, Some(r)) => (r.version(), r.desc_num()),
            _ => (0, 0),
        }
    }

    fn map_checked(
        file: &File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
        layout: Layout,
    ) -> Result<Self, InflightError> {
        // 8-byte alignment: the counters are u64 atomics.
        let map = SharedMapping::new(file, offset, size, 1 << 32, 8)?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
            stride: layout.queue_region_size(queue_size) as usize,
            layout,
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The region of queue `q` (split layout).
    pub fn queue(&self, q: u16) -> Option<InflightQueue<'_>> {
        (q < self.num_queues && self.layout == Layout::Split).then(|| InflightQueue {
            map: &self.map,
            base: usize::from(q) * self.stride,
            queue: q,
            size: self.queue_size,
        })
    }

    /// The region of queue `q` (packed layout).
    pub fn packed_queue(&self, q: u16) -> Option<PackedInflightQueue<'_>> {
        (q < self.num_queues && self.layout == Layout::Packed).then(|| PackedInflightQueue {
            io: Window::new(&self.map, usize::from(q) * self.stride),
            queue: q,
            size: self.queue_size,
        })
    }
}

/// One queue's region.
#[derive(Clone, Copy, Debug)]
pub struct InflightQueue<'a> {
    map: &'a SharedMapping,
    base: usize,
    queue: u16,
    size: u16,
}

impl InflightQueue<'_> {
    /// The queue's header fields (offsets inside the region: checked
    /// geometry).
    fn io(&self) -> Window<'_> {
        Window::new(self.map, self.base)
    }
    fn desc_off(&self, head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }
    fn check(&self, head: u16) -> Result<(), InflightError> {
        if head >= self.size {
            return Err(InflightError::BadHead {
                queue: self.queue,
                head,
                size: self.size,
            });
        }
        Ok(())
    }

    pub fn version(&self) -> u16 {
        self.io().r16(OFF_VERSION)
    }

    pub fn desc_num(&self) -> u16 {
        self.io().r16(OFF_DESC_NUM)
    }

    /// The used idx recorded at the last completed batch.
    pub fn used_idx(&self) -> u16 {
        self.io().r16(OFF_USED_IDX)
    }

    /// Fresh region: nothing in flight.
    fn init(&self) {
        if let Some(f) = self.map.u64_at(self.base) {
            f.store(0, Ordering::Relaxed);
        }
        self.io().w16(OFF_DESC_NUM, self.size);
        self.io().w16(OFF_LAST_BATCH, 0);
        self.io().w16(OFF_USED_IDX, 0);
        self.io().w16(OFF_VERSION, INFLIGHT_VERSION);
    }

    pub fn is_in_flight(&self, head: u16) -> bool {
        head < self.size
            && self
                .map
                .u8_at(self.base + self.desc_off(head) + D_INFLIGHT)
                .is_some_and(|a| a.load(Ordering::Acquire) != 0)
    }

    /// The device took `head` ("receiving available buffers"): record it
    /// with the queue's running `counter` (the caller increments it).
    pub fn mark(&self, head: u16, counter: u64) -> Result<(), InflightError> {
        self.check(head)?;
        let d = self.base + self.desc_off(head);
        if let Some(c) = self.map.u64_at(d + D_COUNTER) {
            c.store(counter, Ordering::Relaxed);
        }
        // Release: a reader that sees inflight=1 sees the counter.
        if let Some(f) = self.map.u8_at(d + D_INFLIGHT) {
            f.store(1, Ordering::Release);
        }
        Ok(())
    }

    /// Before the used entries of a batch are written to the guest: link
    /// every head of the batch into the last-batch list.
    pub fn link_batch(&self, heads: &[u16]) -> Result<(), InflightError> {
        for &h in heads {
            self.check(h)?;
        }
        for &h in heads {
            let last = self.io().r16(OFF_LAST_BATCH);
            self.io().w16(self.desc_off(h) + D_NEXT, last);
            self.io().w16(OFF_LAST_BATCH, h);
        }
        Ok(())
    }

    /// After the guest used idx became `used_idx`: the batch is no longer in
    /// flight.
    pub fn commit_batch(&self, heads: &[u16], used_idx: u16) -> Result<(), InflightError> {
        for &h in heads {
            self.check(h)?;
        }
        for &h in heads {
            if let Some(f) = self.map.u8_at(self.base + self.desc_off(h) + D_INFLIGHT) {
                f.store(0, Ordering::Release);
            }
        }
        self.io().w16(OFF_USED_IDX, used_idx);
        Ok(())
    }

    /// Heads in flight, oldest (lowest counter) first.
    pub fn resubmit_list(&self) -> Vec<u16> {
        let mut v: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.is_in_flight(h))
            .map(|h| {
                let c = self
                    .map
                    .u64_at(self.base + self.desc_off(h) + D_COUNTER)
                    .map_or(0, |a| a.load(Ordering::Acquire));
                (c, h)
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, h)| h).collect()
    }

    /// Next counter value to use after a restart (one past the largest
    /// in-flight counter).
    pub fn next_counter(&self) -> u64 {
        (0..self.size)
            .filter(|&h| self.is_in_flight(h))
            .filter_map(|h| self.map.u64_at(self.base + self.desc_off(h) + D_COUNTER))
            .map(|a| a.load(Ordering::Acquire).saturating_add(1))
            .max()
            .unwrap_or(0)
    }

    /// Reconnect procedure: `ring_used_idx` is the used idx now in the
    /// guest's used ring. If a batch was written to the guest but not
    /// committed here, its heads are cleared first (walking the last-batch
    /// list, at most `ring_used_idx - used_idx` entries, never more than the
    /// queue size). Returns the heads to resubmit, oldest first.
    pub fn recover(&self, ring_used_idx: u16) -> Result<Vec<u16>, InflightError> {
        match self.version() {
            0 => return Err(InflightError::Uninitialized { queue: self.queue }),
            INFLIGHT_VERSION => {}
            version => {
                return Err(InflightError::Version {
                    queue: self.queue,
                    version,
                })
            }
        }
        let recorded = self.used_idx();
        if recorded != ring_used_idx {
            let batch = ring_used_idx.wrapping_sub(recorded);
            if batch > self.size {
                log::warn!(target: LOG, "queue {}: used idx {ring_used_idx} is {batch} ahead of the recorded {recorded}; \
                    only the last-batch list ({} at most) is cleared", self.queue, self.size);
            }
            let mut head = self.io().r16(OFF_LAST_BATCH);
            for _ in 0..batch.min(self.size) {
                if head >= self.size {
                    log::warn!(target: LOG, "queue {}: last-batch list points at {head}, stopped", self.queue);
                    break;
                }
                if let Some(f) = self.map.u8_at(self.base + self.desc_off(head) + D_INFLIGHT) {
                    f.store(0, Ordering::Release);
                }
                head = self.io().r16(self.desc_off(head) + D_NEXT);
            }
            self.io().w16(OFF_USED_IDX, ring_used_idx);
        }
        Ok(self.resubmit_list())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn req(num_queues: u16, queue_size: u16) -> VhostUserInflight {
        VhostUserInflight::new(0, 0, num_queues, queue_size)
    }

    #[test]
    fn region_sizes() {
        assert_eq!(queue_region_size(256), 4160); // 16 + 4096, rounded to 64
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(32768), 16 + 16 * 32768 + 48);
    }

    #[test]
    fn allocation_and_layout() {
        let (r, reply, file) =
            InflightRegion::allocate(&req(2, 8), 4, 1024, Layout::Split).unwrap();
        assert_eq!(reply.mmap_size, 2 * queue_region_size(8));
        assert_eq!(reply.mmap_offset, 0);
        assert_eq!((reply.num_queues, reply.queue_size), (2, 8));
        assert_eq!(file.metadata().unwrap().len(), reply.mmap_size);
        let q1 = r.queue(1).unwrap();
        assert!(r.queue(2).is_none());
        q1.mark(5, 0x0102_0304_0506_0708).unwrap();
        q1.link_batch(&[5]).unwrap();
        let stride = queue_region_size(8);
        let mut hdr = [0u8; 16];
        file.read_exact_at(&mut hdr, stride).unwrap();
        // features 0, version 1, desc_num 8, last_batch_head 5, used_idx 0
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 8, 0, 5, 0, 0, 0]);
        let mut d = [0u8; 16];
        file.read_exact_at(&mut d, stride + 16 + 5 * 16).unwrap();
        assert_eq!(d, [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        // Queue 0 untouched apart from its header.
        let mut q0 = vec![0u8; 16 * 8];
        file.read_exact_at(&mut q0, 16).unwrap();
        assert!(q0.iter().all(|&b| b == 0));
    }

    #[test]
    fn geometry_is_checked() {
        for (nq, qs, want) in [
            (0, 8, "for 0 queues"),
            (5, 8, "for 5 queues: the device has 4"),
            (1, 0, "queue size 0"),
            (1, 12, "queue size 12"),
            (1, 2048, "queue size 2048"),
        ] {
            let e = match InflightRegion::allocate(&req(nq, qs), 4, 1024, Layout::Split) {
                Ok(_) => panic!("{nq} queues of {qs} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want), "{e}");
        }
        let (_r, reply, file) =
            InflightRegion::allocate(&req(2, 8), 4, 1024, Layout::Split).unwrap();
        let mut short = reply;
        short.mmap_size -= 1;
        let e = InflightRegion::map(&short, &file, 4, 1024, Layout::Split)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needed for 2 queues of 8"), "{e}");
        let mut beyond = reply;
        beyond.mmap_offset = 64;
        let e = InflightRegion::map(&beyond, &file, 4, 1024, Layout::Split)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file holds"), "{e}");
        let mut wrong = reply;
        wrong.queue_size = 4; // smaller geometry fits but desc_num disagrees
        let e = InflightRegion::map(&wrong, &file, 4, 1024, Layout::Split)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds 8 descriptors, the queue has 4"), "{e}");
        let e = r_bad_head(&file, reply);
        assert!(e.contains("head 8 out of range"), "{e}");
    }

    fn r_bad_head(file: &File, reply: VhostUserInflight) -> String {
        let r = InflightRegion::map(&reply, file, 4, 1024, Layout::Split).unwrap();
        let q = r.queue(0).unwrap();
        assert!(!q.is_in_flight(8));
        q.mark(8, 0).unwrap_err().to_string()
    }

    #[test]
    fn unknown_version_is_refused() {
        let (_r, reply, file) =
            InflightRegion::allocate(&req(1, 8), 4, 1024, Layout::Split).unwrap();
        file.write_all_at(&7u16.to_le_bytes(), 8).unwrap();
        let e = InflightRegion::map(&reply, &file, 4, 1024, Layout::Split)
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 7 is not supported"), "{e}");
    }

    #[test]
    fn uninitialized_region_from_the_vmm_is_initialized() {
        let file = memfd(c"t", 2 * queue_region_size(16)).unwrap();
        let msg = VhostUserInflight::new(2 * queue_region_size(16), 0, 2, 16);
        let r = InflightRegion::map(&msg, &file, 2, 256, Layout::Split).unwrap();
        let q = r.queue(1).unwrap();
        assert_eq!((q.version(), q.desc_num()), (1, 16));
        assert_eq!(q.recover(0).unwrap(), Vec::<u16>::new());
    }

    #[test]
    fn resubmit_in_counter_order_after_restart() {
        let (r, reply, file) =
            InflightRegion::allocate(&req(1, 16), 1, 256, Layout::Split).unwrap();
        let q = r.queue(0).unwrap();
        for (head, counter) in [(7, 3), (2, 1), (9, 2), (4, 4)] {
            q.mark(head, counter).unwrap();
        }
        // Head 4 completed normally (used idx 0 -> 1).
        q.link_batch(&[4]).unwrap();
        q.commit_batch(&[4], 1).unwrap();
        assert_eq!(q.resubmit_list(), vec![2, 9, 7]);
        drop(r);
        // "Restart": a new daemon maps the same memory.
        let r2 = InflightRegion::map(&reply, &file, 1, 256, Layout::Split).unwrap();
        let q2 = r2.queue(0).unwrap();
        assert_eq!(q2.recover(1).unwrap(), vec![2, 9, 7]);
        assert_eq!(q2.next_counter(), 4);
    }

    #[test]
    fn an_uncommitted_batch_is_cleared_on_recovery() {
        let (r, _reply, _file) =
            InflightRegion::allocate(&req(1, 8), 1, 256, Layout::Split).unwrap();
        let q = r.queue(0).unwrap();
        for (i, head) in [1u16, 2, 3, 6].into_iter().enumerate() {
            q.mark(head, i as u64).unwrap();
        }
        // Batch {1, 3} linked and written to the guest (used idx 0 -> 2),
        // then the daemon died before commit_batch.
        q.link_batch(&[1, 3]).unwrap();
        assert_eq!(q.used_idx(), 0);
        assert_eq!(q.recover(2).unwrap(), vec![2, 6]);
        assert_eq!(q.used_idx(), 2);
        // Recovering again changes nothing.
        assert_eq!(q.recover(2).unwrap(), vec![2, 6]);
    }

    #[test]
    fn a_corrupt_batch_list_cannot_loop_or_escape() {
        let (r, _reply, file) =
            InflightRegion::allocate(&req(1, 8), 1, 256, Layout::Split).unwrap();
        let q = r.queue(0).unwrap();
        q.mark(1, 0).unwrap();
        q.mark(2, 1).unwrap();
        // last_batch_head = 1, desc[1].next = 1 (a loop); ring idx far ahead.
        file.write_all_at(&1u16.to_le_bytes(), 12).unwrap();
        file.write_all_at(&1u16.to_le_bytes(), 16 + 16 + 6).unwrap();
        assert_eq!(q.recover(40000).unwrap(), vec![2]);
        // A list pointing outside the queue stops at once.
        q.mark(1, 5).unwrap();
        file.write_all_at(&300u16.to_le_bytes(), 12).unwrap();
        assert_eq!(q.recover(40005).unwrap(), vec![2, 1]);
    }

    proptest::proptest! {
        /// Whatever a crashed daemon or a hostile VMM left in the region,
        /// mapping and recovery never panic and only report heads that are
        /// in range, each once.
        #[test]
        fn arbitrary_region_contents(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 2 * 192),
            ring_used in proptest::prelude::any::<u16>(),
            valid_header in proptest::prelude::any::<bool>(),
        ) {
            let mut bytes = bytes;
            if valid_header {
                // Version 1, desc_num 8: the queue contents get exercised.
                for base in [0, 192] {
                    bytes[base + 8..base + 12].copy_from_slice(&[1, 0, 8, 0]);
                }
            }
            let file = memfd(c"t", bytes.len() as u64).unwrap();
            file.write_all_at(&bytes, 0).unwrap();
            let msg = VhostUserInflight::new(bytes.len() as u64, 0, 2, 8);
            let mapped = InflightRegion::map(&msg, &file, 2, 256, Layout::Split);
            proptest::prop_assert!(mapped.is_ok() || !valid_header);
            if let Ok(r) = mapped {
                for q in 0..2 {
                    let q = r.queue(q).unwrap();
                    let heads = q.recover(ring_used).unwrap();
                    let mut sorted = heads.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    proptest::prop_assert_eq!(sorted.len(), heads.len());
                    proptest::prop_assert!(heads.iter().all(|&h| h < 8));
                    proptest::prop_assert_eq!(q.used_idx(), ring_used);
                }
            }
        }
    }
}
