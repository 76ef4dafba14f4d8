//! What can go wrong in the shim, and how containerd is told (ttrpc codes it
//! maps to its errdefs: not found, already exists, failed precondition...).

use std::path::PathBuf;

use containerd_shim::protos::ttrpc::{self, Code};

/// A failed task request.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The bundle's `config.json` is missing or not an OCI runtime spec.
    #[error("reading the bundle's OCI runtime spec {path}: {source}")]
    Spec {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// A request or spec asks for something this runtime cannot do.
    #[error("{0}")]
    InvalidArgument(String),
    /// Mounting the root file system containerd handed over failed.
    #[error("mounting the container's root file system ({fs_type} from {source_dir}) at {target}: {error}")]
    Mount {
        /// The mount's type (overlay, bind...).
        fs_type: String,
        /// Its source.
        source_dir: String,
        /// Where it was to go.
        target: PathBuf,
        /// Why it failed.
        #[source]
        error: std::io::Error,
    },
    /// Building, booting or talking to the VM failed.
    #[error(transparent)]
    Vm(#[from] sm_api::Error),
    /// The guest agent refused a request or the connection failed.
    #[error("the guest agent: {0}")]
    Agent(#[from] sm_api::agent::ClientError),
    /// A host file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// No such container or process in this shim.
    #[error("{0} not found")]
    NotFound(String),
    /// The name is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request does not fit the process's state (start twice, delete
    /// while running, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not offered by this runtime.
    #[error("{0} is not supported by the supermachine runtime")]
    Unimplemented(&'static str),
    /// The shim cannot take the request now (it is ending).
    #[error("{0}")]
    Unavailable(String),
}

impl ShimError {
    /// An [`ShimError::Io`] maker for `map_err`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
        let what = what.into();
        move |source| ShimError::Io { what, source }
    }

    fn code(&self) -> Code {
        match self {
            ShimError::Spec { .. } | ShimError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Unavailable(_) => Code::UNAVAILABLE,
            // No usable /dev/kvm: containerd shows it as "unavailable".
            ShimError::Vm(e) if e.is_hypervisor_unavailable() => Code::UNAVAILABLE,
            ShimError::Mount { .. } | ShimError::Vm(_) | ShimError::Agent(_) | ShimError::Io { .. } => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        // The whole chain: containerd shows this text to the user.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let part = s.to_string();
            if !text.contains(&part) {
                text.push_str(": ");
                text.push_str(&part);
            }
            source = s.source();
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), text))
    }
}

/// Results of the shim's own steps.
pub type Result<T, E = ShimError> = std::result::Result<T, E>;
