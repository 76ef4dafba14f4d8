//! `hostile`: a guest that attacks its VMM through every device register it
//! can reach, as a subverted guest kernel could.
//!
//! 1. Maps the virtio-mmio windows (`/dev/mem` at 0xd000_0000, 32 windows of
//!    4 KiB: the devices the VMM placed there and empty ones) and, for
//!    [`ROUNDS`] rounds, writes random values of every width to every
//!    register and the config space, reads them back, and drives the
//!    transport through random status, queue-select, queue-address,
//!    queue-ready and queue-notify values — so the devices are activated on
//!    garbage rings and walk whatever descriptor chains random guest memory
//!    holds. Prints `HOSTILE MMIO round <n>` as it goes.
//! 2. Takes I/O privilege (`iopl(3)`) and writes random bytes, words and
//!    longs to every I/O port (serial, PIC, PIT, i8042, CMOS, PCI config,
//!    ...), reading each back: the i8042's reset is likely among them, so the
//!    VM may end here.
//! 3. Prints `HOSTILE DONE` and reboots.
//!
//! It prints `HOSTILE START` first, then `HOSTILE MAGIC <hex>` (the first
//! window's MagicValue register as read through the mapping), or
//! `HOSTILE NO-DEVMEM <errno>` if `/dev/mem` cannot be opened or mapped
//! (then only the ports are tried); `HOSTILE NO-IOPL <errno>` if port I/O is
//! refused.

use core::arch::asm;

use crate::{syscall4, syscall6, Line, SYS_OPEN};

const SYS_MMAP: usize = 9;
const SYS_IOPL: usize = 172;

/// Where the VMM places virtio-mmio windows, and how many are attacked.
const MMIO_BASE: usize = 0xd000_0000;
const WINDOW: usize = 0x1000;
const WINDOWS: usize = 32;
/// Rounds over all windows.
const ROUNDS: u64 = 8;

/// xorshift64*, seeded from the TSC: a different attack each boot.
struct Random(u64);

impl Random {
    fn new() -> Random {
        let (lo, hi): (u32, u32);
        // SAFETY: rdtsc reads the time-stamp counter into edx:eax; nothing else.
        unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        Random((u64::from(hi) << 32 | u64::from(lo)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs the attack; returns when done (the caller reboots).
pub fn attack() {
    Line::new().push(b"HOSTILE START").emit();
    let mut rng = Random::new();
    match map_mmio() {
        Ok(base) => {
            // The first window's MagicValue ("virt"): the mapping reaches the
            // VMM's device registers, not something else.
            // SAFETY: `base` maps at least one window of device registers.
            let magic = unsafe { core::ptr::read_volatile(base as *const u32) };
            Line::new().push(b"HOSTILE MAGIC ").push_hex(u64::from(magic)).emit();
            for round in 1..=ROUNDS {
                for window in 0..WINDOWS {
                    // SAFETY: `base` maps WINDOWS * WINDOW bytes of device
                    // registers; every access below stays inside window `window`.
                    unsafe { attack_window(base + window * WINDOW, &mut rng) };
                }
                Line::new().push(b"HOSTILE MMIO round ").push_num(round).emit();
            }
        }
        Err(errno) => {
            Line::new().push(b"HOSTILE NO-DEVMEM ").push_num(errno as u64).emit();
        }
    }
    attack_ports(&mut rng);
    Line::new().push(b"HOSTILE DONE").emit();
}

/// Maps the MMIO windows through /dev/mem (devtmpfs mounted on /dev first).
fn map_mmio() -> Result<usize, isize> {
    crate::mount_dev();
    const O_RDWR_SYNC: usize = 2 | 0o4_010_000;
    // SAFETY: NUL-terminated literal path.
    let fd = unsafe { syscall4(SYS_OPEN, c"/dev/mem".as_ptr() as usize, O_RDWR_SYNC, 0, 0) };
    if fd < 0 {
        return Err(-fd);
    }
    const PROT_RW: usize = 3;
    const MAP_SHARED: usize = 1;
    // SAFETY: a new shared mapping of the device at a kernel-chosen address;
    // no memory of ours is passed.
    let addr = unsafe { syscall6(SYS_MMAP, 0, WINDOWS * WINDOW, PROT_RW, MAP_SHARED, fd as usize, MMIO_BASE) };
    if addr < 0 {
        return Err(-addr);
    }
    Ok(addr as usize)
}

/// Random accesses to one virtio-mmio window at `w`.
///
/// # Safety
/// `w .. w + WINDOW` must be mapped device memory.
unsafe fn attack_window(w: usize, rng: &mut Random) {
    // Register offsets of the virtio-mmio transport (version 2).
    const STATUS: usize = 0x70;
    const QUEUE_SEL: usize = 0x30;
    const QUEUE_NUM: usize = 0x38;
    const QUEUE_READY: usize = 0x44;
    const QUEUE_NOTIFY: usize = 0x50;
    const QUEUE_ADDRS: [usize; 6] = [0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4];
    // SAFETY: every access below is at an offset below 0x200 < WINDOW of
    // `w`, which the caller guarantees is mapped device memory.
    unsafe {
        // Every register and the first config bytes, every width.
        let mut off = 0;
        while off < 0x200 {
            let v = rng.next();
            match v % 4 {
                0 => core::ptr::write_volatile((w + off) as *mut u8, v as u8),
                1 => core::ptr::write_volatile((w + (off & !1)) as *mut u16, v as u16),
                2 => core::ptr::write_volatile((w + (off & !3)) as *mut u32, v as u32),
                _ => core::ptr::write_volatile((w + (off & !7)) as *mut u64, v),
            }
            let _ = core::ptr::read_volatile((w + (off & !3)) as *const u32);
            off += 1 + (rng.next() % 8) as usize;
        }
        // Drive the transport: a ring on garbage addresses, ready, notified.
        for _ in 0..4 {
            let queue = (rng.next() % 4) as u32;
            core::ptr::write_volatile((w + QUEUE_SEL) as *mut u32, queue);
            core::ptr::write_volatile((w + QUEUE_NUM) as *mut u32, 1 << (rng.next() % 9));
            for reg in QUEUE_ADDRS {
                // Guest RAM is below 128 MiB here; a third of the addresses
                // are anywhere at all.
                let addr =
                    if rng.next().is_multiple_of(3) { rng.next() as u32 } else { (rng.next() % (128 << 20)) as u32 };
                core::ptr::write_volatile((w + reg) as *mut u32, addr);
            }
            core::ptr::write_volatile((w + QUEUE_READY) as *mut u32, 1);
            core::ptr::write_volatile((w + STATUS) as *mut u32, 0xf);
            for _ in 0..8 {
                core::ptr::write_volatile((w + QUEUE_NOTIFY) as *mut u32, (rng.next() % 5) as u32);
            }
            core::ptr::write_volatile((w + STATUS) as *mut u32, rng.next() as u32);
        }
    }
}

/// Random writes (and reads) of every width to every I/O port.
fn attack_ports(rng: &mut Random) {
    // SAFETY: iopl takes no pointers.
    let rc = unsafe { syscall4(SYS_IOPL, 3, 0, 0, 0) };
    if rc < 0 {
        Line::new().push(b"HOSTILE NO-IOPL ").push_num((-rc) as u64).emit();
        return;
    }
    Line::new().push(b"HOSTILE PORTS").emit();
    for port in 0..=u16::MAX {
        let v = rng.next();
        // SAFETY: port I/O has no memory effects on this process; iopl(3)
        // allows it. What it does to the VM is the point.
        unsafe {
            match v % 3 {
                0 => asm!("out dx, al", in("dx") port, in("al") v as u8, options(nomem, nostack)),
                1 => asm!("out dx, ax", in("dx") port, in("ax") v as u16, options(nomem, nostack)),
                _ => asm!("out dx, eax", in("dx") port, in("eax") v as u32, options(nomem, nostack)),
            }
            let _read: u8;
            asm!("in al, dx", in("dx") port, out("al") _read, options(nomem, nostack));
        }
        if port % 0x4000 == 0x3fff {
            Line::new().push(b"HOSTILE PORTS up to 0x").push_hex(u64::from(port)).emit();
        }
    }
}
