//! The machine's run state: starting the guest on the vCPU threads, making
//! them leave it (pause, stop, the guest's own end) within a bound, and what
//! a machine that lost a vCPU thread still allows.

use std::time::{Duration, Instant};

use crate::control::ExitReason;
use crate::machine::Machine;
use crate::vcpu_loop::run_vcpu;
use crate::vcpu_thread::VcpuThread;
use crate::{Error, Result};

/// How long `stop` keeps kicking before it warns that a vCPU does not leave.
const STOP_WARN_AFTER: Duration = Duration::from_secs(5);
/// How long pause and stop wait for the vCPU threads to leave the guest before
/// they abandon the ones still inside (stuck in a device handler — a console
/// sink that never drains — or in the hypervisor).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl Machine {
    pub(crate) fn require_stopped(&self, what: &str) -> Result<()> {
        if !self.running {
            Ok(())
        } else {
            Err(Error::State(format!("cannot {what} while the vCPUs are running; pause first")))
        }
    }

    /// Refuses `what` on a machine that lost vCPU threads.
    pub(crate) fn require_whole(&self, what: &str) -> Result<()> {
        if let Some(stuck) = self.vcpus.iter().find(|t| t.is_stuck()) {
            return Err(Error::State(format!(
                "cannot {what}: the thread of vCPU {} is stuck in a state call; the VM can only be dropped",
                stuck.id()
            )));
        }
        if self.lost_vcpus == 0 {
            Ok(())
        } else {
            Err(Error::State(format!(
                "cannot {what}: {} vCPU thread(s) of this VM were abandoned (they did not leave the guest); \
                 the VM can only be dropped",
                self.lost_vcpus
            )))
        }
    }

    /// How long [`Machine::pause`] and [`Machine::stop`] wait for the vCPU
    /// threads (default [`STOP_TIMEOUT`]).
    pub fn set_stop_timeout(&mut self, timeout: Duration) {
        self.stop_timeout = timeout;
    }

    /// Runs the guest: each vCPU thread enters its run loop.
    pub fn start(&mut self) -> Result<()> {
        self.require_stopped("start")?;
        self.require_whole("start")?;
        if self.context.control.exit_reason().is_some() {
            return Err(Error::State("the VM has ended; restore a state before starting it again".into()));
        }
        self.context.control.clear_return();
        self.timings.started.get_or_insert(self.start.elapsed());
        self.running = true;
        for vcpu in &self.vcpus {
            let ctx = self.context.clone();
            if let Err(e) = vcpu.start(move |v| run_vcpu(v, ctx)) {
                // The others must not run on without it.
                if let Err(join) = self.join_vcpus() {
                    tracing::error!("{join}");
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes every vCPU thread leave its run loop. Kicks are repeated for up
    /// to `stop_timeout`; a thread still inside then (or one that panicked)
    /// is abandoned — it keeps its vCPU and ends whenever it can — and the
    /// machine is marked as having lost it.
    fn join_vcpus(&mut self) -> Result<()> {
        if !self.running {
            return self.require_whole("take the vCPUs back");
        }
        let began = Instant::now();
        let mut warned = false;
        loop {
            self.context.control.request_return();
            if self.vcpus.iter().all(VcpuThread::is_idle) || began.elapsed() > self.stop_timeout {
                break;
            }
            if !warned && began.elapsed() > STOP_WARN_AFTER {
                tracing::warn!("vCPU threads slow to leave the guest; still kicking");
                warned = true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.running = false;
        let (mut lost, mut abandoned) = (0, 0);
        for t in &self.vcpus {
            if !t.is_idle() {
                abandoned += 1;
                tracing::error!(
                    "the thread of vCPU {} did not leave the guest within {:?}; abandoned",
                    t.id(),
                    self.stop_timeout
                );
                lost += 1;
            } else if t.is_dead() {
                tracing::error!("the thread of vCPU {} panicked", t.id());
                lost += 1;
            }
        }
        self.lost_vcpus = self.lost_vcpus.max(lost);
        self.abandoned_vcpus = self.abandoned_vcpus.max(abandoned);
        self.require_whole("take the vCPUs back")
    }

    /// Pauses: every vCPU leaves the guest and its thread ends. `start`
    /// resumes. An error when vCPU threads had to be abandoned
    /// ([`STOP_TIMEOUT`]): the machine can then only be dropped.
    pub fn pause(&mut self) -> Result<()> {
        self.join_vcpus()
    }

    /// Waits for the guest to end (or `timeout`); on an end, joins the vCPU threads.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<ExitReason> {
        let reason = self.context.control.wait_exit(timeout)?;
        if let Err(e) = self.join_vcpus() {
            tracing::error!("after the guest ended: {e}");
        }
        Some(reason)
    }

    /// Stops the VM: the vCPUs leave the guest, threads end (or, after
    /// [`STOP_TIMEOUT`], are abandoned: stop never hangs). Returns how it
    /// ended (`Stopped` unless the guest had ended by itself before).
    pub fn stop(&mut self) -> ExitReason {
        self.context.control.finish(ExitReason::Stopped);
        if let Err(e) = self.join_vcpus() {
            tracing::error!("stopping: {e}");
        }
        self.context.control.exit_reason().unwrap_or(ExitReason::Stopped)
    }
}
