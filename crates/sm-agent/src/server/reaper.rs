//! The one place that waits for children.
//!
//! As PID 1 the agent inherits every orphan of the guest and must reap them,
//! which takes `wait(-1)`; but a plain `waitpid(-1)` loop would steal the exit
//! statuses the exec handlers are waiting for. So exactly one reaper thread
//! waits, and hands the status of each registered pid to its handler through
//! a channel; unregistered pids (orphans) are just reaped.
//!
//! Races are closed with one lock:
//! - spawning and registering a pid happen under the lock, and the reaper
//!   reaps only under the lock, so a fast-exiting child is never reaped
//!   before its handler is registered;
//! - the reaper first *peeks* at an exited child (`waitid(WNOWAIT)`, leaving
//!   the zombie in place), then takes the lock and reaps that pid. A pid
//!   therefore stays a zombie — and cannot be recycled — until its
//!   registration is removed, so signalling a registered pid under the lock
//!   can never hit an unrelated process.
//! - when there are no children at all, the reaper sleeps on a condvar until
//!   the next spawn instead of spinning on `ECHILD`. (Without children there
//!   are no descendants that could be re-parented to us either.)

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Condvar, Mutex, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::lock;
use crate::protocol::ExitStatus;

/// A reaped child.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reaped {
    pub(crate) status: ExitStatus,
    /// When it was reaped (the exec's end time).
    pub(crate) at: Instant,
    /// Its resource usage (with its waited-for children), from `wait4`.
    pub(crate) usage: ChildUsage,
}

/// The part of a reaped child's `rusage` an exec reports.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ChildUsage {
    pub(crate) user_us: u64,
    pub(crate) system_us: u64,
    pub(crate) minor_faults: u64,
    pub(crate) major_faults: u64,
}

/// A `timeval` as microseconds (negative fields count as 0).
pub(crate) fn timeval_us(t: libc::timeval) -> u64 {
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let micros = u64::try_from(t.tv_usec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

impl From<&libc::rusage> for ChildUsage {
    fn from(r: &libc::rusage) -> Self {
        ChildUsage {
            user_us: timeval_us(r.ru_utime),
            system_us: timeval_us(r.ru_stime),
            minor_faults: u64::try_from(r.ru_minflt).unwrap_or(0),
            major_faults: u64::try_from(r.ru_majflt).unwrap_or(0),
        }
    }
}

struct RegistryState {
    waiters: HashMap<libc::pid_t, Sender<Reaped>>,
    /// Incremented by every spawn; the idle reaper waits for a change.
    spawns: u64,
    /// The reaper is waiting on `children_spawned` (so spawns must notify).
    reaper_idle: bool,
}

/// Registered children and the reaper that serves them.
pub(crate) struct ChildRegistry {
    state: Mutex<RegistryState>,
    children_spawned: Condvar,
}

static REGISTRY: OnceLock<ChildRegistry> = OnceLock::new();
static REAPER_STARTED: Once = Once::new();

impl ChildRegistry {
    /// The process-wide registry; starts the reaper thread on first use.
    pub(crate) fn global() -> &'static ChildRegistry {
        let registry = REGISTRY.get_or_init(|| ChildRegistry {
            state: Mutex::new(RegistryState { waiters: HashMap::new(), spawns: 0, reaper_idle: false }),
            children_spawned: Condvar::new(),
        });
        REAPER_STARTED.call_once(|| {
            let spawned = thread::Builder::new()
                .name("sm-reaper".into())
                .stack_size(super::WORKER_STACK)
                .spawn(move || registry.reap_forever());
            if let Err(e) = spawned {
                agent_log!("cannot start the child reaper: {e}; exits will not be reported");
            }
        });
        registry
    }

    /// Runs `start` (which spawns a child and returns its pid) and registers
    /// the child; the receiver gets its status. Nothing else may wait for it.
    pub(crate) fn spawn<E>(
        &self,
        start: impl FnOnce() -> Result<libc::pid_t, E>,
    ) -> Result<(libc::pid_t, Receiver<Reaped>), E> {
        let mut state = lock(&self.state);
        let pid = start()?;
        let (tx, rx) = mpsc::channel();
        state.waiters.insert(pid, tx);
        state.spawns += 1;
        let wake = state.reaper_idle;
        drop(state);
        if wake {
            self.children_spawned.notify_one();
        }
        Ok((pid, rx))
    }

    /// Sends `signo` to registered child `pid` (its whole process group if
    /// `group`). `Ok(false)` if `pid` has already been reaped.
    pub(crate) fn signal(&self, pid: libc::pid_t, signo: i32, group: bool) -> io::Result<bool> {
        let state = lock(&self.state);
        if !state.waiters.contains_key(&pid) {
            return Ok(false);
        }
        let target = if group { -pid } else { pid };
        // SAFETY: kill takes plain integers. `pid` is registered and only
        // reaped under this lock, so it is alive or a zombie: it cannot have
        // been recycled for another process (nor its process group id).
        let rc = unsafe { libc::kill(target, signo) };
        drop(state);
        if rc == 0 {
            Ok(true)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn reap_forever(&self) -> ! {
        loop {
            let spawns_seen = lock(&self.state).spawns;
            // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `info` is a valid, writable siginfo_t; WNOWAIT leaves
            // the child a zombie (it is reaped below, under the lock).
            let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc == 0 {
                // SAFETY: waitid succeeded for WEXITED, so the kernel filled
                // in the child fields of `info`, including si_pid.
                let pid = unsafe { info.si_pid() };
                if pid > 0 {
                    self.reap(pid);
                }
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ECHILD) => self.wait_for_spawn(spawns_seen),
                _ => {
                    agent_log!("waitid failed: {err}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Reaps zombie `pid` and hands its status to the registered handler.
    fn reap(&self, pid: libc::pid_t) {
        let mut state = lock(&self.state);
        let mut raw: libc::c_int = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `raw` and `usage` are valid out-pointers; WNOHANG never
        // blocks (the pid may meanwhile have been reaped by the spawn-failure path).
        let rc = unsafe { libc::wait4(pid, &mut raw, libc::WNOHANG, &mut usage) };
        if rc != pid {
            return;
        }
        let at = Instant::now();
        let waiter = state.waiters.remove(&pid);
        drop(state);
        if let Some(tx) = waiter {
            // The handler may be gone (connection dropped); nothing to do then.
            let _ = tx.send(Reaped { status: decode_wait_status(raw), at, usage: ChildUsage::from(&usage) });
        }
    }

    fn wait_for_spawn(&self, spawns_seen: u64) {
        let mut state = lock(&self.state);
        while state.spawns == spawns_seen {
            state.reaper_idle = true;
            state = self.children_spawned.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.reaper_idle = false;
    }
}

/// A `waitpid` status as an exit code or a signal.
pub(crate) fn decode_wait_status(raw: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        ExitStatus::Signal(libc::WTERMSIG(raw))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(decode_wait_status(0), ExitStatus::Code(0));
        assert_eq!(decode_wait_status(3 << 8), ExitStatus::Code(3));
        assert_eq!(decode_wait_status(9), ExitStatus::Signal(9));
        assert_eq!(decode_wait_status(15 | 0x80), ExitStatus::Signal(15)); // core dumped
    }
}
