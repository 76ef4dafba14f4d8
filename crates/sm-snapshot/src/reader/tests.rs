use std::os::unix::fs::MetadataExt;
use tempfile::TempDir;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::format::FORMAT_VERSION;
use crate::{write_snapshot, SnapshotContents};

fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("sm-snap-{name}-")).tempdir().unwrap()
}

const MIB: u64 = 1 << 20;

/// 16 MiB at 0 and 4 MiB at 4 GiB, with a few recognisable pages.
fn memory() -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 16 * MIB as usize),
        (GuestAddress(4 << 30), 4 * MIB as usize),
    ])
    .unwrap();
    mem.write_slice(&[0xab; 4096], GuestAddress(0x1000)).unwrap();
    mem.write_slice(b"middle", GuestAddress(8 * MIB + 10)).unwrap();
    mem.write_slice(&[0xcd; 8192], GuestAddress((4 << 30) + 3 * MIB)).unwrap();
    mem
}

fn write(path: &std::path::Path, mem: &GuestMemoryMmap<()>) -> crate::WriteStats {
    let contents = SnapshotContents {
        vcpu_count: 2,
        sections: vec![
            (SectionKind::Vcpu, 0, b"vcpu zero".to_vec()),
            (SectionKind::Vcpu, 1, b"vcpu one".to_vec()),
            (SectionKind::Vm, 0, vec![1, 2, 3]),
        ],
        memory: mem,
        diff: None,
        anonymous_memory: true,
    };
    write_snapshot(path, &contents).unwrap()
}

#[test]
fn round_trip_is_sparse_and_maps_copy_on_write() {
    let dir = temp_dir("rt");
    let path = dir.path().join("a.snap");
    let mem = memory();
    let stats = write(&path, &mem);
    assert_eq!(stats.ram_bytes, 20 * MIB);
    assert_eq!(stats.ram_written, 4096 * 4, "only the 4 non-zero pages are written");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), stats.file_size);
    assert!(meta.blocks() * 512 < MIB, "file must be sparse, uses {} bytes", meta.blocks() * 512);

    let snap = SnapshotFile::open(&path).unwrap();
    assert_eq!(snap.vcpu_count(), 2);
    assert_eq!(snap.ram_size(), 20 * MIB);
    assert_eq!(snap.section(SectionKind::Vcpu, 1), Some(&b"vcpu one"[..]));
    assert_eq!(snap.sections_of(SectionKind::Vcpu).len(), 2);
    assert!(snap.section(SectionKind::Machine, 0).is_none());

    let a = snap.map_ram().unwrap();
    let b = snap.map_ram().unwrap();
    let mut page = [0u8; 4096];
    a.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
    assert_eq!(page, [0xab; 4096]);
    let mut six = [0u8; 6];
    a.read_slice(&mut six, GuestAddress(8 * MIB + 10)).unwrap();
    assert_eq!(&six, b"middle");
    a.read_slice(&mut page, GuestAddress((4 << 30) + 3 * MIB + 4096)).unwrap();
    assert_eq!(page, [0xcd; 4096]);

    // Writes stay private to one mapping and never reach the file.
    a.write_slice(b"only in a", GuestAddress(0x1000)).unwrap();
    b.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
    assert_eq!(page, [0xab; 4096]);
    let again = SnapshotFile::open(&path).unwrap().map_ram().unwrap();
    again.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
    assert_eq!(page, [0xab; 4096]);

    // Reset in place: private pages dropped, snapshot contents back.
    discard_private_pages(&a).unwrap();
    a.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
    assert_eq!(page, [0xab; 4096]);
}

fn ram(mem: &GuestMemoryMmap<()>) -> Vec<u8> {
    let mut all = Vec::new();
    for (start, len) in [(0u64, 16 * MIB), (4 << 30, 4 * MIB)] {
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(start)).unwrap();
        all.extend(buf);
    }
    all
}

#[test]
fn diff_stores_written_pages_only_and_a_chain_restores_and_merges_to_the_same_ram() {
    let dir = temp_dir("diff");
    let full = dir.path().join("full.snap");
    write(&full, &memory());
    let parent = SnapshotFile::open(&full).unwrap();
    let live = parent.map_ram().unwrap();
    // Reads do not count as changes; writes do, also one that zeroes a page.
    let mut page = [0u8; 4096];
    live.read_slice(&mut page, GuestAddress(8 * MIB)).unwrap();
    live.write_slice(&[0u8; 4096], GuestAddress(0x1000)).unwrap();
    live.write_slice(b"new", GuestAddress(5 * MIB + 7)).unwrap();
    live.write_slice(&[0xee; 2 * 4096], GuestAddress((4 << 30) + 4096)).unwrap();
    let changed = crate::private_pages(&live).unwrap();
    let region2 = 16 * MIB / 4096;
    assert_eq!(changed.runs(), vec![(1, 1), (5 * MIB / 4096, 1), (region2 + 1, 2)]);

    let diff = dir.path().join("diff.snap");
    let contents = SnapshotContents {
        vcpu_count: 2,
        sections: vec![(SectionKind::Vcpu, 0, b"later zero".to_vec()), (SectionKind::Vcpu, 1, b"later one".to_vec())],
        memory: &live,
        diff: Some(crate::DiffBase::of(&parent, &live).unwrap()),
        anonymous_memory: false,
    };
    let stats = write_snapshot(&diff, &contents).unwrap();
    assert_eq!(stats.ram_written, 3 * 4096, "the zeroed page is a hole, the other 3 are written");

    let chain = crate::SnapshotChain::open(&diff).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain.top().section(SectionKind::Vcpu, 1), Some(&b"later one"[..]));
    let restored = chain.map_ram().unwrap();
    assert_eq!(ram(&restored), ram(&live));

    let merged = dir.path().join("merged.snap");
    crate::merge_chain(&diff, &merged).unwrap();
    let m = SnapshotFile::open(&merged).unwrap();
    assert!(m.section(SectionKind::Parent, 0).is_none());
    assert_eq!(m.section(SectionKind::Vcpu, 0), Some(&b"later zero"[..]));
    assert_eq!(ram(&m.map_ram().unwrap()), ram(&live));
    assert_eq!(crate::SnapshotChain::open(&merged).unwrap().len(), 1);

    // Reset in place of a chain: drop private pages, re-apply the diff.
    restored.write_slice(b"scribble", GuestAddress(0x3000)).unwrap();
    discard_private_pages(&restored).unwrap();
    chain.apply_diffs(&restored).unwrap();
    assert_eq!(ram(&restored), ram(&live));

    // Replacing the parent breaks the chain with a clear error.
    write(&full, &memory());
    let err = crate::SnapshotChain::open(&diff).err().unwrap().to_string();
    assert!(err.contains("not the parent"), "{err}");
    std::fs::remove_file(&full).unwrap();
    let err = crate::SnapshotChain::open(&diff).err().unwrap().to_string();
    assert!(err.contains("full.snap"), "{err}");
}

fn corrupt(path: &std::path::Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn damaged_truncated_and_foreign_files_are_refused_with_reasons() {
    let dir = temp_dir("bad");
    let mem = memory();
    let good = dir.path().join("good.snap");
    write(&good, &mem);
    let case = |name: &str, f: &dyn Fn(&std::path::Path)| -> String {
        let p = dir.path().join(name);
        std::fs::copy(&good, &p).unwrap();
        f(&p);
        match SnapshotFile::open(&p) {
            Ok(_) => panic!("{name}: damaged snapshot was accepted"),
            Err(e) => e.to_string(),
        }
    };
    let msg = case("header", &|p| corrupt(p, 17));
    assert!(msg.contains("header checksum"), "{msg}");
    let msg = case("tables", &|p| corrupt(p, 80));
    assert!(msg.contains("checksum"), "{msg}");
    let msg = case("section", &|p| {
        let len = SnapshotFile::open(&good).unwrap().tables.len() as u64;
        corrupt(p, HEADER_LEN as u64 + len - 2)
    });
    assert!(msg.contains("checksum"), "{msg}");
    let msg = case("truncated-ram", &|p| {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(f.metadata().unwrap().len() - 4096).unwrap();
    });
    assert!(msg.contains("truncated") && msg.contains("guest RAM"), "{msg}");
    let msg = case("truncated-meta", &|p| {
        std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(100).unwrap();
    });
    assert!(msg.contains("truncated"), "{msg}");
    let msg = case("empty", &|p| std::fs::write(p, b"").unwrap());
    assert!(msg.contains("truncated"), "{msg}");
    let msg = case("foreign", &|p| std::fs::write(p, vec![b'z'; 8192]).unwrap());
    assert!(msg.contains("bad magic"), "{msg}");
    let msg = case("version", &|p| {
        let mut b = std::fs::read(p).unwrap();
        b[8] = (FORMAT_VERSION + 1) as u8;
        std::fs::write(p, b).unwrap();
    });
    assert!(msg.contains("format version 2") && msg.contains("take a new snapshot"), "{msg}");
    let missing = SnapshotFile::open(&dir.path().join("nope")).err().unwrap().to_string();
    assert!(missing.contains("nope"), "{missing}");
}

/// Child side of the crash test: rewrites the snapshot forever until killed.
#[test]
#[ignore = "helper process for killed_writer_leaves_previous_snapshot_intact"]
fn crash_helper_rewrites_snapshot() {
    let Ok(path) = std::env::var("SM_SNAP_CRASH_PATH") else { return };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * MIB as usize)]).unwrap();
    for i in 0..(64 * MIB / 4096) {
        mem.write_obj(i | 1, GuestAddress(i * 4096)).unwrap();
    }
    loop {
        write(std::path::Path::new(&path), &mem);
    }
}

#[test]
fn killed_writer_leaves_previous_snapshot_intact() {
    let dir = temp_dir("crash");
    let path = dir.path().join("s.snap");
    write(&path, &memory());
    let id = SnapshotFile::open(&path).unwrap().id();
    for delay_ms in [5u64, 30, 80] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "reader::tests::crash_helper_rewrites_snapshot", "--include-ignored", "--nocapture"])
            .env("SM_SNAP_CRASH_PATH", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever moment the kill hit, the final name holds a complete snapshot:
        // either the old one or a complete new one.
        let snap = SnapshotFile::open(&path).unwrap();
        assert!(snap.id() == id || snap.ram_size() == 64 * MIB);
    }
}
