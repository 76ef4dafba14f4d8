//! `sm-fuzz [TARGET] [--runs N]`: runs fuzz targets at length (see the crate
//! doc); `--list` names them.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;

#[derive(Parser)]
#[command(name = "sm-fuzz", about = "Fuzz supermachine's parsers and devices with proptest (stable Rust)")]
struct Args {
    /// The target (default: every target).
    target: Option<String>,
    /// Inputs per target.
    #[arg(long, default_value_t = 100_000)]
    runs: u32,
    /// List the targets and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let targets = match &args.target {
        Some(name) => match sm_fuzz::find(name) {
            Some(t) => vec![t],
            None => {
                let names: Vec<&str> = sm_fuzz::all().iter().map(|t| t.name).collect();
                bail!("no fuzz target {name:?}; the targets are: {}", names.join(", "));
            }
        },
        None => sm_fuzz::all(),
    };
    if args.list {
        for t in &targets {
            println!("{:<16} {}", t.name, t.what);
        }
        return Ok(());
    }
    let mut findings = Vec::new();
    for t in &targets {
        let runs = (args.runs / t.cost.max(1)).max(1);
        let start = Instant::now();
        eprintln!("fuzz {}: {runs} inputs ...", t.name);
        match sm_fuzz::fuzz(t, runs, false) {
            Ok(()) => println!("fuzz {}: {runs} inputs clean in {:.1?}", t.name, start.elapsed()),
            Err(finding) => {
                println!("fuzz {}: FOUND {finding}", t.name);
                findings.push(finding);
            }
        }
    }
    if !findings.is_empty() {
        bail!("{} target(s) failed; each input above is a test to add", findings.len());
    }
    Ok(())
}
