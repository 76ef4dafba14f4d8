//! Snapshot files of supermachine VMs.
//!
//! This crate owns the on-disk format (see [`format`]): a checksummed header, a
//! region table describing guest RAM, a table of opaque, checksummed state sections
//! (vCPU, VM devices, virtio transports and devices, machine config), and the guest
//! RAM itself, stored sparsely (zero pages are file holes) at a page-aligned offset
//! so it can be mapped straight into a new VM copy-on-write ([`SnapshotFile::map_ram`]).
//! Writes go to a temporary file renamed into place, so a crash never leaves a
//! half-written snapshot under the final name. Metadata is read without touching RAM.
//! Diff snapshots ([`diff`]) store only the pages changed since the parent a VM was
//! restored from; chains are restored or merged into a full snapshot.

pub mod diff;
pub mod format;
mod reader;
mod writer;

pub use diff::{merge_chain, populated_pages, private_pages, DiffBase, PageBitmap, SnapshotChain};
pub use format::{RamRegion, SectionKind, FORMAT_VERSION};
pub use reader::{discard_private_pages, SnapshotFile};
pub use writer::{write_snapshot, SnapshotContents, WriteStats};

/// Errors reading or writing snapshots.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a snapshot or is damaged.
    #[error("{path} is not a usable snapshot: {reason}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Written by an incompatible version of the format.
    #[error(
        "{path} uses snapshot format version {found}; this build reads version {FORMAT_VERSION}: take a new snapshot"
    )]
    Version {
        /// The file.
        path: std::path::PathBuf,
        /// Its version.
        found: u32,
    },
    /// Guest memory could not be mapped or read.
    #[error("guest memory: {0}")]
    Memory(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
