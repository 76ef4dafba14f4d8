//! The virtio-fs device (type 26): a high-priority queue (FORGET, INTERRUPT)
//! and one request queue, both served by the [`FuseServer`] on the device's
//! worker thread. A request is the chain's device-readable part (at most
//! [`MAX_REQUEST`] bytes, else it is refused unread); the reply goes into its
//! device-writable part.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use sm_virtio::worker::{drain_eventfd, drain_queue, Worker};
use sm_virtio::{
    device_type, read_config_bytes, ActivateError, Activation, DeviceMemory, DeviceStateError, GuestMemory, ShmRegion,
    VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::SessionError;
use crate::request;
use crate::server::{FuseServer, MAX_REQUEST};
use crate::sys::Errno;

/// The DAX window's shared-memory region id (`VIRTIO_FS_SHMCAP_ID_CACHE`).
pub const DAX_SHM_ID: u8 = 0;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 128;
/// The longest mount tag (`struct virtio_fs_config.tag`).
pub const TAG_LEN: usize = 36;

/// Why the device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FsDeviceError {
    /// The tag does not fit the config space or is empty.
    #[error("virtio-fs tag {0:?} must be 1..=36 bytes")]
    BadTag(String),
}

/// A virtio-fs device serving one share.
pub struct VirtioFs {
    server: Arc<FuseServer>,
    config: [u8; TAG_LEN + 4],
    worker: Option<Worker<Running>>,
    /// Guest-physical base of the DAX window, once the machine placed it.
    dax_base: Option<u64>,
}

struct Running {
    server: Arc<FuseServer>,
    mem: GuestMemory,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
}

impl Running {
    fn on_notify(&mut self, index: usize) {
        let (Some(event), Some(queue)) = (self.events.get(index), self.queues.get_mut(index)) else { return };
        drain_eventfd(event);
        let server = &self.server;
        let mem = &self.mem;
        if drain_queue(mem, queue, |chain| Some(serve_chain(server, mem, chain))) {
            self.interrupt.signal_used_queue();
        }
    }
}

impl VirtioFs {
    /// A device the guest mounts with `mount -t virtiofs <tag> <dir>`.
    pub fn new(tag: &str, server: FuseServer) -> Result<VirtioFs, FsDeviceError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsDeviceError::BadTag(tag.to_string()));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        // One request queue.
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(VirtioFs { server: Arc::new(server), config, worker: None, dax_base: None })
    }

    /// The server (its tables, for stats).
    pub fn server(&self) -> &FuseServer {
        &self.server
    }

    fn stop_worker(&mut self) -> Option<Running> {
        self.worker.take()?.stop()
    }
}

/// Serves one chain; returns the bytes written to it.
pub fn serve_chain(server: &FuseServer, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
    let mut request = Vec::new();
    let mut too_long = false;
    for desc in chain.clone().readable() {
        let len = desc.len() as usize;
        let room = MAX_REQUEST + 1 - request.len();
        let take = len.min(room);
        let start = request.len();
        request.resize(start + take, 0);
        if mem.read_slice(&mut request[start..], desc.addr()).is_err() {
            tracing::debug!("virtio-fs: request buffer outside guest memory");
            return 0;
        }
        if take < len || request.len() > MAX_REQUEST {
            too_long = true;
            break;
        }
    }
    let reply = if too_long {
        // Answer from the header alone; the rest is never buffered.
        request::Request::parse(&request).map(|(r, _)| request::error(r.header.unique, Errno(libc::E2BIG)))
    } else {
        server.handle(&request)
    };
    let Some(reply) = reply else { return 0 };
    let writable: Vec<(GuestAddress, usize)> = chain.writable().map(|d| (d.addr(), d.len() as usize)).collect();
    let capacity: usize = writable.iter().map(|(_, l)| l).sum();
    let reply = if reply.len() <= capacity {
        reply
    } else {
        // The driver gave too little room: say so instead of a cut reply.
        let unique = request::Request::parse(&request).map_or(0, |(r, _)| r.header.unique);
        let err = request::error(unique, Errno(libc::ERANGE));
        if err.len() > capacity {
            return 0;
        }
        err
    };
    let mut done = 0;
    for (addr, len) in writable {
        if done == reply.len() {
            break;
        }
        let n = len.min(reply.len() - done);
        if mem.write_slice(&reply[done..done + n], addr).is_err() {
            tracing::debug!("virtio-fs: reply buffer outside guest memory");
            return done as u32;
        }
        done += n;
    }
    done as u32
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let Activation { mem, queues, queue_events, interrupt, .. } = a;
        if queues.len() != 2 || queue_events.len() != 2 {
            return Err(ActivateError::BadSetup("virtio-fs needs its hiprio and request queues".into()));
        }
        if !queues.iter().all(virtio_queue::QueueT::ready) {
            return Err(ActivateError::BadSetup("virtio-fs queues not ready".into()));
        }
        let fds: Vec<_> = queue_events.iter().map(|e| e.as_raw_fd()).collect();
        // Requests may have been queued before activation (or a snapshot).
        for event in &queue_events {
            let _ = event.write(1);
        }
        let running = Running { server: self.server.clone(), mem, queues, events: queue_events, interrupt };
        let worker = Worker::spawn("virtio-fs", &fds, &self.host_paths(), running, |r, i| r.on_notify(i))
            .map_err(|e| ActivateError::Backend(format!("virtio-fs worker: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn host_paths(&self) -> Vec<sm_seccomp::FsRule> {
        vec![sm_seccomp::FsRule { path: self.server.root().to_path_buf(), writable: !self.server.read_only }]
    }

    fn pause(&mut self) -> Option<Vec<Queue>> {
        // Requests are served synchronously, so none is in flight here.
        self.stop_worker().map(|r| r.queues)
    }

    fn device_memory(&self) -> Vec<DeviceMemory> {
        self.server
            .dax_window()
            .map(|(host_addr, len)| DeviceMemory { id: DAX_SHM_ID, host_addr, len })
            .into_iter()
            .collect()
    }

    fn place_device_memory(&mut self, id: u8, guest_base: u64) {
        if id == DAX_SHM_ID {
            self.dax_base = Some(guest_base);
        }
    }

    fn shm_regions(&self) -> Vec<ShmRegion> {
        match (self.dax_base, self.server.dax_window()) {
            (Some(base), Some((_, len))) => vec![ShmRegion { id: DAX_SHM_ID, base, len }],
            _ => Vec::new(),
        }
    }

    fn save_state(&self) -> Result<Option<Vec<u8>>, DeviceStateError> {
        let (state, _report) = self.server.save_session().map_err(|e| DeviceStateError::Device(Box::new(e)))?;
        Ok(Some(state))
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), DeviceStateError> {
        self.stop_worker();
        match self.server.restore_session(state) {
            Ok(_report) => Ok(()),
            Err(e @ SessionError::Corrupt(_)) => Err(DeviceStateError::Corrupt(Box::new(e))),
            Err(e) => Err(DeviceStateError::Device(Box::new(e))),
        }
    }
}

impl Drop for VirtioFs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
