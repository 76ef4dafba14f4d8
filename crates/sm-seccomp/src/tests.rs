//! Each case runs in a child process (this test binary again, running only
//! `tests::confined_child` with the case in `SM_SECCOMP_CHILD`), because a
//! denied call kills the whole process.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use crate::{confine_current_thread, FsRule, ThreadKind};

const CASE: &str = "SM_SECCOMP_CHILD";

/// Runs the child for `case`, then removes the directory it served
/// (`sm-seccomp-<its pid>`: a child killed by its filter cannot).
fn run_child(case: &str) -> std::process::ExitStatus {
    run_child_with(case, false)
}

fn run_child_with(case: &str, no_sandbox: bool) -> std::process::ExitStatus {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["--exact", "tests::confined_child", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CASE, case);
    if no_sandbox {
        command.env("SM_NO_SANDBOX", "1");
    } else {
        command.env_remove("SM_NO_SANDBOX");
    }
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running the child");
    let pid = child.id();
    let out = child.wait_with_output().expect("the child");
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("sm-seccomp-{pid}")));
    if !out.status.success() && !no_sandbox {
        eprintln!("child {case}: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status
}

#[test]
#[ignore = "the child process of the seccomp tests (run by them with SM_SECCOMP_CHILD set)"]
fn confined_child() {
    let Ok(case) = std::env::var(CASE) else { return };
    // The directory a device would serve (made before confinement).
    let dir = std::env::temp_dir().join(format!("sm-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("served"), b"served").expect("write");
    let held = std::fs::File::open("/etc/passwd").expect("a file opened before confinement");
    // Opened before confinement (Landlock covers /proc too), read after.
    let own_status = std::fs::File::open("/proc/thread-self/status").expect("status");
    let rules = match case.as_str() {
        "caps" => vec![],
        _ => vec![FsRule { path: dir.clone(), writable: case != "fs-read-only" }],
    };
    let confined = confine_current_thread(ThreadKind::DeviceWorker, &rules);
    confined.expect("confined");
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
        "fs-outside" => {
            // Nothing outside the served directory opens, from this thread
            // or one it starts; a file opened before stays readable.
            let denied = |path: &str| {
                std::fs::File::open(path).err().map(|e| e.kind()) == Some(std::io::ErrorKind::PermissionDenied)
            };
            assert!(denied("/etc/passwd"), "/etc/passwd opened");
            assert!(std::thread::spawn(move || denied("/etc/hostname")).join().unwrap(), "from a new thread");
            assert!(std::fs::File::create(std::env::temp_dir().join("sm-seccomp-escape")).is_err(), "a file created");
            let mut text = String::new();
            std::io::Read::read_to_string(&mut &held, &mut text).expect("the held file");
            assert!(!text.is_empty());
            std::process::exit(0);
        }
        "fs-read-only" => {
            assert_eq!(std::fs::read(dir.join("served")).expect("read"), b"served");
            let write = std::fs::write(dir.join("new"), b"x").err().map(|e| e.kind());
            assert_eq!(write, Some(std::io::ErrorKind::PermissionDenied), "a read-only share refuses writes");
            let remove = std::fs::remove_file(dir.join("served")).err().map(|e| e.kind());
            assert_eq!(remove, Some(std::io::ErrorKind::PermissionDenied), "and removals");
            std::process::exit(0);
        }
        "caps" => {
            // A thread without host paths keeps no capability (read from
            // the kernel's view of this very thread); one serving files
            // keeps at most the file-work ones.
            let sets = capability_sets(&own_status);
            assert_eq!(&sets[..3], &[0, 0, 0], "CapInh, CapPrm, CapEff: {sets:x?}");
            if am_root() {
                assert_eq!(sets[3], 0, "CapBnd: {sets:x?}");
            }
            std::process::exit(0);
        }
        "caps-inherited" => {
            // A thread started by a confined one that keeps the file-work
            // capabilities (a vCPU thread of a VM with a share) confines
            // itself again without rules (a worker of another device): it
            // ends with none, and no SIGSYS from capset.
            // (Read with capget: Landlock keeps /proc out of reach here.)
            let again = std::thread::spawn(|| {
                confine_current_thread(ThreadKind::DeviceWorker, &[]).expect("confined again");
                [caps::CapSet::Inheritable, caps::CapSet::Permitted, caps::CapSet::Effective]
                    .map(|set| caps::read(None, set).expect("capget").len())
            });
            let sets = again.join().unwrap();
            assert_eq!(sets, [0, 0, 0], "inheritable, permitted, effective of the second thread");
            std::process::exit(0);
        }
        "allowed" => {
            // What devices do: threads, files (in what they serve), sockets,
            // memory, eventfds.
            let t = std::thread::spawn(|| 7).join().expect("a thread");
            assert_eq!(t, 7);
            std::fs::write(dir.join("f"), b"data").expect("write");
            assert_eq!(std::fs::read(dir.join("f")).expect("read"), b"data");
            std::fs::rename(dir.join("f"), dir.join("g")).expect("rename");
            std::fs::remove_file(dir.join("g")).expect("rm");
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
fn a_confined_thread_opens_nothing_outside_what_its_devices_serve() {
    for case in ["fs-outside", "fs-read-only"] {
        let status = run_child(case);
        assert_eq!(status.code(), Some(0), "{case}: {status:?}");
    }
}

/// CapInh, CapPrm, CapEff, CapBnd from a thread's `/proc/thread-self/status`
/// (opened by that thread), as they are now.
fn capability_sets(file: &std::fs::File) -> [u64; 4] {
    let mut buf = vec![0; 8192];
    let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, 0).expect("status");
    let status = String::from_utf8_lossy(&buf[..n]);
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).expect(name);
        u64::from_str_radix(line[name.len()..].trim(), 16).expect("hex")
    };
    [field("CapInh:"), field("CapPrm:"), field("CapEff:"), field("CapBnd:")]
}

fn am_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_confined_thread_drops_its_capabilities() {
    for case in ["caps", "caps-inherited"] {
        let status = run_child(case);
        assert_eq!(status.code(), Some(0), "{case}: {status:?}");
    }
}

#[test]
fn a_thread_serving_files_keeps_only_the_file_work_capabilities() {
    // In a thread of this process: capabilities are per thread.
    let dir = tempfile::tempdir().unwrap();
    let rules = [FsRule { path: dir.path().to_path_buf(), writable: true }];
    let sets = std::thread::spawn(move || {
        let own_status = std::fs::File::open("/proc/thread-self/status").expect("status");
        confine_current_thread(ThreadKind::DeviceWorker, &rules).expect("confined");
        capability_sets(&own_status)
    })
    .join()
    .unwrap();
    use caps::Capability::*;
    let file_work = [CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID, CAP_SYS_RESOURCE]
        .iter()
        .fold(0u64, |m, c| m | 1 << c.index());
    // What this process may hold at all (a container may lack some).
    let had = capability_sets(&std::fs::File::open("/proc/thread-self/status").expect("status"))[2];
    if crate::enabled() {
        assert_eq!(sets[2] & !file_work, 0, "CapEff beyond file work: {sets:x?}");
        assert_eq!(sets[1] & !file_work, 0, "CapPrm beyond file work: {sets:x?}");
        if am_root() {
            assert_eq!(sets[2], file_work & had, "root keeps the file work ones it had: {sets:x?}");
            assert_eq!(sets[3] & !file_work, 0, "and nothing else can come back (bounding): {sets:x?}");
        }
    }
    // This thread is untouched.
    if am_root() {
        let own_status = std::fs::File::open("/proc/thread-self/status").expect("status");
        assert_ne!(capability_sets(&own_status)[2] & 1 << CAP_SYS_ADMIN.index(), 0);
    }
}

#[test]
fn a_confined_thread_keeps_what_devices_need() {
    let status = run_child("allowed");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn no_sandbox_turns_confinement_off() {
    let status = run_child_with("setuid", true);
    // setuid(0) as whoever runs the tests: allowed through, the child exits 2.
    assert_eq!(status.code(), Some(2), "{status:?}");
}
