//! virtio-blk (device type 2) backed by a host file or block device.
//!
//! One request queue served by a worker thread. Reads and writes go straight
//! between the file (pread/pwrite) and guest memory; FLUSH is fdatasync. A
//! read-only disk offers VIRTIO_BLK_F_RO and answers writes with IOERR.

mod disk;
mod request;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk as blk;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::worker::{drain_eventfd, take_single_queue, Worker};
use crate::{
    device_type, read_config_bytes, ActivateError, Activation, GuestMemory, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use disk::Disk;
pub use request::{MAX_REQUEST_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = blk::VIRTIO_BLK_ID_BYTES as usize;
/// Request queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request announced in `seg_max` (header and status take two
/// descriptors of a queue-sized chain).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

// Features (virtio-bindings gives the bit numbers; these are the masks).
/// Feature: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
/// Feature: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
/// Feature: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << blk::VIRTIO_BLK_F_BLK_SIZE;
/// Feature: FLUSH requests (the driver enables its write cache).
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;
/// Feature: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub use crate::VIRTIO_RING_F_EVENT_IDX;

/// Bytes of `struct virtio_blk_config` served (up to and including num_queues).
const CONFIG_LEN: usize = std::mem::offset_of!(blk::virtio_blk_config, max_discard_sectors);

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {} ({}): {source}", path.display(), if *read_only { "read-only" } else { "read-write" })]
    Open {
        /// The image.
        path: PathBuf,
        /// Requested mode.
        read_only: bool,
        /// The OS error.
        source: io::Error,
    },
    /// The image size could not be determined.
    #[error("cannot determine the size of disk image {}: {source}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path is a directory.
    #[error("disk image {} is a directory", path.display())]
    NotADisk {
        /// The path.
        path: PathBuf,
    },
    /// Another device (this process or another) has the image open in a
    /// conflicting mode: one writer or many readers.
    #[error(
        "disk image {} is in use by another VM ({}); a disk written by two VMs at once is corrupted",
        path.display(),
        if *read_only { "it is open read-write there" } else { "it is open there" }
    )]
    InUse {
        /// The image.
        path: PathBuf,
        /// The mode this open asked for.
        read_only: bool,
    },
    /// The serial does not fit GET_ID's 20 bytes.
    #[error("disk id {id:?} is longer than 20 bytes")]
    IdTooLong {
        /// The id given.
        id: String,
    },
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    worker: Option<Worker<Running>>,
    announce_capacity_after_restore: bool,
}

/// What the worker thread owns while the device runs.
struct Running {
    disk: Arc<Disk>,
    mem: GuestMemory,
    queue: Queue,
    event: EventFd,
    interrupt: Arc<VirtioInterrupt>,
}

impl Running {
    fn on_notify(&mut self) {
        drain_eventfd(&self.event);
        if request::process_queue(&self.disk, &self.mem, &mut self.queue) {
            self.interrupt.signal_used_queue();
        }
    }
}

impl Block {
    /// Opens `path` (read-write unless `read_only`). `id` is the serial returned
    /// by GET_ID (at most 20 bytes); without one a serial is derived from the
    /// file's device and inode numbers.
    pub fn new(path: impl AsRef<Path>, read_only: bool, id: Option<String>) -> Result<Block, BlockError> {
        let disk = Disk::open(path.as_ref(), read_only, id)?;
        tracing::debug!(path = %path.as_ref().display(), read_only, sectors = disk.capacity(), "virtio-blk: disk opened");
        Ok(Block { disk: Arc::new(disk), worker: None, announce_capacity_after_restore: false })
    }

    /// After a restore, tells the guest (a configuration-change interrupt)
    /// to re-read the capacity: for a disk that may differ from the one the
    /// snapshot was taken with (a volume in a slot baked with a placeholder).
    pub fn announce_capacity_after_restore(mut self) -> Self {
        self.announce_capacity_after_restore = true;
        self
    }

    /// Size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity()
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// The GET_ID serial (zero padded).
    pub fn id(&self) -> [u8; ID_BYTES] {
        *self.disk.id()
    }

    /// Serves every request available on `queue` synchronously; returns whether
    /// the driver must be interrupted (the caller signals). This is what the
    /// worker thread runs on each notification.
    pub fn process_queue(&self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        request::process_queue(&self.disk, mem, queue)
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.disk.capacity().to_le_bytes());
        // 8..12 size_max: not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20 geometry: not offered.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // 24..32 topology, 32 writeback, 33 unused: zero.
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    fn stop_worker(&mut self) -> Option<Running> {
        self.worker.take()?.stop()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX;
        if self.disk.read_only() {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let announce = a.restored && self.announce_capacity_after_restore;
        let (queue, event, mem, interrupt) = take_single_queue(a, "virtio-blk")?;
        if announce {
            interrupt.signal_config_change();
        }
        let fds = [event.as_raw_fd()];
        let running = Running { disk: self.disk.clone(), mem, queue, event, interrupt };
        let worker = Worker::spawn("virtio-blk", &fds, &[], running, |r, _| r.on_notify())
            .map_err(|e| ActivateError::Backend(format!("virtio-blk worker: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn pause(&mut self) -> Option<Vec<Queue>> {
        // Requests are completed synchronously, so none is in flight here.
        self.stop_worker().map(|r| vec![r.queue])
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;
