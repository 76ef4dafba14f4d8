//! A hostile guest on real KVM: the test init's `hostile` mode writes random
//! values of every width to every virtio-mmio register and config space
//! (devices activated on garbage rings, so they walk descriptor chains made of
//! random guest memory), then to every I/O port. The VMM must survive all of
//! it: no panic in a device handler, the VM ends (or is stopped) with a
//! reason, stop is bounded, and once the machine is dropped the process has
//! no more threads or file descriptors than before.

use std::time::Duration;

use sm_testkit::{guest_artifacts, ok_or_skip, temp_dir};
use sm_vmm::{default_hypervisor, ExitReason, LinuxBoot, Machine, MachineConfig, DEFAULT_CMDLINE};

/// Boot (~10 s here) plus the attack (8 rounds over 32 windows, then 65536
/// ports: every access an exit the host emulates), with room for a busy host.
const ATTACK_TIMEOUT: Duration = Duration::from_secs(600);

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_guest_attacking_every_device_register_and_port_cannot_crash_hang_or_grow_the_vmm() {
    let test = "hostile guest";
    let Some(hv) = ok_or_skip(test, default_hypervisor()) else { return };
    let Some(guest) = guest_artifacts(test) else { return };
    let work = temp_dir("hostile");
    let disk = work.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let share = work.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("file"), b"shared").unwrap();
    let (threads_before, fds_before) = (count("/proc/self/task"), count("/proc/self/fd"));

    let mut m = Machine::new(&*hv, MachineConfig { vcpus: 1, memory_mib: 128, ..Default::default() }).unwrap();
    // One of each device kind a VM of ours has (a network needs passt: the
    // net device's guest side is covered by its hostile-chain unit tests).
    m.add_virtio_device(Box::new(sm_virtio::block::Block::new(&disk, false, None).unwrap())).unwrap();
    m.add_virtio_device(Box::new(sm_virtio::rng::Rng::new().unwrap())).unwrap();
    m.add_virtio_device(Box::new(sm_virtio::balloon::Balloon::new(true).unwrap())).unwrap();
    m.add_virtio_device(Box::new(sm_virtio::vsock::Vsock::new(3, &work.path().join("vsock.sock")).unwrap())).unwrap();
    let server = sm_fuse::FuseServer::new(&sm_fuse::ShareConfig::new(&share)).unwrap();
    m.add_virtio_device(Box::new(sm_fuse::VirtioFs::new("hostile", server).unwrap())).unwrap();
    m.load_linux(&LinuxBoot {
        kernel: guest.kernel,
        initrd: Some(guest.initrd),
        cmdline: format!("{DEFAULT_CMDLINE} -- hostile"),
    })
    .unwrap();
    m.start().unwrap();
    let reason = m.wait(Some(ATTACK_TIMEOUT)).unwrap_or_else(|| {
        eprintln!("the guest did not end within {ATTACK_TIMEOUT:?}: stopping it");
        m.stop()
    });
    let console = m.console().text();
    eprintln!("exit: {reason:?}\nconsole (last lines):\n{}", tail(&console, 30));
    assert!(console.contains("HOSTILE START"), "the attack ran:\n{console}");
    assert!(console.contains("HOSTILE MAGIC 74726976"), "/dev/mem reached the device registers:\n{console}");
    assert!(console.contains("HOSTILE MMIO round 8"), "every MMIO round went through:\n{}", tail(&console, 30));
    if let ExitReason::VcpuError { detail, .. } = &reason {
        assert!(!detail.contains("panicked"), "a device handler panicked: {detail}");
    }
    // Whatever the guest did, its machine goes away with every thread and descriptor.
    drop(m);
    let t = std::time::Instant::now();
    while (count("/proc/self/task"), count("/proc/self/fd")) != (threads_before, fds_before)
        && t.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(count("/proc/self/task"), threads_before, "threads after the machine was dropped");
    assert_eq!(count("/proc/self/fd"), fds_before, "descriptors after the machine was dropped");
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
