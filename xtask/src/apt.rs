//! apt packages the xtask commands need: checked with dpkg-query, installed
//! (as root) only when something is missing.

use std::fs;
use std::process::{Command, ExitStatus};

use anyhow::{bail, Context, Result};

/// `packages` that dpkg does not report as installed.
fn missing_packages(packages: &[&'static str], purpose: &str) -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Abbrev}\n")
        .args(packages)
        .output()
        .with_context(|| format!("running dpkg-query: {purpose} needs a Debian/Ubuntu host with dpkg and apt"))?;
    // Exit status 1 just means some package is unknown; the list tells which.
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|l| {
            let (name, status) = l.split_once(' ')?;
            status.starts_with("ii").then_some(name.split(':').next().unwrap_or(name))
        })
        .collect();
    Ok(packages.iter().copied().filter(|p| !installed.contains(p)).collect())
}

fn is_root() -> bool {
    // Effective uid is the second field of the `Uid:` line.
    fs::read_to_string("/proc/self/status").ok().is_some_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
            .unwrap_or(false)
    })
}

fn apt_get(args: &[&str]) -> Result<ExitStatus> {
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("running apt-get {}", args.join(" ")))
}

/// Makes sure `packages` are installed, installing the missing ones when
/// running as root; otherwise says what to install for `purpose`.
pub fn ensure(packages: &[&'static str], purpose: &str) -> Result<()> {
    let missing = missing_packages(packages, purpose)?;
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "{purpose} needs these apt packages, which are not installed: {list}\n\
             install them as root (`sudo apt-get install -y {list}`) or run this command as root"
        );
    }
    eprintln!("xtask: installing missing apt packages for {purpose}: {list}");
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    if !apt_get(&install)?.success() {
        eprintln!("xtask: apt-get install failed; running apt-get update and retrying");
        if !apt_get(&["update"])?.success() {
            bail!("`apt-get update` failed: check the apt sources and the network");
        }
        if !apt_get(&install)?.success() {
            bail!("`apt-get install -y {list}` failed (see apt's output above)");
        }
    }
    let still = missing_packages(packages, purpose)?;
    if !still.is_empty() {
        bail!("apt-get reported success but these packages are still missing: {}", still.join(" "));
    }
    Ok(())
}
