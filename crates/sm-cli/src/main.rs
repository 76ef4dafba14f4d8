//! `supermachine`: boot and run microVMs.

mod boot;
mod detach;
mod exec;
mod images;
mod network;
mod oci;
mod run;
mod timings;
mod tty;
mod volumes;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "supermachine", version, about = "Fast, strongly isolated microVMs")]
struct Cli {
    /// Do not confine the VMM's vCPU and device threads with seccomp (for
    /// debugging; also SM_NO_SANDBOX=1, which detached VMs inherit).
    #[arg(long, global = true)]
    no_sandbox: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a Linux kernel with an initrd; the console goes to stdout.
    Boot(boot::BootArgs),
    /// Run a command in a new microVM from an OCI image (like `docker run --rm`).
    Run(Box<run::RunArgs>),
    /// List VMs started with `run -d` (-a: also exited ones).
    Ps(detach::PsArgs),
    /// Print the output of a detached VM's command (-f: follow).
    Logs(detach::LogsArgs),
    /// Run a command in a running detached VM.
    Exec(detach::ExecArgs),
    /// Print a detached VM's published ports.
    Port(detach::PortArgs),
    /// Stop detached VMs (SIGTERM to their supervisor, SIGKILL after 10 s).
    Stop(detach::StopArgs),
    /// Kill detached VMs at once.
    Kill(detach::StopArgs),
    /// Forget exited detached VMs (state and log).
    Rm(detach::StopArgs),
    /// Pull an image (or import a local one) into the local store; prints its digest.
    Pull(images::PullArgs),
    /// List the images in the local store.
    Images,
    /// Remove images from the local store (their layers stay until `prune`).
    Rmi(images::RmiArgs),
    /// Delete blobs and root disks no image uses; reports the space freed.
    Prune,
    /// Manage named volumes (data that outlives a VM; `run -v NAME:PATH`).
    Volume {
        #[command(subcommand)]
        cmd: volumes::VolumeCmd,
    },
}

/// Exit status for errors of supermachine itself (as `docker run` uses 125).
pub const EXIT_RUNTIME_ERROR: u8 = 125;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SM_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_RUNTIME_ERROR) } else { ExitCode::SUCCESS };
        }
    };
    if cli.no_sandbox {
        // Still one thread here; children (a detached VM's supervisor) inherit it.
        std::env::set_var("SM_NO_SANDBOX", "1");
        sm_api::sandbox::disable();
    }
    let result = match cli.cmd {
        Cmd::Boot(args) => boot::run(args),
        Cmd::Run(args) => run::run(*args),
        Cmd::Ps(args) => detach::ps(args),
        Cmd::Logs(args) => detach::logs(args),
        Cmd::Exec(args) => detach::exec(args),
        Cmd::Port(args) => detach::port(args),
        Cmd::Stop(args) => detach::stop(args),
        Cmd::Kill(args) => detach::kill(args),
        Cmd::Rm(args) => detach::rm(args),
        Cmd::Pull(args) => images::pull(args),
        Cmd::Images => images::images(),
        Cmd::Rmi(args) => images::rmi(args),
        Cmd::Prune => images::prune(),
        Cmd::Volume { cmd } => volumes::volume(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("supermachine: error: {e:#}");
            ExitCode::from(EXIT_RUNTIME_ERROR)
        }
    }
}
