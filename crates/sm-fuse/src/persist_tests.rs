//! A FUSE session saved and restored into a new server, as a snapshot and a
//! restore in another process do: what comes back, what does not, and
//! crafted states.

use fuse_abi::linux::fuse_opcode as op;

use crate::tests::{call, create, err, lookup, ok, open, read, req, server, tmp, write, ROOT};
use crate::{FuseServer, SessionError, SessionReport, ShareConfig};

/// A server over `dir` that has not seen FUSE_INIT (a restore's).
fn fresh(dir: &std::path::Path, read_only: bool) -> FuseServer {
    FuseServer::new(&ShareConfig { read_only, ..ShareConfig::new(dir) }).unwrap()
}

#[test]
fn nodes_and_open_files_come_back_by_path_in_a_new_server() {
    let dir = tmp();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/kept"), b"kept bytes").unwrap();
    let s = server(dir.path(), false);
    let sub = lookup(&s, ROOT, "sub").unwrap().nodeid;
    let kept = lookup(&s, sub, "kept").unwrap().nodeid;
    let fh = open(&s, kept, libc::O_RDONLY).unwrap();
    let (made, made_fh) = create(&s, sub, "made", 0o644).unwrap();
    ok(&s, &write(made_fh, 0, b"before"));

    let (state, saved) = s.save_session().unwrap();
    assert_eq!(saved, SessionReport { nodes: 3, handles: 2, lost_nodes: 0, lost_handles: 0 });
    drop(s);

    let r = fresh(dir.path(), false);
    let restored = r.restore_session(&state).unwrap();
    assert_eq!(restored, SessionReport { nodes: 3, handles: 2, lost_nodes: 0, lost_handles: 0 });
    assert!(r.is_initialized(), "the guest does not send FUSE_INIT again after a restore");
    // The same node ids and handles reach the same files.
    assert_eq!(ok(&r, &read(fh, 0, 100, op::FUSE_READ)), b"kept bytes");
    ok(&r, &write(made_fh, 6, b" after"));
    assert_eq!(std::fs::read(dir.path().join("sub/made")).unwrap(), b"before after");
    assert_eq!(lookup(&r, sub, "kept").unwrap().nodeid, kept);
    let (e, _) = call(&r, &req(op::FUSE_GETATTR, made, &[0u8; 16]));
    assert_eq!(e, 0);
    // New ids never reuse old ones.
    let (newer, newer_fh) = create(&r, ROOT, "newer", 0o644).unwrap();
    assert!(newer > made && newer > kept && newer_fh > made_fh.max(fh));
}

#[test]
fn deleted_moved_and_changed_files_are_stale_not_another_file() {
    let dir = tmp();
    for f in ["gone", "replaced", "unlinked-open"] {
        std::fs::write(dir.path().join(f), f).unwrap();
    }
    let s = server(dir.path(), false);
    let gone = lookup(&s, ROOT, "gone").unwrap().nodeid;
    let replaced = lookup(&s, ROOT, "replaced").unwrap().nodeid;
    let unlinked = lookup(&s, ROOT, "unlinked-open").unwrap().nodeid;
    let unlinked_fh = open(&s, unlinked, libc::O_RDONLY).unwrap();
    // An open file deleted on the host before the snapshot is not recorded.
    std::fs::remove_file(dir.path().join("unlinked-open")).unwrap();
    let (state, saved) = s.save_session().unwrap();
    assert_eq!((saved.nodes, saved.lost_nodes, saved.lost_handles), (2, 1, 1));
    drop(s);

    // Between snapshot and restore: one file deleted, one replaced by a directory.
    std::fs::remove_file(dir.path().join("gone")).unwrap();
    std::fs::remove_file(dir.path().join("replaced")).unwrap();
    std::fs::create_dir(dir.path().join("replaced")).unwrap();
    let r = fresh(dir.path(), false);
    let report = r.restore_session(&state).unwrap();
    assert_eq!((report.nodes, report.lost_nodes), (0, 2));
    for node in [gone, replaced, unlinked] {
        assert_eq!(err(&r, &req(op::FUSE_GETATTR, node, &[0u8; 16])), libc::ESTALE);
    }
    assert_eq!(err(&r, &read(unlinked_fh, 0, 10, op::FUSE_READ)), libc::EBADF);
    // The directory now at "replaced" gets a new id, not the file's.
    assert_ne!(lookup(&r, ROOT, "replaced").unwrap().nodeid, replaced);
}

#[test]
fn a_path_through_a_symlink_now_is_not_followed_out() {
    let dir = tmp();
    let outside = tmp();
    std::fs::write(outside.path().join("secret"), b"host secret").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/secret"), b"shared").unwrap();
    let s = server(dir.path(), false);
    let d = lookup(&s, ROOT, "d").unwrap().nodeid;
    let node = lookup(&s, d, "secret").unwrap().nodeid;
    let fh = open(&s, node, libc::O_RDONLY).unwrap();
    let (state, _) = s.save_session().unwrap();
    drop(s);
    // The host swaps the directory for a symlink out of the share.
    std::fs::remove_dir_all(dir.path().join("d")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("d")).unwrap();
    let r = fresh(dir.path(), false);
    let report = r.restore_session(&state).unwrap();
    assert_eq!((report.nodes, report.handles), (0, 0), "d is a symlink now, not the directory it was");
    assert_eq!(err(&r, &read(fh, 0, 100, op::FUSE_READ)), libc::EBADF);
    assert_eq!(err(&r, &req(op::FUSE_GETATTR, node, &[0u8; 16])), libc::ESTALE);
}

#[test]
fn a_writable_handle_does_not_come_back_on_a_read_only_share() {
    let dir = tmp();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    let s = server(dir.path(), false);
    let node = lookup(&s, ROOT, "f").unwrap().nodeid;
    let rw = open(&s, node, libc::O_RDWR).unwrap();
    let ro = open(&s, node, libc::O_RDONLY).unwrap();
    let (state, _) = s.save_session().unwrap();
    let r = fresh(dir.path(), true);
    let report = r.restore_session(&state).unwrap();
    assert_eq!((report.handles, report.lost_handles), (1, 1));
    assert_eq!(err(&r, &read(rw, 0, 10, op::FUSE_READ)), libc::EBADF);
    assert_eq!(ok(&r, &read(ro, 0, 10, op::FUSE_READ)), b"x");
}

#[test]
fn crafted_states_are_refused_without_touching_the_host() {
    let dir = tmp();
    let s = server(dir.path(), false);
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    lookup(&s, ROOT, "f").unwrap();
    let (good, _) = s.save_session().unwrap();
    let r = fresh(dir.path(), false);
    // Every truncation is an error, never a panic.
    for n in 0..good.len() {
        assert!(matches!(r.restore_session(&good[..n]), Err(SessionError::Corrupt(_))), "prefix {n}");
    }
    // Paths that would leave the share: "..", absolute, empty or "." components.
    // Layout: 29 header bytes, then the one node: id, lookups, kind (20 bytes),
    // its path (length + bytes), then the handle count, the DAX window length
    // and the mapping count.
    assert_eq!(good.len(), 29 + 20 + 4 + 1 + 4 + 8 + 4);
    for evil in [&b".."[..], b"/etc/passwd", b"a//b", b"./f", b"f/.."] {
        let mut crafted = good[..49].to_vec();
        crafted.extend_from_slice(&(evil.len() as u32).to_le_bytes());
        crafted.extend_from_slice(evil);
        crafted.extend_from_slice(&[0u8; 16]);
        let refused = r.restore_session(&crafted);
        assert!(matches!(refused, Err(SessionError::Corrupt(_))), "{}: {refused:?}", evil.escape_ascii());
    }
    // A count far beyond the data.
    let mut huge = good[..29].to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(r.restore_session(&huge), Err(SessionError::Corrupt(_))));
    // More nodes than the restoring server may hold.
    let small = FuseServer::new(&ShareConfig { max_inodes: 0, ..ShareConfig::new(dir.path()) }).unwrap();
    assert!(matches!(small.restore_session(&good), Err(SessionError::TooMany { .. })));
}

#[test]
fn a_fifo_now_at_a_handles_path_is_not_opened() {
    let dir = tmp();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    let s = server(dir.path(), false);
    let node = lookup(&s, ROOT, "f").unwrap().nodeid;
    let fh = open(&s, node, libc::O_RDONLY).unwrap();
    let (state, _) = s.save_session().unwrap();
    drop(s);
    std::fs::remove_file(dir.path().join("f")).unwrap();
    let fifo = std::ffi::CString::new(dir.path().join("f").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path for the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // Opening a FIFO for reading would block with no writer: it must not be opened.
    let r = fresh(dir.path(), false);
    let report = r.restore_session(&state).unwrap();
    assert_eq!((report.handles, report.lost_handles), (0, 1));
    assert_eq!(err(&r, &read(fh, 0, 1, op::FUSE_READ)), libc::EBADF);
}
