//! The server on a real temporary directory, driven by hand-made FUSE
//! requests (well-formed and hostile), and the device on mock queues.

use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use fuse_abi::linux::{self as abi, fuse_opcode as op};
use zerocopy::{FromBytes, IntoBytes};

use crate::{FuseServer, ShareConfig, MAX_IO};

pub(crate) const ROOT: u64 = abi::FUSE_ROOT_ID;

/// A request: header (len filled in) + body.
pub(crate) fn req(opcode: op, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let len = std::mem::size_of::<abi::fuse_in_header>() + body.len();
    let h = abi::fuse_in_header { len: len as u32, opcode: opcode as u32, unique: 7, nodeid, ..Default::default() };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

pub(crate) fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The reply's error (0 = success) and payload.
pub(crate) fn call(s: &FuseServer, bytes: &[u8]) -> (i32, Vec<u8>) {
    let reply = s.handle(bytes).expect("a reply");
    let (h, payload) = abi::fuse_out_header::read_from_prefix(&reply).expect("out header");
    assert_eq!(h.len as usize, reply.len(), "out header length");
    assert_eq!(h.unique, 7);
    (h.error, payload.to_vec())
}

pub(crate) fn ok(s: &FuseServer, bytes: &[u8]) -> Vec<u8> {
    let (e, p) = call(s, bytes);
    assert_eq!(e, 0, "request failed with errno {}", -e);
    p
}

pub(crate) fn err(s: &FuseServer, bytes: &[u8]) -> i32 {
    let (e, _) = call(s, bytes);
    assert!(e < 0, "expected an error");
    -e
}

pub(crate) fn server(dir: &Path, read_only: bool) -> FuseServer {
    let config = ShareConfig { read_only, ..ShareConfig::new(dir) };
    let s = FuseServer::new(&config).unwrap();
    let init = abi::fuse_init_in { major: 7, minor: 36, max_readahead: 1 << 17, flags: u32::MAX, ..Default::default() };
    let out = ok(&s, &req(op::FUSE_INIT, 0, init.as_bytes()));
    let out = abi::fuse_init_out::read_from_prefix(&out).unwrap().0;
    assert_eq!((out.major, out.max_write), (7, MAX_IO as u32));
    s
}

pub(crate) fn name(n: &str) -> Vec<u8> {
    cat(&[n.as_bytes(), b"\0"])
}

pub(crate) fn lookup(s: &FuseServer, parent: u64, n: &str) -> Result<abi::fuse_entry_out, i32> {
    let (e, p) = call(s, &req(op::FUSE_LOOKUP, parent, &name(n)));
    if e < 0 {
        return Err(-e);
    }
    Ok(abi::fuse_entry_out::read_from_prefix(&p).unwrap().0)
}

pub(crate) fn create(s: &FuseServer, parent: u64, n: &str, mode: u32) -> Result<(u64, u64), i32> {
    let c = abi::fuse_create_in { flags: libc::O_RDWR as u32, mode: libc::S_IFREG | mode, umask: 0, open_flags: 0 };
    let (e, p) = call(s, &req(op::FUSE_CREATE, parent, &cat(&[c.as_bytes(), &name(n)])));
    if e < 0 {
        return Err(-e);
    }
    let (entry, rest) = abi::fuse_entry_out::read_from_prefix(&p).unwrap();
    let open = abi::fuse_open_out::read_from_prefix(rest).unwrap().0;
    Ok((entry.nodeid, open.fh))
}

pub(crate) fn write(fh: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let w = abi::fuse_write_in { fh, offset, size: data.len() as u32, ..Default::default() };
    req(op::FUSE_WRITE, 0, &cat(&[w.as_bytes(), data]))
}

pub(crate) fn read(fh: u64, offset: u64, size: u32, opcode: op) -> Vec<u8> {
    let r = abi::fuse_read_in { fh, offset, size, ..Default::default() };
    req(opcode, 0, r.as_bytes())
}

pub(crate) fn open(s: &FuseServer, node: u64, flags: i32) -> Result<u64, i32> {
    let o = abi::fuse_open_in { flags: flags as u32, open_flags: 0 };
    let (e, p) = call(s, &req(op::FUSE_OPEN, node, o.as_bytes()));
    if e < 0 {
        return Err(-e);
    }
    Ok(abi::fuse_open_out::read_from_prefix(&p).unwrap().0.fh)
}

pub(crate) fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("sm-fuse-").tempdir().unwrap()
}

#[test]
fn files_cross_both_ways_with_modes_and_times() {
    let dir = tmp();
    std::fs::write(dir.path().join("from-host"), b"host bytes").unwrap();
    let s = server(dir.path(), false);

    // Host -> guest.
    let e = lookup(&s, ROOT, "from-host").unwrap();
    assert_eq!(e.attr.size, 10);
    let fh = open(&s, e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(ok(&s, &read(fh, 0, 4096, op::FUSE_READ)), b"host bytes");
    assert_eq!(ok(&s, &read(fh, 5, 3, op::FUSE_READ)), b"byt");

    // Guest -> host, then mode and mtime set as the guest asks.
    let (node, fh) = create(&s, ROOT, "from-guest", 0o600).unwrap();
    let out = ok(&s, &write(fh, 0, b"guest bytes"));
    assert_eq!(abi::fuse_write_out::read_from_prefix(&out).unwrap().0.size, 11);
    let set = abi::fuse_setattr_in {
        valid: abi::FATTR_MODE | abi::FATTR_MTIME,
        mode: 0o640,
        mtime: 981_173_106,
        mtimensec: 5,
        ..Default::default()
    };
    let attr = ok(&s, &req(op::FUSE_SETATTR, node, set.as_bytes()));
    let attr = abi::fuse_attr_out::read_from_prefix(&attr).unwrap().0.attr;
    assert_eq!((attr.mode & 0o7777, attr.mtime, attr.size), (0o640, 981_173_106, 11));
    let host = std::fs::metadata(dir.path().join("from-guest")).unwrap();
    assert_eq!((host.mode() & 0o7777, host.mtime()), (0o640, 981_173_106));
    assert_eq!(std::fs::read(dir.path().join("from-guest")).unwrap(), b"guest bytes");

    // Directories, listing, rename and removal inside the share.
    let mk = abi::fuse_mkdir_in { mode: 0o755, umask: 0 };
    let sub = abi::fuse_entry_out::read_from_prefix(&ok(
        &s,
        &req(op::FUSE_MKDIR, ROOT, &cat(&[mk.as_bytes(), &name("sub")])),
    ))
    .unwrap()
    .0;
    let rn = abi::fuse_rename_in { newdir: sub.nodeid };
    ok(&s, &req(op::FUSE_RENAME, ROOT, &cat(&[rn.as_bytes(), &name("from-guest"), &name("moved")])));
    assert!(dir.path().join("sub/moved").exists());
    let dh = abi::fuse_open_out::read_from_prefix(&ok(&s, &req(op::FUSE_OPENDIR, sub.nodeid, &[0; 8]))).unwrap().0.fh;
    let listing = ok(&s, &read(dh, 0, 4096, op::FUSE_READDIR));
    let names = dirent_names(&listing);
    assert!(names.contains(&"moved".to_string()) && names.contains(&".".to_string()), "{names:?}");
    ok(&s, &req(op::FUSE_UNLINK, sub.nodeid, &name("moved")));
    ok(&s, &req(op::FUSE_RMDIR, ROOT, &name("sub")));
    assert!(!dir.path().join("sub").exists());
}

fn dirent_names(mut buf: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    while buf.len() >= 24 {
        let namelen = u32::from_ne_bytes(buf[16..20].try_into().unwrap()) as usize;
        names.push(String::from_utf8_lossy(&buf[24..24 + namelen]).into_owned());
        let padded = (24 + namelen).div_ceil(8) * 8;
        buf = &buf[padded.min(buf.len())..];
    }
    names
}

#[test]
fn a_large_directory_lists_whole_across_readdir_calls() {
    let dir = tmp();
    for i in 0..10_000 {
        std::fs::write(dir.path().join(format!("file-{i:05}")), b"").unwrap();
    }
    let s = server(dir.path(), false);
    let dh = abi::fuse_open_out::read_from_prefix(&ok(&s, &req(op::FUSE_OPENDIR, ROOT, &[0; 8]))).unwrap().0.fh;
    let mut seen = std::collections::BTreeSet::new();
    let mut offset = 0u64;
    loop {
        let page = ok(&s, &read(dh, offset, 4096, op::FUSE_READDIR));
        if page.is_empty() {
            break;
        }
        let mut buf = &page[..];
        while buf.len() >= 24 {
            let next = u64::from_ne_bytes(buf[8..16].try_into().unwrap());
            let namelen = u32::from_ne_bytes(buf[16..20].try_into().unwrap()) as usize;
            seen.insert(String::from_utf8_lossy(&buf[24..24 + namelen]).into_owned());
            offset = next;
            buf = &buf[(24 + namelen).div_ceil(8) * 8..];
        }
    }
    assert_eq!(seen.len(), 10_002, "10k files plus . and ..");
}

#[test]
fn nothing_outside_the_share_is_reached() {
    let outside = tmp();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    let dir = tmp();
    // Planted on the host: symlinks out of the share.
    symlink(outside.path(), dir.path().join("out-dir")).unwrap();
    symlink(outside.path().join("secret"), dir.path().join("out-file")).unwrap();
    symlink("/proc/self/root/etc/passwd", dir.path().join("magic")).unwrap();
    let s = server(dir.path(), false);

    // A symlink is an inode of its own: read back, never followed.
    let link = lookup(&s, ROOT, "out-dir").unwrap();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(ok(&s, &req(op::FUSE_READLINK, link.nodeid, &[])), outside.path().as_os_str().as_encoded_bytes());
    assert_eq!(lookup(&s, link.nodeid, "secret").unwrap_err(), libc::ENOTDIR, "no lookup through a symlink");
    for planted in ["out-file", "magic"] {
        let e = lookup(&s, ROOT, planted).unwrap();
        assert_eq!(open(&s, e.nodeid, libc::O_RDONLY).unwrap_err(), libc::ELOOP, "{planted}");
    }
    // Names that are paths, dot-dot or too long never reach the host.
    for bad in ["..", ".", "a/b", "../../etc"] {
        assert_eq!(lookup(&s, ROOT, bad).unwrap_err(), libc::EINVAL, "{bad}");
    }
    assert_eq!(lookup(&s, ROOT, &"x".repeat(256)).unwrap_err(), libc::ENAMETOOLONG);
    // A symlink the guest makes to / stays a symlink.
    let target = name("/");
    ok(&s, &req(op::FUSE_SYMLINK, ROOT, &cat(&[&name("root-link"), &target])));
    assert_eq!(std::fs::read_link(dir.path().join("root-link")).unwrap(), Path::new("/"));
    let e = lookup(&s, ROOT, "root-link").unwrap();
    assert_eq!(lookup(&s, e.nodeid, "etc").unwrap_err(), libc::ENOTDIR);
    // Renaming to a path out of the share is a bad name.
    let (_, _) = create(&s, ROOT, "f", 0o644).unwrap();
    let rn = abi::fuse_rename_in { newdir: ROOT };
    assert_eq!(err(&s, &req(op::FUSE_RENAME, ROOT, &cat(&[rn.as_bytes(), &name("f"), &name("../f")]))), libc::EINVAL);
    // No device nodes; no hard links of directories.
    let mk = abi::fuse_mknod_in { mode: libc::S_IFCHR | 0o666, rdev: 0x0103, umask: 0, padding: 0 };
    assert_eq!(err(&s, &req(op::FUSE_MKNOD, ROOT, &cat(&[mk.as_bytes(), &name("null")]))), libc::EPERM);
    let ln = abi::fuse_link_in { oldnodeid: ROOT };
    assert_eq!(err(&s, &req(op::FUSE_LINK, ROOT, &cat(&[ln.as_bytes(), &name("root2")]))), libc::EPERM);
    // The outside directory is untouched.
    let left: Vec<_> = std::fs::read_dir(outside.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["secret"]);
    assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"secret");
}

#[test]
fn a_read_only_share_refuses_every_change() {
    let dir = tmp();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    let s = server(dir.path(), true);
    assert_eq!(create(&s, ROOT, "new", 0o644).unwrap_err(), libc::EROFS);
    let e = lookup(&s, ROOT, "f").unwrap();
    assert_eq!(open(&s, e.nodeid, libc::O_WRONLY).unwrap_err(), libc::EROFS);
    assert_eq!(open(&s, e.nodeid, libc::O_RDONLY | libc::O_TRUNC).unwrap_err(), libc::EROFS);
    let mk = abi::fuse_mkdir_in { mode: 0o755, umask: 0 };
    assert_eq!(err(&s, &req(op::FUSE_MKDIR, ROOT, &cat(&[mk.as_bytes(), &name("d")]))), libc::EROFS);
    assert_eq!(err(&s, &req(op::FUSE_UNLINK, ROOT, &name("f"))), libc::EROFS);
    let set = abi::fuse_setattr_in { valid: abi::FATTR_SIZE, size: 0, ..Default::default() };
    assert_eq!(err(&s, &req(op::FUSE_SETATTR, e.nodeid, set.as_bytes())), libc::EROFS);
    let fh = open(&s, e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(err(&s, &write(fh, 0, b"y")), libc::EROFS);
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"x");
}

#[test]
fn hostile_requests_get_errors_never_a_panic() {
    let parent = tmp();
    let dir_path = parent.path().join("share");
    let outside = parent.path().join("outside");
    std::fs::create_dir(&dir_path).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep").unwrap();
    let s = FuseServer::new(&ShareConfig::new(dir_path.as_path())).unwrap();
    // Before INIT nothing is served.
    assert_eq!(err(&s, &req(op::FUSE_GETATTR, ROOT, &[])), libc::EIO);
    let s = server(dir_path.as_path(), false);
    // Not even a header: nothing to answer.
    assert!(s.handle(&[0u8; 10]).is_none());
    assert!(s.handle(&[]).is_none());
    // A header whose length lies.
    let mut lying = req(op::FUSE_GETATTR, ROOT, &[]);
    lying[0..4].copy_from_slice(&1000u32.to_ne_bytes());
    assert_eq!(err(&s, &lying), libc::EINVAL);
    // Unknown and unoffered opcodes.
    let mut unknown = req(op::FUSE_GETATTR, ROOT, &[]);
    unknown[4..8].copy_from_slice(&9999u32.to_ne_bytes());
    assert_eq!(err(&s, &unknown), libc::ENOSYS);
    assert_eq!(err(&s, &req(op::FUSE_SETUPMAPPING, ROOT, &[0; 40])), libc::ENOSYS);
    // Node ids and handles never handed out.
    assert_eq!(err(&s, &req(op::FUSE_GETATTR, 0xdead_beef, &[])), libc::ESTALE);
    assert_eq!(err(&s, &read(0xdead, 0, 10, op::FUSE_READ)), libc::EBADF);
    // Bodies too short for their argument struct, names without a NUL.
    assert_eq!(err(&s, &req(op::FUSE_READ, 0, &[1, 2, 3])), libc::EINVAL);
    assert_eq!(err(&s, &req(op::FUSE_LOOKUP, ROOT, b"no-nul")), libc::EINVAL);
    // A write claiming more data than it carries.
    let (_, fh) = create(&s, ROOT, "w", 0o644).unwrap();
    let w = abi::fuse_write_in { fh, offset: 0, size: 1 << 30, ..Default::default() };
    assert_eq!(err(&s, &req(op::FUSE_WRITE, 0, &cat(&[w.as_bytes(), b"abc"]))), libc::EINVAL);
    // A read asking for 4 GiB gets at most MAX_IO.
    std::fs::write(dir_path.as_path().join("w"), vec![1u8; 2 * MAX_IO]).unwrap();
    assert_eq!(ok(&s, &read(fh, 0, u32::MAX, op::FUSE_READ)).len(), MAX_IO);
    // A batch forget claiming a million entries with none behind it; forgets
    // of unknown nodes; the root cannot be forgotten.
    let batch = abi::fuse_batch_forget_in { count: 1_000_000, dummy: 0 };
    assert!(s.handle(&req(op::FUSE_BATCH_FORGET, 0, batch.as_bytes())).is_none());
    let forget = abi::fuse_forget_in { nlookup: u64::MAX };
    assert!(s.handle(&req(op::FUSE_FORGET, 0x1234, forget.as_bytes())).is_none());
    assert!(s.handle(&req(op::FUSE_FORGET, ROOT, forget.as_bytes())).is_none());
    assert!(lookup(&s, ROOT, "w").is_ok(), "the root still works");
    // Random bytes after a valid header for every opcode.
    let mut seed = 0x1234_5678_u64;
    for opcode in 0..60u32 {
        for len in [0usize, 1, 7, 40, 100, 300] {
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let mut r = req(op::FUSE_GETATTR, ROOT, &body);
            r[4..8].copy_from_slice(&opcode.to_ne_bytes());
            if opcode == op::FUSE_INIT as u32 || opcode == op::FUSE_DESTROY as u32 {
                continue;
            }
            let _ = s.handle(&r);
        }
    }
    // Random requests may create entries in the share (a guest may); nothing
    // beside it changes, and the server still answers.
    let beside: Vec<_> = std::fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside.len(), 2, "{beside:?}");
    let left: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["keep"]);
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    assert!(lookup(&s, ROOT, "w").is_ok());
}

#[test]
fn the_inode_and_handle_tables_are_bounded() {
    let dir = tmp();
    for i in 0..10 {
        std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
    }
    let config = ShareConfig { max_inodes: 4, max_handles: 2, ..ShareConfig::new(dir.path()) };
    let s = FuseServer::new(&config).unwrap();
    let init = abi::fuse_init_in { major: 7, minor: 36, ..Default::default() };
    ok(&s, &req(op::FUSE_INIT, 0, init.as_bytes()));
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(lookup(&s, ROOT, &format!("f{i}")).unwrap().nodeid);
    }
    assert_eq!(lookup(&s, ROOT, "f4").unwrap_err(), libc::ENFILE);
    // A second lookup of a known inode needs no new entry.
    assert_eq!(lookup(&s, ROOT, "f0").unwrap().nodeid, nodes[0]);
    // Forgetting frees room.
    let forget = abi::fuse_forget_in { nlookup: 2 };
    assert!(s.handle(&req(op::FUSE_FORGET, nodes[0], forget.as_bytes())).is_none());
    assert!(lookup(&s, ROOT, "f4").is_ok());
    open(&s, nodes[1], libc::O_RDONLY).unwrap();
    open(&s, nodes[1], libc::O_RDONLY).unwrap();
    assert_eq!(open(&s, nodes[1], libc::O_RDONLY).unwrap_err(), libc::EMFILE);
    assert_eq!(s.held().1, 2);
}

mod device {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::serve_chain;

    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

    fn mem() -> sm_virtio::GuestMemory {
        sm_virtio::GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn serve(s: &FuseServer, mem: &sm_virtio::GuestMemory, descs: &[(u64, u32, u16)]) -> u32 {
        let mq = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last { flags } else { flags | NEXT };
                RawDescriptor::from(Descriptor::new(addr, len, flags, if last { 0 } else { i as u16 + 1 }))
            })
            .collect();
        mq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        q.set_size(16);
        let chain = q.pop_descriptor_chain(mem).expect("a chain");
        serve_chain(s, mem, chain)
    }

    #[test]
    fn chains_carry_requests_and_replies_and_hostile_ones_are_refused() {
        let dir = tmp();
        let s = FuseServer::new(&ShareConfig::new(dir.path())).unwrap();
        let m = mem();
        // INIT split over two readable descriptors, reply into two writable ones.
        let init = abi::fuse_init_in { major: 7, minor: 36, ..Default::default() };
        let r = req(op::FUSE_INIT, 0, init.as_bytes());
        m.write_slice(&r[..20], GuestAddress(0x10000)).unwrap();
        m.write_slice(&r[20..], GuestAddress(0x20000)).unwrap();
        let used = serve(
            &s,
            &m,
            &[(0x10000, 20, 0), (0x20000, (r.len() - 20) as u32, 0), (0x30000, 30, W), (0x31000, 4096, W)],
        );
        assert_eq!(used as usize, 16 + std::mem::size_of::<abi::fuse_init_out>());
        let mut h = [0u8; 16];
        m.read_slice(&mut h, GuestAddress(0x30000)).unwrap();
        let h = abi::fuse_out_header::read_from_bytes(&h).unwrap();
        assert_eq!((h.error, h.unique), (0, 7));

        // A request longer than MAX_REQUEST is answered E2BIG from its header.
        let big = req(op::FUSE_GETATTR, ROOT, &[]);
        m.write_slice(&big, GuestAddress(0x100000)).unwrap();
        let used = serve(&s, &m, &[(0x100000, 0x200000, 0), (0x30000, 64, W)]);
        assert_eq!(used, 16);
        let mut h = [0u8; 16];
        m.read_slice(&mut h, GuestAddress(0x30000)).unwrap();
        assert_eq!(abi::fuse_out_header::read_from_bytes(&h).unwrap().error, -libc::E2BIG);

        // A reply that does not fit the writable room: ERANGE instead of a cut reply.
        m.write_slice(&req(op::FUSE_GETATTR, ROOT, &[]), GuestAddress(0x10000)).unwrap();
        let used = serve(&s, &m, &[(0x10000, 40, 0), (0x30000, 20, W)]);
        assert_eq!(used, 16);
        // No writable part, or readable bytes outside guest memory: nothing written.
        assert_eq!(serve(&s, &m, &[(0x10000, 40, 0)]), 0);
        assert_eq!(serve(&s, &m, &[(0x3f_ffff, 40, 0), (0x30000, 64, W)]), 0);
        // Writable only: no request at all.
        assert_eq!(serve(&s, &m, &[(0x30000, 64, W)]), 0);
    }
}
