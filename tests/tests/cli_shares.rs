//! Host directories shared into real guests (`run -v DIR:PATH[:ro]`, virtio-fs
//! served by sm-fuse in the VMM): files cross both ways with their mode bits
//! and mtimes, a directory of 1000 files lists whole, `:ro` refuses writes, and
//! nothing outside the directory is reached, however the guest tries (checked
//! on the host). The second run restores the baked snapshot and mounts the
//! share afresh.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use sm_tests::{cli, temp_dir, CliOutput, RUN_TIMEOUT};

fn run(bin: &Path, home: &Path, args: &[&str]) -> CliOutput {
    cli(bin, home, args, None, RUN_TIMEOUT)
}

#[test]
fn a_host_directory_is_shared_both_ways_and_contains_the_guest() {
    let test = "cli shares";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, &[]) else { return };
    let tmp = temp_dir("clishare");
    let home = tmp.path().join("home");
    let share = tmp.path().join("share");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(share.join("many")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"secret\n").unwrap();
    std::fs::write(share.join("in"), b"from the host\n").unwrap();
    std::fs::set_permissions(share.join("in"), std::fs::Permissions::from_mode(0o640)).unwrap();
    // 1000, not 10k: each lstat is a FUSE round trip through this host's
    // emulated guest kernel (~26 ms); the server lists 10k itself in sm-fuse's
    // unit tests.
    for i in 0..1000 {
        std::fs::write(share.join(format!("many/f{i}")), b"").unwrap();
    }
    // Planted on the host: a symlink pointing out of the share.
    symlink(&outside, share.join("link-out")).unwrap();
    let spec = format!("{}:/src", share.display());

    // First run: bake with an empty placeholder share, then a restore with this one.
    let script = "cat /src/in; stat -c %a /src/in; \
        echo from the guest > /src/out; touch -d '2001-02-03 04:05:06' /src/out; \
        ls /src/many | wc -l; \
        cat /src/link-out/secret 2>&1; \
        ln -s / /src/root-link; ls /src/root-link/ | grep -c . ; \
        cat /src/../../../etc/hostname; \
        ln /etc/passwd /src/hard 2>&1; \
        mv /src/out /src/moved; echo done";
    let o = run(&bin, &home, &["run", "--timings", "-v", &spec, "builtin:default", "sh", "-c", script]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0..3], ["from the host", "640", "1000"], "stdout:\n{}", o.stdout);
    // The planted symlink resolves inside the guest (where /tmp/... is absent).
    assert!(lines[3].contains("No such file"), "{}", o.stdout);
    assert!(o.stdout.ends_with("done\n"), "{}", o.stdout);
    assert!(o.stderr.contains("snapshot baked"), "{}", o.stderr);

    // On the host: the guest's file, moved inside the share, with its mtime;
    // its symlink to / stored as a symlink; nothing outside touched.
    assert_eq!(std::fs::read(share.join("moved")).unwrap(), b"from the guest\n");
    assert_eq!(std::fs::metadata(share.join("moved")).unwrap().mtime(), 981_173_106);
    assert_eq!(std::fs::read_link(share.join("root-link")).unwrap(), Path::new("/"));
    assert!(!share.join("hard").exists(), "no hard link from outside the share");
    let outside_now: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside_now, ["secret"]);
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret\n");

    // Second run: restored, the share mounted afresh; :ro refuses writes.
    let ro = format!("{}:/src:ro", share.display());
    let o = run(
        &bin,
        &home,
        &["run", "--timings", "-v", &ro, "builtin:default", "sh", "-c", "cat /src/moved; echo x > /src/new"],
    );
    assert_ne!(o.code, Some(0), "a write to a :ro share must fail");
    assert_eq!(o.stdout, "from the guest\n", "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("Read-only file system"), "{}", o.stderr);
    assert!(o.stderr.contains("restored from a baked snapshot"), "{}", o.stderr);
    assert!(!share.join("new").exists());

    let o = run(&bin, &home, &["run", "-v", "/no/such/dir:/x", "builtin:default", "true"]);
    assert_eq!(o.code, Some(125));
    assert!(o.stderr.contains("/no/such/dir"), "{}", o.stderr);
}
