//! The in-flight hook: the SVQ reports which guest heads it took and gave
//! back, so the daemon can keep the vhost-user INFLIGHT_SHMFD region (QEMU
//! vhost-user.rst, "Inflight I/O tracking") and a restarted VMM or daemon
//! resubmits exactly what was in flight.
//!
//! On a split ring a head names its chain: the descriptor table keeps the
//! chain while it is in flight, so the region records heads only. On a
//! packed ring the device writes used descriptors over the slots of chains
//! still in flight (completions in another order than the chains' own), so
//! the region keeps a copy of each chain's ring descriptors
//! ([`InflightLog::popped_packed`]); a resubmission walks those copies
//! ([`Svq::resubmit_packed`](crate::Svq::resubmit_packed)).

/// A packed-ring descriptor as the guest wrote it (virtio 1.2, 2.8.13):
/// what the in-flight region keeps of a chain in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

/// Receives the life of each guest chain between pop and completion. A
/// chain is named by what its used entry names: a split ring's head, a
/// packed ring's buffer id.
pub trait InflightLog: Send {
    /// `head` was popped from the guest avail ring (or resubmitted) and is
    /// about to be relayed: from now on it is in flight.
    fn popped(&self, head: u16);
    /// A packed ring's chain `id` was popped (or resubmitted, then `descs`
    /// are the copies it was resubmitted from): `descs` are its ring
    /// descriptors in ring order (an indirect chain's one descriptor names
    /// the table, which the guest keeps). Logs that track packed rings
    /// keep them; the default forgets them.
    fn popped_packed(&self, id: u16, descs: &[RingDesc]) {
        let _ = descs;
        self.popped(id);
    }
    /// `head`'s used entry is about to be written to the guest used ring
    /// (the region links it into the last batch first, so a crash between
    /// the used-idx store and `completed` is recoverable).
    fn completing(&self, head: u16);
    /// The guest used idx (a packed ring's used position, `position |
    /// wrap_counter << 15`) now covers `head` and is `used_idx`.
    fn completed(&self, head: u16, used_idx: u16);
    /// `head` went back to the guest avail ring (stop rewound over it): not
    /// in flight any more, and not completed.
    fn returned(&self, head: u16);
}
