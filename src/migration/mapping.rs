//! A shared, writable mapping of part of a file the VMM passed us (dirty log,
//! in-flight region). Both processes write it concurrently, so the bytes are
//! only ever touched through atomics, never through `&[u8]`/`&mut [u8]`.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("mapping size is zero")]
    ZeroSize,
    #[error("mapping size {size:#x} exceeds the maximum {max:#x}")]
    TooLarge { size: u64, max: u64 },
    #[error("offset {offset:#x} + size {size:#x} overflows")]
    Overflow { offset: u64, size: u64 },
    #[error("offset {offset:#x} is not {align}-byte aligned")]
    Misaligned { offset: u64, align: u64 },
    #[error("file holds {have:#x} bytes, the mapping needs {need:#x}")]
    FileTooSmall { need: u64, have: u64 },
    #[error("fstat: {0}")]
    Stat(std::io::Error),
    #[error("mmap: {0}")]
    Mmap(std::io::Error),
}

/// `[offset, offset + size)` of a file, mapped shared read/write.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    /// What mmap returned (page aligned) and its length, for munmap.
    base: *mut libc::c_void,
    map_len: usize,
    /// The first byte the caller asked for.
    data: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value until Drop;
// every access goes through atomic types, which are safe to use from any
// thread (and against the other process) concurrently.
unsafe impl Send for SharedMapping {}
// SAFETY: see Send; `&SharedMapping` only hands out atomics.
unsafe impl Sync for SharedMapping {}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

impl SharedMapping {
    /// Map `size` bytes at `offset` of `file`. `align` is the alignment the
    /// caller needs for `offset` (atomics wider than a byte).
    pub fn new(
        file: &File,
        offset: u64,
        size: u64,
        max: u64,
        align: u64,
    ) -> Result<Self, MapError> {
        if size == 0 {
            return Err(MapError::ZeroSize);
        }
        if size > max || size > isize::MAX as u64 / 2 {
            return Err(MapError::TooLarge { size, max });
        }
        let end = offset
            .checked_add(size)
            .ok_or(MapError::Overflow { offset, size })?;
        if align > 1 && !offset.is_multiple_of(align) {
            return Err(MapError::Misaligned { offset, align });
        }
        // A short file would turn accesses past its end into SIGBUS.
        let have = file.metadata().map_err(MapError::Stat)?.len();
        if have < end {
            return Err(MapError::FileTooSmall { need: end, have });
        }
        let page = page_size();
        let map_off = offset - offset % page;
        let lead = offset - map_off;
        let map_len = usize::try_from(lead + size).map_err(|_| MapError::TooLarge { size, max })?;
        let off =
            libc::off_t::try_from(map_off).map_err(|_| MapError::Overflow { offset, size })?;
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL) of a
        // file descriptor that stays open for the call; it aliases no Rust
        // object. The file is at least `end` bytes long (checked above).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MapError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(SharedMapping {
            base,
            map_len,
            // SAFETY: lead < page <= map_len, inside the mapping.
            data: unsafe { (base as *mut u8).add(lead as usize) },
            len: size as usize,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Byte `i`, or None past the end.
    pub fn u8_at(&self, i: usize) -> Option<&AtomicU8> {
        if i >= self.len {
            return None;
        }
        // SAFETY: i < len, inside the live mapping; AtomicU8 has the size and
        // alignment of u8; the reference lives no longer than `self`, which
        // keeps the mapping.
        Some(unsafe { &*(self.data.add(i) as *const AtomicU8) })
    }

    /// The u16 at byte offset `off` (must be 2-aligned and inside).
    pub fn u16_at(&self, off: usize) -> Option<&AtomicU16> {
        if !off.is_multiple_of(2) || off.checked_add(2)? > self.len {
            return None;
        }
        let p = self.data.wrapping_add(off);
        if !(p as usize).is_multiple_of(2) {
            return None;
        }
        // SAFETY: inside the mapping (checked), aligned for AtomicU16
        // (checked), lives no longer than `self`.
        Some(unsafe { &*(p as *const AtomicU16) })
    }

    /// The u32 at byte offset `off` (must be 4-aligned and inside).
    pub fn u32_at(&self, off: usize) -> Option<&AtomicU32> {
        if !off.is_multiple_of(4) || off.checked_add(4)? > self.len {
            return None;
        }
        let p = self.data.wrapping_add(off);
        if !(p as usize).is_multiple_of(4) {
            return None;
        }
        // SAFETY: inside the mapping (checked), aligned for AtomicU32
        // (checked), lives no longer than `self`.
        Some(unsafe { &*(p as *const AtomicU32) })
    }

    /// The u64 at byte offset `off` (must be 8-aligned and inside).
    pub fn u64_at(&self, off: usize) -> Option<&AtomicU64> {
        if off.checked_add(8)? > self.len {
            return None;
        }
        let p = self.data.wrapping_add(off);
        if !(p as usize).is_multiple_of(8) {
            return None;
        }
        // SAFETY: inside the mapping (checked), aligned for AtomicU64
        // (checked), lives no longer than `self`.
        Some(unsafe { &*(p as *const AtomicU64) })
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: base/map_len are exactly what mmap returned; no reference
        // into the mapping outlives `self` (they borrow it).
        unsafe {
            libc::munmap(self.base, self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmem::memfd;
    use std::sync::atomic::Ordering;

    #[test]
    fn refuses_bad_geometry() {
        let f = memfd(c"t", 8192).unwrap();
        assert!(matches!(
            SharedMapping::new(&f, 0, 0, 1 << 20, 1),
            Err(MapError::ZeroSize)
        ));
        assert!(matches!(
            SharedMapping::new(&f, 0, 1 << 21, 1 << 20, 1),
            Err(MapError::TooLarge { .. })
        ));
        assert!(matches!(
            SharedMapping::new(&f, u64::MAX, 2, 1 << 20, 1),
            Err(MapError::Overflow { .. })
        ));
        assert!(matches!(
            SharedMapping::new(&f, 4096, 8192, 1 << 20, 1),
            Err(MapError::FileTooSmall {
                need: 12288,
                have: 8192
            })
        ));
        assert!(matches!(
            SharedMapping::new(&f, 4, 8, 1 << 20, 8),
            Err(MapError::Misaligned { .. })
        ));
    }

    #[test]
    fn unaligned_offset_maps_the_right_bytes() {
        let f = memfd(c"t", 8192).unwrap();
        let whole = SharedMapping::new(&f, 0, 8192, 1 << 20, 1).unwrap();
        let part = SharedMapping::new(&f, 4100, 10, 1 << 20, 1).unwrap();
        part.u8_at(0).unwrap().store(0xab, Ordering::Relaxed);
        part.u8_at(9).unwrap().store(0xcd, Ordering::Relaxed);
        assert!(part.u8_at(10).is_none());
        assert_eq!(whole.u8_at(4100).unwrap().load(Ordering::Relaxed), 0xab);
        assert_eq!(whole.u8_at(4109).unwrap().load(Ordering::Relaxed), 0xcd);
        assert!(whole.u16_at(8191).is_none());
        assert!(whole.u64_at(8188).is_none());
        assert!(whole.u64_at(8184).is_some());
    }
}

/// Part of a mapping read and written at offsets from `base`, for layouts
/// whose every offset was checked against the mapping beforehand (the
/// in-flight region's geometry): an access that fails is a bug, so reads
/// then yield 0 and writes are dropped rather than panicking. Loads
/// acquire, stores release (the other process reads and writes them too).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window<'a> {
    map: &'a SharedMapping,
    base: usize,
}

impl<'a> Window<'a> {
    pub fn new(map: &'a SharedMapping, base: usize) -> Self {
        Window { map, base }
    }

    pub fn r8(&self, off: usize) -> u8 {
        self.map
            .u8_at(self.base + off)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }
    pub fn w8(&self, off: usize, v: u8) {
        if let Some(a) = self.map.u8_at(self.base + off) {
            a.store(v, Ordering::Release);
        }
    }
    pub fn r16(&self, off: usize) -> u16 {
        self.map
            .u16_at(self.base + off)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }
    pub fn w16(&self, off: usize, v: u16) {
        if let Some(a) = self.map.u16_at(self.base + off) {
            a.store(v, Ordering::Release);
        }
    }
    pub fn r32(&self, off: usize) -> u32 {
        self.map
            .u32_at(self.base + off)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }
    pub fn w32(&self, off: usize, v: u32) {
        if let Some(a) = self.map.u32_at(self.base + off) {
            a.store(v, Ordering::Release);
        }
    }
    pub fn r64(&self, off: usize) -> u64 {
        self.map
            .u64_at(self.base + off)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }
    pub fn w64(&self, off: usize, v: u64) {
        if let Some(a) = self.map.u64_at(self.base + off) {
            a.store(v, Ordering::Release);
        }
    }
}
