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

use crate::{Error, GuestImage, Result};

/// How long a restored guest may take to answer its first agent connection (its
/// kernel may be emulated and the host busy: this is generous on purpose).
const RESTORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const VSOCK_SOCKET: &str = "vsock.sock";

/// A virtio-blk disk backed by a host file (guest `/dev/vda`, `/dev/vdb`, ... in
/// the order given).
#[derive(Debug, Clone)]
pub struct Disk {
    /// Raw image file.
    pub path: PathBuf,
    /// Guest writes fail with an I/O error.
    pub read_only: bool,
}

/// A VM made ahead of a restore: VM, vCPUs and guest RAM slots exist, nothing
/// runs. [`Vm::restore_into`] fills it from a snapshot of the same vCPU count
/// and RAM size; a [`crate::Pool`] keeps one ready for its next restore.
pub struct VmShell(pub(crate) Machine);

impl VmShell {
    /// Creates the shell (this is the slow part of a restore: milliseconds).
    pub fn new(hypervisor: &dyn Hypervisor, vcpus: u32, memory_mib: u64) -> Result<VmShell> {
        Ok(VmShell(Machine::new_shell(hypervisor, vcpus, memory_mib, ConsoleOutput::Null)?))
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Disks, attached after the vsock device.
    pub disks: Vec<Disk>,
    /// Kernel and agent initrd.
    pub image: GuestImage,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Console sink.
    pub console: ConsoleOutput,
    /// Extra kernel command-line words (before any ` -- `).
    pub extra_cmdline: Option<String>,
    /// How long boot may take until the agent is ready.
    pub boot_timeout: Duration,
    /// The guest's network (none by default). A snapshot of a VM with a
    /// network restores with [`Vm::restore_with_network`].
    pub network: crate::Network,
}

impl VmConfig {
    /// 1 vCPU, 128 MiB, console discarded (kept in the transcript), 180 s boot budget.
    pub fn new(image: GuestImage) -> Self {
        VmConfig {
            disks: Vec::new(),
            image,
            vcpus: 1,
            memory_mib: 128,
            console: ConsoleOutput::Null,
            extra_cmdline: None,
            boot_timeout: Duration::from_secs(180),
            network: crate::Network::None,
        }
    }
}

/// A per-VM scratch directory (the agent's vsock socket), removed with the VM.
/// Made like mkdtemp: an unpredictable name, created exclusively, mode 0700,
/// so no other local user can pre-create it or reach the socket in it.
struct WorkDir(tempfile::TempDir);

impl WorkDir {
    fn new() -> Result<Self> {
        tempfile::Builder::new().prefix("supermachine-").tempdir().map(WorkDir).map_err(|e| Error::Io {
            what: format!("creating a VM work directory in {}", std::env::temp_dir().display()),
            source: e,
        })
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A running microVM with the guest agent.
pub struct Vm {
    // Drop order: the machine (and its devices) before the network back end
    // and the work dir.
    machine: Machine,
    vsock_path: PathBuf,
    agent_port: u32,
    network: Option<crate::network::NetworkBackend>,
    _work: WorkDir,
}

fn disk_devices(disks: &[Disk]) -> Result<Vec<Box<dyn VirtioDevice>>> {
    disks
        .iter()
        .map(|d| {
            Block::new(&d.path, d.read_only, None)
                .map(|b| Box::new(b) as Box<dyn VirtioDevice>)
                .map_err(|e| Error::Device(e.to_string()))
        })
        .collect()
}

fn new_vsock(work: &WorkDir) -> Result<(Box<Vsock>, PathBuf)> {
    let path = work.path().join(VSOCK_SOCKET);
    let dev = Vsock::new(DEFAULT_GUEST_CID, &path).map_err(|e| Error::Device(e.to_string()))?;
    Ok((Box::new(dev), path))
}

impl Vm {
    /// Boots a VM and waits until its agent listens.
    pub fn boot(hypervisor: &dyn Hypervisor, config: VmConfig) -> Result<Vm> {
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
        for disk in disk_devices(&config.disks)? {
            machine.add_virtio_device(disk)?;
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
        Ok(Vm { machine, vsock_path, agent_port: DEFAULT_AGENT_PORT, network, _work: work })
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

    /// Opens a new connection to the guest agent.
    pub fn agent(&self) -> Result<AgentClient<UnixStream>> {
        let stream = self.connect(self.agent_port)?;
        Ok(AgentClient::connect(stream)?)
    }

    /// Connects to guest vsock `port` (a new stream each call).
    pub fn connect(&self, port: u32) -> Result<UnixStream> {
        connect_vsock(&self.vsock_path, port)
    }

    /// Runs a command to completion (one agent connection per call, so calls from
    /// several threads run concurrently).
    pub fn exec(&self, request: &ExecRequest, stdin: Option<&[u8]>) -> Result<ExecOutcome> {
        Ok(self.agent()?.exec(request, stdin)?)
    }

    /// Reads a guest file.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        Ok(self.agent()?.read_file(path)?)
    }

    /// Writes a guest file with `mode`.
    pub fn write_file(&self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        Ok(self.agent()?.write_file(path, mode, data)?)
    }

    /// Pauses the VM and writes a full snapshot; the VM stays paused until
    /// [`Vm::resume`].
    pub fn snapshot(&mut self, path: &Path) -> Result<SnapshotReport> {
        Ok(self.machine.snapshot(path, false)?)
    }

    /// Writes a diff snapshot: only the RAM pages changed since this VM was
    /// restored (or reset), over the snapshot it was restored from, which must
    /// stay where it is. The VM stays paused (see [`Vm::resume`]). Restore it like
    /// a full snapshot; `sm_snapshot::merge_chain` rewrites it as a full one.
    pub fn snapshot_diff(&mut self, path: &Path) -> Result<SnapshotReport> {
        Ok(self.machine.snapshot_diff(path, false)?)
    }

    /// Writes a full snapshot after a short pause; the VM keeps running.
    pub fn snapshot_live(&mut self, path: &Path) -> Result<SnapshotReport> {
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
        let mut vm = Self::restore_paused_with(snapshot, console, disks, network, |path, options| {
            Machine::restore(hypervisor, path, options)
        })?;
        vm.resume_refreshed()?;
        Ok(vm)
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
        let mut vm = Self::restore_paused_with(snapshot, ConsoleOutput::Null, disks, network, |path, options| {
            Machine::restore_into(shell.0, path, options)
        })?;
        vm.resume_refreshed()?;
        Ok(vm)
    }

    fn restore_paused_with(
        snapshot: &Path,
        console: ConsoleOutput,
        disks: &[Disk],
        network: &crate::Network,
        restore: impl FnOnce(&Path, RestoreOptions) -> sm_vmm::Result<(Machine, sm_vmm::RestoreTimings)>,
    ) -> Result<Vm> {
        let work = WorkDir::new()?;
        let (vsock, vsock_path) = new_vsock(&work)?;
        let mut devices: Vec<Box<dyn VirtioDevice>> = vec![vsock];
        devices.extend(disk_devices(disks)?);
        // The same order as at boot: vsock, disks, then the network device.
        let mut backend = None;
        if let Some((device, net, _cmdline)) = crate::network::start(network)? {
            devices.push(device);
            backend = Some(net);
        }
        let (machine, _timings) = restore(snapshot, RestoreOptions { console, devices })?;
        Ok(Vm { machine, vsock_path, agent_port: DEFAULT_AGENT_PORT, network: backend, _work: work })
    }

    /// Runs a restored (paused) VM and refreshes the guest's clock and entropy.
    pub(crate) fn resume_refreshed(&mut self) -> Result<()> {
        self.machine.start()?;
        self.refresh_guest()
    }

    /// Returns to the snapshot in place and stays paused.
    pub(crate) fn reset_paused(&mut self) -> Result<Duration> {
        Ok(self.machine.reset_to_snapshot()?)
    }

    /// Returns a restored VM to its snapshot in place (no new process or VM) and
    /// runs it again.
    pub fn reset(&mut self) -> Result<Duration> {
        let took = self.reset_paused()?;
        self.resume_refreshed()?;
        Ok(took)
    }

    /// After a restore: host time into the guest clock, fresh entropy. The guest
    /// handles the vsock transport reset asynchronously, so a connection made
    /// right after the restore may still be reset by it: retry the whole exchange
    /// until the deadline.
    fn refresh_guest(&self) -> Result<()> {
        let deadline = Instant::now() + RESTORE_CONNECT_TIMEOUT;
        let mut seed = [0u8; 64];
        // SAFETY: getrandom writes at most seed.len() bytes into our buffer.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let seeded = n == seed.len() as isize;
        loop {
            let attempt = self.agent().and_then(|mut client| {
                client.sync_time()?;
                if seeded {
                    client.add_entropy(&seed)?;
                }
                Ok(())
            });
            if let Some(reason) = self.machine.exit_reason() {
                return Err(Error::NotReady(format!(
                    "the restored guest ended ({reason:?}); console:\n{}",
                    tail(&self.machine)
                )));
            }
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("agent not answering yet after restore: {e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(Error::NotReady(format!("agent unreachable after restore: {e}"))),
            }
        }
    }

    /// Stops the VM.
    pub fn stop(mut self) -> ExitReason {
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
