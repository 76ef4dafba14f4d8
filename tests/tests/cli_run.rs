//! The `supermachine` binary end to end: `run` a busybox image pulled from a
//! real registry (Debian's `docker-registry` on 127.0.0.1, image pushed with
//! skopeo) in a real microVM, plus `pull`/`images`/`rmi`/`prune` and the error
//! exits.
//!
//! Needs `cargo build -p sm-cli` first (the binary is
//! `<workspace>/target/debug/supermachine`, or `$SM_CLI_BIN`). A cold boot
//! takes ~25-30 s on this host's emulated guest kernel; runs after the first
//! restore the image's baked snapshot (~1-2 s).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sm_tests::{busybox_layout, cli, temp_dir, tools, Registry, RUN_TIMEOUT};

#[test]
fn run_busybox_from_a_registry() {
    let test = "cli run";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, &[("/bin/busybox", "busybox-static")]) else { return };
    let tmp = temp_dir("run");
    busybox_layout(&tmp.path().join("layout"));
    let registry = Registry::start();
    registry.push(&tmp.path().join("layout"), "busybox:latest");
    let image = format!("127.0.0.1:{}/busybox:latest", registry.port);
    let home = tmp.path().join("home");

    // Pulled on first use; output streamed; exit 0. The first run boots cold
    // and bakes a snapshot of the booted guest for the runs after it.
    let o = cli(&bin, &home, &["run", "--timings", &image, "echo", "hello"], None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert_eq!(o.stdout, "hello\n", "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("Unable to find image"), "{}", o.stderr);
    assert!(o.stderr.contains("snapshot baked"), "{}", o.stderr);
    let baked: Vec<PathBuf> = std::fs::read_dir(home.join("oci/baked")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(baked.len(), 1, "one baked snapshot: {baked:?}");
    let baked_registry_image = baked[0].clone();

    // Env (image's + -e), working directory and the exit status in one boot.
    let o = cli(
        &bin,
        &home,
        &[
            "run",
            "--timings",
            "--rm",
            "--name",
            "t1",
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
            &image,
            "sh",
            "-c",
            "pwd; env; exit 3",
        ],
        None,
        RUN_TIMEOUT,
    );
    assert_eq!(o.code, Some(3), "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("restored from a baked snapshot"), "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"/tmp"), "{}", o.stdout);
    assert!(lines.contains(&"FOO=bar"), "{}", o.stdout);
    assert!(lines.contains(&"IMAGE_VAR=from-image"), "{}", o.stdout);
    assert!(!o.stderr.contains("Unable to find image"), "the second run must use the stored image: {}", o.stderr);

    // A program the image does not have: 127, like docker. --no-snapshot boots
    // cold; builtin:default is the busybox image built locally from the host's.
    let o =
        cli(&bin, &home, &["run", "--timings", "--no-snapshot", "builtin:default", "/nonexistent"], None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(127), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("/nonexistent"), "{}", o.stderr);
    assert!(o.stderr.contains("(cold boot)"), "{}", o.stderr);
    // No image at all: the built-in default runs its greeting (no registry involved).
    let o = cli(&bin, &home, &["run"], None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert!(o.stdout.starts_with("Hello from a supermachine microVM: Linux 6.1"), "{}\n{}", o.stdout, o.stderr);

    // A warm-up before the bake: a file written and a server started are part
    // of the snapshot, so the restored run finds both.
    let warm = ["run", "--timings", "--warmup", "echo warm > /tmp/warm; httpd -p 8080 -h /tmp", "--wait-port", "8080"];
    let check = ["builtin:default", "sh", "-c", "cat /tmp/warm; grep -c ':1F90 00000000:0000 0A' /proc/net/tcp"];
    for expect in ["snapshot baked", "restored from a baked snapshot"] {
        let args: Vec<&str> = warm.iter().chain(&check).copied().collect();
        let o = cli(&bin, &home, &args, None, RUN_TIMEOUT);
        assert_eq!((o.code, o.stdout.as_str()), (Some(0), "warm\n1\n"), "stderr:\n{}", o.stderr);
        assert!(o.stderr.contains(expect), "{}", o.stderr);
    }

    // Detached VMs (restored from the default image's baked snapshot): ps, exec,
    // logs, stop, kill, rm; a detached command's exit code is recorded.
    let o = cli(
        &bin,
        &home,
        &["run", "-d", "--name", "bg", "builtin:default", "sh", "-c", "echo started; sleep 1000"],
        None,
        RUN_TIMEOUT,
    );
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    let id = o.stdout.trim().to_string();
    assert!(id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit()), "{id:?}");
    let o = cli(&bin, &home, &["ps"], None, RUN_TIMEOUT);
    assert!(o.stdout.lines().any(|l| l.starts_with(&id) && l.contains("Up") && l.ends_with("bg")), "{}", o.stdout);
    let o = cli(
        &bin,
        &home,
        &["exec", "-e", "X=1", "bg", "sh", "-c", "echo hi from exec $X $SUPERMACHINE_IMAGE; exit 4"],
        None,
        RUN_TIMEOUT,
    );
    assert_eq!((o.code, o.stdout.as_str()), (Some(4), "hi from exec 1 builtin:default\n"), "stderr:\n{}", o.stderr);
    let o = cli(&bin, &home, &["logs", &id[..6]], None, RUN_TIMEOUT);
    assert_eq!(o.stdout, "started\n", "stderr:\n{}", o.stderr);
    let o = cli(&bin, &home, &["stop", "bg"], None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    let o = cli(&bin, &home, &["run", "-d", "builtin:default", "sh", "-c", "exit 3"], None, RUN_TIMEOUT);
    let quick = o.stdout.trim().to_string();
    let o = cli(&bin, &home, &["run", "-d", "builtin:default", "sleep", "1000"], None, RUN_TIMEOUT);
    let sleeper = o.stdout.trim().to_string();
    let o = cli(&bin, &home, &["kill", &sleeper], None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status_of = |ps: &str, id: &str| ps.lines().find(|l| l.starts_with(id)).map(|l| l[74..].trim().to_string());
    loop {
        let o = cli(&bin, &home, &["ps", "-a"], None, RUN_TIMEOUT);
        if status_of(&o.stdout, &quick).is_some_and(|s| s.starts_with("Exited")) || Instant::now() > deadline {
            assert!(status_of(&o.stdout, &quick).unwrap().starts_with("Exited (3)"), "{}", o.stdout);
            assert!(status_of(&o.stdout, &id).unwrap().starts_with("Exited (143)"), "{}", o.stdout);
            assert!(status_of(&o.stdout, &sleeper).unwrap().starts_with("Exited (137)"), "{}", o.stdout);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let o = cli(&bin, &home, &["rm", "bg"], None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    let o = cli(&bin, &home, &["ps", "-a"], None, RUN_TIMEOUT);
    assert!(!o.stdout.contains(&id), "{}", o.stdout);

    // A damaged baked snapshot is named, deleted and baked again; the run works.
    let mut bytes = std::fs::read(&baked_registry_image).unwrap();
    bytes[64] ^= 0xff;
    std::fs::write(&baked_registry_image, &bytes).unwrap();
    let o = cli(&bin, &home, &["run", "--timings", &image, "echo", "again"], None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert_eq!(o.stdout, "again\n", "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("cannot be restored") && o.stderr.contains("snapshot baked"), "{}", o.stderr);

    // -i: stdin reaches the process and is closed at EOF.
    let o = cli(&bin, &home, &["run", "-i", &image, "cat"], Some(b"hello from stdin\n"), RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert_eq!(o.stdout, "hello from stdin\n", "stderr:\n{}", o.stderr);
    // Larger stdin, exact: 1 MiB of random bytes checksummed inside the guest, and
    // 256 KiB of random text through `cat` and back (CliOutput is text).
    let random = sm_tests::random_bytes(1 << 20);
    let o = cli(&bin, &home, &["run", "-i", &image, "sha256sum"], Some(&random), RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    let want = sm_tests::sha256_hex(&random);
    assert_eq!(o.stdout.split_whitespace().next(), Some(want.as_str()), "1 MiB of stdin altered on the way in");
    let text: Vec<u8> =
        sm_tests::random_bytes(256 << 10).iter().map(|b| if b % 64 == 0 { b'\n' } else { b' ' + b % 95 }).collect();
    let o = cli(&bin, &home, &["run", "-i", &image, "cat"], Some(&text), RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert!(o.stdout.as_bytes() == text, "256 KiB through `run -i ... cat` came back altered");
}

#[test]
fn store_commands_and_errors_without_a_vm() {
    let test = "cli store";
    let Some(bin) = sm_tests::cli_binary(test) else { return };
    if !tools(test, &[("/bin/busybox", "busybox-static")]) {
        return;
    }
    let tmp = temp_dir("store");
    let layout = tmp.path().join("layout");
    busybox_layout(&layout);
    let home = tmp.path().join("home");
    let t = Duration::from_secs(60);

    let o = cli(&bin, &home, &["run", "bad::ref"], None, t);
    assert_eq!(o.code, Some(125), "{}", o.stderr);
    assert!(o.stderr.contains("bad::ref"), "{}", o.stderr);

    let o = cli(&bin, &home, &["run", "-d", "-i", "busybox"], None, t);
    assert_eq!(o.code, Some(125), "{}", o.stderr);
    assert!(o.stderr.contains("cannot be combined"), "{}", o.stderr);
    // Network flags are checked before anything is pulled or booted.
    for (args, why) in [
        (&["run", "--egress", "permit=1.2.3.4", "busybox", "true"][..], "allow=HOST"),
        (&["run", "--network", "none", "--egress", "deny-all", "busybox", "true"][..], "need a network"),
        (&["run", "--network", "none", "-p", "0:80/tls", "busybox", "true"][..], "need --network passt"),
        (&["run", "--network", "tap:", "busybox", "true"][..], "none, passt or tap:NAME"),
        (&["run", "--network", "tap:tap0", "-p", "0:80", "busybox", "true"][..], "-p needs --network passt"),
        (&["run", "--tls-cert", "c.pem", "--tls-key", "k.pem", "busybox", "true"][..], "none is published"),
        (&["run", "-p", "80", "busybox", "true"][..], "HOSTPORT:GUESTPORT"),
        (&["run", "--dns", "resolver", "busybox", "true"][..], "IPV4ADDR[:PORT]"),
    ] {
        let o = cli(&bin, &home, args, None, t);
        assert_eq!(o.code, Some(125), "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains(why), "{args:?}: {}", o.stderr);
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = format!("{}:80", taken.local_addr().unwrap().port());
    let o = cli(&bin, &home, &["run", "-p", &spec, "busybox", "true"], None, t);
    assert_eq!(o.code, Some(125), "{}", o.stderr);
    assert!(o.stderr.contains("another program"), "a taken port is named: {}", o.stderr);
    let o = cli(&bin, &home, &["logs", "nosuchvm"], None, t);
    assert_eq!(o.code, Some(125), "{}", o.stderr);
    assert!(o.stderr.contains("no such VM"), "{}", o.stderr);

    // Nothing listens on port 1: the pull fails with 125 and names the image.
    let o = cli(&bin, &home, &["run", "127.0.0.1:1/nothing:here", "true"], None, t);
    assert_eq!(o.code, Some(125), "{}", o.stderr);
    assert!(o.stderr.contains("127.0.0.1:1/nothing:here"), "{}", o.stderr);

    let source = format!("oci-layout:{}:latest", layout.display());
    let o = cli(&bin, &home, &["pull", &source], None, t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.starts_with("Digest: sha256:"), "{}", o.stdout);

    let o = cli(&bin, &home, &["images"], None, t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.starts_with("REPOSITORY:TAG"), "{}", o.stdout);
    assert!(o.stdout.contains(&source), "{}", o.stdout);

    let o = cli(&bin, &home, &["rmi", &source], None, t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let o = cli(&bin, &home, &["rmi", &source], None, t);
    assert_eq!(o.code, Some(1), "removing twice fails: {}", o.stderr);
    let o = cli(&bin, &home, &["images"], None, t);
    assert!(!o.stdout.contains(&source), "{}", o.stdout);

    let o = cli(&bin, &home, &["prune"], None, t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("Deleted 3 blobs, 0 root disks and 0 baked snapshots"), "{}", o.stdout);
    assert!(!o.stdout.contains("space: 0B"), "{}", o.stdout);
}
