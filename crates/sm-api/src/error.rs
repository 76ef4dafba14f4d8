/// Errors of the public API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building, booting, snapshotting or restoring the VM failed.
    #[error(transparent)]
    Vmm(#[from] sm_vmm::Error),
    /// The hypervisor is unavailable or failed.
    #[error(transparent)]
    Hypervisor(#[from] sm_hypervisor::Error),
    /// Talking to the guest agent failed.
    #[error("guest agent: {0}")]
    Agent(#[from] sm_agent::ClientError),
    /// An image could not be resolved, stored or turned into a root disk.
    #[error(transparent)]
    Image(#[from] sm_oci::Error),
    /// The guest did not become ready.
    #[error("the guest did not become ready: {0}")]
    NotReady(String),
    /// The network back end could not be set up.
    #[error(transparent)]
    Network(#[from] sm_net::NetError),
    /// The network device could not be made.
    #[error("network device: {0}")]
    NetDevice(#[from] sm_virtio::net::NetError),
    /// A named volume could not be created, found or used.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// A disk could not be attached (missing, unreadable, or in use by another VM).
    #[error(transparent)]
    Disk(#[from] sm_virtio::block::BlockError),
    /// The guest could not mount a volume or shared directory (the VM and
    /// its snapshot are fine).
    #[error("mounting {target} in the guest: {source}")]
    Mount {
        /// The guest path.
        target: String,
        /// The agent's answer.
        #[source]
        source: sm_agent::ClientError,
    },
    /// A host directory could not be shared.
    #[error(transparent)]
    Share(#[from] sm_fuse::ShareError),
    /// A device could not be set up.
    #[error("device: {0}")]
    Device(String),
    /// A required file is missing.
    #[error("{0}")]
    Missing(String),
    /// This host cannot do what the configuration asks (e.g. SMP Linux on kvm_pvm).
    #[error("unsupported on this host: {0}")]
    Unsupported(String),
    /// The pool cannot hand out a VM.
    #[error("pool: {0}")]
    Pool(String),
    /// A call of the async facade (`sm_api::nonblocking`) did not finish: the
    /// blocking task running it panicked, or the tokio runtime shut down first.
    #[error("the blocking task of an async call did not finish: {0}")]
    Task(String),
    /// An OS operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether this host cannot run VMs at all (no usable /dev/kvm): a
    /// caller may answer "unavailable" rather than "failed".
    pub fn is_hypervisor_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Hypervisor(sm_hypervisor::Error::Unavailable(_))
                | Error::Vmm(sm_vmm::Error::Hypervisor(sm_hypervisor::Error::Unavailable(_)))
        )
    }
}
