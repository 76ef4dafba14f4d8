//! What a VM is booted or restored with: [`VmConfig`], [`RestoreConfig`],
//! [`Disk`], and [`VmShell`] (a VM made ahead for a fast restore).

use std::path::PathBuf;
use std::time::Duration;

use sm_hypervisor::Hypervisor;
use sm_vmm::{ConsoleOutput, Machine};

use crate::share::ShareMount;
use crate::volume::VolumeMount;
use crate::{GuestImage, Result};

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
    /// Named volumes, attached as disks after `disks` and mounted by the
    /// agent before [`Vm::boot`] returns.
    pub volumes: Vec<VolumeMount>,
    /// Host directories (virtio-fs), mounted by the agent after the volumes.
    pub shares: Vec<ShareMount>,
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
            volumes: Vec::new(),
            shares: Vec::new(),
        }
    }

    /// A configuration booting `image` with the root disk `root` as
    /// `/dev/vda`: the agent mounts it read-only under a tmpfs overlay and
    /// switches to it, so commands run in that file system.
    pub fn with_root_disk(image: GuestImage, root: &sm_oci::Rootfs) -> Self {
        let mut config = VmConfig::new(image);
        config.disks = vec![Disk { path: root.path.clone(), read_only: true }];
        config.extra_cmdline = Some(format!("sm.root=/dev/vda sm.rootfstype={}", root.format.fstype()));
        config
    }
}

/// What a restore attaches where the snapshot had devices: the disks (same
/// count and order; the files may differ), the volumes after them (the real
/// volumes in the slots a snapshot was baked with), and the network.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// Console sink.
    pub console: ConsoleOutput,
    /// Disks, as at the snapshot.
    pub disks: Vec<Disk>,
    /// Volumes, mounted by the agent after the restore.
    pub volumes: Vec<VolumeMount>,
    /// Host directories, in the share slots, mounted after the restore.
    pub shares: Vec<ShareMount>,
    /// The network's new back end (see [`Vm::restore_with_network`]).
    pub network: crate::Network,
}

impl RestoreConfig {
    /// Nothing but a console: for a snapshot of a VM without disks or network.
    pub fn new(console: ConsoleOutput) -> Self {
        RestoreConfig {
            console,
            disks: Vec::new(),
            volumes: Vec::new(),
            shares: Vec::new(),
            network: crate::Network::None,
        }
    }
}
