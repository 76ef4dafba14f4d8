//! The one error type of this crate.

use std::io;
use std::path::Path;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while resolving, fetching, storing, unpacking or
/// packaging an image. Messages name the thing involved and, where there is one,
/// the way out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference does not parse.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference {
        /// What the user typed.
        input: String,
        /// Why it was refused.
        reason: String,
    },
    /// A digest string is malformed or uses an unsupported algorithm.
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest {
        /// The offending string.
        input: String,
        /// Why it was refused.
        reason: String,
    },
    /// Content does not hash to the digest it was announced with.
    #[error("digest mismatch for {what}: expected {expected}, got {actual} (corrupted or tampered content, refused)")]
    DigestMismatch {
        /// Which blob or layer.
        what: String,
        /// The announced digest.
        expected: String,
        /// The digest of the bytes actually received.
        actual: String,
    },
    /// Content is shorter or longer than its descriptor says.
    #[error(
        "size mismatch for {what}: expected {expected} bytes, got {actual} (truncated or corrupted content, refused)"
    )]
    SizeMismatch {
        /// Which blob.
        what: String,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes actually received.
        actual: u64,
    },
    /// The registry wants credentials, or refused the ones given.
    #[error("registry {registry} denied access to {reference}: {detail} (authentication required: pass credentials, e.g. username/password)")]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// Full reference.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The manifest or blob does not exist at the source.
    #[error("not found: {0}")]
    NotFound(String),
    /// Any other registry / transport failure (after retries when transient).
    #[error("registry {registry}: {detail}")]
    Registry {
        /// Registry host.
        registry: String,
        /// Error text.
        detail: String,
    },
    /// An image index has no manifest for the wanted platform.
    #[error("{reference} has no image for platform {platform} (available: {available})")]
    NoMatchingPlatform {
        /// The image.
        reference: String,
        /// The wanted platform, e.g. linux/amd64.
        platform: String,
        /// Platforms listed in the index.
        available: String,
    },
    /// Structurally invalid or unsupported image content (manifest, config, layout).
    #[error("invalid image {what}: {detail}")]
    InvalidImage {
        /// The image or file involved.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// A layer entry that would escape the target or create something refused.
    #[error("refusing layer entry {path:?}: {reason}")]
    UnsafeEntry {
        /// Path as written in the layer.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// A layer stream that is not a valid (compressed) tar: truncated or corrupted.
    #[error("corrupted or truncated layer {layer}: {detail}")]
    CorruptLayer {
        /// Layer digest (or a description).
        layer: String,
        /// Decoder error.
        detail: String,
    },
    /// An image name that is not in the local store.
    #[error("image {0:?} is not in the local store (pull or import it first)")]
    ImageNotInStore(String),
    /// Neither the image nor the user gave a command.
    #[error("no command to run: the image has no Entrypoint or Cmd; give a command after the image name")]
    NoCommand,
    /// An external tool is missing.
    #[error("{tool} not found: install it with `apt-get install {package}`")]
    MissingTool {
        /// Program name.
        tool: String,
        /// Debian package that ships it.
        package: String,
    },
    /// An external tool ran and failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// Program name.
        tool: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// Filesystem error with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    pub(crate) fn invalid(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::InvalidImage { what: what.into(), detail: detail.to_string() }
    }

    /// True for authentication/authorization failures.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Error::Unauthorized { .. })
    }

    /// True when content failed integrity checks (digest, size, corrupt stream).
    pub fn is_integrity(&self) -> bool {
        matches!(self, Error::DigestMismatch { .. } | Error::SizeMismatch { .. } | Error::CorruptLayer { .. })
    }
}

/// Attach a context string to io errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
    fn at(self, what: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
    fn at(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(format!("{what} {}", path.display()), e))
    }
}

impl<T> IoContext<T> for std::result::Result<T, rustix::io::Errno> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e.into()))
    }
    fn at(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(format!("{what} {}", path.display()), e.into()))
    }
}
