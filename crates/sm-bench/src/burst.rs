//! `sm-bench burst`: the in-process half of `cargo xtask bench burst`. N VMs
//! restored from one snapshot of the agent guest as fast as this host allows:
//! shells (VM, vCPU, RAM slot) made ahead, then the restores into them on
//! parallel threads, then one exec in each. Prints `bench: <key> <value>`
//! lines; stops at the first VM the host refuses and says where and why.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use sm_api::machine::{Machine, RestoreOptions, Vsock, DEFAULT_GUEST_CID};
use sm_api::{connect_vsock, AgentClient, ConsoleOutput, ExecRequest, GuestImage, Vm, VmConfig};

use crate::stats::{anonymous_kib, ms};

#[derive(Args)]
pub struct BenchBurstArgs {
    /// vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Agent initrd.
    #[arg(long)]
    initrd: PathBuf,
    /// Scratch directory (snapshot, vsock sockets).
    #[arg(long)]
    dir: PathBuf,
    /// VMs in the burst.
    #[arg(long, default_value_t = 100)]
    vms: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Threads restoring (and then exec'ing) at once.
    #[arg(long, default_value_t = 4)]
    threads: usize,
}

/// One VM of the burst.
struct Restored {
    machine: Machine,
    vsock: PathBuf,
    /// From the burst's start to this VM's vCPU running.
    running: Duration,
}

/// Raises the open-file limit to its hard maximum: each VM holds a few
/// dozen descriptors (VM, vCPU, eventfds, sockets).
fn raise_fd_limit() -> u64 {
    // SAFETY: an all-zero rlimit is valid; getrlimit/setrlimit take valid pointers.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        lim.rlim_cur
    }
}

/// User + system CPU time of this process so far.
fn process_cpu() -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

pub fn run(args: BenchBurstArgs) -> Result<()> {
    if args.vms == 0 || args.threads == 0 {
        bail!("--vms and --threads must be at least 1");
    }
    let fd_limit = raise_fd_limit();
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let hv = sm_api::default_hypervisor()?;
    let mut config = VmConfig::new(GuestImage { kernel: args.kernel.clone(), initrd: args.initrd.clone() });
    config.memory_mib = args.memory;
    eprintln!("booting the agent guest and taking the snapshot ...");
    let mut vm = Vm::boot(&*hv, config)?;
    let snap = args.dir.join("burst.snap");
    vm.snapshot(&snap)?;
    vm.stop();

    eprintln!("making {} shells (VM, vCPU, RAM slot) ahead ...", args.vms);
    let t0 = Instant::now();
    let mut shells = Vec::with_capacity(args.vms);
    let mut stopped = None;
    for i in 0..args.vms {
        match Machine::new_shell(&*hv, 1, args.memory, ConsoleOutput::Null) {
            Ok(s) => shells.push(s),
            Err(e) => {
                stopped = Some(format!("shell {i} refused: {e} (open-file limit {fd_limit})"));
                break;
            }
        }
    }
    println!("bench: shells_made_ahead_ms {:.1}", ms(t0.elapsed()));
    println!("bench: shells {}", shells.len());

    eprintln!("restoring {} VMs on {} threads ...", shells.len(), args.threads);
    let before = anonymous_kib();
    let queue = Mutex::new(shells.into_iter().enumerate().collect::<Vec<_>>());
    let restored = Mutex::new(Vec::new());
    let failure = Mutex::new(None::<String>);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.threads {
            scope.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((i, shell)) = next else { return };
                let vsock = args.dir.join(format!("burst-{i}.sock"));
                let result = Vsock::new(DEFAULT_GUEST_CID, &vsock).map_err(anyhow::Error::from).and_then(|dev| {
                    let options = RestoreOptions { console: ConsoleOutput::Null, devices: vec![Box::new(dev)] };
                    let (mut m, _) = Machine::restore_into(shell, &snap, options)?;
                    m.start()?;
                    Ok(m)
                });
                match result {
                    Ok(machine) => restored.lock().unwrap_or_else(|e| e.into_inner()).push(Restored {
                        machine,
                        vsock,
                        running: start.elapsed(),
                    }),
                    Err(e) => {
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("restore {i}: {e:#}"));
                        return;
                    }
                }
            });
        }
    });
    let all_running = start.elapsed();
    let after = anonymous_kib();
    let vms = restored.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        stopped.get_or_insert(f);
    }
    if vms.is_empty() {
        bail!("no VM restored: {}", stopped.unwrap_or_default());
    }
    let n = vms.len();
    println!("bench: vms_running {n}");
    println!("bench: all_running_ms {:.1}", ms(all_running));
    let running: Vec<f64> = vms.iter().map(|v| ms(v.running)).collect();
    println!("bench: running_p50_ms {:.2}", percentile(running.clone(), 0.5));
    println!("bench: running_p99_ms {:.2}", percentile(running, 0.99));
    println!("bench: private_kib_per_vm_running {:.0}", after.saturating_sub(before) as f64 / n as f64);

    eprintln!("one exec in each of {n} VMs ...");
    let answered = Mutex::new(Vec::with_capacity(n));
    let exec_failure = Mutex::new(None::<String>);
    let work = Mutex::new((0..n).collect::<Vec<_>>());
    std::thread::scope(|scope| {
        for _ in 0..args.threads {
            scope.spawn(|| loop {
                let next = work.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some(i) = next else { return };
                match answer(&vms[i].vsock) {
                    Ok(()) => answered.lock().unwrap_or_else(|e| e.into_inner()).push(ms(start.elapsed())),
                    Err(e) => {
                        *exec_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("VM {i}: {e:#}"));
                    }
                }
            });
        }
    });
    let all_answered = start.elapsed();
    let answered = answered.into_inner().unwrap_or_else(|e| e.into_inner());
    let peak_kib = anonymous_kib();
    println!("bench: vms_answered {}", answered.len());
    println!("bench: all_answered_ms {:.1}", ms(all_answered));
    println!("bench: answered_p50_ms {:.1}", percentile(answered.clone(), 0.5));
    println!("bench: answered_p99_ms {:.1}", percentile(answered, 0.99));
    println!("bench: private_kib_per_vm_after_exec {:.0}", peak_kib.saturating_sub(before) as f64 / n as f64);
    // What the VMs cost the host while they sit idle (agent waiting, guest
    // kernel idle): the process's CPU time over a quiet window.
    let window = Duration::from_secs(5);
    let cpu_before = process_cpu();
    std::thread::sleep(window);
    let idle_cpu = process_cpu().saturating_sub(cpu_before);
    println!(
        "bench: idle_host_cpu_percent_per_vm {:.2}",
        100.0 * idle_cpu.as_secs_f64() / window.as_secs_f64() / n as f64
    );
    if let Some(e) = exec_failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        println!("bench: note an exec failed: {e}");
    }
    if let Some(why) = stopped {
        println!("bench: note the burst stopped at {n} VMs: {why}");
    }
    eprintln!("stopping {n} VMs ...");
    for mut v in vms {
        v.machine.stop();
    }
    let _ = std::fs::remove_file(&snap);
    Ok(())
}

/// Connects to a restored guest's agent (retrying while its vsock transport
/// reset is processed) and runs `echo hi`.
fn answer(vsock: &std::path::Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let attempt = connect_vsock(vsock, sm_api::agent::DEFAULT_AGENT_PORT)
            .map_err(anyhow::Error::from)
            .and_then(|s| {
                // A guest that stops answering ends the bench, not hangs it.
                s.set_read_timeout(Some(Duration::from_secs(600)))?;
                Ok(AgentClient::connect(s)?)
            })
            .and_then(|mut c| Ok(c.exec(&ExecRequest::new(["echo", "hi"]), None)?));
        match attempt {
            Ok(out) if out.stdout == b"hi\n" => return Ok(()),
            Ok(out) => bail!("unexpected output {:?}", String::from_utf8_lossy(&out.stdout)),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("not answering yet: {e:#}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}
