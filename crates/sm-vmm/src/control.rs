//! Run control shared by the vCPU threads, devices and the owner of a machine:
//! how the VM ended, and the requests that make vCPU threads return.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use sm_hypervisor::ForceExit;

use crate::console::Console;

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted (Linux `reboot`; with `reboot=k` through the i8042): the
    /// normal way a guest ends.
    Reboot,
    /// The guest powered off through a platform event.
    PowerOff,
    /// The guest triple-faulted (x86 shutdown).
    TripleFault,
    /// The guest kernel panicked.
    GuestPanic {
        /// The panic line from the console.
        line: String,
    },
    /// The host stopped the VM.
    Stopped,
    /// A vCPU could not continue (backend error, unsupported instruction...).
    VcpuError {
        /// The vCPU.
        vcpu: u32,
        /// What the backend reported.
        detail: String,
    },
}

impl ExitReason {
    /// Whether the guest ended on its own and cleanly.
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitReason::Reboot | ExitReason::PowerOff)
    }
}

/// Shared run state of one machine.
pub struct RunControl {
    exit: Mutex<Option<ExitReason>>,
    exited: Condvar,
    /// vCPU threads return as soon as they see this (pause, stop, guest exit).
    return_requested: AtomicBool,
    kicks: Vec<ForceExit>,
    console: Console,
}

impl RunControl {
    /// Creates the control for vCPUs kicked by `kicks`.
    pub fn new(kicks: Vec<ForceExit>, console: Console) -> Self {
        RunControl {
            exit: Mutex::new(None),
            exited: Condvar::new(),
            return_requested: AtomicBool::new(false),
            kicks,
            console,
        }
    }

    /// Whether vCPU threads must return now.
    pub fn should_return(&self) -> bool {
        self.return_requested.load(Ordering::SeqCst)
    }

    /// Asks every vCPU thread to return and kicks each out of guest mode.
    pub fn request_return(&self) {
        self.return_requested.store(true, Ordering::SeqCst);
        for k in &self.kicks {
            k.kick();
        }
    }

    /// Re-arms after the vCPU threads returned (before they are started again).
    pub fn clear_return(&self) {
        self.return_requested.store(false, Ordering::SeqCst);
    }

    /// Records how the VM ended (the first reason wins) and stops every vCPU.
    /// A reboot that follows a kernel panic on the console is reported as the panic.
    pub fn finish(&self, reason: ExitReason) {
        let reason = match (reason, self.console.panic_line()) {
            (ExitReason::Reboot | ExitReason::TripleFault, Some(line)) => ExitReason::GuestPanic { line },
            (r, _) => r,
        };
        {
            let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
            if exit.is_none() {
                tracing::debug!(?reason, "VM exit");
                *exit = Some(reason);
            }
        }
        self.request_return();
        self.exited.notify_all();
    }

    /// How the VM ended, if it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets the exit reason (the machine is about to run again after a restore).
    pub fn reset_exit(&self) {
        *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Waits until the VM ended or `timeout` passed.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = exit.as_ref() {
                return Some(r.clone());
            }
            match deadline {
                None => exit = self.exited.wait(exit).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    exit = self.exited.wait_timeout(exit, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
    }
}
