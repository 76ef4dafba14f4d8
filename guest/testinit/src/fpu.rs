//! The `fpu` action: does the guest kernel preserve user-mode vector registers
//! across context switches? This tells the guest kernel's FPU handling apart
//! from anything on the host's data path (vsock, agent).
//!
//! A forked child spins clobbering every vector register (PXOR, and with AVX
//! state enabled VPXOR + VZEROUPPER) and yielding; PID 1 loads a pattern into
//! XMM0-15 (and, when XCR0 enables AVX state, YMM0-15), yields to the child,
//! reads the registers back and counts the rounds where any differs. Every
//! load -> yield -> store sequence is one `asm!` block, so nothing of ours runs
//! between the load and the check.

use core::arch::asm;

use crate::{syscall4, Line};

const SYS_SCHED_YIELD: usize = 24;
const SYS_FORK: usize = 57;
const SYS_WAIT4: usize = 61;
const SYS_KILL: usize = 62;
const SIGKILL: usize = 9;

/// Rounds of load -> yield -> check (each yield switches to the child).
const ROUNDS: u64 = 400;

/// 16 registers x 32 bytes.
#[repr(C, align(32))]
struct Regs([u8; 512]);

/// XCR0 if CPUID says the OS enabled XSAVE (CPUID.1:ECX.OSXSAVE), else None.
fn xcr0() -> Option<u64> {
    // SAFETY: CPUID leaf 1 exists on every x86_64 CPU; rbx is preserved by hand
    // because LLVM reserves it.
    let ecx: u32 = unsafe {
        let ecx;
        asm!("mov {t}, rbx", "cpuid", "mov rbx, {t}", t = out(reg) _,
             inout("eax") 1u32 => _, inout("ecx") 0u32 => ecx, out("edx") _, options(nostack));
        ecx
    };
    if ecx & (1 << 27) == 0 {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV(0) is valid whenever CPUID.OSXSAVE is set (checked above).
    unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nostack, nomem)) };
    Some(u64::from(hi) << 32 | u64::from(lo))
}

fn pattern(round: u64) -> Regs {
    let mut r = Regs([0; 512]);
    let mut x = round.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in r.0.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8 | 1; // never zero: a zeroed register always shows
    }
    r
}

/// One round on XMM0-15: load `src`, yield, store into `dst`.
fn round_xmm(src: &Regs, dst: &mut Regs) {
    // SAFETY: `src`/`dst` are 512-byte buffers (only the first 256 are touched
    // with 16-byte moves); the syscall clobbers rax/rcx/r11 (declared); every
    // vector register is declared clobbered.
    unsafe {
        asm!(
            "movdqu xmm0, [{s}]", "movdqu xmm1, [{s}+32]", "movdqu xmm2, [{s}+64]", "movdqu xmm3, [{s}+96]",
            "movdqu xmm4, [{s}+128]", "movdqu xmm5, [{s}+160]", "movdqu xmm6, [{s}+192]", "movdqu xmm7, [{s}+224]",
            "movdqu xmm8, [{s}+256]", "movdqu xmm9, [{s}+288]", "movdqu xmm10, [{s}+320]", "movdqu xmm11, [{s}+352]",
            "movdqu xmm12, [{s}+384]", "movdqu xmm13, [{s}+416]", "movdqu xmm14, [{s}+448]", "movdqu xmm15, [{s}+480]",
            "mov eax, {nr}",
            "syscall",
            "movdqu [{d}], xmm0", "movdqu [{d}+32], xmm1", "movdqu [{d}+64], xmm2", "movdqu [{d}+96], xmm3",
            "movdqu [{d}+128], xmm4", "movdqu [{d}+160], xmm5", "movdqu [{d}+192], xmm6", "movdqu [{d}+224], xmm7",
            "movdqu [{d}+256], xmm8", "movdqu [{d}+288], xmm9", "movdqu [{d}+320], xmm10", "movdqu [{d}+352], xmm11",
            "movdqu [{d}+384], xmm12", "movdqu [{d}+416], xmm13", "movdqu [{d}+448], xmm14", "movdqu [{d}+480], xmm15",
            s = in(reg) src.0.as_ptr(), d = in(reg) dst.0.as_mut_ptr(), nr = const SYS_SCHED_YIELD,
            out("rax") _, out("rcx") _, out("r11") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack),
        );
    }
}

/// One round on YMM0-15 (only called when XCR0 enables AVX state).
fn round_ymm(src: &Regs, dst: &mut Regs) {
    // SAFETY: as in `round_xmm`, with 32-byte moves over the whole buffers; the
    // caller checked that XCR0 enables SSE and AVX state, so VEX moves are valid.
    unsafe {
        asm!(
            "vmovdqu ymm0, [{s}]", "vmovdqu ymm1, [{s}+32]", "vmovdqu ymm2, [{s}+64]", "vmovdqu ymm3, [{s}+96]",
            "vmovdqu ymm4, [{s}+128]", "vmovdqu ymm5, [{s}+160]", "vmovdqu ymm6, [{s}+192]", "vmovdqu ymm7, [{s}+224]",
            "vmovdqu ymm8, [{s}+256]", "vmovdqu ymm9, [{s}+288]", "vmovdqu ymm10, [{s}+320]", "vmovdqu ymm11, [{s}+352]",
            "vmovdqu ymm12, [{s}+384]", "vmovdqu ymm13, [{s}+416]", "vmovdqu ymm14, [{s}+448]", "vmovdqu ymm15, [{s}+480]",
            "mov eax, {nr}",
            "syscall",
            "vmovdqu [{d}], ymm0", "vmovdqu [{d}+32], ymm1", "vmovdqu [{d}+64], ymm2", "vmovdqu [{d}+96], ymm3",
            "vmovdqu [{d}+128], ymm4", "vmovdqu [{d}+160], ymm5", "vmovdqu [{d}+192], ymm6", "vmovdqu [{d}+224], ymm7",
            "vmovdqu [{d}+256], ymm8", "vmovdqu [{d}+288], ymm9", "vmovdqu [{d}+320], ymm10", "vmovdqu [{d}+352], ymm11",
            "vmovdqu [{d}+384], ymm12", "vmovdqu [{d}+416], ymm13", "vmovdqu [{d}+448], ymm14", "vmovdqu [{d}+480], ymm15",
            "vzeroupper",
            s = in(reg) src.0.as_ptr(), d = in(reg) dst.0.as_mut_ptr(), nr = const SYS_SCHED_YIELD,
            out("rax") _, out("rcx") _, out("r11") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack),
        );
    }
}

/// The child: clobber every vector register, yield, forever.
fn clobber_forever(avx: bool) -> ! {
    loop {
        // SAFETY: register-only instructions (VEX ones only when XCR0 enables
        // AVX state) and a sched_yield syscall; clobbers are declared.
        unsafe {
            if avx {
                asm!("vpxor ymm0, ymm0, ymm0", "vpxor ymm8, ymm8, ymm8", "vpxor ymm15, ymm15, ymm15", "vzeroupper",
                     out("xmm0") _, out("xmm8") _, out("xmm15") _, options(nostack, nomem));
            }
            asm!("pxor xmm0, xmm0", "pxor xmm7, xmm7", "pxor xmm8, xmm8", "pxor xmm15, xmm15",
                 out("xmm0") _, out("xmm7") _, out("xmm8") _, out("xmm15") _, options(nostack, nomem));
            syscall4(SYS_SCHED_YIELD, 0, 0, 0, 0);
        }
    }
}

fn count_lost(round: fn(&Regs, &mut Regs), width: usize) -> u64 {
    let mut lost = 0;
    let mut out = Regs([0; 512]);
    for n in 0..ROUNDS {
        let src = pattern(n);
        round(&src, &mut out);
        let differs = (0..16).any(|r| src.0[r * 32..r * 32 + width] != out.0[r * 32..r * 32 + width]);
        lost += u64::from(differs);
    }
    lost
}

/// Runs the probe and prints `SM_FPU rounds=N xmm_lost=A xcr0=0x.. ymm_lost=B`
/// (`xcr0=none` without OSXSAVE, `ymm_lost=na` when AVX state is not enabled).
pub fn probe() {
    let xcr0 = xcr0();
    let avx = xcr0.is_some_and(|x| x & 0b110 == 0b110);
    // SAFETY: fork takes no arguments; the child only runs `clobber_forever`.
    let child = unsafe { syscall4(SYS_FORK, 0, 0, 0, 0) };
    if child == 0 {
        clobber_forever(avx);
    }
    let xmm_lost = count_lost(round_xmm, 16);
    let ymm_lost = avx.then(|| count_lost(round_ymm, 32));
    if child > 0 {
        // SAFETY: kill/wait4 on our own child; a NULL status pointer is allowed.
        unsafe {
            syscall4(SYS_KILL, child as usize, SIGKILL, 0, 0);
            syscall4(SYS_WAIT4, child as usize, 0, 0, 0);
        }
    }
    let mut line = Line::new();
    line.push(b"SM_FPU rounds=").push_num(ROUNDS).push(b" forked=").push_num(u64::from(child > 0));
    line.push(b" xmm_lost=").push_num(xmm_lost).push(b" xcr0=");
    match xcr0 {
        Some(x) => line.push(b"0x").push_hex(x),
        None => line.push(b"none"),
    };
    line.push(b" ymm_lost=");
    match ymm_lost {
        Some(n) => line.push_num(n),
        None => line.push(b"na"),
    };
    line.emit();
}
