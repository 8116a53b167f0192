//! The dirty-marking hook: the SVQ reports every guest range it or the device
//! wrote; the daemon turns that into bits of the vhost-user log.

/// Receives guest-physical ranges that were written.
pub trait DirtyLog {
    fn mark(&self, gpa: u64, len: u64);
}

/// For when no migration is in progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDirtyLog;

impl DirtyLog for NoDirtyLog {
    fn mark(&self, _gpa: u64, _len: u64) {}
}

impl<F: Fn(u64, u64)> DirtyLog for F {
    fn mark(&self, gpa: u64, len: u64) {
        self(gpa, len)
    }
}
