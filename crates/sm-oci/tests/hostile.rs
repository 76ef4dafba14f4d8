//! Hostile and broken layers: refused, and nothing is written outside the target.

mod common;

use std::path::Path;

use common::layout::{self, gzip, sha, tar_bytes, Entry};
use common::{list_tree, TempDir};
use sm_oci::{Digest, Error, Unpacker};

/// A sandbox: `sandbox/target` is unpacked into; `sandbox/outside` holds a
/// sentinel file; afterwards the sandbox must hold nothing else.
struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    fn new(tag: &str) -> Sandbox {
        let dir = TempDir::new(tag);
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        std::fs::write(dir.join("outside/sentinel"), b"original").unwrap();
        Sandbox { dir }
    }
    fn target(&self) -> std::path::PathBuf {
        self.dir.join("target")
    }
    fn apply(&self, layers: &[Vec<Entry>]) -> sm_oci::Result<sm_oci::UnpackReport> {
        let mut u = Unpacker::new(&self.target())?;
        for (i, l) in layers.iter().enumerate() {
            let blob = gzip(&tar_bytes(l));
            u.apply_layer(&blob[..], &format!("layer{i}"), None, None)?;
        }
        u.finish()
    }
    /// Nothing but `target/` and the untouched sentinel next to it.
    fn assert_outside_untouched(&self) {
        let mut top: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert!(top.iter().all(|n| n == "outside" || n == "target"), "written outside the target: {top:?}");
        assert_eq!(list_tree(&self.dir.join("outside")), vec!["sentinel".to_string()]);
        assert_eq!(std::fs::read(self.dir.join("outside/sentinel")).unwrap(), b"original");
        assert!(!Path::new("/pwned-by-sm-oci-test").exists());
        assert!(!std::env::temp_dir().join("pwned-by-sm-oci-test").exists());
    }
}

fn assert_unsafe<T: std::fmt::Debug>(r: sm_oci::Result<T>, needle: &str) {
    match r {
        Err(Error::UnsafeEntry { reason, path }) => {
            assert!(reason.contains(needle) || path.contains(needle), "{path}: {reason}")
        }
        other => panic!("expected an unsafe-entry refusal ({needle}), got {other:?}"),
    }
}

#[test]
fn path_traversal_is_refused() {
    let s = Sandbox::new("traversal");
    assert_unsafe(s.apply(&[vec![layout::file("../outside/sentinel", b"pwned")]]), "..");
    assert_unsafe(s.apply(&[vec![layout::file("a/../../outside/x", b"pwned")]]), "..");
    assert_unsafe(s.apply(&[vec![layout::file("../../../../../../../../pwned-by-sm-oci-test", b"x")]]), "..");
    s.assert_outside_untouched();
}

#[test]
fn absolute_paths_are_relative_to_the_root() {
    // As containerd and Docker unpack them: `/x` is `<root>/x`, never the host's `/x`.
    let s = Sandbox::new("absolute");
    let outside = s.dir.join("outside/abs");
    s.apply(&[vec![
        Entry::Dir("/", 0o755),
        layout::file(outside.to_str().unwrap(), b"inside after all"),
        layout::file("/pwned-by-sm-oci-test", b"inside"),
        layout::file("/etc/../etc/hostname", b"box"),
    ]])
    .unwrap();
    let t = s.target();
    assert_eq!(std::fs::read(t.join(outside.strip_prefix("/").unwrap())).unwrap(), b"inside after all");
    assert_eq!(std::fs::read(t.join("pwned-by-sm-oci-test")).unwrap(), b"inside");
    assert_eq!(std::fs::read(t.join("etc/hostname")).unwrap(), b"box");
    // A hard link to an absolute name points inside the root too: here at nothing.
    s.assert_outside_untouched();
    let s = Sandbox::new("absolute-link");
    assert!(s.apply(&[vec![layout::hardlink("x", "/etc/passwd")]]).is_err());
    s.assert_outside_untouched();
    // `..` above the root is still refused, with or without a leading `/`.
    let s = Sandbox::new("absolute-dotdot");
    assert_unsafe(s.apply(&[vec![layout::file("/../pwned-by-sm-oci-test", b"x")]]), "..");
    s.assert_outside_untouched();
}

#[test]
fn writes_through_escaping_symlinks_are_refused() {
    let s = Sandbox::new("symlink");
    // Relative symlink climbing out, then a write through it (same layer and next layer).
    assert_unsafe(
        s.apply(&[vec![layout::symlink("esc", "../outside"), layout::file("esc/sentinel", b"pwned")]]),
        "outside the root",
    );
    assert_unsafe(
        s.apply(&[
            vec![layout::symlink("esc2", "../../../../..")],
            vec![layout::file("esc2/pwned-by-sm-oci-test", b"x")],
        ]),
        "outside the root",
    );
    // Chained: in-root symlink to a symlink that escapes.
    assert_unsafe(
        s.apply(&[vec![
            layout::symlink("hop1", "hop2"),
            layout::symlink("hop2", "sub/../../outside"),
            layout::file("hop1/new", b"x"),
        ]]),
        "outside the root",
    );
    // Hard link through an escaping symlink.
    assert_unsafe(
        s.apply(&[vec![layout::symlink("esc3", "../outside"), layout::hardlink("hl", "esc3/sentinel")]]),
        "outside the root",
    );
    // A whiteout through an escaping symlink must not delete outside files.
    assert_unsafe(
        s.apply(&[vec![layout::symlink("esc4", "../outside")], vec![layout::file("esc4/.wh.sentinel", b"")]]),
        "outside the root",
    );
    // Symlink loops.
    assert_unsafe(
        s.apply(&[vec![layout::symlink("loop", "loop"), layout::file("loop/x", b"x")]]),
        "levels of symbolic links",
    );
    s.assert_outside_untouched();
}

#[test]
fn absolute_symlinks_resolve_inside_the_root() {
    let s = Sandbox::new("abs-symlink");
    let outside = s.dir.join("outside");
    // An absolute symlink is the guest's path: a write through it lands inside the root.
    s.apply(&[
        vec![layout::symlink("abs", outside.to_str().unwrap()), layout::symlink("varrun", "/run")],
        vec![layout::file("abs/sentinel", b"inside"), layout::file("varrun/pid", b"1")],
    ])
    .unwrap();
    let inside = s.target().join(outside.strip_prefix("/").unwrap()).join("sentinel");
    assert_eq!(std::fs::read(&inside).unwrap(), b"inside");
    assert_eq!(std::fs::read(s.target().join("run/pid")).unwrap(), b"1");
    assert!(std::fs::symlink_metadata(s.target().join("abs")).unwrap().file_type().is_symlink());
    s.assert_outside_untouched();
}

#[test]
fn replacing_a_symlink_never_writes_through_it() {
    let s = Sandbox::new("replace");
    let sentinel = s.dir.join("outside/sentinel");
    // The last component is never followed: the file replaces the symlink.
    s.apply(&[vec![layout::symlink("f", sentinel.to_str().unwrap())], vec![layout::file("f", b"new")]]).unwrap();
    assert!(std::fs::symlink_metadata(s.target().join("f")).unwrap().is_file());
    assert_eq!(std::fs::read(s.target().join("f")).unwrap(), b"new");
    // A hard link in the root to a file, then a new file at the link's path: the
    // original keeps its content.
    s.apply(&[
        vec![layout::file("orig", b"orig"), layout::hardlink("link", "orig")],
        vec![layout::file("link", b"changed")],
    ])
    .unwrap();
    assert_eq!(std::fs::read(s.target().join("orig")).unwrap(), b"orig");
    s.assert_outside_untouched();
}

#[test]
fn device_nodes_are_made_as_root_and_skipped_with_a_warning_otherwise() {
    use std::os::unix::fs::FileTypeExt;
    let s = Sandbox::new("devices");
    let report = s.apply(&[vec![Entry::CharDev("dev/mem".into()), Entry::BlockDev("dev/sda".into())]]).unwrap();
    let meta = |p: &str| std::fs::symlink_metadata(s.target().join(p));
    if rustix::process::geteuid().is_root() {
        // As containerd does: the image's nodes exist in its root disk.
        assert!(meta("dev/mem").unwrap().file_type().is_char_device());
        assert!(meta("dev/sda").unwrap().file_type().is_block_device());
    } else {
        assert!(meta("dev/mem").is_err() && meta("dev/sda").is_err());
        assert_eq!(report.warnings.iter().filter(|w| w.contains("skipped device node")).count(), 2, "{report:?}");
    }
    s.apply(&[vec![Entry::Fifo("run/fifo".into())]]).unwrap();
    assert!(meta("run/fifo").unwrap().file_type().is_fifo());
    s.assert_outside_untouched();
}

/// `security.capability` (VFS_CAP_REVISION_2, effective) granting CAP_NET_RAW.
fn net_raw_capability() -> Vec<u8> {
    let mut v = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

#[test]
fn extended_attributes_are_applied_after_owner_and_mode() {
    let s = Sandbox::new("xattrs");
    let cap = net_raw_capability();
    let file = Entry::Owned("bin/ping".into(), b"ping".to_vec(), 0, 0);
    let xattrs: [(&str, &[u8]); 2] = [("security.capability", &cap), ("user.origin", b"layer")];
    let report = s.apply(&[vec![layout::with_xattrs(file, &xattrs)]]).unwrap();
    let path = s.target().join("bin/ping");
    let get = |name: &str| {
        let mut buf = vec![0u8; 256];
        rustix::fs::lgetxattr(&path, name, &mut buf).map(|n| buf[..n].to_vec())
    };
    if rustix::process::geteuid().is_root() {
        // The owner was set before: a chown after would have cleared the capability.
        assert_eq!(get("security.capability").unwrap(), cap, "{report:?}");
    } else {
        assert!(report.warnings.iter().any(|w| w.contains("security.capability")), "{report:?}");
    }
    assert_eq!(get("user.origin").unwrap(), b"layer", "{report:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"ping");
    s.assert_outside_untouched();
}

#[test]
fn pax_sparse_files_are_refused_with_their_name_not_written_as_their_map() {
    let s = Sandbox::new("pax-sparse");
    let map = b"1\n0\n4\n".to_vec();
    let entry = layout::with_pax(
        layout::file("GNUSparseFile.0/data", &map),
        &[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"), ("GNU.sparse.name", b"data")],
    );
    match s.apply(&[vec![entry]]) {
        Err(Error::InvalidImage { detail, .. }) => assert!(detail.contains("sparse"), "{detail}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!s.target().join("data").exists() && !s.target().join("GNUSparseFile.0/data").exists());
    s.assert_outside_untouched();
}

#[test]
fn corrupted_and_truncated_layers_are_refused() {
    let s = Sandbox::new("corrupt");
    let tar = tar_bytes(&[layout::file("a", &vec![7u8; 100_000]), layout::file("b", b"b")]);
    let gz = gzip(&tar);

    // Truncated gzip.
    let mut u = Unpacker::new(&s.target()).unwrap();
    let e = u.apply_layer(&gz[..gz.len() / 2], "trunc", None, None).unwrap_err();
    assert!(matches!(e, Error::CorruptLayer { .. }), "{e}");

    // Truncated plain tar (cut inside a file's data).
    let mut u = Unpacker::new(&s.target()).unwrap();
    let e = u.apply_layer(&tar[..2048], "trunc-tar", None, None).unwrap_err();
    assert!(matches!(e, Error::CorruptLayer { .. }), "{e}");

    // A flipped byte in the gzip stream: CRC / inflate error, or digest mismatch.
    let mut bad = gz.clone();
    let n = bad.len() - 6;
    bad[n] ^= 0xff;
    let mut u = Unpacker::new(&s.target()).unwrap();
    let d = Digest::parse(&sha(&gz)).unwrap();
    let e = u.apply_layer(&bad[..], "flipped", Some(&d), None).unwrap_err();
    assert!(e.is_integrity(), "{e}");

    // Right bytes, wrong digest / diff_id.
    let mut u = Unpacker::new(&s.target()).unwrap();
    let wrong = Digest::parse(&sha(b"other")).unwrap();
    assert!(matches!(u.apply_layer(&gz[..], "l", Some(&wrong), None), Err(Error::DigestMismatch { .. })));
    let mut u = Unpacker::new(&s.target()).unwrap();
    assert!(matches!(u.apply_layer(&gz[..], "l", Some(&d), Some(&wrong)), Err(Error::DigestMismatch { .. })));
    // And correct ones pass, zstd too.
    let mut u = Unpacker::new(&s.target()).unwrap();
    u.apply_layer(&gz[..], "l", Some(&d), Some(&Digest::parse(&sha(&tar)).unwrap())).unwrap();
    let zs = layout::zstd_compress(&tar);
    u.apply_layer(&zs[..], "z", Some(&Digest::parse(&sha(&zs)).unwrap()), Some(&Digest::parse(&sha(&tar)).unwrap()))
        .unwrap();
    u.finish().unwrap();
    assert_eq!(std::fs::read(s.target().join("b")).unwrap(), b"b");
    s.assert_outside_untouched();
}

#[test]
fn long_names_pax_and_gnu() {
    let s = Sandbox::new("long");
    let long_dir = format!("{}/{}", "d".repeat(90), "e".repeat(90));
    let long_file = format!("{long_dir}/{}", "f".repeat(120));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(4);
    h.set_mtime(layout::MTIME);
    b.append_data(&mut h, &long_file, &b"long"[..]).unwrap();
    // PAX path record overriding a short header name.
    b.append_pax_extensions([("path", format!("{long_dir}/pax-name").as_bytes())]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("short").unwrap();
    h.set_mode(0o600);
    h.set_size(3);
    h.set_cksum();
    b.append(&h, &b"pax"[..]).unwrap();
    // A PAX path with '..' is refused like any other.
    let good = b.into_inner().unwrap();
    let mut u = Unpacker::new(&s.target()).unwrap();
    u.apply_layer(&good[..], "long", None, None).unwrap();
    u.finish().unwrap();
    assert_eq!(std::fs::read(s.target().join(&long_file)).unwrap(), b"long");
    assert_eq!(std::fs::read(s.target().join(&long_dir).join("pax-name")).unwrap(), b"pax");

    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"../outside/sentinel"[..])]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("innocent").unwrap();
    h.set_size(5);
    h.set_cksum();
    b.append(&h, &b"pwned"[..]).unwrap();
    let bad = b.into_inner().unwrap();
    let mut u = Unpacker::new(&s.target()).unwrap();
    assert_unsafe(u.apply_layer(&bad[..], "pax-evil", None, None), "..");
    s.assert_outside_untouched();
}
