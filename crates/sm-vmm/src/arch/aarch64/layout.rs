//! Guest-physical memory map of an aarch64 supermachine VM (the shape of
//! QEMU's `virt` board, which Linux knows well):
//!
//! ```text
//! 0x0800_0000  GICv3 distributor (64 KiB)
//! 0x080a_0000  GICv3 redistributors (128 KiB per vCPU)
//! 0x0900_0000  16550 UART (ns16550a, MMIO)
//! 0x0a00_0000  virtio-mmio windows (0x200 each)
//! 0x4000_0000  RAM: kernel at the start (2 MiB aligned + text_offset),
//!              initrd after it, the device tree in the last 2 MiB
//! ```

/// GICv3 distributor.
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
/// Its size.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// First GICv3 redistributor (one frame pair per vCPU).
pub const GIC_REDIST_BASE: u64 = 0x080a_0000;
/// Redistributor size per vCPU (RD + SGI frames).
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
/// The 16550 UART (the console).
pub const UART_BASE: u64 = 0x0900_0000;
/// Its window.
pub const UART_SIZE: u64 = 0x1000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// Start of RAM.
pub const RAM_BASE: u64 = 0x4000_0000;
/// First shared peripheral interrupt (GIC INTID 32) lines are numbered from.
pub const SPI_BASE: u32 = 32;
/// The UART's SPI (line number relative to [`SPI_BASE`]).
pub const UART_SPI: u32 = 1;
/// virtio-mmio device `i` uses SPI `VIRTIO_SPI_BASE + i`.
pub const VIRTIO_SPI_BASE: u32 = 16;
/// The arm64 boot protocol's limit on a device tree.
pub const FDT_MAX_SIZE: u64 = 2 << 20;
/// Most vCPUs the redistributor region is laid out for (before the UART).
pub const MAX_VCPUS: u32 = ((UART_BASE - GIC_REDIST_BASE) / GIC_REDIST_SIZE_PER_CPU) as u32;

// The regions do not overlap (64 virtio windows before RAM).
const _: () = {
    assert!(GIC_DIST_BASE + GIC_DIST_SIZE <= GIC_REDIST_BASE);
    assert!(GIC_REDIST_BASE + MAX_VCPUS as u64 * GIC_REDIST_SIZE_PER_CPU <= UART_BASE);
    assert!(UART_BASE + UART_SIZE <= VIRTIO_MMIO_BASE);
    assert!(VIRTIO_MMIO_BASE + 64 * VIRTIO_MMIO_SIZE <= RAM_BASE);
};

/// Where the device tree goes: the last 2 MiB of RAM (2 MiB aligned, so it
/// never crosses a 2 MiB boundary).
pub fn fdt_addr(ram_size: u64) -> u64 {
    (RAM_BASE + ram_size).saturating_sub(FDT_MAX_SIZE) & !(FDT_MAX_SIZE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_do_not_overlap_and_the_fdt_sits_in_the_last_2_mib() {
        // The regions' order is checked at compile time (below the constants).
        assert_eq!(MAX_VCPUS, 123);
        assert_eq!(fdt_addr(256 << 20), RAM_BASE + (254 << 20));
        assert_eq!(fdt_addr((256 << 20) + 4096) % FDT_MAX_SIZE, 0, "2 MiB aligned");
    }
}
