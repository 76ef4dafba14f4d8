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
//! Each such thread is also confined in the file system with Landlock
//! ([`FsRule`]): it can open nothing but what its VM's devices serve (a
//! virtio-fs share's directory, read-only or read-write as the share is), so
//! a subverted device cannot read or write the host's files; descriptors
//! opened before (disk images, console, sockets, KVM) stay usable. And it
//! drops its capabilities: all of them, or for a thread serving a share
//! only those file work as root needs (chown, DAC override, fowner, fsetid).
//!
//! The seccomp filter is a deny list, not yet Firecracker's per-thread allow list: the
//! threads keep file, socket, memory, thread and signal calls, which the
//! devices need (the FUSE server does file work for the guest; vsock connects
//! host sockets). The API thread is not confined (it starts passt). Filters
//! are inherited by threads a confined thread spawns.
//!
//! [`disable`] (the CLI's `--no-sandbox`, or `SM_NO_SANDBOX=1`) turns it off
//! for the process, for debugging with tools the filter would kill.

use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(target_os = "linux")]
mod capabilities;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod filter;
#[cfg(target_os = "linux")]
mod fs_rules;
#[cfg(target_os = "linux")]
pub use fs_rules::FsRule;

/// A host path a confined thread may still open below (Landlock is
/// Linux-only; elsewhere the rules are ignored).
#[cfg(not(target_os = "linux"))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsRule {
    /// A directory.
    pub path: std::path::PathBuf,
    /// Writes too, not only reads.
    pub writable: bool,
}
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
    /// The Landlock ruleset could not be made or applied.
    #[cfg(target_os = "linux")]
    #[error("confining the thread with Landlock: {0} (run with --no-sandbox to go without)")]
    Landlock(#[from] landlock::RulesetError),
    /// The thread's capabilities could not be dropped.
    #[cfg(target_os = "linux")]
    #[error("dropping the thread's capabilities: {0} (run with --no-sandbox to go without)")]
    Capabilities(#[from] caps::errors::CapsError),
    /// A path a device serves could not be opened for its Landlock rule.
    #[error("confining the thread with Landlock: opening {0}: {1}")]
    LandlockPath(std::path::PathBuf, String),
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
/// off: its capabilities dropped (all, or with `fs` all but file work's),
/// in the file system to `fs` (Landlock), then its system calls
/// (seccomp; the filter is built once per process). Where there is no
/// seccomp (not Linux on x86-64) or no Landlock (not Linux), those steps
/// are left out.
pub fn confine_current_thread(kind: ThreadKind, fs: &[FsRule]) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        capabilities::drop_capabilities(!fs.is_empty())?;
        fs_rules::restrict_current_thread(fs)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = fs;
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
