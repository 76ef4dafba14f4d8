//! virtio-rng (device type 4): one queue of device-writable buffers filled from
//! the host's /dev/urandom.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestMemoryBackend, ReadVolatile};
use vmm_sys_util::eventfd::EventFd;

use crate::worker::{drain_eventfd, drain_queue, take_single_queue, Worker};
use crate::{device_type, ActivateError, Activation, GuestMemory, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request.
pub const MAX_BYTES_PER_REQUEST: u64 = 64 << 10;
/// Default entropy source.
pub const DEFAULT_SOURCE: &str = "/dev/urandom";

/// Why the entropy source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Opening the source failed.
    #[error("cannot open entropy source {}: {source}", path.display())]
    Open {
        /// The source.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A virtio-rng device.
pub struct Rng {
    source: Arc<File>,
    worker: Option<Worker<Running>>,
}

/// What the worker thread owns while the device runs.
struct Running {
    source: Arc<File>,
    mem: GuestMemory,
    queue: Queue,
    event: EventFd,
    interrupt: Arc<VirtioInterrupt>,
}

impl Running {
    fn on_notify(&mut self) {
        drain_eventfd(&self.event);
        if process_queue(&self.source, &self.mem, &mut self.queue) {
            self.interrupt.signal_used_queue();
        }
    }
}

impl Rng {
    /// An entropy device reading /dev/urandom.
    pub fn new() -> Result<Rng, RngError> {
        Rng::with_source(DEFAULT_SOURCE)
    }

    /// An entropy device reading `path` (a character device such as /dev/urandom).
    pub fn with_source(path: impl AsRef<Path>) -> Result<Rng, RngError> {
        let path = path.as_ref();
        let source = File::open(path).map_err(|source| RngError::Open { path: path.to_path_buf(), source })?;
        Ok(Rng { source: Arc::new(source), worker: None })
    }

    /// Fills every buffer available on `queue` synchronously; returns whether the
    /// driver must be interrupted.
    pub fn process_queue(&self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        process_queue(&self.source, mem, queue)
    }

    fn stop_worker(&mut self) -> Option<Running> {
        self.worker.take()?.stop()
    }
}

fn process_queue(source: &File, mem: &GuestMemory, queue: &mut Queue) -> bool {
    drain_queue(mem, queue, |chain| Some(fill_chain(source, mem, chain)))
}

/// Writes random bytes into the chain's device-writable descriptors (at most
/// [`MAX_BYTES_PER_REQUEST`]); returns the bytes written. Readable descriptors
/// are skipped; a descriptor outside guest memory ends the request.
fn fill_chain(mut source: &File, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
    let mut written: u64 = 0;
    for desc in chain.writable() {
        if written == MAX_BYTES_PER_REQUEST {
            break;
        }
        let want = u64::from(desc.len()).min(MAX_BYTES_PER_REQUEST - written);
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), want as usize) {
            let mut slice = match slice {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("virtio-rng: buffer outside guest memory: {e}");
                    return written as u32;
                }
            };
            if let Err(e) = source.read_exact_volatile(&mut slice) {
                tracing::warn!("virtio-rng: reading the entropy source: {e}");
                return written as u32;
            }
            written += slice.len() as u64;
        }
    }
    // `written <= MAX_BYTES_PER_REQUEST`.
    written as u32
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | crate::VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let (queue, event, mem, interrupt) = take_single_queue(a, "virtio-rng")?;
        let fds = [event.as_raw_fd()];
        let running = Running { source: self.source.clone(), mem, queue, event, interrupt };
        let worker = Worker::spawn("virtio-rng", &fds, &[], running, |r, _| r.on_notify())
            .map_err(|e| ActivateError::Backend(format!("virtio-rng worker: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn pause(&mut self) -> Option<Vec<Queue>> {
        self.stop_worker().map(|r| vec![r.queue])
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
