//! The agent connection a restore leaves open: the refresh (clock, entropy)
//! happens on it in one round trip and later requests reuse it; a connection
//! held open across a live snapshot keeps working (the vsock device's worker
//! is stopped and started again with the connection open: the restarted
//! worker once ignored it, and the exec hung). Every wait here is bounded: a
//! connection the device forgot would otherwise hang the test.

use std::sync::mpsc;
use std::time::Duration;

use sm_api::{ConsoleOutput, ExecOutcome, ExecRequest, Vm};
use sm_tests::{agent_snapshot, hypervisor};

/// Runs `argv` in the guest on another thread; fails after `limit`.
fn exec_within(vm: &std::sync::Arc<Vm>, argv: &[&str], limit: Duration) -> ExecOutcome {
    let (tx, rx) = mpsc::channel();
    let (vm, argv) = (vm.clone(), argv.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    std::thread::spawn(move || {
        let result = vm.exec(&ExecRequest::new(argv), None);
        // Give up this thread's handle before answering: the caller may
        // need to be the only owner right after.
        drop(vm);
        let _ = tx.send(result);
    });
    rx.recv_timeout(limit).expect("the exec answered in time").expect("exec")
}

#[test]
fn a_restored_vm_keeps_its_agent_connection_across_live_snapshots_and_pauses() {
    let Some(snap) = agent_snapshot("agent connection") else { return };
    let Some(hv) = hypervisor("agent connection") else { return };
    let dir = sm_tests::temp_dir("agentconn");
    let vm = Vm::restore(&*hv, snap, ConsoleOutput::Null, &[]).expect("restore");

    let t = vm.start_timings().expect("a restored VM has start timings");
    assert!(t.restored <= t.resumed && t.resumed <= t.agent_connected, "{t:?}");
    assert!(t.agent_connected <= t.refreshed && t.refreshed <= t.mounted, "{t:?}");
    assert!(t.attempts >= 1 && t.round_trips >= 2, "{t:?}");

    let limit = Duration::from_secs(120);
    let mut vm = std::sync::Arc::new(vm);
    let out = exec_within(&vm, &["sh", "-c", "echo one"], limit);
    assert_eq!(out.stdout, b"one\n");
    assert!(out.cost.minor_faults > 0 && out.cost.spawn_us > 0, "{:?}", out.cost);
    assert!(out.timeline.first_output.is_some_and(|f| f <= out.timeline.exited), "{:?}", out.timeline);

    // A live snapshot pauses and resumes every device with a connection
    // open; requests then go over it.
    let mut held = vm.agent().expect("a connection");
    Vm::snapshot_live(std::sync::Arc::get_mut(&mut vm).expect("one owner"), &dir.path().join("live.snap"))
        .expect("live snapshot");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(held.exec(&ExecRequest::new(["echo", "held"]), None).map(|o| o.stdout));
    });
    let held_out = rx.recv_timeout(limit).expect("the held connection answered in time").expect("exec");
    assert_eq!(held_out, b"held\n", "a connection open across a live snapshot still works");
    let out = exec_within(&vm, &["sh", "-c", "echo two"], limit);
    assert_eq!(out.stdout, b"two\n");

    // A paused snapshot, then resume.
    let owned = std::sync::Arc::get_mut(&mut vm).expect("one owner");
    owned.snapshot(&dir.path().join("paused.snap")).expect("snapshot");
    owned.resume().expect("resume");
    let out = exec_within(&vm, &["sh", "-c", "echo three"], limit);
    assert_eq!(out.stdout, b"three\n", "requests work after a pause");

    // Several threads at once: each gets a connection (one is kept after).
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let vm = vm.clone();
            std::thread::spawn(move || vm.exec(&ExecRequest::new(["echo", &i.to_string()]), None).expect("exec"))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().expect("thread").stdout, format!("{i}\n").into_bytes());
    }
    let vm = std::sync::Arc::try_unwrap(vm).ok().expect("threads are done");
    vm.stop();
}
