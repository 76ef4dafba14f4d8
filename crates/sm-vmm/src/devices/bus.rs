use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus. `offset` is relative to the device's base port.
pub trait PortDevice: Send {
    /// Guest reads `data.len()` bytes.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest writes `data`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A shared port device.
pub type SharedPortDevice = Arc<Mutex<dyn PortDevice>>;

/// Dispatches port I/O to devices by port range. Ports without a device read as
/// all-ones (an empty ISA bus) and ignore writes.
#[derive(Default, Clone)]
pub struct PortBus {
    ranges: Vec<(u16, u16, SharedPortDevice)>,
}

impl PortBus {
    /// Adds `device` at ports `[base, base + len)`. Overlaps are a programming error
    /// and are refused.
    pub fn insert(&mut self, base: u16, len: u16, device: SharedPortDevice) -> Result<(), String> {
        let end = u32::from(base) + u32::from(len);
        for (b, l, _) in &self.ranges {
            if u32::from(base) < u32::from(*b) + u32::from(*l) && u32::from(*b) < end {
                return Err(format!("ports {base:#x}+{len} overlap a device at {b:#x}+{l}"));
            }
        }
        self.ranges.push((base, len, device));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedPortDevice)> {
        self.ranges
            .iter()
            .find(|(b, l, _)| port >= *b && u32::from(port) < u32::from(*b) + u32::from(*l))
            .map(|(b, _, d)| (port - b, d))
    }

    /// Handles a guest read; returns whether a device answered.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((offset, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Handles a guest write; returns whether a device took it.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((offset, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u16, u8)>);
    impl PortDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = PortBus::default();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x3fc, 8, dev.clone()).is_err());
        bus.insert(0x400, 1, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.write(0x401, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, 9)]);
    }
}
