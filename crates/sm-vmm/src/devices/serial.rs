use std::io::Write;
use std::sync::Arc;

use sm_hypervisor::IrqLine;
use vm_superio::Trigger;

use super::PortDevice;

/// Base port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// ISA interrupt of COM1.
pub const COM1_IRQ: u32 = 4;

/// Adapts a hypervisor interrupt line to vm-superio's `Trigger`.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = sm_hypervisor::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger()
    }
}

/// A 16550 UART (vm-superio) whose output goes to `W`, raising its interrupt line
/// on THR-empty and receive events.
pub struct Serial<W: Write + Send> {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> Serial<W> {
    /// Creates the UART.
    pub fn new(irq: Arc<dyn IrqLine>, out: W) -> Self {
        Serial { uart: vm_superio::Serial::new(IrqTrigger(irq), out) }
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl<W: Write + Send> PortDevice for Serial<W> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(&byte) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, byte) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}
