use std::path::PathBuf;

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hypervisor backend failed.
    #[error(transparent)]
    Hypervisor(#[from] sm_hypervisor::Error),
    /// An aarch64 guest could not be prepared (kernel image, device tree).
    #[error(transparent)]
    Aarch64Boot(#[from] crate::arch::aarch64::BootError),
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The kernel image is missing.
    #[error("kernel image {path} not found: build one with `cargo xtask kernel` or pass another path")]
    KernelNotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The kernel image could not be read or loaded.
    #[error("kernel image {path} cannot be loaded: {reason}")]
    KernelInvalid {
        /// The kernel file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The initrd could not be read or does not fit.
    #[error("initrd {path}: {reason}")]
    Initrd {
        /// The initrd file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// An OS operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM is not in a state that allows the operation.
    #[error("{0}")]
    State(String),
    /// A snapshot file could not be opened, read, mapped or written (its
    /// OS error kept: ENOMEM or EMFILE say nothing about the file).
    #[error(transparent)]
    Snapshot(#[from] sm_snapshot::Error),
    /// A snapshot file is sound but its contents cannot be restored here: a
    /// missing or undecodable section, or taken with other devices.
    #[error("snapshot {path}: {reason}")]
    SnapshotContents {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
}

impl Error {
    /// True when the snapshot itself can never be restored (damaged, another
    /// format version, contents or devices that do not fit, vCPU or device
    /// state this build or the backend refuses as invalid: restore turns
    /// those into [`Error::SnapshotContents`]), so that deleting and
    /// re-taking it is the remedy.
    /// False for what may pass (out of memory, out of descriptors, a device
    /// file in use): such an error says nothing against the snapshot.
    pub fn snapshot_is_unusable(&self) -> bool {
        matches!(
            self,
            Error::Snapshot(sm_snapshot::Error::Invalid { .. } | sm_snapshot::Error::Version { .. })
                | Error::SnapshotContents { .. }
                | Error::Hypervisor(sm_hypervisor::Error::InvalidState(_))
        )
    }
}

/// Result alias of the VMM.
pub type Result<T> = std::result::Result<T, Error>;
