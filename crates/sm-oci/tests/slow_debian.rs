//! A realistic image: a Debian bookworm rootfs with python3 (debootstrap,
//! ~1 min, needs `debootstrap` and the Debian mirror), pushed, pulled,
//! unpacked, run, and built in every root disk format with timings.
//! Ignored by default (slow): `cargo test -p sm-oci --test slow_debian -- --ignored`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::layout::{gzip_file, Layout};
use common::{require_tool, runtime, Registry, TempDir};
use sm_oci::rootfs::{build_from_dir, RootfsFormat};
use sm_oci::{NoProgress, PullOptions, Reference, Store};

/// Tar `root` (no /dev, /proc, /sys contents) into `out`.
fn tar_tree(root: &Path, out: &Path) {
    let f = std::fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    b.follow_symlinks(false);
    fn walk(b: &mut tar::Builder<std::io::BufWriter<std::fs::File>>, root: &Path, dir: &Path) {
        let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(root).unwrap();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_char_device() || ft.is_block_device() || ft.is_socket() {
                continue;
            }
            b.append_path_with_name(&p, rel).unwrap();
            let skip = ["dev", "proc", "sys"].iter().any(|s| rel == Path::new(s));
            if ft.is_dir() && !skip {
                walk(b, root, &p);
            }
        }
    }
    walk(&mut b, root, root);
    b.into_inner().unwrap();
}

#[test]
#[ignore = "slow (debootstrap from the Debian mirror, 1-2 min): run with cargo test -p sm-oci -- --ignored"]
fn debian_python_image() {
    let debootstrap = require_tool("/usr/sbin/debootstrap", "debootstrap");
    let tmp = TempDir::new("debian");
    let rootfs = tmp.join("debootstrap");
    let t = Instant::now();
    let st = Command::new(debootstrap)
        .args(["--variant=minbase", "--include=python3", "bookworm"])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "debootstrap failed");
    eprintln!("debootstrap: {:.1?}", t.elapsed());

    let t = Instant::now();
    let tar = tmp.join("layer.tar");
    tar_tree(&rootfs, &tar);
    let gz = tmp.join("layer.tar.gz");
    gzip_file(&tar, &gz);
    let l = Layout::create(&tmp.join("layout"));
    let d = l.image_from_files(
        &[(&tar, &gz)],
        serde_json::json!({"Cmd": ["python3"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}),
    );
    l.tag(&d, "bookworm");
    eprintln!(
        "layer: {} MiB tar, {} MiB gz, {:.1?}",
        std::fs::metadata(&tar).unwrap().len() >> 20,
        std::fs::metadata(&gz).unwrap().len() >> 20,
        t.elapsed()
    );
    std::fs::remove_file(&tar).unwrap();

    let reg = Registry::start();
    reg.push(&tmp.join("layout"), "bookworm", "debian/python:bookworm", false);
    let store = Store::open(tmp.join("store")).unwrap();
    let name = format!("{}/debian/python:bookworm", reg.host());
    let t = Instant::now();
    runtime()
        .block_on(sm_oci::pull(
            &store,
            &Reference::parse(&name).unwrap(),
            &PullOptions::default(),
            Arc::new(NoProgress),
        ))
        .unwrap();
    eprintln!("pull: {:.1?}", t.elapsed());
    let info = store.image_info(&name).unwrap();

    let root = tmp.join("root");
    let t = Instant::now();
    let report = sm_oci::unpack_image(&store, &info, &root).unwrap();
    eprintln!("unpack: {:.1?} ({} entries, {} MiB)", t.elapsed(), report.entries, report.bytes >> 20);
    assert!(root.join("usr/bin/python3").exists());
    if common::layout::rustix_is_root() {
        let out = Command::new("chroot")
            .arg(&root)
            .args(["/usr/bin/python3", "-c", "import json,sys; print(json.dumps(sys.version_info[:2]))"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("python in the unpacked tree: {}", String::from_utf8_lossy(&out.stdout).trim());
    }

    eprintln!("{:<14} {:>9} {:>10}", "format", "build", "size MiB");
    for f in RootfsFormat::ALL {
        let out = tmp.join(format!("disk.{f}"));
        let t = Instant::now();
        build_from_dir(&root, &out, f, &report).unwrap();
        let el = t.elapsed();
        let m = std::fs::metadata(&out).unwrap();
        use std::os::unix::fs::MetadataExt;
        eprintln!(
            "{:<14} {:>8.2}s {:>10.1}  (allocated {:.1} MiB)",
            f.name(),
            el.as_secs_f64(),
            m.len() as f64 / 1048576.0,
            (m.blocks() * 512) as f64 / 1048576.0
        );
        std::fs::remove_file(&out).unwrap();
    }
    let t = Instant::now();
    let fs = sm_oci::build_rootfs(&store, &info, RootfsFormat::default()).unwrap();
    eprintln!("build_rootfs (unpack + {}): {:.1?}, {} MiB", fs.format, t.elapsed(), fs.size >> 20);
}
