//! `cargo xtask test` (everything) and `cargo xtask test-kvm` (the KVM suite).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{agent, apt, disk, initrd, kernel, paths};

fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Whether this host can run KVM guests; explains why not otherwise.
fn kvm_usable() -> std::result::Result<(), String> {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Err("/dev/kvm does not exist: this host has no KVM".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm cannot be opened ({e}): add your user to the kvm group or run as root"))
}

pub(crate) fn cargo(args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(paths::workspace_root()).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Decides whether the KVM suite runs: Ok(true) run it, Ok(false) skip with the
/// reason printed, Err when skipping is not allowed (CI=true).
fn kvm_gate() -> Result<bool> {
    match kvm_usable() {
        Ok(()) => Ok(true),
        Err(why) if in_ci() => bail!("{why}; the KVM suite cannot run and CI=true forbids skipping it"),
        Err(why) => {
            eprintln!("xtask: {why}; KVM tests are SKIPPED (they run on a host with /dev/kvm)");
            Ok(false)
        }
    }
}

/// Builds what the KVM tests use: the guest kernel, the test and agent initrds,
/// target/debug/supermachine (driven by the CLI tests) and the containerd
/// shim (driven by the containerd tests).
fn prepare_guest() -> Result<()> {
    kernel::build(false)?;
    initrd::build()?;
    agent::build_initrd()?;
    cargo(&["build", "-p", "sm-cli", "-p", "sm-shim"], &[])
}

/// What the tests need from apt: the guest kernel build, the guest userland
/// (busybox), the image tests (a real registry, skopeo, htpasswd, mkfs tools),
/// the shim tests (containerd, and `script` for a terminal), the aarch64
/// device tree test (`dtc`) and the Debian+python3 test image (debootstrap,
/// checked with the archive keyring).
const TEST_PACKAGES: &[&str] = &[
    "linux-source-6.1",
    "bc",
    "bison",
    "build-essential",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "patch",
    "tar",
    "xz-utils",
    "cpio",
    "busybox-static",
    "docker-registry",
    "skopeo",
    "apache2-utils",
    "squashfs-tools",
    "erofs-utils",
    "e2fsprogs",
    "openssl",
    "debootstrap",
    "debian-archive-keyring",
    "gzip",
    "umoci",
    "libcap2-bin",
    "passt",
    "curl",
    "iproute2",
    "dnsmasq-base",
    "containerd",
    "bsdutils",
    "device-tree-compiler",
];

/// Installs (apt, as root) what the tests need and the clippy component.
fn ensure_tools() -> Result<()> {
    apt::ensure(TEST_PACKAGES, "`cargo xtask test`")?;
    let rustup = Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]).status();
    if !matches!(rustup, Ok(s) if s.success()) {
        eprintln!("xtask: `rustup component add clippy rustfmt` did not succeed; using whatever is installed");
    }
    Ok(())
}

/// Lints, builds the guest artifacts and runs every test of the workspace.
pub fn all() -> Result<()> {
    disk::ensure_room()?;
    ensure_tools()?;
    cargo(&["fmt", "--all", "--check"], &[])?;
    cargo(&["fmt", "--check", "--manifest-path", "guest/testinit/Cargo.toml"], &[])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"], &[])?;
    check_hvf()?;
    let kvm = kvm_gate()?;
    if kvm {
        prepare_guest()?;
    }
    let require = if kvm { "1" } else { "0" };
    // Guests are CPU-hungry (their kernel may be emulated): two test threads.
    cargo(&["test", "--workspace", "--no-fail-fast", "--", "--test-threads=2"], &[("SM_REQUIRE_KVM", require)])
}

/// The macOS target the Hypervisor.framework backend is for.
const MAC_TARGET: &str = "aarch64-apple-darwin";
/// The crates that already build for it (sm-virtio's eventfd/epoll device
/// workers, and what depends on them, come next).
const MAC_CRATES: &[&str] = &["sm-hypervisor", "sm-snapshot", "sm-hvf"];

/// Type-checks sm-hvf's Hypervisor.framework calls (clippy, which never
/// links: the framework exists only on macOS): for this host with the
/// `typecheck` feature, and for aarch64-apple-darwin itself — the real
/// macOS cfgs — together with the other crates that build there. The
/// backend's host-independent parts are tested with the workspace.
pub fn check_hvf() -> Result<()> {
    cargo(
        &["clippy", "-p", "sm-hvf", "--features", "typecheck", "--all-targets", "--quiet", "--", "-D", "warnings"],
        &[],
    )?;
    let added = Command::new("rustup").args(["target", "add", MAC_TARGET]).status();
    if !matches!(added, Ok(s) if s.success()) {
        bail!(
            "`rustup target add {MAC_TARGET}` failed ({added:?}): the macOS type-check needs that target's standard \
             library (rustup downloads it from static.rust-lang.org)"
        );
    }
    let mut args = vec!["clippy", "--target", MAC_TARGET, "--all-targets", "--quiet"];
    for c in MAC_CRATES {
        args.extend(["-p", c]);
    }
    args.extend(["--", "-D", "warnings"]);
    cargo(&args, &[])
}

/// Runs the KVM suites: the VMM-level tests of sm-vmm (stub guests and the
/// real kernel) and the end-to-end tests of sm-tests.
pub fn kvm() -> Result<()> {
    if !kvm_gate()? {
        return Ok(());
    }
    prepare_guest()?;
    cargo(
        &["test", "-p", "sm-tests", "-p", "sm-vmm", "--no-fail-fast", "--", "--test-threads=2"],
        &[("SM_REQUIRE_KVM", "1")],
    )
}

/// The long form of the data-integrity stress test (`SM_SOAK=1`: 1000 payloads
/// of 1 B .. 256 KiB plus 10 of 4 MiB through each path); KVM required.
pub fn soak() -> Result<()> {
    let kvm = kvm_usable();
    if let Err(why) = kvm {
        bail!("{why}; the soak runs real guests and needs KVM");
    }
    ensure_tools()?;
    prepare_guest()?;
    cargo(
        &["test", "-p", "sm-tests", "--test", "data_integrity", "--", "--test-threads=1", "--nocapture"],
        &[("SM_REQUIRE_KVM", "1"), ("SM_SOAK", "1")],
    )
}
