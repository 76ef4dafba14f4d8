//! `sm-bench snapshot`: the in-process half of
//! `cargo xtask bench snapshot`. Prints `bench: <key> <value>` lines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::stats::{anonymous_kib, median, ms};
use sm_api::machine::{LinuxBoot, Machine, MachineConfig, RestoreOptions, Vsock, DEFAULT_CMDLINE, DEFAULT_GUEST_CID};
use sm_api::ConsoleOutput;
use sm_api::{ExecOutcome, ExecRequest, GuestImage, Pool, PoolConfig, Vm, VmConfig};

#[derive(Args)]
pub struct BenchSnapshotArgs {
    /// vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Test initrd (its init ticks with `-- tick`).
    #[arg(long)]
    initrd: PathBuf,
    /// Scratch directory.
    #[arg(long)]
    dir: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Restores per snapshot age.
    #[arg(long, default_value_t = 5)]
    restores: usize,
    /// Snapshot ages (seconds) at which restores are measured.
    #[arg(long, value_delimiter = ',', default_value = "0,60")]
    ages: Vec<u64>,
    /// VMs restored at once to measure memory per extra VM.
    #[arg(long, default_value_t = 8)]
    fleet: usize,
    /// Extra kernel parameters for the ticking guest (before `-- tick`).
    #[arg(long, default_value = "")]
    append: String,
    /// Agent initrd: also measure restore -> first exec output, a diff snapshot
    /// after one exec, and pool acquire (one cold boot of the agent guest).
    #[arg(long)]
    agent_initrd: Option<PathBuf>,
}

fn vsock(dir: &Path, name: &str) -> Result<Box<Vsock>> {
    Ok(Box::new(Vsock::new(DEFAULT_GUEST_CID, &dir.join(name))?))
}

pub fn run(args: BenchSnapshotArgs) -> Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let hv = sm_api::default_hypervisor()?;
    let mut source =
        Machine::new(&*hv, MachineConfig { vcpus: 1, memory_mib: args.memory, console: ConsoleOutput::Null })?;
    source.add_virtio_device(vsock(&args.dir, "src.sock")?)?;
    source.load_linux(&LinuxBoot {
        kernel: args.kernel.clone(),
        initrd: Some(args.initrd.clone()),
        cmdline: format!("{DEFAULT_CMDLINE} {} -- tick", args.append),
    })?;
    source.start()?;
    if source.console().wait_for("TICK 3", Duration::from_secs(300)).is_none() {
        bail!("the guest never ticked; console:\n{}", source.console().text());
    }
    let snap = args.dir.join("bench.snap");
    let report = source.snapshot(&snap, false)?;
    let taken = Instant::now();
    drop(source);
    println!("bench: snapshot_create_ms {:.2}", ms(report.total));
    println!("bench: snapshot_pause_ms {:.3}", ms(report.pause));
    println!("bench: snapshot_file_bytes {}", report.write.file_size);
    println!("bench: snapshot_written_bytes {}", report.write.ram_written);
    let allocated = std::fs::metadata(&snap).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
    println!("bench: snapshot_allocated_bytes {allocated}");

    for age in &args.ages {
        let wait = Duration::from_secs(*age).saturating_sub(taken.elapsed());
        std::thread::sleep(wait);
        let (mut running, mut output) = (Vec::new(), Vec::new());
        let (mut mapped, mut created, mut loaded) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..args.restores {
            let t0 = Instant::now();
            let (mut m, timings) = Machine::restore(
                &*hv,
                &snap,
                RestoreOptions {
                    console: ConsoleOutput::Null,
                    devices: vec![vsock(&args.dir, &format!("r{i}.sock"))?],
                },
            )?;
            m.start()?;
            running.push(ms(t0.elapsed()));
            mapped.push(ms(timings.mapped));
            created.push(ms(timings.created - timings.mapped));
            loaded.push(ms(timings.restored - timings.created));
            match m.console().wait_for("TICK", Duration::from_secs(120)) {
                Some(_) => output.push(ms(t0.elapsed())),
                None => println!("bench: note restore at age {age}s printed nothing within 120 s"),
            }
            m.stop();
        }
        println!("bench: restore_running_ms age={age} {:.3}", median(running));
        if *age == 0 {
            println!("bench: restore_part_open_and_map_ms {:.3}", median(mapped));
            println!("bench: restore_part_create_vm_vcpus_devices_ms {:.3}", median(created));
            println!("bench: restore_part_load_state_ms {:.3}", median(loaded));
        }
        println!("bench: restore_first_output_ms age={age} {:.2}", median(output));
    }

    // Into shells made ahead (VM, vCPUs, platform devices): what a pool or a
    // server that keeps one ready pays per restore.
    let mut prepared = Vec::new();
    for i in 0..args.restores {
        let shell = Machine::new_shell(&*hv, 1, args.memory, ConsoleOutput::Null)?;
        let device = vsock(&args.dir, &format!("s{i}.sock"))?;
        let t0 = Instant::now();
        let (mut m, _) = Machine::restore_into(
            shell,
            &snap,
            RestoreOptions { console: ConsoleOutput::Null, devices: vec![device] },
        )?;
        m.start()?;
        prepared.push(ms(t0.elapsed()));
        if m.console().wait_for("TICK", Duration::from_secs(120)).is_none() {
            bail!("a VM restored into a shell printed nothing within 120 s");
        }
        m.stop();
    }
    println!("bench: restore_running_into_shell_ms {:.3}", median(prepared));

    let (mut m, _) = Machine::restore(
        &*hv,
        &snap,
        RestoreOptions { console: ConsoleOutput::Null, devices: vec![vsock(&args.dir, "reset.sock")?] },
    )?;
    let mut resets = Vec::new();
    for _ in 0..5 {
        m.start()?;
        m.console().wait_for("TICK", Duration::from_secs(60));
        resets.push(ms(m.reset_to_snapshot()?));
    }
    drop(m);
    println!("bench: reset_in_place_ms {:.3}", median(resets));

    let before = anonymous_kib();
    let mut fleet = Vec::new();
    for i in 0..args.fleet {
        let (mut m, _) = Machine::restore(
            &*hv,
            &snap,
            RestoreOptions { console: ConsoleOutput::Null, devices: vec![vsock(&args.dir, &format!("f{i}.sock"))?] },
        )?;
        m.start()?;
        fleet.push(m);
    }
    for m in &fleet {
        let lines = m.console().lines().len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while m.console().lines().len() < lines + 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let after = anonymous_kib();
    drop(fleet);
    println!("bench: private_kib_per_restored_vm {:.0}", (after.saturating_sub(before)) as f64 / args.fleet as f64);
    let _ = std::fs::remove_file(&snap);
    if let Some(initrd) = &args.agent_initrd {
        agent_restores(&args, initrd)?;
    }
    Ok(())
}

/// The steps from a restore to the first exec's output, medians over restores.
#[derive(Default)]
struct RestoreSteps {
    rows: Vec<(&'static str, Vec<f64>)>,
}

impl RestoreSteps {
    fn push(&mut self, key: &'static str, value: f64) {
        match self.rows.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(value),
            None => self.rows.push((key, vec![value])),
        }
    }

    /// `ready`: restore until `Vm::restore` returned (the exec is sent
    /// right then); `first`: from that request to the first output byte.
    fn add(&mut self, t: sm_api::StartTimings, ready: Duration, out: &ExecOutcome, first: Duration) {
        self.push("restore_agent_ready_ms", ms(ready));
        self.push("restore_first_exec_output_ms", ms(ready + first));
        self.push("step restore_host_ms", ms(t.restored));
        self.push("step agent_connected_ms", ms(t.agent_connected));
        self.push("step clock_entropy_refreshed_ms", ms(t.refreshed));
        self.push("step connect_attempts", f64::from(t.attempts));
        self.push("step exec_started_after_request_ms", ms(out.timeline.started));
        self.push("step first_output_after_request_ms", ms(first));
        self.push("step exited_after_request_ms", ms(out.timeline.exited));
        self.push("guest agent_spawn_ms", out.cost.spawn_us as f64 / 1e3);
        self.push("guest agent_spawn_kernel_ms", out.cost.agent_system_us as f64 / 1e3);
        self.push("guest process_ms", ms(out.duration));
        self.push("guest process_user_ms", out.cost.user_us as f64 / 1e3);
        self.push("guest process_kernel_ms", out.cost.system_us as f64 / 1e3);
        self.push("guest process_page_faults", (out.cost.minor_faults + out.cost.major_faults) as f64);
    }

    fn print(self) {
        for (key, values) in self.rows {
            println!("bench: {key} {:.2}", median(values));
        }
        println!(
            "bench: note guest round trips on the way: 2 (connection + pipelined Hello/clock/entropy), then 1 per exec"
        );
    }
}

/// The guest-bound floor: the same exec on a VM that has warmed up (its
/// first-touch costs after the restore paid), and the fork + exec + wait of
/// the same program timed inside the guest alone (busybox `time`).
fn guest_floor(hv: &dyn sm_api::Hypervisor, snap: &Path, runs: usize) -> Result<()> {
    let vm = Vm::restore(hv, snap, ConsoleOutput::Null, &[])?;
    for _ in 0..3 {
        vm.exec(&ExecRequest::new(["echo", "hi"]), None)?;
    }
    let (mut warm, mut process) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(3) {
        let t0 = Instant::now();
        let out = vm.exec(&ExecRequest::new(["echo", "hi"]), None)?;
        warm.push(ms(t0.elapsed()));
        process.push(ms(out.duration));
    }
    println!("bench: floor warm_exec_round_trip_ms {:.2}", median(warm));
    println!("bench: floor warm_exec_process_ms {:.2}", median(process));
    let out = vm.exec(
        &ExecRequest::new(["sh", "-c", "time echo hi >/dev/null; time echo hi >/dev/null; time echo hi >/dev/null"]),
        None,
    )?;
    // xtask parses busybox's `real` lines (bench_compare) and takes the median.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reals: Vec<&str> = stderr.lines().filter(|l| l.starts_with("real")).collect();
    if reals.is_empty() {
        bail!("busybox time printed nothing: {stderr}");
    }
    for real in reals {
        println!("bench-real: floor fork_exec_wait_in_guest_ms {real}");
    }
    vm.stop();
    Ok(())
}

/// With the agent guest: restore -> agent ready (clock and entropy refreshed)
/// -> first exec output; a diff snapshot after one exec; pool acquire of a warm VM.
fn agent_restores(args: &BenchSnapshotArgs, initrd: &Path) -> Result<()> {
    let hv = sm_api::default_hypervisor()?;
    let mut config = VmConfig::new(GuestImage { kernel: args.kernel.clone(), initrd: initrd.to_path_buf() });
    config.memory_mib = args.memory;
    eprintln!("booting the agent guest for the exec measurements ...");
    let mut vm = Vm::boot(&*hv, config)?;
    let snap = args.dir.join("agent.snap");
    vm.snapshot(&snap)?;
    vm.stop();
    let mut steps = RestoreSteps::default();
    for _ in 0..args.restores {
        let t0 = Instant::now();
        let vm = Vm::restore(&*hv, &snap, ConsoleOutput::Null, &[])?;
        let ready = t0.elapsed();
        let out = vm.exec(&ExecRequest::new(["echo", "hi"]), None)?;
        if out.stdout != b"hi\n" {
            bail!("unexpected exec output after restore: {:?}", String::from_utf8_lossy(&out.stdout));
        }
        let first = out.timeline.first_output.context("echo printed nothing")?;
        steps.add(vm.start_timings().context("a restored VM has start timings")?, ready, &out, first);
        vm.stop();
    }
    steps.print();
    guest_floor(&*hv, &snap, args.restores)?;

    let mut vm = Vm::restore(&*hv, &snap, ConsoleOutput::Null, &[])?;
    vm.exec(&ExecRequest::new(["sh", "-c", "echo data > /tmp/f"]), None)?;
    let diff = vm.snapshot_diff(&args.dir.join("agent-diff.snap"))?;
    vm.stop();
    println!("bench: diff_snapshot_ms {:.2}", ms(diff.total));
    println!("bench: diff_snapshot_written_bytes {}", diff.write.ram_written);
    let _ = std::fs::remove_file(args.dir.join("agent-diff.snap"));

    let mut pool_config = PoolConfig::new(snap.clone());
    pool_config.min_idle = 1;
    pool_config.max = 2;
    let pool = Pool::new(sm_api::default_hypervisor()?, pool_config)?;
    let mut acquire = Vec::new();
    for _ in 0..args.restores {
        // Wait until the released VM is back (reset in place) and idle.
        let deadline = Instant::now() + Duration::from_secs(60);
        while pool.stats().idle == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t0 = Instant::now();
        let vm = pool.acquire()?;
        acquire.push(ms(t0.elapsed()));
        drop(vm);
    }
    let stats = pool.stats();
    println!("bench: pool_acquire_warm_ms {:.3}", median(acquire));
    println!("bench: note pool hits {} misses {} resets {}", stats.hits, stats.misses, stats.resets);
    drop(pool);
    let _ = std::fs::remove_file(&snap);
    Ok(())
}
