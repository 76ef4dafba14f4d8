//! PSCI 1.0 (Arm DEN 0022), the firmware interface a Linux guest on this
//! backend uses through HVC (the device tree's `psci` node says "hvc"):
//! starting and stopping vCPUs, power off, reset. A call is decoded from
//! x0..x3; its answer goes back in x0.

/// PSCI_VERSION's answer: 1.0.
pub const VERSION_1_0: u64 = 0x0001_0000;

/// PSCI return codes (signed, in x0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub enum PsciReturn {
    /// Done.
    Success = 0,
    /// Not offered.
    NotSupported = -1,
    /// A bad argument (an MPIDR naming no vCPU, ...).
    InvalidParameters = -2,
    /// Refused.
    Denied = -3,
    /// CPU_ON of a vCPU that is running.
    AlreadyOn = -4,
    /// CPU_ON of a vCPU being started.
    OnPending = -5,
}

impl PsciReturn {
    /// The value for x0.
    pub fn to_x0(self) -> u64 {
        self as i64 as u64
    }
}

/// Function ids (SMC32 where the call has no 64-bit arguments, SMC64 where
/// it has).
mod fid {
    pub const VERSION: u32 = 0x8400_0000;
    pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
    pub const CPU_SUSPEND_64: u32 = 0xc400_0001;
    pub const CPU_OFF: u32 = 0x8400_0002;
    pub const CPU_ON_32: u32 = 0x8400_0003;
    pub const CPU_ON_64: u32 = 0xc400_0003;
    pub const AFFINITY_INFO_32: u32 = 0x8400_0004;
    pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    pub const FEATURES: u32 = 0x8400_000a;
}

/// A decoded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciCall {
    /// PSCI_VERSION.
    Version,
    /// CPU_SUSPEND: a low-power wait (treated as WFI).
    CpuSuspend,
    /// CPU_OFF: the calling vCPU stops.
    CpuOff,
    /// CPU_ON: start the vCPU of `target_mpidr` at `entry` with x0 = `context`.
    CpuOn {
        /// The target's MPIDR affinity.
        target_mpidr: u64,
        /// Where it starts (guest-physical, MMU off).
        entry: u64,
        /// Its x0.
        context: u64,
    },
    /// AFFINITY_INFO: is the vCPU of `target_mpidr` on?
    AffinityInfo {
        /// The target's MPIDR affinity.
        target_mpidr: u64,
    },
    /// MIGRATE_INFO_TYPE: no trusted OS to migrate (answer 2).
    MigrateInfoType,
    /// SYSTEM_OFF: the VM powers off.
    SystemOff,
    /// SYSTEM_RESET: the VM reboots.
    SystemReset,
    /// PSCI_FEATURES of function `fid`.
    Features {
        /// The function asked about.
        fid: u32,
    },
    /// Any other function id (SMCCC_VERSION, vendor calls, ...): answered
    /// NOT_SUPPORTED.
    Unknown(u32),
}

impl PsciCall {
    /// Decodes the call in `x` (x0..x3). A 32-bit call's arguments are cut
    /// to 32 bits, as the convention says.
    pub fn decode(x: [u64; 4]) -> PsciCall {
        let id = x[0] as u32;
        let arg = |i: usize| if id & 0x4000_0000 != 0 { x[i] } else { x[i] & 0xffff_ffff };
        match id {
            fid::VERSION => PsciCall::Version,
            fid::CPU_SUSPEND_32 | fid::CPU_SUSPEND_64 => PsciCall::CpuSuspend,
            fid::CPU_OFF => PsciCall::CpuOff,
            fid::CPU_ON_32 | fid::CPU_ON_64 => PsciCall::CpuOn { target_mpidr: arg(1), entry: arg(2), context: arg(3) },
            fid::AFFINITY_INFO_32 | fid::AFFINITY_INFO_64 => PsciCall::AffinityInfo { target_mpidr: arg(1) },
            fid::MIGRATE_INFO_TYPE => PsciCall::MigrateInfoType,
            fid::SYSTEM_OFF => PsciCall::SystemOff,
            fid::SYSTEM_RESET => PsciCall::SystemReset,
            fid::FEATURES => PsciCall::Features { fid: x[1] as u32 },
            other => PsciCall::Unknown(other),
        }
    }

    /// The answer of the calls that need nothing from the machine; `None`
    /// for those the VMM carries out (CPU_ON/OFF, AFFINITY_INFO, SYSTEM_*,
    /// CPU_SUSPEND).
    pub fn immediate_answer(&self) -> Option<u64> {
        match self {
            PsciCall::Version => Some(VERSION_1_0),
            PsciCall::MigrateInfoType => Some(2),
            PsciCall::Features { fid } => Some(features(*fid)),
            PsciCall::Unknown(_) => Some(PsciReturn::NotSupported.to_x0()),
            _ => None,
        }
    }
}

/// PSCI_FEATURES: 0 for the functions offered, NOT_SUPPORTED for the rest.
fn features(id: u32) -> u64 {
    let offered = matches!(PsciCall::decode([u64::from(id), 0, 0, 0]), PsciCall::Unknown(_));
    if offered {
        PsciReturn::NotSupported.to_x0()
    } else {
        PsciReturn::Success.to_x0()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_a_linux_guest_makes_decode_with_their_arguments() {
        assert_eq!(PsciCall::decode([0x8400_0000, 0, 0, 0]), PsciCall::Version);
        assert_eq!(PsciCall::decode([0x8400_0000, 0, 0, 0]).immediate_answer(), Some(VERSION_1_0));
        let on = PsciCall::decode([0xc400_0003, 0x1, 0x4020_0000, 0xdead_beef_0000]);
        assert_eq!(on, PsciCall::CpuOn { target_mpidr: 1, entry: 0x4020_0000, context: 0xdead_beef_0000 });
        assert_eq!(on.immediate_answer(), None, "the VMM starts the vCPU");
        let on32 = PsciCall::decode([0x8400_0003, 0xffff_ffff_0000_0002, 0x1_4000_0000, 7]);
        assert_eq!(on32, PsciCall::CpuOn { target_mpidr: 2, entry: 0x4000_0000, context: 7 }, "SMC32: cut to 32 bits");
        assert_eq!(PsciCall::decode([0x8400_0008, 0, 0, 0]), PsciCall::SystemOff);
        assert_eq!(PsciCall::decode([0x8400_0009, 0, 0, 0]), PsciCall::SystemReset);
        assert_eq!(PsciCall::decode([0x8400_0002, 0, 0, 0]), PsciCall::CpuOff);
        assert_eq!(PsciCall::decode([0xc400_0004, 3, 0, 0]), PsciCall::AffinityInfo { target_mpidr: 3 });
        assert_eq!(PsciCall::decode([0x8400_0006, 0, 0, 0]).immediate_answer(), Some(2));
        // The upper half of x0 is not part of the id.
        assert_eq!(PsciCall::decode([0xffff_ffff_8400_0000, 0, 0, 0]), PsciCall::Version);
    }

    #[test]
    fn unknown_functions_and_features_answer_as_the_spec_says() {
        let smccc_version = PsciCall::decode([0x8000_0000, 0, 0, 0]);
        assert_eq!(smccc_version, PsciCall::Unknown(0x8000_0000));
        assert_eq!(smccc_version.immediate_answer(), Some(u64::MAX), "NOT_SUPPORTED is -1");
        let features = |id: u64| PsciCall::decode([0x8400_000a, id, 0, 0]).immediate_answer().unwrap();
        assert_eq!(features(0xc400_0003), 0, "CPU_ON is offered");
        assert_eq!(features(0x8400_0009), 0, "SYSTEM_RESET is offered");
        assert_eq!(features(0x8000_0000), PsciReturn::NotSupported.to_x0());
        assert_eq!(PsciReturn::AlreadyOn.to_x0() as i64, -4);
    }
}
