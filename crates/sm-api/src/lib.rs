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
//! Everything at the crate root is synchronous (blocking). With the `tokio`
//! feature (on by default), [`nonblocking`] offers the same operations as
//! `async fn`s — `AsyncVm` and `AsyncPool` — run on tokio's blocking pool.

mod error;
mod image;
mod network;
#[cfg(feature = "tokio")]
#[path = "tokio_facade.rs"]
pub mod nonblocking;
mod oci_image;
mod pool;
mod vm;

pub use error::{Error, Result};
pub use image::GuestImage;
pub use network::{Network, PasstNetwork};
pub use oci_image::{default_rootfs_format, listens_on, BakeOptions, Image, Start};
pub use pool::{Admission, Pool, PoolConfig, PoolStats, PooledVm};
pub use sm_agent::{ExecOutcome, ExecRequest, ExitStatus};
pub use vm::{Disk, Vm, VmConfig, VmShell};
