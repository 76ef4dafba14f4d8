//! `supermachine`: boot and run microVMs.

mod bench_snapshot;
mod boot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "supermachine", version, about = "Fast, strongly isolated microVMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a Linux kernel with an initrd; the console goes to stdout.
    Boot(boot::BootArgs),
    /// Snapshot/restore measurements for `cargo xtask bench snapshot`.
    #[command(hide = true)]
    BenchSnapshot(bench_snapshot::BenchSnapshotArgs),
}

/// Exit status for errors of supermachine itself (as `docker run` uses 125).
pub const EXIT_RUNTIME_ERROR: u8 = 125;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Boot(args) => boot::run(args),
        Cmd::BenchSnapshot(args) => bench_snapshot::run(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("supermachine: error: {e:#}");
            ExitCode::from(EXIT_RUNTIME_ERROR)
        }
    }
}
