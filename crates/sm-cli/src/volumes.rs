//! `-v NAME:PATH[:ro]` and `-v /host/dir:PATH[:OPTIONS]` (ro, rw, dax) of `run`, and
//! `supermachine volume create|ls|inspect|rm|prune`.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use sm_api::volume::DEFAULT_VOLUME_SIZE;
use sm_api::{ShareMount, VolumeInfo, VolumeMount, VolumeStore};

/// `supermachine volume ...`.
#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a named volume (a sparse ext4 disk; `run -v NAME:PATH` also
    /// creates one on first use).
    Create {
        /// Size the guest sees, e.g. 512M, 8G (host space is used only as
        /// the guest writes).
        #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = parse_size)]
        size: u64,
        /// The name.
        name: String,
    },
    /// List the volumes.
    Ls,
    /// Show volumes as JSON.
    Inspect {
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete volumes and their data (refused while a VM uses one).
    Rm {
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete every volume no running VM uses.
    Prune(PruneArgs),
}

/// `volume prune`.
#[derive(Args)]
pub struct PruneArgs {
    /// Do not ask for confirmation.
    #[arg(short, long)]
    force: bool,
}

fn open() -> Result<VolumeStore> {
    let dir = VolumeStore::default_dir();
    VolumeStore::open(&dir).with_context(|| format!("opening the volume directory {}", dir.display()))
}

/// Runs a `volume` subcommand.
pub fn volume(cmd: VolumeCmd) -> Result<ExitCode> {
    let store = open()?;
    match cmd {
        VolumeCmd::Create { size, name } => {
            store.create(&name, size)?;
            println!("{name}");
        }
        VolumeCmd::Ls => {
            println!("{:<24} {:>10} {:>10}  IN USE", "NAME", "SIZE", "ON DISK");
            for v in store.list()? {
                println!("{:<24} {:>10} {:>10}  {}", v.name, human(v.size), human(v.allocated), yes_no(v.in_use));
            }
        }
        VolumeCmd::Inspect { names } => {
            let infos = names.iter().map(|n| store.inspect(n).map(|v| json(&v))).collect::<Result<Vec<_>, _>>()?;
            println!("{}", serde_json::to_string_pretty(&infos)?);
        }
        VolumeCmd::Rm { names } => {
            let mut failed = false;
            for name in &names {
                match store.remove(name) {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("supermachine: error: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::from(1));
            }
        }
        VolumeCmd::Prune(args) => {
            if !args.force && !confirm("This deletes every volume no running VM uses, with its data.")? {
                return Ok(ExitCode::SUCCESS);
            }
            let removed = store.prune()?;
            for name in &removed {
                println!("{name}");
            }
            eprintln!("supermachine: {} volume(s) deleted", removed.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What one `-v` names.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    /// A named volume.
    Volume(String),
    /// A host directory (as typed; resolved later).
    HostDir(String),
}

/// Resolves `run -v` arguments: `NAME:PATH[:ro|:rw]` names a volume, created
/// (8 GiB, sparse) when it does not exist; `/DIR:PATH` or `./DIR:PATH` shares
/// an existing host directory.
pub fn mounts(specs: &[String]) -> Result<(Vec<VolumeMount>, Vec<ShareMount>)> {
    let mut volumes: Vec<VolumeMount> = Vec::new();
    let mut shares: Vec<ShareMount> = Vec::new();
    let mut guest_paths: Vec<String> = Vec::new();
    for spec in specs {
        let (source, guest_path, MountOptions { read_only, dax }) = parse_mount(spec)?;
        if guest_paths.contains(&guest_path) {
            bail!("-v {spec}: {guest_path} is mounted twice");
        }
        guest_paths.push(guest_path.clone());
        let name = match source {
            Source::HostDir(dir) => {
                let host_dir = std::fs::canonicalize(&dir)
                    .with_context(|| format!("-v {spec}: the host directory {dir} (it must exist)"))?;
                if !host_dir.is_dir() {
                    bail!("-v {spec}: {} is not a directory (only directories can be shared)", host_dir.display());
                }
                shares.push(ShareMount { host_dir, guest_path, read_only, dax });
                continue;
            }
            Source::Volume(name) => name,
        };
        let store = open()?;
        let (info, created) =
            store.get_or_create(&name, DEFAULT_VOLUME_SIZE).with_context(|| format!("-v {spec}: the volume {name}"))?;
        if created {
            eprintln!("supermachine: created volume {name} ({})", human(info.size));
        }
        if volumes.iter().any(|m| m.path == info.path) {
            bail!("-v {spec}: the volume {name} is mounted twice (one disk cannot be attached twice)");
        }
        volumes.push(VolumeMount { path: info.path, guest_path, read_only });
    }
    Ok((volumes, shares))
}

/// `NAME:PATH[:ro|:rw]` or `DIR:PATH[:ro|:rw]` -> (source, path, read-only).
fn parse_mount(spec: &str) -> Result<(Source, String, MountOptions)> {
    let mut parts = spec.split(':');
    let (Some(name), Some(path)) = (parts.next(), parts.next()) else {
        bail!("-v {spec}: expected NAME:PATH[:ro] (a named volume and where the guest sees it)");
    };
    let (mut read_only, mut dax) = (false, false);
    for option in parts.next().map(|o| o.split(',').collect::<Vec<_>>()).unwrap_or_default() {
        match option {
            "rw" => read_only = false,
            "ro" => read_only = true,
            "dax" => dax = true,
            other => bail!("-v {spec}: unknown option {other:?} (ro, rw, dax; comma-separated)"),
        }
    }
    if parts.next().is_some() {
        bail!("-v {spec}: expected NAME:PATH[:OPTIONS]");
    }
    if !path.starts_with('/') || path == "/" || path.split('/').any(|c| c == "..") {
        bail!("-v {spec}: the guest path must be absolute, not / and without ..");
    }
    let source = if name.starts_with('/') || name.starts_with('.') {
        Source::HostDir(name.to_string())
    } else if name.starts_with('~') {
        bail!("-v {spec}: ~ is not expanded here; give the host directory as an absolute path");
    } else {
        sm_api::volume::validate_name(name).with_context(|| format!("-v {spec}"))?;
        Source::Volume(name.to_string())
    };
    if dax && matches!(source, Source::Volume(_)) {
        bail!("-v {spec}: dax is for shared host directories, not volumes");
    }
    Ok((source, path.trim_end_matches('/').to_string(), MountOptions { read_only, dax }))
}

/// The options after a `-v` spec's second colon.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct MountOptions {
    read_only: bool,
    dax: bool,
}

/// `512M`, `8G`, `1T`, `4096` (bytes), `1.5G`.
fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size: use e.g. 512M, 8G or a number of bytes");
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn json(v: &VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "Name": v.name,
        "Mountpoint": v.path,
        "Driver": "ext4 image on virtio-blk",
        "Size": v.size,
        "Allocated": v.allocated,
        "InUse": v.in_use,
    })
}

/// Asks y/N on the terminal; without one, refuses (use --force).
fn confirm(what: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("{what} Give --force to do it without a terminal to confirm on");
    }
    eprint!("{what} Continue? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_like_docker_run_v() {
        let vol = |n: &str| Source::Volume(n.into());
        let (rw, ro) = (MountOptions { read_only: false, dax: false }, MountOptions { read_only: true, dax: false });
        assert_eq!(parse_mount("data:/data").unwrap(), (vol("data"), "/data".into(), rw));
        assert_eq!(parse_mount("cache:/var/cache/:ro").unwrap(), (vol("cache"), "/var/cache".into(), ro));
        assert_eq!(parse_mount("d:/x:rw").unwrap(), (vol("d"), "/x".into(), rw));
        assert_eq!(parse_mount("/srv/src:/src:ro").unwrap(), (Source::HostDir("/srv/src".into()), "/src".into(), ro));
        assert_eq!(parse_mount("./dir:/x").unwrap(), (Source::HostDir("./dir".into()), "/x".into(), rw));
        assert_eq!(
            parse_mount("/srv:/s:ro,dax").unwrap(),
            (Source::HostDir("/srv".into()), "/s".into(), MountOptions { read_only: true, dax: true })
        );
        for (bad, says) in [
            ("data", "NAME:PATH"),
            ("data:rel", "absolute"),
            ("data:/", "absolute"),
            ("data:/a/../b", "without .."),
            ("data:/x:rx", "unknown option"),
            ("data:/x:dax", "not volumes"),
            ("/srv:/x:ro,,", "unknown option"),
            ("~/dir:/x", "absolute path"),
            ("bad name:/x", "not a volume name"),
        ] {
            let err = format!("{:#}", parse_mount(bad).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "-1G", "8X", "nan", "1e30T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
