use std::io::Write;
use std::sync::Arc;

use sm_hypervisor::IrqLine;
use vm_superio::serial::{NoEvents, SerialState};
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
    uart: vm_superio::Serial<IrqTrigger, NoEvents, W>,
    irq: Arc<dyn IrqLine>,
}

const STATE_MAGIC: &[u8; 4] = b"SMUA";
const STATE_VERSION: u16 = 1;
/// Magic, version, nine registers, FIFO length.
const STATE_FIXED_LEN: usize = 4 + 2 + 9 + 2;

impl<W: Write + Send> Serial<W> {
    /// Creates the UART.
    pub fn new(irq: Arc<dyn IrqLine>, out: W) -> Self {
        Serial { uart: vm_superio::Serial::new(IrqTrigger(irq.clone()), out), irq }
    }

    /// The register file and receive FIFO, encoded for a snapshot. Without it a
    /// restored guest whose driver was mid-transmit (THR-empty interrupt enabled in
    /// its cached IER, not in a fresh UART's) would never be interrupted again and
    /// its console would stall.
    pub fn save_state(&self) -> Vec<u8> {
        let s = self.uart.state();
        let mut b = Vec::with_capacity(STATE_FIXED_LEN + s.in_buffer.len());
        b.extend_from_slice(STATE_MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&[
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ]);
        b.extend_from_slice(&(s.in_buffer.len() as u16).to_le_bytes());
        b.extend_from_slice(&s.in_buffer);
        b
    }
}

impl<W: Write + Send + Clone> Serial<W> {
    /// Loads state written by [`Serial::save_state`]; on error the UART is unchanged.
    pub fn restore_state(&mut self, b: &[u8]) -> Result<(), String> {
        if b.len() < STATE_FIXED_LEN || &b[..4] != STATE_MAGIC {
            return Err("COM1 state is malformed".into());
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != STATE_VERSION {
            return Err(format!("COM1 state version {version} is not supported (expected {STATE_VERSION})"));
        }
        let r = &b[6..15];
        let fifo_len = u16::from_le_bytes([b[15], b[16]]) as usize;
        if b.len() != STATE_FIXED_LEN + fifo_len {
            return Err(format!(
                "COM1 state is {} bytes, its FIFO length says {}",
                b.len(),
                STATE_FIXED_LEN + fifo_len
            ));
        }
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: b[STATE_FIXED_LEN..].to_vec(),
        };
        let out = self.uart.writer().clone();
        self.uart = vm_superio::Serial::from_state(&state, IrqTrigger(self.irq.clone()), NoEvents, out)
            .map_err(|e| format!("COM1 state rejected: {e:?}"))?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct CountingLine(AtomicUsize);

    impl IrqLine for CountingLine {
        fn trigger(&self) -> sm_hypervisor::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    const IER: u16 = 1;
    const LCR: u16 = 3;
    const SCR: u16 = 7;
    const IER_THR_EMPTY: u8 = 0x02;

    fn read(s: &mut Serial<Vec<u8>>, offset: u16) -> u8 {
        let mut b = [0u8];
        s.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn state_round_trip_keeps_registers_fifo_and_transmit_interrupts() {
        let line = Arc::new(CountingLine::default());
        let mut a = Serial::new(line.clone(), Vec::new());
        a.write(LCR, &[0x03]);
        a.write(SCR, &[0x5a]);
        a.write(IER, &[IER_THR_EMPTY]);
        assert_eq!(a.enqueue_input(b"hi"), 2);
        let saved = a.save_state();

        // A fresh UART (as after a restore) gets the guest driver's view back:
        // transmit interrupts stay enabled, so the next byte raises the line.
        let fresh_line = Arc::new(CountingLine::default());
        let mut b = Serial::new(fresh_line.clone(), Vec::new());
        b.restore_state(&saved).unwrap();
        assert_eq!(read(&mut b, LCR), 0x03);
        assert_eq!(read(&mut b, SCR), 0x5a);
        assert_eq!(read(&mut b, IER) & IER_THR_EMPTY, IER_THR_EMPTY);
        assert_eq!(read(&mut b, 0), b'h');
        b.write(0, b"x");
        assert!(fresh_line.0.load(Ordering::SeqCst) >= 1, "THR-empty interrupt must fire after restore");
        assert_eq!(b.uart.writer(), b"x");
    }

    #[test]
    fn damaged_state_is_refused_and_changes_nothing() {
        let mut s = Serial::new(Arc::new(CountingLine::default()), Vec::new());
        s.write(SCR, &[7]);
        s.enqueue_input(b"ab");
        let good = s.save_state();
        assert!(s.restore_state(&good[..good.len() - 1]).unwrap_err().contains("FIFO length"));
        let mut v = good.clone();
        v[4] = 9;
        assert!(s.restore_state(&v).unwrap_err().contains("version 9"));
        assert!(s.restore_state(b"nope").unwrap_err().contains("malformed"));
        let mut huge = good[..STATE_FIXED_LEN].to_vec();
        huge[15..17].copy_from_slice(&100u16.to_le_bytes());
        huge.extend_from_slice(&[0u8; 100]);
        assert!(s.restore_state(&huge).unwrap_err().contains("rejected"));
        assert_eq!(read(&mut s, SCR), 7);
    }
}
