//! `sm-agent`: the in-guest PID 1 and exec agent of a supermachine VM, the
//! protocol it speaks, and the host-side client.
//!
//! The crate owns:
//! - [`protocol`]: the versioned, framed host <-> agent wire protocol;
//! - [`client`]: [`client::AgentClient`], used by the host over any
//!   `Read + Write` stream (vsock in production, unix sockets in tests);
//! - [`server`]: the agent side — exec with pipes or a pty, streaming output,
//!   stdin, signals, timeouts, one reaper for all children (PID 1 duty), file
//!   transfer, clock and entropy after a snapshot restore;
//! - [`vsock`]: the AF_VSOCK listener the guest serves on;
//! - [`guest_init`]: PID 1 setup (mounts, optional overlay root from the
//!   kernel command line, hostname).
//!
//! The host links the library; the guest runs the `sm-agent` binary as
//! `/init`. Linux only, no async runtime: blocking threads per pipe keep the
//! syscall count low, which matters in a guest whose kernel is emulated.

/// Writes one `sm-agent: ...` line to stderr (the console when PID 1),
/// ignoring write errors: logging must never take PID 1 down.
macro_rules! agent_log {
    ($($arg:tt)*) => {
        $crate::log_line(format_args!($($arg)*))
    };
}

pub mod client;
pub mod guest_init;
pub mod guest_net;
pub mod protocol;
pub mod server;
pub mod vsock;

pub use client::{
    AgentClient, ClientError, ExecEvent, ExecOutcome, ExecOutput, ExecSession, ExecTimeline, RunningProcess, Tunnel,
    DEFAULT_OUTPUT_LIMIT, FILE_REQUEST_SILENCE, GREETING_TIMEOUT,
};
pub use protocol::{ErrorKind, ExecRequest, ExitReport, ExitStatus, GuestCost, Message, MountRequest, ProtocolError};
pub use server::Server;

/// The vsock port the agent listens on unless `sm.agent_port=` says otherwise.
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// The line prefix the agent prints once it is listening.
pub const READY_MARKER: &str = "SM_AGENT_READY";

#[doc(hidden)]
pub fn log_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "sm-agent: {args}");
}

/// Turns a libc return code into a `Result`, naming `what` failed (with errno).
pub(crate) fn check_rc(rc: libc::c_int, what: &str) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(rc)
    }
}
