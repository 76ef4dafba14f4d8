//! A KVM vCPU behind the `sm_hypervisor::Vcpu` trait.

use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_segment, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};
use sm_hypervisor::x86_64::{self as x86, LongModeBoot, X86Vcpu};
use sm_hypervisor::{Error, ForceExit, Result, SystemEvent, Vcpu, VcpuExit, VcpuState};

use crate::codec::{pod_read, Decoded, Encoder, Kind};
use crate::fpu::FpuBytes;
use crate::kick::VcpuKick;
use crate::msr;

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

// Section tags of the vCPU state blob.
const SEC_REGS: u16 = 1;
const SEC_SREGS: u16 = 2;
const SEC_FPU: u16 = 3;
const SEC_XCRS: u16 = 4;
const SEC_EVENTS: u16 = 5;
const SEC_MP_STATE: u16 = 6;
const SEC_DEBUGREGS: u16 = 7;
const SEC_LAPIC: u16 = 8;
const SEC_MSRS: u16 = 9;
const SEC_XSAVE: u16 = 10;

/// A KVM vCPU.
pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    kick: Arc<VcpuKick>,
    msr_indices: Arc<Vec<u32>>,
}

impl KvmVcpu {
    pub(crate) fn new(id: u32, fd: VcpuFd, kick: Arc<VcpuKick>, msr_indices: Arc<Vec<u32>>) -> Result<Self> {
        let vcpu = KvmVcpu { id, fd, kick, msr_indices };
        vcpu.setup_lapic_lints()?;
        Ok(vcpu)
    }

    /// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as on a PC.
    fn setup_lapic_lints(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(|e| Error::backend("KVM_GET_LAPIC", e))?;
        set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(|e| Error::backend("KVM_SET_LAPIC", e))
    }

    fn internal_error_detail(kick: &VcpuKick) -> String {
        let run = kick.run_page();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled the
        // `internal` member of the union; the page is mapped for the kick's lifetime.
        let internal = unsafe { (*run).__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n].iter().map(|d| format!("{d:#x}")).collect();
        let kind = match internal.suberror {
            1 => "emulation failure (an instruction this KVM cannot emulate)",
            2 => "simultaneous exception",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        format!("KVM internal error, suberror {} ({kind}), data [{}]", internal.suberror, data.join(", "))
    }
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = lapic.regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

fn segment(selector: u16, type_: u8, dpl: u8, code64: bool, system: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code64 && !system),
        s: u8::from(!system),
        l: u8::from(code64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if !self.kick.is_bound_to(tid) {
            self.kick.bind_current_thread();
        }
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
                KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
                KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
                KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
                KvmExit::Hlt => VcpuExit::Halt,
                KvmExit::Shutdown => VcpuExit::Shutdown,
                KvmExit::SystemEvent(kind, _) => VcpuExit::SystemEvent(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                    KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                    KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                    other => SystemEvent::Unknown(other),
                }),
                KvmExit::Intr => {
                    self.kick.consume();
                    VcpuExit::ForcedExit
                }
                KvmExit::InternalError => VcpuExit::InternalError { detail: Self::internal_error_detail(&self.kick) },
                KvmExit::FailEntry(reason, cpu) => VcpuExit::InternalError {
                    detail: format!("VM entry failed: hardware reason {reason:#x} on host cpu {cpu}"),
                },
                other => VcpuExit::Other { detail: format!("{other:?}") },
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Interrupted by a kick (or, rarely, spuriously): the caller rechecks
                // its own state and runs again.
                self.kick.consume();
                Ok(VcpuExit::ForcedExit)
            }
            Err(e) => Err(Error::backend("KVM_RUN", e)),
        }
    }

    fn register_summary(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cpl={}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr3, s.cs.dpl
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        }
    }

    fn force_exit(&self) -> ForceExit {
        ForceExit::new(self.kick.clone())
    }

    fn as_x86_64(&mut self) -> Option<&mut dyn X86Vcpu> {
        Some(self)
    }

    fn save_state(&mut self) -> Result<VcpuState> {
        let fd = &self.fd;
        let mut enc = Encoder::new(Kind::Vcpu);
        // Mp state first: KVM_GET_MP_STATE also flushes pending APIC events.
        let mp_state = fd.get_mp_state().map_err(|e| Error::backend("KVM_GET_MP_STATE", e))?;
        enc.pod(SEC_MP_STATE, &mp_state);
        enc.pod(SEC_REGS, &fd.get_regs().map_err(|e| Error::backend("KVM_GET_REGS", e))?);
        enc.pod(SEC_SREGS, &fd.get_sregs().map_err(|e| Error::backend("KVM_GET_SREGS", e))?);
        enc.pod(SEC_FPU, &FpuBytes::from(&fd.get_fpu().map_err(|e| Error::backend("KVM_GET_FPU", e))?));
        // XSAVE/XCRs only exist where the host and guest use XSAVE (not on kvm_pvm).
        if let Ok(xsave) = fd.get_xsave() {
            enc.pod(SEC_XSAVE, &xsave);
        }
        if let Ok(xcrs) = fd.get_xcrs() {
            enc.pod(SEC_XCRS, &xcrs);
        }
        enc.pod(SEC_DEBUGREGS, &fd.get_debug_regs().map_err(|e| Error::backend("KVM_GET_DEBUGREGS", e))?);
        enc.pod(SEC_LAPIC, &fd.get_lapic().map_err(|e| Error::backend("KVM_GET_LAPIC", e))?);
        let msrs = msr::get_msrs(fd, &self.msr_indices)?;
        let mut msr_bytes = Vec::with_capacity(msrs.len() * 16);
        for m in &msrs {
            msr_bytes.extend_from_slice(crate::codec::pod_bytes(m));
        }
        enc.section(SEC_MSRS, &msr_bytes);
        enc.pod(SEC_EVENTS, &fd.get_vcpu_events().map_err(|e| Error::backend("KVM_GET_VCPU_EVENTS", e))?);
        Ok(VcpuState(enc.finish()))
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        let dec = Decoded::parse(&state.0, Kind::Vcpu)?;
        // Decode everything before touching the vCPU, so a bad blob changes nothing.
        let mp_state = pod_read(dec.require(SEC_MP_STATE, "mp_state")?, "mp_state")?;
        let regs = pod_read(dec.require(SEC_REGS, "regs")?, "regs")?;
        let sregs = pod_read(dec.require(SEC_SREGS, "sregs")?, "sregs")?;
        let fpu: kvm_fpu = pod_read::<FpuBytes>(dec.require(SEC_FPU, "fpu")?, "fpu")?.into();
        let xsave = dec.get(SEC_XSAVE).map(|b| pod_read::<kvm_bindings::kvm_xsave>(b, "xsave")).transpose()?;
        let xcrs = dec.get(SEC_XCRS).map(|b| pod_read(b, "xcrs")).transpose()?;
        let debugregs = pod_read(dec.require(SEC_DEBUGREGS, "debugregs")?, "debugregs")?;
        let lapic = pod_read(dec.require(SEC_LAPIC, "lapic")?, "lapic")?;
        let msr_bytes = dec.require(SEC_MSRS, "msrs")?;
        let entry_size = std::mem::size_of::<kvm_msr_entry>();
        if msr_bytes.len() % entry_size != 0 {
            return Err(Error::InvalidState(format!(
                "msrs section length {} is not a multiple of {entry_size}",
                msr_bytes.len()
            )));
        }
        let msrs: Vec<kvm_msr_entry> =
            msr_bytes.chunks(entry_size).map(|c| pod_read(c, "msr entry")).collect::<Result<_>>()?;
        let events = pod_read(dec.require(SEC_EVENTS, "vcpu events")?, "vcpu events")?;

        let fd = &self.fd;
        fd.set_mp_state(mp_state).map_err(|e| Error::backend("KVM_SET_MP_STATE", e))?;
        fd.set_regs(&regs).map_err(|e| Error::backend("KVM_SET_REGS", e))?;
        fd.set_sregs(&sregs).map_err(|e| Error::backend("KVM_SET_SREGS", e))?;
        fd.set_fpu(&fpu).map_err(|e| Error::backend("KVM_SET_FPU", e))?;
        if let Some(xsave) = xsave {
            // SAFETY: the buffer is a full kvm_xsave as returned by KVM_GET_XSAVE of the
            // same layout (size checked by pod_read).
            unsafe { fd.set_xsave(&xsave) }.map_err(|e| Error::backend("KVM_SET_XSAVE", e))?;
        }
        if let Some(xcrs) = xcrs {
            fd.set_xcrs(&xcrs).map_err(|e| Error::backend("KVM_SET_XCRS", e))?;
        }
        fd.set_debug_regs(&debugregs).map_err(|e| Error::backend("KVM_SET_DEBUGREGS", e))?;
        fd.set_lapic(&lapic).map_err(|e| Error::backend("KVM_SET_LAPIC", e))?;
        msr::set_msrs(fd, &msrs)?;
        fd.set_vcpu_events(&events).map_err(|e| Error::backend("KVM_SET_VCPU_EVENTS", e))?;
        Ok(())
    }
}

impl X86Vcpu for KvmVcpu {
    fn setup_long_mode(&mut self, boot: &LongModeBoot) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(|e| Error::backend("KVM_GET_SREGS", e))?;
        let (cs, ds) = if boot.user_mode {
            (segment(x86::USER_CS, 0xb, 3, true, false), segment(x86::USER_DS, 0x3, 3, false, false))
        } else {
            (segment(x86::KERNEL_CS, 0xb, 0, true, false), segment(x86::KERNEL_DS, 0x3, 0, false, false))
        };
        sregs.cs = cs;
        sregs.ds = ds;
        sregs.es = ds;
        sregs.fs = ds;
        sregs.gs = ds;
        sregs.ss = ds;
        sregs.tr = segment(x86::TSS_SEL, 0xb, 0, false, true);
        sregs.gdt.base = boot.gdt_addr;
        sregs.gdt.limit = (std::mem::size_of_val(&x86::BOOT_GDT) - 1) as u16;
        sregs.idt.base = boot.idt_addr;
        sregs.idt.limit = 7;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
        sregs.cr3 = boot.pml4;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.efer |= EFER_LME | EFER_LMA;
        self.fd.set_sregs(&sregs).map_err(|e| Error::backend("KVM_SET_SREGS", e))?;

        let regs = kvm_bindings::kvm_regs {
            rip: boot.rip,
            rsp: boot.rsp,
            rbp: boot.rsp,
            rsi: boot.rsi,
            rflags: boot.rflags | 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(|e| Error::backend("KVM_SET_REGS", e))?;

        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(|e| Error::backend("KVM_SET_FPU", e))?;
        msr::set_msrs(&self.fd, &msr::boot_msrs())?;
        // Application processors start out waiting for INIT/SIPI; one entered
        // directly in long mode must be runnable.
        let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        self.fd.set_mp_state(runnable).map_err(|e| Error::backend("KVM_SET_MP_STATE", e))
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.kick.unbind();
    }
}
