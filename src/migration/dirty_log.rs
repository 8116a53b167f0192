//! The vhost-user dirty log (LOG_SHMFD / SET_LOG_BASE): a bitmap in memory
//! shared with the VMM, one bit per 4 KiB guest page (bit `p % 8` of byte
//! `p / 8`, the layout QEMU reads as little-endian u64 words), set with atomic
//! OR because the VMM clears words concurrently while it syncs.
//!
//! [`SharedDirtyLog`] is the swappable handle: the VMM replaces the log with
//! every SET_LOG_BASE and nothing may be written to the old one once the
//! reply is sent. Writers (the per-pair workers) mark only through a short
//! [`DirtyLogReader::pin`]; [`SharedDirtyLog::swap`] installs the new bitmap
//! and waits until no pin that could still hold the old one is left.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::mapping::{MapError, SharedMapping};

const LOG: &str = "dirty-log";

/// Guest page size of the vhost-user log (VHOST_LOG_PAGE).
pub const LOG_PAGE_SIZE: u64 = 4096;

/// Largest log accepted: 4 GiB of bitmap covers 128 TiB of guest memory.
pub const MAX_LOG_SIZE: u64 = 1 << 32;

/// How long a swap waits for writers still using the old log. Writers pin
/// only around one bounded batch of ring work, so hitting this is a bug.
pub const SWAP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("dirty log: {0}")]
    Map(#[from] MapError),
    #[error("dirty log swap: {0} writer(s) still used the old log after {SWAP_TIMEOUT:?}")]
    SwapTimeout(usize),
}

/// One mapped dirty log.
#[derive(Debug)]
pub struct DirtyBitmap {
    map: SharedMapping,
    /// Pages the log covers (8 per byte).
    pages: u64,
    /// Pages marked beyond the end of the log (never written).
    out_of_range: AtomicU64,
    warned: AtomicBool,
}

impl DirtyBitmap {
    /// Map the log the VMM sent with SET_LOG_BASE (`VhostUserLog { mmap_size,
    /// mmap_offset }` and its fd).
    pub fn map(file: &File, mmap_size: u64, mmap_offset: u64) -> Result<Self, DirtyLogError> {
        let map = SharedMapping::new(file, mmap_offset, mmap_size, MAX_LOG_SIZE, 1)?;
        Ok(DirtyBitmap {
            pages: mmap_size * 8,
            map,
            out_of_range: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        })
    }

    /// Number of pages the log covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Size in bytes of the log.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Pages that were marked beyond the end of the log.
    pub fn out_of_range(&self) -> u64 {
        self.out_of_range.load(Ordering::Relaxed)
    }

    /// Mark every page of `[gpa, gpa + len)`.
    pub fn mark_range(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        self.mark_pages(first, last);
    }

    /// Mark pages `first..=last`; pages beyond the log are counted.
    fn mark_pages(&self, first: u64, last: u64) {
        if last >= self.pages {
            let outside = last - first.max(self.pages) + 1;
            self.out_of_range.fetch_add(outside, Ordering::Relaxed);
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!(target: LOG, "page {last:#x} is beyond the dirty log ({} pages); \
                    such pages are counted, not logged", self.pages);
            }
            if first >= self.pages {
                return;
            }
        }
        let last = last.min(self.pages - 1);
        let (fb, lb) = (first / 8, last / 8);
        for byte in fb..=lb {
            let lo = if byte == fb { first % 8 } else { 0 };
            let hi = if byte == lb { last % 8 } else { 7 };
            // Bits lo..=hi.
            let mask = ((0xffu16 << lo) & (0xffu16 >> (7 - hi))) as u8;
            // In range: byte <= (pages - 1) / 8 < map.len().
            if let Some(b) = self.map.u8_at(byte as usize) {
                // Release: whoever sees the bit sees the guest data written
                // before it (the device's writes precede the used entry we
                // are logging).
                b.fetch_or(mask, Ordering::Release);
            }
        }
    }

    /// Whether page `page` is marked.
    pub fn is_dirty(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        self.map
            .u8_at((page / 8) as usize)
            .is_some_and(|b| b.load(Ordering::Acquire) & (1 << (page % 8)) != 0)
    }

    /// All marked pages, ascending (diagnostics and tests; O(log size)).
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..self.map.len() {
            let v = self.map.u8_at(i).map_or(0, |b| b.load(Ordering::Acquire));
            for bit in 0..8 {
                if v & (1 << bit) != 0 {
                    out.push(i as u64 * 8 + bit);
                }
            }
        }
        out
    }
}

impl svq::DirtyLog for DirtyBitmap {
    fn mark(&self, gpa: u64, len: u64) {
        self.mark_range(gpa, len);
    }
}

/// What readers share with the swapper.
#[derive(Debug, Default)]
struct Shared {
    current: Mutex<Option<Arc<DirtyBitmap>>>,
    /// Bumped by every swap (under `current`'s lock).
    generation: AtomicU64,
    readers: Mutex<Vec<Weak<ReaderSlot>>>,
}

/// What a swap needs to know about one reader.
#[derive(Debug, Default)]
struct ReaderSlot {
    /// Inside a pin.
    active: AtomicBool,
    /// Generation of the log the current pin uses.
    seen: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device's dirty log, replaced by SET_LOG_BASE and cleared when logging
/// stops. Cheap to clone (all clones are the same log).
#[derive(Clone, Debug, Default)]
pub struct SharedDirtyLog {
    inner: Arc<Shared>,
}

impl SharedDirtyLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle for one writer thread (one per worker, one for the control
    /// thread if it marks pages itself).
    pub fn reader(&self) -> DirtyLogReader {
        let slot = Arc::new(ReaderSlot::default());
        let mut readers = lock(&self.inner.readers);
        readers.retain(|w| w.strong_count() > 0);
        readers.push(Arc::downgrade(&slot));
        DirtyLogReader {
            shared: self.inner.clone(),
            slot,
            cached: None,
            cached_gen: 0,
        }
    }

    /// The log in use now.
    pub fn current(&self) -> Option<Arc<DirtyBitmap>> {
        lock(&self.inner.current).clone()
    }

    /// Install `new` (None: stop logging). When this returns Ok, no reader
    /// writes the previous log any more; it is returned so the caller decides
    /// when it is unmapped. On timeout the new log is installed all the same
    /// (readers move to it at their next pin) and the caller must report
    /// failure: a late write to the old log cannot be excluded.
    pub fn swap(
        &self,
        new: Option<Arc<DirtyBitmap>>,
    ) -> Result<Option<Arc<DirtyBitmap>>, DirtyLogError> {
        self.swap_timeout(new, SWAP_TIMEOUT)
    }

    pub fn swap_timeout(
        &self,
        new: Option<Arc<DirtyBitmap>>,
        timeout: Duration,
    ) -> Result<Option<Arc<DirtyBitmap>>, DirtyLogError> {
        let (old, gen) = {
            let mut cur = lock(&self.inner.current);
            let old = std::mem::replace(&mut *cur, new);
            let gen = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
            (old, gen)
        };
        let slots: Vec<Arc<ReaderSlot>> = lock(&self.inner.readers)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        // Dekker-style with the reader's pin: the reader stores `active` then
        // loads `generation`; we bumped `generation` then load `active`. With
        // SeqCst on all four, either we see it active (and wait), or it sees
        // the new generation (and picks up the new log).
        let deadline = Instant::now() + timeout;
        let busy =
            |s: &ReaderSlot| s.active.load(Ordering::SeqCst) && s.seen.load(Ordering::SeqCst) < gen;
        loop {
            let waiting = slots.iter().filter(|s| busy(s)).count();
            if waiting == 0 {
                return Ok(old);
            }
            if Instant::now() >= deadline {
                log::error!(target: LOG, "{waiting} writer(s) still hold the old dirty log");
                return Err(DirtyLogError::SwapTimeout(waiting));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// One writer's view of the log. Not shared between threads.
#[derive(Debug)]
pub struct DirtyLogReader {
    shared: Arc<Shared>,
    slot: Arc<ReaderSlot>,
    cached: Option<Arc<DirtyBitmap>>,
    cached_gen: u64,
}

impl DirtyLogReader {
    /// Start a marking section. Keep it short (one batch of ring work) and do
    /// not block inside it: a swap waits for it to end.
    pub fn pin(&mut self) -> PinnedLog<'_> {
        self.slot.active.store(true, Ordering::SeqCst);
        let gen = self.shared.generation.load(Ordering::SeqCst);
        if gen != self.cached_gen {
            let cur = lock(&self.shared.current);
            self.cached = cur.clone();
            // Read under the lock: consistent with `cached`, and >= `gen`.
            self.cached_gen = self.shared.generation.load(Ordering::SeqCst);
        }
        self.slot.seen.store(self.cached_gen, Ordering::SeqCst);
        PinnedLog { reader: self }
    }
}

/// A marking section; implements [`svq::DirtyLog`]. Marks go nowhere while
/// no log is installed.
#[derive(Debug)]
pub struct PinnedLog<'a> {
    reader: &'a DirtyLogReader,
}

impl PinnedLog<'_> {
    /// The bitmap marks go to.
    pub fn bitmap(&self) -> Option<&DirtyBitmap> {
        self.reader.cached.as_deref()
    }
}

impl svq::DirtyLog for PinnedLog<'_> {
    fn mark(&self, gpa: u64, len: u64) {
        if let Some(b) = &self.reader.cached {
            b.mark_range(gpa, len);
        }
    }
}

impl Drop for PinnedLog<'_> {
    fn drop(&mut self) {
        self.reader.slot.active.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmem::memfd;
    use std::collections::BTreeSet;
    use svq::DirtyLog;

    fn bitmap(size: u64) -> (File, DirtyBitmap) {
        let f = memfd(c"log", size).unwrap();
        let b = DirtyBitmap::map(&f, size, 0).unwrap();
        (f, b)
    }

    /// Reference: the set of pages a range touches.
    fn model(set: &mut BTreeSet<u64>, gpa: u64, len: u64, pages: u64) {
        if len == 0 {
            return;
        }
        let last = gpa.saturating_add(len - 1) / 4096;
        for p in gpa / 4096..=last.min(pages.saturating_sub(1)) {
            if p < pages {
                set.insert(p);
            }
        }
    }

    #[test]
    fn pages_across_boundaries() {
        let (_f, b) = bitmap(64);
        b.mark(4095, 2); // pages 0 and 1
        b.mark(3 * 4096, 4096); // exactly page 3
        b.mark(5 * 4096 + 10, 3 * 4096); // pages 5..=8
        b.mark(20 * 4096, 0); // nothing
        assert_eq!(b.dirty_pages(), vec![0, 1, 3, 5, 6, 7, 8]);
    }

    #[test]
    fn bit_layout_is_what_the_vmm_reads() {
        let f = memfd(c"log", 16).unwrap();
        let b = DirtyBitmap::map(&f, 16, 0).unwrap();
        b.mark(9 * 4096, 1); // byte 1, bit 1
        b.mark(63 * 4096, 1); // byte 7, bit 7
        b.mark(64 * 4096, 1); // byte 8, bit 0
        let mut bytes = vec![0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut bytes, 0).unwrap();
        let w0 = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
        let w1 = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        assert_eq!(w0, (1 << 9) | (1 << 63));
        assert_eq!(w1, 1);
    }

    #[test]
    fn offset_into_the_file() {
        let f = memfd(c"log", 8192).unwrap();
        let b = DirtyBitmap::map(&f, 8, 4096 + 8).unwrap();
        assert_eq!(b.pages(), 64);
        b.mark(0, 1);
        let mut byte = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, 4104).unwrap();
        assert_eq!(byte[0], 1);
    }

    #[test]
    fn random_ranges_match_the_model() {
        let (_f, b) = bitmap(32); // 256 pages
        let mut set = BTreeSet::new();
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let gpa = x % (300 * 4096);
            let len = (x >> 32) % (5 * 4096);
            b.mark(gpa, len);
            model(&mut set, gpa, len, 256);
        }
        assert_eq!(b.dirty_pages(), set.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn beyond_the_log_is_counted_not_written() {
        let f = memfd(c"log", 8192).unwrap();
        // The log is 2 bytes at offset 0 of a larger file: the bytes after
        // it must stay untouched.
        let b = DirtyBitmap::map(&f, 2, 0).unwrap();
        b.mark(15 * 4096, 3 * 4096); // page 15 in, 16 and 17 out
        b.mark(1 << 40, 4096); // far out
        b.mark(u64::MAX - 10, 100); // saturates, no overflow
        assert_eq!(b.dirty_pages(), vec![15]);
        assert_eq!(b.out_of_range(), 2 + 1 + 1);
        let mut bytes = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut bytes, 0).unwrap();
        assert_eq!(bytes[1], 0x80);
        assert!(bytes[2..].iter().all(|&v| v == 0));
    }

    #[test]
    fn bad_geometry_is_refused() {
        let f = memfd(c"log", 4096).unwrap();
        assert!(DirtyBitmap::map(&f, 0, 0).is_err());
        assert!(DirtyBitmap::map(&f, 4096, 1).is_err());
        assert!(DirtyBitmap::map(&f, MAX_LOG_SIZE + 1, 0).is_err());
        let e = DirtyBitmap::map(&f, 8192, 0).unwrap_err().to_string();
        assert!(e.contains("0x1000") && e.contains("0x2000"), "{e}");
    }

    #[test]
    fn concurrent_marking_from_threads() {
        let (_f, b) = bitmap(128); // 1024 pages
        let b = Arc::new(b);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let b = b.clone();
                // Every thread marks every page of its residue class mod 4
                // (sharing bytes with the others) plus ranges overlapping them.
                std::thread::spawn(move || {
                    for p in (t..1024).step_by(4) {
                        b.mark(p * 4096 + 100, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.dirty_pages(), (0..1024).collect::<Vec<_>>());
    }

    #[test]
    fn no_log_marks_nothing() {
        let shared = SharedDirtyLog::new();
        let mut r = shared.reader();
        let p = r.pin();
        p.mark(0, 4096);
        assert!(p.bitmap().is_none());
    }

    #[test]
    fn after_swap_writes_land_only_in_the_new_log() {
        let shared = SharedDirtyLog::new();
        let (_f1, b1) = bitmap(8);
        let (_f2, b2) = bitmap(8);
        let (b1, b2) = (Arc::new(b1), Arc::new(b2));
        shared.swap(Some(b1.clone())).unwrap();
        let mut r = shared.reader();
        r.pin().mark(0, 1);
        let old = shared.swap(Some(b2.clone())).unwrap();
        assert!(Arc::ptr_eq(&old.unwrap(), &b1));
        r.pin().mark(4096, 1);
        assert_eq!(b1.dirty_pages(), vec![0]);
        assert_eq!(b2.dirty_pages(), vec![1]);
        // Logging off: marks go nowhere.
        shared.swap(None).unwrap();
        r.pin().mark(2 * 4096, 1);
        assert_eq!(b2.dirty_pages(), vec![1]);
    }

    #[test]
    fn swap_waits_for_a_pinned_writer() {
        let shared = SharedDirtyLog::new();
        let (_f1, b1) = bitmap(8);
        let (_f2, b2) = bitmap(8);
        let (b1, b2) = (Arc::new(b1), Arc::new(b2));
        shared.swap(Some(b1.clone())).unwrap();
        let mut r = shared.reader();
        let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            let p = r.pin();
            pinned_tx.send(()).unwrap();
            // Still inside the pin: this write goes to the old log, so the
            // swap must not return before the pin ends.
            go_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            p.mark(5 * 4096, 1);
            drop(p);
            r
        });
        pinned_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // A pinned writer makes a short swap time out...
        assert!(matches!(
            shared.swap_timeout(Some(b2.clone()), Duration::from_millis(1)),
            Err(DirtyLogError::SwapTimeout(1))
        ));
        // ...and a normal one return only once the writer is done.
        let swapper = {
            let shared = shared.clone();
            let b2 = b2.clone();
            std::thread::spawn(move || {
                shared.swap(Some(b2)).unwrap();
            })
        };
        go_tx.send(()).unwrap();
        swapper.join().unwrap();
        // The swap returned: the old log has the pinned write, and the
        // writer's next pin uses the new one.
        assert_eq!(b1.dirty_pages(), vec![5]);
        let mut r = writer.join().unwrap();
        r.pin().mark(6 * 4096, 1);
        assert_eq!(b2.dirty_pages(), vec![6]);
        assert_eq!(b1.dirty_pages(), vec![5]);
    }

    #[test]
    fn swaps_under_concurrent_writers() {
        // Writers mark continuously; each swap installs a fresh log. After a
        // swap returns, the old log must never change again.
        let shared = SharedDirtyLog::new();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                let mut r = shared.reader();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut p = t;
                    while !stop.load(Ordering::Relaxed) {
                        let g = r.pin();
                        g.mark((p % 512) * 4096, 1);
                        drop(g);
                        p += 3;
                    }
                })
            })
            .collect();
        let mut retired: Vec<(File, Arc<DirtyBitmap>, Vec<u64>)> = Vec::new();
        for _ in 0..50 {
            let f = memfd(c"log", 64).unwrap();
            let b = Arc::new(DirtyBitmap::map(&f, 64, 0).unwrap());
            if let Some(old) = shared.swap(Some(b.clone())).unwrap() {
                let snap = old.dirty_pages();
                retired.push((f, old, snap));
            }
        }
        // Give writers time to (wrongly) touch retired logs, then compare.
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        for (_f, old, snap) in &retired {
            assert_eq!(&old.dirty_pages(), snap);
        }
    }
}
