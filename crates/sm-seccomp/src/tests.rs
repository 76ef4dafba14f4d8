//! Each case runs in a child process (this test binary again, running only
//! `tests::confined_child` with the case in `SM_SECCOMP_CHILD`), because a
//! denied call kills the whole process.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use crate::{confine_current_thread, ThreadKind};

const CASE: &str = "SM_SECCOMP_CHILD";

fn run_child(case: &str) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "tests::confined_child", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CASE, case)
        .env_remove("SM_NO_SANDBOX")
        .output()
        .expect("running the child")
        .status
}

#[test]
#[ignore = "the child process of the seccomp tests (run by them with SM_SECCOMP_CHILD set)"]
fn confined_child() {
    let Ok(case) = std::env::var(CASE) else { return };
    confine_current_thread(ThreadKind::DeviceWorker).expect("confined");
    match case.as_str() {
        // SAFETY: raw system calls with arguments that touch no memory of ours;
        // the filter kills the process before any of them runs.
        "ptrace" => unsafe {
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
        },
        // SAFETY: as above.
        "unshare" => unsafe {
            libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS);
        },
        // SAFETY: as above.
        "io_uring_setup" => unsafe {
            libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null_mut::<libc::c_void>());
        },
        // SAFETY: as above.
        "setuid" => unsafe {
            libc::syscall(libc::SYS_setuid, 0);
        },
        "thread-then-spawn" => {
            // A thread the confined one starts is confined too: making a
            // process (the clone of a spawn) kills this one.
            std::thread::spawn(|| {
                let _ = Command::new("/bin/true").status();
            })
            .join()
            .expect("thread");
        }
        // SAFETY: as above; x32's execve number.
        "x32-execve" => unsafe {
            libc::syscall(0x4000_0000 | 520, c"/bin/true".as_ptr(), 0, 0);
        },
        // SAFETY: as above: clone for a new network namespace (fails or kills).
        "clone-newnet" => unsafe {
            libc::syscall(libc::SYS_clone, libc::CLONE_NEWNET | libc::SIGCHLD, 0, 0, 0, 0);
        },
        "allowed" => {
            // What devices do: threads, files, sockets, memory, eventfds.
            let t = std::thread::spawn(|| 7).join().expect("a thread");
            assert_eq!(t, 7);
            let dir = std::env::temp_dir().join(format!("sm-seccomp-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("f"), b"data").expect("write");
            assert_eq!(std::fs::read(dir.join("f")).expect("read"), b"data");
            std::fs::remove_dir_all(&dir).expect("rm");
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            drop((a, b));
            let v = vec![0u8; 8 << 20];
            assert_eq!(v.len(), 8 << 20);
            // SAFETY: creates an fd we close at once.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(efd >= 0);
            // SAFETY: our own fd.
            unsafe { libc::close(efd) };
            std::process::exit(0);
        }
        other => panic!("unknown case {other}"),
    }
    // Reached only if the call was not stopped.
    std::process::exit(2);
}

#[test]
fn a_denied_call_from_a_confined_thread_kills_the_process() {
    for case in ["ptrace", "unshare", "io_uring_setup", "setuid"] {
        let status = run_child(case);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{case}: {status:?}");
    }
}

#[test]
fn no_process_or_namespace_is_made_from_a_confined_thread() {
    for case in ["thread-then-spawn", "x32-execve", "clone-newnet"] {
        let status = run_child(case);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{case}: {status:?}");
    }
}

#[test]
fn a_confined_thread_keeps_what_devices_need() {
    let status = run_child("allowed");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn no_sandbox_turns_confinement_off() {
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "tests::confined_child", "--include-ignored", "--test-threads=1"])
        .env(CASE, "setuid")
        .env("SM_NO_SANDBOX", "1")
        .output()
        .expect("running the child")
        .status;
    // setuid(0) as whoever runs the tests: allowed through, the child exits 2.
    assert_eq!(status.code(), Some(2), "{status:?}");
}
