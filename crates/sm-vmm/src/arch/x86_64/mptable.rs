//! Intel MultiProcessor Specification 1.4 tables, so Linux finds every vCPU, the
//! IOAPIC and the ISA interrupt routing without ACPI.
//!
//! The floating pointer sits in the last KiB of base memory (where Linux scans);
//! the configuration table lives in the reserved area just below it.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR, MP_FLOATING_ADDR};
use crate::memory::GuestMemory;
use crate::{Error, Result};

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;
/// IOAPIC pins routed (one I/O interrupt entry each).
const IOAPIC_PINS: usize = 24;
/// Bytes available for the configuration table.
const TABLE_SPACE: usize = (MP_FLOATING_ADDR - MPTABLE_ADDR) as usize;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// CPUID signature: family 6.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags: FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

fn table_len(cpus: usize) -> usize {
    // processors, one bus, one IOAPIC, the I/O interrupts, two local interrupts
    HEADER_LEN + cpus * PROCESSOR_LEN + ENTRY_LEN * (2 + IOAPIC_PINS + 2)
}

/// The largest vCPU count the MP table can describe (APIC ids are 8-bit and the
/// IOAPIC takes the id after the last CPU; the table must fit its reserved area).
pub fn max_cpus() -> usize {
    let by_space = (TABLE_SPACE - table_len(0)) / PROCESSOR_LEN;
    by_space.min(254)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the configuration table for `cpus` vCPUs; returns its bytes.
fn build_table(cpus: usize) -> Vec<u8> {
    let ioapic_id = cpus as u8;
    let mut t = Vec::with_capacity(table_len(cpus));
    // Header; length, entry count and checksum are patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&[0, 0]); // base table length
    t.push(4); // spec revision 1.4
    t.push(0); // checksum
    t.extend_from_slice(b"SUPERMCH"); // OEM id
    t.extend_from_slice(b"MICROVM     "); // product id
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&[0, 0]); // entry count
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved
    debug_assert_eq!(t.len(), HEADER_LEN);
    let mut entries: u16 = 0;

    for cpu in 0..cpus {
        t.push(ENTRY_PROCESSOR);
        t.push(cpu as u8); // local APIC id
        t.push(APIC_VERSION);
        t.push(CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 });
        t.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[ENTRY_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    entries += 1;
    t.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    t.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries += 1;
    for pin in 0..IOAPIC_PINS as u8 {
        // type, interrupt type, flags (conforming polarity/trigger), bus, bus irq,
        // destination IOAPIC, destination pin
        t.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        entries += 1;
    }
    // LINT0 of every local APIC: ExtINT; LINT1: NMI.
    t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;

    let len = t.len() as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&entries.to_le_bytes());
    t[7] = checksum(&t);
    t
}

fn build_floating_pointer() -> [u8; FLOATING_LEN] {
    let mut f = [0u8; FLOATING_LEN];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&(MPTABLE_ADDR as u32).to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = 4; // spec revision
    f[10] = checksum(&f);
    f
}

/// Writes the MP floating pointer and configuration table for `cpus` vCPUs.
pub fn write_mptable(mem: &GuestMemory, cpus: usize) -> Result<()> {
    if cpus == 0 || cpus > max_cpus() {
        return Err(Error::Config(format!("{cpus} vCPUs requested; the MP table describes 1..={} vCPUs", max_cpus())));
    }
    let table = build_table(cpus);
    mem.write_slice(&table, GuestAddress(MPTABLE_ADDR)).map_err(|e| Error::Memory(format!("writing MP table: {e}")))?;
    mem.write_slice(&build_floating_pointer(), GuestAddress(MP_FLOATING_ADDR))
        .map_err(|e| Error::Memory(format!("writing MP floating pointer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero_and_count_entries() {
        for cpus in [1, 2, 4, max_cpus()] {
            let t = build_table(cpus);
            assert_eq!(sum(&t), 0);
            assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
            assert_eq!(t.len(), table_len(cpus));
            let entries = u16::from_le_bytes([t[34], t[35]]) as usize;
            assert_eq!(entries, cpus + 2 + IOAPIC_PINS + 2);
            // Walk the entries by their type-specific sizes; they must end exactly.
            let mut off = HEADER_LEN;
            let mut processors = 0;
            for _ in 0..entries {
                let len = if t[off] == ENTRY_PROCESSOR { PROCESSOR_LEN } else { ENTRY_LEN };
                if t[off] == ENTRY_PROCESSOR {
                    assert_eq!(t[off + 1] as usize, processors);
                    processors += 1;
                }
                off += len;
            }
            assert_eq!(off, t.len());
            assert_eq!(processors, cpus);
        }
        assert_eq!(sum(&build_floating_pointer()), 0);
    }

    #[test]
    fn too_many_cpus_is_a_clear_error() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let msg = write_mptable(&mem, max_cpus() + 1).unwrap_err().to_string();
        assert!(msg.contains("MP table describes"), "{msg}");
        write_mptable(&mem, 2).unwrap();
        let mut magic = [0u8; 4];
        mem.read_slice(&mut magic, GuestAddress(MP_FLOATING_ADDR)).unwrap();
        assert_eq!(&magic, b"_MP_");
    }
}
