//! One worker thread per queue pair: it exclusively owns the shadow
//! virtqueues of its two queues while they are shadowed, so the data path takes
//! no lock. The control thread talks to it through a channel plus an eventfd
//! that wakes its epoll loop, and waits for an acknowledgement of every
//! request: when `attach`/`detach` return, the worker has applied them.

use std::os::unix::io::AsRawFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use iova::IovaTree;
use svq::{ShadowVirtqueue, SvqError};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::migration::dirty_log::{DirtyLogReader, SharedDirtyLog};
use crate::stats::QueueStats;

const LOG: &str = "worker";

/// How long the control thread waits for a worker to acknowledge a request.
/// A worker only does bounded work between epoll waits, so hitting this means
/// a bug; the caller gets an error instead of hanging.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start worker thread: {0}")]
    Spawn(std::io::Error),
    #[error("worker for queue pair {0} is gone")]
    Gone(usize),
    #[error("worker for queue pair {0} did not answer within {ACK_TIMEOUT:?}")]
    Timeout(usize),
    #[error("worker for queue pair {pair}: {why}")]
    Refused { pair: usize, why: String },
}

/// Everything a worker needs to relay one queue.
pub struct Attach {
    pub queue: usize,
    pub svq: Box<ShadowVirtqueue>,
    /// The VMM's eventfds for this queue.
    pub guest_kick: Arc<EventFd>,
    pub guest_call: Option<Arc<EventFd>>,
    /// The daemon's own eventfds, handed to the device.
    pub dev_kick: Arc<EventFd>,
    pub dev_call: Arc<EventFd>,
    pub mem: Arc<GuestMemoryMmap>,
    pub tree: Arc<IovaTree>,
    pub stats: Arc<QueueStats>,
}

enum Request {
    Attach(Box<Attach>),
    Detach(usize),
    Memory(Arc<GuestMemoryMmap>, Arc<IovaTree>),
    GuestCall(usize, Option<Arc<EventFd>>),
    Exit,
}

enum Reply {
    Done,
    Detached(Box<ShadowVirtqueue>),
    Failed(String),
}

/// A request sent to a worker and not yet answered.
pub struct PendingReply {
    pair: usize,
    rx: Receiver<Reply>,
}

impl PendingReply {
    /// Wait (bounded by [`ACK_TIMEOUT`]) for the worker to apply it.
    pub fn wait(self) -> Result<(), WorkerError> {
        self.wait_reply().map(|_| ())
    }

    fn wait_reply(self) -> Result<Reply, WorkerError> {
        match self.rx.recv_timeout(ACK_TIMEOUT) {
            Ok(Reply::Failed(why)) => Err(WorkerError::Refused {
                pair: self.pair,
                why,
            }),
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(WorkerError::Timeout(self.pair)),
            Err(RecvTimeoutError::Disconnected) => Err(WorkerError::Gone(self.pair)),
        }
    }
}

/// The control thread's end of a worker.
pub struct WorkerHandle {
    pair: usize,
    tx: Sender<(Request, Sender<Reply>)>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// A worker whose marks go nowhere (benches, tests).
    pub fn spawn(pair: usize) -> Result<Self, WorkerError> {
        Self::spawn_logged(pair, SharedDirtyLog::new().reader())
    }

    /// `log`: this worker's handle on the device's dirty log; it marks every
    /// guest page its SVQs (and the device through them) write.
    pub fn spawn_logged(pair: usize, log: DirtyLogReader) -> Result<Self, WorkerError> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Spawn)?);
        let epoll = Epoll::new().map_err(WorkerError::Spawn)?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_WAKE),
            )
            .map_err(WorkerError::Spawn)?;
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            pair,
            epoll,
            wake: wake.clone(),
            rx,
            slots: [None, None],
            log,
        };
        let thread = std::thread::Builder::new()
            .name(format!("svq-pair{pair}"))
            .spawn(move || worker.run())
            .map_err(WorkerError::Spawn)?;
        Ok(WorkerHandle {
            pair,
            tx,
            wake,
            thread: Some(thread),
        })
    }

    fn request(&self, req: Request) -> Result<Reply, WorkerError> {
        self.send_request(req)?.wait_reply()
    }

    fn send_request(&self, req: Request) -> Result<PendingReply, WorkerError> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .send((req, rtx))
            .map_err(|_| WorkerError::Gone(self.pair))?;
        self.wake
            .write(1)
            .map_err(|_| WorkerError::Gone(self.pair))?;
        Ok(PendingReply {
            pair: self.pair,
            rx: rrx,
        })
    }

    /// Hand a queue to the worker; it relays from the moment this returns.
    pub fn attach(&self, a: Attach) -> Result<(), WorkerError> {
        self.attach_begin(a)?.wait()
    }

    /// `attach` in two steps, so a mode switch hands every queue to its
    /// worker before waiting for the first answer (the workers apply them
    /// in parallel; the switch blackout does not add one thread round trip
    /// per queue).
    pub fn attach_begin(&self, a: Attach) -> Result<PendingReply, WorkerError> {
        self.send_request(Request::Attach(Box::new(a)))
    }

    /// Take a queue back: the worker stops polling its eventfds and returns
    /// the SVQ, untouched since its last event.
    pub fn detach(&self, queue: usize) -> Result<Box<ShadowVirtqueue>, WorkerError> {
        match self.request(Request::Detach(queue))? {
            Reply::Detached(svq) => Ok(svq),
            _ => Err(WorkerError::Refused {
                pair: self.pair,
                why: format!("queue {queue} is not attached"),
            }),
        }
    }

    /// New guest memory / IOVA tree snapshot for all attached queues.
    pub fn update_memory(
        &self,
        mem: Arc<GuestMemoryMmap>,
        tree: Arc<IovaTree>,
    ) -> Result<(), WorkerError> {
        self.request(Request::Memory(mem, tree)).map(|_| ())
    }

    /// The VMM replaced the call eventfd of an attached queue.
    pub fn set_guest_call(
        &self,
        queue: usize,
        call: Option<Arc<EventFd>>,
    ) -> Result<(), WorkerError> {
        self.request(Request::GuestCall(queue, call)).map(|_| ())
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let (rtx, _rrx) = mpsc::channel();
        if self.tx.send((Request::Exit, rtx)).is_ok() && self.wake.write(1).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

const TOKEN_WAKE: u64 = u64::MAX;

/// Epoll data of a queue's event: slot * 2 + (0 = guest kick, 1 = device call).
fn token(slot: usize, device: bool) -> u64 {
    (slot as u64) * 2 + u64::from(device)
}

struct Slot {
    a: Attach,
    /// The SVQ failed: its eventfds are out of the epoll set, the queue is
    /// stopped until the control thread takes it back.
    broken: bool,
}

struct Worker {
    pair: usize,
    epoll: Epoll,
    wake: Arc<EventFd>,
    rx: Receiver<(Request, Sender<Reply>)>,
    slots: [Option<Slot>; 2],
    /// Pinned only around one SVQ call (never across epoll_wait), so a log
    /// swap never waits for an idle worker.
    log: DirtyLogReader,
}

impl Worker {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!(target: LOG, "pair {}: epoll_wait failed: {e}; worker stops", self.pair);
                    return;
                }
            };
            for ev in events.iter().take(n) {
                let data = ev.data();
                if data == TOKEN_WAKE {
                    let _ = self.wake.read();
                    if !self.handle_requests() {
                        return;
                    }
                } else {
                    let slot = (data / 2) as usize;
                    self.handle_queue_event(slot, data % 2 == 1);
                }
            }
        }
    }

    /// Returns false when asked to exit.
    fn handle_requests(&mut self) -> bool {
        while let Ok((req, reply)) = self.rx.try_recv() {
            let r = match req {
                Request::Exit => {
                    let _ = reply.send(Reply::Done);
                    return false;
                }
                Request::Attach(a) => {
                    let slot = a.queue % 2;
                    let r = self.attach(*a);
                    if matches!(r, Reply::Done) {
                        // Answer first: looking at the ring is data-path
                        // work and needs not lengthen a switch blackout.
                        let _ = reply.send(r);
                        // The guest may have made buffers available (and
                        // its kick been consumed by the device) before the
                        // switch: look at the ring once now.
                        self.guest_kick(slot);
                        continue;
                    }
                    r
                }
                Request::Detach(q) => self.detach(q),
                Request::Memory(mem, tree) => {
                    for s in self.slots.iter_mut().flatten() {
                        s.a.mem = mem.clone();
                        s.a.tree = tree.clone();
                    }
                    Reply::Done
                }
                Request::GuestCall(q, call) => match self.slots.get_mut(q % 2) {
                    Some(Some(s)) if s.a.queue == q => {
                        s.a.guest_call = call;
                        Reply::Done
                    }
                    _ => Reply::Failed(format!("queue {q} is not attached")),
                },
            };
            // The control thread may have timed out and gone; nothing to do then.
            let _ = reply.send(r);
        }
        true
    }

    fn attach(&mut self, a: Attach) -> Reply {
        let slot = a.queue % 2;
        if a.queue / 2 != self.pair || self.slots[slot].is_some() {
            return Reply::Failed(format!("queue {} cannot be attached here", a.queue));
        }
        for (fd, device) in [
            (a.guest_kick.as_raw_fd(), false),
            (a.dev_call.as_raw_fd(), true),
        ] {
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token(slot, device)),
            ) {
                self.unwatch(&a);
                return Reply::Failed(format!("epoll add: {e}"));
            }
        }
        a.stats.begin_svq();
        self.slots[slot] = Some(Slot { a, broken: false });
        Reply::Done
    }

    fn unwatch(&self, a: &Attach) {
        // Removing an fd that is not registered fails harmlessly.
        for fd in [a.guest_kick.as_raw_fd(), a.dev_call.as_raw_fd()] {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn detach(&mut self, queue: usize) -> Reply {
        let slot = queue % 2;
        match self.slots[slot].take() {
            Some(s) if s.a.queue == queue => {
                self.unwatch(&s.a);
                s.a.stats.publish(&s.a.svq.stats());
                Reply::Detached(s.a.svq)
            }
            other => {
                self.slots[slot] = other;
                Reply::Failed(format!("queue {queue} is not attached"))
            }
        }
    }

    fn handle_queue_event(&mut self, slot: usize, device: bool) {
        if device {
            if let Some(Some(s)) = self.slots.get(slot) {
                let _ = s.a.dev_call.read();
            }
            self.device_call(slot);
        } else {
            if let Some(Some(s)) = self.slots.get(slot) {
                // Non-blocking (set when the VMM handed it over).
                let _ = s.a.guest_kick.read();
            }
            self.guest_kick(slot);
        }
    }

    fn guest_kick(&mut self, slot: usize) {
        let Worker { slots, log, .. } = self;
        let Some(Some(s)) = slots.get_mut(slot) else {
            return;
        };
        if s.broken {
            return;
        }
        // Under EVENT_IDX the SVQ writes avail_event into guest memory.
        let res = {
            let pinned = log.pin();
            s.a.svq
                .handle_guest_kick_logged(&s.a.mem, &s.a.tree, &pinned)
        };
        match res {
            Ok(kick) => {
                if kick {
                    Self::kick_device(s);
                }
                s.a.stats.publish(&s.a.svq.stats());
            }
            Err(e) => self.fail(slot, e),
        }
    }

    fn device_call(&mut self, slot: usize) {
        let Worker { slots, log, .. } = self;
        let Some(Some(s)) = slots.get_mut(slot) else {
            return;
        };
        if s.broken {
            return;
        }
        let res = {
            let pinned = log.pin();
            s.a.svq.handle_device_call(&s.a.mem, &s.a.tree, &pinned)
        };
        match res {
            Ok(out) => {
                // Counters first: a guest that sees the completion and asks
                // query-shadow-vq right away must find it counted.
                s.a.stats.publish(&s.a.svq.stats());
                if out.notify_guest {
                    if let Some(call) = &s.a.guest_call {
                        if let Err(e) = call.write(1) {
                            log::warn!(target: LOG, "queue {}: cannot signal the guest: {e}", s.a.queue);
                        }
                    }
                }
                if out.kick_device {
                    Self::kick_device(s);
                }
            }
            Err(e) => self.fail(slot, e),
        }
    }

    fn kick_device(s: &Slot) {
        if let Err(e) = s.a.dev_kick.write(1) {
            log::warn!(target: LOG, "queue {}: cannot kick the device: {e}", s.a.queue);
        }
    }

    /// A broken SVQ stops only its own queue.
    fn fail(&mut self, slot: usize, e: SvqError) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        log::error!(target: LOG, "queue {}: shadow virtqueue broken, queue stopped: {e}", s.a.queue);
        s.broken = true;
        let mut st = s.a.svq.stats();
        if st.broken.is_none() {
            st.broken = Some(e.to_string());
            st.errors = st.errors.max(1);
        }
        s.a.stats.publish(&st);
        let fds = [s.a.guest_kick.as_raw_fd(), s.a.dev_call.as_raw_fd()];
        for fd in fds {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iova::AddrSpace;
    use svq::{GuestRing, RingIndexes, SvqConfig};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};

    use crate::memory::tests::region;
    use crate::memory::MemoryTable;

    const VERSION_1: u64 = 1 << 32;

    fn wait_readable(fd: &EventFd) -> bool {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd; bounded timeout so a bug fails the test.
        unsafe { libc::poll(&mut p, 1, 5000) == 1 }
    }

    /// Where the tests' guest ring of 16 lives.
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// 1 MiB of guest memory at GPA 0 mapped at IOVA = GPA, and an SVQ of 16
    /// on the guest ring at DESC/AVAIL/USED whose shadow memory is mapped in
    /// the tree. The SVQ reads no guest memory until it is attached, so the
    /// tests fill the ring afterwards.
    fn svq_fixture() -> (
        Arc<GuestMemoryMmap>,
        IovaTree,
        ShadowVirtqueue,
        Arc<vm_memory::MmapRegion>,
    ) {
        let table = MemoryTable::from_regions(vec![region(0, 0x10_0000, 0x7000_0000)]).unwrap();
        let mem = Arc::new(table.guest_memory());
        let mut tree = IovaTree::new(0, (1 << 40) - 1).unwrap();
        tree.map(AddrSpace::Guest, 0, 0x10_0000).unwrap();
        let svq = ShadowVirtqueue::new(
            SvqConfig {
                queue_size: 16,
                shadow_size: 16,
                guest_features: VERSION_1,
                device_features: VERSION_1,
            },
            GuestRing {
                desc: DESC,
                avail: AVAIL,
                used: USED,
                used_log: USED,
            },
            RingIndexes::default(),
        )
        .unwrap();
        let shadow = svq.shadow_memory();
        tree.map(
            AddrSpace::Host,
            shadow.as_ptr() as u64,
            shadow.size() as u64,
        )
        .unwrap();
        (mem, tree, svq, shadow)
    }

    /// A guest buffer goes guest ring -> worker's SVQ -> shadow ring, the
    /// test plays the device on the shadow ring, and the completion comes
    /// back to the guest used ring with a guest interrupt.
    #[test]
    fn relays_one_buffer_and_detaches() {
        let (mem, tree, svq, shadow) = svq_fixture();
        let hva = shadow.as_ptr() as u64;
        // Guest ring of 16: one 64-byte device-writable buffer at 0x10000.
        let (desc, avail, used) = (DESC, AVAIL, USED);
        mem.write_obj(0x10000u64, GuestAddress(desc)).unwrap();
        mem.write_obj(64u32, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap(); // WRITE
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // ring[0] = head 0
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // idx
        let rings = svq.shadow_ring_hva();

        let w = WorkerHandle::spawn(0).unwrap();
        let ev = || Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (guest_kick, guest_call, dev_kick, dev_call) = (ev(), ev(), ev(), ev());
        let stats = Arc::new(QueueStats::default());
        w.attach(Attach {
            queue: 0,
            svq: Box::new(svq),
            guest_kick: guest_kick.clone(),
            guest_call: Some(guest_call.clone()),
            dev_kick: dev_kick.clone(),
            dev_call: dev_call.clone(),
            mem: mem.clone(),
            tree: Arc::new(tree),
            stats: stats.clone(),
        })
        .unwrap();
        // Attach looked at the ring once: the buffer is on the shadow ring.
        assert!(wait_readable(&dev_kick));

        // The device side, on the shadow ring (addresses are HVAs here).
        let smem = vm_memory::GuestMemoryMmap::from_arc_regions(vec![Arc::new(
            GuestRegionMmap::with_arc(shadow.clone(), GuestAddress(hva)).unwrap(),
        )])
        .unwrap();
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(rings.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(rings.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(rings.used))
            .unwrap();
        q.set_ready(true);
        let chain = q
            .pop_descriptor_chain(&smem)
            .expect("a chain on the shadow ring");
        let head = chain.head_index();
        let descs: Vec<_> = chain.collect();
        assert_eq!(descs.len(), 1);
        // IOVA of guest memory is its GPA (identity mapping).
        assert_eq!((descs[0].addr().0, descs[0].len()), (0x10000, 64));
        assert!(descs[0].is_write_only());
        q.add_used(&smem, head, 60).unwrap();
        dev_call.write(1).unwrap();

        assert!(wait_readable(&guest_call));
        let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        let id: u32 = mem.read_obj(GuestAddress(used + 4)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(used + 8)).unwrap();
        assert_eq!((used_idx, id, len), (1, 0, 60));

        let svq = w.detach(0).unwrap();
        assert_eq!(svq.stats().relayed, 1);
        let s = stats.snapshot();
        assert_eq!(
            (s.relayed, s.avail_idx, s.used_idx, s.in_flight),
            (1, 1, 1, 0)
        );
        // Detached: kicks no longer reach it; a second detach is refused.
        assert!(matches!(w.detach(0), Err(WorkerError::Refused { .. })));
    }

    /// A ring taken over from a polling device in passthrough (DPDK
    /// net_vhost leaves VRING_USED_F_NO_NOTIFY in the guest used flags): a
    /// chain the guest adds after the take-over pass must still reach the
    /// shadow ring, with a driver that kicks only when the flags allow it,
    /// as virtio drivers do. The device never signals here, so nothing but
    /// a guest kick can relay the second chain.
    #[test]
    fn guest_kicks_again_after_taking_over_a_polled_ring() {
        use vm_memory::VolatileMemory;
        let (mem, tree, svq, shadow) = svq_fixture();
        let (desc, avail, used) = (DESC, AVAIL, USED);
        // Two 64-byte device-writable buffers, heads 0 and 1.
        for h in 0..2u64 {
            mem.write_obj(0x10000 + 0x100 * h, GuestAddress(desc + 16 * h))
                .unwrap();
            mem.write_obj(64u32, GuestAddress(desc + 16 * h + 8))
                .unwrap();
            mem.write_obj(2u16, GuestAddress(desc + 16 * h + 12))
                .unwrap(); // WRITE
        }
        // Left by the device in passthrough; head 0 was available before
        // the switch (its kick went to the device).
        mem.write_obj(1u16, GuestAddress(used)).unwrap(); // NO_NOTIFY
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        let avail_off = svq.shadow_ring_hva().avail - shadow.as_ptr() as u64;
        let shadow_avail_idx = || {
            let v: u16 = shadow
                .as_volatile_slice()
                .read_obj(avail_off as usize + 2)
                .unwrap();
            v
        };

        let w = WorkerHandle::spawn(0).unwrap();
        let ev = || Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (guest_kick, dev_kick, dev_call) = (ev(), ev(), ev());
        w.attach(Attach {
            queue: 0,
            svq: Box::new(svq),
            guest_kick: guest_kick.clone(),
            guest_call: None,
            dev_kick: dev_kick.clone(),
            dev_call,
            mem: mem.clone(),
            tree: Arc::new(tree),
            stats: Arc::new(QueueStats::default()),
        })
        .unwrap();
        // The take-over pass relayed head 0.
        assert!(wait_readable(&dev_kick));
        dev_kick.read().unwrap();
        assert_eq!(shadow_avail_idx(), 1);

        // The guest adds head 1 and kicks if the device side asks for it.
        mem.write_obj(1u16, GuestAddress(avail + 6)).unwrap();
        mem.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let flags: u16 = mem.read_obj(GuestAddress(used)).unwrap();
        assert_eq!(flags & 1, 0, "the SVQ does not poll: it must ask for kicks");
        guest_kick.write(1).unwrap();
        assert!(wait_readable(&dev_kick), "head 1 never reached the device");
        assert_eq!(shadow_avail_idx(), 2);
        let _ = w.detach(0).unwrap();
    }
}
