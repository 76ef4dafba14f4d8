//! Many restore/destroy cycles of a real guest leak no fds, threads or memory.
//! (Its own test binary: nothing else runs in this process meanwhile.)

use sm_api::Vm;
use sm_tests::{agent_snapshot, hypervisor};
use sm_vmm::ConsoleOutput;

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
    // Warm up allocators and lazily created state.
    for _ in 0..5 {
        drop(Vm::restore(&*hv, snap, ConsoleOutput::Null, &[]).unwrap());
    }
    let (fds, threads, rss) = (fd_count(), status_field("Threads:"), status_field("VmRSS:"));
    for _ in 0..200 {
        let vm = Vm::restore(&*hv, snap, ConsoleOutput::Null, &[]).unwrap();
        drop(vm);
    }
    let (fds2, threads2, rss2) = (fd_count(), status_field("Threads:"), status_field("VmRSS:"));
    eprintln!("fds {fds}->{fds2}, threads {threads}->{threads2}, rss {rss}->{rss2} KiB");
    assert!(fds2 <= fds + 2, "fd leak: {fds} -> {fds2}");
    assert!(threads2 <= threads + 1, "thread leak: {threads} -> {threads2}");
    assert!(rss2 < rss + 64 * 1024, "RSS grew by {} KiB", rss2 - rss);
}
