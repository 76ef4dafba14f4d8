//! A pool of reusable worker threads for connections and exec helpers.
//!
//! Creating a thread costs ~18 syscalls (clone, stack guard, signal stack,
//! robust list, name... and as many again at exit); handing a job to an
//! idle worker costs a futex wake. In the guest every syscall is expensive,
//! and an exec needs three or four helper threads, so they are reused.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;
use std::thread;

use super::{lock, WORKER_STACK};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Idle workers beyond this many exit instead of waiting for work.
const MAX_IDLE: usize = 64;

/// A set of idle workers, each waiting on its own channel.
pub(crate) struct Workers {
    idle: Mutex<Vec<Sender<Job>>>,
}

/// The agent's one pool.
static AGENT_WORKERS: Workers = Workers::new();

/// Runs `job` on an idle worker of the agent's pool, or on a new one.
/// Fails only if no thread can be created (then `job` is dropped unrun).
pub(crate) fn run(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    AGENT_WORKERS.run(job)
}

impl Workers {
    pub(crate) const fn new() -> Self {
        Self { idle: Mutex::new(Vec::new()) }
    }

    /// Runs `job` on an idle worker, or on a new one.
    pub(crate) fn run(&'static self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut job: Job = Box::new(job);
        loop {
            let idle = lock(&self.idle).pop();
            match idle {
                Some(worker) => match worker.send(job) {
                    Ok(()) => return Ok(()),
                    // That worker is gone; try the next.
                    Err(mpsc::SendError(returned)) => job = returned,
                },
                None => break,
            }
        }
        thread::Builder::new()
            .name("sm-worker".into())
            .stack_size(WORKER_STACK)
            .spawn(move || self.work(job))
            .map(|_| ())
    }

    fn work(&self, first: Job) {
        let (tx, rx) = mpsc::channel::<Job>();
        let mut job = first;
        loop {
            // A panicking job (a bug) must not take its worker's later jobs
            // down with it; the panic hook has already logged it.
            let _ = panic::catch_unwind(AssertUnwindSafe(job));
            {
                let mut idle = lock(&self.idle);
                if idle.len() >= MAX_IDLE {
                    return;
                }
                idle.push(tx.clone());
            }
            match rx.recv() {
                Ok(next) => job = next,
                Err(_) => return,
            }
        }
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn jobs_run_and_workers_are_reused() {
        // A pool of the test's own: other tests in this binary run agent
        // servers on the agent's pool, whose idle workers would take jobs.
        static POOL: Workers = Workers::new();
        let (tx, rx) = channel();
        let mut threads = std::collections::HashSet::new();
        for i in 0..20 {
            let tx = tx.clone();
            POOL.run(move || {
                let _ = tx.send((i, thread::current().id()));
            })
            .expect("run");
            // Let the worker go idle before the next job.
            let (got, thread) = rx.recv_timeout(Duration::from_secs(10)).expect("job ran");
            assert_eq!(got, i);
            threads.insert(thread);
            while POOL.idle_count() == 0 {
                thread::yield_now();
            }
        }
        assert_eq!(threads.len(), 1, "sequential jobs share one worker");
        // A panicking job does not lose the worker: the next job runs on
        // the same thread.
        POOL.run(|| panic!("test panic in a worker job")).expect("run");
        while POOL.idle_count() == 0 {
            thread::yield_now();
        }
        let (tx2, rx2) = channel();
        POOL.run(move || {
            let _ = tx2.send(thread::current().id());
        })
        .expect("run after a panic");
        let after = rx2.recv_timeout(Duration::from_secs(10)).expect("ran");
        assert!(threads.contains(&after), "the worker survived the panic");
    }
}
