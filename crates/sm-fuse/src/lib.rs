//! virtio-fs for supermachine: a host directory passed through to the guest,
//! served in the VMM process (no virtiofsd), contained by construction.
//!
//! - [`FuseServer`] answers FUSE requests (the protocol Linux 6.1 speaks,
//!   ABI structs from `fuse-abi`) for one shared directory, read-write or
//!   read-only. Every host call is relative to an `O_PATH` fd of the share
//!   (see [`sys`]): names are single components, lookups are `openat2` with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, symlinks
//!   are stored and read back but never followed on the host, device nodes are
//!   never created, and the inode and open-file tables are bounded.
//! - [`VirtioFs`] is the device (type 26, hiprio + request queue) on
//!   sm-virtio's transport traits; the guest mounts it with
//!   `mount -t virtiofs TAG DIR`.
//!
//! Why not fuse-backend-rs or virtiofsd: both pin vm-memory 0.17.1, a second
//! copy beside the workspace's 0.18 whose types do not mix with ours (its
//! Reader/Writer would not take our guest memory), and virtiofsd is a
//! separate vhost-user daemon, which would put the share outside the VMM's
//! sandbox and snapshots. The server here is small and copies each request
//! and reply once; with a DAX window ([`DaxWindow`]) file pages are mapped
//! into the guest instead of copied.

mod dax;
mod device;
mod io;
mod persist;
mod request;
mod server;
pub mod sys;
mod tables;

pub use dax::{DaxMapping, DaxWindow, DAX_PAGE, DAX_RANGE};
pub use device::{serve_chain, FsDeviceError, VirtioFs, QUEUE_SIZE, TAG_LEN};
pub use persist::{SessionError, SessionReport};
pub use server::{FuseServer, ShareConfig, ShareError, MAX_IO, MAX_REQUEST};

#[cfg(test)]
mod dax_tests;
#[cfg(test)]
mod persist_tests;
#[cfg(test)]
mod tests;
