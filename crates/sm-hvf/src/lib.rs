//! The Apple Hypervisor.framework backend (aarch64) of the `sm-hypervisor`
//! seam — its host-independent parts, which build and are tested on any host:
//!
//! - [`syndrome`]: decoding a trapped exception's syndrome (ESR_EL2) into what
//!   the run loop does with it — an MMIO access with its size, register and
//!   extension, WFI, HVC/SMC, a system register access;
//! - [`exit`]: what a vCPU does with a trap — the register an MMIO access
//!   uses, when the PC moves on, what a PSCI call answers — over a register
//!   view, so the rules are tested here;
//! - [`psci`]: the PSCI calls a Linux guest makes through HVC (CPU_ON,
//!   SYSTEM_OFF, SYSTEM_RESET, ...) and their answers;
//! - [`state`]: the versioned byte layout of a vCPU's registers (general,
//!   SIMD, system) and of the VM's GIC and virtual timer, carried in the
//!   seam's opaque [`sm_hypervisor::VcpuState`] / [`sm_hypervisor::VmState`].
//!
//! [`framework`] (macOS aarch64; elsewhere type-checked with `--features
//! typecheck`, `cargo xtask check-hvf`) makes the VM, maps memory and drives
//! the in-kernel GIC. vCPUs are the next landing (the machine already keeps
//! each vCPU on the thread that made it, as Hypervisor.framework requires) —
//! see ARCHITECTURE.md, "Second backend". Nothing here has run on a Mac.

pub mod exit;
#[cfg(any(all(target_os = "macos", target_arch = "aarch64"), feature = "typecheck"))]
pub mod framework;
pub mod hv_error;
pub mod psci;
pub mod state;
pub mod syndrome;
