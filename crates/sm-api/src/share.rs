//! Host directories shared into a VM (`-v /host/dir:/guest/path[:ro|rw][,dax]`,
//! e.g. `:ro,dax` or `:dax`):
//! each is a virtio-fs device served by sm-fuse inside the VMM process,
//! mounted by the agent before commands run. Contained: the guest reaches
//! nothing outside the directory (see `sm_fuse::sys`).
//!
//! Baked snapshots and shares: like volumes, a snapshot is baked with an
//! empty placeholder directory in each share slot (the key holds only the
//! number of shares) and every VM is a restore with the real directories,
//! which the agent then mounts: the FUSE session starts after the restore,
//! with the server of this process.

use std::path::PathBuf;

use sm_fuse::{FuseServer, ShareConfig, VirtioFs};
use sm_virtio::VirtioDevice;

use crate::{Error, Result};

/// A host directory and where the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareMount {
    /// The host directory.
    pub host_dir: PathBuf,
    /// Absolute path in the guest.
    pub guest_path: String,
    /// The guest may not change anything in it.
    pub read_only: bool,
    /// Give the device a DAX window of [`DAX_WINDOW_BYTES`] and mount with
    /// `dax=always`: the guest maps file pages from the host instead of
    /// copying them through the queue (see `sm_fuse::dax`).
    pub dax: bool,
}

/// The DAX window of a share with `dax` (the guest spends 64 bytes of RAM
/// per 4 KiB of it on page structures: 4 MiB).
pub const DAX_WINDOW_BYTES: u64 = 256 << 20;

impl ShareMount {
    /// `host_dir` at `guest_path`, read-write, without DAX.
    pub fn new(host_dir: impl Into<PathBuf>, guest_path: impl Into<String>) -> Self {
        ShareMount { host_dir: host_dir.into(), guest_path: guest_path.into(), read_only: false, dax: false }
    }
}

/// The virtio-fs tag of share slot `index`.
pub(crate) fn tag(index: usize) -> String {
    format!("sm-share-{index}")
}

/// One virtio-fs device per share, in order.
pub(crate) fn devices(shares: &[ShareMount]) -> Result<Vec<Box<dyn VirtioDevice>>> {
    shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let config = ShareConfig {
                read_only: s.read_only,
                dax_window: if s.dax { DAX_WINDOW_BYTES } else { 0 },
                ..ShareConfig::new(&s.host_dir)
            };
            let server = FuseServer::new(&config)?;
            let device = VirtioFs::new(&tag(i), server).map_err(|e| Error::Device(e.to_string()))?;
            Ok(Box::new(device) as Box<dyn VirtioDevice>)
        })
        .collect()
}
