//! What a vCPU does with a trapped exception: the step between the
//! framework's exit (a syndrome and a faulting address) and the seam's
//! [`sm_hypervisor::VcpuExit`]. Pure over a [`GuestRegisters`] view, so the
//! rules — which register an MMIO access uses, when the PC moves on, what a
//! PSCI call answers — are tested on any host.
//!
//! The PC: after a data abort, WFI/WFE, SMC and a trapped MSR/MRS it still
//! points at the trapping instruction and is moved past it once the access
//! is emulated; after HVC it already points past the call.

use sm_hypervisor::{Result, SystemEvent};

use crate::psci::{PsciCall, PsciReturn};
use crate::syndrome::{decode, instruction_len, MmioAccess, Trap};

/// The vCPU registers exit handling reads and writes.
pub trait GuestRegisters {
    /// General register `n` (0..=30).
    fn x(&mut self, n: u8) -> Result<u64>;
    /// Sets general register `n` (0..=30).
    fn set_x(&mut self, n: u8, value: u64) -> Result<()>;
    /// The program counter.
    fn pc(&mut self) -> Result<u64>;
    /// Sets the program counter.
    fn set_pc(&mut self, value: u64) -> Result<()>;
}

/// The zero register's number in a syndrome's register field.
const XZR: u8 = 31;

/// What the run loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing for the VMM: run the guest again.
    Resume,
    /// The guest loads `size` bytes from `addr`: the VMM fills them, then
    /// [`complete_mmio_load`] puts them in the register.
    MmioLoad {
        /// Guest-physical address.
        addr: u64,
        /// What to complete.
        pending: PendingLoad,
    },
    /// The guest stored `data[..size]` to `addr` (the PC has moved on).
    MmioStore {
        /// Guest-physical address.
        addr: u64,
        /// The value, little endian.
        data: [u8; 8],
        /// Bytes stored.
        size: u8,
    },
    /// WFI (or PSCI CPU_SUSPEND): wait for an interrupt.
    WaitForInterrupt,
    /// PSCI SYSTEM_OFF / SYSTEM_RESET.
    SystemEvent(SystemEvent),
    /// PSCI CPU_ON: the VMM starts the vCPU and answers in x0 itself.
    CpuOn {
        /// The target's MPIDR affinity.
        target_mpidr: u64,
        /// Its entry.
        entry: u64,
        /// Its x0.
        context: u64,
    },
    /// PSCI CPU_OFF: this vCPU stops.
    CpuOff,
    /// The guest did something that cannot be emulated.
    Fault(&'static str),
}

/// A load waiting for the device's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLoad {
    /// The access the syndrome described.
    pub access: MmioAccess,
    /// The trapping instruction's length (the PC moves on by it).
    pub instruction_len: u64,
}

/// Handles the exception with syndrome `esr` at guest-physical `ipa`.
pub fn handle_exception(esr: u64, ipa: u64, regs: &mut impl GuestRegisters) -> Result<Step> {
    let len = instruction_len(esr);
    let skip = |regs: &mut dyn GuestRegisters| -> Result<()> {
        let pc = regs.pc()?;
        regs.set_pc(pc.wrapping_add(len))
    };
    Ok(match decode(esr) {
        Trap::Mmio(access) if access.write => {
            let value = if access.reg == XZR { 0 } else { regs.x(access.reg)? };
            skip(regs)?;
            Step::MmioStore { addr: ipa, data: value.to_le_bytes(), size: access.size }
        }
        Trap::Mmio(access) => Step::MmioLoad { addr: ipa, pending: PendingLoad { access, instruction_len: len } },
        Trap::Wfi => {
            skip(regs)?;
            Step::WaitForInterrupt
        }
        Trap::Wfe => {
            skip(regs)?;
            Step::Resume
        }
        Trap::Hvc(_) => psci(regs)?,
        Trap::Smc(_) => {
            // The device tree names HVC as PSCI's conduit: SMC is refused.
            regs.set_x(0, PsciReturn::NotSupported.to_x0())?;
            skip(regs)?;
            Step::Resume
        }
        Trap::SysReg(access) => {
            // Registers the framework traps and nothing here models read as
            // zero and ignore writes.
            if access.read && access.reg != XZR {
                regs.set_x(access.reg, 0)?;
            }
            skip(regs)?;
            Step::Resume
        }
        Trap::UndecodableDataAbort { .. } => {
            Step::Fault("an MMIO access by an instruction the syndrome does not describe (load/store pair, writeback)")
        }
        Trap::InstructionAbort => Step::Fault("an instruction fetch from guest-physical memory that is not RAM"),
        Trap::Breakpoint(_) => Step::Fault("a BRK instruction with no debugger attached"),
        Trap::Other { .. } => Step::Fault("an exception class this backend does not handle"),
    })
}

/// A PSCI call through HVC (PC already past it).
fn psci(regs: &mut impl GuestRegisters) -> Result<Step> {
    let x = [regs.x(0)?, regs.x(1)?, regs.x(2)?, regs.x(3)?];
    let call = PsciCall::decode(x);
    if let Some(answer) = call.immediate_answer() {
        regs.set_x(0, answer)?;
        return Ok(Step::Resume);
    }
    Ok(match call {
        PsciCall::SystemOff => Step::SystemEvent(SystemEvent::Shutdown),
        PsciCall::SystemReset => Step::SystemEvent(SystemEvent::Reset),
        PsciCall::CpuSuspend => {
            regs.set_x(0, PsciReturn::Success.to_x0())?;
            Step::WaitForInterrupt
        }
        PsciCall::CpuOff => Step::CpuOff,
        PsciCall::CpuOn { target_mpidr, entry, context } => Step::CpuOn { target_mpidr, entry, context },
        PsciCall::AffinityInfo { .. } => {
            // Answered by the VMM, which knows every vCPU; alone here: on (0).
            regs.set_x(0, 0)?;
            Step::Resume
        }
        _ => {
            regs.set_x(0, PsciReturn::NotSupported.to_x0())?;
            Step::Resume
        }
    })
}

/// Finishes a load: the device's `data` (its first `size` bytes, little
/// endian) into the register, extended as the syndrome said, and the PC past
/// the instruction.
pub fn complete_mmio_load(pending: &PendingLoad, data: &[u8], regs: &mut impl GuestRegisters) -> Result<()> {
    let mut raw = [0u8; 8];
    let n = usize::from(pending.access.size).min(data.len()).min(8);
    raw[..n].copy_from_slice(&data[..n]);
    if pending.access.reg != XZR {
        regs.set_x(pending.access.reg, pending.access.loaded_value(u64::from_le_bytes(raw)))?;
    }
    let pc = regs.pc()?;
    regs.set_pc(pc.wrapping_add(pending.instruction_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Regs {
        x: [u64; 31],
        pc: u64,
    }

    impl GuestRegisters for Regs {
        fn x(&mut self, n: u8) -> Result<u64> {
            Ok(self.x[usize::from(n)])
        }
        fn set_x(&mut self, n: u8, value: u64) -> Result<()> {
            self.x[usize::from(n)] = value;
            Ok(())
        }
        fn pc(&mut self) -> Result<u64> {
            Ok(self.pc)
        }
        fn set_pc(&mut self, value: u64) -> Result<()> {
            self.pc = value;
            Ok(())
        }
    }

    fn esr(ec: u64, iss: u64) -> u64 {
        (ec << 26) | (1 << 25) | iss
    }

    const DABT: u64 = 0x24;
    const ISV: u64 = 1 << 24;
    const WNR: u64 = 1 << 6;

    #[test]
    fn an_mmio_store_sends_the_register_and_moves_the_pc_on() {
        let mut r = Regs { pc: 0x4000_1000, ..Default::default() };
        r.x[3] = 0x1122_3344_5566_7788;
        // str w3: 4 bytes from x3.
        let step = handle_exception(esr(DABT, ISV | (2 << 22) | (3 << 16) | WNR), 0x0a00_0050, &mut r).unwrap();
        let Step::MmioStore { addr, data, size } = step else { panic!("{step:?}") };
        assert_eq!((addr, size), (0x0a00_0050, 4));
        assert_eq!(data[..4], 0x5566_7788u32.to_le_bytes());
        assert_eq!(r.pc, 0x4000_1004);
        // str wzr: a zero, whatever x31 would be.
        let step = handle_exception(esr(DABT, ISV | (2 << 22) | (31 << 16) | WNR), 0x0a00_0070, &mut r).unwrap();
        assert!(matches!(step, Step::MmioStore { data, .. } if data == [0; 8]), "{step:?}");
    }

    #[test]
    fn an_mmio_load_completes_into_the_register_extended_then_moves_the_pc_on() {
        let mut r = Regs { pc: 0x100, ..Default::default() };
        // ldrsb x7: 1 byte, sign-extended, 64-bit register.
        let step = handle_exception(esr(DABT, ISV | (1 << 21) | (7 << 16) | (1 << 15)), 0x0900_0005, &mut r).unwrap();
        let Step::MmioLoad { addr, pending } = step else { panic!("{step:?}") };
        assert_eq!(addr, 0x0900_0005);
        assert_eq!(r.pc, 0x100, "the PC waits for the data");
        complete_mmio_load(&pending, &[0x80, 0xff, 0xff], &mut r).unwrap();
        assert_eq!(r.x[7], 0xffff_ffff_ffff_ff80, "only the access's byte, sign-extended");
        assert_eq!(r.pc, 0x104);
        // ldr w2 (4 bytes): zero-extended, the upper half cleared.
        r.x[2] = u64::MAX;
        let step = handle_exception(esr(DABT, ISV | (2 << 22) | (2 << 16)), 0x0a00_0000, &mut r).unwrap();
        let Step::MmioLoad { pending, .. } = step else { panic!("{step:?}") };
        complete_mmio_load(&pending, &0x7472_6976u32.to_le_bytes(), &mut r).unwrap();
        assert_eq!(r.x[2], 0x7472_6976);
    }

    #[test]
    fn psci_through_hvc_answers_in_x0_without_moving_the_pc() {
        let mut r = Regs { pc: 0x200, ..Default::default() };
        r.x[0] = 0x8400_0000; // PSCI_VERSION
        assert_eq!(handle_exception(esr(0x16, 0), 0, &mut r).unwrap(), Step::Resume);
        assert_eq!((r.x[0], r.pc), (0x0001_0000, 0x200));
        r.x[0] = 0x8400_0008;
        assert_eq!(handle_exception(esr(0x16, 0), 0, &mut r).unwrap(), Step::SystemEvent(SystemEvent::Shutdown));
        r.x[0] = 0x8400_0009;
        assert_eq!(handle_exception(esr(0x16, 0), 0, &mut r).unwrap(), Step::SystemEvent(SystemEvent::Reset));
        r.x = [0; 31];
        r.x[..4].copy_from_slice(&[0xc400_0003, 1, 0x4008_0000, 9]);
        assert_eq!(
            handle_exception(esr(0x16, 0), 0, &mut r).unwrap(),
            Step::CpuOn { target_mpidr: 1, entry: 0x4008_0000, context: 9 }
        );
        r.x[0] = 0xc400_0001; // CPU_SUSPEND
        assert_eq!(handle_exception(esr(0x16, 0), 0, &mut r).unwrap(), Step::WaitForInterrupt);
        assert_eq!(r.x[0], 0);
    }

    #[test]
    fn wfi_smc_and_sysregs_move_the_pc_on_and_faults_are_named() {
        let mut r = Regs { pc: 0x300, ..Default::default() };
        assert_eq!(handle_exception(esr(0x01, 0), 0, &mut r).unwrap(), Step::WaitForInterrupt);
        assert_eq!(r.pc, 0x304);
        assert_eq!(handle_exception(esr(0x17, 0), 0, &mut r).unwrap(), Step::Resume);
        assert_eq!((r.x[0], r.pc), (u64::MAX, 0x308), "SMC: NOT_SUPPORTED");
        r.x[5] = 42;
        let mrs = (3 << 20) | (3 << 14) | (14 << 10) | (5 << 5) | 1;
        assert_eq!(handle_exception(esr(0x18, mrs), 0, &mut r).unwrap(), Step::Resume);
        assert_eq!((r.x[5], r.pc), (0, 0x30c), "read as zero");
        let step = handle_exception(esr(DABT, 0x07), 0x0a00_0000, &mut r).unwrap();
        assert!(matches!(step, Step::Fault(why) if why.contains("load/store pair")), "{step:?}");
        assert_eq!(r.pc, 0x30c, "a fault leaves the PC at the instruction");
    }
}
