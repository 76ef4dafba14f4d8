//! Loading a Linux kernel (uncompressed ELF vmlinux or bzImage), its initrd and
//! command line, and writing the zero page for the 64-bit boot protocol.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, INITRD_ADDR_MAX, LOW_RAM_END, MPTABLE_ADDR, ZERO_PAGE_ADDR,
};
use crate::memory::GuestMemory;
use crate::{Error, Result};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the protected-mode code of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// Format of a kernel image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux` (fast to boot here).
    Elf,
    /// Compressed `bzImage` (decompresses itself in the guest).
    BzImage,
}

/// Where the loaded kernel starts and what the zero page needs.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// Format that was loaded.
    pub format: KernelFormat,
    setup_header: Option<setup_header>,
}

/// Detects the kernel format from its magic bytes.
pub fn detect_format(path: &Path) -> Result<KernelFormat> {
    let file = open_kernel(path)?;
    let mut head = Vec::with_capacity(0x206);
    file.take(0x206).read_to_end(&mut head).map_err(|e| invalid(path, format!("reading: {e}")))?;
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.len() == 0x206 && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(invalid(path, "neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" boot header)".into()))
}

fn open_kernel(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::KernelNotFound { path: path.to_path_buf() },
        _ => invalid(path, format!("opening: {e}")),
    })
}

fn invalid(path: &Path, reason: String) -> Error {
    Error::KernelInvalid { path: path.to_path_buf(), reason }
}

/// Loads the kernel image into guest memory.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel> {
    let format = detect_format(path)?;
    let mut file = open_kernel(path)?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, highmem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, highmem),
    }
    .map_err(|e| invalid(path, format!("{e} (is the file complete? does it fit in guest RAM?)")))?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.raw_value(),
        KernelFormat::BzImage => result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
    };
    Ok(LoadedKernel { entry, end: result.kernel_end, format, setup_header: result.setup_header })
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    /// Guest-physical start.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd at the highest page-aligned address that keeps it below the
/// end of RAM and Linux's `initrd_addr_max`, and above the kernel.
pub fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64) -> Result<LoadedInitrd> {
    let initrd_err = |reason: String| Error::Initrd { path: path.to_path_buf(), reason };
    let data = std::fs::read(path).map_err(|e| initrd_err(format!("cannot read: {e}")))?;
    let size = data.len() as u64;
    let low_ram_end = mem.iter().next().map(|r| r.start_addr().0 + r.len()).unwrap_or(0);
    let ceiling = low_ram_end.min(INITRD_ADDR_MAX);
    let addr = ceiling.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    match addr {
        Some(addr) if addr >= kernel_end => {
            mem.write_slice(&data, GuestAddress(addr)).map_err(|e| initrd_err(format!("writing to guest memory: {e}")))?;
            Ok(LoadedInitrd { addr, size })
        }
        _ => Err(initrd_err(format!(
            "{} KiB does not fit in guest RAM between the kernel (ends at {} KiB) and {} KiB; give the VM more memory or use a smaller initrd",
            size >> 10,
            kernel_end >> 10,
            ceiling >> 10
        ))),
    }
}

/// Writes the NUL-terminated command line at [`CMDLINE_ADDR`].
pub fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<()> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Config(format!("command line: {e}")))?;
    c.insert_str(cmdline).map_err(|e| Error::Config(format!("kernel command line {cmdline:?} is invalid: {e}")))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &c)
        .map_err(|e| Error::Memory(format!("writing command line: {e}")))
}

/// E820 map for `mem`: low RAM, the reserved MP area, then each high region.
pub fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry { addr: 0, size: LOW_RAM_END, r#type: E820_RAM },
        boot_e820_entry { addr: MPTABLE_ADDR, size: HIMEM_START - MPTABLE_ADDR, r#type: E820_RESERVED },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(boot_e820_entry { addr: start, size: end - start, r#type: E820_RAM });
        }
    }
    map
}

/// Writes the zero page (boot_params) for the 64-bit boot protocol.
pub fn write_zero_page(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    initrd: Option<LoadedInitrd>,
    cmdline_len: usize,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if kernel.setup_header.is_none() {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(Error::Config("too many memory regions for the e820 table".into()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR)).map_err(|e| Error::Memory(format!("writing zero page: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn garbage_kernel_is_rejected_with_its_path() {
        let dir = std::env::temp_dir().join(format!("sm-vmm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-kernel");
        std::fs::write(&path, b"hello, I am not a kernel").unwrap();
        let mem = create_guest_memory(32 << 20).unwrap();
        let msg = load_kernel(&mem, &path).unwrap_err().to_string();
        assert!(msg.contains("not-a-kernel") && msg.contains("neither an ELF"), "{msg}");
        let missing = dir.join("missing");
        let err = load_kernel(&mem, &missing).unwrap_err();
        assert!(matches!(err, Error::KernelNotFound { .. }), "{err}");
        assert!(err.to_string().contains("cargo xtask kernel"));
        // A truncated ELF: magic but nothing else.
        std::fs::write(&path, b"\x7fELF\x02\x01\x01").unwrap();
        let msg = load_kernel(&mem, &path).unwrap_err().to_string();
        assert!(msg.contains("cannot be loaded"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_too_large_for_ram_is_rejected() {
        let dir = tempfile::Builder::new().prefix("sm-vmm-initrd-").tempdir().unwrap();
        let path = dir.path().join("big.cpio");
        std::fs::write(&path, vec![0u8; 20 << 20]).unwrap();
        let mem = create_guest_memory(32 << 20).unwrap();
        let msg = load_initrd(&mem, &path, 16 << 20).unwrap_err().to_string();
        assert!(msg.contains("does not fit"), "{msg}");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let loaded = load_initrd(&mem, &path, 16 << 20).unwrap();
        assert_eq!(loaded.size, 8192);
        assert_eq!(loaded.addr, (32 << 20) - 8192);
    }

    #[test]
    fn e820_excludes_the_mp_area_and_covers_ram() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let map = e820_map(&mem);
        let (low_size, reserved_type) = ({ map[0].size }, { map[1].r#type });
        let (high_addr, high_size) = ({ map[2].addr }, { map[2].size });
        assert_eq!(low_size, LOW_RAM_END);
        assert_eq!(reserved_type, E820_RESERVED);
        assert_eq!(high_addr + high_size, 64 << 20);
    }
}
