//! The i8042 a Linux guest reboots through (`reboot=k`): vm-superio's
//! `I8042Device` (the CPU-reset command only) on the port bus.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::PortDevice;

/// Runs the VMM's reset action when vm-superio's device sees the reset command.
pub struct ResetTrigger(Arc<dyn Fn() + Send + Sync>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// The i8042 mapped at ports 0x60..0x65: status reads say "nothing pending",
/// and the reset command ends the VM through `on_reset`.
pub struct I8042 {
    device: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// Creates the controller; `on_reset` runs when the guest resets the CPU.
    pub fn new(on_reset: Arc<dyn Fn() + Send + Sync>) -> Self {
        I8042 { device: I8042Device::new(ResetTrigger(on_reset)) }
    }
}

impl PortDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Output buffer empty, input buffer empty: the guest never waits on us.
        let value = u8::try_from(offset).map_or(0, |o| self.device.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        // Only single-byte writes are i8042 commands.
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            let Ok(()) = self.device.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Port of the i8042 command/status register, and the reset command.
    const I8042_COMMAND_PORT_OFFSET: u16 = 4;
    const CMD_RESET_CPU: u8 = 0xfe;

    #[test]
    fn only_the_reset_command_resets() {
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        let mut dev = I8042::new(Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        let mut status = [0xaa];
        dev.read(I8042_COMMAND_PORT_OFFSET, &mut status);
        assert_eq!(status[0], 0);
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(I8042_COMMAND_PORT_OFFSET, &[0x60]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        dev.write(I8042_COMMAND_PORT_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
