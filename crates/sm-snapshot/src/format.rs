//! The snapshot file layout (all integers little endian):
//!
//! ```text
//! 0    magic "SMSNAPSH"
//! 8    format version u32        12  arch u32 (1 = x86_64)
//! 16   vCPU count u32            20  flags u32 (reserved, 0)
//! 24   region count u32          28  section count u32
//! 32   RAM offset u64 (page aligned, start of guest RAM in the file)
//! 40   tables length u64 (region table + section table + section data)
//! 48   snapshot id [16]          64  tables CRC-32 u32
//! 68   header CRC-32 u32 (of bytes 0..68)
//! 72   region table: count x { guest addr u64, size u64, offset in RAM area u64 }
//!      section table: count x { kind u32, index u32, file offset u64, length u64,
//!                               CRC-32 u32, reserved u32 }
//!      section data
//! RAM offset: each region's bytes at RAM offset + its offset; all-zero pages are
//!      holes (never written), so the file stays sparse.
//! ```

use crc32fast::hash as crc32;

/// File magic.
pub const MAGIC: [u8; 8] = *b"SMSNAPSH";
/// Current format version; files of other versions are refused.
pub const FORMAT_VERSION: u32 = 1;
/// Architecture code for x86_64.
pub const ARCH_X86_64: u32 = 1;
/// Fixed header length.
pub const HEADER_LEN: usize = 72;
/// Guest page size; RAM is aligned and scanned in these units.
pub const PAGE_SIZE: u64 = 4096;
const REGION_ENTRY_LEN: usize = 24;
const SECTION_ENTRY_LEN: usize = 32;
/// Upper bound on the metadata tables (sanity limit against hostile files).
pub const MAX_TABLES_LEN: u64 = 256 << 20;

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// Machine configuration (memory size, vCPUs, devices), encoded by sm-vmm.
    Machine,
    /// One vCPU's backend state (index = vCPU id).
    Vcpu,
    /// VM-wide device state (interrupt controllers, timers, clock).
    Vm,
    /// A virtio transport's state (index = device slot).
    VirtioTransport,
    /// A virtio device's own state (index = device slot).
    VirtioDevice,
    /// A platform device's state, e.g. the COM1 UART (index = device, encoded by sm-vmm).
    Platform,
    /// Diff snapshots: the parent snapshot (its 16-byte id, then its path, UTF-8).
    Parent,
    /// Diff snapshots: bitmap of the RAM pages this file stores (bit i = page i of
    /// the RAM area, little-endian u64 words); the others come from the parent.
    RamDiff,
    /// Any other kind code.
    Other(u32),
}

impl SectionKind {
    /// Numeric code on disk.
    pub fn code(self) -> u32 {
        match self {
            SectionKind::Machine => 1,
            SectionKind::Vcpu => 2,
            SectionKind::Vm => 3,
            SectionKind::VirtioTransport => 4,
            SectionKind::VirtioDevice => 5,
            SectionKind::Platform => 6,
            SectionKind::Parent => 7,
            SectionKind::RamDiff => 8,
            SectionKind::Other(c) => c,
        }
    }

    /// Kind of a numeric code.
    pub fn from_code(c: u32) -> Self {
        match c {
            1 => SectionKind::Machine,
            2 => SectionKind::Vcpu,
            3 => SectionKind::Vm,
            4 => SectionKind::VirtioTransport,
            5 => SectionKind::VirtioDevice,
            6 => SectionKind::Platform,
            7 => SectionKind::Parent,
            8 => SectionKind::RamDiff,
            c => SectionKind::Other(c),
        }
    }
}

/// One guest RAM region in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes (page multiple).
    pub size: u64,
    /// Offset from the RAM area start.
    pub offset: u64,
}

/// Decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Architecture code.
    pub arch: u32,
    /// vCPU count.
    pub vcpu_count: u32,
    /// Region count.
    pub region_count: u32,
    /// Section count.
    pub section_count: u32,
    /// Start of the RAM area.
    pub ram_offset: u64,
    /// Bytes of tables and section data after the header.
    pub tables_len: u64,
    /// Random id of this snapshot.
    pub id: [u8; 16],
    /// CRC-32 of the tables.
    pub tables_crc: u32,
}

/// A section table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionEntry {
    /// Kind.
    pub kind: SectionKind,
    /// Index within its kind.
    pub index: u32,
    /// Absolute file offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// CRC-32 of the data.
    pub crc: u32,
}

/// Why a header is unusable (the reader adds the path).
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than a header.
    Truncated(usize),
    /// Wrong magic.
    Magic,
    /// Other version.
    Version(u32),
    /// Checksum mismatch.
    Checksum,
    /// Inconsistent fields.
    Fields(String),
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Encodes the header (with its CRC).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.arch.to_le_bytes());
        b[16..20].copy_from_slice(&self.vcpu_count.to_le_bytes());
        b[20..24].copy_from_slice(&0u32.to_le_bytes());
        b[24..28].copy_from_slice(&self.region_count.to_le_bytes());
        b[28..32].copy_from_slice(&self.section_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.ram_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.tables_len.to_le_bytes());
        b[48..64].copy_from_slice(&self.id);
        b[64..68].copy_from_slice(&self.tables_crc.to_le_bytes());
        let crc = crc32(&b[..68]);
        b[68..72].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header.
    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < HEADER_LEN {
            return Err(HeaderError::Truncated(b.len()));
        }
        if b[0..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = le_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        if crc32(&b[..68]) != le_u32(b, 68) {
            return Err(HeaderError::Checksum);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[48..64]);
        let h = Header {
            version,
            arch: le_u32(b, 12),
            vcpu_count: le_u32(b, 16),
            region_count: le_u32(b, 24),
            section_count: le_u32(b, 28),
            ram_offset: le_u64(b, 32),
            tables_len: le_u64(b, 40),
            id,
            tables_crc: le_u32(b, 64),
        };
        if h.arch != ARCH_X86_64 {
            return Err(HeaderError::Fields(format!("architecture {} is not x86_64", h.arch)));
        }
        if h.tables_len > MAX_TABLES_LEN
            || !h.ram_offset.is_multiple_of(PAGE_SIZE)
            || h.ram_offset < HEADER_LEN as u64 + h.tables_len
        {
            return Err(HeaderError::Fields(format!(
                "tables of {} bytes and RAM at {:#x} are inconsistent",
                h.tables_len, h.ram_offset
            )));
        }
        let tables_min =
            h.region_count as u64 * REGION_ENTRY_LEN as u64 + h.section_count as u64 * SECTION_ENTRY_LEN as u64;
        if tables_min > h.tables_len {
            return Err(HeaderError::Fields("region and section counts exceed the tables".into()));
        }
        Ok(h)
    }
}

/// Encodes the region and section tables followed by the section data, for
/// sections laid out right after the tables. Returns the bytes and fills in the
/// entries' offsets and CRCs.
pub fn encode_tables(regions: &[RamRegion], sections: &[(SectionKind, u32, &[u8])]) -> (Vec<u8>, Vec<SectionEntry>) {
    let tables_len = regions.len() * REGION_ENTRY_LEN + sections.len() * SECTION_ENTRY_LEN;
    let mut offset = (HEADER_LEN + tables_len) as u64;
    let mut entries = Vec::with_capacity(sections.len());
    for (kind, index, data) in sections {
        entries.push(SectionEntry { kind: *kind, index: *index, offset, len: data.len() as u64, crc: crc32(data) });
        offset += data.len() as u64;
    }
    let mut b = Vec::with_capacity(offset as usize - HEADER_LEN);
    for r in regions {
        b.extend_from_slice(&r.guest_addr.to_le_bytes());
        b.extend_from_slice(&r.size.to_le_bytes());
        b.extend_from_slice(&r.offset.to_le_bytes());
    }
    for e in &entries {
        b.extend_from_slice(&e.kind.code().to_le_bytes());
        b.extend_from_slice(&e.index.to_le_bytes());
        b.extend_from_slice(&e.offset.to_le_bytes());
        b.extend_from_slice(&e.len.to_le_bytes());
        b.extend_from_slice(&e.crc.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    for (_, _, data) in sections {
        b.extend_from_slice(data);
    }
    (b, entries)
}

/// Decodes the tables (`b` = the bytes after the header, `tables_len` long).
pub fn decode_tables(h: &Header, b: &[u8]) -> Result<(Vec<RamRegion>, Vec<SectionEntry>), String> {
    if b.len() as u64 != h.tables_len {
        return Err(format!("tables are {} bytes, header says {}", b.len(), h.tables_len));
    }
    if crc32(b) != h.tables_crc {
        return Err("tables checksum mismatch (file damaged)".into());
    }
    let mut at = 0;
    let mut regions = Vec::with_capacity(h.region_count as usize);
    for _ in 0..h.region_count {
        let r = RamRegion { guest_addr: le_u64(b, at), size: le_u64(b, at + 8), offset: le_u64(b, at + 16) };
        if !r.size.is_multiple_of(PAGE_SIZE)
            || !r.offset.is_multiple_of(PAGE_SIZE)
            || !r.guest_addr.is_multiple_of(PAGE_SIZE)
        {
            return Err(format!("RAM region {r:x?} is not page aligned"));
        }
        // Crafted values must be an error here, never a wrap later: the
        // region's end in the file (after the RAM offset), and in the guest.
        let file_end = r.offset.checked_add(r.size).and_then(|e| e.checked_add(h.ram_offset));
        if file_end.is_none_or(|e| e > i64::MAX as u64) || r.guest_addr.checked_add(r.size).is_none() {
            return Err(format!("RAM region {r:x?} reaches past the end of the address space"));
        }
        regions.push(r);
        at += REGION_ENTRY_LEN;
    }
    let data_start = HEADER_LEN as u64;
    let data_end = data_start + h.tables_len;
    let mut sections = Vec::with_capacity(h.section_count as usize);
    for _ in 0..h.section_count {
        let e = SectionEntry {
            kind: SectionKind::from_code(le_u32(b, at)),
            index: le_u32(b, at + 4),
            offset: le_u64(b, at + 8),
            len: le_u64(b, at + 16),
            crc: le_u32(b, at + 24),
        };
        let end = e.offset.checked_add(e.len).ok_or("section length overflows")?;
        if e.offset < data_start || end > data_end {
            return Err(format!("section {:?}/{} lies outside the tables", e.kind, e.index));
        }
        sections.push(e);
        at += SECTION_ENTRY_LEN;
    }
    Ok((regions, sections))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version: FORMAT_VERSION,
            arch: ARCH_X86_64,
            vcpu_count: 2,
            region_count: 1,
            section_count: 2,
            ram_offset: 8192,
            tables_len: 100,
            id: [7; 16],
            tables_crc: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trip_and_rejections() {
        let h = header();
        let b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
        assert_eq!(Header::decode(&b[..40]), Err(HeaderError::Truncated(40)));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(Header::decode(&bad), Err(HeaderError::Magic));
        let mut v2 = header();
        v2.version = 2;
        let mut b2 = v2.encode();
        // encode() wrote version 2 with a valid CRC: the version check names it.
        b2[8] = 2;
        assert_eq!(Header::decode(&b2), Err(HeaderError::Version(2)));
        let mut flipped = b;
        flipped[17] ^= 1;
        assert_eq!(Header::decode(&flipped), Err(HeaderError::Checksum));
    }

    #[test]
    fn tables_round_trip_and_bounds() {
        let regions = [RamRegion { guest_addr: 0, size: 1 << 20, offset: 0 }];
        let a = [1u8, 2, 3];
        let sections = [(SectionKind::Vcpu, 0, &a[..]), (SectionKind::Other(77), 3, &b"xyz!"[..])];
        let (bytes, entries) = encode_tables(&regions, &sections);
        let mut h = header();
        h.region_count = 1;
        h.section_count = 2;
        h.tables_len = bytes.len() as u64;
        h.tables_crc = crc32(&bytes);
        let (r, s) = decode_tables(&h, &bytes).unwrap();
        assert_eq!(r, regions);
        assert_eq!(s, entries);
        assert_eq!(s[1].kind, SectionKind::Other(77));
        let mut damaged = bytes.clone();
        damaged[5] ^= 0x10;
        assert!(decode_tables(&h, &damaged).unwrap_err().contains("checksum"));
        assert!(decode_tables(&h, &bytes[..bytes.len() - 1]).is_err());

        // Offsets and sizes that would wrap: refused by name, not wrapped.
        let top = !(PAGE_SIZE - 1);
        for crafted in [
            RamRegion { guest_addr: 0, size: 1 << 20, offset: top },
            RamRegion { guest_addr: 0, size: top, offset: 1 << 20 },
            RamRegion { guest_addr: top, size: 1 << 20, offset: 0 },
            RamRegion { guest_addr: 0, size: 1 << 20, offset: (i64::MAX as u64 + 1) & !(PAGE_SIZE - 1) },
        ] {
            let (bytes, _) = encode_tables(&[crafted], &sections);
            h.tables_len = bytes.len() as u64;
            h.tables_crc = crc32(&bytes);
            let err = decode_tables(&h, &bytes).unwrap_err();
            assert!(err.contains("past the end"), "{crafted:x?}: {err}");
        }
    }
}
