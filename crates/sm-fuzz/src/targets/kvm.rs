//! A KVM state blob from a snapshot: the codec's header and sections, and the
//! fixed-size KVM structures read out of them, as a restore does.

use kvm_bindings::{kvm_clock_data, kvm_mp_state, kvm_pit_state2, kvm_regs, kvm_sregs};
use sm_kvm::codec::{pod_bytes, pod_read, Decoded, Encoder, Kind};

use crate::Target;

pub fn state() -> Target {
    Target {
        name: "kvm-state",
        what: "sm-kvm state codec: Decoded::parse, sections, pod_read of KVM structures",
        run,
        seeds,
        max_len: 2048,
        cost: 1,
    }
}

fn run(data: &[u8]) {
    for kind in [Kind::Vcpu, Kind::Vm] {
        let Ok(decoded) = Decoded::parse(data, kind) else { continue };
        for tag in 0..16u16 {
            let Some(bytes) = decoded.get(tag) else { continue };
            let _ = pod_read::<kvm_regs>(bytes, "regs");
            let _ = pod_read::<kvm_sregs>(bytes, "sregs");
            let _ = pod_read::<kvm_mp_state>(bytes, "mp_state");
            let _ = pod_read::<kvm_pit_state2>(bytes, "pit");
            let _ = pod_read::<kvm_clock_data>(bytes, "clock");
        }
        let _ = decoded.require(99, "missing");
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut vcpu = Encoder::new(Kind::Vcpu);
    vcpu.pod(1, &kvm_regs { rip: 0x1000, ..Default::default() });
    vcpu.pod(2, &kvm_sregs::default());
    vcpu.section(3, pod_bytes(&kvm_mp_state::default()));
    let mut vm = Encoder::new(Kind::Vm);
    vm.pod(1, &kvm_pit_state2::default());
    vm.pod(5, &kvm_clock_data::default());
    vec![vcpu.finish(), vm.finish()]
}
