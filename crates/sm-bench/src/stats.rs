//! Small statistics and the guest-job timing shared by the benchmark drivers.

use std::time::Duration;

use anyhow::{Context, Result};
use sm_api::ExecOutcome;

/// This process's anonymous memory (KiB, from smaps_rollup); 0 if unreadable.
pub fn anonymous_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("Anonymous:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Milliseconds as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The median (upper middle for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Runs each job with busybox `time` through `exec` and prints its `real`
/// line as `bench-job: <index> <line>` (xtask pairs them with QEMU's).
pub fn time_guest_jobs(jobs: &[String], exec: impl Fn(&[&str]) -> Result<ExecOutcome>) -> Result<()> {
    for (i, job) in jobs.iter().enumerate() {
        eprintln!("guest job {i}: {job} ...");
        let out = exec(&["time", "sh", "-c", job])?;
        if !out.stdout.is_empty() {
            eprint!("{}", String::from_utf8_lossy(&out.stdout));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let real = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("real"))
            .with_context(|| format!("`time` printed no timing: {stderr}"))?;
        println!("bench-job: {i} {real}");
    }
    Ok(())
}
