//! Warm VMs restored from one snapshot, handed out and reset in place on release.
//!
//! Idle VMs are running and refreshed (guest clock set, entropy pushed), so an
//! acquire of an idle VM is a hand-over, not a restore. A restore (a miss, or
//! filling `min_idle`) goes into a VM shell made ahead (VM, vCPUs, RAM slots). A released VM is reset
//! in place and refreshed on a background thread, then becomes idle again (an
//! acquire meanwhile waits for it rather than restoring another; beyond
//! `max_idle` idle VMs it is stopped instead).

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use sm_hypervisor::Hypervisor;
use sm_vmm::{ConsoleOutput, Machine};

use crate::{Error, RestoreConfig, Result, Vm};

/// What `acquire` does when the host is short of memory for another VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Fail at once with an error naming the shortfall.
    Refuse,
    /// Wait up to this long for memory (or a released VM), then fail.
    Wait(Duration),
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The snapshot every VM is restored from.
    pub snapshot: PathBuf,
    /// Idle VMs kept ready (restored, paused).
    pub min_idle: usize,
    /// Most idle VMs kept: a VM released while this many are idle is
    /// stopped instead of reset (a burst's VMs do not all stay warm).
    pub max_idle: usize,
    /// Most VMs alive at once (idle + handed out).
    pub max: usize,
    /// Idle VMs above `min_idle` are dropped after this long unused.
    pub idle_timeout: Duration,
    /// How long `acquire` waits for a VM when `max` are handed out.
    pub acquire_timeout: Duration,
    /// How long `acquire` waits for a released VM being reset (when no VM
    /// is idle) before it restores another instead; a reset is never slower
    /// than a restore, the bound is for one that is stuck.
    pub recycle_wait: Duration,
    /// Memory admission policy for creating another VM.
    pub admission: Admission,
    /// Host memory (MiB) that must stay available after admitting a VM.
    pub memory_reserve_mib: u64,
    /// Host memory one more VM is assumed to need (MiB); default: its full RAM.
    pub vm_memory_estimate_mib: Option<u64>,
    /// The network each VM gets (a back end of its own, made at its restore);
    /// it must match the snapshot: [`Network::None`](crate::Network::None)
    /// for a snapshot without a network device.
    pub network: crate::Network,
    /// Host directories every VM of the pool sees (in the snapshot's share
    /// slots; mounted after each restore and reset). The VMs share them: what
    /// one writes, the others see. Volumes are not offered: a volume is one
    /// running VM's at a time.
    pub shares: Vec<crate::ShareMount>,
    /// The snapshot's disks, as at the snapshot (an image's root disk).
    pub disks: Vec<crate::Disk>,
}

impl PoolConfig {
    /// min_idle 1, max_idle 8, max 8, idle timeout 60 s, acquire timeout 30 s,
    /// recycle wait 5 s, refuse when
    /// fewer than 256 MiB would remain.
    pub fn new(snapshot: PathBuf) -> Self {
        PoolConfig {
            snapshot,
            min_idle: 1,
            max_idle: 8,
            max: 8,
            idle_timeout: Duration::from_secs(60),
            acquire_timeout: Duration::from_secs(30),
            recycle_wait: Duration::from_secs(5),
            admission: Admission::Refuse,
            memory_reserve_mib: 256,
            vm_memory_estimate_mib: None,
            network: crate::Network::None,
            shares: Vec::new(),
            disks: Vec::new(),
        }
    }

    fn restore_config(&self) -> RestoreConfig {
        RestoreConfig {
            network: self.network.clone(),
            shares: self.shares.clone(),
            disks: self.disks.clone(),
            ..RestoreConfig::new(ConsoleOutput::Null)
        }
    }
}

/// Counters of a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolStats {
    /// Acquires served by an idle VM.
    pub hits: u64,
    /// Acquires that restored a new VM.
    pub misses: u64,
    /// Acquires refused (memory, timeout).
    pub refused: u64,
    /// VMs reset in place on release.
    pub resets: u64,
    /// VMs dropped (idle timeout, failed reset).
    pub dropped: u64,
    /// Sum of acquire latencies.
    pub acquire_total: Duration,
    /// Slowest acquire.
    pub acquire_max: Duration,
    /// Idle VMs now.
    pub idle: usize,
    /// VMs alive now.
    pub alive: usize,
}

impl PoolStats {
    /// Mean acquire latency.
    pub fn acquire_mean(&self) -> Duration {
        let n = (self.hits + self.misses) as u32;
        if n == 0 {
            Duration::ZERO
        } else {
            self.acquire_total / n
        }
    }
}

struct State {
    idle: VecDeque<(Vm, Instant)>,
    alive: usize,
    /// Released VMs being reset (idle again soon).
    resetting: usize,
    /// Acquires waiting for one of those.
    awaiting_recycle: usize,
    stats: PoolStats,
}

struct Inner {
    config: PoolConfig,
    hypervisor: Box<dyn Hypervisor>,
    estimate_mib: u64,
    /// The snapshot's vCPU count and RAM size, for shells.
    vcpus: u32,
    ram_mib: u64,
    /// VM, vCPUs and RAM slots made ahead for the next restore.
    spare_shell: Mutex<Option<Machine>>,
    state: Mutex<State>,
    changed: Condvar,
}

/// A pool of VMs restored from one snapshot.
pub struct Pool {
    inner: Arc<Inner>,
}

/// Host memory available now (MiB), from /proc/meminfo.
pub fn host_available_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib / 1024)
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn memory_ok(&self) -> std::result::Result<(), String> {
        match host_available_mib() {
            Some(avail) if avail < self.estimate_mib + self.config.memory_reserve_mib => Err(format!(
                "host memory is short: {avail} MiB available, a VM needs {} MiB plus a {} MiB reserve",
                self.estimate_mib, self.config.memory_reserve_mib
            )),
            _ => Ok(()),
        }
    }

    /// A new running, refreshed VM: into the spare shell when there is one
    /// (then a new spare is made in the background), else from scratch.
    fn restore_one(self: &Arc<Self>) -> Result<Vm> {
        let shell = self.spare_shell.lock().unwrap_or_else(|e| e.into_inner()).take();
        let config = self.config.restore_config();
        let Some(shell) = shell else {
            return Vm::restore_with(&*self.hypervisor, &self.config.snapshot, &config);
        };
        let vm = Vm::restore_into_with(crate::VmShell(shell), &self.config.snapshot, &config);
        let inner = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("sm-pool-shell".into()).spawn(move || {
            if let Some(inner) = inner.upgrade() {
                inner.make_spare_shell();
            }
        });
        vm
    }

    /// Prepares the VM, vCPUs and RAM slots of the next restore ahead of time.
    fn make_spare_shell(&self) {
        match Machine::new_shell(&*self.hypervisor, self.vcpus, self.ram_mib, ConsoleOutput::Null) {
            Ok(shell) => *self.spare_shell.lock().unwrap_or_else(|e| e.into_inner()) = Some(shell),
            Err(e) => tracing::warn!("pool: could not prepare a VM shell ({e}); restores create their VM then"),
        }
    }

    /// Whether a released VM is kept (reset, then idle) rather than
    /// stopped: when it fits under max_idle with the others being reset.
    /// Decided under the state lock as the VM is released, so an acquire
    /// sees it in `resetting` from then on.
    fn keep_released(&self) -> bool {
        let mut st = self.lock();
        let keep = st.idle.len() + st.resetting < self.config.max_idle;
        if keep {
            st.resetting += 1;
        }
        keep
    }

    /// Back to the snapshot, running and refreshed, then idle (`keep`), or
    /// stopped. A panic in either counts as a failed reset: the counters an
    /// acquire and the pool's owner wait on always come back down.
    fn recycle(&self, mut vm: Vm, keep: bool) {
        let began = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            if !keep {
                vm.stop();
                return None;
            }
            Some(vm.reset().map(|_| vm))
        }));
        let mut st = self.lock();
        if keep {
            st.resetting -= 1;
        }
        match outcome {
            Ok(Some(Ok(vm))) => {
                tracing::info!("pool: a released VM is reset to its snapshot and idle again ({:?})", began.elapsed());
                st.stats.resets += 1;
                st.idle.push_back((vm, Instant::now()));
            }
            Ok(None) => {
                st.alive -= 1;
                st.stats.dropped += 1;
            }
            Ok(Some(Err(e))) => {
                tracing::warn!("pooled VM could not be reset, dropping it: {e}");
                st.alive -= 1;
                st.stats.dropped += 1;
            }
            Err(_) => {
                tracing::warn!("pooled VM: resetting or stopping it panicked; dropped");
                st.alive -= 1;
                st.stats.dropped += 1;
            }
        }
        drop(st);
        self.changed.notify_all();
    }
}

impl Pool {
    /// Creates the pool and restores `min_idle` VMs.
    pub fn new(hypervisor: Box<dyn Hypervisor>, config: PoolConfig) -> Result<Pool> {
        if config.max == 0 || config.min_idle > config.max || config.min_idle > config.max_idle {
            return Err(Error::Pool(format!(
                "min_idle {}, max_idle {} and max {} are inconsistent",
                config.min_idle, config.max_idle, config.max
            )));
        }
        let snap = sm_snapshot::SnapshotFile::open(&config.snapshot).map_err(|e| Error::Pool(e.to_string()))?;
        let estimate_mib = config.vm_memory_estimate_mib.unwrap_or(snap.ram_size() >> 20);
        let inner = Arc::new(Inner {
            config,
            hypervisor,
            estimate_mib,
            vcpus: snap.vcpu_count(),
            ram_mib: snap.ram_size() >> 20,
            spare_shell: Mutex::new(None),
            state: Mutex::new(State {
                idle: VecDeque::new(),
                alive: 0,
                resetting: 0,
                awaiting_recycle: 0,
                stats: PoolStats::default(),
            }),
            changed: Condvar::new(),
        });
        for _ in 0..inner.config.min_idle {
            let vm = inner.restore_one()?;
            let mut st = inner.lock();
            st.alive += 1;
            st.idle.push_back((vm, Instant::now()));
        }
        inner.make_spare_shell();
        spawn_reaper(Arc::downgrade(&inner));
        Ok(Pool { inner })
    }

    /// Hands out a running VM: an idle one if there is one, else a newly restored
    /// one (subject to `max` and memory admission).
    pub fn acquire(&self) -> Result<PooledVm> {
        let t0 = Instant::now();
        let inner = &self.inner;
        let deadline_for_max = t0 + inner.config.acquire_timeout;
        let mut st = inner.lock();
        let (vm, hit) = loop {
            if let Some((vm, _)) = st.idle.pop_front() {
                if let Some(reason) = vm.machine().exit_reason() {
                    tracing::warn!("idle pooled VM ended ({reason:?}); dropping it");
                    st.alive -= 1;
                    st.stats.dropped += 1;
                    continue;
                }
                break (vm, true);
            }
            // A released VM being reset is idle again soon: wait for it
            // (one waiter each) rather than restoring another.
            let recycle_wait = inner.config.recycle_wait;
            if st.resetting > st.awaiting_recycle && t0.elapsed() < recycle_wait {
                st.awaiting_recycle += 1;
                let left = recycle_wait.saturating_sub(t0.elapsed());
                st = inner.changed.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
                st.awaiting_recycle -= 1;
                continue;
            }
            if st.alive < inner.config.max {
                if let Err(why) = inner.memory_ok() {
                    match inner.config.admission {
                        Admission::Wait(limit) if t0.elapsed() < limit => {
                            st = inner
                                .changed
                                .wait_timeout(st, Duration::from_millis(100))
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                            continue;
                        }
                        _ => {
                            st.stats.refused += 1;
                            return Err(Error::Pool(why));
                        }
                    }
                }
                st.alive += 1;
                drop(st);
                // A panic in the restore must not leave `alive` counted up.
                let restored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.restore_one()))
                    .unwrap_or_else(|_| Err(Error::Pool("restoring a VM panicked".into())));
                match restored {
                    Ok(vm) => {
                        st = inner.lock();
                        break (vm, false);
                    }
                    Err(e) => {
                        inner.lock().alive -= 1;
                        inner.changed.notify_all();
                        return Err(e);
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline_for_max {
                st.stats.refused += 1;
                return Err(Error::Pool(format!(
                    "all {} VMs are in use (waited {:?})",
                    inner.config.max, inner.config.acquire_timeout
                )));
            }
            st = inner.changed.wait_timeout(st, deadline_for_max - now).unwrap_or_else(|e| e.into_inner()).0;
        };
        let took = t0.elapsed();
        if hit {
            st.stats.hits += 1;
        } else {
            st.stats.misses += 1;
        }
        st.stats.acquire_total += took;
        st.stats.acquire_max = st.stats.acquire_max.max(took);
        Ok(PooledVm { vm: Some(vm), pool: self.inner.clone() })
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.lock();
        PoolStats { idle: st.idle.len(), alive: st.alive, ..st.stats }
    }
}

fn spawn_reaper(pool: Weak<Inner>) {
    let spawned = std::thread::Builder::new().name("sm-pool-reaper".into()).spawn(move || loop {
        let Some(inner) = pool.upgrade() else { return };
        let period = (inner.config.idle_timeout / 2).max(Duration::from_millis(50));
        let expired: Vec<Vm> = {
            let mut st = inner.lock();
            let mut out = Vec::new();
            while st.idle.len() > inner.config.min_idle {
                match st.idle.front() {
                    Some((_, since)) if since.elapsed() >= inner.config.idle_timeout => {
                        if let Some((vm, _)) = st.idle.pop_front() {
                            out.push(vm);
                        }
                    }
                    _ => break,
                }
            }
            st.alive -= out.len();
            st.stats.dropped += out.len() as u64;
            out
        };
        if !expired.is_empty() {
            inner.changed.notify_all();
        }
        drop(expired);
        drop(inner);
        std::thread::sleep(period);
    });
    if let Err(e) = spawned {
        tracing::warn!("pool reaper thread not started: {e}; idle VMs will not expire");
    }
}

/// A VM on loan from a [`Pool`]; dropping it resets the VM in place and returns it.
pub struct PooledVm {
    vm: Option<Vm>,
    pool: Arc<Inner>,
}

impl Deref for PooledVm {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        self.vm.as_ref().expect("present until drop")
    }
}

impl DerefMut for PooledVm {
    fn deref_mut(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("present until drop")
    }
}

impl Drop for PooledVm {
    fn drop(&mut self) {
        let Some(vm) = self.vm.take() else { return };
        let keep = self.pool.keep_released();
        // Reset and refresh off the caller's thread; the VM is idle again after.
        let pool = self.pool.clone();
        let slot = Arc::new(Mutex::new(Some(vm)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new().name("sm-pool-recycle".into()).spawn(move || {
            if let Some(vm) = theirs.lock().unwrap_or_else(|e| e.into_inner()).take() {
                pool.recycle(vm, keep);
            }
        });
        if spawned.is_err() {
            if let Some(vm) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                self.pool.recycle(vm, keep);
            }
        }
    }
}
