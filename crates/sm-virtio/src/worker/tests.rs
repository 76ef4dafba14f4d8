//! The worker thread on real eventfds, and its seccomp confinement.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;

#[test]
fn worker_dispatches_by_index_and_returns_its_state() {
    let a = EventFd::new(EFD_NONBLOCK).unwrap();
    let b = EventFd::new(EFD_NONBLOCK).unwrap();
    let fds = [a.as_raw_fd(), b.as_raw_fd()];
    let seen = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let seen2 = seen.clone();
    let state = (a.try_clone().unwrap(), b.try_clone().unwrap(), 0u32);
    let mut w = Worker::spawn("test-worker", &fds, &[], state, move |st, i| {
        drain_eventfd(if i == 0 { &st.0 } else { &st.1 });
        st.2 += 1;
        seen2[i].fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    b.write(1).unwrap();
    testing::wait_for("event b", || seen[1].load(Ordering::SeqCst) == 1);
    a.write(1).unwrap();
    testing::wait_for("event a", || seen[0].load(Ordering::SeqCst) == 1);
    let state = w.stop().expect("state handed back");
    assert_eq!(state.2, 2, "the handler's changes are in the returned state");
    // After stop nothing is dispatched any more.
    a.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(seen[0].load(Ordering::SeqCst), 1);
    assert!(w.stop().is_none(), "second stop: nothing left");
}

/// In a child process (see below): a worker whose handler makes a call
/// the sandbox denies, as a subverted device would.
#[test]
#[ignore = "the child process of worker_threads_are_confined (run by it with SM_WORKER_CHILD set)"]
fn worker_child_makes_a_denied_call() {
    if std::env::var_os("SM_WORKER_CHILD").is_none() {
        return;
    }
    let a = EventFd::new(EFD_NONBLOCK).unwrap();
    let fds = [a.as_raw_fd()];
    let _w = Worker::spawn("hostile-worker", &fds, &[], (), |_, _| {
        // SAFETY: a raw ptrace(PTRACE_TRACEME) touching no memory of ours;
        // the filter kills the process first.
        unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
    })
    .unwrap();
    a.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(5));
    // Not killed: say so.
    std::process::exit(2);
}

#[test]
fn worker_threads_are_confined() {
    use std::os::unix::process::ExitStatusExt;
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "worker::tests::worker_child_makes_a_denied_call", "--include-ignored"])
        .env("SM_WORKER_CHILD", "1")
        .env_remove("SM_NO_SANDBOX")
        .output()
        .unwrap()
        .status;
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}

#[test]
fn a_worker_opens_files_only_below_its_device_host_paths() {
    if !sm_seccomp::enabled() {
        return;
    }
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("f"), b"served").unwrap();
    let a = EventFd::new(EFD_NONBLOCK).unwrap();
    let fds = [a.as_raw_fd()];
    let rules = [sm_seccomp::FsRule { path: served.path().to_path_buf(), writable: false }];
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = served.path().to_path_buf();
    let _w = Worker::spawn("fs-worker", &fds, &rules, (), move |_, _| {
        let inside = std::fs::read(dir.join("f")).map_err(|e| e.kind());
        let outside = std::fs::File::open("/etc/passwd").map(|_| ()).map_err(|e| e.kind());
        let write = std::fs::write(dir.join("new"), b"x").map_err(|e| e.kind());
        let _ = tx.send((inside, outside, write));
    })
    .unwrap();
    a.write(1).unwrap();
    let (inside, outside, write) = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(inside, Ok(b"served".to_vec()), "below its host path");
    assert_eq!(outside, Err(std::io::ErrorKind::PermissionDenied), "outside it");
    assert_eq!(write, Err(std::io::ErrorKind::PermissionDenied), "a read-only host path");
    // This (unconfined) thread still opens anything.
    assert!(std::fs::File::open("/etc/passwd").is_ok());
}
