//! `cargo xtask` — project automation: guest kernel, test initrd, test suites,
//! benchmarks and the demo.

mod agent;
mod apt;
mod bench;
mod bench_burst;
mod bench_compare;
mod bench_exec;
mod bench_fs;
mod bench_image;
mod bench_net;
mod bench_shim;
mod bench_snapshot;
mod child;
mod demo;
mod disk;
mod initrd;
mod kernel;
mod paths;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "supermachine project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest kernel (vmlinux) from Debian's linux-source-6.1, cached by input hash.
    Kernel {
        /// Rebuild even when the cached kernel matches the inputs.
        #[arg(long)]
        force: bool,
    },
    /// Build the minimal test initrd (static init, uncompressed cpio).
    Initrd,
    /// Build the static guest agent (`--initrd`: also target/guest/initrd-agent.cpio with it as /init).
    Agent {
        /// Also pack the agent as /init into an initrd; prints the initrd's path.
        #[arg(long)]
        initrd: bool,
    },
    /// Lint, build the guest artifacts and run every test (the README's test command).
    Test,
    /// Run the KVM end-to-end suite (fails under CI=true when /dev/kvm is missing).
    TestKvm,
    /// The long data-integrity stress test (1000 random payloads + 10 of 4 MiB per path, zero mismatches).
    Soak,
    /// Type-check the Hypervisor.framework backend (sm-hvf with its framework
    /// calls) on this host: clippy over `--features typecheck`, never linked.
    CheckHvf,
    /// Benchmarks, printed side by side with Firecracker and QEMU microvm.
    Bench {
        #[command(subcommand)]
        which: BenchKind,
    },
    /// The built-in default job: boot, capture, restore, with timings.
    Demo,
    /// Fuzz the parsers and devices (proptest, release build): every target or one.
    Fuzz {
        /// One target (`--list` names them); default: all.
        target: Option<String>,
        /// Inputs per target (costly targets, such as layer unpacking, run a
        /// fraction of them).
        #[arg(long, default_value_t = 1_000_000)]
        runs: u32,
        /// List the targets.
        #[arg(long)]
        list: bool,
    },
}

#[derive(Subcommand)]
enum BenchKind {
    /// VM creation, first console byte, time to init, peak VMM RSS.
    Boot {
        /// Boots per VMM.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Snapshot create, restore latency by snapshot age, reset in place, memory per VM.
    Snapshot {
        /// Restores per snapshot age.
        #[arg(long, default_value_t = 5)]
        restores: usize,
        /// Snapshot ages in seconds (comma separated), e.g. 0,60,600.
        #[arg(long, value_delimiter = ',', default_value = "0,60")]
        ages: Vec<u64>,
    },
    /// N VMs restored from one snapshot at once, each answering one exec: time to all running / all answered,
    /// p50/p99 per VM, private memory per VM, vs Firecracker loading one snapshot into N processes.
    Burst {
        /// VMs in the burst (each exec costs ~1 s of emulated guest kernel time here: 1000 take ~10 min).
        #[arg(long, default_value_t = 100)]
        vms: usize,
        /// Threads restoring and exec'ing at once.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Guest network throughput both ways, connection set-up and a published-port round trip, vs QEMU on passt.
    Net {
        /// Requests through the published port.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// MiB moved each way.
        #[arg(long, default_value_t = 8)]
        mib: u64,
    },
    /// File I/O and metadata work on virtio-fs (with and without DAX) and a volume, vs QEMU sharing over 9p.
    Fs {
        /// Runs of each job (the median is printed).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// MiB written and read sequentially.
        #[arg(long, default_value_t = 8)]
        mib: u64,
    },
    /// Exec round trip, stdout throughput over vsock, virtio-blk direct I/O.
    Exec {
        /// Round trips of `true`.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Size of the large stdout transfer in MiB (guest-bound here: ~0.2 MiB/s
        /// on this kvm_pvm host, so 100 takes ~9 min; use e.g. 10 for a quick run).
        #[arg(long, default_value_t = 100)]
        big_mib: u64,
    },
    /// `ctr run --rm busybox true` under containerd: runc, the shim restoring, the shim's warm pool.
    Shim {
        /// Timed containers per configuration (after one untimed).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Image pull vs skopeo copy, root disk build per MiB, `run` of the default image (cold+bake, restore).
    Image {
        /// Repetitions of each measurement (each root disk build and cold run boots a VM: ~30-60 s here).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Kernel { force } => {
            let path = kernel::build(force)?;
            println!("{}", path.display());
        }
        Cmd::Initrd => {
            let path = initrd::build()?;
            println!("{}", path.display());
        }
        Cmd::Agent { initrd } => {
            let path = if initrd { agent::build_initrd()? } else { agent::build()? };
            println!("{}", path.display());
        }
        Cmd::Test => test::all()?,
        Cmd::TestKvm => test::kvm()?,
        Cmd::Soak => test::soak()?,
        Cmd::CheckHvf => test::check_hvf()?,
        Cmd::Bench { which: BenchKind::Boot { runs } } => bench::boot(runs)?,
        Cmd::Bench { which: BenchKind::Snapshot { restores, ages } } => bench_snapshot::run(restores, &ages)?,
        Cmd::Bench { which: BenchKind::Exec { runs, big_mib } } => bench_exec::run(runs, big_mib)?,
        Cmd::Bench { which: BenchKind::Burst { vms, threads } } => bench_burst::run(vms, threads)?,
        Cmd::Bench { which: BenchKind::Image { runs } } => bench_image::run(runs)?,
        Cmd::Bench { which: BenchKind::Net { runs, mib } } => bench_net::run(runs, mib)?,
        Cmd::Bench { which: BenchKind::Fs { runs, mib } } => bench_fs::run(runs, mib)?,
        Cmd::Bench { which: BenchKind::Shim { runs } } => bench_shim::run(runs)?,
        Cmd::Demo => demo::run()?,
        Cmd::Fuzz { target, runs, list } => {
            let bin = bench::build_release_fuzz()?;
            let mut cmd = std::process::Command::new(bin);
            cmd.args(target).args(["--runs", &runs.to_string()]);
            if list {
                cmd.arg("--list");
            }
            let status = cmd.status()?;
            if !status.success() {
                anyhow::bail!("sm-fuzz failed ({status}); its findings are above");
            }
        }
    }
    Ok(())
}
