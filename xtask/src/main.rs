//! `cargo xtask` — project automation: guest kernel, test initrd, KVM test suite,
//! benchmarks and the demo.

mod initrd;
mod kernel;
mod paths;

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
    }
    Ok(())
}
