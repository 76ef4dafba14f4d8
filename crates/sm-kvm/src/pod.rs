//! The KVM structures that are plain old data (see [`crate::codec::Pod`]).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

use crate::codec::Pod;

// SAFETY (all below): repr(C) bindgen structs made only of integers and
// arrays/unions of integers, with no pointers; any bit pattern is valid.
macro_rules! pod {
    ($($t:ty),* $(,)?) => { $(
        // SAFETY: see the comment above the macro.
        unsafe impl Pod for $t {}
    )* };
}

pod!(
    kvm_regs,
    kvm_sregs,
    kvm_fpu,
    kvm_xcrs,
    kvm_xsave,
    kvm_vcpu_events,
    kvm_mp_state,
    kvm_debugregs,
    kvm_lapic_state,
    kvm_msr_entry,
    kvm_pit_state2,
    kvm_irqchip,
    kvm_clock_data,
);
