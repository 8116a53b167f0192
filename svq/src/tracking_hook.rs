//! The in-flight hook: the SVQ reports which guest heads it took and gave
//! back, so the daemon can keep the vhost-user INFLIGHT_SHMFD region (QEMU
//! vhost-user.rst, "Inflight I/O tracking", split rings) and a restarted
//! VMM or daemon resubmits exactly what was in flight.

/// Receives the life of each guest head between pop and completion.
pub trait InflightLog: Send {
    /// `head` was popped from the guest avail ring (or resubmitted) and is
    /// about to be relayed: from now on it is in flight.
    fn popped(&self, head: u16);
    /// `head`'s used entry is about to be written to the guest used ring
    /// (the region links it into the last batch first, so a crash between
    /// the used-idx store and `completed` is recoverable).
    fn completing(&self, head: u16);
    /// The guest used idx now covers `head` and is `used_idx`.
    fn completed(&self, head: u16, used_idx: u16);
    /// `head` went back to the guest avail ring (stop rewound over it): not
    /// in flight any more, and not completed.
    fn returned(&self, head: u16);
}
