//! GDT and identity-mapped page tables for entering 64-bit long mode.

use sm_hypervisor::x86_64::BOOT_GDT;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::memory::GuestMemory;
use crate::{Error, Result};

const PAGE_PRESENT: u64 = 1;
const PAGE_RW: u64 = 1 << 1;
const PAGE_USER: u64 = 1 << 2;
const PAGE_PS: u64 = 1 << 7;

/// Writes the boot GDT, an empty IDT, and page tables that identity-map the first
/// 1 GiB with 2 MiB pages. `user` makes the mapping accessible from ring 3 (test stubs).
pub fn write_boot_tables(mem: &GuestMemory, user: bool) -> Result<()> {
    let w = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("writing boot tables at {addr:#x}: {e}")))
    };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        w(GDT_ADDR + 8 * i as u64, *entry)?;
    }
    w(IDT_ADDR, 0)?;
    let flags = PAGE_PRESENT | PAGE_RW | if user { PAGE_USER } else { 0 };
    w(PML4_ADDR, PDPT_ADDR | flags)?;
    w(PDPT_ADDR, PD_ADDR | flags)?;
    for i in 0..512u64 {
        w(PD_ADDR + i * 8, (i << 21) | flags | PAGE_PS)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn identity_map_covers_first_gib() {
        let mem = create_guest_memory(32 << 20).unwrap();
        write_boot_tables(&mem, false).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let last: u64 = mem.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, 511 << 21);
        assert_ne!(last & PAGE_PS, 0);
        assert_eq!(last & PAGE_USER, 0);
        let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, BOOT_GDT[1]);
    }
}
