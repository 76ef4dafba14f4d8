use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sm_agent::{AgentClient, ExecOutcome, ExecRequest, DEFAULT_AGENT_PORT, READY_MARKER};
use sm_hypervisor::Hypervisor;
use sm_virtio::block::Block;
use sm_virtio::vsock::{Vsock, DEFAULT_GUEST_CID};
use sm_virtio::VirtioDevice;
use sm_vmm::{
    ConsoleOutput, ExitReason, LinuxBoot, Machine, MachineConfig, RestoreOptions, SnapshotReport, DEFAULT_CMDLINE,
};

use crate::volume::VolumeMount;
use crate::{Error, Result};

mod config;
mod mounts;
mod refresh;
mod watchdog;
mod work_dir;

pub use config::{Disk, RestoreConfig, VmConfig, VmShell};
pub use refresh::StartTimings;
pub use work_dir::sweep_stale_work_dirs;
use work_dir::{WorkDir, VSOCK_SOCKET};

/// How long a restored guest may take to answer its first agent connection (its
/// kernel may be emulated and the host busy: this is generous on purpose).
const RESTORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How much longer than a command's own timeout [`Vm::exec`] waits for the
/// agent's report of it (the agent kills it at the timeout).
pub const EXEC_REPORT_GRACE: Duration = Duration::from_secs(30);

/// A running microVM with the guest agent.
pub struct Vm {
    // Drop order: the machine (and its devices) before the network back end
    // and the work dir.
    machine: Machine,
    vsock_path: PathBuf,
    agent_port: u32,
    network: Option<crate::network::NetworkBackend>,
    /// Guest paths of mounted volumes and shares, flushed and unmounted
    /// before the VM stops.
    mounts: Vec<mounts::Mounted>,
    /// What the agent mounts when the VM comes up, and again after a reset.
    mount_plan: mounts::MountPlan,
    /// An agent connection already made (by the refresh after a restore),
    /// handed to the next [`Vm::agent`] call.
    ready_agent: std::sync::Mutex<Option<AgentClient<UnixStream>>>,
    /// How the VM came up, when it was restored.
    start_timings: Option<StartTimings>,
    _work: WorkDir,
}

/// The disk devices, then the volumes' (which announce their size after a
/// restore: a snapshot may have been baked with placeholders in their slots).
fn disk_devices(disks: &[Disk], volumes: &[VolumeMount]) -> Result<Vec<Box<dyn VirtioDevice>>> {
    let mut devices = Vec::with_capacity(disks.len() + volumes.len());
    for d in disks {
        devices.push(Box::new(Block::new(&d.path, d.read_only, None)?) as Box<dyn VirtioDevice>);
    }
    for v in volumes {
        if v.read_only {
            crate::volume::prepare_read_only(&v.path)?;
        }
        devices.push(Box::new(Block::new(&v.path, v.read_only, None)?.announce_capacity_after_restore()));
    }
    Ok(devices)
}

fn new_vsock(work: &WorkDir) -> Result<(Box<Vsock>, PathBuf)> {
    let path = work.path().join(VSOCK_SOCKET);
    let dev = Vsock::new(DEFAULT_GUEST_CID, &path).map_err(|e| Error::Device(e.to_string()))?;
    Ok((Box::new(dev), path))
}

impl Vm {
    /// Boots a VM and waits until its agent listens (and has mounted the
    /// volumes and shares).
    pub fn boot(hypervisor: &dyn Hypervisor, config: VmConfig) -> Result<Vm> {
        Self::boot_with(hypervisor, config, true)
    }

    /// Boots with the volume and share devices attached but not mounted: the
    /// state a snapshot with slots is baked in.
    pub(crate) fn boot_unmounted(hypervisor: &dyn Hypervisor, config: VmConfig) -> Result<Vm> {
        Self::boot_with(hypervisor, config, false)
    }

    fn boot_with(hypervisor: &dyn Hypervisor, config: VmConfig, mount: bool) -> Result<Vm> {
        let (max_vcpus, why) = hypervisor.max_linux_vcpus();
        if config.vcpus > max_vcpus {
            return Err(Error::Unsupported(format!(
                "{} vCPUs requested, at most {max_vcpus} boot here: {}",
                config.vcpus,
                why.unwrap_or("the hypervisor's vCPU limit")
            )));
        }
        let work = WorkDir::new()?;
        let mut machine = Machine::new(
            hypervisor,
            MachineConfig { vcpus: config.vcpus, memory_mib: config.memory_mib, console: config.console.clone() },
        )?;
        let (vsock, vsock_path) = new_vsock(&work)?;
        machine.add_virtio_device(vsock)?;
        for disk in disk_devices(&config.disks, &config.volumes)? {
            machine.add_virtio_device(disk)?;
        }
        for share in crate::share::devices(&config.shares)? {
            machine.add_virtio_device(share)?;
        }
        let mut cmdline = DEFAULT_CMDLINE.to_string();
        let mut network = None;
        if let Some((device, backend, word)) = crate::network::start(&config.network)? {
            machine.add_virtio_device(device)?;
            network = Some(backend);
            cmdline = format!("{cmdline} {word}");
        }
        if let Some(extra) = &config.extra_cmdline {
            cmdline = format!("{cmdline} {extra}");
        }
        machine.load_linux(&LinuxBoot {
            kernel: config.image.kernel.clone(),
            initrd: Some(config.image.initrd.clone()),
            cmdline,
        })?;
        machine.start()?;
        let deadline = Instant::now() + config.boot_timeout;
        loop {
            if machine.console().find(READY_MARKER).is_some() {
                break;
            }
            if let Some(reason) = machine.exit_reason() {
                return Err(Error::NotReady(format!(
                    "the guest ended during boot ({reason:?}); console:\n{}",
                    tail(&machine)
                )));
            }
            if Instant::now() >= deadline {
                machine.stop();
                return Err(Error::NotReady(format!(
                    "no {READY_MARKER} within {:?}; console:\n{}",
                    config.boot_timeout,
                    tail(&machine)
                )));
            }
            machine.console().wait_for(READY_MARKER, Duration::from_millis(100));
        }
        let mount_plan = if mount {
            mounts::MountPlan::new(config.disks.len(), &config.volumes, &config.shares)
        } else {
            mounts::MountPlan::default()
        };
        let mut vm = Vm {
            machine,
            vsock_path,
            agent_port: DEFAULT_AGENT_PORT,
            network,
            mounts: Vec::new(),
            mount_plan,
            ready_agent: std::sync::Mutex::new(None),
            start_timings: None,
            _work: work,
        };
        vm.mount_planned()?;
        Ok(vm)
    }

    /// The egress filter's counters (allowed, denied, learned from DNS), for
    /// a VM with a network.
    pub fn egress_stats(&self) -> Option<&crate::network::EgressStats> {
        self.network.as_ref().map(|n| &*n.stats)
    }

    /// The ports published to the host, with the host ports picked for 0.
    pub fn published_ports(&self) -> &[crate::network::PublishedPort] {
        self.network.as_ref().map_or(&[], |n| &n.published)
    }

    /// A connection to the guest agent: one kept open (by the refresh after
    /// a restore, or by an earlier [`Vm::exec`], [`Vm::read_file`] or
    /// [`Vm::write_file`] that finished cleanly), else a new one.
    pub fn agent(&self) -> Result<AgentClient<UnixStream>> {
        if let Some(client) = self.take_ready() {
            return Ok(client);
        }
        let stream = self.connect(self.agent_port)?;
        Ok(AgentClient::connect_within(stream, sm_agent::GREETING_TIMEOUT)?)
    }

    /// Connects to guest vsock `port` (a new stream each call).
    pub fn connect(&self, port: u32) -> Result<UnixStream> {
        connect_vsock(&self.vsock_path, port)
    }

    /// Connects to TCP `guest_port` on the guest's loopback through the agent
    /// (no network device needed); a port nobody listens on is an agent
    /// error of kind `NotFound`.
    pub fn connect_tcp(&self, guest_port: u16) -> Result<crate::port_forward::GuestTcpStream> {
        Ok(self.agent()?.connect_tcp(guest_port)?)
    }

    /// Publishes `port.guest_port` on the host (`port.host_ip:port.host_port`,
    /// 0 picks one: [`crate::PortForward::port`]) through the agent, for VMs
    /// without a network device; it stops listening when dropped.
    pub fn forward_port(&self, port: crate::PublishedPort) -> Result<crate::PortForward> {
        crate::port_forward::PortForward::start(self.vsock_path.clone(), self.agent_port, port)
    }

    /// Runs a command to completion (one agent connection per call, so calls from
    /// several threads run concurrently). At most
    /// [`crate::agent::DEFAULT_OUTPUT_LIMIT`] (256 MiB) of stdout and stderr
    /// together are collected: past that the process is killed and the error
    /// is `Error::Agent(ClientError::OutputTooLarge)`; stream larger output
    /// with [`Vm::agent`] and `exec_streaming`.
    ///
    /// With a timeout in `request` the agent kills the command then; the
    /// host waits for its report at most [`EXEC_REPORT_GRACE`] longer (a
    /// guest that never reports costs that, not a thread forever), then
    /// fails with `NoAnswer`. Without one the command may run as long as it
    /// likes.
    pub fn exec(&self, request: &ExecRequest, stdin: Option<&[u8]>) -> Result<ExecOutcome> {
        let Some(ms) = request.timeout_ms else { return self.with_agent(|agent| agent.exec(request, stdin)) };
        let bound = Duration::from_millis(ms).saturating_add(EXEC_REPORT_GRACE);
        let mut agent = self.agent()?;
        let dog = watchdog::Watchdog::arm(agent.get_ref(), bound)
            .map_err(|e| Error::Io { what: "arming the deadline of an exec".into(), source: e })?;
        let out = agent.exec(request, stdin);
        let fired = dog.fired();
        drop(dog);
        match out {
            Ok(outcome) => {
                if !fired {
                    self.keep_idle(agent);
                }
                Ok(outcome)
            }
            Err(_) if fired => Err(Error::Agent(sm_agent::ClientError::NoAnswer {
                context: "the exit report of a command with a timeout",
                waited: bound,
            })),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a guest file.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.with_agent(|agent| agent.bounded(sm_agent::FILE_REQUEST_SILENCE, "ReadFile", |a| a.read_file(path)))
    }

    /// Writes a guest file with `mode`.
    pub fn write_file(&self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.with_agent(|agent| {
            agent.bounded(sm_agent::FILE_REQUEST_SILENCE, "WriteFile", |a| a.write_file(path, mode, data))
        })
    }

    /// Runs one request on an agent connection ([`Vm::agent`]) and keeps the
    /// connection for the next one when the request ended cleanly.
    pub(crate) fn with_agent<T>(
        &self,
        request: impl FnOnce(&mut AgentClient<UnixStream>) -> std::result::Result<T, sm_agent::ClientError>,
    ) -> Result<T> {
        let mut agent = self.agent()?;
        let out = request(&mut agent)?;
        self.keep_idle(agent);
        Ok(out)
    }

    /// Pauses the VM and writes a full snapshot; the VM stays paused until
    /// [`Vm::resume`].
    pub fn snapshot(&mut self, path: &Path) -> Result<SnapshotReport> {
        self.refuse_with_volumes()?;
        // No idle host connection in the snapshot: its restores would only
        // tear it down again (transport reset).
        self.take_ready();
        Ok(self.machine.snapshot(path, false)?)
    }

    /// Writes a diff snapshot: only the RAM pages changed since this VM was
    /// restored (or reset), over the snapshot it was restored from, which must
    /// stay where it is. The VM stays paused (see [`Vm::resume`]). Restore it like
    /// a full snapshot; `sm_snapshot::merge_chain` rewrites it as a full one.
    pub fn snapshot_diff(&mut self, path: &Path) -> Result<SnapshotReport> {
        self.refuse_with_volumes()?;
        // No idle host connection in the snapshot: its restores would only
        // tear it down again (transport reset).
        self.take_ready();
        Ok(self.machine.snapshot_diff(path, false)?)
    }

    /// Writes a full snapshot after a short pause; the VM keeps running.
    pub fn snapshot_live(&mut self, path: &Path) -> Result<SnapshotReport> {
        self.refuse_with_volumes()?;
        // No idle host connection in the snapshot: its restores would only
        // tear it down again (transport reset).
        self.take_ready();
        Ok(self.machine.snapshot(path, true)?)
    }

    /// Resumes a paused VM.
    pub fn resume(&mut self) -> Result<()> {
        if !self.machine.is_running() {
            self.machine.start()?;
        }
        Ok(())
    }

    /// Restores a snapshot into a new running VM (RAM mapped copy-on-write), then
    /// brings the guest's wall clock to the host's time and reseeds its entropy.
    /// `disks` must match the disks the snapshot was taken with (same count and
    /// order; the files may differ, e.g. copies).
    pub fn restore(hypervisor: &dyn Hypervisor, snapshot: &Path, console: ConsoleOutput, disks: &[Disk]) -> Result<Vm> {
        Self::restore_with_network(hypervisor, snapshot, console, disks, &crate::Network::None)
    }

    /// [`Vm::restore`] of a snapshot taken of a VM with a network: `network`
    /// gets a new back end (passt, egress filter, published ports), attached
    /// where the snapshot had its virtio-net device. The guest keeps its
    /// addressing, which is the same for every VM; connections open at the
    /// snapshot do not survive. A snapshot without a network device restores
    /// only with [`Network::None`](crate::Network::None), and the other way round.
    pub fn restore_with_network(
        hypervisor: &dyn Hypervisor,
        snapshot: &Path,
        console: ConsoleOutput,
        disks: &[Disk],
        network: &crate::Network,
    ) -> Result<Vm> {
        let config = RestoreConfig { disks: disks.to_vec(), network: network.clone(), ..RestoreConfig::new(console) };
        Self::restore_with(hypervisor, snapshot, &config)
    }

    /// Restores a snapshot with the devices `config` names (disks, volumes in
    /// their slots, network), refreshes the guest and mounts the volumes.
    pub fn restore_with(hypervisor: &dyn Hypervisor, snapshot: &Path, config: &RestoreConfig) -> Result<Vm> {
        let t0 = Instant::now();
        let vm =
            Self::restore_paused_with(snapshot, config, |path, options| Machine::restore(hypervisor, path, options))?;
        vm.finish_restore(t0)
    }

    /// Like [`Vm::restore`], into a [`VmShell`] made ahead for the snapshot's
    /// vCPU count and RAM size (its VM, vCPUs and RAM slots exist already, so
    /// the restore itself is well under a millisecond of host time; the guest
    /// refresh through the agent follows).
    pub fn restore_into(shell: VmShell, snapshot: &Path, disks: &[Disk]) -> Result<Vm> {
        Self::restore_into_with_network(shell, snapshot, disks, &crate::Network::None)
    }

    /// [`Vm::restore_into`] for a snapshot of a VM with a network (see
    /// [`Vm::restore_with_network`]).
    pub fn restore_into_with_network(
        shell: VmShell,
        snapshot: &Path,
        disks: &[Disk],
        network: &crate::Network,
    ) -> Result<Vm> {
        let config = RestoreConfig {
            disks: disks.to_vec(),
            network: network.clone(),
            ..RestoreConfig::new(ConsoleOutput::Null)
        };
        Self::restore_into_with(shell, snapshot, &config)
    }

    /// [`Vm::restore_into`] with the devices `config` names (see
    /// [`Vm::restore_with`]); its console is the shell's.
    pub fn restore_into_with(shell: VmShell, snapshot: &Path, config: &RestoreConfig) -> Result<Vm> {
        let t0 = Instant::now();
        let vm =
            Self::restore_paused_with(snapshot, config, |path, options| Machine::restore_into(shell.0, path, options))?;
        vm.finish_restore(t0)
    }

    /// Runs a restored VM, refreshes the guest and mounts what was planned.
    fn finish_restore(mut self, t0: Instant) -> Result<Vm> {
        let mut timings = StartTimings { restored: t0.elapsed(), ..StartTimings::default() };
        self.resume_refreshed(t0, &mut timings)?;
        self.mount_planned()?;
        timings.mounted = t0.elapsed();
        self.start_timings = Some(timings);
        Ok(self)
    }

    fn restore_paused_with(
        snapshot: &Path,
        config: &RestoreConfig,
        restore: impl FnOnce(&Path, RestoreOptions) -> sm_vmm::Result<(Machine, sm_vmm::RestoreTimings)>,
    ) -> Result<Vm> {
        let work = WorkDir::new()?;
        let (vsock, vsock_path) = new_vsock(&work)?;
        let mut devices: Vec<Box<dyn VirtioDevice>> = vec![vsock];
        devices.extend(disk_devices(&config.disks, &config.volumes)?);
        devices.extend(crate::share::devices(&config.shares)?);
        // The same order as at boot: vsock, disks, volumes, shares, then the network device.
        let mut backend = None;
        if let Some((device, net, _cmdline)) = crate::network::start(&config.network)? {
            devices.push(device);
            backend = Some(net);
        }
        let (machine, _timings) = restore(snapshot, RestoreOptions { console: config.console.clone(), devices })?;
        Ok(Vm {
            machine,
            vsock_path,
            agent_port: DEFAULT_AGENT_PORT,
            network: backend,
            mounts: Vec::new(),
            mount_plan: mounts::MountPlan::new(config.disks.len(), &config.volumes, &config.shares),
            ready_agent: std::sync::Mutex::new(None),
            start_timings: None,
            _work: work,
        })
    }

    /// Runs a restored (paused) VM and refreshes the guest's clock and entropy.
    pub(crate) fn resume_refreshed(&mut self, t0: Instant, timings: &mut StartTimings) -> Result<()> {
        // A connection from before is gone with the guest state it talked to.
        self.take_ready();
        self.machine.start()?;
        timings.resumed = t0.elapsed();
        self.refresh_guest(t0, timings)
    }

    /// Returns to the snapshot in place and stays paused.
    fn reset_paused(&mut self) -> Result<Duration> {
        Ok(self.machine.reset_to_snapshot()?)
    }

    /// Returns a restored VM to its snapshot in place (no new process or VM) and
    /// runs it again.
    ///
    /// Its volumes and shares are mounted again (the guest is back where the
    /// snapshot had it: a share mounted then is kept, see the agent's mount).
    pub fn reset(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        let took = self.reset_paused()?;
        let mut timings = StartTimings { restored: t0.elapsed(), ..StartTimings::default() };
        self.resume_refreshed(t0, &mut timings)?;
        self.mounts.clear();
        self.mount_planned()?;
        timings.mounted = t0.elapsed();
        self.start_timings = Some(timings);
        Ok(took)
    }

    /// Stops the VM, after flushing and unmounting its volumes and shares
    /// (so what the guest wrote is on the host, and the volume is clean).
    pub fn stop(mut self) -> ExitReason {
        self.flush_mounts();
        self.machine.stop()
    }

    /// The underlying machine (console, timings, memory).
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The host socket of the guest's vsock device.
    pub fn vsock_path(&self) -> &Path {
        &self.vsock_path
    }
}

fn tail(m: &Machine) -> String {
    let text = m.console().text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Connects to guest vsock `port` of a VM that another process runs, through
/// the host side of its vsock ([`Vm::vsock_path`]); a new stream each call.
pub fn connect_vsock(vsock: &Path, port: u32) -> Result<UnixStream> {
    sm_virtio::vsock::connect(vsock, port)
        .map_err(|e| Error::Io { what: format!("connecting to guest port {port}"), source: e })
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A VM dropped without `stop` (an error path) still writes its
        // volumes home.
        self.flush_mounts();
    }
}
