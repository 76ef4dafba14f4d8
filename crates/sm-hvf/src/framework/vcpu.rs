//! The HVF vCPU: runs on the thread that created it (sm-vmm keeps one
//! thread per vCPU for the machine's life), turns the framework's exits into
//! the seam's with [`crate::exit`], and saves/restores its registers in the
//! [`crate::state`] layout. Type-checked on Linux; never run here.
//!
//! Unverified (no Mac here): how the in-kernel GIC of macOS 15 takes the
//! virtual timer's interrupt — on `VTIMER_ACTIVATED` the timer is unmasked
//! and the guest resumed, on the assumption that the GIC delivers the PPI.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use applevisor_sys as hv;
use sm_hypervisor::aarch64::{Aarch64Boot, Aarch64Vcpu, BOOT_PSTATE};
use sm_hypervisor::{Error, ForceExit, Kick, Result, Vcpu, VcpuExit, VcpuState};

use crate::exit::{complete_mmio_load, handle_exception, GuestRegisters, PendingLoad, Step};
use crate::hv_error::check;
use crate::psci::PsciReturn;
use crate::state::{VcpuRegisters, VtimerState};

const GP: [hv::hv_reg_t; 31] = [
    hv::hv_reg_t::X0,
    hv::hv_reg_t::X1,
    hv::hv_reg_t::X2,
    hv::hv_reg_t::X3,
    hv::hv_reg_t::X4,
    hv::hv_reg_t::X5,
    hv::hv_reg_t::X6,
    hv::hv_reg_t::X7,
    hv::hv_reg_t::X8,
    hv::hv_reg_t::X9,
    hv::hv_reg_t::X10,
    hv::hv_reg_t::X11,
    hv::hv_reg_t::X12,
    hv::hv_reg_t::X13,
    hv::hv_reg_t::X14,
    hv::hv_reg_t::X15,
    hv::hv_reg_t::X16,
    hv::hv_reg_t::X17,
    hv::hv_reg_t::X18,
    hv::hv_reg_t::X19,
    hv::hv_reg_t::X20,
    hv::hv_reg_t::X21,
    hv::hv_reg_t::X22,
    hv::hv_reg_t::X23,
    hv::hv_reg_t::X24,
    hv::hv_reg_t::X25,
    hv::hv_reg_t::X26,
    hv::hv_reg_t::X27,
    hv::hv_reg_t::X28,
    hv::hv_reg_t::X29,
    hv::hv_reg_t::X30,
];

const SIMD: [hv::hv_simd_fp_reg_t; 32] = [
    hv::hv_simd_fp_reg_t::Q0,
    hv::hv_simd_fp_reg_t::Q1,
    hv::hv_simd_fp_reg_t::Q2,
    hv::hv_simd_fp_reg_t::Q3,
    hv::hv_simd_fp_reg_t::Q4,
    hv::hv_simd_fp_reg_t::Q5,
    hv::hv_simd_fp_reg_t::Q6,
    hv::hv_simd_fp_reg_t::Q7,
    hv::hv_simd_fp_reg_t::Q8,
    hv::hv_simd_fp_reg_t::Q9,
    hv::hv_simd_fp_reg_t::Q10,
    hv::hv_simd_fp_reg_t::Q11,
    hv::hv_simd_fp_reg_t::Q12,
    hv::hv_simd_fp_reg_t::Q13,
    hv::hv_simd_fp_reg_t::Q14,
    hv::hv_simd_fp_reg_t::Q15,
    hv::hv_simd_fp_reg_t::Q16,
    hv::hv_simd_fp_reg_t::Q17,
    hv::hv_simd_fp_reg_t::Q18,
    hv::hv_simd_fp_reg_t::Q19,
    hv::hv_simd_fp_reg_t::Q20,
    hv::hv_simd_fp_reg_t::Q21,
    hv::hv_simd_fp_reg_t::Q22,
    hv::hv_simd_fp_reg_t::Q23,
    hv::hv_simd_fp_reg_t::Q24,
    hv::hv_simd_fp_reg_t::Q25,
    hv::hv_simd_fp_reg_t::Q26,
    hv::hv_simd_fp_reg_t::Q27,
    hv::hv_simd_fp_reg_t::Q28,
    hv::hv_simd_fp_reg_t::Q29,
    hv::hv_simd_fp_reg_t::Q30,
    hv::hv_simd_fp_reg_t::Q31,
];

/// System registers a snapshot carries (EL1 context, timers, thread ids).
const SYS: [hv::hv_sys_reg_t; 23] = [
    hv::hv_sys_reg_t::SCTLR_EL1,
    hv::hv_sys_reg_t::CPACR_EL1,
    hv::hv_sys_reg_t::TTBR0_EL1,
    hv::hv_sys_reg_t::TTBR1_EL1,
    hv::hv_sys_reg_t::TCR_EL1,
    hv::hv_sys_reg_t::AFSR0_EL1,
    hv::hv_sys_reg_t::AFSR1_EL1,
    hv::hv_sys_reg_t::ESR_EL1,
    hv::hv_sys_reg_t::FAR_EL1,
    hv::hv_sys_reg_t::PAR_EL1,
    hv::hv_sys_reg_t::MAIR_EL1,
    hv::hv_sys_reg_t::AMAIR_EL1,
    hv::hv_sys_reg_t::VBAR_EL1,
    hv::hv_sys_reg_t::CONTEXTIDR_EL1,
    hv::hv_sys_reg_t::TPIDR_EL1,
    hv::hv_sys_reg_t::TPIDR_EL0,
    hv::hv_sys_reg_t::TPIDRRO_EL0,
    hv::hv_sys_reg_t::CNTKCTL_EL1,
    hv::hv_sys_reg_t::MDSCR_EL1,
    hv::hv_sys_reg_t::ELR_EL1,
    hv::hv_sys_reg_t::SPSR_EL1,
    hv::hv_sys_reg_t::SP_EL0,
    hv::hv_sys_reg_t::SP_EL1,
];

/// GIC CPU interface registers a snapshot carries (RPR is read-only).
const ICC: [hv::hv_gic_icc_reg_t; 9] = [
    hv::hv_gic_icc_reg_t::SRE_EL1,
    hv::hv_gic_icc_reg_t::CTLR_EL1,
    hv::hv_gic_icc_reg_t::PMR_EL1,
    hv::hv_gic_icc_reg_t::BPR0_EL1,
    hv::hv_gic_icc_reg_t::BPR1_EL1,
    hv::hv_gic_icc_reg_t::AP0R0_EL1,
    hv::hv_gic_icc_reg_t::AP1R0_EL1,
    hv::hv_gic_icc_reg_t::IGRPEN0_EL1,
    hv::hv_gic_icc_reg_t::IGRPEN1_EL1,
];

/// Kicks a vCPU out of `hv_vcpu_run` from any thread, and wakes it from a
/// wait for an interrupt.
struct HvfKick {
    vcpu: hv::hv_vcpu_t,
    pending: AtomicBool,
    wake: (Mutex<bool>, Condvar),
}

impl Kick for HvfKick {
    fn kick(&self) {
        self.pending.store(true, Ordering::SeqCst);
        // SAFETY: exits a vCPU of this process's VM; harmless if it is not running.
        unsafe { hv::hv_vcpus_exit(&self.vcpu, 1) };
        *self.wake.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.1.notify_all();
    }
}

/// One vCPU of the process's VM.
pub struct HvfVcpu {
    id: u32,
    vcpu: hv::hv_vcpu_t,
    exit: *const hv::hv_vcpu_exit_t,
    kick: Arc<HvfKick>,
    pending_load: Option<PendingLoad>,
    mmio: [u8; 8],
}

// SAFETY: the seam asks vCPUs to be Send + Sync; the machine makes, runs and
// drops this one on a single thread of its own (sm-vmm `vcpu_thread`), the
// only place the exit pointer is read and `hv_vcpu_*` is called.
unsafe impl Send for HvfVcpu {}
// SAFETY: as above; no `&self` method touches the framework.
unsafe impl Sync for HvfVcpu {}

impl HvfVcpu {
    /// Creates vCPU `id` on the calling thread (which must be the one that runs it).
    pub fn new(id: u32) -> Result<HvfVcpu> {
        let mut vcpu: hv::hv_vcpu_t = 0;
        let mut exit: *const hv::hv_vcpu_exit_t = std::ptr::null();
        // SAFETY: both out-pointers are valid; a null config asks for the defaults.
        check("hv_vcpu_create", unsafe { hv::hv_vcpu_create(&mut vcpu, &mut exit, std::ptr::null_mut()) })?;
        let kick =
            Arc::new(HvfKick { vcpu, pending: AtomicBool::new(false), wake: (Mutex::new(false), Condvar::new()) });
        let me = HvfVcpu { id, vcpu, exit, kick, pending_load: None, mmio: [0; 8] };
        // Aff0 = id: what the device tree's cpu@N and PSCI CPU_ON name it by.
        me.set_sys(hv::hv_sys_reg_t::MPIDR_EL1, u64::from(id))?;
        Ok(me)
    }

    fn get(&self, reg: hv::hv_reg_t) -> Result<u64> {
        let mut v = 0;
        // SAFETY: on this vCPU's thread; writes one u64.
        check("hv_vcpu_get_reg", unsafe { hv::hv_vcpu_get_reg(self.vcpu, reg, &mut v) })?;
        Ok(v)
    }

    fn set(&self, reg: hv::hv_reg_t, value: u64) -> Result<()> {
        // SAFETY: on this vCPU's thread.
        check("hv_vcpu_set_reg", unsafe { hv::hv_vcpu_set_reg(self.vcpu, reg, value) })
    }

    fn get_sys(&self, reg: hv::hv_sys_reg_t) -> Result<u64> {
        let mut v = 0;
        // SAFETY: on this vCPU's thread; writes one u64.
        check("hv_vcpu_get_sys_reg", unsafe { hv::hv_vcpu_get_sys_reg(self.vcpu, reg, &mut v) })?;
        Ok(v)
    }

    fn set_sys(&self, reg: hv::hv_sys_reg_t, value: u64) -> Result<()> {
        // SAFETY: on this vCPU's thread.
        check("hv_vcpu_set_sys_reg", unsafe { hv::hv_vcpu_set_sys_reg(self.vcpu, reg, value) })
    }
}

/// The general registers through the framework, for [`crate::exit`].
struct Registers<'a>(&'a HvfVcpu);

impl GuestRegisters for Registers<'_> {
    fn x(&mut self, n: u8) -> Result<u64> {
        self.0.get(GP[usize::from(n).min(30)])
    }
    fn set_x(&mut self, n: u8, value: u64) -> Result<()> {
        self.0.set(GP[usize::from(n).min(30)], value)
    }
    fn pc(&mut self) -> Result<u64> {
        self.0.get(hv::hv_reg_t::PC)
    }
    fn set_pc(&mut self, value: u64) -> Result<()> {
        self.0.set(hv::hv_reg_t::PC, value)
    }
}

impl Vcpu for HvfVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if let Some(pending) = self.pending_load.take() {
            complete_mmio_load(&pending, &self.mmio, &mut Registers(self))?;
        }
        loop {
            if self.kick.pending.swap(false, Ordering::SeqCst) {
                return Ok(VcpuExit::ForcedExit);
            }
            // SAFETY: on this vCPU's thread.
            check("hv_vcpu_run", unsafe { hv::hv_vcpu_run(self.vcpu) })?;
            // SAFETY: the framework's exit record of this vCPU, valid while it lives.
            let exit = unsafe { *self.exit };
            match exit.reason {
                hv::hv_exit_reason_t::CANCELED => {
                    self.kick.pending.store(false, Ordering::SeqCst);
                    return Ok(VcpuExit::ForcedExit);
                }
                hv::hv_exit_reason_t::VTIMER_ACTIVATED => {
                    // Unverified (see the module doc): let the GIC deliver it.
                    // SAFETY: on this vCPU's thread.
                    check("hv_vcpu_set_vtimer_mask", unsafe { hv::hv_vcpu_set_vtimer_mask(self.vcpu, false) })?;
                }
                hv::hv_exit_reason_t::UNKNOWN => {
                    return Ok(VcpuExit::Other { detail: "an exit Hypervisor.framework calls unknown".into() })
                }
                hv::hv_exit_reason_t::EXCEPTION => {
                    let (esr, ipa) = (exit.exception.syndrome, exit.exception.physical_address);
                    match handle_exception(esr, ipa, &mut Registers(self))? {
                        Step::Resume => {}
                        Step::MmioLoad { addr, pending } => {
                            self.pending_load = Some(pending);
                            let n = usize::from(pending.access.size);
                            return Ok(VcpuExit::MmioRead { addr, data: &mut self.mmio[..n] });
                        }
                        Step::MmioStore { addr, data, size } => {
                            self.mmio = data;
                            return Ok(VcpuExit::MmioWrite { addr, data: &self.mmio[..usize::from(size)] });
                        }
                        Step::WaitForInterrupt => return Ok(VcpuExit::Halt),
                        Step::SystemEvent(e) => return Ok(VcpuExit::SystemEvent(e)),
                        Step::CpuOn { .. } => {
                            // One vCPU per guest until secondary start lands.
                            Registers(self).set_x(0, PsciReturn::Denied.to_x0())?;
                        }
                        Step::CpuOff => {
                            return Ok(VcpuExit::Other {
                                detail: "PSCI CPU_OFF (secondary vCPUs not supported yet)".into(),
                            })
                        }
                        Step::Fault(why) => {
                            return Ok(VcpuExit::InternalError { detail: format!("{why}: at {ipa:#x}, ESR {esr:#x}") })
                        }
                    }
                }
            }
        }
    }

    fn force_exit(&self) -> ForceExit {
        ForceExit::new(self.kick.clone())
    }

    fn wait_for_interrupt(&mut self, max: Duration) -> Result<()> {
        // The guest timer's next deadline is not computed yet: wake at least
        // every millisecond, and at once on a kick.
        let (flag, woken) = &self.kick.wake;
        let mut kicked = flag.lock().unwrap_or_else(|p| p.into_inner());
        if !*kicked {
            kicked = woken.wait_timeout(kicked, max.min(Duration::from_millis(1))).unwrap_or_else(|p| p.into_inner()).0;
        }
        *kicked = false;
        Ok(())
    }

    fn as_aarch64(&mut self) -> Option<&mut dyn Aarch64Vcpu> {
        Some(self)
    }

    fn register_summary(&self) -> String {
        match (self.get(hv::hv_reg_t::PC), self.get(hv::hv_reg_t::CPSR), self.get_sys(hv::hv_sys_reg_t::ESR_EL1)) {
            (Ok(pc), Ok(cpsr), Ok(esr)) => format!("pc={pc:#x} cpsr={cpsr:#x} esr_el1={esr:#x}"),
            _ => "registers unavailable".into(),
        }
    }

    fn save_state(&mut self) -> Result<VcpuState> {
        let mut r = VcpuRegisters::default();
        for (i, reg) in GP.iter().enumerate() {
            r.x[i] = self.get(*reg)?;
        }
        r.pc = self.get(hv::hv_reg_t::PC)?;
        r.pstate = self.get(hv::hv_reg_t::CPSR)?;
        r.fpcr = self.get(hv::hv_reg_t::FPCR)?;
        r.fpsr = self.get(hv::hv_reg_t::FPSR)?;
        r.sp_el0 = self.get_sys(hv::hv_sys_reg_t::SP_EL0)?;
        r.sp_el1 = self.get_sys(hv::hv_sys_reg_t::SP_EL1)?;
        for (i, reg) in SIMD.iter().enumerate() {
            let mut v: hv::hv_simd_fp_uchar16_t = 0;
            // SAFETY: on this vCPU's thread; writes one 16-byte value.
            check("hv_vcpu_get_simd_fp_reg", unsafe { hv::hv_vcpu_get_simd_fp_reg(self.vcpu, *reg, &mut v) })?;
            r.simd[i] = v;
        }
        r.sys_regs = SYS.iter().map(|reg| Ok((*reg as u16, self.get_sys(*reg)?))).collect::<Result<_>>()?;
        r.icc_regs = ICC
            .iter()
            .map(|reg| {
                let mut v = 0;
                // SAFETY: on this vCPU's thread; writes one u64.
                check("hv_gic_get_icc_reg", unsafe { hv::hv_gic_get_icc_reg(self.vcpu, *reg, &mut v) })?;
                Ok((*reg as u16, v))
            })
            .collect::<Result<_>>()?;
        let mut masked = false;
        // SAFETY: on this vCPU's thread; writes one bool.
        check("hv_vcpu_get_vtimer_mask", unsafe { hv::hv_vcpu_get_vtimer_mask(self.vcpu, &mut masked) })?;
        r.vtimer = VtimerState {
            ctl: self.get_sys(hv::hv_sys_reg_t::CNTV_CTL_EL0)?,
            cval: self.get_sys(hv::hv_sys_reg_t::CNTV_CVAL_EL0)?,
            masked,
        };
        r.powered_on = true;
        r.encode()
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        let r = VcpuRegisters::decode(state)?;
        for (i, reg) in GP.iter().enumerate() {
            self.set(*reg, r.x[i])?;
        }
        self.set(hv::hv_reg_t::PC, r.pc)?;
        self.set(hv::hv_reg_t::CPSR, r.pstate)?;
        self.set(hv::hv_reg_t::FPCR, r.fpcr)?;
        self.set(hv::hv_reg_t::FPSR, r.fpsr)?;
        for (i, reg) in SIMD.iter().enumerate() {
            // SAFETY: on this vCPU's thread.
            check("hv_vcpu_set_simd_fp_reg", unsafe { hv::hv_vcpu_set_simd_fp_reg(self.vcpu, *reg, r.simd[i]) })?;
        }
        for (id, value) in &r.sys_regs {
            let reg = SYS
                .iter()
                .find(|s| **s as u16 == *id)
                .ok_or_else(|| Error::InvalidState(format!("system register {id:#x} is not one this backend saves")))?;
            self.set_sys(*reg, *value)?;
        }
        for (id, value) in &r.icc_regs {
            let reg = ICC.iter().find(|s| **s as u16 == *id).ok_or_else(|| {
                Error::InvalidState(format!("GIC CPU register {id:#x} is not one this backend saves"))
            })?;
            // SAFETY: on this vCPU's thread.
            check("hv_gic_set_icc_reg", unsafe { hv::hv_gic_set_icc_reg(self.vcpu, *reg, *value) })?;
        }
        self.set_sys(hv::hv_sys_reg_t::CNTV_CTL_EL0, r.vtimer.ctl)?;
        self.set_sys(hv::hv_sys_reg_t::CNTV_CVAL_EL0, r.vtimer.cval)?;
        // SAFETY: on this vCPU's thread.
        check("hv_vcpu_set_vtimer_mask", unsafe { hv::hv_vcpu_set_vtimer_mask(self.vcpu, r.vtimer.masked) })?;
        self.pending_load = None;
        Ok(())
    }
}

impl Aarch64Vcpu for HvfVcpu {
    fn setup_boot(&mut self, boot: &Aarch64Boot) -> Result<()> {
        self.set(hv::hv_reg_t::PC, boot.pc)?;
        self.set(hv::hv_reg_t::X0, boot.fdt_addr)?;
        for reg in [hv::hv_reg_t::X1, hv::hv_reg_t::X2, hv::hv_reg_t::X3] {
            self.set(reg, 0)?;
        }
        self.set(hv::hv_reg_t::CPSR, BOOT_PSTATE)
    }

    fn mpidr(&self) -> Result<u64> {
        self.get_sys(hv::hv_sys_reg_t::MPIDR_EL1)
    }
}

impl Drop for HvfVcpu {
    fn drop(&mut self) {
        // SAFETY: on the thread that created it (sm-vmm drops a vCPU there).
        let _ = check("hv_vcpu_destroy", unsafe { hv::hv_vcpu_destroy(self.vcpu) });
    }
}
