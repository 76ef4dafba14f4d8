//! What the side-by-side benchmarks (`bench exec`, `bench fs`, `bench net`) share: an
//! `sm-bench` run and its printed lines, a QEMU initrd whose init is a
//! script, the guest job times on a console, and the comparison table.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::initrd;

/// What `sm-bench SUBCOMMAND` printed: its `bench: <key> <value>` values,
/// and its `bench-job: <i> <real line>` lines in the shape of a QEMU console
/// (`SM_JOB <i>` then the busybox `real` line) for [`job_seconds`].
pub struct SmBenchOutput {
    pub values: Vec<(String, f64)>,
    pub job_console: String,
}

/// Runs `cmd` (an `sm-bench` subcommand; its stderr, the progress, goes
/// through) and collects what it printed.
pub fn run_sm_bench(mut cmd: Command, what: &str) -> Result<SmBenchOutput> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed (its error is above)");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let values = stdout
        .lines()
        .filter_map(|l| {
            let (key, value) = l.strip_prefix("bench: ")?.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect();
    let job_console = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("bench-job: "))
        .map(|l| {
            let (i, real) = l.split_once(' ').unwrap_or((l, ""));
            format!("SM_JOB {i}\n{real}\n")
        })
        .collect();
    Ok(SmBenchOutput { values, job_console })
}

/// Writes `initrd` plus `/bench.sh` (`script`, executable) to `out`: the
/// kernel unpacks concatenated cpio archives in order.
fn initrd_with_script(initrd: &Path, script: &str, out: &Path) -> Result<()> {
    let mut archive = std::fs::read(initrd).with_context(|| format!("reading {}", initrd.display()))?;
    archive.extend(initrd::write_newc(&[initrd::Entry {
        name: "bench.sh",
        mode: initrd::S_IFREG | 0o755,
        rdev: (0, 0),
        data: script.as_bytes(),
    }]));
    std::fs::write(out, archive).with_context(|| format!("writing {}", out.display()))
}

/// A QEMU guest's init script: `prelude`, then each job timed with busybox
/// `time` after an `SM_JOB <i>` marker (and `SM_JOB_FAILED <i>` if it
/// fails), then `tail`. A job is run inside single quotes: it must hold none.
pub fn timed_jobs_script<'a>(prelude: &str, jobs: impl IntoIterator<Item = &'a str>, tail: &str) -> String {
    let mut script = format!("#!/bin/sh\n{prelude}");
    for (i, job) in jobs.into_iter().enumerate() {
        script.push_str(&format!("echo SM_JOB {i}\ntime sh -c '{job}' || echo SM_JOB_FAILED {i}\n"));
    }
    script.push_str(tail);
    script
}

/// QEMU microvm (see [`crate::bench::qemu_microvm`]) booting `vmlinux` with
/// `initrd` plus `script` as `/bench.sh`, its init (the combined initrd is
/// written to `initrd_out`).
pub fn qemu_running_script(
    vmlinux: &Path,
    initrd: &Path,
    script: &str,
    initrd_out: &Path,
    memory_mib: u64,
) -> Result<Command> {
    initrd_with_script(initrd, script, initrd_out)?;
    // No `--` on this command line: QEMU appends its virtio_mmio.device= entries
    // at the end, where the kernel would hand them to init instead.
    let cmdline = format!("{} rdinit=/bench.sh", sm_api::machine::DEFAULT_CMDLINE);
    Ok(crate::bench::qemu_microvm(vmlinux, initrd_out, &cmdline, memory_mib))
}

/// `(job index, seconds)` from each `SM_JOB <i>` marker and the busybox
/// `real` line after it.
pub fn job_seconds(console: &str) -> Vec<(usize, f64)> {
    let mut current = None;
    let mut out = Vec::new();
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(i) = line.strip_prefix("SM_JOB ").and_then(|i| i.trim().parse::<usize>().ok()) {
            current = Some(i);
        } else if let (Some(i), Some(secs)) = (current, busybox_real_seconds(line)) {
            out.push((i, secs));
            current = None;
        }
    }
    out
}

/// Seconds from busybox `time`'s "real\t1m 2.34s" line.
pub fn busybox_real_seconds(line: &str) -> Option<f64> {
    let rest = line.strip_prefix("real")?.trim();
    let (minutes, seconds) = rest.split_once('m')?;
    Some(minutes.trim().parse::<f64>().ok()? * 60.0 + seconds.trim().trim_end_matches('s').parse::<f64>().ok()?)
}

/// The console of a QEMU run whose script ran its jobs: an error when the
/// `marker` never came (within `timeout`) or a job printed `SM_JOB_FAILED`.
pub fn jobs_console(r: crate::child::ChildRun, marker: &str, timeout: std::time::Duration) -> Result<String> {
    if r.marker.is_none() {
        bail!("no {marker} within {timeout:?}; last output:\n{}", console_tail(&r.stdout));
    }
    if r.stdout.contains("SM_JOB_FAILED") {
        bail!("a guest job failed; console:\n{}", console_tail(&r.stdout));
    }
    Ok(r.stdout)
}

/// The last lines of a console, for an error.
pub fn console_tail(stdout: &str) -> String {
    let lines: Vec<&str> = stdout.lines().rev().take(15).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Our values beside QEMU's, with the ratio qemu/ours.
pub fn print_comparison(ours: &[(String, f64)], qemu: &[(String, f64)], key_width: usize) {
    println!();
    println!("{:<key_width$}{:>14}{:>14}{:>12}", "median", "supermachine", "qemu-microvm", "qemu/ours");
    for (key, value) in ours {
        let q = qemu.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
        let ratio = q.filter(|_| *value > 0.0).map_or("n/a".into(), |q| format!("{:.2}x", q / value));
        println!("{key:<key_width$}{value:>14.2}{:>14}{ratio:>12}", q.map_or("n/a".into(), |q| format!("{q:.2}")));
    }
}

/// A QEMU console with three timed jobs (2 s, 1 min 4 s, 8 s), for tests.
#[cfg(test)]
pub const SAMPLE_CONSOLE: &str = "[    1.0] Run /bin/sh as init process\r\nSM_JOB 0\r\nreal\t0m 2.00s\r\n\
                                  user\t0m 0.00s\r\nSM_JOB 1\nreal\t1m 4.00s\nSM_JOB 2\nreal\t0m 8.00s\n\
                                  SM_BENCH_DONE\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_job_times_are_paired_with_their_markers() {
        assert_eq!(job_seconds(SAMPLE_CONSOLE), vec![(0, 2.0), (1, 64.0), (2, 8.0)]);
    }
}
