use std::io;

/// Errors a hypervisor backend reports through the seam.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hypervisor device or framework cannot be used on this host.
    #[error("hypervisor unavailable: {0}")]
    Unavailable(String),
    /// An operation of the backend failed.
    #[error("{op} failed: {source}")]
    Backend {
        /// What was attempted, e.g. "KVM_CREATE_VCPU".
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The caller passed something the backend cannot accept.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A saved-state blob is malformed, truncated, of another version or backend.
    #[error("invalid saved state: {0}")]
    InvalidState(String),
    /// The backend does not implement this operation.
    #[error("not supported by this backend: {0}")]
    Unsupported(&'static str),
}

/// Result alias for the seam.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an OS error returned by backend operation `op`.
    pub fn backend(op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Backend { op, source: source.into() }
    }
}
