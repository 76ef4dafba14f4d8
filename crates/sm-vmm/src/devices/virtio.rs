//! virtio-mmio devices on the guest's MMIO bus.

use std::sync::{Arc, Mutex};

use sm_hypervisor::IrqLine;
use sm_virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};

/// Lets a hypervisor interrupt line drive a virtio transport.
pub struct VirtioIrq(pub Arc<dyn IrqLine>);

impl sm_virtio::InterruptLine for VirtioIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger().map_err(std::io::Error::other)
    }
}

/// Where a virtio device sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base of its MMIO window.
    pub base: u64,
    /// Its interrupt (GSI).
    pub irq: u32,
}

impl VirtioSlot {
    /// The kernel command-line word announcing the device to Linux.
    pub fn cmdline_arg(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// A shared transport.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

/// Dispatches MMIO exits to virtio transports by address.
#[derive(Default, Clone)]
pub struct MmioBus {
    devices: Vec<(VirtioSlot, SharedTransport)>,
}

impl MmioBus {
    /// Adds a transport at `slot`.
    pub fn insert(&mut self, slot: VirtioSlot, transport: SharedTransport) {
        self.devices.push((slot, transport));
    }

    /// The devices in insertion order.
    pub fn devices(&self) -> &[(VirtioSlot, SharedTransport)] {
        &self.devices
    }

    /// What the devices open files below while serving the guest (see
    /// `VirtioDevice::host_paths`).
    pub fn host_paths(&self) -> Vec<sm_seccomp::FsRule> {
        self.devices
            .iter()
            .flat_map(|(_, t)| t.lock().unwrap_or_else(|e| e.into_inner()).device().host_paths())
            .collect()
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedTransport)> {
        self.devices
            .iter()
            .find(|(s, _)| addr >= s.base && addr < s.base + MMIO_WINDOW_SIZE)
            .map(|(s, t)| (addr - s.base, t))
    }

    /// Handles a guest read; returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, t)) => {
                t.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Handles a guest write; returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, t)) => {
                t.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Inserts `args` into `cmdline` before a ` -- ` separator (words after it go to
/// init), or at the end.
pub fn insert_kernel_args(cmdline: &str, args: &[String]) -> String {
    if args.is_empty() {
        return cmdline.to_string();
    }
    let joined = args.join(" ");
    match cmdline.find(" -- ") {
        Some(at) => format!("{} {joined}{}", &cmdline[..at], &cmdline[at..]),
        None if cmdline.ends_with(" --") => format!("{} {joined} --", &cmdline[..cmdline.len() - 3]),
        None => format!("{cmdline} {joined}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_args_go_before_the_init_separator() {
        let args = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(insert_kernel_args("quiet -- tick", &args), "quiet virtio_mmio.device=4K@0xd0000000:5 -- tick");
        assert_eq!(insert_kernel_args("quiet", &args), "quiet virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(insert_kernel_args("quiet --", &args), "quiet virtio_mmio.device=4K@0xd0000000:5 --");
        assert_eq!(insert_kernel_args("quiet", &[]), "quiet");
    }

    #[test]
    fn slot_cmdline_names_window_and_irq() {
        assert_eq!(VirtioSlot { base: 0xd000_1000, irq: 6 }.cmdline_arg(), "virtio_mmio.device=4K@0xd0001000:6");
    }
}
