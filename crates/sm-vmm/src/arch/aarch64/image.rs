//! The arm64 `Image` kernel format (Documentation/arch/arm64/booting.rst):
//! a 64-byte header — branch code, `text_offset`, `image_size`, flags,
//! magic "ARM\x64" at byte 56 — in front of the kernel, which is copied
//! as is to a 2 MiB aligned address + `text_offset` and entered at its
//! first byte.

use super::BootError;

/// Header length.
pub const HEADER_LEN: usize = 64;
/// "ARM\x64", little endian.
const MAGIC: u32 = 0x644d_5241;
/// `text_offset` of kernels older than 3.17 whose header says 0 size.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset from a 2 MiB aligned base where the image goes.
    pub text_offset: u64,
    /// Bytes the kernel occupies once running (BSS included); at least the file.
    pub image_size: u64,
    /// Bit 0: big endian kernel (refused).
    pub flags: u64,
}

/// Reads the header of `kernel` (the whole file, or at least its first 64
/// bytes).
pub fn parse_header(kernel: &[u8]) -> Result<ImageHeader, BootError> {
    let h = kernel
        .get(..HEADER_LEN)
        .ok_or_else(|| BootError::NotAnImage(format!("{} bytes, shorter than the 64-byte header", kernel.len())))?;
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let magic = u32::from_le_bytes(h[56..60].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(BootError::NotAnImage(format!(
            "magic {magic:#010x} at byte 56, not \"ARM\\x64\" (a vmlinux ELF or a compressed Image.gz?)"
        )));
    }
    let (mut text_offset, mut image_size, flags) = (u64_at(8), u64_at(16), u64_at(24));
    if image_size == 0 {
        text_offset = LEGACY_TEXT_OFFSET;
        image_size = kernel.len() as u64;
    }
    if flags & 1 != 0 {
        return Err(BootError::NotAnImage("a big-endian kernel (flags bit 0)".into()));
    }
    Ok(ImageHeader { text_offset, image_size: image_size.max(kernel.len() as u64), flags })
}

/// Where `header`'s kernel goes in RAM starting at `ram_base` (2 MiB
/// aligned) with `ram_size` bytes: its load address, and the first byte
/// after it (where the initrd may follow).
pub fn placement(header: &ImageHeader, ram_base: u64, ram_size: u64) -> Result<(u64, u64), BootError> {
    let load = ram_base.saturating_add(header.text_offset);
    let end = load.saturating_add(header.image_size);
    if end > ram_base.saturating_add(ram_size) {
        return Err(BootError::DoesNotFit {
            what: "the kernel",
            needed: header.text_offset.saturating_add(header.image_size),
            available: ram_size,
        });
    }
    Ok((load, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text_offset: u64, image_size: u64, flags: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes()); // b #0x40
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn a_modern_header_gives_its_offset_and_size() {
        let mut kernel = header(0, 0x200_0000, 0b1010);
        kernel.resize(4096, 0);
        let h = parse_header(&kernel).unwrap();
        assert_eq!(h, ImageHeader { text_offset: 0, image_size: 0x200_0000, flags: 0b1010 });
        let (load, end) = placement(&h, 0x4000_0000, 256 << 20).unwrap();
        assert_eq!((load, end), (0x4000_0000, 0x4200_0000));
    }

    #[test]
    fn a_legacy_header_uses_the_old_text_offset() {
        let mut kernel = header(0, 0, 0);
        kernel.resize(1 << 20, 0);
        let h = parse_header(&kernel).unwrap();
        assert_eq!((h.text_offset, h.image_size), (0x8_0000, 1 << 20));
    }

    #[test]
    fn wrong_files_and_kernels_too_big_are_refused_by_name() {
        assert!(parse_header(b"\x7fELF").unwrap_err().to_string().contains("shorter than the 64-byte header"));
        let mut elf = vec![0u8; 128];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert!(parse_header(&elf).unwrap_err().to_string().contains("not \"ARM\\x64\""));
        assert!(parse_header(&header(0, 4096, 1)).unwrap_err().to_string().contains("big-endian"));
        let h = parse_header(&header(0, 300 << 20, 0)).unwrap();
        let err = placement(&h, 0x4000_0000, 256 << 20).unwrap_err();
        assert!(matches!(err, BootError::DoesNotFit { what: "the kernel", .. }), "{err}");
        let h = parse_header(&header(u64::MAX - 10, 4096, 0)).unwrap();
        assert!(placement(&h, 0x4000_0000, 256 << 20).is_err(), "no wrap-around");
    }
}
