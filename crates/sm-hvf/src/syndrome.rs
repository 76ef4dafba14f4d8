//! The exception syndrome (ESR_EL2) of a guest trap, decoded
//! (Arm ARM D17.2.37): exception class in bits 31:26, instruction length in
//! bit 25, the class's syndrome (ISS) in bits 24:0.

/// What trapped, as the run loop needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// WFI: the vCPU waits for an interrupt.
    Wfi,
    /// WFE: the vCPU waits for an event (treated as a yield).
    Wfe,
    /// HVC #imm (a PSCI or other SMCCC call in x0..x3).
    Hvc(u16),
    /// SMC #imm (conduit of some guests' PSCI calls).
    Smc(u16),
    /// MSR/MRS of a system register the hypervisor traps.
    SysReg(SysRegAccess),
    /// A load or store to guest-physical memory that is not RAM: MMIO.
    Mmio(MmioAccess),
    /// A data abort whose syndrome does not describe the access (ISV = 0:
    /// load/store pair, writeback, SIMD, ...): cannot be emulated.
    UndecodableDataAbort {
        /// The fault status code.
        dfsc: u8,
    },
    /// An instruction fetch from memory that is not RAM.
    InstructionAbort,
    /// BRK #imm.
    Breakpoint(u16),
    /// Any other class.
    Other {
        /// The exception class.
        ec: u8,
        /// Its syndrome.
        iss: u32,
    },
}

/// A trapped MSR/MRS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysRegAccess {
    /// The register's encoding: op0, op1, CRn, CRm, op2.
    pub encoding: (u8, u8, u8, u8, u8),
    /// The general register (31: XZR).
    pub reg: u8,
    /// MRS (a read into `reg`); else MSR (a write from it).
    pub read: bool,
}

/// A trapped MMIO load or store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAccess {
    /// A store (else a load).
    pub write: bool,
    /// Bytes accessed: 1, 2, 4 or 8.
    pub size: u8,
    /// The general register loaded or stored (31: XZR/WZR).
    pub reg: u8,
    /// A load sign-extends the value.
    pub sign_extend: bool,
    /// The register is 64-bit (X), else 32-bit (W).
    pub sixty_four: bool,
}

impl MmioAccess {
    /// The register value a load of `raw` (the device's `size` bytes, little
    /// endian, zero-extended) leaves: sign-extended from `size` if asked,
    /// then cut to 32 bits for a W register.
    pub fn loaded_value(&self, raw: u64) -> u64 {
        let bits = u32::from(self.size) * 8;
        let mut v = if bits >= 64 { raw } else { raw & ((1u64 << bits) - 1) };
        if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            v = (((v << shift) as i64) >> shift) as u64;
        }
        if self.sixty_four {
            v
        } else {
            v & 0xffff_ffff
        }
    }
}

/// Exception classes this backend decodes.
mod ec {
    pub const WFX: u8 = 0x01;
    pub const HVC64: u8 = 0x16;
    pub const SMC64: u8 = 0x17;
    pub const SYSREG: u8 = 0x18;
    pub const IABT_LOWER: u8 = 0x20;
    pub const DABT_LOWER: u8 = 0x24;
    pub const BRK64: u8 = 0x3c;
}

/// The exception class of `esr`.
pub fn exception_class(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// Whether the trapped instruction is 32 bits long (IL): the PC moves on by
/// 4 after an emulated MMIO access or system register access, else by 2.
pub fn instruction_len(esr: u64) -> u64 {
    if esr & (1 << 25) != 0 {
        4
    } else {
        2
    }
}

/// Decodes `esr`.
pub fn decode(esr: u64) -> Trap {
    let class = exception_class(esr);
    let iss = (esr & 0x1ff_ffff) as u32;
    let bits = |hi: u32, lo: u32| ((iss >> lo) & ((1 << (hi - lo + 1)) - 1)) as u8;
    match class {
        ec::WFX if iss & 1 == 0 => Trap::Wfi,
        ec::WFX => Trap::Wfe,
        ec::HVC64 => Trap::Hvc(iss as u16),
        ec::SMC64 => Trap::Smc(iss as u16),
        ec::SYSREG => Trap::SysReg(SysRegAccess {
            encoding: (bits(21, 20), bits(16, 14), bits(13, 10), bits(4, 1), bits(19, 17)),
            reg: bits(9, 5),
            read: iss & 1 != 0,
        }),
        ec::DABT_LOWER if iss & (1 << 24) == 0 => Trap::UndecodableDataAbort { dfsc: bits(5, 0) },
        ec::DABT_LOWER => Trap::Mmio(MmioAccess {
            write: iss & (1 << 6) != 0,
            size: 1 << bits(23, 22),
            reg: bits(20, 16),
            sign_extend: iss & (1 << 21) != 0,
            sixty_four: iss & (1 << 15) != 0,
        }),
        ec::IABT_LOWER => Trap::InstructionAbort,
        ec::BRK64 => Trap::Breakpoint(iss as u16),
        ec => Trap::Other { ec, iss },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ESR of class `ec` with IL set and syndrome `iss`.
    fn esr(ec: u8, iss: u32) -> u64 {
        (u64::from(ec) << 26) | (1 << 25) | u64::from(iss)
    }

    #[test]
    fn data_aborts_give_size_register_direction_and_extension() {
        // str w3, [x1]: ISV, SAS=2 (4 bytes), SRT=3, WnR.
        let store = esr(0x24, (1 << 24) | (2 << 22) | (3 << 16) | (1 << 6));
        assert_eq!(
            decode(store),
            Trap::Mmio(MmioAccess { write: true, size: 4, reg: 3, sign_extend: false, sixty_four: false })
        );
        // ldrsh x7, [x0]: SAS=1, SSE, SRT=7, SF.
        let load = esr(0x24, (1 << 24) | (1 << 22) | (1 << 21) | (7 << 16) | (1 << 15));
        let Trap::Mmio(access) = decode(load) else { panic!("{:?}", decode(load)) };
        assert_eq!(access, MmioAccess { write: false, size: 2, reg: 7, sign_extend: true, sixty_four: true });
        assert_eq!(access.loaded_value(0x8001), 0xffff_ffff_ffff_8001, "sign-extended to 64 bits");
        assert_eq!(instruction_len(load), 4);
        // ldrsb w2: sign-extended then cut to 32 bits.
        let w = MmioAccess { write: false, size: 1, reg: 2, sign_extend: true, sixty_four: false };
        assert_eq!(w.loaded_value(0xfff0), 0xffff_fff0, "only the access's byte counts; W register");
        let plain = MmioAccess { write: false, size: 8, reg: 0, sign_extend: false, sixty_four: true };
        assert_eq!(plain.loaded_value(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_data_abort_without_a_valid_syndrome_is_undecodable_not_guessed() {
        // ldp x0, x1, [x2] to MMIO: ISV = 0, DFSC = translation fault level 3.
        assert_eq!(decode(esr(0x24, 0x07)), Trap::UndecodableDataAbort { dfsc: 0x07 });
    }

    #[test]
    fn wfi_wfe_hvc_smc_brk_and_sysregs_decode() {
        assert_eq!(decode(esr(0x01, 0)), Trap::Wfi);
        assert_eq!(decode(esr(0x01, 1)), Trap::Wfe);
        assert_eq!(decode(esr(0x16, 0)), Trap::Hvc(0));
        assert_eq!(decode(esr(0x17, 0x1234)), Trap::Smc(0x1234));
        assert_eq!(decode(esr(0x3c, 0xf000)), Trap::Breakpoint(0xf000));
        assert_eq!(decode(esr(0x20, 0x0f)), Trap::InstructionAbort);
        // mrs x5, cntpct_el0: op0=3, op1=3, CRn=14, CRm=0, op2=1, read.
        let iss = (3 << 20) | (1 << 17) | (3 << 14) | (14 << 10) | (5 << 5) | 1;
        assert_eq!(
            decode(esr(0x18, iss)),
            Trap::SysReg(SysRegAccess { encoding: (3, 3, 14, 0, 1), reg: 5, read: true })
        );
        assert_eq!(decode(esr(0x07, 0x42)), Trap::Other { ec: 0x07, iss: 0x42 });
        assert_eq!(instruction_len(0x24 << 26), 2, "IL clear: a 16-bit instruction");
    }
}
