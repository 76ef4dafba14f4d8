//! `sm-bench exec`: the in-process half of `cargo xtask bench
//! exec`. Boots the agent guest with a scratch disk and measures exec round trip
//! and stdout throughput through vsock, then times the given guest jobs (blk I/O,
//! guest pipe). Prints `bench: <key> <value>` and `bench-job:` lines on stdout and
//! progress on stderr.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use sm_api::{Disk, ExecOutcome, ExecRequest, GuestImage, Vm, VmConfig};

use crate::stats::{median, ms};

#[derive(Args)]
pub struct BenchExecArgs {
    /// vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Agent initrd (with busybox).
    #[arg(long)]
    initrd: PathBuf,
    /// Scratch raw disk, attached read-write as /dev/vda (its contents are overwritten).
    #[arg(long)]
    disk: PathBuf,
    /// Round trips of `true`.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Size of the large stdout transfer in MiB.
    #[arg(long, default_value_t = 100)]
    big_mib: u64,
    /// A shell command to time in the guest with busybox `time` (repeatable); its
    /// `real` line is printed as `bench-job: <index> <line>`.
    #[arg(long = "job")]
    jobs: Vec<String>,
}

/// Time budget for one measured command.
const EXEC_TIMEOUT: Duration = Duration::from_secs(900);

fn exec(vm: &Vm, argv: &[&str]) -> Result<(ExecOutcome, Duration)> {
    let mut request = ExecRequest::new(argv.iter().copied());
    request.timeout_ms = Some(EXEC_TIMEOUT.as_millis() as u64);
    let t0 = Instant::now();
    let out = vm.exec(&request, None).with_context(|| format!("running {argv:?} in the guest"))?;
    let took = t0.elapsed();
    if out.timed_out || !out.status.success() {
        bail!("{argv:?} failed in the guest ({:?}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok((out, took))
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

pub fn run(args: BenchExecArgs) -> Result<()> {
    let disk_bytes = std::fs::metadata(&args.disk).with_context(|| format!("reading {}", args.disk.display()))?.len();
    if disk_bytes < 1 << 20 {
        bail!("{} is {disk_bytes} bytes; the blk benchmark needs at least 1 MiB", args.disk.display());
    }
    let image = GuestImage { kernel: args.kernel.clone(), initrd: args.initrd.clone() };
    let mut config = VmConfig::new(image);
    config.disks = vec![Disk { path: args.disk.clone(), read_only: false }];
    eprintln!("booting the agent guest ...");
    let t0 = Instant::now();
    let vm = Vm::boot(&*sm_api::default_hypervisor()?, config)?;
    println!("bench: boot to agent ms {:.1}", ms(t0.elapsed()));

    eprintln!("exec round trips of `true` ({} runs) ...", args.runs);
    let (mut round_trips, mut in_guest) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let (out, took) = exec(&vm, &["true"])?;
        round_trips.push(ms(took));
        in_guest.push(ms(out.duration));
    }
    let (rt, guest) = (median(round_trips), median(in_guest));
    println!("bench: exec true round trip ms {rt:.2}");
    println!("bench: exec true spawn-to-exit in guest ms {guest:.2}");
    println!("bench: exec true outside the process ms {:.2}", rt - guest);

    for mib in [1, args.big_mib] {
        eprintln!("stdout throughput, {mib} MiB ...");
        let count = (mib * 16).to_string();
        let (out, took) = exec(&vm, &["dd", "if=/dev/zero", "bs=65536", &format!("count={count}")])?;
        if out.stdout.len() as u64 != mib << 20 {
            bail!("stdout of {mib} MiB arrived as {} bytes", out.stdout.len());
        }
        println!("bench: stdout {mib} MiB MiB/s {:.2}", mib_per_s(mib << 20, took.as_secs_f64()));
    }
    crate::stats::time_guest_jobs(&args.jobs, |argv| Ok(exec(&vm, argv)?.0))?;
    vm.stop();
    Ok(())
}
