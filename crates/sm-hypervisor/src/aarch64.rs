//! aarch64 boot conventions shared by the VMM (which writes the kernel, the
//! device tree and the initrd into guest memory) and the backends (which set
//! the boot vCPU's registers).
//!
//! The arm64 Linux boot protocol (Documentation/arch/arm64/booting.rst):
//! the primary vCPU enters the kernel image at EL1 with the MMU off,
//! interrupts masked (PSTATE.DAIF all set), `x0` holding the device tree's
//! guest-physical address and `x1..x3` zero. Secondary vCPUs stay off until
//! the guest starts them with PSCI CPU_ON.

/// PSTATE for the kernel's entry: EL1 on its own stack (EL1h), D, A, I and F
/// masked.
pub const BOOT_PSTATE: u64 = 0x3c5;

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aarch64Boot {
    /// The kernel image's entry (its load address: the image starts with
    /// its own branch to the entry code).
    pub pc: u64,
    /// Guest-physical address of the flattened device tree (`x0`).
    pub fdt_addr: u64,
}

/// What only an aarch64 vCPU does (reached through
/// [`crate::Vcpu::as_aarch64`]).
pub trait Aarch64Vcpu {
    /// Sets the registers of the boot protocol: `pc`, `x0` = FDT, `x1..x3`
    /// = 0, PSTATE = [`BOOT_PSTATE`].
    fn setup_boot(&mut self, boot: &Aarch64Boot) -> crate::Result<()>;
    /// The vCPU's MPIDR_EL1 affinity (what the device tree's `cpu@N` `reg`
    /// and PSCI CPU_ON name it by).
    fn mpidr(&self) -> crate::Result<u64>;
}
