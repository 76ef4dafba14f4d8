use std::io;
use std::path::PathBuf;

/// Why a network back end could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The passt program is not installed.
    #[error("{} not found: guest networking needs passt (apt-get install {package}), or use --network none", path.display())]
    PasstMissing {
        /// Where it was looked for.
        path: PathBuf,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// Making the socketpair to passt failed.
    #[error("creating the socketpair for passt: {0}")]
    Socket(#[source] io::Error),
    /// passt did not start.
    #[error("starting {}: {source}", path.display())]
    Spawn {
        /// The program.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// passt started and exited at once.
    #[error("passt exited at start ({status}): {stderr}")]
    Exited {
        /// How it ended.
        status: std::process::ExitStatus,
        /// The end of what it printed.
        stderr: String,
    },
    /// A `-p` value that does not parse.
    #[error("published port {spec:?}: {reason}")]
    BadPort {
        /// The value as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A host port to publish cannot be listened on.
    #[error("cannot publish host port {addr}: {source} (is another program using it?)")]
    PortUnavailable {
        /// Address and port.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// A TLS certificate or key file that cannot be read or parsed.
    #[error("TLS: {}: {source}", path.display())]
    TlsPem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// The self-signed certificate's files cannot be written.
    #[error("TLS: writing {}: {source}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A key rustls cannot take.
    #[error("TLS: unusable private key: {why}")]
    TlsKey {
        /// What is wrong.
        why: String,
    },
    /// rustls refused the certificate and key (for example, they do not match).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Making a self-signed certificate failed.
    #[error("TLS: making a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    /// A port is published with `/tls` but no certificate was given.
    #[error("published port {port} asks for TLS but no certificate was given (PasstOptions::tls)")]
    TlsIdentityMissing {
        /// The port.
        port: String,
    },
    /// A TAP interface that cannot be used as it is.
    #[error("TAP interface {name:?}: {why}")]
    Tap {
        /// The interface name.
        name: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// Attaching to a TAP interface failed.
    #[error("TAP interface {name:?}: {what}: {source}{hint}")]
    TapIo {
        /// The interface name.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
        /// A likely cause, or empty.
        hint: &'static str,
    },
}
