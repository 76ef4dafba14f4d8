//! `sm-bench fs`: the in-process half of `cargo xtask bench fs`. Boots the
//! agent guest with two shared host directories (virtio-fs without and with a
//! DAX window) and a named volume (ext4 on virtio-blk), then times the given
//! guest jobs (each already aimed at one of the mounts by xtask) with busybox
//! `time`. Prints `bench:` and `bench-job:` lines on stdout, progress on
//! stderr.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use sm_api::{ExecRequest, GuestImage, ShareMount, Vm, VmConfig, VolumeMount};

use crate::stats::ms;

#[derive(Args)]
pub struct BenchFsArgs {
    /// vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Agent initrd (with busybox).
    #[arg(long)]
    initrd: PathBuf,
    /// Host directory shared at /fs (virtio-fs, no DAX).
    #[arg(long)]
    share: PathBuf,
    /// Host directory shared at /dax (virtio-fs with a DAX window).
    #[arg(long)]
    dax_share: PathBuf,
    /// ext4 image attached as a volume at /vol.
    #[arg(long)]
    volume: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// A shell command to time in the guest with busybox `time` (repeatable).
    #[arg(long = "job")]
    jobs: Vec<String>,
}

/// Time budget for one guest job.
const JOB_TIMEOUT: Duration = Duration::from_secs(1800);

pub fn run(args: BenchFsArgs) -> Result<()> {
    let image = GuestImage { kernel: args.kernel.clone(), initrd: args.initrd.clone() };
    let hypervisor = sm_api::default_hypervisor()?;
    let mut config = VmConfig::new(image);
    config.memory_mib = args.memory_mib;
    config.shares =
        vec![ShareMount::new(&args.share, "/fs"), ShareMount { dax: true, ..ShareMount::new(&args.dax_share, "/dax") }];
    config.volumes = vec![VolumeMount { path: args.volume.clone(), guest_path: "/vol".into(), read_only: false }];
    eprintln!("booting the agent guest with /fs (virtio-fs), /dax (virtio-fs + DAX) and /vol (volume) ...");
    let t0 = Instant::now();
    let vm = Vm::boot(&*hypervisor, config)?;
    println!("bench: boot to agent with two shares and a volume ms {:.1}", ms(t0.elapsed()));
    crate::stats::time_guest_jobs(&args.jobs, |argv| {
        let request = ExecRequest::new(argv.iter().copied()).timeout(JOB_TIMEOUT);
        let out = vm.exec(&request, None).with_context(|| format!("running {argv:?} in the guest"))?;
        if out.timed_out || !out.status.success() {
            bail!("{argv:?} failed in the guest ({:?}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(out)
    })?;
    vm.stop();
    Ok(())
}
