//! Many restore/run/destroy cycles of a real guest's snapshot leak no fds, threads
//! or memory. (Its own test binary: nothing else runs in this process meanwhile.)
//! Each cycle restores a running guest (the test initrd's `tick`) with a vsock
//! device (worker thread, sockets, eventfds, irqfds, ioeventfds), runs it, and
//! drops it.

use std::time::Duration;

use sm_testkit::{guest_artifacts, ok_or_skip, temp_dir};
use sm_virtio::vsock::{Vsock, DEFAULT_GUEST_CID};
use sm_vmm::{default_hypervisor, ConsoleOutput, LinuxBoot, Machine, MachineConfig, RestoreOptions, DEFAULT_CMDLINE};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

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
    let Some(hv) = ok_or_skip("leaks", default_hypervisor()) else { return };
    let Some(guest) = guest_artifacts("leaks") else { return };
    let dir = temp_dir("leaks");
    let vsock = |name: String| Box::new(Vsock::new(DEFAULT_GUEST_CID, &dir.path().join(name)).unwrap());
    let snap = dir.path().join("tick.snap");
    {
        let mut m = Machine::new(&*hv, MachineConfig { vcpus: 1, memory_mib: 128, ..Default::default() }).unwrap();
        m.add_virtio_device(vsock("boot.sock".into())).unwrap();
        m.load_linux(&LinuxBoot {
            kernel: guest.kernel,
            initrd: Some(guest.initrd),
            cmdline: format!("{DEFAULT_CMDLINE} -- tick"),
        })
        .unwrap();
        m.start().unwrap();
        assert!(m.console().wait_for("TICK 1", BOOT_TIMEOUT).is_some(), "no ticks:\n{}", m.console().text());
        m.snapshot(&snap, true).unwrap();
        m.stop();
    }
    let cycle = |i: usize| {
        let devices = vec![vsock(format!("v{}.sock", i % 4)) as _];
        let (mut m, _) =
            Machine::restore(&*hv, &snap, RestoreOptions { console: ConsoleOutput::Null, devices }).unwrap();
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
}
