//! Shared device plumbing: the per-device worker thread (epoll over the queue
//! eventfds plus a stop eventfd) and the queue-draining loop every device uses
//! (public for devices in other crates, e.g. sm-fuse's virtio-fs).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestMemory;

/// epoll token of the stop eventfd (never a valid index into the caller's fds).
const STOP_TOKEN: u64 = u64::MAX;
/// Events taken from the kernel per `epoll_wait`.
const MAX_EVENTS: usize = 16;

/// A device worker thread. It owns the device's running state `S` (queues,
/// eventfds, back end), sleeps in `epoll_wait` until one of its file descriptors
/// is readable and calls the handler with the state and the descriptor's index.
/// [`Worker::stop`] (or dropping the worker) wakes it through a private eventfd,
/// joins it and hands the state back, so a paused device can return its queues.
pub struct Worker<S: Send + 'static> {
    name: String,
    stop: EventFd,
    thread: Option<JoinHandle<S>>,
}

impl<S: Send + 'static> Worker<S> {
    /// Starts a thread called `name` that waits on `fds` and calls
    /// `handler(&mut state, index)` whenever `fds[index]` is readable. The state
    /// must keep the descriptors open and the handler must drain whatever made
    /// them readable, since the wait is level-triggered.
    /// The thread confines itself first (sm-seccomp), its file-system
    /// access to `host_paths` (the device's [`VirtioDevice::host_paths`](crate::VirtioDevice::host_paths)).
    pub fn spawn<H>(
        name: &str,
        fds: &[RawFd],
        host_paths: &[sm_seccomp::FsRule],
        state: S,
        mut handler: H,
    ) -> io::Result<Worker<S>>
    where
        H: FnMut(&mut S, usize) + Send + 'static,
    {
        Worker::spawn_with_interest(name, fds, host_paths, state, move |state, index, _| handler(state, index))
    }

    /// As [`Worker::spawn`], and the handler gets an [`Interest`] to stop and
    /// resume waiting on one of `fds` (a back end that has data while the
    /// guest has no buffer for it must not keep waking the thread).
    pub(crate) fn spawn_with_interest<H>(
        name: &str,
        fds: &[RawFd],
        host_paths: &[sm_seccomp::FsRule],
        mut state: S,
        mut handler: H,
    ) -> io::Result<Worker<S>>
    where
        H: FnMut(&mut S, usize, &Interest) + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (index, &fd) in fds.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, index as u64))?;
        }
        let fds = fds.to_vec();
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))?;
        // The thread keeps its own handle on the stop eventfd so the epoll
        // registration stays valid for as long as the thread runs.
        let stop_in_thread = stop.try_clone()?;
        let thread_name = name.to_string();
        let host_paths = host_paths.to_vec();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            let _stop = stop_in_thread;
            // The worker parses what the guest queued: confined first (see
            // sm-seccomp); a worker that cannot be serves nothing.
            if let Err(e) = sm_seccomp::confine_current_thread(sm_seccomp::ThreadKind::DeviceWorker, &host_paths) {
                tracing::error!(worker = %thread_name, "{e}");
                return state;
            }
            let interest = Interest { epoll, fds };
            let epoll = &interest.epoll;
            let mut events = vec![EpollEvent::default(); MAX_EVENTS];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!(worker = %thread_name, "epoll_wait failed, worker stops: {e}");
                        return state;
                    }
                };
                let ready = &events[..n];
                if ready.iter().any(|e| e.data() == STOP_TOKEN) {
                    tracing::debug!(worker = %thread_name, "worker stopping");
                    return state;
                }
                for event in ready {
                    handler(&mut state, event.data() as usize, &interest);
                }
            }
        })?;
        Ok(Worker { name: name.to_string(), stop, thread: Some(thread) })
    }

    /// Stops the thread, waits for it and returns its state (`None` if it was
    /// already stopped, could not be woken, or panicked).
    pub fn stop(&mut self) -> Option<S> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            // Without the wake-up the join below could block forever: leave the
            // thread detached instead.
            tracing::error!(worker = %self.name, "cannot signal worker to stop, detaching it: {e}");
            return None;
        }
        match thread.join() {
            Ok(state) => Some(state),
            Err(_) => {
                tracing::error!(worker = %self.name, "worker thread panicked");
                None
            }
        }
    }
}

/// Which of a worker's descriptors it waits on (all, at the start).
pub(crate) struct Interest {
    epoll: Epoll,
    fds: Vec<RawFd>,
}

impl Interest {
    /// Waits on `fds[index]` (`on`) or not.
    pub(crate) fn set(&self, index: usize, on: bool) {
        let Some(&fd) = self.fds.get(index) else { return };
        let events = if on { EventSet::IN } else { EventSet::empty() };
        if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, index as u64)) {
            tracing::warn!(index, "changing a worker's wait set: {e}");
        }
    }
}

impl<S: Send + 'static> Drop for Worker<S> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads an eventfd-style counter (eventfd or timerfd) so a level-triggered wait
/// does not fire again for the same notification.
pub fn drain_eventfd(evt: &EventFd) {
    match evt.read() {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => tracing::warn!("reading a queue eventfd: {e}"),
    }
}

/// Makes the worker look at a queue once as soon as it runs: after a restore the
/// driver may have made chains available whose notification was consumed before
/// the snapshot (harmless on a fresh start: the queue is empty).
pub(crate) fn kick(evt: &EventFd) {
    if let Err(e) = evt.write(1) {
        tracing::warn!("kicking a queue eventfd: {e}");
    }
}

/// The request queue of a single-queue device, checked, with its notifier kicked
/// once so requests queued before activation (or before a snapshot) are served.
pub(crate) fn take_single_queue(
    a: crate::Activation,
    device: &str,
) -> Result<(Queue, EventFd, GuestMemory, std::sync::Arc<crate::VirtioInterrupt>), crate::ActivateError> {
    let crate::Activation { mem, queues, queue_events, interrupt, .. } = a;
    let (Some(queue), Some(event)) = (queues.into_iter().next(), queue_events.into_iter().next()) else {
        return Err(crate::ActivateError::BadSetup(format!("{device} needs its request queue")));
    };
    if !queue.ready() {
        return Err(crate::ActivateError::BadSetup(format!("{device} request queue not ready")));
    }
    kick(&event);
    Ok((queue, event, mem, interrupt))
}

/// Pops every descriptor chain the driver made available and passes it to
/// `handle`. `handle` returns `Some(len)` to put the chain on the used ring with
/// `len` bytes written, or `None` to keep it (the device returns it later).
///
/// Notifications are suppressed while draining and re-enabled afterwards, looping
/// if the driver added chains in between (the usual EVENT_IDX dance). A corrupt
/// available index (more chains than the queue holds) stops the loop instead of
/// spinning. Returns whether the driver must be interrupted.
pub fn drain_queue<F>(mem: &GuestMemory, queue: &mut Queue, mut handle: F) -> bool
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> Option<u32>,
{
    let mut used_any = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            tracing::warn!("virtio queue: cannot disable notifications: {e}");
        }
        let mut progressed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            progressed = true;
            let head = chain.head_index();
            if let Some(len) = handle(chain) {
                used_any |= add_used(mem, queue, head, len);
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) if progressed => continue,
            Ok(true) => {
                // Driver bug or hostile driver: debug level, so it cannot flood the log.
                tracing::debug!(
                    next_avail = queue.next_avail(),
                    "virtio queue: available index out of range, ignoring the queue until the next notification"
                );
                break;
            }
            Ok(false) => break,
            Err(e) => {
                tracing::warn!("virtio queue: cannot re-enable notifications: {e}");
                break;
            }
        }
    }
    used_any && needs_notification(mem, queue)
}

/// Puts chain `head` on the used ring; false (and a log line) if the ring or the
/// index is unusable.
pub(crate) fn add_used(mem: &GuestMemory, queue: &mut Queue, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            // A driver-supplied head index out of range, typically.
            tracing::debug!(head, "virtio queue: add_used failed: {e}");
            false
        }
    }
}

/// Whether the driver wants an interrupt for the chains used since the last check
/// (EVENT_IDX aware); true when the ring cannot be read, to be safe.
pub(crate) fn needs_notification(mem: &GuestMemory, queue: &mut Queue) -> bool {
    queue.needs_notification(mem).unwrap_or_else(|e| {
        tracing::debug!("virtio queue: reading used_event: {e}");
        true
    })
}

#[cfg(test)]
pub(crate) mod testing {
    //! Test rig: a device behind the real [`MmioTransport`], driven like a driver
    //! would (features, queue set-up, DRIVER_OK, QueueNotify).

    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;

    use crate::mmio::*;
    use crate::{GuestMemory, InterruptLine, VirtioDevice};

    /// Counts interrupts.
    #[derive(Default)]
    pub(crate) struct CountingLine(pub(crate) AtomicU32);

    impl InterruptLine for CountingLine {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl CountingLine {
        pub(crate) fn count(&self) -> u32 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// 1 MiB of guest memory at 0.
    pub(crate) fn guest_memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory")
    }

    pub(crate) struct Rig {
        pub(crate) t: MmioTransport,
        pub(crate) line: Arc<CountingLine>,
    }

    impl Rig {
        pub(crate) fn new(device: Box<dyn VirtioDevice>, mem: &GuestMemory) -> Rig {
            let line = Arc::new(CountingLine::default());
            let t = MmioTransport::new(device, mem.clone(), line.clone()).expect("transport");
            Rig { t, line }
        }

        pub(crate) fn r(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(off, &mut b);
            u32::from_le_bytes(b)
        }

        pub(crate) fn w(&mut self, off: u64, v: u32) {
            self.t.write(off, &v.to_le_bytes());
        }

        /// Device features as the driver reads them.
        pub(crate) fn device_features(&mut self) -> u64 {
            self.w(REG_DEVICE_FEATURES_SEL, 0);
            let lo = u64::from(self.r(REG_DEVICE_FEATURES));
            self.w(REG_DEVICE_FEATURES_SEL, 1);
            let hi = u64::from(self.r(REG_DEVICE_FEATURES));
            lo | (hi << 32)
        }

        /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK (asserted accepted).
        pub(crate) fn negotiate(&mut self, features: u64) {
            self.w(REG_STATUS, STATUS_ACKNOWLEDGE);
            self.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            self.w(REG_DRIVER_FEATURES_SEL, 0);
            self.w(REG_DRIVER_FEATURES, features as u32);
            self.w(REG_DRIVER_FEATURES_SEL, 1);
            self.w(REG_DRIVER_FEATURES, (features >> 32) as u32);
            self.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
            assert_ne!(self.r(REG_STATUS) & STATUS_FEATURES_OK, 0, "features refused");
        }

        pub(crate) fn setup_queue(&mut self, index: u32, size: u16, q: &MockSplitQueue<GuestMemory>) {
            self.w(REG_QUEUE_SEL, index);
            self.w(REG_QUEUE_NUM, u32::from(size));
            let (d, a, u) = (q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0);
            self.w(REG_QUEUE_DESC_LOW, d as u32);
            self.w(REG_QUEUE_DESC_HIGH, (d >> 32) as u32);
            self.w(REG_QUEUE_DRIVER_LOW, a as u32);
            self.w(REG_QUEUE_DRIVER_HIGH, (a >> 32) as u32);
            self.w(REG_QUEUE_DEVICE_LOW, u as u32);
            self.w(REG_QUEUE_DEVICE_HIGH, (u >> 32) as u32);
            self.w(REG_QUEUE_READY, 1);
        }

        /// Sets DRIVER_OK and checks the device started.
        pub(crate) fn driver_ok(&mut self) {
            self.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
            assert!(self.t.is_activated(), "device did not activate (status {:#x})", self.r(REG_STATUS));
        }

        pub(crate) fn notify(&mut self, queue: u32) {
            self.w(REG_QUEUE_NOTIFY, queue);
        }
    }

    /// Entries the mock driver queue is laid out for.
    const MOCK_LAYOUT: u16 = 256;

    /// A mock driver queue at `base`, laid out for 256 entries whatever size the
    /// device queue gets: virtio-queue 0.18's `MockSplitQueue::create` puts the
    /// used ring inside the available ring (`SplitQueueRing::end` adds the entry
    /// count, not bytes), so with a small layout the device's used entries land
    /// on `used_event` and avail entries. With a 256-entry layout and a device
    /// queue of at most 64 entries nothing overlaps. Occupies `base..base+0x2000`.
    pub(crate) fn mock_queue(mem: &GuestMemory, base: u64) -> MockSplitQueue<'_, GuestMemory> {
        MockSplitQueue::create(mem, GuestAddress(base), MOCK_LAYOUT)
    }

    /// The device side of `mq`, `size` entries, ready.
    pub(crate) fn device_queue(mq: &MockSplitQueue<GuestMemory>, size: u16) -> Queue {
        assert!(size <= 64 && size.is_power_of_two());
        let mut q: Queue = mq.create_queue().expect("queue");
        q.set_size(size);
        q
    }

    /// `used_event` of a device queue of `size` entries over `mq`.
    pub(crate) fn set_used_event(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>, size: u16, value: u16) {
        use vm_memory::{Address, Bytes};
        let at = mq.avail_addr().unchecked_add(4 + 2 * u64::from(size));
        mem.write_obj(value.to_le(), at).expect("used_event");
    }

    /// Descriptor flags for test chains.
    pub(crate) const R: u16 = 0;
    pub(crate) const W: u16 = VRING_DESC_F_WRITE as u16;
    pub(crate) const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    /// One descriptor as given, `next` included (for hand-made malformed chains).
    pub(crate) fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// A well-formed chain of `(addr, len, flags)` placed at descriptor index
    /// `start`: NEXT and the next indices are filled in.
    pub(crate) fn chain(start: u16, descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
        let n = descs.len();
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i16 = i as u16;
                if i + 1 < n {
                    raw(addr, len, flags | NEXT, start + i16 + 1)
                } else {
                    raw(addr, len, flags & !NEXT, 0)
                }
            })
            .collect()
    }

    /// Adds chains built with [`chain`] one after another in the table.
    pub(crate) fn add_chains(mq: &MockSplitQueue<GuestMemory>, chains: &[&[(u64, u32, u16)]]) {
        let mut at = 0u16;
        for c in chains {
            mq.add_desc_chains(&chain(at, c), at).expect("add chain");
            at += c.len() as u16;
        }
    }

    /// The used ring's `(id, len)` entries.
    pub(crate) fn used_entries(mq: &MockSplitQueue<GuestMemory>) -> Vec<(u32, u32)> {
        let idx = mq.used().idx().load();
        (0..idx)
            .map(|i| {
                let e =
                    mq.used().ring().ref_at(usize::from(i)).expect("used entry (tests do not wrap the ring)").load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// Polls `cond` until it holds or 5 s pass.
    pub(crate) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests;
