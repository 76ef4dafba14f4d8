//! containerd runs containers in supermachine microVMs through
//! `containerd-shim-supermachine-v2`: Debian's real containerd and `ctr`, an
//! image pulled from a real local registry, real guests on KVM.

use std::time::Duration;

use sm_tests::containerd::{busybox_in_registry, prerequisites, task_status, Containerd, RUNTIME};
use sm_tests::{guest_dir, temp_dir, Registry};

const BOOT_TIMEOUT: Duration = sm_tests::containerd::BOOT_TIMEOUT;
const QUICK: Duration = sm_tests::containerd::QUICK;

#[test]
fn ctr_runs_execs_signals_and_deletes_containers_in_microvms() {
    let test = "ctr_runs_execs_signals_and_deletes_containers_in_microvms";
    let Some(shim) = prerequisites(test) else { return };
    let (_registry, image) = busybox_in_registry();
    let mut ctd = Containerd::start(&shim, &guest_dir());
    ctd.pull(&image);

    // The command's output and exit code come back; it ran in the guest's kernel.
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let run = ctd.ctr(
        &["run", "--rm", "--runtime", RUNTIME, &image, "c1", "sh", "-c", "echo out:$(uname -r); echo err >&2; exit 3"],
        BOOT_TIMEOUT,
    );
    assert_eq!(run.code, Some(3), "exit code of the container's process\n{}{}\n{}", run.stdout, run.stderr, ctd.log());
    let guest_kernel = run.stdout.lines().find_map(|l| l.strip_prefix("out:")).expect("the command's stdout");
    assert_ne!(guest_kernel.trim(), host_kernel.trim(), "the command ran in the guest's kernel, not the host's");
    assert!(run.stderr.contains("err"), "stderr reaches ctr: {}", run.stderr);
    let baked: Vec<_> = std::fs::read_dir(ctd.store().join("baked")).unwrap().flatten().collect();
    assert_eq!(baked.len(), 1, "the first container of the image baked a snapshot\n{}", ctd.log());

    // Stdin reaches the process and its EOF ends it.
    let piped = ctd.ctr_with_input(
        &["run", "--rm", "--runtime", RUNTIME, &image, "c2", "tr", "a-z", "A-Z"],
        Some(b"piped through the guest\n"),
        BOOT_TIMEOUT,
    );
    assert_eq!(piped.code, Some(0), "{}{}", piped.stdout, piped.stderr);
    assert_eq!(piped.stdout, "PIPED THROUGH THE GUEST\n");
    assert!(
        ctd.log().contains("container c2: restored from a baked snapshot"),
        "the second container of the image restored the baked snapshot\n{}",
        ctd.log()
    );

    // A detached container: a second process beside it, then a signal ends it.
    let detached = ctd.ctr(&["run", "-d", "--runtime", RUNTIME, &image, "c3", "sleep", "600"], BOOT_TIMEOUT);
    assert_eq!(detached.code, Some(0), "{}{}", detached.stdout, detached.stderr);
    assert_eq!(task_status(&ctd, "c3").as_deref(), Some("RUNNING"));
    let exec =
        ctd.ctr(&["task", "exec", "--exec-id", "e1", "c3", "sh", "-c", "echo exec:$(pidof sleep); exit 5"], QUICK);
    assert_eq!(exec.code, Some(5), "{}{}", exec.stdout, exec.stderr);
    assert!(
        exec.stdout.starts_with("exec:") && exec.stdout.trim().len() > "exec:".len(),
        "the exec sees the init: {}",
        exec.stdout
    );
    let ps = ctd.ctr(&["task", "ps", "c3"], QUICK);
    assert_eq!(ps.code, Some(0), "{}", ps.stderr);
    let sleep_pid = exec.stdout.trim().trim_start_matches("exec:").to_string();
    assert!(
        ps.stdout.lines().any(|l| l.split_whitespace().next() == Some(sleep_pid.as_str())),
        "ps lists the init's guest pid {sleep_pid}: {}",
        ps.stdout
    );
    // Stats: the VM's host CPU time and resident memory, a limit of its guest RAM.
    let metrics = ctd.ctr(&["task", "metrics", "--format", "json", "c3"], QUICK);
    assert_eq!(metrics.code, Some(0), "{}{}", metrics.stdout, metrics.stderr);
    let m: serde_json::Value = serde_json::from_str(&metrics.stdout).expect("ctr's metrics JSON");
    let figure = |path: &str| m.pointer(path).and_then(serde_json::Value::as_u64).unwrap_or(0);
    assert!(figure("/memory/usage/usage") > 1 << 20, "resident memory of the VM: {m}");
    assert_eq!(figure("/memory/usage/limit"), 256 << 20, "the guest's RAM: {m}");
    assert!(figure("/cpu/usage/total") > 0, "CPU time of the VM: {m}");
    assert_eq!(figure("/pids/current"), 1, "the init runs (the exec has ended): {m}");
    let kill = ctd.ctr(&["task", "kill", "-s", "SIGTERM", "c3"], QUICK);
    assert_eq!(kill.code, Some(0), "{}", kill.stderr);
    let t = std::time::Instant::now();
    while task_status(&ctd, "c3").as_deref() != Some("STOPPED") {
        assert!(t.elapsed() < QUICK, "c3 did not stop after SIGTERM: {:?}", task_status(&ctd, "c3"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let delete = ctd.ctr(&["task", "delete", "c3"], QUICK);
    assert_eq!(delete.code, Some(0), "{}", delete.stderr);
    assert_eq!(ctd.ctr(&["containers", "rm", "c3"], QUICK).code, Some(0));

    // A terminal: the process runs on a pty (ctr needs one of its own: script).
    let mut cmd = std::process::Command::new("/usr/bin/script");
    let ctr = format!(
        "/usr/bin/ctr -a {} -n {} run -t --rm --runtime {RUNTIME} {image} c4 sh -c 'tty; echo on-a-tty'",
        ctd.socket.display(),
        sm_tests::containerd::NAMESPACE
    );
    cmd.args(["-qec", &ctr, "/dev/null"]);
    let tty = sm_tests::run_command(cmd, "script ctr run -t", None, BOOT_TIMEOUT);
    assert_eq!(tty.code, Some(0), "{}{}", tty.stdout, tty.stderr);
    assert!(tty.stdout.contains("/dev/pts/") && tty.stdout.contains("on-a-tty"), "{}", tty.stdout);

    if std::env::var_os("SM_SHOW_CONTAINERD_LOG").is_some() {
        eprintln!("{}", ctd.log());
    }
    ctd.assert_nothing_left(QUICK);
    ctd.stop();
}

#[test]
fn create_fails_with_a_clear_error_and_leaves_nothing_without_a_guest_kernel_or_a_root() {
    let test = "create_fails_with_a_clear_error_and_leaves_nothing_without_a_guest_kernel_or_a_root";
    let Some(shim) = prerequisites(test) else { return };
    let (_registry, image) = busybox_in_registry();
    let empty_guest = temp_dir("no-guest");
    let mut ctd = Containerd::start(&shim, empty_guest.path());
    ctd.pull(&image);
    let run = ctd.ctr(&["run", "--rm", "--runtime", RUNTIME, &image, "bad", "true"], QUICK);
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("guest kernel") && run.stderr.contains("SM_GUEST_DIR"),
        "the error names what is missing and what to do: {}",
        run.stderr
    );
    eprintln!("ctr showed: {}", run.stderr.trim());
    // ctr leaves the container record (not the task) on a failed create, as with runc.
    let _ = ctd.ctr(&["containers", "rm", "bad"], QUICK);

    // A bundle whose root file system is not there (ctr --rootfs, no
    // snapshot mounts): named before anything else is looked for.
    let missing = temp_dir("no-rootfs").path().join("rootfs");
    let missing = missing.to_str().unwrap();
    let run = ctd.ctr(&["run", "--rm", "--runtime", RUNTIME, "--rootfs", missing, "bad-root", "true"], QUICK);
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains(missing) && run.stderr.contains("not a directory"),
        "the error names the bundle's missing root: {}",
        run.stderr
    );
    eprintln!("ctr showed: {}", run.stderr.trim());
    let _ = ctd.ctr(&["containers", "rm", "bad-root"], QUICK);
    ctd.assert_nothing_left(QUICK);
    ctd.stop();
}

#[test]
fn create_fails_with_a_clear_error_and_leaves_nothing_without_dev_kvm() {
    let test = "create_fails_with_a_clear_error_and_leaves_nothing_without_dev_kvm";
    let Some(shim) = prerequisites(test) else { return };
    let (_registry, image) = busybox_in_registry();
    // containerd and its shims see a /dev without kvm (a mount namespace of their own).
    let mut ctd = Containerd::start_without_kvm(&shim, &guest_dir());
    ctd.pull(&image);
    let run = ctd.ctr(&["run", "--rm", "--runtime", RUNTIME, &image, "no-kvm", "true"], QUICK);
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("/dev/kvm does not exist")
            && run.stderr.contains("modprobe")
            && run.stderr.trim_end().ends_with("unavailable"),
        "the error names what is missing and what to do: {}\n{}",
        run.stderr,
        ctd.log()
    );
    eprintln!("ctr showed: {}", run.stderr.trim());
    let _ = ctd.ctr(&["containers", "rm", "no-kvm"], QUICK);
    ctd.assert_nothing_left(QUICK);
    ctd.stop();
}

#[test]
fn ctr_runs_a_debian_image_with_its_env_working_directory_and_memory_limit() {
    let test = "ctr_runs_a_debian_image_with_its_env_working_directory_and_memory_limit";
    let Some(shim) = prerequisites(test) else { return };
    let Some(layout) = sm_tests::debian_python_layout(test) else { return };
    let registry = Registry::start();
    registry.push(&layout, "debian/python:bookworm");
    let image = format!("127.0.0.1:{}/debian/python:bookworm", registry.port);
    let mut ctd = Containerd::start(&shim, &guest_dir());
    ctd.pull(&image);
    // ctr's --cwd, --env and --memory-limit land in the bundle's spec: the
    // process runs there with that environment, in a guest of that size.
    let script = "import os; mem = next(l for l in open('/proc/meminfo') if l.startswith('MemTotal')).split()[1]; \
                  print(os.getcwd(), os.environ['GREETING'], 2 + 3, mem)";
    let run = ctd.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--memory-limit",
            "536870912",
            "--cwd",
            "/tmp",
            "--env",
            "GREETING=hi",
            &image,
            "py",
            "python3",
            "-c",
            script,
        ],
        BOOT_TIMEOUT,
    );
    assert_eq!(run.code, Some(0), "{}{}\n{}", run.stdout, run.stderr, ctd.log());
    let fields: Vec<&str> = run.stdout.split_whitespace().collect();
    assert_eq!(fields[..3], ["/tmp", "hi", "5"], "{}", run.stdout);
    let mem_kib: u64 = fields[3].parse().unwrap();
    assert!((400 << 10..=512 << 10).contains(&mem_kib), "a 512 MiB guest (MemTotal {mem_kib} KiB)");
    ctd.assert_nothing_left(QUICK);
    ctd.stop();
}
