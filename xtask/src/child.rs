//! Runs a VMM as a child process and timestamps its console output.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What one run of a VMM process showed.
#[derive(Debug, Clone, Default)]
pub struct ChildRun {
    /// Spawn -> first byte on stdout.
    pub first_byte: Option<Duration>,
    /// Spawn -> the line containing the marker.
    pub marker: Option<Duration>,
    /// Peak resident set size of the process (ru_maxrss), KiB.
    pub peak_rss_kib: Option<u64>,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

/// Spawns `cmd` (stdout and stderr captured), waits for `marker` on stdout, then
/// gives it `linger` to exit by itself before killing its process group.
pub fn run_until_marker(mut cmd: Command, marker: &str, timeout: Duration, linger: Duration) -> Result<ChildRun> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let program = format!("{:?}", cmd.get_program());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut out = child.stdout.take().context("child stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    let mut err = child.stderr.take().context("child stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });

    let mut run = ChildRun::default();
    let mut text: Vec<u8> = Vec::new();
    let mut deadline = start + timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((at, chunk)) => {
                run.first_byte.get_or_insert(at - start);
                text.extend_from_slice(&chunk);
                if run.marker.is_none() && String::from_utf8_lossy(&text).contains(marker) {
                    run.marker = Some(at - start);
                    deadline = Instant::now() + linger;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // SAFETY: plain syscalls on our own child's process group / pid.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid out-pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc == pid {
        run.peak_rss_kib = Some(usage.ru_maxrss as u64);
    }
    let _ = reader.join();
    run.stderr = err_reader.join().unwrap_or_default();
    run.stdout = String::from_utf8_lossy(&text).into_owned();
    Ok(run)
}

/// Median of `values` (None if empty).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) { (values[mid - 1] + values[mid]) / 2.0 } else { values[mid] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn times_a_marker_from_a_real_process() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; sleep 0.1; echo MARK; sleep 30"]);
        let run = run_until_marker(cmd, "MARK", Duration::from_secs(10), Duration::from_millis(10)).unwrap();
        let (first, marker) = (run.first_byte.unwrap(), run.marker.unwrap());
        assert!(marker >= first + Duration::from_millis(90), "{first:?} {marker:?}");
        assert!(run.stdout.contains("hello\nMARK"));
        assert!(run.peak_rss_kib.unwrap() > 0);
    }
}
