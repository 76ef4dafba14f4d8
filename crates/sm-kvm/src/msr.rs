//! Model-specific registers: boot values and the list captured in snapshots.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use sm_hypervisor::{Error, Result};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRR default type: enabled (bit 11), write-back (6).
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry { index, data, ..Default::default() }
}

/// MSR values a vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
}

/// The MSR indices KVM can save and restore (KVM_GET_MSR_INDEX_LIST).
pub fn saveable_msr_indices(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().map_err(|e| Error::backend("KVM_GET_MSR_INDEX_LIST", e))?;
    Ok(list.as_slice().to_vec())
}

/// Writes `entries`; MSRs the vCPU refuses are written one by one and, if still
/// refused, returned as the error list.
pub fn set_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    let msrs = Msrs::from_entries(entries).map_err(|e| Error::InvalidArgument(format!("too many MSRs: {e:?}")))?;
    let written = fd.set_msrs(&msrs).map_err(|e| Error::backend("KVM_SET_MSRS", e))?;
    if written == entries.len() {
        return Ok(());
    }
    let mut refused = Vec::new();
    for e in &entries[written..] {
        let one = Msrs::from_entries(std::slice::from_ref(e)).map_err(|e| Error::InvalidArgument(format!("{e:?}")))?;
        if fd.set_msrs(&one).map_err(|e| Error::backend("KVM_SET_MSRS", e))? != 1 {
            refused.push(e.index);
        }
    }
    if !refused.is_empty() {
        tracing::warn!(?refused, "vCPU refused some MSRs; they keep their reset values");
    }
    Ok(())
}

/// Reads every readable MSR among `indices`; unreadable ones are skipped.
pub fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk.iter().map(|&i| entry(i, 0)).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::InvalidArgument(format!("{e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(|e| Error::backend("KVM_GET_MSRS", e))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // KVM stops at the first MSR it cannot read: skip that one and go on.
        let consumed = (read + 1).min(chunk.len());
        if read < chunk.len() {
            tracing::debug!(msr = chunk[read], "MSR not readable, not saved");
        }
        rest = &rest[consumed..];
    }
    Ok(out)
}
