//! A snapshot file as read back from disk: header, tables, sections. The
//! header and table checksums are fixed up after mutation, so the checks
//! behind them are reached.

use std::io::Write;

use sm_snapshot::format::HEADER_LEN;
use sm_snapshot::{write_snapshot, SectionKind, SnapshotContents, SnapshotFile};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::Target;

pub fn file() -> Target {
    Target {
        name: "snapshot-file",
        what: "sm-snapshot: SnapshotFile::open on a file of arbitrary bytes (checksums fixed up)",
        run,
        seeds,
        max_len: 1024,
        cost: 20,
    }
}

/// Recomputes the tables' and the header's CRC-32 where the bytes allow.
fn fix_checksums(b: &mut [u8]) {
    if b.len() < HEADER_LEN {
        return;
    }
    let tables_len = u64::from_le_bytes(b[40..48].try_into().expect("8 bytes"));
    if let Some(end) = usize::try_from(tables_len).ok().and_then(|l| HEADER_LEN.checked_add(l)) {
        if end <= b.len() {
            let crc = crc32fast::hash(&b[HEADER_LEN..end]);
            b[64..68].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&b[..68]);
    b[68..72].copy_from_slice(&crc.to_le_bytes());
}

fn run(data: &[u8]) {
    let mut bytes = data.to_vec();
    fix_checksums(&mut bytes);
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(&bytes).expect("write temp file");
    if let Ok(snap) = SnapshotFile::open(file.path()) {
        let _ = (snap.id(), snap.vcpu_count(), snap.regions().len(), snap.ram_size());
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 10)]).expect("guest memory");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("seed.snap");
    let contents = SnapshotContents {
        vcpu_count: 1,
        sections: vec![(SectionKind::Machine, 0, b"machine".to_vec()), (SectionKind::Vcpu, 0, vec![1, 2, 3, 4])],
        memory: &memory,
        diff: None,
        anonymous_memory: false,
    };
    write_snapshot(&path, &contents).expect("seed snapshot");
    let full = std::fs::read(&path).expect("read seed");
    // The header and tables are where parsing happens; the RAM is just pages.
    let head = full[..full.len().min(1024)].to_vec();
    vec![full, head]
}
