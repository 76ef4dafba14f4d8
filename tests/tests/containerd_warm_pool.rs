//! The shim's warm pool under Debian's real containerd: with
//! `SM_SHIM_WARM_VMS` in containerd's environment, one shim serves the
//! namespace's containers, a deleted container's VM is reset to the image's
//! snapshot and handed to the next container of the image, nothing of the
//! previous container is left in it, and the shim ends by itself once its
//! warm VMs have expired.

use std::time::{Duration, Instant};

use sm_tests::containerd::{busybox_in_registry, prerequisites, task_status, Containerd, BOOT_TIMEOUT, QUICK, RUNTIME};
use sm_tests::guest_dir;

/// How long an idle VM stays warm in this test: long enough that w2's VM
/// is still warm when w3 comes on a busy host.
const WARM_SECONDS: &str = "15";

fn run(ctd: &Containerd, image: &str, id: &str, script: &str) -> String {
    let out = ctd.ctr(&["run", "--rm", "--runtime", RUNTIME, image, id, "sh", "-c", script], BOOT_TIMEOUT);
    assert_eq!(out.code, Some(0), "{id}: {}{}\n{}", out.stdout, out.stderr, ctd.log());
    out.stdout
}

#[test]
fn a_warm_pool_shim_hands_a_reset_vm_to_the_next_container_and_ends_when_idle() {
    let test = "a_warm_pool_shim_hands_a_reset_vm_to_the_next_container_and_ends_when_idle";
    let Some(shim) = prerequisites(test) else { return };
    let (_registry, image) = busybox_in_registry();
    let env = [("SM_SHIM_WARM_VMS", "1"), ("SM_SHIM_WARM_SECONDS", WARM_SECONDS)];
    let mut ctd = Containerd::start_with_env(&shim, &guest_dir(), &env);
    ctd.pull(&image);

    // The image's first container boots cold and bakes its snapshot; the
    // second is restored into the pool and leaves a file in its VM.
    assert_eq!(run(&ctd, &image, "w1", "echo first"), "first\n");
    assert_eq!(run(&ctd, &image, "w2", "echo secret > /left-behind; cat /left-behind"), "secret\n");
    assert!(ctd.log().contains("container w2: restored into the warm pool"), "{}", ctd.log());

    // w2's VM, reset, is handed to w3 (which waits for the reset rather
    // than restoring another): nothing of w2 is in it.
    let w3 = run(&ctd, &image, "w3", "cat /left-behind 2>/dev/null || echo clean; uname -r");
    assert!(w3.starts_with("clean\n"), "the previous container's file is gone: {w3:?}");
    assert!(ctd.log().contains("container w3: an idle VM of the warm pool"), "a pool hit\n{}", ctd.log());

    // Two containers at once, in the one shim: each has its own VM.
    for id in ["d1", "d2"] {
        let out = ctd.ctr(&["run", "-d", "--runtime", RUNTIME, &image, id, "sleep", "600"], BOOT_TIMEOUT);
        assert_eq!(out.code, Some(0), "{id}: {}{}\n{}", out.stdout, out.stderr, ctd.log());
    }
    assert_eq!(ctd.shims().len(), 1, "one shim serves the namespace: {:?}", ctd.shims());
    let mark = ctd.ctr(&["task", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo d1 > /mark; cat /mark"], QUICK);
    assert_eq!((mark.code, mark.stdout.as_str()), (Some(0), "d1\n"), "{}", mark.stderr);
    let look =
        ctd.ctr(&["task", "exec", "--exec-id", "e2", "d2", "sh", "-c", "cat /mark 2>/dev/null || echo none"], QUICK);
    assert_eq!((look.code, look.stdout.as_str()), (Some(0), "none\n"), "d2 runs in another VM: {}", look.stderr);
    for id in ["d1", "d2"] {
        assert_eq!(ctd.ctr(&["task", "kill", "-s", "SIGKILL", id], QUICK).code, Some(0));
        let t = Instant::now();
        while task_status(&ctd, id).as_deref() != Some("STOPPED") {
            assert!(t.elapsed() < QUICK, "{id} did not stop: {:?}", task_status(&ctd, id));
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(ctd.ctr(&["task", "delete", id], QUICK).code, Some(0));
        assert_eq!(ctd.ctr(&["containers", "rm", id], QUICK).code, Some(0));
    }

    // No container left: the warm VMs expire, then the shim ends by itself.
    // (15 s warm, the pool's reaper every 7.5 s, 20 s after the last Create.)
    ctd.assert_nothing_left(Duration::from_secs(180));
    if std::env::var_os("SM_SHOW_CONTAINERD_LOG").is_some() {
        eprintln!("{}", ctd.log());
    }
    ctd.stop();
}
