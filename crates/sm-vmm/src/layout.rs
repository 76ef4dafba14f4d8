//! Guest-physical memory layout of an x86_64 supermachine VM.
//!
//! ```text
//! 0x0000_0500  GDT (BOOT_GDT, 6 entries) 0x0000_0540  IDT (empty)
//! 0x0000_7000  zero page (boot_params)   0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_e000  MP configuration table    0x0009_fc00  MP floating pointer
//! 0x0009_e000..0x0010_0000 reserved (not RAM in e820)
//! 0x0010_0000  high memory: kernel (ELF paddr, usually 16 MiB), initrd at the top
//! 0xc000_0000..0x1_0000_0000  MMIO gap (virtio-mmio windows from 0xd000_0000, IOAPIC, LAPIC, TSS)
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location.
pub const IDT_ADDR: u64 = 0x540;
/// Zero page (Linux `boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity-map page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// MP configuration table (the floating pointer points here).
pub const MPTABLE_ADDR: u64 = 0x9e000;
/// MP floating pointer: in the last KiB of base memory, where Linux scans for it.
pub const MP_FLOATING_ADDR: u64 = 0x9fc00;
/// End of usable low memory (start of the reserved MP area).
pub const LOW_RAM_END: u64 = MPTABLE_ADDR;
/// Start of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Highest address (exclusive) an initrd may end at (Linux `initrd_addr_max` default).
pub const INITRD_ADDR_MAX: u64 = 0x3800_0000;
/// First virtio-mmio window (4 KiB each, consecutive).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// First GSI for virtio devices (0-4 are the PIT, keyboard, cascade and COM ports).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// Device memory (virtio shared-memory regions such as a DAX window) starts at
/// the first 1 GiB boundary at or above both 4 GiB and the end of RAM.
pub fn device_memory_base(mem_size: u64) -> u64 {
    let ram_end = ram_ranges(mem_size).last().map_or(0, |(start, len)| start + len);
    ram_end.max(MMIO_GAP_END).next_multiple_of(DEVICE_MEMORY_ALIGN)
}

/// Alignment of each device memory region.
pub const DEVICE_MEMORY_ALIGN: u64 = 1 << 30;
/// Device memory ends below this guest-physical address (within the 39
/// address bits every x86-64 CPU has).
pub const DEVICE_MEMORY_END: u64 = 1 << 39;
/// Hypervisor memory slots of device memory start here (RAM uses the low ones).
pub const FIRST_DEVICE_MEMORY_SLOT: u32 = 64;

// The fixed low-memory areas must all sit below high memory.
const _: () = assert!(MP_FLOATING_ADDR + 16 <= HIMEM_START);

/// RAM ranges `(guest_addr, size)` for `mem_size` bytes of guest RAM: one range below
/// the MMIO gap and, if needed, one above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn device_memory_sits_above_ram_and_4_gib() {
        assert_eq!(device_memory_base(128 << 20), 4 << 30);
        assert_eq!(device_memory_base(4 << 30), 5 << 30);
        assert_eq!(device_memory_base((4 << 30) + (1 << 20)), 6 << 30);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (GDT_ADDR, 6 * 8),
            (IDT_ADDR, 8),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_ADDR, MP_FLOATING_ADDR - MPTABLE_ADDR),
            (MP_FLOATING_ADDR, 16),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
