//! virtio-balloon (device type 5).
//!
//! The host sets a target (`num_pages`, 4 KiB pages the guest should give up)
//! with [`Balloon::set_target_pages`] / [`BalloonHandle::set_target_pages`],
//! which raises a configuration-change interrupt. The driver inflates by sending
//! guest PFNs, which the host releases with madvise; it reports its balloon size
//! in `actual`. With VIRTIO_BALLOON_F_STATS_VQ the driver sends memory
//! statistics; the device keeps the latest report and asks for a new one by
//! returning the buffer ([`BalloonHandle::request_stats`], or periodically with
//! [`Balloon::with_stats_interval`]).

mod queues;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::worker::{drain_eventfd, kick, Worker};
use crate::{device_type, ActivateError, Activation, GuestMemory, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
pub use queues::BALLOON_PAGE_SIZE;

/// Feature: the driver tells the host before reusing deflated pages (not offered).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1 << 0;
/// Feature: statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// Feature: the guest deflates under memory pressure instead of OOM-killing.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;

/// Queue size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;

/// Statistics tags (virtio 1.2, 5.5.6.3, plus later Linux additions).
pub mod stat_tag {
    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJOR_FAULTS: u16 = 2;
    /// Minor page faults.
    pub const MINOR_FAULTS: u16 = 3;
    /// Free memory in bytes.
    pub const FREE_MEMORY: u16 = 4;
    /// Total memory in bytes.
    pub const TOTAL_MEMORY: u16 = 5;
    /// Available memory in bytes (as in /proc/meminfo MemAvailable).
    pub const AVAILABLE_MEMORY: u16 = 6;
    /// Disk caches in bytes.
    pub const DISK_CACHES: u16 = 7;
    /// Successful hugetlb page allocations.
    pub const HUGETLB_ALLOCATIONS: u16 = 8;
    /// Failed hugetlb page allocations.
    pub const HUGETLB_FAILURES: u16 = 9;
}

/// The latest statistics report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// (tag, value) pairs in the order the driver sent them (see [`stat_tag`]).
    pub entries: Vec<(u16, u64)>,
    /// How many reports were received so far (1 for the first).
    pub updates: u64,
}

impl BalloonStats {
    /// The value reported for `tag`, if any.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.entries.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v)
    }
}

/// Why the balloon could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// Creating the stats-request eventfd failed.
    #[error("virtio-balloon: creating an eventfd: {0}")]
    EventFd(io::Error),
}

/// State shared between the device, its handles and the worker thread.
struct Shared {
    target: AtomicU32,
    actual: AtomicU32,
    stats: Mutex<Option<BalloonStats>>,
    interrupt: Mutex<Option<Arc<VirtioInterrupt>>>,
    /// Written by `request_stats`; the worker returns the held stats buffer.
    stats_request: EventFd,
}

/// A cloneable remote control for a [`Balloon`], usable after the device was
/// handed to the transport.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Sets the number of 4 KiB pages the guest should give up and tells the
    /// driver (configuration-change interrupt) if it is running.
    pub fn set_target_pages(&self, pages: u32) {
        self.shared.target.store(pages, Ordering::SeqCst);
        let interrupt = self.shared.interrupt.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(interrupt) = interrupt {
            interrupt.signal_config_change();
        }
    }

    /// The host's target (`num_pages`).
    pub fn target_pages(&self) -> u32 {
        self.shared.target.load(Ordering::SeqCst)
    }

    /// Pages the driver reports in its balloon (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.shared.actual.load(Ordering::SeqCst)
    }

    /// The latest statistics report, if the driver sent one.
    pub fn stats(&self) -> Option<BalloonStats> {
        self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks the driver for a fresh statistics report (returns the held buffer);
    /// no-op if the driver has not negotiated the statistics queue.
    pub fn request_stats(&self) {
        if let Err(e) = self.shared.stats_request.write(1) {
            tracing::warn!("virtio-balloon: stats request: {e}");
        }
    }
}

/// A virtio-balloon device.
pub struct Balloon {
    handle: BalloonHandle,
    features: u64,
    stats_interval: Option<Duration>,
    worker: Option<Worker<BalloonWorker>>,
}

impl Balloon {
    /// A balloon with target 0. `deflate_on_oom` offers
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM; the statistics queue is always offered.
    pub fn new(deflate_on_oom: bool) -> Result<Balloon, BalloonError> {
        let shared = Shared {
            target: AtomicU32::new(0),
            actual: AtomicU32::new(0),
            stats: Mutex::new(None),
            interrupt: Mutex::new(None),
            stats_request: EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd)?,
        };
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ;
        if deflate_on_oom {
            features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        Ok(Balloon { handle: BalloonHandle { shared: Arc::new(shared) }, features, stats_interval: None, worker: None })
    }

    /// Requests fresh statistics every `interval` while the device runs.
    pub fn with_stats_interval(mut self, interval: Duration) -> Balloon {
        self.stats_interval = Some(interval).filter(|d| !d.is_zero());
        self
    }

    /// A handle that keeps working after the device is boxed into a transport.
    pub fn handle(&self) -> BalloonHandle {
        self.handle.clone()
    }

    /// See [`BalloonHandle::set_target_pages`].
    pub fn set_target_pages(&self, pages: u32) {
        self.handle.set_target_pages(pages);
    }

    /// See [`BalloonHandle::target_pages`].
    pub fn target_pages(&self) -> u32 {
        self.handle.target_pages()
    }

    /// See [`BalloonHandle::actual_pages`].
    pub fn actual_pages(&self) -> u32 {
        self.handle.actual_pages()
    }

    /// See [`BalloonHandle::stats`].
    pub fn stats(&self) -> Option<BalloonStats> {
        self.handle.stats()
    }

    /// See [`BalloonHandle::request_stats`].
    pub fn request_stats(&self) {
        self.handle.request_stats();
    }

    fn stop_worker(&mut self) -> Option<BalloonWorker> {
        // No config interrupts while stopped (paused for a snapshot, or reset).
        *self.handle.shared.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.worker.take()?.stop()
    }

    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[0..4].copy_from_slice(&self.target_pages().to_le_bytes());
        c[4..8].copy_from_slice(&self.actual_pages().to_le_bytes());
        c
    }
}

/// What woke the worker.
#[derive(Clone, Copy)]
enum Token {
    Queue(usize),
    StatsRequest,
    Timer,
}

/// The worker thread's state.
struct BalloonWorker {
    mem: GuestMemory,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    /// Whether the statistics queue is in use.
    stats_vq: bool,
    held_stats: Option<u16>,
    shared: Arc<Shared>,
    interrupt: Arc<VirtioInterrupt>,
    timer: Option<TimerFd>,
}

impl BalloonWorker {
    fn handle(&mut self, token: Token) {
        let notify = match token {
            Token::Queue(q) => {
                drain_eventfd(&self.events[q]);
                let mem = &self.mem;
                match q {
                    INFLATE => queues::process_inflate(mem, &mut self.queues[INFLATE]),
                    DEFLATE => queues::process_deflate(mem, &mut self.queues[DEFLATE]),
                    _ => queues::process_stats(mem, &mut self.queues[STATS], &mut self.held_stats, &self.shared.stats),
                }
            }
            Token::StatsRequest => {
                drain_eventfd(&self.shared.stats_request);
                self.stats_vq && queues::return_stats_buffer(&self.mem, &mut self.queues[STATS], &mut self.held_stats)
            }
            Token::Timer => {
                if let Some(t) = &mut self.timer {
                    let _ = t.wait();
                }
                self.stats_vq && queues::return_stats_buffer(&self.mem, &mut self.queues[STATS], &mut self.held_stats)
            }
        };
        if notify {
            self.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is driver-writable.
        let mut actual = self.actual_pages().to_le_bytes();
        let mut touched = false;
        for (i, b) in data.iter().enumerate() {
            let at = offset.checked_add(i as u64);
            if let Some(at @ 4..=7) = at {
                actual[(at - 4) as usize] = *b;
                touched = true;
            }
        }
        if touched {
            let pages = u32::from_le_bytes(actual);
            tracing::debug!(pages, target = self.target_pages(), "virtio-balloon: driver reports actual");
            self.handle.shared.actual.store(pages, Ordering::SeqCst);
        } else {
            tracing::debug!(offset, len = data.len(), "virtio-balloon: write to read-only config ignored");
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        if a.queues.len() < 2 || a.queue_events.len() < 2 || !a.queues[INFLATE].ready() || !a.queues[DEFLATE].ready() {
            return Err(ActivateError::BadSetup("virtio-balloon needs its inflate and deflate queues".into()));
        }
        let stats_vq = a.acked_features & VIRTIO_BALLOON_F_STATS_VQ != 0
            && a.queues.get(STATS).is_some_and(|q| q.ready())
            && a.queue_events.len() > STATS;

        let mut tokens = vec![Token::Queue(INFLATE), Token::Queue(DEFLATE)];
        let mut fds = vec![a.queue_events[INFLATE].as_raw_fd(), a.queue_events[DEFLATE].as_raw_fd()];
        let mut timer = None;
        if stats_vq {
            tokens.extend([Token::Queue(STATS), Token::StatsRequest]);
            fds.extend([a.queue_events[STATS].as_raw_fd(), self.handle.shared.stats_request.as_raw_fd()]);
            // Requests made while no driver was listening are stale.
            drain_eventfd(&self.handle.shared.stats_request);
            if let Some(interval) = self.stats_interval {
                let mut t = TimerFd::new().map_err(|e| ActivateError::Backend(format!("virtio-balloon timer: {e}")))?;
                t.reset(interval, Some(interval))
                    .map_err(|e| ActivateError::Backend(format!("virtio-balloon timer: {e}")))?;
                tokens.push(Token::Timer);
                fds.push(t.as_raw_fd());
                timer = Some(t);
            }
        }

        let held_stats = if stats_vq { queues::recover_held_stats(&a.mem, &a.queues[STATS]) } else { None };
        let queue_count = if stats_vq { 3 } else { 2 };
        for event in &a.queue_events[..queue_count] {
            kick(event);
        }

        *self.handle.shared.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = Some(a.interrupt.clone());
        if self.target_pages() != self.actual_pages() {
            // The target may have changed while the device was stopped (paused
            // for a snapshot): make the driver look again. Harmless otherwise.
            a.interrupt.signal_config_change();
        }
        let state = BalloonWorker {
            mem: a.mem,
            queues: a.queues,
            events: a.queue_events,
            stats_vq,
            held_stats,
            shared: self.handle.shared.clone(),
            interrupt: a.interrupt,
            timer,
        };
        let spawned = Worker::spawn("virtio-balloon", &fds, &[], state, move |st, i| {
            if let Some(&token) = tokens.get(i) {
                st.handle(token);
            }
        });
        match spawned {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err(e) => {
                self.stop_worker();
                Err(ActivateError::Backend(format!("virtio-balloon worker: {e}")))
            }
        }
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn pause(&mut self) -> Option<Vec<Queue>> {
        // A held statistics buffer stays taken-but-unused in the ring positions
        // and is recovered on the next activation.
        self.stop_worker().map(|w| w.queues)
    }
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
