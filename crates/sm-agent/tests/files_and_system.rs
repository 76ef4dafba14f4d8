//! File transfer, clock and entropy requests against the real agent binary.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{pattern, running_as_root, Agent};
use sm_agent::protocol::FILE_CHUNK;
use sm_agent::{ErrorKind, MountRequest};

#[test]
fn write_file_then_read_file_round_trips() {
    let agent = Agent::start();
    let mut c = agent.client();
    // Several FILE_CHUNKs plus a tail.
    let data = pattern(3 * FILE_CHUNK + 1234, 5);
    let path = agent.dir.file("blob.bin");
    c.write_file(&path, 0o640, &data).expect("write");
    let on_disk = std::fs::read(&path).expect("file exists");
    assert!(on_disk == data, "written bytes differ");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o7777, 0o640);
    let back = c.read_file(&path).expect("read");
    assert!(back == data, "read bytes differ");

    // Overwriting truncates and applies the new mode exactly (no umask).
    c.write_file(&path, 0o777, b"short").expect("overwrite");
    assert_eq!(c.read_file(&path).expect("read"), b"short");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o7777, 0o777);

    // Empty files work both ways.
    let empty = agent.dir.file("empty");
    c.write_file(&empty, 0o600, b"").expect("write empty");
    assert_eq!(c.read_file(&empty).expect("read empty"), b"");
}

#[test]
fn file_errors_are_typed_and_leave_the_connection_usable() {
    let agent = Agent::start();
    let mut c = agent.client();
    let missing = c.read_file(&agent.dir.file("missing")).expect_err("missing file");
    assert_eq!(missing.agent_kind(), Some(ErrorKind::NotFound));

    let path = agent.dir.file("ten");
    c.write_file(&path, 0o644, &[7; 10]).expect("write");
    let too_big = c.read_file_limited(&path, 9).expect_err("over the cap");
    assert_eq!(too_big.agent_kind(), Some(ErrorKind::TooLarge));
    assert_eq!(c.read_file_limited(&path, 10).expect("at the cap"), [7; 10]);

    let dir = c.read_file(agent.dir.path().to_str().expect("utf-8")).expect_err("a directory");
    assert_eq!(dir.agent_kind(), Some(ErrorKind::InvalidRequest));

    // The data of a failed write is consumed; the reply is the error.
    let bad = c
        .write_file(&agent.dir.file("no/such/dir/file"), 0o644, &pattern(FILE_CHUNK + 1, 1))
        .expect_err("missing parent");
    assert_eq!(bad.agent_kind(), Some(ErrorKind::NotFound));
    c.ping().expect("still in sync");

    // Files whose size is unknown up front (procfs) are read to the end.
    let status = c.read_file("/proc/self/status").expect("procfs");
    assert!(String::from_utf8_lossy(&status).contains("Pid:"));
}

#[test]
fn clock_and_entropy_need_privileges_and_report_failures() {
    if !running_as_root() {
        // The agent runs unprivileged already.
        let agent = Agent::start();
        check_unprivileged(&agent);
        return;
    }
    let unprivileged = Agent::start_unprivileged();
    check_unprivileged(&unprivileged);

    // As root, entropy from the host is accepted. (Setting the clock is not
    // exercised here: it would change this machine's real time.)
    let agent = Agent::start();
    let mut c = agent.client();
    let seed = std::fs::read("/proc/sys/kernel/random/uuid").expect("random bytes");
    c.add_entropy(&seed).expect("add entropy as root");
    c.add_entropy(&[]).expect("empty entropy");
}

fn check_unprivileged(agent: &Agent) {
    let mut c = agent.client();
    let time = c.sync_time().expect_err("no CAP_SYS_TIME");
    assert_eq!(time.agent_kind(), Some(ErrorKind::PermissionDenied), "{time}");
    assert!(time.to_string().contains("clock_settime"), "{time}");
    let entropy = c.add_entropy(&[1, 2, 3, 4]).expect_err("no CAP_SYS_ADMIN");
    assert_eq!(entropy.agent_kind(), Some(ErrorKind::PermissionDenied), "{entropy}");
    c.ping().expect("still in sync");
}

#[test]
fn bad_mount_requests_are_refused_before_touching_the_system() {
    let agent = Agent::start();
    let mut c = agent.client();
    let good = MountRequest {
        source: "/dev/vdb".into(),
        target: "/data".into(),
        fstype: "ext4".into(),
        read_only: false,
        expect_sectors: 0,
        dax: false,
    };
    for (req, says) in [
        (MountRequest { source: "/etc/passwd".into(), ..good.clone() }, "not a /dev block device"),
        (MountRequest { source: "/dev/../etc/x".into(), ..good.clone() }, "not a /dev block device"),
        (MountRequest { target: "data".into(), ..good.clone() }, "absolute"),
        (MountRequest { target: "/a/../../b".into(), ..good.clone() }, "without .."),
        (MountRequest { fstype: "proc".into(), ..good.clone() }, "file system type"),
        (MountRequest { dax: true, ..good.clone() }, "virtiofs shares only"),
    ] {
        let e = c.mount(&req).expect_err("refused");
        assert_eq!(e.agent_kind(), Some(ErrorKind::InvalidRequest), "{req:?}: {e}");
        assert!(e.to_string().contains(says), "{req:?}: {e}");
    }
    // A device that never comes up with the size asked for: a bounded wait, then NotFound.
    let absent = MountRequest { source: "/dev/vdzz".into(), expect_sectors: 8, ..good };
    let e = c.mount(&absent).expect_err("no such device");
    assert_eq!(e.agent_kind(), Some(ErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("did not come up"), "{e}");
    c.ping().expect("still in sync");
}
