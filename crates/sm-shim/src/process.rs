//! One process of a container (its init — the bundle's process — or an
//! exec): its state as containerd asks for it, its stdio, the running guest
//! process, and its exit as every waiter sees it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use sm_api::{ExecRequest, ExitStatus, RunningProcess, Vm};

use crate::error::{Result, ShimError};
use crate::stdio::Stdio;

/// Where a process is in its life (containerd's task status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
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
        let state = State { status: Status::Created, pid: 0, running: None, exit: None };
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

    /// Starts the process in `vm`; `on_exit` runs once it has ended (and
    /// every waiter has been told). Returns the guest pid.
    pub fn start(self: &Arc<Self>, vm: &Vm, on_exit: impl FnOnce(&Process, &Exit) + Send + 'static) -> Result<u32> {
        let mut state = self.lock();
        if state.status != Status::Created {
            return Err(ShimError::FailedPrecondition(format!("process {} was already started", self.name())));
        }
        let running = vm.agent()?.spawn(&self.request, self.stdio.input(), self.stdio.output()?)?;
        let running = Arc::new(running);
        let pid = u32::try_from(running.pid()).unwrap_or(0);
        state.status = Status::Running;
        state.pid = pid;
        state.running = Some(Arc::clone(&running));
        drop(state);
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || {
                let status = match running.wait() {
                    Ok(report) => exit_code(report.status),
                    Err(e) => {
                        tracing::warn!("process {}: {e}", me.name());
                        255
                    }
                };
                let exit = me.finish(status);
                on_exit(&me, &exit);
            })
            .map_err(ShimError::io("starting a process watcher thread"))?;
        Ok(pid)
    }

    /// Records the end (once) and wakes the waiters.
    fn finish(&self, status: u32) -> Exit {
        let mut state = self.lock();
        if let Some(exit) = &state.exit {
            return exit.clone();
        }
        let at = containerd_shim::util::timestamp().unwrap_or_default();
        let exit = Exit { status, at };
        state.status = Status::Stopped;
        state.exit = Some(exit.clone());
        state.running = None;
        self.changed.notify_all();
        exit
    }

    /// Sends `signal`. A process killed before it started is stopped with
    /// 128 + `signal` (it never runs).
    pub fn kill(&self, signal: u32) -> Result<()> {
        let state = self.lock();
        match (state.status, &state.running) {
            (Status::Running, Some(running)) => {
                let running = Arc::clone(running);
                drop(state);
                let signo = i32::try_from(signal).unwrap_or(0);
                running.signal(signo).map_err(|e| match e {
                    sm_api::agent::ClientError::InvalidArgument(why) if running.has_ended() => {
                        ShimError::NotFound(format!("process {} (it has exited: {why})", self.name()))
                    }
                    other => other.into(),
                })
            }
            (Status::Created, _) => {
                drop(state);
                self.finish(128 + signal);
                Ok(())
            }
            _ => Err(ShimError::NotFound(format!("process {} (it has exited)", self.name()))),
        }
    }

    /// Sets the size of its terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        if !self.stdio.terminal {
            return Err(ShimError::FailedPrecondition(format!("process {} has no terminal", self.name())));
        }
        match &self.lock().running {
            Some(running) => Ok(running.resize(rows, cols)?),
            None => Err(ShimError::FailedPrecondition(format!("process {} is not running", self.name()))),
        }
    }

    /// Closes its stdin.
    pub fn close_stdin(&self) {
        if let Some(running) = &self.lock().running {
            running.close_stdin();
        }
    }

    /// Waits until it has ended.
    pub fn wait(&self) -> Exit {
        let mut state = self.lock();
        loop {
            if let Some(exit) = &state.exit {
                return exit.clone();
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn name(&self) -> &str {
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
        p.kill(9).unwrap();
        assert_eq!(waiter.join().unwrap(), 137);
        assert_eq!(p.status().0, Status::Stopped);
        assert!(matches!(p.kill(9), Err(ShimError::NotFound(_))), "a stopped process is gone");
    }
}
