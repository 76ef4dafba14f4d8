//! `cargo xtask bench snapshot`: snapshot create, restore -> running, restore ->
//! first guest output at several snapshot ages, reset in place and private memory
//! per restored VM — side by side with Firecracker's snapshot load of the same
//! kernel and initrd (../shared/anchors/fc_snapshot.py) — then, with the agent
//! guest, restore -> first exec output, a diff snapshot and warm pool acquire.
//! Printed, not asserted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{bench, initrd, kernel, paths};

/// The test init's `tick` interval (guest/testinit).
const TICK_INTERVAL_MS: f64 = 100.0;
const MEMORY_MIB: u64 = 256;

/// Runs the benchmark; `ages` in seconds.
pub fn run(restores: usize, ages: &[u64]) -> Result<()> {
    let vmlinux = kernel::build(false)?;
    let initrd = initrd::build()?;
    let agent_initrd = crate::agent::build_initrd()?;
    let ours = bench::build_release_bench()?;
    let work = paths::guest_dir().join("bench-snapshot");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let ages_arg = ages.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    println!("snapshot benchmark: 1 vCPU, {MEMORY_MIB} MiB, test init ticking every 100 ms; {restores} restores per age ({ages_arg} s)");

    let out = Command::new(&ours)
        .args([
            "snapshot",
            "--memory",
            &MEMORY_MIB.to_string(),
            "--restores",
            &restores.to_string(),
            "--ages",
            &ages_arg,
        ])
        .arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--dir")
        .arg(work.join("ours"))
        .arg("--agent-initrd")
        .arg(&agent_initrd)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running sm-bench snapshot")?;
    if !out.status.success() {
        bail!("sm-bench snapshot failed (its error is above)");
    }
    let mut ours_m: BTreeMap<String, f64> = BTreeMap::new();
    let mut reals: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `bench-real: <key> <busybox real line>`: medians in ms below.
        if let Some((key, real)) = line.strip_prefix("bench-real: ").and_then(|r| r.split_once(" real")) {
            if let Some(secs) = crate::bench_compare::busybox_real_seconds(&format!("real{real}")) {
                reals.entry(key.to_string()).or_default().push(secs * 1e3);
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("bench: ") else { continue };
        let parts: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(value), true) = (parts.last().and_then(|v| v.parse::<f64>().ok()), parts.len() >= 2) {
            ours_m.insert(parts[..parts.len() - 1].join(" "), value);
        } else {
            println!("  {rest}");
        }
    }

    for (key, mut values) in reals {
        if let Some(m) = crate::child::median(&mut values) {
            ours_m.insert(key, m);
        }
    }

    let mut fc_m: BTreeMap<String, f64> = BTreeMap::new();
    let anchors = paths::workspace_root().parent().map(|p| p.join("shared/anchors"));
    match anchors.filter(|a| a.join("firecracker").is_file() && a.join("fc_snapshot.py").is_file()) {
        None => println!("firecracker: not in ../shared/anchors, skipped"),
        Some(anchors) => {
            let config = write_firecracker_tick_config(&work, &vmlinux, &initrd, MEMORY_MIB)?;
            for age in ages {
                let runs = if *age == 0 { restores } else { 1 };
                let out = Command::new("python3")
                    .arg(anchors.join("fc_snapshot.py"))
                    .arg(anchors.join("firecracker"))
                    .arg(&config)
                    .arg(work.join(format!("fc-{age}")))
                    .env("RESTORES", runs.to_string())
                    .env("RESTORE_DELAY_S", age.to_string())
                    .env("TICK_TIMEOUT_S", "60")
                    .output()
                    .context("running fc_snapshot.py")?;
                let text = String::from_utf8_lossy(&out.stdout);
                let mut running = Vec::new();
                let mut output = Vec::new();
                for line in text.lines() {
                    let l = line.trim().trim_end_matches(',');
                    let num = |key: &str| l.strip_prefix(&format!("\"{key}\": ")).and_then(|v| v.parse::<f64>().ok());
                    if let Some(v) = num("create_s") {
                        fc_m.insert("snapshot_create_ms".into(), v * 1e3);
                    }
                    if let Some(v) = num("mem_file_allocated_bytes") {
                        fc_m.insert("snapshot_allocated_bytes".into(), v);
                    }
                    if let Some(v) = num("spawn_to_resumed_s") {
                        running.push(v * 1e3);
                    }
                    if let Some(v) = num("load_start_to_next_tick_s") {
                        output.push(v * 1e3);
                    }
                }
                if let Some(m) = crate::child::median(&mut running) {
                    fc_m.insert(format!("restore_running_ms age={age}"), m);
                }
                match crate::child::median(&mut output) {
                    Some(m) => {
                        fc_m.insert(format!("restore_first_output_ms age={age}"), m);
                    }
                    None => println!("firecracker: no guest output after restore at age {age} s (within 60 s)"),
                }
            }
        }
    }

    add_past_tick_rows(&mut ours_m);
    add_past_tick_rows(&mut fc_m);
    println!();
    println!("{:<40}{:>16}{:>16}{:>14}", "median", "supermachine", "firecracker", "fc/ours");
    for (key, value) in &ours_m {
        let fc = fc_m.get(key);
        let ratio = fc.filter(|_| *value > 0.0).map_or("n/a".to_string(), |f| format!("{:.1}x", f / value));
        println!("{key:<40}{value:>16.3}{:>16}{ratio:>14}", fc.map_or("n/a".to_string(), |f| format!("{f:.3}")));
    }
    Ok(())
}

/// The ticking guest prints every 100 ms and both snapshots are taken within
/// a few ms of `TICK 3`, so about 100 ms of "restore -> first output" is the
/// guest's own sleep left to run, the same for both VMMs. These rows take it
/// off, leaving what the restore itself costs on the way to output (timer
/// re-arm, wake-up, the guest's first-touch faults, the serial path).
fn add_past_tick_rows(figures: &mut BTreeMap<String, f64>) {
    let derived: Vec<(String, f64)> = figures
        .iter()
        .filter_map(|(k, v)| {
            let age = k.strip_prefix("restore_first_output_ms ")?;
            Some((format!("restore_output_past_100ms_tick {age}"), v - TICK_INTERVAL_MS))
        })
        .collect();
    figures.extend(derived);
}

/// Writes `fc.json` in `work`: Firecracker booting our kernel and the test
/// init ticking (`-- tick`) on our command line, 1 vCPU, `memory_mib`.
pub fn write_firecracker_tick_config(work: &Path, vmlinux: &Path, initrd: &Path, memory_mib: u64) -> Result<PathBuf> {
    let config = work.join("fc.json");
    let cmdline = format!("{} -- tick", sm_api::machine::DEFAULT_CMDLINE);
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": {k:?}, "initrd_path": {i:?}, "boot_args": {cmdline:?}}},
 "drives": [], "network-interfaces": [],
 "machine-config": {{"vcpu_count": 1, "mem_size_mib": {memory_mib}, "smt": false}}}}"#,
            k = vmlinux.display().to_string(),
            i = initrd.display().to_string(),
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    Ok(config)
}
