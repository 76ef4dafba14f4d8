//! `pull`, `images`, `rmi`, `prune`: the local image store.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use sm_api::oci::{ImageRecord, Store};

use crate::oci;

#[derive(Args)]
pub struct PullArgs {
    /// NAME[:TAG][@DIGEST], or oci-layout:DIR[:TAG], oci-archive:FILE, docker-archive:FILE.
    image: String,
    /// Registry (HOST or HOST:PORT) to speak plain HTTP to (loopback ones always are); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
}

#[derive(Args)]
pub struct RmiArgs {
    /// Images to remove: names as `images` shows them (or as typed for `pull`),
    /// or a unique prefix of their digest.
    #[arg(required = true)]
    images: Vec<String>,
}

pub fn pull(args: PullArgs) -> Result<ExitCode> {
    let source = oci::parse_source(&args.image)?;
    let store = oci::open_store()?;
    let info = oci::fetch(&store, &source, &oci::pull_options(&args.insecure_registries))?;
    if let Some(index) = &info.index_digest {
        eprintln!("{}: platform manifest {}", info.name, info.manifest_digest);
        println!("Digest: {index}");
    } else {
        println!("Digest: {}", info.manifest_digest);
    }
    eprintln!("Status: image is up to date for {}", info.name);
    Ok(ExitCode::SUCCESS)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

pub fn images() -> Result<ExitCode> {
    let store = oci::open_store()?;
    let mut rows = vec![("REPOSITORY:TAG".to_string(), "DIGEST".to_string(), "SIZE".to_string())];
    for rec in store.images()? {
        let size = match store.info_for(&rec) {
            Ok(info) => human(info.layers.iter().map(|l| l.size).sum()),
            Err(_) => "damaged".to_string(),
        };
        rows.push((rec.name.clone(), rec.manifest.short().to_string(), size));
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    for (name, digest, size) in rows {
        println!("{name:<w0$}   {digest:<w1$}   {size}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The record `input` names: its normalized name, else a unique digest prefix.
fn find(store: &Store, input: &str) -> Result<ImageRecord> {
    if let Some(rec) = store.image(input)? {
        return Ok(rec); // exact stored name, e.g. builtin:default
    }
    if let Ok(name) = sm_api::oci::source::store_name(input) {
        if let Some(rec) = store.image(&name)? {
            return Ok(rec);
        }
    }
    let hex = input.strip_prefix("sha256:").unwrap_or(input);
    if !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        let matches: Vec<ImageRecord> =
            store.images()?.into_iter().filter(|r| r.manifest.hex().starts_with(hex)).collect();
        match matches.len() {
            1 => return Ok(matches.into_iter().next().expect("one match")),
            0 => {}
            n => bail!("{input:?} matches {n} images: give more of the digest or the name"),
        }
    }
    bail!("no such image: {input} (see `supermachine images`)")
}

pub fn rmi(args: RmiArgs) -> Result<ExitCode> {
    let store = oci::open_store()?;
    let mut failed = false;
    for input in &args.images {
        match find(&store, input).and_then(|rec| {
            store.remove_image(&rec.name).with_context(|| format!("removing {}", rec.name))?;
            Ok(rec)
        }) {
            Ok(rec) => println!("Untagged: {} ({})", rec.name, rec.manifest),
            Err(e) => {
                eprintln!("supermachine: error: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        return Ok(ExitCode::from(1));
    }
    eprintln!("(layers stay until `supermachine prune`)");
    Ok(ExitCode::SUCCESS)
}

pub fn prune() -> Result<ExitCode> {
    let store = oci::open_store()?;
    let r = store.prune().context("pruning the image store")?;
    println!(
        "Deleted {} blobs, {} root disks and {} baked snapshots; total reclaimed space: {}",
        r.blobs_removed,
        r.rootfs_removed,
        r.snapshots_removed,
        human(r.bytes_freed)
    );
    let swept = sm_api::sweep_stale_work_dirs(&std::env::temp_dir());
    if !swept.is_empty() {
        println!("Removed {} VM work directories left by killed processes", swept.len());
    }
    Ok(ExitCode::SUCCESS)
}
