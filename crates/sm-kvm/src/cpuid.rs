//! CPUID table for a vCPU: what KVM supports, with per-vCPU topology filled in and
//! features this project must hide masked out.

use kvm_bindings::CpuId;

/// Leaf 7 ECX bit 7: CET shadow stacks.
const LEAF7_ECX_CET_SS: u32 = 1 << 7;
/// Leaf 7 EDX bit 20: CET indirect branch tracking.
const LEAF7_EDX_CET_IBT: u32 = 1 << 20;
/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 7 EBX bit 8: BMI2 (SHRX, BZHI, PDEP...).
const LEAF7_EBX_BMI2: u32 = 1 << 8;

/// Whether this host's KVM is kvm_pvm, which emulates guest kernel mode and cannot
/// emulate every instruction the CPU has (see shared notes: XSAVE, POPCNT...).
pub fn host_is_kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Adjusts `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `id` of `count`. With
/// `emulated_kernel` (kvm_pvm) BMI2 is hidden too: the guest kernel's zstd picks
/// BMI2 code when offered, and its emulator stops on those instructions.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u32, count: u32, emulated_kernel: bool) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // Initial APIC id in EBX[31:24], logical processor count in EBX[23:16].
                entry.ebx = (entry.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            7 if entry.index == 0 => {
                entry.ecx &= !LEAF7_ECX_CET_SS;
                entry.edx &= !LEAF7_EDX_CET_IBT;
                if emulated_kernel {
                    entry.ebx &= !LEAF7_EBX_BMI2;
                }
            }
            0xb | 0x1f => {
                // x2APIC id of this vCPU.
                entry.edx = id;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn masks_cet_and_sets_apic_id() {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_0800, ..Default::default() },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: u32::MAX,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 { function: 0xb, index: 1, edx: 0, ..Default::default() },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        let mut pvm = cpuid.clone();
        patch_cpuid(&mut cpuid, 3, 4, false);
        patch_cpuid(&mut pvm, 3, 4, true);
        assert_eq!(cpuid.as_slice()[1].ebx, u32::MAX, "BMI2 stays on real KVM");
        assert_eq!(pvm.as_slice()[1].ebx, !LEAF7_EBX_BMI2, "BMI2 hidden when the kernel is emulated");
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(e[1].ecx & LEAF7_ECX_CET_SS, 0);
        assert_eq!(e[1].edx & LEAF7_EDX_CET_IBT, 0);
        assert_eq!(e[1].ecx | LEAF7_ECX_CET_SS, u32::MAX);
        assert_eq!(e[2].edx, 3);
    }
}
