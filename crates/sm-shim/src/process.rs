//! One process of a container (its init — the bundle's process — or an
//! exec): its state as containerd asks for it, its stdio, the running guest
//! process, and its exit as every waiter sees it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use sm_api::{ExecRequest, ExitStatus, RunningProcess, Vm};

use crate::error::{Result, ShimError};
use crate::stdio::Stdio;

/// Where a process is in its life (containerd's task status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Being started in the guest (shown as created).
    Starting,
    /// Running in the guest.
    Running,
    /// Exited (or never started and killed).
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Its exit code; 128 + the signal for a process a signal ended (as a
    /// shell shows it), 255 when the guest was lost before it reported.
    pub status: u32,
    /// When it ended.
    pub at: Timestamp,
}

struct State {
    status: Status,
    pid: u32,
    running: Option<Arc<RunningProcess>>,
    exit: Option<Exit>,
    /// The exit has been published: waiters may return (so that containerd
    /// never sees a Wait answered, and the container deleted, before the
    /// TaskExit event).
    reported: bool,
    /// The shim's write end of the stdin FIFO, dropped at CloseIO.
    stdin_keeper: Option<std::fs::File>,
    /// CloseIO of stdin came (maybe before Start opened the FIFO).
    stdin_closed: bool,
}

/// A container process.
pub struct Process {
    /// Empty for the container's init process.
    pub exec_id: String,
    request: ExecRequest,
    /// The stdio paths containerd gave.
    pub stdio: Stdio,
    state: Mutex<State>,
    changed: Condvar,
}

impl Process {
    /// A created process that will run `request` with `stdio`.
    pub fn new(exec_id: String, mut request: ExecRequest, stdio: Stdio) -> Process {
        request.tty = stdio.terminal;
        let state = State {
            status: Status::Created,
            pid: 0,
            running: None,
            exit: None,
            reported: false,
            stdin_keeper: None,
            stdin_closed: false,
        };
        Process { exec_id, request, stdio, state: Mutex::new(state), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its status, guest pid (0 before start) and exit.
    pub fn status(&self) -> (Status, u32, Option<Exit>) {
        let s = self.lock();
        (s.status, s.pid, s.exit.clone())
    }

    /// Starts the process in `vm` (no lock held while the guest answers):
    /// `on_start` runs with its pid before anything of its exit can be
    /// told; `on_exit` runs once it has ended, before waiters return.
    /// Returns the guest pid.
    pub fn start(
        self: &Arc<Self>,
        vm: &Vm,
        on_start: impl FnOnce(u32),
        on_exit: impl FnOnce(&Process, &Exit) + Send + 'static,
    ) -> Result<u32> {
        {
            let mut state = self.lock();
            if state.status != Status::Created {
                return Err(ShimError::FailedPrecondition(format!("process {} was already started", self.name())));
            }
            state.status = Status::Starting;
        }
        let spawned = (|| -> Result<RunningProcess> {
            let (keeper, input) = self.stdio.stdin()?.unzip();
            let mut state = self.lock();
            // A CloseIO that came first has nothing to hold open.
            state.stdin_keeper = keeper.filter(|_| !state.stdin_closed);
            drop(state);
            let output = self.stdio.output()?;
            Ok(vm.agent()?.spawn(&self.request, input, output)?)
        })();
        let running = match spawned {
            Ok(r) => Arc::new(r),
            Err(e) => {
                let mut state = self.lock();
                state.status = Status::Created;
                state.stdin_keeper = None;
                return Err(e);
            }
        };
        let pid = u32::try_from(running.pid()).unwrap_or(0);
        {
            let mut state = self.lock();
            state.status = Status::Running;
            state.pid = pid;
            state.running = Some(Arc::clone(&running));
        }
        on_start(pid);
        let me = Arc::clone(self);
        let watcher_running = Arc::clone(&running);
        let watcher = std::thread::Builder::new().name(format!("wait-{pid}")).spawn(move || {
            let status = match watcher_running.wait() {
                Ok(report) => exit_code(report.status),
                Err(e) => {
                    tracing::warn!("process {}: {e}", me.name());
                    255
                }
            };
            let dropped = watcher_running.dropped_output();
            if dropped > 0 {
                tracing::warn!("process {}: {dropped} bytes of output dropped (its reader stalled)", me.name());
            }
            let exit = me.record_exit(status);
            on_exit(&me, &exit);
            me.mark_reported();
        });
        if let Err(e) = watcher {
            // Nothing would ever learn of its exit: end it now.
            let _ = running.signal(libc::SIGKILL);
            self.record_exit(255);
            self.mark_reported();
            return Err(ShimError::io("starting a process watcher thread")(e));
        }
        Ok(pid)
    }

    /// Records the end (once): the status shows it from now on.
    fn record_exit(&self, status: u32) -> Exit {
        let mut state = self.lock();
        if let Some(exit) = &state.exit {
            return exit.clone();
        }
        let at = containerd_shim::util::timestamp().unwrap_or_default();
        let exit = Exit { status, at };
        state.status = Status::Stopped;
        state.exit = Some(exit.clone());
        state.running = None;
        state.stdin_keeper = None;
        exit
    }

    /// Lets the waiters return.
    fn mark_reported(&self) {
        self.lock().reported = true;
        self.changed.notify_all();
    }

    /// Sends `signal` (1..=64). A process killed before it started is
    /// stopped with 128 + `signal` (it never runs): `on_exit` runs then,
    /// before waiters return, as it does for a process that ran.
    pub fn kill(&self, signal: u32, on_exit: impl FnOnce(&Process, &Exit)) -> Result<()> {
        let signo = match i32::try_from(signal) {
            Ok(s) if (1..=64).contains(&s) => s,
            _ => return Err(ShimError::InvalidArgument(format!("signal {signal} is not in 1..=64"))),
        };
        let state = self.lock();
        match (state.status, &state.running) {
            (Status::Running, Some(running)) => {
                let running = Arc::clone(running);
                drop(state);
                running.signal(signo).map_err(|e| {
                    if running.has_ended() {
                        ShimError::NotFound(format!("process {} (it has exited)", self.name()))
                    } else {
                        e.into()
                    }
                })
            }
            (Status::Created, _) => {
                drop(state);
                let exit = self.record_exit(128 + signal);
                on_exit(self, &exit);
                self.mark_reported();
                Ok(())
            }
            (Status::Starting, _) => {
                Err(ShimError::FailedPrecondition(format!("process {} is being started; try again", self.name())))
            }
            _ => Err(ShimError::NotFound(format!("process {} (it has exited)", self.name()))),
        }
    }

    /// Sets the size of its terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        if !self.stdio.terminal {
            return Err(ShimError::FailedPrecondition(format!("process {} has no terminal", self.name())));
        }
        let running = self.lock().running.clone();
        match running {
            Some(running) => Ok(running.resize(rows, cols)?),
            None => Err(ShimError::FailedPrecondition(format!("process {} is not running", self.name()))),
        }
    }

    /// CloseIO of stdin: the shim lets go of the stdin FIFO, so the
    /// process's stdin ends once the client's side is closed and what it
    /// wrote has been read (never before: see [`Stdio::stdin`]).
    pub fn close_stdin(&self) {
        let mut state = self.lock();
        state.stdin_closed = true;
        let keeper = state.stdin_keeper.take();
        drop(state);
        tracing::debug!("process {}: CloseIO of stdin (the shim held it: {})", self.name(), keeper.is_some());
    }

    /// Retires a process that never started (its container is deleted):
    /// it can no longer start. Refused while it starts or runs.
    pub fn retire(&self) -> Result<()> {
        let status = self.lock().status;
        match status {
            Status::Starting | Status::Running => {
                Err(ShimError::FailedPrecondition(format!("process {} is still running", self.name())))
            }
            Status::Created => {
                self.record_exit(0);
                self.mark_reported();
                Ok(())
            }
            Status::Stopped => Ok(()),
        }
    }

    /// Waits until it has ended (and its exit was published).
    pub fn wait(&self) -> Exit {
        self.wait_until(None).expect("no deadline: waits for the end")
    }

    /// [`Self::wait`] for at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        self.wait_until(Some(Instant::now() + timeout))
    }

    /// The published exit, or `None` at `deadline`.
    fn wait_until(&self, deadline: Option<Instant>) -> Option<Exit> {
        let mut state = self.lock();
        loop {
            if let (Some(exit), true) = (&state.exit, state.reported) {
                return Some(exit.clone());
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }

    /// "init" or the exec's id.
    pub fn name(&self) -> &str {
        if self.exec_id.is_empty() {
            "init"
        } else {
            &self.exec_id
        }
    }
}

/// A shell's view of an exit: the code, or 128 + the signal.
fn exit_code(status: ExitStatus) -> u32 {
    match status {
        ExitStatus::Code(c) => u32::try_from(c).unwrap_or(255),
        ExitStatus::Signal(s) => 128 + u32::try_from(s).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_read_as_a_shell_shows_them() {
        assert_eq!(exit_code(ExitStatus::Code(0)), 0);
        assert_eq!(exit_code(ExitStatus::Code(3)), 3);
        assert_eq!(exit_code(ExitStatus::Signal(9)), 137);
        assert_eq!(exit_code(ExitStatus::Signal(15)), 143);
    }

    #[test]
    fn a_process_killed_before_start_is_stopped_and_waiters_see_it() {
        let p = Arc::new(Process::new(String::new(), ExecRequest::new(["true"]), Stdio::default()));
        assert_eq!(p.status().0, Status::Created);
        let waiter = {
            let p = Arc::clone(&p);
            std::thread::spawn(move || p.wait().status)
        };
        let told = Arc::new(Mutex::new(None));
        let told_exit = Arc::clone(&told);
        p.kill(9, move |_, exit| {
            *told_exit.lock().unwrap() = Some(exit.status);
        })
        .unwrap();
        assert_eq!(*told.lock().unwrap(), Some(137), "its exit is told (containerd's TaskExit)");
        assert_eq!(waiter.join().unwrap(), 137);
        assert_eq!(p.status().0, Status::Stopped);
        assert!(matches!(p.kill(9, |_, _| ()), Err(ShimError::NotFound(_))), "a stopped process is gone");
        assert!(p.wait_timeout(Duration::from_millis(1)).is_some());
    }

    #[test]
    fn signals_outside_1_to_64_are_refused_before_anything_happens() {
        let p = Process::new(String::new(), ExecRequest::new(["true"]), Stdio::default());
        for bad in [0, 65, u32::MAX] {
            assert!(
                matches!(p.kill(bad, |_, _| panic!("no exit")), Err(ShimError::InvalidArgument(_))),
                "signal {bad}"
            );
        }
        assert_eq!(p.status().0, Status::Created, "a refused signal leaves the process as it was");
        assert!(p.wait_timeout(Duration::from_millis(1)).is_none());
    }
}
