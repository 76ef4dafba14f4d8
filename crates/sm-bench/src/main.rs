//! `sm-bench`: the measuring halves of `cargo xtask bench snapshot`, `cargo xtask bench burst`,
//! `cargo xtask bench exec` and `cargo xtask bench net`, in a process of their own (release build, nothing
//! else running in it), kept out of the `supermachine` product binary. Each
//! prints `bench: <key> <value>` lines that xtask collects and compares with
//! the peers it runs beside.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod burst;
mod exec;
mod fs;
mod net;
mod snapshot;
mod stats;

#[derive(Parser)]
#[command(name = "sm-bench", about = "Measurements for `cargo xtask bench` (run it through xtask)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Snapshot/restore measurements for `cargo xtask bench snapshot`.
    Snapshot(snapshot::BenchSnapshotArgs),
    /// N VMs restored from one snapshot, each answering one exec, for `cargo xtask bench burst`.
    Burst(burst::BenchBurstArgs),
    /// Exec, vsock and virtio-blk measurements for `cargo xtask bench exec`.
    Exec(exec::BenchExecArgs),
    /// Guest network throughput and a published-port round trip for `cargo xtask bench net`.
    Net(net::BenchNetArgs),
    /// File I/O and metadata work on virtio-fs (with and without DAX) and a volume for `cargo xtask bench fs`.
    Fs(fs::BenchFsArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SM_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Snapshot(args) => snapshot::run(args),
        Cmd::Burst(args) => burst::run(args),
        Cmd::Exec(args) => exec::run(args),
        Cmd::Net(args) => net::run(args),
        Cmd::Fs(args) => fs::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sm-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
