//! FUSE requests from a guest to a shared directory: a run of requests
//! (split at each header's length) against a server on a temporary directory
//! with a few files and a small DAX window, after a valid INIT; the session
//! it leaves is then saved and restored into a new server (which must take
//! it). And arbitrary bytes as a saved session.

use fuse_abi::linux::{self as abi, fuse_opcode as op};
use sm_fuse::{FuseServer, ShareConfig};
use zerocopy::IntoBytes;

use crate::Target;

/// Requests one input may hold.
const MAX_REQUESTS: usize = 64;
const HEADER: usize = std::mem::size_of::<abi::fuse_in_header>();

pub fn request() -> Target {
    Target {
        name: "fuse-requests",
        what: "sm-fuse: FuseServer::handle on a run of arbitrary requests (read-write share in a temp dir, 2 MiB DAX \
               window), then its session saved and restored",
        run,
        seeds,
        max_len: 2048,
        cost: 10,
    }
}

fn req(opcode: op, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let len = HEADER + body.len();
    let h = abi::fuse_in_header { len: len as u32, opcode: opcode as u32, unique: 1, nodeid, ..Default::default() };
    [h.as_bytes(), body].concat()
}

fn name(n: &str) -> Vec<u8> {
    [n.as_bytes(), b"\0"].concat()
}

/// Arbitrary bytes as a snapshot's virtio-fs session.
pub fn session() -> Target {
    Target {
        name: "fuse-session",
        what: "sm-fuse: FuseServer::restore_session on arbitrary bytes (a share in a temp dir, 2 MiB DAX window)",
        run: run_session,
        seeds: session_seeds,
        max_len: 1024,
        cost: 5,
    }
}

const WINDOW: u64 = 2 << 20;

/// A share with a file, a directory and a link out to a canary beside it.
fn share() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let top = tempfile::tempdir().expect("temp dir");
    let dir = top.path().join("share");
    std::fs::create_dir(&dir).expect("share dir");
    // Outside the share, where a link in it points: it must stay as it is.
    let canary = top.path().join("canary");
    std::fs::write(&canary, b"outside\n").expect("canary");
    std::fs::write(dir.join("file"), b"contents\n").expect("seed file");
    std::fs::create_dir(dir.join("sub")).expect("seed dir");
    std::os::unix::fs::symlink(&canary, dir.join("link")).expect("seed link");
    (top, dir, canary)
}

fn server(dir: &std::path::Path) -> FuseServer {
    let config = ShareConfig { max_inodes: 64, max_handles: 16, dax_window: WINDOW, ..ShareConfig::new(dir) };
    FuseServer::new(&config).expect("server")
}

fn untouched_outside(top: &std::path::Path, canary: &std::path::Path) {
    let outside: Vec<_> = std::fs::read_dir(top).expect("list").flatten().map(|e| e.file_name()).collect();
    assert_eq!(outside.len(), 2, "nothing made beside the share: {outside:?}");
    assert_eq!(std::fs::read(canary).expect("canary"), b"outside\n", "a file outside the share changed");
}

fn run_session(data: &[u8]) {
    let (top, dir, canary) = share();
    let server = server(&dir);
    let _ = server.restore_session(data);
    let (inodes, handles) = server.held();
    assert!(inodes <= 65 && handles <= 16, "tables past their bounds: {inodes} inodes, {handles} handles");
    untouched_outside(top.path(), &canary);
}

fn session_seeds() -> Vec<Vec<u8>> {
    // The session a few requests leave, so mutations start from valid states.
    let (_top, dir, _) = share();
    let s = server(&dir);
    let init = abi::fuse_init_in { major: 7, minor: 36, flags: u32::MAX, ..Default::default() };
    s.handle(&req(op::FUSE_INIT, 0, init.as_bytes()));
    for r in seeds() {
        s.handle(&r);
    }
    vec![s.save_session().expect("save").0]
}

fn run(data: &[u8]) {
    let (top, dir, canary) = share();
    let server = server(&dir);
    let init = abi::fuse_init_in { major: 7, minor: 36, max_readahead: 1 << 17, flags: u32::MAX, ..Default::default() };
    server.handle(&req(op::FUSE_INIT, 0, init.as_bytes())).expect("INIT is answered");
    let mut rest = data;
    for _ in 0..MAX_REQUESTS {
        if rest.is_empty() {
            break;
        }
        let n = if rest.len() < HEADER {
            rest.len()
        } else {
            let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            len.clamp(HEADER, rest.len())
        };
        if let Some(reply) = server.handle(&rest[..n]) {
            let out_len = u32::from_le_bytes(reply[..4].try_into().expect("a reply has a header")) as usize;
            assert_eq!(out_len, reply.len(), "the reply's header length is its length");
        }
        rest = &rest[n..];
    }
    let (inodes, handles) = server.held();
    assert!(inodes <= 65 && handles <= 16, "tables past their bounds: {inodes} inodes, {handles} handles");
    // Whatever the session became, a new server over the same share takes it.
    let (state, _) = server.save_session().expect("a session saves");
    drop(server);
    server_restored(&dir, &state);
    untouched_outside(top.path(), &canary);
}

fn server_restored(dir: &std::path::Path, state: &[u8]) {
    let restored = server(dir);
    if let Err(e) = restored.restore_session(state) {
        // Only a mapped file that is gone now (the run deleted it) may refuse.
        assert!(matches!(e, sm_fuse::SessionError::DaxMapping { .. }), "a saved session was refused: {e}");
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let lookup = req(op::FUSE_LOOKUP, abi::FUSE_ROOT_ID, &name("file"));
    let getattr = req(op::FUSE_GETATTR, 2, abi::fuse_getattr_in::default().as_bytes());
    let open = req(op::FUSE_OPEN, 2, abi::fuse_open_in::default().as_bytes());
    let read =
        req(op::FUSE_READ, 2, abi::fuse_read_in { fh: 0, offset: 0, size: 4096, ..Default::default() }.as_bytes());
    let opendir = req(op::FUSE_OPENDIR, abi::FUSE_ROOT_ID, abi::fuse_open_in::default().as_bytes());
    let readdir =
        req(op::FUSE_READDIR, abi::FUSE_ROOT_ID, abi::fuse_read_in { size: 4096, ..Default::default() }.as_bytes());
    let mkdir = req(
        op::FUSE_MKDIR,
        abi::FUSE_ROOT_ID,
        &[abi::fuse_mkdir_in { mode: 0o755, umask: 0 }.as_bytes(), &name("new")].concat(),
    );
    let write = req(
        op::FUSE_WRITE,
        2,
        &[abi::fuse_write_in { fh: 0, offset: 0, size: 5, ..Default::default() }.as_bytes(), b"hello"].concat(),
    );
    let rename = req(
        op::FUSE_RENAME,
        abi::FUSE_ROOT_ID,
        &[abi::fuse_rename_in { newdir: abi::FUSE_ROOT_ID }.as_bytes(), &name("file"), &name("moved")].concat(),
    );
    let lookup_link = req(op::FUSE_LOOKUP, abi::FUSE_ROOT_ID, &name("link"));
    let readlink = req(op::FUSE_READLINK, 3, &[]);
    let forget = req(op::FUSE_FORGET, 2, abi::fuse_forget_in { nlookup: 1 }.as_bytes());
    let map = req(
        op::FUSE_SETUPMAPPING,
        2,
        abi::fuse_setupmapping_in { fh: u64::MAX, foffset: 0, len: WINDOW, flags: 3, moffset: 0 }.as_bytes(),
    );
    let unmap = req(
        op::FUSE_REMOVEMAPPING,
        0,
        &[
            abi::fuse_removemapping_in { count: 1 }.as_bytes(),
            abi::fuse_removemapping_one { moffset: 0, len: 4096 }.as_bytes(),
        ]
        .concat(),
    );
    vec![
        [lookup.clone(), map, unmap].concat(),
        [lookup.clone(), getattr, open.clone(), read, write].concat(),
        [opendir, readdir].concat(),
        [mkdir, rename, lookup_link, readlink].concat(),
        [lookup, open, forget].concat(),
    ]
}
