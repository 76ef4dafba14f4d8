//! `sm-testinit`: the smallest useful PID 1 for supermachine boot tests.
//!
//! A freestanding static x86_64 Linux executable (no libc, no std, raw
//! syscalls). The kernel starts it as `/init` from the test initrd with the
//! command-line words after `--` as its arguments. It
//!
//! 1. makes sure fds 0/1/2 are the console (the initrd ships a `dev/console`
//!    node so the kernel opens it for us; if that failed it mounts devtmpfs
//!    on `/dev` and opens `/dev/console` itself),
//! 2. prints exactly one line `SM_INIT_READY cpus=<N>` (N = CPUs in its
//!    affinity mask, from `sched_getaffinity`),
//! 3. acts on its argument (the last of `reboot`/`panic`/`tick`/`halt` in
//!    argv: the kernel passes unknown bare parameters such as `noxsave`
//!    before the words after `--`):
//!    - `reboot` (also when absent or unknown): `reboot(RESTART)`; with
//!      `reboot=k` the kernel resets through the i8042, which the VMM treats
//!      as a clean exit;
//!    - `panic`: prints `SM_INIT_PANIC` and exits 1, so the kernel panics with
//!      "Attempted to kill init";
//!    - `tick`: prints `HELLO FROM GUEST`, then `TICK <n>` (n = 1, 2, ...) every 100 ms, forever;
//!    - `halt`: sleeps forever in `pause()`;
//!    - `fpu`: checks that user-mode vector registers survive context
//!      switches (see `fpu.rs`), prints `SM_FPU ...`, then reboots;
//!    - `hostile`: attacks the VMM through every device register and I/O
//!      port (see `hostile.rs`), then reboots.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

mod fpu;
mod hostile;

// Linux x86_64 syscall numbers.
const SYS_WRITE: usize = 1;
const SYS_OPEN: usize = 2;
const SYS_PAUSE: usize = 34;
const SYS_NANOSLEEP: usize = 35;
const SYS_DUP2: usize = 33;
const SYS_EXIT: usize = 60;
const SYS_FCNTL: usize = 72;
const SYS_MKDIR: usize = 83;
const SYS_REBOOT: usize = 169;
const SYS_MOUNT: usize = 165;
const SYS_SCHED_GETAFFINITY: usize = 204;

/// What `init` can be asked to do (see the module docs).
const ACTIONS: [&[u8]; 6] = [b"reboot", b"panic", b"tick", b"halt", b"fpu", b"hostile"];

const F_GETFD: usize = 1;
const O_RDWR: usize = 2;
const O_NOCTTY: usize = 0o400;

const LINUX_REBOOT_MAGIC1: usize = 0xfee1_dead;
const LINUX_REBOOT_MAGIC2: usize = 0x2812_1969; // 672274793
const LINUX_REBOOT_CMD_RESTART: usize = 0x0123_4567;

// Process entry. The kernel enters with RSP pointing at argc, followed by the
// argv pointers (NULL-terminated), envp, auxv. RSP is 16-byte aligned here, but
// align it anyway, then `call` so `init_main` sees the ABI's entry alignment
// (RSP % 16 == 8). RBP = 0 terminates frame-pointer walks.
global_asm!(
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "    xor ebp, ebp",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call {main}",
    "    ud2",
    main = sym init_main,
);

/// Raw 4-argument Linux syscall; returns the kernel's result (negative errno
/// on failure).
///
/// # Safety
/// The caller must pass arguments that are valid for syscall `nr` (pointers
/// to live, correctly sized memory).
#[inline(always)]
unsafe fn syscall4(nr: usize, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
    let ret: isize;
    // SAFETY: the `syscall` instruction only clobbers rcx and r11 (declared) and
    // rax (the result); memory effects are the caller's responsibility, per the
    // function contract.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Raw 5-argument Linux syscall (for `mount`).
///
/// # Safety
/// As for [`syscall4`].
#[inline(always)]
unsafe fn syscall5(nr: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize) -> isize {
    // SAFETY: the caller's contract; the sixth argument is unused by such calls.
    unsafe { syscall6(nr, a1, a2, a3, a4, a5, 0) }
}

/// Raw 6-argument Linux syscall (for `mmap`).
///
/// # Safety
/// As for [`syscall4`].
#[inline(always)]
unsafe fn syscall6(nr: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize, a6: usize) -> isize {
    let ret: isize;
    // SAFETY: as in `syscall4`; r8 and r9 carry the fifth and sixth arguments.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            in("r8") a5,
            in("r9") a6,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

fn exit(code: usize) -> ! {
    loop {
        // SAFETY: exit takes no pointers.
        unsafe { syscall4(SYS_EXIT, code, 0, 0, 0) };
    }
}

/// Writes all of `buf` to stdout (the console), ignoring errors: there is
/// nowhere else to report them.
fn write_all(mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice; the kernel reads at most `len` bytes.
        let n = unsafe { syscall4(SYS_WRITE, 1, buf.as_ptr() as usize, buf.len(), 0) };
        if n == -4 {
            continue; // EINTR
        }
        if n <= 0 {
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// A line buffer on the stack, so each line reaches the console in one write.
struct Line {
    buf: [u8; 128],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line { buf: [0; 128], len: 0 }
    }

    fn push(&mut self, s: &[u8]) -> &mut Self {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
        self
    }

    fn push_num(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    fn push_hex(&mut self, v: u64) -> &mut Self {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        let mut v = v;
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    fn emit(&mut self) {
        self.push(b"\n");
        write_all(&self.buf[..self.len]);
        self.len = 0;
    }
}

/// Mounts devtmpfs on /dev (making /dev first); failures (already there)
/// are ignored.
fn mount_dev() {
    // SAFETY: all strings are NUL-terminated literals that outlive the calls.
    unsafe {
        syscall4(SYS_MKDIR, c"/dev".as_ptr() as usize, 0o755, 0, 0);
        syscall5(
            SYS_MOUNT,
            c"devtmpfs".as_ptr() as usize,
            c"/dev".as_ptr() as usize,
            c"devtmpfs".as_ptr() as usize,
            0,
            0,
        );
    }
}

/// Makes fds 0, 1 and 2 the console if the kernel could not (no `/dev/console`
/// in the initrd): mounts devtmpfs on /dev and opens /dev/console.
fn ensure_console() {
    // SAFETY: fcntl(F_GETFD) takes no pointers.
    if unsafe { syscall4(SYS_FCNTL, 1, F_GETFD, 0, 0) } >= 0 {
        return;
    }
    mount_dev();
    // SAFETY: NUL-terminated literal path.
    let fd = unsafe { syscall4(SYS_OPEN, c"/dev/console".as_ptr() as usize, O_RDWR | O_NOCTTY, 0, 0) };
    if fd < 0 {
        return; // nothing more we can do; output is lost
    }
    for target in 0..3usize {
        if fd as usize != target {
            // SAFETY: dup2 takes no pointers.
            unsafe { syscall4(SYS_DUP2, fd as usize, target, 0, 0) };
        }
    }
}

/// Number of CPUs this process may run on (bits set in its affinity mask).
fn cpu_count() -> u64 {
    let mut mask = [0u64; 16]; // 1024 CPUs
                               // SAFETY: `mask` is writable for `size_of_val(&mask)` bytes; the kernel
                               // writes at most that many and returns how many it wrote.
    let n = unsafe { syscall4(SYS_SCHED_GETAFFINITY, 0, core::mem::size_of_val(&mask), mask.as_mut_ptr() as usize, 0) };
    if n <= 0 {
        return 0;
    }
    let words = (n as usize).div_ceil(8).min(mask.len());
    mask[..words].iter().map(|w| u64::from(w.count_ones())).sum()
}

fn sleep_100ms() {
    let req: [i64; 2] = [0, 100_000_000]; // struct timespec { tv_sec, tv_nsec }
                                          // SAFETY: `req` is a valid timespec; rem = NULL is allowed.
    unsafe { syscall4(SYS_NANOSLEEP, req.as_ptr() as usize, 0, 0, 0) };
}

/// The C string at `p` as a byte slice (without the NUL).
///
/// # Safety
/// `p` must point to a NUL-terminated string that lives for `'a`.
unsafe fn cstr<'a>(p: *const u8) -> &'a [u8] {
    // SAFETY: NUL-terminated per the caller's contract.
    let len = unsafe { strlen(p) };
    // SAFETY: the `len` bytes before the NUL are readable and live for `'a`.
    unsafe { core::slice::from_raw_parts(p, len) }
}

/// Rust-side entry, called from `_start` with a pointer to the initial stack.
extern "C" fn init_main(sp: *const usize) -> ! {
    // SAFETY: the kernel's initial stack layout is argc, argv[0..argc], NULL,
    // envp..., so `sp` points to argc and argv follows it; argv strings are
    // NUL-terminated and live for the whole process.
    let (argc, argv) = unsafe { (*sp, sp.add(1) as *const *const u8) };
    // The words after `--` come last in argv, but the kernel puts unknown bare
    // parameters before them (e.g. `noxsave` is parsed outside the __setup
    // table, so init sees argv = [/init, noxsave, <action>]). So take the last
    // recognised word.
    let mut action: &[u8] = b"reboot";
    for i in 1..argc {
        // SAFETY: i < argc, so argv[i] is a valid NUL-terminated string.
        let arg = unsafe { cstr(*argv.add(i)) };
        if ACTIONS.contains(&arg) {
            action = arg;
        }
    }

    ensure_console();
    Line::new().push(b"SM_INIT_READY cpus=").push_num(cpu_count()).emit();

    match action {
        b"panic" => {
            Line::new().push(b"SM_INIT_PANIC").emit();
            exit(1);
        }
        b"tick" => {
            // The marker the peer VMMs' snapshot drivers (shared/anchors) wait for.
            Line::new().push(b"HELLO FROM GUEST").emit();
            let mut n: u64 = 0;
            loop {
                sleep_100ms();
                n += 1;
                Line::new().push(b"TICK ").push_num(n).emit();
            }
        }
        b"fpu" => {
            fpu::probe();
            reboot()
        }
        b"hostile" => {
            hostile::attack();
            reboot()
        }
        b"halt" => loop {
            // SAFETY: pause takes no arguments; it returns only after a
            // caught signal, and PID 1 has no handlers, so it blocks forever.
            unsafe { syscall4(SYS_PAUSE, 0, 0, 0, 0) };
        },
        // `reboot`, also the default.
        _ => reboot(),
    }
}

/// `reboot(RESTART)`: with `reboot=k` the VMM sees a clean exit.
fn reboot() -> ! {
    // SAFETY: reboot(RESTART) takes no pointer (arg is unused).
    unsafe { syscall4(SYS_REBOOT, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0) };
    exit(2); // reboot failed: let the kernel panic visibly
}

// Freestanding builds have no libc, but LLVM emits calls to these for copies,
// fills, comparisons and recognised loops. They are written with
// `rep movsb/stosb` and volatile reads so LLVM cannot turn their bodies back
// into calls to themselves. All are tiny and only used on small buffers.

/// # Safety
/// C `memcpy` contract: `n` bytes readable at `src`, writable at `dst`, no overlap.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees both ranges are valid for `n` bytes; rep movsb
    // with DF=0 (ABI guarantee) copies forward exactly `n` bytes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
             inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memmove` contract: `n` bytes readable at `src` and writable at `dst`.
#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dst is below src or the
        // ranges do not overlap; validity is the caller's contract.
        return unsafe { memcpy(dst, src, n) };
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        // SAFETY: i < n, within both ranges; copying backwards handles the
        // overlap with dst above src. Volatile keeps LLVM from emitting memmove.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
    dst
}

/// # Safety
/// C `memset` contract: `n` bytes writable at `dst`.
#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees `n` writable bytes at `dst`; rep stosb stores
    // `al` forward `n` times.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
             in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memcmp` contract: `n` bytes readable at `a` and `b`.
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, within both ranges (caller's contract).
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As for [`memcmp`].
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// `s` must point to a NUL-terminated string.
#[no_mangle]
unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: every byte up to and including the NUL is readable (contract).
    while unsafe { s.add(n).read_volatile() } != 0 {
        n += 1;
    }
    n
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(101)
}
