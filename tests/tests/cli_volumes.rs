//! Named volumes end to end with the `supermachine` binary and real guests:
//! data written in one run is there in the next (a restore of the baked
//! snapshot, with the volume in its slot) and in the volume file on the host;
//! `:ro` refuses writes; a full volume gives the guest ENOSPC and leaves the
//! host alone; one running VM per volume; `volume ls|inspect|rm|prune`.

use std::path::Path;

use sm_tests::{cli, temp_dir, CliOutput, RUN_TIMEOUT};

const NEEDS: &[(&str, &str)] = &[("/sbin/mkfs.ext4", "e2fsprogs"), ("/sbin/debugfs", "e2fsprogs")];

fn run(bin: &Path, home: &Path, args: &[&str]) -> CliOutput {
    cli(bin, home, args, None, RUN_TIMEOUT)
}

/// A file inside a volume image, read on the host with debugfs (no mount, no root).
fn host_read(image: &Path, file: &str) -> String {
    let out = std::process::Command::new("/sbin/debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .expect("running debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_volume_keeps_data_across_runs_and_restores_and_is_one_vms_at_a_time() {
    let test = "cli volumes";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, NEEDS) else { return };
    let tmp = temp_dir("clivol");
    let home = tmp.path().join("home");
    let image = home.join("volumes/data.ext4");

    // First use creates it; the run boots, bakes with a placeholder in the
    // slot, and runs in a restore with the volume.
    let o = run(
        &bin,
        &home,
        &[
            "run",
            "--timings",
            "-v",
            "data:/data",
            "builtin:default",
            "sh",
            "-c",
            "echo kept > /data/f && chmod 640 /data/f && touch -d '2001-02-03 04:05:06' /data/f && sync && cat /data/f",
        ],
    );
    assert_eq!((o.code, o.stdout.as_str()), (Some(0), "kept\n"), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("created volume data"), "{}", o.stderr);
    assert!(o.stderr.contains("snapshot baked"), "{}", o.stderr);
    assert_eq!(host_read(&image, "/f"), "kept\n", "the data is in the volume file on the host");

    // The next run restores the baked snapshot and finds it, mode and mtime kept.
    let o = run(
        &bin,
        &home,
        &[
            "run",
            "--timings",
            "-v",
            "data:/data",
            "builtin:default",
            "sh",
            "-c",
            "cat /data/f; stat -c '%a %Y' /data/f",
        ],
    );
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert_eq!(o.stdout, "kept\n640 981173106\n", "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("restored from a baked snapshot"), "{}", o.stderr);

    // Read-only: the guest cannot write, the file is unchanged.
    let o = run(
        &bin,
        &home,
        &["run", "-v", "data:/data:ro", "builtin:default", "sh", "-c", "cat /data/f; echo x > /data/g"],
    );
    assert_ne!(o.code, Some(0), "a write to a :ro volume must fail:\n{}", o.stderr);
    assert_eq!(o.stdout, "kept\n");
    assert!(o.stderr.contains("Read-only file system"), "{}", o.stderr);
    assert_eq!(host_read(&image, "/g"), "", "nothing written through :ro");

    // A full volume: ENOSPC in the guest, the host file stays its size.
    let o = run(&bin, &home, &["volume", "create", "--size", "8M", "small"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let small = home.join("volumes/small.ext4");
    let o = run(
        &bin,
        &home,
        &[
            "run",
            "-v",
            "small:/s",
            "builtin:default",
            "sh",
            "-c",
            "dd if=/dev/zero of=/s/fill bs=1M count=16; echo dd=$?",
        ],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("dd=1"), "{}", o.stdout);
    assert!(o.stderr.contains("No space left on device"), "{}", o.stderr);
    assert_eq!(std::fs::metadata(&small).unwrap().len(), 8 << 20, "the host file does not grow");

    // One running VM per volume: a second is refused, so is removing it.
    let o = run(
        &bin,
        &home,
        &[
            "run",
            "-d",
            "--name",
            "holder",
            "-v",
            "data:/data",
            "builtin:default",
            "sh",
            "-c",
            "echo late > /data/late && sync && echo synced && sleep 600",
        ],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !run(&bin, &home, &["logs", "holder"]).stdout.contains("synced") {
        assert!(std::time::Instant::now() < deadline, "the detached VM did not write its file");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let o = run(&bin, &home, &["run", "-v", "data:/data", "builtin:default", "true"]);
    assert_eq!(o.code, Some(125), "{}", o.stderr);
    assert!(o.stderr.contains("in use by another VM"), "{}", o.stderr);
    let ls = run(&bin, &home, &["volume", "ls"]).stdout;
    assert!(ls.lines().any(|l| l.starts_with("data ") && l.ends_with("yes")), "{ls}");
    assert!(ls.lines().any(|l| l.starts_with("small ") && l.ends_with("no")), "{ls}");
    let o = run(&bin, &home, &["volume", "rm", "data"]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("in use"), "{}", o.stderr);
    let o = run(&bin, &home, &["volume", "prune", "--force"]);
    assert_eq!((o.code, o.stdout.as_str()), (Some(0), "small\n"), "prune spares the volume in use: {}", o.stderr);
    let o = run(&bin, &home, &["kill", "holder"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);

    // Killed with the volume mounted: its journal is replayed on the host
    // before a read-only mount (which cannot replay it), and the data is there.
    let o = run(&bin, &home, &["run", "-v", "data:/data:ro", "builtin:default", "cat", "/data/late"]);
    assert_eq!((o.code, o.stdout.as_str()), (Some(0), "late\n"), "stderr:\n{}", o.stderr);

    let inspect: serde_json::Value =
        serde_json::from_str(&run(&bin, &home, &["volume", "inspect", "data"]).stdout).unwrap();
    assert_eq!(inspect[0]["Name"], "data");
    assert_eq!(inspect[0]["InUse"], false, "the kill released it");
    let o = run(&bin, &home, &["volume", "rm", "data"]);
    assert_eq!((o.code, o.stdout.as_str()), (Some(0), "data\n"), "{}", o.stderr);
    assert!(!image.exists());
    let o = run(&bin, &home, &["run", "-v", "bad/name:/x", "builtin:default", "true"]);
    assert_eq!(o.code, Some(125));
    assert!(o.stderr.contains("not a volume name"), "{}", o.stderr);
}
