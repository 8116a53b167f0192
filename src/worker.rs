//! One worker thread per queue pair: it exclusively owns the shadow
//! virtqueues of its two queues while they are shadowed, so the data path takes
//! no lock. The control thread talks to it through a channel plus an eventfd
//! that wakes its epoll loop, and waits for an acknowledgement of every
//! request: when `attach`/`detach` return, the worker has applied them.
//!
//! A worker either sleeps in epoll, woken by guest kicks and device calls,
//! or polls its rings with both notifications suppressed ([`PollMode`]).
//! An adaptive worker polls while traffic flows and goes back to epoll
//! after [`PollConfig::budget`] without work; before it sleeps it asks for
//! notifications again and looks at every ring once more, so nothing that
//! arrived while they were off waits for a kick that will never come.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// How a worker waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PollMode {
    /// Sleep in epoll; every guest kick and device call wakes the worker.
    /// The default: on a machine whose CPUs are all busy (two polling
    /// testpmds on two CPUs, a VM's vCPUs) a woken worker runs at once,
    /// while a polling one waits for a time slice (scripts/bench-dpdk.sh
    /// measures both).
    #[default]
    Off,
    /// Poll after a kick or call until the rings stay idle for the budget,
    /// then sleep (vhost-net's `busyloop_timeout`, per worker). A worker
    /// that finds itself preempted while polling (another thread wanted its
    /// CPU) sleeps at once and stays event driven for a while.
    Adaptive,
    /// Poll whenever a queue is attached (a DPDK lcore: one CPU, always busy).
    Always,
}

/// Default idle time before an adaptive worker sleeps: long enough to cover
/// the gap between bursts of a busy guest, short enough that an idle queue
/// costs no CPU to speak of.
pub const DEFAULT_POLL_BUDGET: Duration = Duration::from_micros(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollConfig {
    pub mode: PollMode,
    /// `Adaptive`: how long the rings must stay idle before the worker
    /// sleeps.
    pub budget: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            mode: PollMode::default(),
            budget: DEFAULT_POLL_BUDGET,
        }
    }
}

/// Per-worker settings, applied by the worker thread itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkerConfig {
    pub poll: PollConfig,
    /// Pin the worker thread to this CPU.
    pub cpu: Option<usize>,
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
    Configure(WorkerConfig),
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
    /// Set with every request: a polling worker looks at this flag instead
    /// of making a syscall per pass on `wake`.
    pending: Arc<AtomicBool>,
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
        let pending = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            pair,
            epoll,
            wake: wake.clone(),
            pending: pending.clone(),
            rx,
            slots: [None, None],
            log,
            poll: PollConfig::default(),
            polling: false,
            backoff_until: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("svq-pair{pair}"))
            .spawn(move || worker.run())
            .map_err(WorkerError::Spawn)?;
        Ok(WorkerHandle {
            pair,
            tx,
            wake,
            pending,
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
        self.pending.store(true, Ordering::Release);
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

    /// Polling mode and CPU placement, applied by the worker thread.
    pub fn configure(&self, cfg: WorkerConfig) -> Result<(), WorkerError> {
        self.request(Request::Configure(cfg)).map(|_| ())
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let (rtx, _rrx) = mpsc::channel();
        if self.tx.send((Request::Exit, rtx)).is_ok() {
            self.pending.store(true, Ordering::Release);
            if self.wake.write(1).is_ok() {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
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
    pending: Arc<AtomicBool>,
    rx: Receiver<(Request, Sender<Reply>)>,
    slots: [Option<Slot>; 2],
    /// Pinned only around one SVQ call or polling pass (never across
    /// epoll_wait), so a log swap never waits for an idle worker.
    log: DirtyLogReader,
    poll: PollConfig,
    /// Notifications of every live queue are suppressed and the worker
    /// scans the rings instead of sleeping.
    polling: bool,
    /// Adaptive: found preempted while polling; event driven until then.
    backoff_until: Option<Instant>,
}

/// Idle passes between two looks at the clock: a pass over idle rings is a
/// few loads, `Instant::now` costs more than that.
const PASSES_PER_CLOCK_READ: u32 = 64;

/// A gap this long between two looks at the clock while polling means the
/// worker was not running: 64 idle passes or one busy one take microseconds,
/// a scheduler time slice given to another thread takes milliseconds.
const PREEMPTED: Duration = Duration::from_micros(500);

/// How long an adaptive worker that was preempted stays event driven.
const CONTENDED_BACKOFF: Duration = Duration::from_millis(100);

impl Worker {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            if self.polling && !self.poll_until_idle() {
                return;
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!(target: LOG, "pair {}: epoll_wait failed: {e}; worker stops", self.pair);
                    return;
                }
            };
            let mut traffic = false;
            for ev in events.iter().take(n) {
                let data = ev.data();
                if data == TOKEN_WAKE {
                    if !self.take_requests() {
                        return;
                    }
                } else {
                    let slot = (data / 2) as usize;
                    self.handle_queue_event(slot, data % 2 == 1);
                    traffic = true;
                }
            }
            // A kick or call means traffic: more is likely to follow.
            let poll = match self.poll.mode {
                PollMode::Off => false,
                PollMode::Adaptive => !self.backing_off(),
                PollMode::Always => true,
            };
            if traffic && poll {
                self.start_polling();
            }
        }
    }

    /// Drain the wake eventfd and apply queued requests. Returns false when
    /// asked to exit.
    fn take_requests(&mut self) -> bool {
        // Clear the flag before reading the channel: a request sent after
        // this sets it again and is seen by the next look.
        self.pending.store(false, Ordering::Relaxed);
        let _ = self.wake.read();
        self.handle_requests()
    }

    fn live_slots(&self) -> bool {
        self.slots.iter().flatten().any(|s| !s.broken)
    }

    /// Suppress notifications on every live queue and poll from now on.
    fn start_polling(&mut self) {
        if !self.live_slots() {
            return;
        }
        for slot in 0..self.slots.len() {
            self.suppress(slot);
        }
        self.polling = true;
    }

    fn suppress(&mut self, slot: usize) {
        let Worker { slots, log, .. } = self;
        let Some(Some(s)) = slots.get_mut(slot) else {
            return;
        };
        if s.broken {
            return;
        }
        let r = s.a.svq.suppress_notifications(&s.a.mem);
        s.a.svq.flush_dirty(&log.pin());
        if let Err(e) = r {
            self.fail(slot, e);
        }
    }

    /// Poll until the rings stay idle for the budget (or forever, with
    /// `Always`), then ask for notifications again. Returns false when asked
    /// to exit.
    fn poll_until_idle(&mut self) -> bool {
        let mut idle_passes = 0u32;
        let mut idle_since: Option<Instant> = None;
        let mut last_look = Instant::now();
        loop {
            if self.pending.load(Ordering::Acquire) && !self.take_requests() {
                return false;
            }
            if !self.polling || !self.live_slots() {
                self.stop_polling();
                return true;
            }
            let moved = self.poll_pass();
            if !moved {
                std::hint::spin_loop();
                idle_passes += 1;
            }
            if self.poll.mode != PollMode::Adaptive
                || (!moved && idle_passes < PASSES_PER_CLOCK_READ)
            {
                continue;
            }
            idle_passes = 0;
            let now = Instant::now();
            let gap = now.duration_since(last_look);
            last_look = now;
            if gap >= PREEMPTED {
                // Another thread had this CPU between two looks: polling
                // only takes time from it, and a sleeping worker that a
                // kick wakes runs sooner than a polling one waiting for its
                // next slice. Sleep, and poll again after a while (vhost-net
                // stops its busy loop on need_resched() for the same
                // reason). Sleeping is safe whatever stop_polling finds: it
                // relays what arrived and leaves notifications on.
                log::debug!(target: LOG, "pair {}: preempted for {gap:?} while polling; event driven for {CONTENDED_BACKOFF:?}", self.pair);
                self.backoff_until = Some(now + CONTENDED_BACKOFF);
                self.stop_polling();
                return true;
            }
            if moved {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) >= self.poll.budget {
                if self.stop_polling() {
                    return true;
                }
                // Work arrived during the hand-over: keep polling.
                self.start_polling();
                idle_since = None;
            }
        }
    }

    /// Adaptive polling is off for a while after the worker found itself
    /// preempted.
    fn backing_off(&mut self) -> bool {
        match self.backoff_until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                self.backoff_until = None;
                false
            }
            None => false,
        }
    }

    /// One look at every live queue: complete what the device used, relay
    /// what the guest made available, one kick and one guest signal at
    /// most per queue. Returns whether anything moved.
    fn poll_pass(&mut self) -> bool {
        let mut moved = false;
        let mut failed = None;
        {
            let Worker { slots, log, .. } = self;
            let pinned = log.pin();
            for (slot, s) in slots.iter_mut().enumerate() {
                let Some(s) = s else { continue };
                if s.broken {
                    continue;
                }
                let before = s.a.svq.guest_position();
                match s.a.svq.handle_device_call(&s.a.mem, &s.a.tree, &pinned) {
                    Ok(out) => {
                        if s.a.svq.guest_position() != before {
                            moved = true;
                            s.a.stats.publish(&s.a.svq.stats());
                        }
                        Self::notify(s, out);
                    }
                    Err(e) => failed = Some((slot, e)),
                }
            }
        }
        if let Some((slot, e)) = failed {
            self.fail(slot, e);
        }
        moved
    }

    /// Leave polling: drain the eventfds (kicks and calls sent while
    /// polling announce work already seen), ask for notifications on every
    /// queue, and look at the rings once more. Returns true when the worker
    /// may sleep; false when work arrived meanwhile (it was relayed, and
    /// notifications are on again, so the caller starts polling again).
    fn stop_polling(&mut self) -> bool {
        self.polling = false;
        let mut work = false;
        let mut failed = Vec::new();
        {
            let Worker { slots, log, .. } = self;
            let pinned = log.pin();
            for (slot, s) in slots.iter_mut().enumerate() {
                let Some(s) = s else { continue };
                if s.broken || !s.a.svq.notifications_suppressed() {
                    // Never drain an eventfd whose notification is live.
                    continue;
                }
                let _ = s.a.guest_kick.read();
                let _ = s.a.dev_call.read();
                let r = s.a.svq.request_notifications(&s.a.mem);
                s.a.svq.flush_dirty(&pinned);
                match r {
                    Ok(true) => work = true,
                    Ok(false) => {}
                    Err(e) => failed.push((slot, e)),
                }
            }
        }
        for (slot, e) in failed {
            self.fail(slot, e);
        }
        if work {
            self.poll_pass();
        }
        !work
    }

    fn notify(s: &Slot, out: svq::CallOutcome) {
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
                        if self.polling {
                            self.suppress(slot);
                        } else if self.poll.mode == PollMode::Always {
                            self.start_polling();
                        }
                        continue;
                    }
                    r
                }
                Request::Configure(cfg) => self.configure(cfg),
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

    fn configure(&mut self, cfg: WorkerConfig) -> Reply {
        if let Some(cpu) = cfg.cpu {
            if let Err(e) = pin_current_thread(cpu) {
                return Reply::Failed(format!("cannot pin to CPU {cpu}: {e}"));
            }
        }
        self.poll = cfg.poll;
        match cfg.poll.mode {
            PollMode::Off if self.polling => {
                self.stop_polling();
            }
            PollMode::Always => self.start_polling(),
            _ => {}
        }
        Reply::Done
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
            Some(mut s) if s.a.queue == queue => {
                self.unwatch(&s.a);
                // Whoever takes the ring next may not poll it: it must not
                // inherit a guest told not to kick. Work found here is the
                // next owner's (the control thread stops the SVQ and hands
                // its indexes over).
                let _ = s.a.svq.request_notifications(&s.a.mem);
                s.a.svq.flush_dirty(&self.log.pin());
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
                Self::notify(s, out);
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

/// Pin the calling thread to one CPU.
fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is plain data for which all zeroes is the empty set;
    // CPU_SET writes inside it for cpu < CPU_SETSIZE (checked above), and
    // sched_setaffinity(0, ..) reads size_of::<cpu_set_t>() bytes of it for
    // the calling thread.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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

    /// Queue 0's eventfds: the VMM's kick and call, the daemon's for the
    /// device.
    struct QueueFds {
        guest_kick: Arc<EventFd>,
        guest_call: Arc<EventFd>,
        dev_kick: Arc<EventFd>,
        dev_call: Arc<EventFd>,
    }

    /// Hand queue 0 to `w` with fresh eventfds.
    fn attach_queue0(
        w: &WorkerHandle,
        svq: ShadowVirtqueue,
        mem: &Arc<GuestMemoryMmap>,
        tree: IovaTree,
        stats: Arc<QueueStats>,
    ) -> QueueFds {
        let ev = || Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let fds = QueueFds {
            guest_kick: ev(),
            guest_call: ev(),
            dev_kick: ev(),
            dev_call: ev(),
        };
        w.attach(Attach {
            queue: 0,
            svq: Box::new(svq),
            guest_kick: fds.guest_kick.clone(),
            guest_call: Some(fds.guest_call.clone()),
            dev_kick: fds.dev_kick.clone(),
            dev_call: fds.dev_call.clone(),
            mem: mem.clone(),
            tree: Arc::new(tree),
            stats,
        })
        .unwrap();
        fds
    }

    /// The device's view of the shadow ring of 16: the shadow memory at its
    /// HVA, and a queue on its rings.
    fn device_side(
        shadow: Arc<vm_memory::MmapRegion>,
        hva: u64,
        rings: svq::ShadowRingAddrs,
    ) -> (GuestMemoryMmap, Queue) {
        let smem = GuestMemoryMmap::from_arc_regions(vec![Arc::new(
            GuestRegionMmap::with_arc(shadow, GuestAddress(hva)).unwrap(),
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
        (smem, q)
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
        let stats = Arc::new(QueueStats::default());
        let QueueFds {
            guest_call,
            dev_kick,
            dev_call,
            ..
        } = attach_queue0(&w, svq, &mem, tree, stats.clone());
        // Attach looked at the ring once: the buffer is on the shadow ring.
        assert!(wait_readable(&dev_kick));

        // The device side, on the shadow ring (addresses are HVAs here).
        let (smem, mut q) = device_side(shadow.clone(), hva, rings);
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
        let (avail, used) = (AVAIL, USED);
        // Two 64-byte device-writable buffers, heads 0 and 1.
        write_buffers(&mem, 2);
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

    /// A guest ring of 16 with `n` 64-byte device-writable buffers (heads
    /// 0..n at 0x10000 + 0x100 * head), none available yet.
    fn write_buffers(mem: &GuestMemoryMmap, n: u16) {
        for h in 0..u64::from(n) {
            mem.write_obj(0x10000 + 0x100 * h, GuestAddress(DESC + 16 * h))
                .unwrap();
            mem.write_obj(64u32, GuestAddress(DESC + 16 * h + 8))
                .unwrap();
            mem.write_obj(2u16, GuestAddress(DESC + 16 * h + 12))
                .unwrap();
        }
    }

    /// The guest makes head `head` available at avail position `pos`
    /// without kicking.
    fn make_available(mem: &GuestMemoryMmap, pos: u16, head: u16) {
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(pos % 16)))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(pos.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Wait (bounded) until `f` holds; the worker runs on its own thread.
    fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < end, "timed out: {what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    struct Polled {
        w: WorkerHandle,
        mem: Arc<GuestMemoryMmap>,
        /// The device's view of the shadow ring.
        q: Queue,
        smem: GuestMemoryMmap,
        shadow_avail: u64,
        guest_kick: Arc<EventFd>,
        guest_call: Arc<EventFd>,
        dev_kick: Arc<EventFd>,
        dev_call: Arc<EventFd>,
    }

    impl Polled {
        fn start(mode: PollMode, budget: Duration) -> Self {
            let (mem, tree, svq, shadow) = svq_fixture();
            write_buffers(&mem, 4);
            let rings = svq.shadow_ring_hva();
            let hva = shadow.as_ptr() as u64;
            let w = WorkerHandle::spawn(0).unwrap();
            w.configure(WorkerConfig {
                poll: PollConfig { mode, budget },
                cpu: None,
            })
            .unwrap();
            let QueueFds {
                guest_kick,
                guest_call,
                dev_kick,
                dev_call,
            } = attach_queue0(&w, svq, &mem, tree, Arc::new(QueueStats::default()));
            let (smem, q) = device_side(shadow, hva, rings);
            Polled {
                w,
                mem,
                q,
                smem,
                shadow_avail: rings.avail,
                guest_kick,
                guest_call,
                dev_kick,
                dev_call,
            }
        }

        fn guest_used_flags(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED)).unwrap()
        }

        fn guest_used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn shadow_avail_flags(&self) -> u16 {
            self.smem.read_obj(GuestAddress(self.shadow_avail)).unwrap()
        }

        /// Play the device: take every chain on the shadow ring and use it
        /// (60 bytes), without signalling.
        fn device_uses_all(&mut self) -> usize {
            let mut n = 0;
            while let Some(c) = self.q.pop_descriptor_chain(&self.smem) {
                self.q.add_used(&self.smem, c.head_index(), 60).unwrap();
                n += 1;
            }
            n
        }
    }

    /// Neither the guest nor the device notifies: a polling worker moves
    /// chains both ways by itself, and tells both sides not to bother.
    #[test]
    fn always_polling_relays_without_kicks_or_calls() {
        let mut p = Polled::start(PollMode::Always, DEFAULT_POLL_BUDGET);
        eventually(
            "NO_NOTIFY toward the guest, NO_INTERRUPT toward the device",
            || p.guest_used_flags() & 1 == 1 && p.shadow_avail_flags() == 1,
        );
        // Two chains in one avail idx update: one pass relays both.
        p.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        p.mem.write_obj(1u16, GuestAddress(AVAIL + 6)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        p.mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
        let mut taken = 0;
        eventually("chains on the shadow ring", || {
            taken += p.device_uses_all();
            taken == 2
        });
        eventually("completions on the guest used ring", || {
            p.guest_used_idx() == 2
        });
        assert!(
            wait_readable(&p.guest_call),
            "the guest asked for interrupts"
        );
        assert_eq!(p.guest_used_flags() & 1, 1, "still polling");
        let _ = p.w.detach(0).unwrap();
        assert_eq!(p.guest_used_flags() & 1, 0, "handed back asking for kicks");
        // Nothing announced it: the kicks were suppressed, not lost.
        assert_eq!(p.dev_kick.read().ok(), Some(1), "one kick for the batch");
        assert!(p.guest_kick.read().is_err());
        assert!(p.dev_call.read().is_err());
    }

    /// An adaptive worker sleeps once the rings go idle; asleep it asks for
    /// kicks and interrupts again, and the next kick and call are served.
    #[test]
    fn adaptive_polling_sleeps_when_idle_and_wakes_on_the_next_kick() {
        let mut p = Polled::start(PollMode::Adaptive, Duration::from_millis(1));
        make_available(&p.mem, 0, 0);
        p.guest_kick.write(1).unwrap();
        assert!(wait_readable(&p.dev_kick));
        p.dev_kick.read().unwrap();
        // Idle for the budget: notifications are back on both sides.
        eventually("the worker goes to sleep", || {
            p.guest_used_flags() & 1 == 0 && p.shadow_avail_flags() == 0
        });
        assert_eq!(p.device_uses_all(), 1);
        p.dev_call.write(1).unwrap();
        eventually("completion after a call", || p.guest_used_idx() == 1);
        assert!(wait_readable(&p.guest_call));
        // Asleep again, then a chain with a kick, as a driver that saw the
        // flags cleared sends it.
        eventually("asleep again", || p.guest_used_flags() & 1 == 0);
        make_available(&p.mem, 1, 1);
        p.guest_kick.write(1).unwrap();
        assert!(
            wait_readable(&p.dev_kick),
            "the kick after sleeping was lost"
        );
        let _ = p.w.detach(0).unwrap();
    }

    /// The hand-over from polling to sleep re-checks the ring: a chain the
    /// guest added while told not to kick (so it never kicked) is relayed.
    #[test]
    fn a_chain_added_without_a_kick_during_polling_is_never_stranded() {
        let mut p = Polled::start(PollMode::Adaptive, Duration::from_millis(2));
        for pos in 0..4u16 {
            make_available(&p.mem, pos, pos);
            if pos == 0 || p.guest_used_flags() & 1 == 0 {
                p.guest_kick.write(1).unwrap();
            }
            std::thread::sleep(Duration::from_micros(700 * u64::from(pos)));
        }
        let mut taken = 0;
        eventually("all four chains relayed", || {
            taken += p.device_uses_all();
            taken == 4
        });
        let _ = p.w.detach(0).unwrap();
    }

    #[test]
    fn pinning_to_a_cpu_that_does_not_exist_is_refused() {
        let w = WorkerHandle::spawn(0).unwrap();
        let cfg = |cpu| WorkerConfig {
            poll: PollConfig::default(),
            cpu: Some(cpu),
        };
        match w.configure(cfg(1023)) {
            Err(WorkerError::Refused { why, .. }) => assert!(why.contains("CPU 1023"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        w.configure(cfg(0)).unwrap();
    }
}
