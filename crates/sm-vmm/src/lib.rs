//! The supermachine VMM core.
//!
//! This crate composes a hypervisor backend (`sm-hypervisor` traits; KVM by
//! default), guest memory (vm-memory), Linux boot (linux-loader plus our zero page,
//! MP table and page tables), platform devices (COM1 16550 and the i8042
//! reset, both vm-superio) and one thread per vCPU into a [`Machine`]. It owns the memory
//! layout ([`layout`]), the run loop and the machine life cycle: create, load,
//! start, pause, save/restore state, wait, stop.

pub mod arch;
pub mod console;
pub mod control;
mod device_memory;
pub mod devices;
mod error;
pub mod layout;
mod machine;
pub mod memory;
mod run_state;
pub mod snapshot;
mod vcpu_loop;
mod vcpu_thread;

pub use arch::x86_64::linux::{KernelFormat, LoadedKernel};
pub use arch::x86_64::mptable::max_cpus as mptable_max_cpus;
pub use console::{Console, ConsoleOutput};
pub use control::ExitReason;
pub use error::{Error, Result};
pub use machine::{LinuxBoot, Machine, MachineConfig, MachineState, MachineTimings};
pub use run_state::STOP_TIMEOUT;
pub use snapshot::{RestoreOptions, RestoreTimings, SnapshotReport};

/// The default guest kernel command line, tuned for this project's kernel and for
/// hosts whose KVM emulates guest kernel mode (kvm_pvm): no XSAVE, SMAP or POPCNT;
/// reboot via the i8042 ends the VM; a panic reboots at once.
///
/// `GLIBC_TUNABLES` reaches init (and, through the agent, every command) as an
/// environment variable: with `noxsave` the guest kernel preserves only x87/SSE
/// state across context switches, but user-mode CPUID still reports the host's
/// AVX/AVX-512 and OSXSAVE, so glibc would pick AVX routines whose registers get
/// clobbered (measured: 30% of execs segfaulting, 0 of 40 with the tunables).
/// `-AVX_Fast_Unaligned_Load` is needed besides `-AVX2`: glibc 2.36 keeps that
/// preference bit when AVX2 is masked and still picks `__memmove_avx_unaligned*`
/// for memcpy/memmove/mempcpy, whose YMM upper halves another task's VZEROUPPER
/// zeroed (16-byte runs of zeros in copied data). The guest kernel's patch 0007
/// closes this for every program (user CPUID answered by the kernel, without
/// OSXSAVE/AVX); the tunables stay as a second line for kernels without it.
///
/// `clocksource=kvm-clock`: left alone, Linux switches to the TSC clocksource;
/// across a snapshot restore on this host its clock then jumps by the snapshot's
/// age and the guest spends that long catching up (first output 15.8 s after a
/// restore at age 120 s, nothing within 120 s at 600 s). kvm-clock, set from the
/// saved kvmclock value, keeps first output flat (0.13 s at age 0, 0.17 s at 120 s).
///
/// `clearcpuid=...,erms,fsrm`: the guest kernel then copies and clears memory
/// with `rep movsq`/`rep stosq` (REP_GOOD) instead of `rep movsb`/`rep stosb`.
/// Where guest kernel mode is emulated (kvm_pvm) every iteration of a string
/// instruction costs about as much as an instruction, so this is 8x fewer for
/// each page cleared or copied: reading 6.4 MiB from /dev/zero took 3.75 s of
/// guest kernel time with ERMS and 0.94 s without. On hardware KVM the
/// difference is within noise for these sizes.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 noxsave clearcpuid=smap,popcnt,erms,fsrm rodata=off \
percpu_alloc=page noreplace-smp quiet clocksource=kvm-clock \
GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-FMA,-F16C,-XSAVE,-XSAVEC,-OSXSAVE,-AVX_Fast_Unaligned_Load";

/// Opens the default hypervisor of this host (KVM on Linux x86_64).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub fn default_hypervisor() -> Result<Box<dyn sm_hypervisor::Hypervisor>> {
    Ok(Box::new(sm_kvm::KvmHypervisor::new()?))
}

/// On hosts without a backend that runs VMs yet: an error saying so (the
/// Hypervisor.framework backend, sm-hvf, has no vCPUs yet).
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
pub fn default_hypervisor() -> Result<Box<dyn sm_hypervisor::Hypervisor>> {
    Err(sm_hypervisor::Error::Unavailable(format!(
        "supermachine runs VMs on x86_64 Linux with KVM; this host is {}-{}, and the Hypervisor.framework \
         backend (sm-hvf) does not run guests yet",
        std::env::consts::ARCH,
        std::env::consts::OS
    ))
    .into())
}
