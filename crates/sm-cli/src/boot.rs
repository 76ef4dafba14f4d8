//! `supermachine boot`: boot a kernel + initrd and report how the guest ended.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use sm_api::machine::{LinuxBoot, Machine, MachineConfig, Vsock, DEFAULT_CMDLINE, DEFAULT_GUEST_CID};
use sm_api::{ConsoleOutput, ExitReason};

#[derive(Args)]
pub struct BootArgs {
    /// Kernel image (vmlinux ELF or bzImage). Default: $SM_KERNEL, else the one
    /// `cargo xtask kernel` built (target/guest/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd (cpio). Default: $SM_INITRD, else target/guest/initrd-test.cpio.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Boot without an initrd.
    #[arg(long, conflicts_with = "initrd")]
    no_initrd: bool,
    /// Replace the whole kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Append to the command line (e.g. `-- tick` to pass arguments to init).
    #[arg(long, allow_hyphen_values = true)]
    append: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Write the console to this file instead of stdout.
    #[arg(long)]
    console_file: Option<PathBuf>,
    /// Stop the VM after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Print host-side timings to stderr when the VM ends.
    #[arg(long)]
    timings: bool,
    /// Give the guest a virtio-vsock device (CID 3) whose host side is this unix
    /// socket (`CONNECT <port>` handshake; see sm-virtio's vsock muxer).
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// Console marker whose time `--timings` reports as "init".
    #[arg(long, default_value = "SM_INIT_READY")]
    init_marker: String,
}

/// The guest artifacts directory next to the binary: `target/guest` for
/// `target/{debug,release}/supermachine`.
fn default_guest_file(env: &str, name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the supermachine binary")?;
    let guest = exe.parent().and_then(|d| d.parent()).map(|t| t.join("guest").join(name));
    guest.with_context(|| format!("no default for {name}: set {env} or pass the path"))
}

pub fn run(args: BootArgs) -> Result<ExitCode> {
    let kernel = match args.kernel {
        Some(k) => k,
        None => default_guest_file("SM_KERNEL", "vmlinux")?,
    };
    let initrd = if args.no_initrd {
        None
    } else {
        Some(match args.initrd {
            Some(i) => i,
            None => default_guest_file("SM_INITRD", "initrd-test.cpio")?,
        })
    };
    let mut cmdline = args.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if let Some(extra) = args.append {
        cmdline.push(' ');
        cmdline.push_str(&extra);
    }
    let console = match args.console_file {
        Some(f) => ConsoleOutput::File(f),
        None => ConsoleOutput::Stdout,
    };
    let hv = sm_api::default_hypervisor()?;
    let (max_vcpus, why) = hv.max_linux_vcpus();
    if args.vcpus > max_vcpus {
        anyhow::bail!(
            "--vcpus {}: at most {max_vcpus} vCPUs boot a Linux guest here: {}",
            args.vcpus,
            why.unwrap_or("the hypervisor's vCPU limit")
        );
    }
    let mut machine = Machine::new(&*hv, MachineConfig { vcpus: args.vcpus, memory_mib: args.memory, console })?;
    if let Some(path) = &args.vsock {
        let vsock = Vsock::new(DEFAULT_GUEST_CID, path)?;
        machine.add_virtio_device(Box::new(vsock))?;
    }
    machine.load_linux(&LinuxBoot { kernel, initrd, cmdline })?;
    machine.start()?;
    let reason = match machine.wait(args.timeout.map(Duration::from_secs)) {
        Some(r) => r,
        None => {
            eprintln!("supermachine: timeout after {} s, stopping the VM", args.timeout.unwrap_or(0));
            machine.stop()
        }
    };
    if args.timings {
        let t = machine.timings();
        let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
        eprintln!("timings: vm+vcpus created {}", ms(Some(t.created)));
        eprintln!("timings: first console byte {}", ms(machine.console().first_byte_at()));
        eprintln!(
            "timings: init ({}) {}",
            args.init_marker,
            ms(machine.console().find(&args.init_marker).map(|f| f.0))
        );
    }
    Ok(match reason {
        ExitReason::Reboot | ExitReason::PowerOff => ExitCode::SUCCESS,
        ExitReason::GuestPanic { line } => {
            eprintln!("supermachine: guest kernel panic: {line}");
            ExitCode::from(1)
        }
        ExitReason::Stopped => ExitCode::from(124),
        other => {
            eprintln!("supermachine: guest ended abnormally: {other:?}");
            ExitCode::from(crate::EXIT_RUNTIME_ERROR)
        }
    })
}
