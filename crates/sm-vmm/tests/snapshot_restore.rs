//! Snapshot files of a running Linux guest: live capture, copy-on-write restore into
//! several VMs, reset in place, and refusal of damaged files.

use std::path::Path;
use std::time::Duration;

use sm_testkit::{guest_artifacts, ok_or_skip, temp_dir};
use sm_virtio::vsock::{Vsock, DEFAULT_GUEST_CID};
use sm_vmm::{
    default_hypervisor, ConsoleOutput, ExitReason, LinuxBoot, Machine, MachineConfig, RestoreOptions, DEFAULT_CMDLINE,
};
use vm_memory::{Bytes, GuestAddress};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn ticks(m: &Machine) -> Vec<u64> {
    m.console()
        .lines()
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("TICK ").and_then(|n| n.trim().parse().ok()))
        .collect()
}

fn vsock(dir: &Path, name: &str) -> Box<Vsock> {
    Box::new(Vsock::new(DEFAULT_GUEST_CID, &dir.join(name)).unwrap())
}

#[test]
fn live_snapshot_restores_into_isolated_vms_and_resets_in_place() {
    let Some(hv) = ok_or_skip("snapshot restore", default_hypervisor()) else { return };
    let Some(guest) = guest_artifacts("snapshot restore") else { return };
    let dir = temp_dir("snap");
    let mut a = Machine::new(&*hv, MachineConfig { vcpus: 1, memory_mib: 128, ..Default::default() }).unwrap();
    a.add_virtio_device(vsock(dir.path(), "a.sock")).unwrap();
    a.load_linux(&LinuxBoot {
        kernel: guest.kernel,
        initrd: Some(guest.initrd),
        cmdline: format!("{DEFAULT_CMDLINE} -- tick"),
    })
    .unwrap();
    a.start().unwrap();
    assert!(a.console().wait_for("TICK 2", BOOT_TIMEOUT).is_some(), "no ticks:\n{}", a.console().text());

    let path = dir.path().join("tick.snap");
    let report = a.snapshot(&path, true).unwrap();
    let at_snapshot = *ticks(&a).last().unwrap();
    eprintln!("snapshot: {report:?}");
    assert!(report.write.ram_written < report.write.ram_bytes / 2, "RAM must be stored sparsely: {report:?}");
    // Live: the original keeps running.
    let next = format!("TICK {}", at_snapshot + 2);
    assert!(a.console().wait_for(&next, Duration::from_secs(30)).is_some(), "original stopped after a live snapshot");
    assert_eq!(a.stop(), ExitReason::Stopped);

    let restore = |name: &str| {
        let opts = RestoreOptions { console: ConsoleOutput::Null, devices: vec![vsock(dir.path(), name)] };
        let (mut m, timings) = Machine::restore(&*hv, &path, opts).unwrap();
        eprintln!("restore {name}: {timings:?}");
        m.start().unwrap();
        m
    };
    let mut b = restore("b.sock");
    let mut c = restore("c.sock");
    // Into shells made ahead (VM, vCPUs, RAM slots): a shell for another RAM
    // size is refused by name; the right one restores and runs.
    let wrong = Machine::new_shell(&*hv, 1, 64, ConsoleOutput::Null).unwrap();
    let opts = || RestoreOptions { console: ConsoleOutput::Null, devices: vec![vsock(dir.path(), "s.sock")] };
    let err = Machine::restore_into(wrong, &path, opts()).err().unwrap().to_string();
    assert!(err.contains("made for 64 MiB") && err.contains("128 MiB"), "{err}");
    let shell = Machine::new_shell(&*hv, 1, 128, ConsoleOutput::Null).unwrap();
    assert!(shell.is_shell());
    let (mut s, timings) = Machine::restore_into(shell, &path, opts()).unwrap();
    eprintln!("restore into a shell: {timings:?}");
    s.start().unwrap();
    let first = format!("TICK {}", at_snapshot + 1);
    for m in [&b, &c, &s] {
        assert!(
            m.console().wait_for(&first, Duration::from_secs(30)).is_some(),
            "restored VM silent:\n{}",
            m.console().text()
        );
    }
    s.stop();
    // Copy-on-write isolation: a write into one restored VM's RAM is not seen by
    // the other. 0x9f800 is in the MP-table area (reserved in the e820 map), so
    // the write cannot crash the guest that keeps running.
    let probe = GuestAddress(0x9f800);
    let before: u64 = c.memory().read_obj(probe).unwrap();
    b.memory().write_obj(before ^ 0x5a5a_5a5a, probe).unwrap();
    assert_eq!(c.memory().read_obj::<u64>(probe).unwrap(), before);

    // Reset in place, several times at different points of the guest's output:
    // b goes back to the snapshot each time; its tick counter starts over. (COM1
    // state is part of the snapshot; without it a reset that lands while the
    // guest's UART driver waits for a THR-empty interrupt silences the console.)
    for (round, extra) in [3u64, 4, 7].into_iter().enumerate() {
        let later = format!("TICK {}", at_snapshot + extra);
        assert!(b.console().wait_for(&later, Duration::from_secs(30)).is_some(), "round {round}: no {later}");
        let lines_before = b.console().lines().len();
        let took = b.reset_to_snapshot().unwrap();
        eprintln!("reset in place took {took:?}");
        b.start().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut after_reset = Vec::new();
        while std::time::Instant::now() < deadline && after_reset.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            after_reset = b.console().lines()[lines_before..]
                .iter()
                .filter_map(|(_, l)| l.strip_prefix("TICK ").and_then(|n| n.trim().parse::<u64>().ok()))
                .collect();
        }
        assert_eq!(
            after_reset.first(),
            Some(&(at_snapshot + 1)),
            "round {round}: after reset the guest must continue from the snapshot:\n{}",
            b.console().text()
        );
    }
    b.stop();
    c.stop();
}

#[test]
fn damaged_snapshot_and_wrong_devices_are_refused() {
    let Some(hv) = ok_or_skip("snapshot errors", default_hypervisor()) else { return };
    let dir = temp_dir("snapbad");
    let mut m = Machine::new(&*hv, MachineConfig { vcpus: 1, memory_mib: 32, ..Default::default() }).unwrap();
    m.memory().write_slice(&[0xf4, 0xeb, 0xfd], GuestAddress(0x1000)).unwrap(); // hlt; jmp hlt
    m.load_long_mode_code(&[0x1000], &[0x6000], false).unwrap();
    let path = dir.path().join("stub.snap");
    m.snapshot(&path, false).unwrap();

    let with_devices =
        |devices| Machine::restore(&*hv, &path, RestoreOptions { console: ConsoleOutput::Null, devices });
    // The snapshot had no devices; offering one is a mismatch.
    let err = with_devices(vec![vsock(dir.path(), "x.sock")]).err().unwrap().to_string();
    assert!(err.contains("virtio devices"), "{err}");
    assert!(with_devices(vec![]).is_ok());

    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    let damaged = dir.path().join("damaged.snap");
    std::fs::write(&damaged, &bytes).unwrap();
    let err = Machine::restore(&*hv, &damaged, RestoreOptions { console: ConsoleOutput::Null, devices: vec![] })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("checksum"), "{err}");
}
