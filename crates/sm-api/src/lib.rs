//! The supermachine library API — what applications depend on.
//!
//! - [`GuestImage`]: the kernel and agent initrd a VM boots.
//! - [`Vm`]: a running microVM with the guest agent: [`Vm::exec`] runs commands
//!   (exit status, stdout, stderr, duration), files can be read and written, guest
//!   ports reached over vsock; [`Vm::snapshot`] / [`Vm::snapshot_live`] write a
//!   snapshot file ([`Vm::snapshot_diff`]: only the pages changed since the
//!   restore), [`Vm::restore`] brings one back copy-on-write ([`Vm::restore_into`]:
//!   into a [`VmShell`] made ahead, sub-millisecond), [`Vm::reset`] returns a
//!   restored VM to its snapshot in place.
//! - [`Pool`]: warm VMs restored from one snapshot, handed out and reset on release.
//! - [`Image`]: an OCI image (from `sm_oci`'s store) with its root disk; its
//!   VMs start from a baked snapshot after the first cold boot.
//!
//! Users depend on this crate only: the hypervisor ([`default_hypervisor`],
//! [`Hypervisor`]), console and exit types, exec types, errors, the network
//! choice ([`Network`]) and the image store ([`oci`]) are all here.
//!
//! ```no_run
//! use sm_api::{default_hypervisor, ExecRequest, GuestImage, Vm, VmConfig};
//!
//! # fn main() -> sm_api::Result<()> {
//! let hypervisor = default_hypervisor()?;
//! let guest = GuestImage::from_dir(std::path::Path::new("target/guest"))?;
//! let vm = Vm::boot(&*hypervisor, VmConfig::new(guest))?;
//! let out = vm.exec(&ExecRequest::new(["/bin/echo", "hello"]), None)?;
//! assert_eq!(out.stdout, b"hello\n");
//! # Ok(())
//! # }
//! ```
//!
//! Everything at the crate root is synchronous (blocking). With the `tokio`
//! feature (on by default), [`nonblocking`] offers the same operations as
//! `async fn`s — `AsyncVm` and `AsyncPool` — run on tokio's blocking pool.

#![warn(missing_docs)]

mod error;
mod image;
mod network;
#[cfg(feature = "tokio")]
#[path = "tokio_facade.rs"]
pub mod nonblocking;
mod oci_image;
mod pool;
mod port_forward;
mod share;
mod vm;
pub mod volume;

pub use error::{Error, Result};
pub use image::GuestImage;
pub use network::{
    EgressPolicy, EgressStats, NetError, Network, PasstNetwork, PolicyError, PublishedPort, TapNetwork, TlsIdentity,
};
/// Egress rules: what [`EgressPolicy`] is made of.
pub mod egress {
    pub use crate::network::{Action, Rule, Target, HOST_INTERNAL};
}
pub use oci_image::{default_rootfs_format, listens_on, BakeOptions, Image, Start};
pub use pool::{Admission, Pool, PoolConfig, PoolStats, PooledVm};
pub use port_forward::{GuestTcpStream, PortForward};
pub use sm_agent::{
    AgentClient, ExecOutcome, ExecOutput, ExecRequest, ExecTimeline, ExitReport, ExitStatus, GuestCost, RunningProcess,
};
/// The agent client's lower level: streamed exec events, its errors, and the
/// port the agent listens on inside the guest (what `connect_vsock` reaches).
pub mod agent {
    pub use sm_agent::protocol::ProtocolError;
    pub use sm_agent::{
        ClientError, ErrorKind, ExecEvent, ExecSession, ExitReport, Tunnel, DEFAULT_AGENT_PORT, DEFAULT_OUTPUT_LIMIT,
        GREETING_TIMEOUT,
    };
}
/// The hypervisor seam: what [`Vm::boot`] and [`Pool`] take.
pub use sm_hypervisor::Hypervisor;
/// Where a VM's console goes, why a VM ended, and what a snapshot wrote.
pub use sm_vmm::{ConsoleOutput, ExitReason, SnapshotReport};

/// Opens this host's hypervisor (KVM on Linux x86_64): the one to give
/// [`Vm::boot`]. Fails with the reason and the fix when `/dev/kvm` is missing
/// or unusable.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub fn default_hypervisor() -> Result<Box<dyn Hypervisor>> {
    Ok(sm_vmm::default_hypervisor()?)
}

/// OCI images: the local store, references and root-disk formats (what
/// [`Image`] is made from).
pub mod oci {
    pub use sm_oci::{
        build_rootfs_from_dir, builtin, config, fetch, pull_blocking, source, Digest, ImageInfo, ImageRecord,
        ImageSource, IndicatifProgress, PullOptions, Reference, Rootfs, RootfsFormat, RunOverrides, Store,
    };
}
pub use share::ShareMount;
/// Syscall confinement of the VMM's vCPU and device threads (seccomp; see
/// `sm_seccomp`): on unless [`sandbox::disable`] or `SM_NO_SANDBOX=1`.
pub mod sandbox {
    pub use sm_seccomp::{disable, enabled, SeccompError, ThreadKind};
}
pub use vm::{
    connect_vsock, sweep_stale_work_dirs, Disk, RestoreConfig, StartTimings, Vm, VmConfig, VmShell, EXEC_REPORT_GRACE,
};
pub use volume::{VolumeInfo, VolumeMount, VolumeStore};

/// The machine layer under [`Vm`]: a microVM that boots any Linux kernel
/// (ELF vmlinux or bzImage) with the virtio devices you add, snapshots and
/// restores, without the guest agent — what `supermachine boot` uses, and
/// what a Firecracker-style user drives. Most users want [`Vm`].
pub mod machine {
    pub use sm_virtio::vsock::{Vsock, DEFAULT_GUEST_CID};
    pub use sm_virtio::VirtioDevice;
    pub use sm_vmm::{LinuxBoot, Machine, MachineConfig, RestoreOptions, RestoreTimings, DEFAULT_CMDLINE};
}

/// The README's code blocks, compiled as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
