//! A realistic image end to end: a Debian bookworm rootfs with python3
//! (debootstrap, minbase), as a one-layer gzip OCI image pushed to a real local
//! registry (Debian's `docker-registry` on 127.0.0.1, skopeo), then
//! `supermachine run IMAGE python3 -c ...`: the first run pulls, builds the
//! root disk, boots cold and bakes a snapshot; the second restores it.
//!
//! Needs `cargo build -p sm-cli` first, root, `debootstrap` and the Debian
//! mirror for the first build of the image (~1 min; then cached under
//! `target/test-images/`, keyed by the package list). On this host's emulated
//! guest kernel the cold run takes ~1 min (python3 alone starts in 10+ s).

use std::time::Instant;

use sm_tests::{cli, temp_dir, Registry, RUN_TIMEOUT};

#[test]
fn python_in_a_debian_image_from_a_registry() {
    let test = "cli python";
    let t0 = Instant::now();
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, &[("/usr/bin/mkfs.erofs", "erofs-utils")]) else { return };
    let Some(layout) = sm_tests::debian_python_layout(test) else { return };
    let tmp = temp_dir("python");
    let registry = Registry::start();
    registry.push(&layout, "debian/python:bookworm");
    let image = format!("127.0.0.1:{}/debian/python:bookworm", registry.port);
    let home = tmp.path().join("home");
    eprintln!("{test}: image ready and pushed after {:.1?}", t0.elapsed());

    // Pulled on first use, root disk built, cold boot, snapshot baked.
    let args = ["run", "--timings", &image, "python3", "-c", "print(6*7)"];
    let o = cli(&bin, &home, &args, None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert_eq!(o.stdout, "42\n", "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("Unable to find image"), "{}", o.stderr);
    assert!(o.stderr.contains("snapshot baked"), "{}", o.stderr);
    eprintln!("{test}: first run: {}", timings_line(&o.stderr));

    // The same command again: from the stored image and the baked snapshot.
    let o = cli(&bin, &home, &args, None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert_eq!(o.stdout, "42\n", "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("restored from a baked snapshot"), "{}", o.stderr);
    assert!(!o.stderr.contains("Unable to find image"), "the second run must use the stored image: {}", o.stderr);
    eprintln!("{test}: second run: {}", timings_line(&o.stderr));
    eprintln!("{test}: total {:.1?}", t0.elapsed());
}

/// The `timings: ...` line of `--timings`.
fn timings_line(stderr: &str) -> &str {
    stderr.lines().find(|l| l.starts_with("timings:")).unwrap_or("(no timings line)")
}
