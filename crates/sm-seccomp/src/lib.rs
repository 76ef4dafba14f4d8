//! Syscall confinement for the threads that run on a guest's behalf.
//!
//! A vCPU thread emulates MMIO for the guest and a device worker parses what
//! the guest put in its queues: if either is ever subverted by a hostile
//! guest, it must not be able to take the host with it. Each such thread
//! confines itself at start ([`confine_current_thread`]) with a seccomp
//! filter that kills the whole VMM process (`SECCOMP_RET_KILL_PROCESS`, the
//! death signal is SIGSYS) on any of the system calls listed in `DENIED`
//! (running programs, ptrace and reading or writing other processes' memory,
//! changing credentials, mounts or namespaces, loading kernel code or BPF,
//! io_uring, whose operations seccomp cannot see, keyrings, and the like), on
//! `clone` that makes a process or a namespace, and on every x32 call; a
//! second filter makes `clone3` fail with ENOSYS (its flags are out of a
//! filter's reach; the C library then uses `clone`). That is what an attacker
//! needs to leave the process, and nothing a device or vCPU thread ever does.
//!
//! This is a deny list, not yet Firecracker's per-thread allow list: the
//! threads keep file, socket, memory, thread and signal calls, which the
//! devices need (the FUSE server does file work for the guest; vsock connects
//! host sockets). The API thread is not confined (it starts passt). Filters
//! are inherited by threads a confined thread spawns.
//!
//! [`disable`] (the CLI's `--no-sandbox`, or `SM_NO_SANDBOX=1`) turns it off
//! for the process, for debugging with tools the filter would kill.

use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod filter;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub use filter::DENIED;

/// Why a thread could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built (the reason, kept from the first try).
    #[error("building the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused to install it.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[error("installing the seccomp filter: {0} (run with --no-sandbox to go without)")]
    Install(#[from] seccompiler::Error),
}

/// What runs on the thread being confined (for messages; the deny list is
/// the same for both kinds today).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread (guest MMIO and port I/O emulation).
    Vcpu,
    /// A virtio device worker (queue processing).
    DeviceWorker,
}

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns confinement off for this process (`--no-sandbox`); threads
/// confined before stay confined.
pub fn disable() {
    DISABLED.store(true, Ordering::Relaxed);
}

/// Whether threads will be confined: not after [`disable`] or with
/// `SM_NO_SANDBOX=1` in the environment.
pub fn enabled() -> bool {
    !DISABLED.load(Ordering::Relaxed) && std::env::var_os("SM_NO_SANDBOX").is_none_or(|v| v != "1")
}

/// Confines the calling thread (see the crate docs), unless confinement is
/// off. The filter is built once per process. Where there is no seccomp (not
/// Linux on x86-64), nothing happens.
pub fn confine_current_thread(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        filter::install()?;
        tracing::trace!(?kind, "seccomp filter installed");
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    let _ = kind;
    Ok(())
}

#[cfg(test)]
mod tests;
