//! Diff snapshots of a running Linux guest: a diff taken after a restore holds
//! only the pages written since, and restores (and merges) to exactly the RAM
//! the VM had when it was taken — as a full snapshot of the same paused moment
//! does.

use std::time::Duration;

use sm_snapshot::{SectionKind, SnapshotFile};
use sm_testkit::{guest_artifacts, ok_or_skip, temp_dir};
use sm_vmm::{default_hypervisor, ConsoleOutput, LinuxBoot, Machine, MachineConfig, RestoreOptions, DEFAULT_CMDLINE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PROBE: GuestAddress = GuestAddress(0x9f800);

fn ticks(m: &Machine) -> Vec<u64> {
    m.console()
        .lines()
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("TICK ").and_then(|n| n.trim().parse().ok()))
        .collect()
}

fn all_ram(m: &Machine) -> Vec<u8> {
    let mut out = Vec::new();
    for r in m.memory().iter() {
        let mut buf = vec![0u8; r.len() as usize];
        m.memory().read_slice(&mut buf, r.start_addr()).unwrap();
        out.extend(buf);
    }
    out
}

/// Indices of the 4 KiB pages where `a` and `b` differ.
fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    assert_eq!(a.len(), b.len());
    (0..a.len() / 4096).filter(|p| a[p * 4096..(p + 1) * 4096] != b[p * 4096..(p + 1) * 4096]).collect()
}

/// Same guest RAM, up to the two pages KVM itself writes when vCPU state is
/// loaded: the kvmclock wall-clock and system-time areas the guest registered
/// (MSR_KVM_WALL_CLOCK_NEW / MSR_KVM_SYSTEM_TIME_NEW; KVM refreshes them on the
/// MSR writes of a restore, before the guest runs).
fn assert_same_ram(a: &[u8], b: &[u8], what: &str) {
    let pages = differing_pages(a, b);
    assert!(pages.len() <= 2, "{what}: {} pages differ, first ones {:x?}", pages.len(), &pages[..pages.len().min(8)]);
}

fn restore(hv: &dyn sm_hypervisor::Hypervisor, path: &std::path::Path) -> Machine {
    Machine::restore(hv, path, RestoreOptions { console: ConsoleOutput::Null, devices: vec![] }).unwrap().0
}

#[test]
fn diff_snapshot_restores_and_merges_to_the_state_of_a_full_one() {
    let Some(hv) = ok_or_skip("diff snapshot", default_hypervisor()) else { return };
    let Some(guest) = guest_artifacts("diff snapshot") else { return };
    let dir = temp_dir("diff");
    let mut a = Machine::new(&*hv, MachineConfig { vcpus: 1, memory_mib: 128, ..Default::default() }).unwrap();
    a.load_linux(&LinuxBoot {
        kernel: guest.kernel,
        initrd: Some(guest.initrd),
        cmdline: format!("{DEFAULT_CMDLINE} -- tick"),
    })
    .unwrap();
    a.start().unwrap();
    assert!(a.console().wait_for("TICK 2", Duration::from_secs(180)).is_some(), "no ticks:\n{}", a.console().text());
    let base = dir.path().join("base.snap");
    a.snapshot(&base, false).unwrap();
    a.stop();

    // Only a restored machine has a parent to diff against.
    let err = a.snapshot_diff(&dir.path().join("x.snap"), false).unwrap_err().to_string();
    assert!(err.contains("restored from a snapshot"), "{err}");

    // Restore, let the guest run, then take a full and a diff snapshot of the
    // same (paused) moment.
    let mut b = restore(&*hv, &base);
    b.start().unwrap();
    assert!(b.console().wait_for("TICK", Duration::from_secs(30)).is_some());
    let first = ticks(&b)[0];
    assert!(b.console().wait_for(&format!("TICK {}", first + 3), Duration::from_secs(30)).is_some());
    // A host-side write (as a device model makes) counts too. 0x9f800 is in the
    // MP-table area, reserved in the e820 map: the guest never touches it.
    b.memory().write_obj(0x5eed_u64, PROBE).unwrap();
    let full = dir.path().join("full.snap");
    let diff = dir.path().join("diff.snap");
    let full_report = b.snapshot(&full, false).unwrap();
    let ram_at_full = all_ram(&b);
    let diff_report = b.snapshot_diff(&diff, false).unwrap();
    let ram_at_diff = all_ram(&b);
    let at_pause = *ticks(&b).last().unwrap();
    b.stop();
    assert_same_ram(&ram_at_full, &ram_at_diff, "two captures of the paused VM");
    eprintln!("full: {:?}\ndiff: {:?}", full_report.write, diff_report.write);
    assert!(
        diff_report.write.ram_written * 4 < full_report.write.ram_written,
        "a diff must store far less RAM: {} vs {} bytes",
        diff_report.write.ram_written,
        full_report.write.ram_written
    );

    // Same device sections (vCPU and VM sections differ only in the TSC and
    // clock, which run on between two captures), same RAM.
    let (f, d) = (SnapshotFile::open(&full).unwrap(), SnapshotFile::open(&diff).unwrap());
    for kind in [SectionKind::Machine, SectionKind::Platform] {
        assert!(f.section(kind, 0) == d.section(kind, 0), "{kind:?} section differs");
    }
    assert!(d.section(SectionKind::Vcpu, 0).is_some() && d.section(SectionKind::Vm, 0).is_some());
    let from_full = restore(&*hv, &full);
    let mut from_diff = restore(&*hv, &diff);
    assert_same_ram(&all_ram(&from_full), &ram_at_full, "restored from the full snapshot");
    assert_same_ram(&all_ram(&from_diff), &ram_at_diff, "restored from the diff");
    assert_same_ram(&all_ram(&from_diff), &all_ram(&from_full), "restored from the diff vs from the full snapshot");
    assert_eq!(from_diff.memory().read_obj::<u64>(PROBE).unwrap(), 0x5eed);

    // The guest restored from the diff continues from that moment.
    from_diff.start().unwrap();
    let next = format!("TICK {}", at_pause + 1);
    assert!(from_diff.console().wait_for(&next, Duration::from_secs(30)).is_some(), "{}", from_diff.console().text());
    assert_eq!(ticks(&from_diff)[0], at_pause + 1);
    // Reset in place re-applies the diff over the base.
    from_diff.reset_to_snapshot().unwrap();
    assert_same_ram(&all_ram(&from_diff), &ram_at_diff, "after reset in place of a diff-restored VM");
    from_diff.stop();

    // Merged into one full file: same RAM, no parent needed any more.
    let merged = dir.path().join("merged.snap");
    sm_snapshot::merge_chain(&diff, &merged).unwrap();
    std::fs::remove_file(&base).unwrap();
    let from_merged = restore(&*hv, &merged);
    assert_same_ram(&all_ram(&from_merged), &ram_at_diff, "restored from the merged snapshot");
    // ... while the diff now names its missing parent.
    let err = Machine::restore(&*hv, &diff, RestoreOptions { console: ConsoleOutput::Null, devices: vec![] })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("base.snap"), "{err}");
}
