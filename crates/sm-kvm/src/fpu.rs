//! `kvm_fpu` as bytes for the state codec.
//!
//! kvm-bindings derives zerocopy's `IntoBytes`/`FromBytes` for every KVM
//! structure the codec stores except `kvm_fpu` (0.14.2 leaves it out), so
//! [`FpuBytes`] mirrors its layout field for field and carries the derives;
//! its size and field offsets are checked against `kvm_fpu` at compile time.

use kvm_bindings::kvm_fpu;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The bytes of a `kvm_fpu` (same `repr(C)` layout, no padding).
#[derive(Clone, Copy, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct FpuBytes {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<FpuBytes>() == size_of::<kvm_fpu>());
    assert!(offset_of!(FpuBytes, fcw) == offset_of!(kvm_fpu, fcw));
    assert!(offset_of!(FpuBytes, last_ip) == offset_of!(kvm_fpu, last_ip));
    assert!(offset_of!(FpuBytes, xmm) == offset_of!(kvm_fpu, xmm));
    assert!(offset_of!(FpuBytes, mxcsr) == offset_of!(kvm_fpu, mxcsr));
    assert!(offset_of!(FpuBytes, pad2) == offset_of!(kvm_fpu, pad2));
};

impl From<&kvm_fpu> for FpuBytes {
    fn from(f: &kvm_fpu) -> Self {
        FpuBytes {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            pad1: f.pad1,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            pad2: f.pad2,
        }
    }
}

impl From<FpuBytes> for kvm_fpu {
    fn from(f: FpuBytes) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            pad1: f.pad1,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            pad2: f.pad2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_state_round_trips_through_its_bytes() {
        let mut fpu = kvm_fpu { fcw: 0x37f, fsw: 7, ftwx: 0xff, last_opcode: 9, mxcsr: 0x1f80, ..Default::default() };
        fpu.last_ip = 0x1122_3344_5566_7788;
        fpu.last_dp = 42;
        fpu.fpr[3] = [0xab; 16];
        fpu.xmm[15] = [0xcd; 16];
        let bytes = FpuBytes::from(&fpu).as_bytes().to_vec();
        let back: kvm_fpu = FpuBytes::read_from_bytes(&bytes).unwrap().into();
        assert_eq!(back, fpu);
    }
}
