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
}
