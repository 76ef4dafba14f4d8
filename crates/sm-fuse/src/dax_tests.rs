//! FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING on a server with a DAX window,
//! hostile ones included, and a DAX session carried through save/restore.

use fuse_abi::linux::{self as abi, fuse_opcode as op};
use zerocopy::IntoBytes;

use crate::tests::{err, lookup, ok, req, tmp, ROOT};
use crate::{FuseServer, SessionError, ShareConfig};

const MIB2: u64 = 2 << 20;

fn dax_server(dir: &std::path::Path, read_only: bool, window: u64) -> FuseServer {
    let s = FuseServer::new(&ShareConfig { read_only, dax_window: window, ..ShareConfig::new(dir) }).unwrap();
    let init = abi::fuse_init_in {
        major: 7,
        minor: 36,
        max_readahead: 1 << 17,
        flags: abi::FUSE_MAP_ALIGNMENT,
        ..Default::default()
    };
    let out = ok(&s, &req(op::FUSE_INIT, 0, init.as_bytes()));
    let (out, _) = <abi::fuse_init_out as zerocopy::FromBytes>::read_from_prefix(&out).unwrap();
    assert_eq!(out.flags & abi::FUSE_MAP_ALIGNMENT, abi::FUSE_MAP_ALIGNMENT);
    assert_eq!(out.map_alignment, 12);
    s
}

fn setup(node: u64, foffset: u64, len: u64, moffset: u64, write: bool) -> Vec<u8> {
    let mut flags = u64::from(abi::FUSE_SETUPMAPPING_FLAG_READ);
    if write {
        flags |= u64::from(abi::FUSE_SETUPMAPPING_FLAG_WRITE);
    }
    let m = abi::fuse_setupmapping_in { fh: u64::MAX, foffset, len, flags, moffset };
    req(op::FUSE_SETUPMAPPING, node, m.as_bytes())
}

fn remove(ranges: &[(u64, u64)], claimed: u32) -> Vec<u8> {
    let mut body = abi::fuse_removemapping_in { count: claimed }.as_bytes().to_vec();
    for &(moffset, len) in ranges {
        body.extend_from_slice(abi::fuse_removemapping_one { moffset, len }.as_bytes());
    }
    req(op::FUSE_REMOVEMAPPING, 0, &body)
}

fn window_bytes(s: &FuseServer, offset: u64, n: usize) -> Vec<u8> {
    let (base, _) = s.dax_window().unwrap();
    // SAFETY: the tests read only ranges they mapped.
    unsafe { std::slice::from_raw_parts((base + offset) as *const u8, n).to_vec() }
}

#[test]
fn the_guest_maps_file_pages_and_writes_land_in_the_file() {
    let dir = tmp();
    let mut data = vec![b'r'; 3 << 20];
    data[MIB2 as usize..].fill(b's');
    std::fs::write(dir.path().join("f"), &data).unwrap();
    let s = dax_server(dir.path(), false, 4 << 20);
    let node = lookup(&s, ROOT, "f").unwrap().nodeid;
    ok(&s, &setup(node, MIB2, MIB2, MIB2, true));
    assert_eq!(window_bytes(&s, MIB2, 2), b"ss");
    let (base, _) = s.dax_window().unwrap();
    // SAFETY: mapped writable just above.
    unsafe { *((base + MIB2) as *mut u8) = b'W' };
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap()[MIB2 as usize], b'W');
    ok(&s, &remove(&[(MIB2, MIB2)], 1));
}

#[test]
fn hostile_mappings_get_errors_and_leave_the_window_alone() {
    let dir = tmp();
    std::fs::write(dir.path().join("f"), vec![1u8; 4096]).unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let s = dax_server(dir.path(), false, 4 << 20);
    let f = lookup(&s, ROOT, "f").unwrap().nodeid;
    let d = lookup(&s, ROOT, "d").unwrap().nodeid;
    // Outside the window, wrapping, unaligned, a directory, an unknown node.
    assert_eq!(err(&s, &setup(f, 0, MIB2, 4 << 20, false)), libc::EINVAL);
    assert_eq!(err(&s, &setup(f, 0, MIB2, u64::MAX - 4095, false)), libc::EINVAL);
    assert_eq!(err(&s, &setup(f, 1, 4096, 0, false)), libc::EINVAL);
    assert_eq!(err(&s, &setup(f, 0, 4096, 7, false)), libc::EINVAL);
    assert_eq!(err(&s, &setup(d, 0, 4096, 0, false)), libc::EINVAL);
    assert_eq!(err(&s, &setup(999, 0, 4096, 0, false)), libc::ESTALE);
    // A count beyond the ranges sent; a range beyond the window.
    assert_eq!(err(&s, &remove(&[(0, MIB2)], 1000)), libc::EINVAL);
    // Not whole 2 MiB ranges.
    assert_eq!(err(&s, &setup(f, 0, 4096, 0, false)), libc::EINVAL);
    assert_eq!(err(&s, &setup(f, 0, MIB2, 4096, false)), libc::EINVAL);
    assert_eq!(err(&s, &remove(&[(4 << 20, 4096)], 1)), libc::EINVAL);
    // Short bodies.
    assert_eq!(err(&s, &req(op::FUSE_SETUPMAPPING, f, &[0u8; 8])), libc::EINVAL);
    assert_eq!(err(&s, &req(op::FUSE_REMOVEMAPPING, 0, &[])), libc::EINVAL);

    // No window: the kernel is told the operation does not exist.
    let plain = crate::tests::server(dir.path(), false);
    let f = lookup(&plain, ROOT, "f").unwrap().nodeid;
    assert_eq!(err(&plain, &setup(f, 0, 4096, 0, false)), libc::ENOSYS);
    // Read-only share: no writable mapping.
    let ro = dax_server(dir.path(), true, MIB2);
    let f = lookup(&ro, ROOT, "f").unwrap().nodeid;
    assert_eq!(err(&ro, &setup(f, 0, MIB2, 0, true)), libc::EROFS);
    ok(&ro, &setup(f, 0, MIB2, 0, false));
}

#[test]
fn dax_mappings_come_back_with_the_session_or_the_restore_is_refused() {
    let dir = tmp();
    std::fs::write(dir.path().join("f"), vec![b'm'; 4096]).unwrap();
    let s = dax_server(dir.path(), false, 4 << 20);
    let f = lookup(&s, ROOT, "f").unwrap().nodeid;
    ok(&s, &setup(f, 0, MIB2, 0, true));
    let (state, _) = s.save_session().unwrap();
    drop(s);

    let r = FuseServer::new(&ShareConfig { dax_window: 4 << 20, ..ShareConfig::new(dir.path()) }).unwrap();
    r.restore_session(&state).unwrap();
    assert_eq!(window_bytes(&r, 0, 3), b"mmm", "the mapping is back at its window offset");

    // Another window size, or none: refused, naming both.
    for window in [0, MIB2] {
        let other = FuseServer::new(&ShareConfig { dax_window: window, ..ShareConfig::new(dir.path()) }).unwrap();
        let e = other.restore_session(&state).unwrap_err();
        assert!(matches!(e, SessionError::DaxWindow { snapshot: 4194304, .. }), "{e}");
    }
    // The mapped file renamed after the mapping: saved under its new name.
    let s = dax_server(dir.path(), false, 4 << 20);
    let f = lookup(&s, ROOT, "f").unwrap().nodeid;
    ok(&s, &setup(f, 0, MIB2, 0, false));
    std::fs::rename(dir.path().join("f"), dir.path().join("g")).unwrap();
    let (renamed, _) = s.save_session().unwrap();
    let r = FuseServer::new(&ShareConfig { dax_window: 4 << 20, ..ShareConfig::new(dir.path()) }).unwrap();
    r.restore_session(&renamed).unwrap();
    assert_eq!(window_bytes(&r, 0, 1), b"m");
    // A mapped file deleted: the snapshot itself is refused, saying so.
    std::fs::remove_file(dir.path().join("g")).unwrap();
    assert!(matches!(s.save_session(), Err(SessionError::DaxUnnamed { offset: 0 })));
    drop(s);
    // The mapped file gone at restore time: refused, naming it.
    let gone = FuseServer::new(&ShareConfig { dax_window: 4 << 20, ..ShareConfig::new(dir.path()) }).unwrap();
    let e = gone.restore_session(&state).unwrap_err();
    assert!(matches!(&e, SessionError::DaxMapping { path, .. } if path == b"f"), "{e}");
}
