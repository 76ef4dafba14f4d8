//! The async (tokio) facade: [`AsyncVm`] and [`AsyncPool`] offer the blocking
//! API of this crate as `async fn`s. Each call runs the blocking one on tokio's
//! blocking thread pool ([`tokio::task::spawn_blocking`]) and returns the same
//! [`Result`] types; a blocking task that panics or never runs
//! (the runtime shut down) comes back as [`Error::Task`].
//!
//! Only with the `tokio` cargo feature (on by default). The module is named
//! `nonblocking` rather than `tokio` so that it does not shadow the `tokio`
//! crate (inside this crate or for users who glob-import `sm_api::*`), and
//! rather than `async`, a keyword that would have to be written `r#async`.
//!
//! ```no_run
//! # async fn demo(hv: Box<dyn sm_hypervisor::Hypervisor>) -> sm_api::Result<()> {
//! use std::sync::Arc;
//! use sm_api::nonblocking::AsyncVm;
//! use sm_api::ExecRequest;
//!
//! let hv: Arc<dyn sm_hypervisor::Hypervisor> = Arc::from(hv);
//! let vm = AsyncVm::restore(hv, "agent.snap", sm_vmm::ConsoleOutput::Null, &[]).await?;
//! let out = vm.exec(ExecRequest::new(["/bin/echo", "hi"]), None).await?;
//! assert_eq!(out.stdout, b"hi\n");
//! vm.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Notes:
//! - The futures must be polled inside a tokio runtime (any flavour); they are
//!   `Send`, so they can be `tokio::spawn`ed.
//! - The hypervisor is passed as an owned `Arc<dyn Hypervisor>` (the trait is
//!   `Send + Sync`, so it can move to the blocking pool); `Arc::from(boxed)`
//!   turns a `Box<dyn Hypervisor>` into one.
//! - Calls that take `&self` in the blocking API take `&self` here too and run
//!   concurrently (e.g. several `exec`s under `tokio::join!`); calls that take
//!   `&mut self` take `&mut self` here as well and run alone: the VM sits behind
//!   a read-write lock, held by each blocking call for its duration.
//! - Dropping a future stops waiting but not the blocking call: it still runs to
//!   completion (a VM dropped meanwhile is released after it).
//! - Dropping an [`AsyncVm`] or [`AsyncPooledVm`] inside a runtime stops the VM
//!   (or resets it back into its pool) on the blocking pool, not on the async
//!   worker; [`AsyncVm::stop`] and [`AsyncPooledVm::release`] do the same and
//!   let the caller wait for it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sm_agent::{ExecOutcome, ExecRequest};
use sm_hypervisor::Hypervisor;
use sm_vmm::{ConsoleOutput, ExitReason, SnapshotReport};

use crate::{Disk, Error, Pool, PoolConfig, PoolStats, PooledVm, Result, Vm, VmConfig};

/// Runs `f` on tokio's blocking pool and waits for it.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> Result<R> + Send + 'static) -> Result<R> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Task(e.to_string()))?
}

/// A VM (or a pooled one) shared with the blocking tasks that use it. `None`
/// once it was taken out (stopped, released); only blocking calls whose futures
/// were dropped can still see that.
struct Shared<T: Send + Sync + 'static> {
    cell: Arc<RwLock<Option<T>>>,
}

fn gone() -> Error {
    Error::Task("the VM was stopped or released before this call ran".into())
}

impl<T: Send + Sync + 'static> Shared<T> {
    fn new(value: T) -> Self {
        Shared { cell: Arc::new(RwLock::new(Some(value))) }
    }

    /// Runs `f` with shared access, on the blocking pool.
    async fn read<R: Send + 'static>(&self, f: impl FnOnce(&T) -> Result<R> + Send + 'static) -> Result<R> {
        let cell = self.cell.clone();
        blocking(move || {
            let guard = cell.read().unwrap_or_else(PoisonError::into_inner);
            f(guard.as_ref().ok_or_else(gone)?)
        })
        .await
    }

    /// Runs `f` with exclusive access, on the blocking pool.
    async fn write<R: Send + 'static>(&self, f: impl FnOnce(&mut T) -> Result<R> + Send + 'static) -> Result<R> {
        let cell = self.cell.clone();
        blocking(move || {
            let mut guard = cell.write().unwrap_or_else(PoisonError::into_inner);
            f(guard.as_mut().ok_or_else(gone)?)
        })
        .await
    }

    /// Takes the value out (after any blocking call still using it) and runs `f`
    /// on it, on the blocking pool.
    async fn take<R: Send + 'static>(&self, f: impl FnOnce(T) -> R + Send + 'static) -> Result<R> {
        let cell = self.cell.clone();
        blocking(move || {
            let taken = cell.write().unwrap_or_else(PoisonError::into_inner).take();
            Ok(f(taken.ok_or_else(gone)?))
        })
        .await
    }
}

impl<T: Send + Sync + 'static> Drop for Shared<T> {
    fn drop(&mut self) {
        // Dropping a VM stops it (joins its vCPU threads); a pooled VM is reset in
        // place. Both block: inside a runtime, do it on the blocking pool.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let cell = std::mem::replace(&mut self.cell, Arc::new(RwLock::new(None)));
        if let Ok(guard) = cell.try_read() {
            if guard.is_none() {
                return; // already taken out: nothing left to do
            }
        }
        drop(runtime.spawn_blocking(move || drop(cell)));
    }
}

/// The guest operations [`AsyncVm`] and [`AsyncPooledVm`] share; `self.vm` is a
/// `Shared<T>` whose `T` derefs to (or is) a [`Vm`].
macro_rules! guest_ops {
    () => {
        /// Runs a command to completion ([`Vm::exec`]); calls run concurrently.
        pub async fn exec(&self, request: ExecRequest, stdin: Option<Vec<u8>>) -> Result<ExecOutcome> {
            self.vm.read(move |vm| vm.exec(&request, stdin.as_deref())).await
        }

        /// Reads a guest file ([`Vm::read_file`]).
        pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
            let path = path.to_owned();
            self.vm.read(move |vm| vm.read_file(&path)).await
        }

        /// Writes a guest file with `mode` ([`Vm::write_file`]).
        pub async fn write_file(&self, path: &str, mode: u32, data: Vec<u8>) -> Result<()> {
            let path = path.to_owned();
            self.vm.read(move |vm| vm.write_file(&path, mode, &data)).await
        }

        /// A stream to TCP `guest_port` on the guest's loopback through the
        /// agent ([`Vm::connect_tcp`]; no network device needed).
        pub async fn connect_tcp(&self, guest_port: u16) -> Result<crate::GuestTcpStream> {
            self.vm.read(move |vm| vm.connect_tcp(guest_port)).await
        }

        /// Publishes a guest port on the host through the agent
        /// ([`Vm::forward_port`]); it stops listening when dropped.
        pub async fn forward_port(&self, port: crate::PublishedPort) -> Result<crate::PortForward> {
            self.vm.read(move |vm| vm.forward_port(port)).await
        }

        /// Runs `f` with the VM on the blocking pool, for what has no async
        /// method here ([`Vm::agent`], [`Vm::machine`], ...); runs alongside
        /// other `&self` calls.
        pub async fn with_vm<R: Send + 'static>(&self, f: impl FnOnce(&Vm) -> R + Send + 'static) -> Result<R> {
            self.vm.read(move |vm| Ok(f(vm))).await
        }

        /// Runs `f` with exclusive access to the VM on the blocking pool.
        pub async fn with_vm_mut<R: Send + 'static>(
            &mut self,
            f: impl FnOnce(&mut Vm) -> R + Send + 'static,
        ) -> Result<R> {
            self.vm.write(move |vm| Ok(f(vm))).await
        }
    };
}

/// A running microVM with the guest agent: [`Vm`] with `async` methods.
pub struct AsyncVm {
    vm: Shared<Vm>,
    vsock_path: PathBuf,
}

impl From<Vm> for AsyncVm {
    fn from(vm: Vm) -> Self {
        AsyncVm::new(vm)
    }
}

impl AsyncVm {
    /// Wraps a VM made with the blocking API.
    pub fn new(vm: Vm) -> AsyncVm {
        AsyncVm { vsock_path: vm.vsock_path().to_path_buf(), vm: Shared::new(vm) }
    }

    /// Boots a VM and waits until its agent listens ([`Vm::boot`]).
    pub async fn boot(hypervisor: Arc<dyn Hypervisor>, config: VmConfig) -> Result<AsyncVm> {
        blocking(move || Vm::boot(&*hypervisor, config)).await.map(AsyncVm::new)
    }

    /// Restores a snapshot into a new running VM ([`Vm::restore`]).
    pub async fn restore(
        hypervisor: Arc<dyn Hypervisor>,
        snapshot: impl AsRef<Path>,
        console: ConsoleOutput,
        disks: &[Disk],
    ) -> Result<AsyncVm> {
        let snapshot = snapshot.as_ref().to_path_buf();
        let disks = disks.to_vec();
        blocking(move || Vm::restore(&*hypervisor, &snapshot, console, &disks)).await.map(AsyncVm::new)
    }

    /// Restores a snapshot with a fresh network back end ([`Vm::restore_with_network`]).
    pub async fn restore_with_network(
        hypervisor: Arc<dyn Hypervisor>,
        snapshot: impl AsRef<Path>,
        console: ConsoleOutput,
        disks: &[Disk],
        network: crate::Network,
    ) -> Result<AsyncVm> {
        let snapshot = snapshot.as_ref().to_path_buf();
        let disks = disks.to_vec();
        blocking(move || Vm::restore_with_network(&*hypervisor, &snapshot, console, &disks, &network))
            .await
            .map(AsyncVm::new)
    }

    guest_ops!();

    /// Connects to guest vsock `port` ([`Vm::connect`]). The stream is a blocking
    /// std one; for tokio, `set_nonblocking(true)` it and pass it to
    /// `tokio::net::UnixStream::from_std`.
    pub async fn connect(&self, port: u32) -> Result<std::os::unix::net::UnixStream> {
        self.vm.read(move |vm| vm.connect(port)).await
    }

    /// Pauses the VM and writes a full snapshot ([`Vm::snapshot`]); it stays
    /// paused until [`AsyncVm::resume`].
    pub async fn snapshot(&mut self, path: impl AsRef<Path>) -> Result<SnapshotReport> {
        let path = path.as_ref().to_path_buf();
        self.vm.write(move |vm| vm.snapshot(&path)).await
    }

    /// Writes a full snapshot after a short pause; the VM keeps running
    /// ([`Vm::snapshot_live`]).
    pub async fn snapshot_live(&mut self, path: impl AsRef<Path>) -> Result<SnapshotReport> {
        let path = path.as_ref().to_path_buf();
        self.vm.write(move |vm| vm.snapshot_live(&path)).await
    }

    /// Writes a diff snapshot over the one this VM was restored from
    /// ([`Vm::snapshot_diff`]); the VM stays paused.
    pub async fn snapshot_diff(&mut self, path: impl AsRef<Path>) -> Result<SnapshotReport> {
        let path = path.as_ref().to_path_buf();
        self.vm.write(move |vm| vm.snapshot_diff(&path)).await
    }

    /// Resumes a paused VM ([`Vm::resume`]).
    pub async fn resume(&mut self) -> Result<()> {
        self.vm.write(Vm::resume).await
    }

    /// Returns a restored VM to its snapshot in place and runs it again
    /// ([`Vm::reset`]).
    pub async fn reset(&mut self) -> Result<Duration> {
        self.vm.write(Vm::reset).await
    }

    /// Stops the VM ([`Vm::stop`]), after any blocking call still using it.
    pub async fn stop(self) -> Result<ExitReason> {
        self.vm.take(Vm::stop).await
    }

    /// The blocking [`Vm`] back, after any blocking call still using it.
    pub async fn into_blocking(self) -> Result<Vm> {
        self.vm.take(|vm| vm).await
    }

    /// The host socket of the guest's vsock device ([`Vm::vsock_path`]).
    pub fn vsock_path(&self) -> &Path {
        &self.vsock_path
    }
}

/// A [`Hypervisor`] shared through an `Arc`, for [`Pool::new`] which owns a `Box`.
struct SharedHypervisor(Arc<dyn Hypervisor>);

impl Hypervisor for SharedHypervisor {
    // Forward every method of the trait, so the pool sees the same backend.
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn create_vm(&self, config: &sm_hypervisor::VmConfig) -> sm_hypervisor::Result<Arc<dyn sm_hypervisor::Vm>> {
        self.0.create_vm(config)
    }
    fn max_vcpus(&self) -> u32 {
        self.0.max_vcpus()
    }
}

/// A pool of VMs restored from one snapshot: [`Pool`] with `async` methods.
/// Cloning gives another handle to the same pool.
#[derive(Clone)]
pub struct AsyncPool {
    pool: Arc<Pool>,
}

impl From<Pool> for AsyncPool {
    fn from(pool: Pool) -> Self {
        AsyncPool { pool: Arc::new(pool) }
    }
}

impl AsyncPool {
    /// Creates the pool and restores `min_idle` VMs ([`Pool::new`]).
    pub async fn new(hypervisor: Arc<dyn Hypervisor>, config: PoolConfig) -> Result<AsyncPool> {
        blocking(move || Pool::new(Box::new(SharedHypervisor(hypervisor)), config)).await.map(AsyncPool::from)
    }

    /// Hands out a running VM ([`Pool::acquire`]): waiting for a free slot or for
    /// memory happens on the blocking pool.
    pub async fn acquire(&self) -> Result<AsyncPooledVm> {
        let pool = self.pool.clone();
        blocking(move || pool.acquire()).await.map(|vm| AsyncPooledVm { vm: Shared::new(vm) })
    }

    /// Current counters ([`Pool::stats`]; a short lock, no blocking call).
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// The blocking pool this wraps.
    pub fn as_blocking(&self) -> &Pool {
        &self.pool
    }
}

/// A VM on loan from an [`AsyncPool`] ([`PooledVm`]): give it back with
/// [`AsyncPooledVm::release`] (dropping it does the same without waiting).
pub struct AsyncPooledVm {
    vm: Shared<PooledVm>,
}

impl AsyncPooledVm {
    guest_ops!();

    /// Hands the VM back to its pool after any blocking call still using it; the
    /// pool resets and refreshes it in the background before lending it again.
    pub async fn release(self) -> Result<()> {
        self.vm.take(drop).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>(_: &T) {}
    fn is_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_be_shared_between_tasks() {
        is_send_sync::<AsyncVm>();
        is_send_sync::<AsyncPool>();
        is_send_sync::<AsyncPooledVm>();
    }

    /// Only type-checked: every future can be `tokio::spawn`ed.
    #[allow(dead_code)]
    fn futures_are_send(mut vm: AsyncVm, pool: AsyncPool, mut pooled: AsyncPooledVm, hv: Arc<dyn Hypervisor>) {
        let image = crate::GuestImage { kernel: "k".into(), initrd: "i".into() };
        is_send(&AsyncVm::boot(hv.clone(), VmConfig::new(image)));
        is_send(&AsyncVm::restore(hv.clone(), "x", ConsoleOutput::Null, &[]));
        is_send(&AsyncPool::new(hv, PoolConfig::new("x".into())));
        is_send(&vm.exec(ExecRequest::default(), None));
        is_send(&vm.read_file("/x"));
        is_send(&vm.write_file("/x", 0o644, Vec::new()));
        is_send(&vm.connect(1));
        is_send(&vm.with_vm(|vm| vm.vsock_path().to_path_buf()));
        is_send(&vm.snapshot("x"));
        is_send(&vm.snapshot_live("x"));
        is_send(&vm.snapshot_diff("x"));
        is_send(&vm.resume());
        is_send(&vm.reset());
        is_send(&vm.with_vm_mut(|_| ()));
        is_send(&vm.stop());
        is_send(&pool.acquire());
        is_send(&pooled.exec(ExecRequest::default(), None));
        is_send(&pooled.read_file("/x"));
        is_send(&pooled.write_file("/x", 0o644, Vec::new()));
        is_send(&pooled.with_vm(|_| ()));
        is_send(&pooled.with_vm_mut(|_| ()));
        is_send(&pooled.release());
    }
}
