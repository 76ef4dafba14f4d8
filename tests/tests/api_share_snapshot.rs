//! A snapshot of a VM with a shared host directory mounted, through the
//! library: the FUSE session (node ids, open files) is in the snapshot and
//! comes back by path in the restored VM — a file a guest process held open
//! across the snapshot is read through its old handle after the restore, the
//! guest sees what the host changed in between (new contents, a deleted
//! file), the same snapshot restores onto another directory read-only, and a
//! pool of VMs from it shares the directory and keeps it across resets.

use std::path::Path;
use std::time::{Duration, Instant};

use sm_api::{ConsoleOutput, ExecRequest, ExitStatus, Pool, PoolConfig, RestoreConfig, ShareMount, Vm, VmConfig};
use sm_tests::{agent_image, hypervisor, temp_dir};

fn sh(vm: &Vm, script: &str) -> (ExitStatus, String, String) {
    let out = vm.exec(&ExecRequest::new(["/bin/sh", "-c", script]), None).unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn share(dir: &Path, read_only: bool) -> ShareMount {
    ShareMount { read_only, ..ShareMount::new(dir, "/src") }
}

/// Waits (bounded) for `path` to hold `want`.
fn wait_for(path: &Path, want: &[u8], within: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    loop {
        let now = std::fs::read(path).ok();
        if now.as_deref() == Some(want) || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_vm_with_a_share_mounted_snapshots_and_restores_its_fuse_session() {
    let test = "api share snapshot";
    let Some(hv) = hypervisor(test) else { return };
    let Some(image) = agent_image(test) else { return };
    let tmp = temp_dir("apisharesnap");
    let dir = tmp.path().join("share");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("in"), b"version one\n").unwrap();
    std::fs::write(dir.join("held"), b"held open across the snapshot\n").unwrap();
    std::fs::write(dir.join("gone"), b"deleted on the host\n").unwrap();

    let mut config = VmConfig::new(image);
    config.shares = vec![share(&dir, false)];
    let mut vm = Vm::boot(&*hv, config).unwrap();
    // The guest looks files up, reads them, and leaves a process holding
    // `held` open (unread) that reads it through that descriptor later.
    let (status, out, err) = sh(
        &vm,
        "cat /src/in /src/gone && ls /src || exit 1
         exec 3</src/held
         (sleep 12; cat <&3 > /src/later) </dev/null >/dev/null 2>&1 &",
    );
    assert_eq!(status, ExitStatus::Code(0), "{out} {err}");
    assert!(out.starts_with("version one\ndeleted on the host\n"), "{out}");

    let snap = tmp.path().join("share.snap");
    vm.snapshot(&snap).unwrap();
    // Paused since the snapshot: the VM stops without running on.
    vm.stop();
    assert!(!dir.join("later").exists(), "the snapshotted VM did not run on");

    // The host changes the share between snapshot and restore.
    std::fs::write(dir.join("in"), b"version two, longer than one\n").unwrap();
    std::fs::remove_file(dir.join("gone")).unwrap();

    let restore = |shares: Vec<ShareMount>| {
        let config = RestoreConfig { shares, ..RestoreConfig::new(ConsoleOutput::Null) };
        Vm::restore_with(&*hv, &snap, &config).unwrap()
    };
    let vm = restore(vec![share(&dir, false)]);
    let (status, out, err) = sh(&vm, "cat /src/in; ls /src; cat /src/gone; echo after > /src/after");
    assert_eq!(status, ExitStatus::Code(0), "{out} {err}");
    assert!(out.starts_with("version two, longer than one\n"), "the restored guest sees the host's change: {out}");
    assert!(out.contains("held") && !out.contains("gone"), "{out}");
    assert!(err.contains("/src/gone"), "reading the deleted file fails: {err}");
    assert_eq!(std::fs::read(dir.join("after")).unwrap(), b"after\n");
    // The process from before the snapshot reads through its restored handle.
    let later = wait_for(&dir.join("later"), b"held open across the snapshot\n", Duration::from_secs(180));
    assert_eq!(
        later.as_deref(),
        Some(&b"held open across the snapshot\n"[..]),
        "{:?}",
        later.as_deref().map(String::from_utf8_lossy)
    );
    drop(vm);

    // The same snapshot onto another directory, read-only this time.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("in"), b"the other directory\n").unwrap();
    std::fs::write(other.join("held"), b"other held\n").unwrap();
    let vm = restore(vec![share(&other, true)]);
    let (status, out, err) = sh(&vm, "cat /src/in && ! touch /src/new 2>/dev/null && grep -w /src /proc/mounts");
    assert_eq!(status, ExitStatus::Code(0), "{out} {err}");
    assert!(out.starts_with("the other directory\n"), "{out}");
    assert!(out.contains(" ro,") || out.contains(" ro "), "remounted read-only: {out}");
    assert!(!other.join("new").exists());
    drop(vm);
    assert!(!dir.join("new").exists());

    // A pool over the same snapshot and directory: its VMs share the
    // directory, and a released VM comes back (reset) with the share mounted.
    let mut config = PoolConfig::new(snap.clone());
    config.min_idle = 0;
    config.max = 2;
    config.shares = vec![share(&dir, false)];
    let pool = Pool::new(hv, config).unwrap();
    {
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        sh(&a, "echo from a > /src/from-a");
        let (status, out, err) = sh(&b, "cat /src/from-a");
        assert_eq!((status, out.as_str()), (ExitStatus::Code(0), "from a\n"), "{err}");
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while pool.stats().resets < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let vm = pool.acquire().unwrap();
    let (status, out, err) = sh(&vm, "cat /src/in /src/from-a");
    assert_eq!(status, ExitStatus::Code(0), "{err}");
    assert_eq!(out, "version two, longer than one\nfrom a\n", "a reset VM still sees the share as it is now");
}
