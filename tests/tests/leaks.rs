//! Many restore/run/destroy cycles of a real guest's snapshot leak no fds, threads
//! or memory. (Its own test binary: nothing else runs in this process meanwhile.)
//! Each cycle restores the agent guest with its vsock device (worker thread,
//! sockets, eventfds, irqfds, ioeventfds), runs it, and drops it.

use std::time::Duration;

use sm_tests::{agent_snapshot, hypervisor};
use sm_virtio::vsock::{Vsock, DEFAULT_GUEST_CID};
use sm_vmm::{ConsoleOutput, Machine, RestoreOptions};

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn status_field(name: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(name)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn two_hundred_restore_destroy_cycles_leak_nothing() {
    let Some(snap) = agent_snapshot("leaks") else { return };
    let Some(hv) = hypervisor("leaks") else { return };
    let dir = std::env::temp_dir().join(format!("sm-leaks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cycle = |i: usize| {
        let vsock = Box::new(Vsock::new(DEFAULT_GUEST_CID, &dir.join(format!("v{}.sock", i % 4))).unwrap());
        let (mut m, _) =
            Machine::restore(&*hv, snap, RestoreOptions { console: ConsoleOutput::Null, devices: vec![vsock] })
                .unwrap();
        m.start().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        m.stop();
    };
    // Warm up allocators and lazily created state.
    for i in 0..5 {
        cycle(i);
    }
    let (fds, threads, rss) = (fd_count(), status_field("Threads:"), status_field("VmRSS:"));
    for i in 0..200 {
        cycle(i);
    }
    let (fds2, threads2, rss2) = (fd_count(), status_field("Threads:"), status_field("VmRSS:"));
    eprintln!("fds {fds}->{fds2}, threads {threads}->{threads2}, rss {rss}->{rss2} KiB");
    assert!(fds2 <= fds, "fd leak: {fds} -> {fds2}");
    assert!(threads2 <= threads, "thread leak: {threads} -> {threads2}");
    assert!(rss2 < rss + 32 * 1024, "RSS grew by {} KiB over 200 cycles", rss2.saturating_sub(rss));
    let _ = std::fs::remove_dir_all(&dir);
}
