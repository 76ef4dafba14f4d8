//! virtio-vsock (device type 19): guest CID, host<->guest stream sockets bridged
//! to host unix sockets (see [`muxer`] for the host-side convention).

mod connection;
pub mod muxer;
pub mod packet;
mod worker;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use muxer::{connect, connect_timeout, CONNECT_TIMEOUT};
pub use packet::DEFAULT_GUEST_CID;

use crate::{device_type, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use muxer::Muxer;
use worker::{Worker, WorkerQueues};

const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The socket path is taken by a live listener or is not a socket.
    #[error("vsock socket {path}: {reason}")]
    SocketPath {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Binding failed.
    #[error("binding vsock socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

struct RunningWorker {
    stop: EventFd,
    thread: JoinHandle<(WorkerQueues, Muxer)>,
}

/// A virtio-vsock device whose host side is the unix socket at `uds_path`.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    worker: Option<RunningWorker>,
    /// Connections kept across a pause, reused by the next activation.
    paused_muxer: Option<Muxer>,
}

impl Vsock {
    /// Creates the device and binds `uds_path` (a stale socket file nobody listens
    /// on is replaced; anything else there is an error).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            let err = |reason: &str| VsockError::SocketPath { path: uds_path.to_path_buf(), reason: reason.into() };
            if !meta.file_type().is_socket() {
                return Err(err("exists and is not a socket; remove it or choose another path"));
            }
            if UnixStream::connect(uds_path).is_ok() {
                return Err(err("another VM is listening on it"));
            }
            std::fs::remove_file(uds_path).map_err(|e| err(&format!("stale socket cannot be removed: {e}")))?;
        }
        let listener =
            UnixListener::bind(uds_path).map_err(|source| VsockError::Bind { path: uds_path.to_path_buf(), source })?;
        Ok(Vsock { guest_cid, uds_path: uds_path.to_path_buf(), listener, worker: None, paused_muxer: None })
    }

    /// The host-side socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn stop_worker(&mut self) -> Option<(WorkerQueues, Muxer)> {
        let w = self.worker.take()?;
        let _ = w.stop.write(1);
        match w.thread.join() {
            Ok(parts) => Some(parts),
            Err(_) => {
                tracing::error!("vsock worker panicked");
                None
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let Activation { mem, queues, queue_events, interrupt, restored, .. } = a;
        let mut queues = queues.into_iter();
        let mut events = queue_events.into_iter();
        let missing = || ActivateError::BadSetup("vsock needs rx, tx and event queues".into());
        let (rx, tx, event) = (
            queues.next().ok_or_else(missing)?,
            queues.next().ok_or_else(missing)?,
            queues.next().ok_or_else(missing)?,
        );
        let (rx_evt, tx_evt, event_evt) = (
            events.next().ok_or_else(missing)?,
            events.next().ok_or_else(missing)?,
            events.next().ok_or_else(missing)?,
        );
        let backend = |e: std::io::Error| ActivateError::Backend(e.to_string());
        let muxer = match self.paused_muxer.take() {
            Some(m) if !restored => m,
            _ => {
                let listener = self.listener.try_clone().map_err(backend)?;
                Muxer::new(self.guest_cid, self.uds_path.clone(), listener).map_err(backend)?
            }
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(backend)?;
        let q = WorkerQueues { mem, rx, tx, event, rx_evt, tx_evt, event_evt, interrupt };
        let mut worker = Worker::new(q, stop.try_clone().map_err(backend)?, muxer).map_err(backend)?;
        if restored {
            worker.send_transport_reset();
        }
        let thread = std::thread::Builder::new().name("vsock".into()).spawn(move || worker.run()).map_err(backend)?;
        self.worker = Some(RunningWorker { stop, thread });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.paused_muxer = None;
    }

    fn pause(&mut self) -> Option<Vec<virtio_queue::Queue>> {
        let (q, muxer) = self.stop_worker()?;
        self.paused_muxer = Some(muxer);
        Some(vec![q.rx, q.tx, q.event])
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests;
