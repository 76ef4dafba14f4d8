//! The flattened device tree an aarch64 Linux guest boots from: CPUs
//! started through PSCI (HVC), the RAM, a GICv3, the Arm generic timer, a
//! 16550 UART as console, the virtio-mmio devices, and `/chosen` with the
//! command line and initrd (Documentation/devicetree/bindings/...).

use vm_fdt::FdtWriter;

use super::layout::{
    FDT_MAX_SIZE, GIC_DIST_BASE, GIC_DIST_SIZE, GIC_REDIST_BASE, GIC_REDIST_SIZE_PER_CPU, UART_BASE, UART_SIZE,
};
use super::BootError;

/// The GIC's phandle (every interrupt names its parent by it).
const GIC_PHANDLE: u32 = 1;
/// Interrupt specifier cells: type, number, flags.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// The generic timer's PPIs: secure physical, non-secure physical, virtual,
/// hypervisor (INTIDs 29, 30, 27, 26).
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The UART's input clock (a PC's 16550: 1.8432 MHz).
const UART_CLOCK_HZ: u32 = 1_843_200;

/// A virtio-mmio device in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioNode {
    /// Its window's guest-physical base.
    pub base: u64,
    /// The window's size.
    pub size: u64,
    /// Its SPI line (relative to the first SPI).
    pub spi: u32,
}

/// What the tree describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdtConfig {
    /// Each vCPU's MPIDR affinity, boot vCPU first.
    pub cpu_mpidrs: Vec<u64>,
    /// RAM: guest-physical base and size.
    pub memory: (u64, u64),
    /// The kernel command line.
    pub cmdline: String,
    /// The initrd's guest-physical start and end, if there is one.
    pub initrd: Option<(u64, u64)>,
    /// The UART's SPI line (relative to the first SPI).
    pub uart_spi: u32,
    /// virtio-mmio devices.
    pub virtio: Vec<VirtioMmioNode>,
}

/// The device tree blob for `config` (at most 2 MiB).
pub fn build(config: &FdtConfig) -> Result<Vec<u8>, BootError> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for mpidr in &config.cpu_mpidrs {
        let cpu = fdt.begin_node(&format!("cpu@{mpidr:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", *mpidr)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list("compatible", vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()])?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let (ram_base, ram_size) = config.memory;
    let memory = fdt.begin_node(&format!("memory@{ram_base:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[ram_base, ram_size])?;
    fdt.end_node(memory)?;

    let redist_size = GIC_REDIST_SIZE_PER_CPU * config.cpu_mpidrs.len() as u64;
    let gic = fdt.begin_node(&format!("intc@{GIC_DIST_BASE:x}"))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_array_u64("reg", &[GIC_DIST_BASE, GIC_DIST_SIZE, GIC_REDIST_BASE, redist_size])?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.end_node(gic)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let cells: Vec<u32> = TIMER_PPIS.iter().flat_map(|ppi| [GIC_PPI, *ppi, IRQ_TYPE_LEVEL_HIGH]).collect();
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.end_node(timer)?;

    let uart_name = format!("serial@{UART_BASE:x}");
    let uart = fdt.begin_node(&uart_name)?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[UART_BASE, UART_SIZE])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, config.uart_spi, IRQ_TYPE_LEVEL_HIGH])?;
    fdt.property_u32("clock-frequency", UART_CLOCK_HZ)?;
    fdt.end_node(uart)?;

    for dev in &config.virtio {
        let node = fdt.begin_node(&format!("virtio_mmio@{:x}", dev.base))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[dev.base, dev.size])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, dev.spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", &config.cmdline)?;
    fdt.property_string("stdout-path", &format!("/{uart_name}"))?;
    if let Some((start, end)) = config.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    fdt.end_node(chosen)?;
    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(BootError::FdtTooLarge(blob.len()));
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::super::layout::{RAM_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
    use super::*;

    fn config() -> FdtConfig {
        FdtConfig {
            cpu_mpidrs: vec![0, 1],
            memory: (RAM_BASE, 256 << 20),
            cmdline: "console=ttyS0 earlycon=uart8250,mmio,0x9000000 quiet".into(),
            initrd: Some((0x4400_0000, 0x4410_0000)),
            uart_spi: 1,
            virtio: (0..2)
                .map(|i| VirtioMmioNode {
                    base: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE,
                    size: VIRTIO_MMIO_SIZE,
                    spi: 16 + i as u32,
                })
                .collect(),
        }
    }

    #[test]
    fn the_blob_has_the_fdt_header_and_is_bounded() {
        let blob = build(&config()).unwrap();
        assert_eq!(blob[..4], 0xd00d_feedu32.to_be_bytes(), "FDT magic");
        let total = u32::from_be_bytes(blob[4..8].try_into().unwrap()) as usize;
        assert_eq!(total, blob.len(), "totalsize covers the blob");
        let many = FdtConfig { cmdline: "x".repeat(3 << 20), ..config() };
        assert!(matches!(build(&many), Err(BootError::FdtTooLarge(_))));
    }

    /// Decompiled by the real device tree compiler (`dtc`, Debian's
    /// device-tree-compiler): every node Linux needs is there, as Linux
    /// reads it.
    #[test]
    fn dtc_reads_back_every_node_linux_needs() {
        let dtc = std::path::Path::new("/usr/bin/dtc");
        if !dtc.exists() {
            sm_testkit::skip_or_fail::<()>(
                "dtc_reads_back_every_node_linux_needs",
                "/usr/bin/dtc is missing: apt install device-tree-compiler".into(),
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.dtb");
        std::fs::write(&path, build(&config()).unwrap()).unwrap();
        let out = std::process::Command::new(dtc).args(["-I", "dtb", "-O", "dts"]).arg(&path).output().unwrap();
        let dts = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "dtc: {}", String::from_utf8_lossy(&out.stderr));
        for needed in [
            "compatible = \"linux,dummy-virt\";",
            "cpu@0 {",
            "cpu@1 {",
            "enable-method = \"psci\";",
            "reg = <0x00 0x01>;",
            // dtc 1.6 prints a string list with its NULs.
            "compatible = \"arm,psci-1.0\\0arm,psci-0.2\";",
            "method = \"hvc\";",
            "memory@40000000 {",
            "reg = <0x00 0x40000000 0x00 0x10000000>;",
            "compatible = \"arm,gic-v3\";",
            "interrupt-controller;",
            "reg = <0x00 0x8000000 0x00 0x10000 0x00 0x80a0000 0x00 0x40000>;",
            "compatible = \"arm,armv8-timer\";",
            "interrupts = <0x01 0x0d 0x04 0x01 0x0e 0x04 0x01 0x0b 0x04 0x01 0x0a 0x04>;",
            "serial@9000000 {",
            "compatible = \"ns16550a\";",
            "virtio_mmio@a000000 {",
            "virtio_mmio@a000200 {",
            "interrupts = <0x00 0x11 0x01>;",
            "bootargs = \"console=ttyS0 earlycon=uart8250,mmio,0x9000000 quiet\";",
            "stdout-path = \"/serial@9000000\";",
            "linux,initrd-start = <0x00 0x44000000>;",
            "linux,initrd-end = <0x00 0x44100000>;",
        ] {
            assert!(dts.contains(needed), "missing {needed:?} in:\n{dts}");
        }
        assert!(!String::from_utf8_lossy(&out.stderr).contains("ERROR"), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
