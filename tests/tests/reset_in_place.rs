//! Reset in place after real guest work: each round forks processes, churns
//! memory and writes a file in the guest, then the VM goes back to its
//! snapshot. The next round must find the snapshot's guest exactly (no file from
//! before, a working shell, no kernel oops), however much the guest's page
//! tables changed between the snapshot and the reset.
//!
//! Background: resetting RAM under a VM (MADV_DONTNEED on the private mapping)
//! zaps the hypervisor's leaf translations but not KVM's shadow copies of the
//! guest's page-table pages (hosts without EPT/NPT, as kvm_pvm), so a reset guest
//! could walk stale page-table structure; one such reset VM died with "kernel
//! tried to execute NX-protected page". The reset now re-registers the RAM
//! slots, which drops every shadow page. That failure was rare (about one reset
//! in a hundred); this test exercises the path, `SM_SOAK=1` runs 40 rounds.

use sm_api::{ConsoleOutput, ExecRequest, ExitStatus, Vm};
use sm_tests::{agent_snapshot, hypervisor};

/// Forks a pipeline per step and churns anonymous memory, so the guest's page
/// tables (process and kernel) differ from the snapshot's when the reset lands.
const CHURN: &str = "i=0; while [ $i -lt 4 ]; do echo $i | cat >/dev/null; i=$((i+1)); done; \
                     dd if=/dev/zero bs=64k count=4 2>/dev/null | wc -c; echo round > /tmp/marker";

fn rounds() -> usize {
    if std::env::var("SM_SOAK").is_ok_and(|v| v == "1") {
        40
    } else {
        3
    }
}

fn sh(vm: &Vm, script: &str) -> (ExitStatus, String) {
    let out = vm.exec(&ExecRequest::new(["/bin/sh", "-c", script]), None).expect("exec /bin/sh");
    (out.status, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn resets_after_guest_work_come_back_to_the_snapshot() {
    let Some(snap) = agent_snapshot("reset in place") else { return };
    let Some(hv) = hypervisor("reset in place") else { return };
    let mut vm = Vm::restore(&*hv, snap, ConsoleOutput::Null, &[]).expect("restore the agent guest");
    let oops = |vm: &Vm| {
        let text = vm.machine().console().text();
        ["Oops", "BUG:", "Kernel panic", "segfault"].iter().any(|m| text.contains(m)).then_some(text)
    };
    for round in 0..rounds() {
        let t0 = std::time::Instant::now();
        let (status, marker) = sh(&vm, "cat /tmp/marker 2>/dev/null || echo none");
        assert_eq!((status, marker.as_str()), (ExitStatus::Code(0), "none"), "round {round}: not the snapshot's guest");
        let (status, bytes) = sh(&vm, CHURN);
        assert_eq!((status, bytes.as_str()), (ExitStatus::Code(0), "262144"), "round {round}: churn");
        if let Some(text) = oops(&vm) {
            panic!("round {round}: the guest reported a fault:\n{text}");
        }
        let took = vm.reset().unwrap_or_else(|e| panic!("round {round}: reset: {e}"));
        eprintln!("round {round}: {:?} (reset {took:?})", t0.elapsed());
    }
    let (status, out) = sh(&vm, "echo alive");
    assert_eq!((status, out.as_str()), (ExitStatus::Code(0), "alive"));
    if let Some(text) = oops(&vm) {
        panic!("after the last reset the guest reported a fault:\n{text}");
    }
}
