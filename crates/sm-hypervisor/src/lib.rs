//! The hypervisor seam of supermachine.
//!
//! This crate owns the backend-neutral vocabulary every other crate speaks: a
//! [`Hypervisor`] creates [`Vm`]s, a `Vm` owns guest-memory slots, interrupt lines and
//! vCPUs, a [`Vcpu`] runs until a [`VcpuExit`], and a [`ForceExit`] handle kicks a vCPU
//! out of guest mode from any thread. Backend state for snapshots travels as opaque,
//! versioned byte blobs ([`VcpuState`], [`VmState`]). No KVM or Hypervisor.framework
//! type appears here; backends live in `sm-kvm` and `sm-hvf`.
//!
//! What only one architecture does sits in an extension trait beside the
//! generic one ([`x86_64::X86Vcpu`], [`aarch64::Aarch64Vcpu`], reached with
//! [`Vcpu::as_x86_64`] / [`Vcpu::as_aarch64`]), so a backend implements what
//! its architecture has and nothing else. Linux-only fast paths (an eventfd
//! for MMIO notifies) are `cfg(target_os = "linux")`.

pub mod aarch64;
mod error;
mod exit;
mod force_exit;
mod state;
mod traits;
pub mod x86_64;

pub use error::{Error, Result};
pub use exit::{SystemEvent, VcpuExit};
pub use force_exit::{ForceExit, Kick};
pub use state::{VcpuState, VmState};
pub use traits::{Hypervisor, IrqLine, MemoryRegion, Vcpu, Vm, VmConfig};
