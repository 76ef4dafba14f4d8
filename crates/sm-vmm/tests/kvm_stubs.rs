//! Real KVM, tiny long-mode guests written here: port output, force-exit, stop,
//! vCPU + device state round trip, and rejection of bad state blobs.

use std::time::{Duration, Instant};

use sm_hypervisor::{VcpuExit, VcpuState, VmConfig};
use sm_testkit::ok_or_skip;
use sm_vmm::{default_hypervisor, ExitReason, Machine, MachineConfig};
use vm_memory::{Bytes, GuestAddress};

const CODE_BASE: u64 = 0x1000;
const COUNTER_BASE: u64 = 0x3000;
const STACK_BASE: u64 = 0x6000;

/// `out 0x3f8, 'S'; out 0x3f8, '\n'; 1: hlt; jmp 1b`
const WRITE_S_THEN_HALT: [u8; 12] = [
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'S', // mov al, 'S'
    0xee, // out dx, al
    0xb0, b'\n', // mov al, '\n'
    0xee,  // out dx, al
    0xf4,  // hlt
    0xeb,  // jmp ...
];

/// `1: inc qword [counter]; jmp 1b`
fn counting_loop(counter: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xff, 0x04, 0x25];
    code.extend_from_slice(&(counter as u32).to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf6]); // jmp -10: back to the inc
    code
}

fn machine(vcpus: u32) -> Option<Machine> {
    let hv = ok_or_skip("kvm stub test", default_hypervisor())?;
    Some(Machine::new(&*hv, MachineConfig { vcpus, memory_mib: 32, ..Default::default() }).expect("create machine"))
}

fn load_counters(m: &mut Machine, user_mode: bool) {
    let n = m.config().vcpus as u64;
    let mut entries = Vec::new();
    let mut stacks = Vec::new();
    for i in 0..n {
        let code = counting_loop(COUNTER_BASE + 8 * i);
        let at = CODE_BASE + 0x100 * i;
        m.memory().write_slice(&code, GuestAddress(at)).unwrap();
        m.memory().write_obj(0u64, GuestAddress(COUNTER_BASE + 8 * i)).unwrap();
        entries.push(at);
        stacks.push(STACK_BASE + 0x100 * i);
    }
    m.load_long_mode_code(&entries, &stacks, user_mode).unwrap();
}

fn counter(m: &Machine, i: u64) -> u64 {
    m.memory().read_obj(GuestAddress(COUNTER_BASE + 8 * i)).unwrap()
}

#[test]
fn stub_writes_to_com1_and_host_sees_it() {
    let Some(mut m) = machine(1) else { return };
    let mut code = WRITE_S_THEN_HALT.to_vec();
    code.push(0xfd); // jmp -3: back to hlt
    m.memory().write_slice(&code, GuestAddress(CODE_BASE)).unwrap();
    m.load_long_mode_code(&[CODE_BASE], &[STACK_BASE], false).unwrap();
    m.start().unwrap();
    let line = m.console().wait_for("S", Duration::from_secs(20));
    // The vCPU now sits in HLT inside KVM: stopping must still return promptly.
    let t = Instant::now();
    let reason = m.stop();
    assert_eq!(line.map(|(_, l)| l), Some("S".to_string()), "console: {:?}", m.console().text());
    assert_eq!(reason, ExitReason::Stopped);
    assert!(t.elapsed() < Duration::from_secs(2), "stop of a halted vCPU took {:?}", t.elapsed());
}

#[test]
fn force_exit_before_the_vcpu_thread_binds_is_not_lost() {
    let Some(hv) = ok_or_skip("force_exit_before_bind", default_hypervisor()) else { return };
    let vm = hv.create_vm(&VmConfig { vcpu_count: 1 }).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let kick = vcpu.force_exit();
    kick.kick();
    // First entry, on a thread that has never run the vCPU: must return at once.
    let handle = std::thread::spawn(move || {
        let t = Instant::now();
        let exit = matches!(vcpu.run(), Ok(VcpuExit::ForcedExit));
        (exit, t.elapsed())
    });
    let (forced, took) = handle.join().unwrap();
    assert!(forced, "first run after an early kick must report ForcedExit");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn force_exit_all_vcpus_spinning_in_user_mode() {
    let Some(mut m) = machine(4) else { return };
    load_counters(&mut m, true);
    m.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (0..4).any(|i| counter(&m, i) == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let counts: Vec<u64> = (0..4).map(|i| counter(&m, i)).collect();
    assert!(counts.iter().all(|&c| c > 0), "every vCPU must run guest code: {counts:?}");
    let t = Instant::now();
    m.pause().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "pausing 4 spinning vCPUs took {:?}", t.elapsed());
    assert!(!m.is_running());
    // Paused means paused: counters no longer move.
    let frozen: Vec<u64> = (0..4).map(|i| counter(&m, i)).collect();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(frozen, (0..4).map(|i| counter(&m, i)).collect::<Vec<_>>());
    // And they resume.
    m.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&m, 3) == frozen[3] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(counter(&m, 3) > frozen[3], "vCPU 3 did not resume");
    let t = Instant::now();
    assert_eq!(m.stop(), ExitReason::Stopped);
    assert!(t.elapsed() < Duration::from_secs(2), "stop took {:?}", t.elapsed());
}

#[test]
fn stop_during_kernel_mode_busy_loop_returns_promptly() {
    let Some(mut m) = machine(1) else { return };
    load_counters(&mut m, false);
    m.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&m, 0) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(counter(&m, 0) > 0);
    let t = Instant::now();
    assert_eq!(m.stop(), ExitReason::Stopped);
    assert!(t.elapsed() < Duration::from_secs(2), "stop took {:?}", t.elapsed());
}

fn copy_memory(from: &Machine, to: &Machine, len: usize) {
    let mut buf = vec![0u8; len];
    from.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
    to.memory().write_slice(&buf, GuestAddress(0)).unwrap();
}

#[test]
fn state_round_trip_into_a_fresh_vm_continues_the_guest() {
    let Some(mut a) = machine(1) else { return };
    load_counters(&mut a, true);
    a.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&a, 0) < 1000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    a.pause().unwrap();
    let saved_count = counter(&a, 0);
    assert!(saved_count >= 1000, "guest did not count: {saved_count}");
    let state = a.save_state().unwrap();
    assert!(state.vcpus[0].0.len() > 1000, "vCPU state suspiciously small");

    let Some(mut b) = machine(1) else { return };
    copy_memory(&a, &b, 8 << 20);
    drop(a);
    b.restore_state(&state).unwrap();
    // Re-saving right after restore gives the same registers (the regs section).
    let again = b.save_state().unwrap();
    assert_eq!(regs_section(&again.vcpus[0]), regs_section(&state.vcpus[0]));
    b.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&b, 0) <= saved_count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(b.stop(), ExitReason::Stopped);
    let after = counter(&b, 0);
    assert!(after > saved_count, "restored guest must keep counting from {saved_count}, got {after}");
}

/// The bytes of the registers section (tag 1) of a vCPU blob.
fn regs_section(state: &VcpuState) -> Vec<u8> {
    let dec = sm_kvm::codec::Decoded::parse(&state.0, sm_kvm::codec::Kind::Vcpu).unwrap();
    dec.require(1, "regs").unwrap().to_vec()
}

#[test]
fn truncated_and_wrong_version_state_is_rejected() {
    let Some(mut m) = machine(1) else { return };
    load_counters(&mut m, true);
    let good = m.save_state().unwrap();

    let mut truncated = good.clone();
    let len = truncated.vcpus[0].0.len();
    truncated.vcpus[0].0.truncate(len - 3);
    let msg = m.restore_state(&truncated).unwrap_err().to_string();
    assert!(msg.contains("invalid saved state") && msg.contains("length"), "{msg}");

    let mut wrong_version = good.clone();
    wrong_version.vcpus[0].0[4] = 0x7f;
    let msg = m.restore_state(&wrong_version).unwrap_err().to_string();
    assert!(msg.contains("version 127"), "{msg}");

    let mut vm_truncated = good.clone();
    vm_truncated.vm.0.truncate(20);
    let msg = m.restore_state(&vm_truncated).unwrap_err().to_string();
    assert!(msg.contains("invalid saved state"), "{msg}");

    let mut swapped = good.clone();
    swapped.vcpus[0] = sm_hypervisor::VcpuState(good.vm.0.clone());
    let msg = m.restore_state(&swapped).unwrap_err().to_string();
    assert!(msg.contains("expected Vcpu"), "{msg}");

    // The good state still restores after all the rejections.
    m.restore_state(&good).unwrap();
}

#[test]
fn more_vcpus_than_the_mp_table_allows_is_refused() {
    let Some(hv) = ok_or_skip("too many vcpus", default_hypervisor()) else { return };
    let n = sm_vmm::mptable_max_cpus() as u32 + 1;
    let err = Machine::new(&*hv, MachineConfig { vcpus: n, memory_mib: 32, ..Default::default() }).err().unwrap();
    assert!(err.to_string().contains("MP table"), "{err}");
}

#[test]
fn missing_kvm_device_names_the_fix() {
    let err = sm_kvm::KvmHypervisor::open("/nonexistent/kvm").err().unwrap().to_string();
    assert!(err.contains("does not exist") && err.contains("modprobe"), "{err}");
}

/// `mov dx, 0x3f8; 1: mov al, 'S'; out dx, al; jmp 1b`: writes to COM1 forever.
const WRITE_S_FOREVER: [u8; 9] = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'S', 0xee, 0xeb, 0xfb];

#[test]
fn a_vcpu_stuck_in_a_device_is_abandoned_and_stop_does_not_hang() {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let Some(hv) = ok_or_skip("stuck vcpu", default_hypervisor()) else { return };
    // The console goes to a FIFO whose reader never reads: once the pipe is
    // full the vCPU thread blocks in the console write, inside its exit handler.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("console");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let reader =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).expect("fifo reader");
    let config = MachineConfig { vcpus: 1, memory_mib: 32, console: sm_vmm::ConsoleOutput::File(fifo.clone()) };
    let mut m = Machine::new(&*hv, config).expect("machine");
    m.memory().write_slice(&WRITE_S_FOREVER, GuestAddress(CODE_BASE)).unwrap();
    m.load_long_mode_code(&[CODE_BASE], &[STACK_BASE], false).unwrap();
    m.set_stop_timeout(Duration::from_secs(2));
    m.start().unwrap();
    // SAFETY: F_GETPIPE_SZ reads the pipe's capacity of a valid descriptor.
    let capacity = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(capacity > 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the valid pointer.
        assert_eq!(unsafe { libc::ioctl(reader.as_raw_fd(), libc::FIONREAD, &mut queued) }, 0);
        if queued >= capacity {
            break;
        }
        assert!(Instant::now() < deadline, "the guest filled {queued} of {capacity} pipe bytes in 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let err = m.pause().expect_err("the stuck vCPU cannot be taken back");
    assert!(t.elapsed() < Duration::from_secs(30), "pause gave up after {:?} (timeout 2 s)", t.elapsed());
    assert!(err.to_string().contains("abandoned"), "{err}");
    let start = m.start().expect_err("a machine without its vCPU does not run again");
    assert!(start.to_string().contains("abandoned"), "{start}");
    assert!(m.save_state().is_err(), "nor is it snapshotted");
    let t = Instant::now();
    drop(m);
    assert!(t.elapsed() < Duration::from_secs(30), "dropping it did not hang: {:?}", t.elapsed());
    // The reader leaves: the stuck write fails, the abandoned thread sees the
    // stop request and ends on its own.
    drop(reader);
}
