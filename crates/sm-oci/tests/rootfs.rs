//! Root disk formats built from an unpacked tree.

mod common;

use std::path::PathBuf;

use common::layout::{self, tar_bytes, Entry};
use common::{require_tool, sha256_file, TempDir};
use sm_oci::rootfs::{build_from_dir, RootfsFormat};
use sm_oci::{UnpackReport, Unpacker};

fn unpack(dir: &std::path::Path, layers: &[Vec<Entry>]) -> UnpackReport {
    let mut u = Unpacker::new(dir).unwrap();
    for (i, l) in layers.iter().enumerate() {
        u.apply_layer(&tar_bytes(l)[..], &format!("l{i}"), None, None).unwrap();
    }
    u.finish().unwrap()
}

#[test]
fn every_format_builds_and_default_is_reproducible() {
    require_tool("/usr/bin/mksquashfs", "squashfs-tools");
    require_tool("/usr/bin/mkfs.erofs", "erofs-utils");
    require_tool("/sbin/mkfs.ext4", "e2fsprogs");
    let tmp = TempDir::new("formats");
    let layers = vec![layout::busybox_layer()];
    let r1 = unpack(&tmp.join("a"), &layers);
    let r2 = unpack(&tmp.join("b"), &layers);
    for f in RootfsFormat::ALL {
        let out = tmp.join(format!("disk.{f}"));
        build_from_dir(&tmp.join("a"), &out, f, &r1).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(std::fs::metadata(&out).unwrap().len() > 256 << 10, "{f}");
        assert_eq!(f.name().parse::<RootfsFormat>().unwrap(), f);
    }
    let a = tmp.join("a.sqfs");
    let b = tmp.join("b.sqfs");
    build_from_dir(&tmp.join("a"), &a, RootfsFormat::default(), &r1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    build_from_dir(&tmp.join("b"), &b, RootfsFormat::default(), &r2).unwrap();
    assert_eq!(sha256_file(&a), sha256_file(&b), "the default format must be reproducible");
    assert!("zip".parse::<RootfsFormat>().is_err());
}

#[test]
fn squashfs_carries_ownership_recorded_without_root() {
    require_tool("/usr/bin/unsquashfs", "squashfs-tools");
    let tmp = TempDir::new("owners");
    let dir = tmp.join("t");
    let mut report = unpack(
        &dir,
        &[vec![
            Entry::Dir("home/", 0o755),
            layout::file("home/f", b"x"),
            layout::file("etc", b"y"),
            layout::file("home/with space \"q\"", b"z"),
            layout::symlink("home/l", "f"),
        ]],
    );
    // As an unprivileged unpack would have recorded them.
    report.unowned.insert(PathBuf::from("home/f"), (1000, 1001));
    report.unowned.insert(PathBuf::from("home"), (1000, 1000));
    let out = tmp.join("o.sqfs");
    build_from_dir(&dir, &out, RootfsFormat::SquashfsZstd, &report).unwrap();
    let l = std::process::Command::new("unsquashfs").args(["-lln", "-d", ""]).arg(&out).output().unwrap();
    let l = String::from_utf8_lossy(&l.stdout);
    let line = |p: &str| l.lines().find(|x| x.ends_with(p)).unwrap_or_else(|| panic!("{p} not in {l}")).to_string();
    assert!(line("/home/f").contains("1000/1001"), "{l}");
    assert!(line("/home").contains("1000/1000"), "{l}");
    assert!(line("/etc").contains("0/0"), "{l}");
    assert!(line("/home/with space \"q\"").contains("0/0"), "{l}");
    assert!(line("/home/l -> f").contains("0/0"), "{l}");
    assert_eq!(l.lines().filter(|x| x.contains("1000/")).count(), 2, "{l}");
}
