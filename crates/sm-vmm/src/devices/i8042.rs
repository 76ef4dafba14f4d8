use std::sync::Arc;

use super::PortDevice;

/// Port of the i8042 command/status register.
pub const I8042_COMMAND_PORT_OFFSET: u16 = 4;
/// Command that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The part of an i8042 keyboard controller a Linux guest uses to reboot
/// (`reboot=k`): status reads say "nothing pending", and the reset command ends
/// the VM through `on_reset`. Mapped at ports 0x60..0x65.
pub struct I8042 {
    on_reset: Arc<dyn Fn() + Send + Sync>,
}

impl I8042 {
    /// Creates the controller; `on_reset` runs when the guest resets the CPU.
    pub fn new(on_reset: Arc<dyn Fn() + Send + Sync>) -> Self {
        I8042 { on_reset }
    }
}

impl PortDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Output buffer empty, input buffer empty: the guest never waits on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == I8042_COMMAND_PORT_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

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
