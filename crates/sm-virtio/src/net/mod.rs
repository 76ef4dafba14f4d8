//! virtio-net (device type 1): one receive and one transmit queue carrying
//! Ethernet frames between the guest and a [`NetBackend`] (passt, a TAP device,
//! or a test), with the MAC address, link status and MTU in config space.
//!
//! No offloads are offered (no checksum, TSO or mergeable receive buffers): the
//! guest computes checksums and sends frames of at most its MTU, so every frame
//! crosses the device as it is on the wire, behind the 12-byte
//! `virtio_net_hdr_v1` that the device strips on transmit and writes (zeroed,
//! `num_buffers` 1) on receive. Frames are bounded ([`MAX_FRAME`]); what cannot
//! be delivered is dropped and counted in [`NetStats`], as a NIC drops.
//!
//! When the guest has no receive buffer the device stops waiting on the back
//! end (the frame that found no buffer is kept) and resumes when the driver
//! adds buffers; a back end that cannot take a frame gets it dropped, and
//! TCP in the guest retransmits.

mod frames;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::worker::{add_used, drain_eventfd, drain_queue, kick, needs_notification, Interest, Worker};
use crate::{device_type, read_config_bytes, ActivateError, Activation, GuestMemory, VirtioDevice, VirtioInterrupt};
use crate::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

pub use frames::{MAX_FRAME, MIN_FRAME, NET_HDR_LEN};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Default MTU given to the guest (passt's default is 65520; 1500 is what every
/// network path takes).
pub const DEFAULT_MTU: u16 = 1500;
/// Receive queue index.
const RX: usize = 0;
/// Transmit queue index.
const TX: usize = 1;
/// Worker descriptor indices: the two queue eventfds, then the back end.
const BACKEND: usize = 2;

/// Where a virtio-net device's frames go and come from.
pub trait NetBackend: Send {
    /// Sends one Ethernet frame (without a virtio header). An error drops it.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf` without blocking: `Ok(Some(len))`, or
    /// `Ok(None)` when none is waiting. A frame longer than `buf` is an error
    /// (and is dropped by the back end).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// A descriptor that is readable when [`NetBackend::recv`] may have a frame.
    fn ready_fd(&self) -> RawFd;
}

/// Frame counters of a device, shared with its owner.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames the guest sent that the back end took.
    pub tx_frames: AtomicU64,
    /// Frames the guest sent that were dropped (malformed, too long, back end error).
    pub tx_dropped: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames from the back end that were dropped (the guest's buffer too small,
    /// back end error).
    pub rx_dropped: AtomicU64,
}

impl NetStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The guest-visible identity of a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address.
    pub mac: [u8; 6],
    /// MTU offered to the guest (68..=65535 - 14).
    pub mtu: u16,
}

/// Why a virtio-net device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An MTU outside what Ethernet and the frame bound allow.
    #[error("MTU {0} is outside 68..={max}", max = MAX_FRAME - 14)]
    Mtu(u16),
}

/// A virtio-net device.
pub struct Net {
    config: NetConfig,
    config_space: [u8; 12],
    stats: Arc<NetStats>,
    backend: Option<Box<dyn NetBackend>>,
    worker: Option<Worker<Running>>,
}

/// What the worker thread owns while the device runs.
struct Running {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    events: [EventFd; 2],
    interrupt: Arc<VirtioInterrupt>,
    backend: Box<dyn NetBackend>,
    stats: Arc<NetStats>,
    /// A received frame that found no guest buffer yet.
    pending: Option<Vec<u8>>,
    /// The back end failed to receive (closed, out of step): it is not read
    /// again, so a dead back end's always-readable descriptor cannot spin us.
    backend_failed: bool,
    /// Scratch buffers, [`MAX_FRAME`] each.
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

impl Net {
    /// A NIC with `config` whose frames go to and come from `backend`.
    pub fn new(config: NetConfig, backend: Box<dyn NetBackend>) -> Result<Net, NetError> {
        if !(68..=(MAX_FRAME - 14) as u16).contains(&config.mtu) {
            return Err(NetError::Mtu(config.mtu));
        }
        let mut config_space = [0u8; 12];
        config_space[..6].copy_from_slice(&config.mac);
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config_space[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        config_space[10..12].copy_from_slice(&config.mtu.to_le_bytes());
        Ok(Net { config, config_space, stats: Arc::default(), backend: Some(backend), worker: None })
    }

    /// The device's identity.
    pub fn config(&self) -> NetConfig {
        self.config
    }

    /// The frame counters (live while the device runs).
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    fn stop_worker(&mut self) -> Option<Running> {
        let running = self.worker.take()?.stop()?;
        Some(running)
    }
}

impl Running {
    fn on_event(&mut self, index: usize, interest: &Interest) {
        let mut notify = false;
        match index {
            TX => {
                drain_eventfd(&self.events[TX]);
                notify |= self.transmit();
            }
            RX => {
                // The driver added receive buffers: take the back end again.
                drain_eventfd(&self.events[RX]);
                if !self.backend_failed {
                    interest.set(BACKEND, true);
                }
                notify |= self.receive(interest);
            }
            _ => notify |= self.receive(interest),
        }
        if notify {
            self.interrupt.signal_used_queue();
        }
    }

    /// Sends every frame the guest queued; returns whether to interrupt.
    fn transmit(&mut self) -> bool {
        let (mem, backend, stats, buf) = (&self.mem, &mut self.backend, &self.stats, &mut self.tx_buf);
        drain_queue(mem, &mut self.tx, |chain| {
            match frames::read_tx_frame(mem, chain, buf) {
                Ok(frame) => match backend.send(frame) {
                    Ok(()) => NetStats::bump(&stats.tx_frames),
                    Err(e) => {
                        tracing::debug!("virtio-net: back end refused a frame: {e}");
                        NetStats::bump(&stats.tx_dropped);
                    }
                },
                Err(e) => {
                    tracing::debug!("virtio-net: dropping a transmit chain: {e}");
                    NetStats::bump(&stats.tx_dropped);
                }
            }
            Some(0)
        })
    }

    /// Moves frames from the back end into receive buffers until one side runs
    /// dry; returns whether to interrupt.
    fn receive(&mut self, interest: &Interest) -> bool {
        let mut used = false;
        loop {
            if self.pending.is_none() {
                if self.backend_failed {
                    break;
                }
                match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(len)) => self.pending = Some(self.rx_buf[..len].to_vec()),
                    Ok(None) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("virtio-net: the back end failed, the guest receives nothing more: {e}");
                        self.backend_failed = true;
                        interest.set(BACKEND, false);
                        break;
                    }
                }
            }
            let Some(chain) = next_rx_chain(&self.mem, &mut self.rx) else {
                // No guest buffer: keep the frame, stop waiting on the back end
                // until the driver adds buffers (the RX queue notification).
                interest.set(BACKEND, false);
                break;
            };
            let frame = self.pending.take().expect("a frame is pending here");
            let head = chain.head_index();
            let len = match frames::write_rx_frame(&self.mem, chain, &frame) {
                Ok(len) => {
                    NetStats::bump(&self.stats.rx_frames);
                    len
                }
                Err(e) => {
                    tracing::debug!("virtio-net: dropping a received frame: {e}");
                    NetStats::bump(&self.stats.rx_dropped);
                    0
                }
            };
            used |= add_used(&self.mem, &mut self.rx, head, len);
        }
        used && needs_notification(&self.mem, &mut self.rx)
    }
}

/// The next receive chain; when there is none, notifications are re-enabled so
/// the driver kicks the RX queue when it adds buffers (looking once more if
/// some arrived in between; a corrupt available index just yields none).
fn next_rx_chain<'a>(mem: &'a GuestMemory, rx: &mut Queue) -> Option<DescriptorChain<&'a GuestMemory>> {
    for _ in 0..2 {
        if let Some(chain) = rx.pop_descriptor_chain(mem) {
            return Some(chain);
        }
        match rx.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!("virtio-net: cannot enable RX notifications: {e}");
                return None;
            }
        }
    }
    None
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_STATUS)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if let Some(r) = self.stop_worker() {
            self.backend = Some(r.backend);
        }
        let Activation { mem, queues, queue_events, interrupt, .. } = a;
        let (Ok([rx, tx]), Ok([rx_event, tx_event])) =
            (<[Queue; 2]>::try_from(queues), <[EventFd; 2]>::try_from(queue_events))
        else {
            return Err(ActivateError::BadSetup("virtio-net needs its receive and transmit queues".into()));
        };
        if !rx.ready() || !tx.ready() {
            return Err(ActivateError::BadSetup("virtio-net queues not ready".into()));
        }
        let backend = self.backend.take().ok_or_else(|| ActivateError::Backend("virtio-net has no back end".into()))?;
        let fds = [rx_event.as_raw_fd(), tx_event.as_raw_fd(), backend.ready_fd()];
        // Chains queued before activation (or before a snapshot) are served at once.
        kick(&tx_event);
        let running = Running {
            mem,
            rx,
            tx,
            events: [rx_event, tx_event],
            interrupt,
            backend,
            stats: self.stats.clone(),
            pending: None,
            backend_failed: false,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: vec![0; MAX_FRAME],
        };
        let worker = Worker::spawn_with_interest("virtio-net", &fds, &[], running, |r, index, interest| {
            r.on_event(index, interest)
        })
        .map_err(|e| ActivateError::Backend(format!("virtio-net worker: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(r) = self.stop_worker() {
            self.backend = Some(r.backend);
        }
    }

    fn pause(&mut self) -> Option<Vec<Queue>> {
        // A frame waiting for a guest buffer is dropped, as a paused NIC drops.
        let r = self.stop_worker()?;
        self.backend = Some(r.backend);
        Some(vec![r.rx, r.tx])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
