//! `cargo xtask bench boot`: boot time and memory of supermachine side by side with
//! Firecracker and QEMU microvm, same kernel, initrd, command line and RAM size.
//! Printed, not asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::child::{median, run_until_marker, ChildRun};
use crate::{initrd, kernel, paths};

/// Printed by the test init once it runs.
const INIT_MARKER: &str = "SM_INIT_READY";
const MEMORY_MIB: u64 = 128;
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Builds the command line of one run, given a work directory for config files.
type CommandFactory = Box<dyn Fn(&Path) -> Result<Command>>;

/// One VMM under test.
struct Contender {
    name: &'static str,
    /// Builds the command for one run (workdir for config files).
    command: CommandFactory,
}

/// Runs the boot benchmark with `runs` boots per VMM.
pub fn boot(runs: usize) -> Result<()> {
    let vmlinux = kernel::build(false)?;
    let initrd = initrd::build()?;
    let cmdline = format!("{} -- reboot", sm_api::machine::DEFAULT_CMDLINE);
    let ours = build_release_cli()?;
    let work = paths::guest_dir().join("bench");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let mut contenders = vec![Contender {
        name: "supermachine",
        command: {
            let (k, i, c) = (vmlinux.clone(), initrd.clone(), cmdline.clone());
            Box::new(move |_| {
                let mut cmd = Command::new(&ours);
                cmd.args(["boot", "--timings", "--memory", &MEMORY_MIB.to_string(), "--cmdline", &c])
                    .arg("--kernel")
                    .arg(&k)
                    .arg("--initrd")
                    .arg(&i);
                Ok(cmd)
            })
        },
    }];
    let firecracker = paths::workspace_root().parent().map(|p| p.join("shared/anchors/firecracker"));
    match firecracker.filter(|p| p.is_file()) {
        Some(fc) => {
            let (k, i, c) = (vmlinux.clone(), initrd.clone(), cmdline.clone());
            contenders.push(Contender {
                name: "firecracker",
                command: Box::new(move |dir| {
                    let config = dir.join("firecracker.json");
                    let json = format!(
                        r#"{{"boot-source": {{"kernel_image_path": {k:?}, "initrd_path": {i:?}, "boot_args": {c:?}}},
 "drives": [], "network-interfaces": [],
 "machine-config": {{"vcpu_count": 1, "mem_size_mib": {MEMORY_MIB}, "smt": false}}}}"#,
                        k = k.display().to_string(),
                        i = i.display().to_string(),
                    );
                    std::fs::write(&config, json).with_context(|| format!("writing {}", config.display()))?;
                    let mut cmd = Command::new(&fc);
                    cmd.args(["--no-api", "--no-seccomp", "--level", "Error", "--config-file"]).arg(&config);
                    Ok(cmd)
                }),
            });
        }
        None => println!("firecracker: not found in ../shared/anchors, skipped"),
    }
    if have_qemu() {
        let (k, i, c) = (vmlinux.clone(), initrd.clone(), cmdline.clone());
        contenders.push(Contender {
            name: "qemu-microvm",
            command: Box::new(move |_| Ok(qemu_microvm(&k, &i, &c, MEMORY_MIB))),
        });
    } else {
        println!("qemu-system-x86_64: not installed (apt-get install qemu-system-x86), skipped");
    }

    println!("boot benchmark: {runs} run(s) each, 1 vCPU, {MEMORY_MIB} MiB, same vmlinux/initrd/cmdline");
    let mut rows = Vec::new();
    for c in &contenders {
        let mut results = Vec::new();
        for run in 0..runs {
            let r = run_until_marker((c.command)(&work)?, INIT_MARKER, BOOT_TIMEOUT, Duration::from_secs(5))?;
            if r.marker.is_none() {
                println!(
                    "{}: run {run}: no {INIT_MARKER} within {BOOT_TIMEOUT:?}; last output:\n{}\n{}",
                    c.name,
                    tail(&r.stdout, 15),
                    tail(&r.stderr, 5)
                );
            }
            results.push(r);
        }
        rows.push((c.name, results));
    }
    print_table(&rows);
    Ok(())
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Parses `timings: vm+vcpus created 1.2 ms` from our stderr.
fn created_ms(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.starts_with("timings: vm+vcpus created"))?;
    line.split_whitespace().rev().nth(1)?.parse().ok()
}

fn print_table(rows: &[(&str, Vec<ChildRun>)]) {
    type Metric = fn(&ChildRun) -> Option<f64>;
    let metrics: [(&str, Metric, &str); 4] = [
        ("VM+vCPU creation", |r| created_ms(&r.stderr), "ms"),
        ("first console byte", |r| r.first_byte.map(|d| d.as_secs_f64() * 1e3), "ms"),
        ("init runs", |r| r.marker.map(|d| d.as_secs_f64() * 1e3), "ms"),
        ("peak VMM RSS", |r| r.peak_rss_kib.map(|k| k as f64 / 1024.0), "MiB"),
    ];
    println!();
    print!("{:<20}", "median");
    for (name, _) in rows {
        print!("{name:>16}");
    }
    for (name, _) in rows.iter().skip(1) {
        print!("{:>18}", format!("{name}/ours"));
    }
    println!();
    for (label, metric, unit) in metrics {
        print!("{:<20}", format!("{label} ({unit})"));
        let medians: Vec<Option<f64>> =
            rows.iter().map(|(_, runs)| median(&mut runs.iter().filter_map(metric).collect::<Vec<_>>())).collect();
        for m in &medians {
            print!("{:>16}", m.map_or("n/a".into(), |v| format!("{v:.1}")));
        }
        for m in medians.iter().skip(1) {
            let ratio = match (m, medians[0]) {
                (Some(x), Some(o)) if o > 0.0 => format!("{:.2}x", x / o),
                _ => "n/a".into(),
            };
            print!("{ratio:>18}");
        }
        println!();
    }
}

/// QEMU `-M microvm` booting `kernel` + `initrd` with `cmdline` on one vCPU, the
/// serial console on stdout; add devices to the returned command.
pub fn qemu_microvm(kernel: &Path, initrd: &Path, cmdline: &str, memory_mib: u64) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        // acpi=off: the guest kernel has no ACPI; QEMU then lists its virtio-mmio
        // devices on the kernel command line, as we do.
        "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
        "-accel",
        "kvm",
        "-cpu",
        // kvm_pvm refuses IA32_ARCH_CAPABILITIES writes; harmless elsewhere.
        "host,arch-capabilities=off",
        "-m",
        &memory_mib.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-append",
        cmdline,
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd);
    cmd
}

/// Whether QEMU is installed.
pub fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64").arg("--version").output().is_ok()
}

/// Builds the release `supermachine` binary; returns its path.
pub fn build_release_cli() -> Result<PathBuf> {
    build_release("sm-cli", "supermachine")
}

/// Builds the release `sm-bench` binary (the measuring halves of `bench
/// snapshot` and `bench exec`); returns its path.
pub fn build_release_bench() -> Result<PathBuf> {
    build_release("sm-bench", "sm-bench")
}

/// Builds the release `sm-fuzz` binary (`cargo xtask fuzz`); returns its path.
pub fn build_release_fuzz() -> Result<PathBuf> {
    build_release("sm-fuzz", "sm-fuzz")
}

/// Builds the release `binary` of `package`; returns its path.
pub fn build_release(package: &str, binary: &str) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(paths::workspace_root())
        .args(["build", "--release", "--quiet", "-p", package])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the release {binary} binary failed");
    }
    Ok(paths::workspace_root().join("target/release").join(binary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_creation_time_from_cli_timings() {
        let stderr = "noise\ntimings: vm+vcpus created 3.4 ms\ntimings: first console byte 2000.0 ms\n";
        assert_eq!(created_ms(stderr), Some(3.4));
        assert_eq!(created_ms("nothing"), None);
    }
}
