//! KVM backend (x86_64) of the supermachine hypervisor seam.
//!
//! This crate owns everything that touches `/dev/kvm`: VM creation with the in-kernel
//! irqchip and PIT, CPUID and MSR set-up, vCPU long-mode entry, the force-exit
//! mechanism (immediate_exit + a real-time signal, see [`kick`]), irqfd interrupt
//! lines, and capture/restore of vCPU and VM device state as versioned,
//! length-checked blobs (see [`codec`]). Nothing outside this crate sees a KVM type.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

pub mod codec;
mod cpuid;
mod fpu;
pub mod kick;
mod msr;
mod vcpu;
mod vm;

use std::sync::Arc;

use kvm_ioctls::Kvm;
use sm_hypervisor::{Error, Hypervisor, Result, Vm, VmConfig};

pub use vcpu::KvmVcpu;
pub use vm::{KvmVm, IOAPIC_PINS, TSS_ADDRESS};

/// Path of the KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The KVM hypervisor.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`, with an error that says what to do when it is missing or
    /// not permitted.
    pub fn new() -> Result<Self> {
        Self::open(KVM_DEVICE)
    }

    /// Opens the KVM device at `path`.
    pub fn open(path: &str) -> Result<Self> {
        let c_path = std::ffi::CString::new(path)
            .map_err(|_| Error::InvalidArgument(format!("KVM device path {path:?} contains a NUL byte")))?;
        let kvm = Kvm::new_with_path(&c_path).map_err(|e| match e.errno() {
            libc::ENOENT => Error::Unavailable(format!(
                "{path} does not exist: this host has no KVM. Enable virtualization in the \
                 firmware or the cloud instance type, and load the kvm module (modprobe kvm_intel or kvm_amd)"
            )),
            libc::EACCES | libc::EPERM => Error::Unavailable(format!(
                "permission denied opening {path}: add your user to the 'kvm' group \
                 (sudo usermod -aG kvm $USER, then log in again) or run as root"
            )),
            _ => Error::Unavailable(format!("cannot open {path}: {e}")),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::Unavailable(format!("KVM API version {version} is not supported (need 12)")));
        }
        Ok(KvmHypervisor { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>> {
        if config.vcpu_count == 0 || config.vcpu_count > self.max_vcpus() {
            return Err(Error::InvalidArgument(format!(
                "{} vCPUs requested; this host's KVM allows 1..={}",
                config.vcpu_count,
                self.max_vcpus()
            )));
        }
        Ok(Arc::new(KvmVm::new(&self.kvm, config)?))
    }

    fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus() as u32
    }

    fn max_linux_vcpus(&self) -> (u32, Option<&'static str>) {
        if cpuid::host_is_kvm_pvm() {
            return (
                1,
                Some(
                    "this host's KVM is kvm_pvm (no VMX/SVM): SMP Linux guests hang at \
                     'Booting SMP configuration'; use 1 vCPU here, or a host with hardware KVM",
                ),
            );
        }
        (self.max_vcpus(), None)
    }
}
