//! Force-exit for KVM vCPUs without lost wake-ups.
//!
//! A kick does three things, in this order:
//! 1. `pending = true` (SeqCst),
//! 2. `kvm_run.immediate_exit = 1` (SeqCst store through a second mapping of the vCPU's
//!    run page, so the handle stays valid even after the vCPU fd is closed),
//! 3. if a thread is bound to the vCPU, a real-time signal to that thread (tgkill).
//!    The signal's handler does nothing and is installed without `SA_RESTART`, so a
//!    vCPU inside `KVM_RUN` returns with `EINTR`.
//!
//! The vCPU thread, on each `EINTR`, first clears `immediate_exit` and then swaps
//! `pending` to false; if it was set, the exit is reported as `ForcedExit`. Any kick
//! whose `pending` store lands after that swap also stores `immediate_exit = 1` after
//! the clear, so the next `KVM_RUN` returns at once: no kick is lost, at worst one
//! spurious `EINTR` is absorbed. A kick before the thread ever runs is seen by the
//! first `KVM_RUN` through `immediate_exit`.
//!
//! The signal is blocked in the thread that creates the VM (and so in threads it
//! spawns later) and unblocked in vCPU threads only.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, Once};

use kvm_bindings::kvm_run;
use kvm_ioctls::KvmRunWrapper;
use sm_hypervisor::Kick;

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn kick_signal_handler(_: libc::c_int) {}

static INSTALL: Once = Once::new();

/// Installs the (empty) kick signal handler once per process, without `SA_RESTART`.
pub fn install_kick_signal_handler() {
    INSTALL.call_once(|| {
        // SAFETY: an all-zero sigaction is valid; we fill the handler and mask below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = kick_signal_handler as *const () as usize;
        action.sa_flags = 0;
        // SAFETY: `action.sa_mask` is a valid sigset_t owned by us.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that performs no action, for a signal only this
        // module sends; `action` is fully initialised.
        let rc = unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) };
        if rc != 0 {
            tracing::error!("installing the vCPU kick signal handler failed: {}", std::io::Error::last_os_error());
        }
    });
}

/// Blocks (`block = true`) or unblocks the kick signal in the calling thread.
pub fn set_kick_signal_blocked(block: bool) {
    // SAFETY: zeroed sigset_t is then initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; pthread_sigmask only changes this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        let how = if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Shared state between a vCPU and the handles that kick it.
pub struct VcpuKick {
    pending: AtomicBool,
    /// Kernel thread id of the thread currently running the vCPU, if any.
    thread: Mutex<Option<libc::pid_t>>,
    /// Our own mapping of the run page; keeps `immediate_exit` valid.
    _run_page: KvmRunWrapper,
    immediate_exit: *const AtomicU8,
    run_page: *const kvm_run,
}

// SAFETY: `immediate_exit` points into the run page owned by `run`, which lives as
// long as this struct; it is only accessed atomically.
unsafe impl Send for VcpuKick {}
// SAFETY: see above; all other fields are Sync.
unsafe impl Sync for VcpuKick {}

impl VcpuKick {
    /// Creates the kick state over a private mapping of the vCPU's run page.
    pub fn new(mut run: KvmRunWrapper) -> Self {
        let page: &mut kvm_run = run.as_mut_ref();
        let run_page = page as *const kvm_run;
        let ptr = std::ptr::addr_of_mut!(page.immediate_exit);
        // SAFETY: `immediate_exit` is a u8 in a shared, page-aligned mapping that
        // lives as long as `run`; AtomicU8 has the same size and alignment as u8.
        let immediate_exit = unsafe { AtomicU8::from_ptr(ptr) } as *const AtomicU8;
        VcpuKick { pending: AtomicBool::new(false), thread: Mutex::new(None), _run_page: run, immediate_exit, run_page }
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: see `new`; the mapping outlives `self`.
        unsafe { &*self.immediate_exit }
    }

    /// The vCPU's run page (for reading exit details after `KVM_RUN`).
    pub fn run_page(&self) -> *const kvm_run {
        self.run_page
    }

    /// Binds the calling thread as the one running the vCPU and unblocks the signal.
    pub fn bind_current_thread(&self) {
        install_kick_signal_handler();
        set_kick_signal_blocked(false);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(tid);
    }

    /// Returns whether `tid` is the bound thread.
    pub fn is_bound_to(&self, tid: libc::pid_t) -> bool {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) == Some(tid)
    }

    /// Forgets the bound thread; no signal is sent to it afterwards.
    pub fn unbind(&self) {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Called by the vCPU thread after `KVM_RUN` returned `EINTR`. Returns whether a
    /// kick was consumed (otherwise the interruption was spurious).
    pub fn consume(&self) -> bool {
        self.immediate_exit().store(0, Ordering::SeqCst);
        self.pending.swap(false, Ordering::SeqCst)
    }

    /// Whether a kick is pending (not yet consumed).
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }
}

impl Kick for VcpuKick {
    fn kick(&self) {
        self.pending.store(true, Ordering::SeqCst);
        self.immediate_exit().store(1, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tid) = *thread {
            // SAFETY: tgkill to a thread of this process with a signal whose handler
            // is a no-op; holding the lock keeps `unbind` from racing with it.
            unsafe {
                libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal());
            }
        }
    }
}
