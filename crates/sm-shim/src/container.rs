//! A container: the microVM its bundle booted, its init process (the
//! bundle's) and the processes exec'd beside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim::protos::events::task::{TaskExecStarted, TaskExit, TaskStart};
use containerd_shim::protos::shim::shim::CreateTaskRequest;
use oci_spec::runtime::Spec;
use sm_api::oci::Store;
use sm_api::{BakeOptions, GuestImage, Image, PooledVm, Vm};

use crate::bundle;
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::process::{Exit, Process, Status};
use crate::stdio::Stdio;
use crate::warm::WarmPools;

/// How long a SIGKILLed exec may take to report its exit (at delete, or
/// when the init ends).
const EXEC_KILL_WAIT: Duration = Duration::from_secs(10);
/// How long delete waits for a start in flight to let go of the VM.
const VM_RELEASE_WAIT: Duration = Duration::from_secs(60);
/// Guest RAM when the spec sets no memory limit.
const DEFAULT_MEMORY_MIB: u64 = 256;
/// The least guest RAM a container gets (the guest kernel and agent need it).
const MIN_MEMORY_MIB: u64 = 128;
/// Where the guest kernel and agent initrd are, if not beside this binary
/// (`<dir of the binary>/../guest`, as the `supermachine` CLI looks).
const GUEST_DIR_ENV: &str = "SM_GUEST_DIR";

/// A created container.
pub struct Container {
    /// containerd's id of it.
    pub id: String,
    /// Its bundle directory.
    pub bundle: PathBuf,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Shared with starts in flight (which talk to the guest without a lock).
    vm: Mutex<Option<Arc<ContainerVm>>>,
    /// The guest's RAM size.
    memory_mib: u64,
}

impl Container {
    /// Reads the bundle, mounts its root file system, builds the root disk
    /// and boots the VM (its agent answering). On failure nothing is left
    /// mounted or built.
    pub fn create(req: &CreateTaskRequest, warm: Option<&WarmPools>) -> Result<Arc<Container>> {
        let bundle = PathBuf::from(&req.bundle);
        // This bundle's log FIFO is the one containerd reads the longest now.
        crate::shim_log::ShimLog::add_bundle(&bundle);
        let spec = bundle::load_spec(&bundle)?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| ShimError::InvalidArgument("the bundle's config.json has no process to run".into()))?;
        let request = bundle::exec_request(process)?;
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // What can fail without touching anything comes first.
        let rootfs = bundle::rootfs_dir(&bundle, &spec);
        if req.rootfs.is_empty() && !rootfs.is_dir() {
            return Err(ShimError::InvalidArgument(format!(
                "the bundle's root file system {} is not a directory (containerd handed over no rootfs mounts, \
                 so config.json's root.path must name a directory holding the container's files)",
                rootfs.display()
            )));
        }
        let guest = guest_image()?;
        let hypervisor = sm_api::default_hypervisor()?;
        let memory_mib = memory_mib(&spec);
        let vm = boot(req, &spec, &request.argv[0], guest, memory_mib, &*hypervisor, warm)
            .inspect_err(|_| bundle::clean_up(&bundle))?;
        Ok(Arc::new(Container {
            id: req.id.clone(),
            bundle,
            init: Arc::new(Process::new(String::new(), request, stdio)),
            execs: Mutex::new(HashMap::new()),
            vm: Mutex::new(Some(Arc::new(vm))),
            memory_mib,
        }))
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exec processes now (no lock held while they are signalled).
    fn exec_list(&self) -> Vec<Arc<Process>> {
        self.execs().values().cloned().collect()
    }

    /// Ends every exec process: SIGKILL to all, then up to
    /// [`EXEC_KILL_WAIT`] in all for their exits to be recorded.
    fn kill_execs(&self) {
        let execs = self.exec_list();
        for p in &execs {
            // A never-started exec ends here without running (no event of its own).
            let _ = p.kill(libc::SIGKILL as u32, |_, _| ());
        }
        let deadline = std::time::Instant::now() + EXEC_KILL_WAIT;
        for p in &execs {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let _ = p.wait_timeout(left);
        }
    }

    /// The init process (`exec_id` empty) or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        self.execs().get(exec_id).cloned().ok_or_else(|| ShimError::NotFound(format!("exec {exec_id}")))
    }

    /// Adds an exec process (created, not started) running OCI `process`.
    pub fn add_exec(&self, exec_id: &str, process: &oci_spec::runtime::Process, stdio: Stdio) -> Result<()> {
        if exec_id.is_empty() {
            return Err(ShimError::InvalidArgument("an exec needs an id".into()));
        }
        if self.init.status().0 != Status::Running {
            return Err(ShimError::FailedPrecondition(format!("container {} is not running", self.id)));
        }
        let request = bundle::exec_request(process)?;
        let mut execs = self.execs();
        if execs.contains_key(exec_id) {
            return Err(ShimError::AlreadyExists(format!("exec {exec_id}")));
        }
        execs.insert(exec_id.to_string(), Arc::new(Process::new(exec_id.to_string(), request, stdio)));
        Ok(())
    }

    /// Starts a process: its start and, later, its exit are published to
    /// `events`, in that order (and the init's exit ends the container's
    /// other processes, as the end of a PID namespace's init does). Returns
    /// the guest pid.
    pub fn start(self: &Arc<Self>, exec_id: &str, events: &Arc<Events>) -> Result<u32> {
        let process = self.process(exec_id)?;
        if !exec_id.is_empty() && self.init.status().0 != Status::Running {
            return Err(ShimError::FailedPrecondition(format!("container {} is not running", self.id)));
        }
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let vm = vm.ok_or_else(|| ShimError::FailedPrecondition(format!("container {} is deleted", self.id)))?;
        let (container, exit_events) = (Arc::clone(self), Arc::clone(events));
        let on_start = |pid| {
            if exec_id.is_empty() {
                events.publish(TaskStart { container_id: self.id.clone(), pid, ..Default::default() });
            } else {
                events.publish(TaskExecStarted {
                    container_id: self.id.clone(),
                    exec_id: exec_id.to_string(),
                    pid,
                    ..Default::default()
                });
            }
        };
        let began = std::time::Instant::now();
        let pid = process.start(&vm, on_start, move |p, exit| on_exit(&container, &exit_events, p, exit))?;
        tracing::info!("container {}: process {} started in {:?}", self.id, process.name(), began.elapsed());
        Ok(pid)
    }

    /// Signals a process; `all` with the init: every process of the
    /// container. One killed before it started ends at once, its exit
    /// published as a run process's is.
    pub fn kill(&self, exec_id: &str, signal: u32, all: bool, events: &Events) -> Result<()> {
        let process = self.process(exec_id)?;
        let publish_exit = |p: &Process, exit: &Exit| on_exit(self, events, p, exit);
        if exec_id.is_empty() && all {
            for p in self.exec_list() {
                // One already gone is no reason to spare the rest.
                let _ = p.kill(signal, publish_exit);
            }
        }
        process.kill(signal, publish_exit)
    }

    /// The guest pids of the running processes.
    pub fn pids(&self) -> Vec<u32> {
        let execs = self.exec_list();
        std::iter::once(&self.init)
            .chain(execs.iter())
            .map(|p| p.status())
            .filter(|(status, pid, _)| *status == Status::Running && *pid > 0)
            .map(|(_, pid, _)| pid)
            .collect()
    }

    /// What the container's VM costs the host now (see [`crate::stats`]).
    pub fn metrics(&self) -> Result<containerd_shim::protos::cgroups::metrics::Metrics> {
        let processes = u64::try_from(self.pids().len()).unwrap_or(u64::MAX);
        crate::stats::vm_metrics(processes, self.memory_mib << 20)
    }

    /// Deletes an exec (ended or never started) and returns how it ended.
    pub fn delete_exec(&self, exec_id: &str) -> Result<(u32, Exit)> {
        let process = self.process(exec_id)?;
        let (status, pid, exit) = process.status();
        if matches!(status, Status::Running | Status::Starting) {
            return Err(ShimError::FailedPrecondition(format!("exec {exec_id} is still running")));
        }
        self.execs().remove(exec_id);
        Ok((pid, exit.unwrap_or_else(never_ran)))
    }

    /// Deletes the container (init ended or never started): the VM stops,
    /// the root file system is unmounted and the root disk removed.
    pub fn delete(&self) -> Result<(u32, Exit)> {
        // A start racing this delete either finished (refused here) or can
        // no longer begin.
        self.init
            .retire()
            .map_err(|_| ShimError::FailedPrecondition(format!("container {} is still running", self.id)))?;
        let (_, pid, exit) = self.init.status();
        self.kill_execs();
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(vm) = vm {
            // A start still talking to the guest holds the VM a moment.
            let deadline = std::time::Instant::now() + VM_RELEASE_WAIT;
            while Arc::strong_count(&vm) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            match Arc::try_unwrap(vm) {
                Ok(vm) => {
                    let ended = vm.stop();
                    tracing::info!("container {}: {ended}", self.id);
                }
                // The last holder's drop stops it.
                Err(_) => tracing::warn!("container {}: the VM stops when its last start returns", self.id),
            }
        }
        bundle::clean_up(&self.bundle);
        Ok((pid, exit.unwrap_or_else(never_ran)))
    }
}

/// The exit of a process that never ran.
fn never_ran() -> Exit {
    Exit { status: 0, at: containerd_shim::util::timestamp().unwrap_or_default() }
}

fn on_exit(container: &Container, events: &Events, process: &Process, exit: &Exit) {
    if process.exec_id.is_empty() {
        container.kill_execs();
    }
    let (_, pid, _) = process.status();
    let id = if process.exec_id.is_empty() { container.id.clone() } else { process.exec_id.clone() };
    events.publish(TaskExit {
        container_id: container.id.clone(),
        id,
        pid,
        exit_status: exit.status,
        exited_at: Some(exit.at.clone()).into(),
        ..Default::default()
    });
}

/// The guest kernel and agent initrd: `$SM_GUEST_DIR`, else `guest/` beside
/// the directory of this binary (`target/guest` for a build tree).
fn guest_image() -> Result<GuestImage> {
    let dir = match std::env::var_os(GUEST_DIR_ENV) {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().map_err(ShimError::io("locating the shim binary"))?;
            exe.parent().and_then(Path::parent).map(|t| t.join("guest")).unwrap_or_default()
        }
    };
    GuestImage::from_dir(&dir).map_err(|e| {
        ShimError::InvalidArgument(format!(
            "the guest kernel and agent initrd are needed ({e}); set {GUEST_DIR_ENV} in containerd's environment \
             to the directory `cargo xtask kernel` and `cargo xtask agent --initrd` fill (target/guest)"
        ))
    })
}

/// The VM a container runs in: its own, or one on loan from the warm pool.
pub enum ContainerVm {
    /// Started for this container; stopped with it.
    Own(Vm),
    /// From the warm pool; given back at delete (reset to the image's
    /// snapshot in place, for the next container of the image).
    Pooled(PooledVm),
}

impl std::ops::Deref for ContainerVm {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        match self {
            ContainerVm::Own(vm) => vm,
            ContainerVm::Pooled(vm) => vm,
        }
    }
}

impl ContainerVm {
    /// Ends the container's use of the VM; says what became of it.
    fn stop(self) -> String {
        match self {
            ContainerVm::Own(vm) => format!("VM stopped ({:?})", vm.stop()),
            ContainerVm::Pooled(vm) => {
                drop(vm);
                "VM given back to the warm pool (reset to the image's snapshot)".into()
            }
        }
    }
}

/// Gets the root disk and starts the VM on it: from the warm pool when there
/// is one and the image has a baked snapshot, else restored from that
/// snapshot, else (the first container of an image: it bakes the snapshot,
/// when the root file system is keyed) booted cold.
fn boot(
    req: &CreateTaskRequest,
    spec: &Spec,
    first_program: &str,
    guest: GuestImage,
    memory_mib: u64,
    hypervisor: &dyn sm_api::Hypervisor,
    warm: Option<&WarmPools>,
) -> Result<ContainerVm> {
    let began = std::time::Instant::now();
    let bundle = Path::new(&req.bundle);
    let store_root = Store::default_root();
    let store = Store::open(&store_root).map_err(sm_api::Error::from)?;
    // No prune while the root disk is built and the VM opens it (it takes
    // the store's lock exclusively).
    let _no_prune = store.gc_shared().map_err(sm_api::Error::from)?;
    let rootfs = bundle::rootfs_dir(bundle, spec);
    let (disk, key) = bundle::root_disk(bundle, &rootfs, &req.rootfs, &store)?;
    let disk_ready = began.elapsed();
    let name = format!("the root file system of container {}", req.id);
    let key_or_unique = key.clone().unwrap_or_else(|| sm_api::oci::Digest::of(req.bundle.as_bytes()));
    let image = Image::from_root_disk(store, name, key_or_unique, disk);
    let mut config = image.vm_config(guest);
    config.memory_mib = memory_mib;
    let bake = BakeOptions { prefetch: vec![first_program.to_string()], ..BakeOptions::default() };
    if let (Some(warm), Some(_)) = (warm, &key) {
        let snapshot = image.baked_snapshot_path(&config, &bake)?;
        if snapshot.exists() {
            match warm.acquire(&snapshot, &config.disks) {
                Ok((vm, hit)) => {
                    let how = if hit { "an idle VM of the warm pool" } else { "restored into the warm pool" };
                    tracing::info!(
                        "container {}: {how} in {:?} (root disk ready at {disk_ready:?})",
                        req.id,
                        began.elapsed()
                    );
                    return Ok(ContainerVm::Pooled(vm));
                }
                Err(e) => tracing::warn!("container {}: the warm pool gave no VM ({e}); starting one", req.id),
            }
        }
    }
    let (vm, start) = image.start(hypervisor, config, key.is_some().then_some(&bake))?;
    let steps = match vm.start_timings() {
        Some(t) => format!("; restore {:?}, agent ready {:?}", t.restored, t.refreshed),
        None => String::new(),
    };
    tracing::info!(
        "container {}: {} in {:?} (root disk ready at {disk_ready:?}{steps})",
        req.id,
        start.describe(),
        began.elapsed()
    );
    Ok(ContainerVm::Own(vm))
}

/// Guest RAM: the spec's memory limit (rounded up to MiB, at least
/// [`MIN_MEMORY_MIB`]), else [`DEFAULT_MEMORY_MIB`].
fn memory_mib(spec: &Spec) -> u64 {
    let limit = spec.linux().as_ref().and_then(|l| l.resources().as_ref()).and_then(|r| r.memory().as_ref());
    match limit.and_then(|m| m.limit()).filter(|b| *b > 0) {
        Some(bytes) => (bytes.unsigned_abs().div_ceil(1 << 20)).max(MIN_MEMORY_MIB),
        None => DEFAULT_MEMORY_MIB,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn guest_memory_follows_the_spec_limit() {
        assert_eq!(memory_mib(&spec(serde_json::json!({"ociVersion": "1.0.2"}))), DEFAULT_MEMORY_MIB);
        let limited = |bytes: i64| {
            spec(serde_json::json!({"ociVersion": "1.0.2", "linux": {"resources": {"memory": {"limit": bytes}}}}))
        };
        assert_eq!(memory_mib(&limited(512 << 20)), 512);
        assert_eq!(memory_mib(&limited((300 << 20) + 1)), 301, "rounded up");
        assert_eq!(memory_mib(&limited(16 << 20)), MIN_MEMORY_MIB, "never below what the guest needs");
        assert_eq!(memory_mib(&limited(-1)), DEFAULT_MEMORY_MIB, "-1: no limit");
    }
}
