//! One thread per vCPU for the machine's whole life: the vCPU is created on
//! it, runs the guest on it, has its state saved and restored on it, and is
//! dropped on it. Hypervisor.framework requires exactly this (a vCPU belongs
//! to the thread that created it); KVM does not mind, and a resume no longer
//! spawns threads.
//!
//! The machine hands the thread jobs: the run loop (started without waiting;
//! [`VcpuThread::is_idle`] tells when it returned) or a call whose result it
//! waits for (set-up, save, restore — only while the thread is idle).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use sm_hypervisor::{ForceExit, Vcpu};

use crate::error::{Error, Result};

/// How long a call (set-up, save, restore: a few hypervisor calls, done in
/// milliseconds) may take before the thread counts as stuck.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Work for the thread, on its vCPU.
type JobFn = Box<dyn FnOnce(&mut dyn Vcpu) + Send>;
/// A job for the thread, and whether it is the run loop.
type Job = (JobFn, bool);

/// Whether the thread is in its run loop, and whether it died in a job.
#[derive(Default)]
struct JobState {
    /// Set by [`VcpuThread::start`], cleared when the run loop has returned
    /// (its context dropped).
    running: AtomicBool,
    dead: AtomicBool,
    /// A call did not finish within its timeout: the thread may still be
    /// in it (and in the vCPU); it is never joined and takes no more jobs.
    stuck: AtomicBool,
}

/// Marks the thread dead when a job unwinds, and clears `running` when the
/// run loop returns. Only the run loop touches `running`: a call's result
/// reaches its caller before its job has quite ended, and the caller may
/// start the run loop in that moment.
struct JobGuard<'a> {
    state: &'a JobState,
    run: bool,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.state.dead.store(true, Ordering::SeqCst);
        }
        if self.run {
            self.state.running.store(false, Ordering::SeqCst);
        }
    }
}

/// Marks the thread dead and not running when it ends.
struct ThreadEnd<'a>(&'a JobState);

impl Drop for ThreadEnd<'_> {
    fn drop(&mut self) {
        self.0.dead.store(true, Ordering::SeqCst);
        self.0.running.store(false, Ordering::SeqCst);
    }
}

/// The thread that owns one vCPU.
pub(crate) struct VcpuThread {
    id: u32,
    jobs: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    state: Arc<JobState>,
    call_timeout: Duration,
}

impl VcpuThread {
    /// Starts the thread, which creates its vCPU with `create`; returns once
    /// the vCPU exists, with its force-exit handle.
    pub(crate) fn spawn(
        id: u32,
        create: impl FnOnce() -> sm_hypervisor::Result<Box<dyn Vcpu>> + Send + 'static,
    ) -> Result<(VcpuThread, ForceExit)> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (made, made_rx) = mpsc::sync_channel(1);
        let state = Arc::new(JobState::default());
        let thread_state = Arc::clone(&state);
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut vcpu = match create() {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = made.send(Err(e));
                        return;
                    }
                };
                if made.send(Ok(vcpu.force_exit())).is_err() {
                    return;
                }
                // However the thread ends, it shows as dead and not running
                // (a job queued behind a panic is never run).
                let _end = ThreadEnd(&thread_state);
                while let Ok((job, run)) = inbox.recv() {
                    let _guard = JobGuard { state: &thread_state, run };
                    job(&mut *vcpu);
                }
                // The machine is gone: the vCPU is dropped here, on its thread.
            })
            .map_err(|e| Error::Io { what: format!("spawning the thread of vCPU {id}"), source: e })?;
        let kick = match made_rx.recv() {
            Ok(made) => made?,
            Err(_) => return Err(Error::State(format!("the thread of vCPU {id} ended before making it"))),
        };
        Ok((VcpuThread { id, jobs: Some(jobs), handle: Some(handle), state, call_timeout: CALL_TIMEOUT }, kick))
    }

    /// The vCPU's index.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    fn send(&self, job: JobFn, run: bool) -> Result<()> {
        if self.state.dead.load(Ordering::SeqCst) {
            return Err(Error::State(format!("the thread of vCPU {} panicked", self.id)));
        }
        if self.is_stuck() {
            return Err(Error::State(format!("the thread of vCPU {} is stuck in an earlier call", self.id)));
        }
        if run {
            self.state.running.store(true, Ordering::SeqCst);
        }
        let sent = self.jobs.as_ref().map(|j| j.send((job, run)));
        if !matches!(sent, Some(Ok(()))) {
            self.state.running.store(false, Ordering::SeqCst);
            return Err(Error::State(format!("the thread of vCPU {} has ended", self.id)));
        }
        Ok(())
    }

    /// Starts `job` (the run loop) on the thread without waiting for it.
    pub(crate) fn start(&self, job: impl FnOnce(&mut dyn Vcpu) + Send + 'static) -> Result<()> {
        self.send(Box::new(job), true)
    }

    /// Runs `f` on the (idle) thread and returns its result; an error if it
    /// has not within the call timeout ([`CALL_TIMEOUT`]; the thread is
    /// then stuck for good).
    pub(crate) fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut dyn Vcpu) -> R + Send + 'static) -> Result<R> {
        if !self.is_idle() {
            return Err(Error::State(format!("vCPU {} is running; pause first", self.id)));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(
            Box::new(move |v| {
                let _ = tx.send(f(v));
            }),
            false,
        )?;
        match rx.recv_timeout(self.call_timeout) {
            Ok(result) => Ok(result),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.state.stuck.store(true, Ordering::SeqCst);
                tracing::error!("the thread of vCPU {} did not finish a call within {:?}", self.id, self.call_timeout);
                Err(Error::State(format!(
                    "the thread of vCPU {} did not finish a state call (set-up, save or restore) within {:?}; \
                     the VM can only be dropped",
                    self.id, self.call_timeout
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The job unwound (dropping its result sender): let the thread
                // finish unwinding, so that it shows as dead, for a moment at most.
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                while !self.is_dead() && std::time::Instant::now() < deadline {
                    std::thread::yield_now();
                }
                Err(Error::State(format!("the thread of vCPU {} panicked", self.id)))
            }
        }
    }

    /// A call timed out: the thread may still be inside it.
    pub(crate) fn is_stuck(&self) -> bool {
        self.state.stuck.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    fn set_call_timeout(&mut self, timeout: Duration) {
        self.call_timeout = timeout;
    }

    /// Not in its run loop (it returned, or none was started).
    pub(crate) fn is_idle(&self) -> bool {
        !self.state.running.load(Ordering::SeqCst)
    }

    /// A job panicked: the thread and its vCPU are gone.
    pub(crate) fn is_dead(&self) -> bool {
        self.state.dead.load(Ordering::SeqCst)
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        // No more jobs: an idle thread drops its vCPU and ends.
        drop(self.jobs.take());
        if let Some(handle) = self.handle.take() {
            if self.is_idle() && !self.is_stuck() {
                let _ = handle.join();
            }
            // A thread stuck inside the guest, a device or a call is left to
            // end on its own (the machine counted it as lost).
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::thread::ThreadId;

    use sm_hypervisor::{Kick, VcpuExit, VcpuState};

    use super::*;

    /// Where each of the fake vCPU's life events happened.
    #[derive(Default)]
    struct Seen {
        created: Option<ThreadId>,
        calls: Vec<ThreadId>,
        dropped: Option<ThreadId>,
    }

    struct FakeVcpu(Arc<Mutex<Seen>>);

    struct NoKick;
    impl Kick for NoKick {
        fn kick(&self) {}
    }

    impl Vcpu for FakeVcpu {
        fn id(&self) -> u32 {
            0
        }
        fn run(&mut self) -> sm_hypervisor::Result<VcpuExit<'_>> {
            Ok(VcpuExit::ForcedExit)
        }
        fn force_exit(&self) -> ForceExit {
            ForceExit::new(Arc::new(NoKick))
        }
        fn register_summary(&self) -> String {
            String::new()
        }
        fn save_state(&mut self) -> sm_hypervisor::Result<VcpuState> {
            self.0.lock().unwrap().calls.push(std::thread::current().id());
            Ok(VcpuState(vec![7]))
        }
        fn restore_state(&mut self, _: &VcpuState) -> sm_hypervisor::Result<()> {
            panic!("a job that panics")
        }
    }

    impl Drop for FakeVcpu {
        fn drop(&mut self) {
            self.0.lock().unwrap().dropped = Some(std::thread::current().id());
        }
    }

    fn spawn(seen: &Arc<Mutex<Seen>>) -> VcpuThread {
        let seen = Arc::clone(seen);
        VcpuThread::spawn(0, move || {
            seen.lock().unwrap().created = Some(std::thread::current().id());
            Ok(Box::new(FakeVcpu(seen)) as Box<dyn Vcpu>)
        })
        .unwrap()
        .0
    }

    #[test]
    fn the_vcpu_is_made_used_and_dropped_on_its_own_thread() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let t = spawn(&seen);
        assert_eq!(t.call(|v| v.save_state().unwrap()).unwrap(), VcpuState(vec![7]));
        // Calls right after each other: each is answered, none is refused
        // as "running" (the previous job's end is not waited for); and a run
        // loop started right after a call stays marked as running (the
        // call's end must not clear it).
        for _ in 0..1000 {
            t.call(|v| v.id()).unwrap();
            let (stop, stopped) = mpsc::channel::<()>();
            t.start(move |_| {
                let _ = stopped.recv();
            })
            .unwrap();
            std::thread::sleep(std::time::Duration::from_micros(50));
            assert!(!t.is_idle(), "the run loop is on");
            stop.send(()).unwrap();
            while !t.is_idle() {
                std::thread::yield_now();
            }
        }
        let (tx, rx) = mpsc::channel();
        t.start(move |v| {
            let _ = v.save_state();
            let _ = rx.recv();
        })
        .unwrap();
        assert!(!t.is_idle(), "the run job is on");
        assert!(t.call(|_| ()).is_err(), "no call while a job runs");
        tx.send(()).unwrap();
        while !t.is_idle() {
            std::thread::yield_now();
        }
        drop(t);
        let seen = seen.lock().unwrap();
        let home = seen.created.expect("created");
        assert_ne!(home, std::thread::current().id(), "not created on the caller's thread");
        assert_eq!(seen.calls, vec![home, home]);
        assert_eq!(seen.dropped, Some(home), "dropped on its own thread when the owner went");
    }

    #[test]
    fn a_job_that_panics_marks_the_thread_dead_and_later_calls_fail() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let t = spawn(&seen);
        assert!(t.call(|v| v.restore_state(&VcpuState(vec![]))).is_err());
        assert!(t.is_dead() && t.is_idle());
        assert!(t.call(|_| ()).unwrap_err().to_string().contains("panicked"));
    }

    #[test]
    fn a_call_that_does_not_finish_is_an_error_and_the_thread_is_left_alone() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = spawn(&seen);
        t.set_call_timeout(Duration::from_millis(100));
        let (release, held) = mpsc::channel::<()>();
        let err = t.call(move |_| held.recv()).unwrap_err().to_string();
        assert!(err.contains("did not finish") && err.contains("vCPU 0"), "{err}");
        assert!(t.is_stuck());
        assert!(t.call(|_| ()).unwrap_err().to_string().contains("stuck"), "no more jobs");
        // Dropping it does not wait for the stuck call.
        drop(t);
        release.send(()).unwrap();
    }

    #[test]
    fn a_failed_creation_is_the_error() {
        let err = VcpuThread::spawn(3, || Err(sm_hypervisor::Error::Unsupported("vCPUs here"))).err().unwrap();
        assert!(err.to_string().contains("vCPUs here"), "{err}");
    }
}
