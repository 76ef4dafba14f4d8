//! `cargo xtask bench exec`: exec round trip, stdout throughput through vsock and
//! virtio-blk sequential direct I/O of supermachine, and — where QEMU has a
//! counterpart (guest pipe, blk) — the same guest commands in QEMU microvm on the
//! same kernel, busybox and disk file. Printed, not asserted.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bench_compare::{
    job_seconds, jobs_console, print_comparison, qemu_running_script, run_sm_bench, timed_jobs_script,
};
use crate::child::run_until_marker;
use crate::{agent, bench, kernel, paths};

const MEMORY_MIB: u64 = 128;
const DISK_MIB: u64 = 64;
const QEMU_TIMEOUT: Duration = Duration::from_secs(900);
const DONE_MARKER: &str = "SM_BENCH_DONE";

/// The guest commands both VMMs time (busybox `time`, guest clock). They must
/// match `sm-bench exec`'s.
fn guest_jobs() -> [(&'static str, String); 3] {
    [
        (
            "guest pipe 4 MiB MiB/s",
            "dd if=/dev/zero bs=65536 count=64 2>/dev/null | dd of=/dev/null bs=65536 2>/dev/null".into(),
        ),
        (
            "blk write MiB/s",
            format!("dd if=/dev/zero of=/dev/vda bs=1048576 count={DISK_MIB} oflag=direct 2>/dev/null"),
        ),
        ("blk read MiB/s", format!("dd if=/dev/vda of=/dev/null bs=1048576 count={DISK_MIB} iflag=direct 2>/dev/null")),
    ]
}

/// Runs the benchmark.
pub fn run(runs: usize, big_mib: u64) -> Result<()> {
    let vmlinux = kernel::build(false)?;
    let initrd = agent::build_initrd()?;
    let ours = bench::build_release_bench()?;
    let work = paths::guest_dir().join("bench-exec");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let disk = work.join("disk.img");
    let f = std::fs::File::create(&disk).with_context(|| format!("creating {}", disk.display()))?;
    f.set_len(DISK_MIB << 20).with_context(|| format!("sizing {}", disk.display()))?;
    drop(f);
    println!(
        "exec benchmark: 1 vCPU, {MEMORY_MIB} MiB, agent initrd with busybox, {DISK_MIB} MiB raw disk; \
         {runs} round trips, stdout 1 and {big_mib} MiB"
    );

    println!("supermachine (progress below) ...");
    let jobs = guest_jobs();
    let mut cmd = Command::new(&ours);
    cmd.args(["exec", "--runs", &runs.to_string(), "--big-mib", &big_mib.to_string()]);
    for (_, job) in &jobs {
        cmd.arg("--job").arg(job);
    }
    cmd.arg("--kernel").arg(&vmlinux).arg("--initrd").arg(&initrd).arg("--disk").arg(&disk);
    let out = run_sm_bench(cmd, "sm-bench exec")?;
    let mut ours_m = out.values;
    ours_m.extend(parse_job_times(&out.job_console, &jobs));

    let qemu_m = if bench::have_qemu() {
        println!("qemu-microvm: same kernel, busybox and disk; the jobs run from a shell script as init ...");
        match qemu(&work, &vmlinux, &initrd, &disk) {
            Ok(m) => m,
            Err(e) => {
                println!("qemu-microvm: failed: {e:#}");
                Vec::new()
            }
        }
    } else {
        println!("qemu-system-x86_64: not installed (apt-get install qemu-system-x86), skipped");
        Vec::new()
    };

    print_comparison(&ours_m, &qemu_m, 44);
    println!(
        "(exec and stdout rows have no QEMU counterpart: QEMU has no guest agent. \
         \"guest pipe\" is the guest kernel's own copy speed: on an emulated guest kernel it bounds stdout throughput.)"
    );
    Ok(())
}

/// Boots QEMU microvm with a shell script running the jobs as init (the agent
/// initrd plus one appended cpio member, `/bench.sh`); returns MiB/s per job.
fn qemu(work: &Path, vmlinux: &Path, initrd: &Path, disk: &Path) -> Result<Vec<(String, f64)>> {
    let jobs = guest_jobs();
    let script = timed_jobs_script(
        "mount -t devtmpfs dev /dev\nmount -t proc proc /proc\n",
        jobs.iter().map(|(_, job)| job.as_str()),
        &format!("echo {DONE_MARKER}\nreboot -f\n"),
    );
    let mut cmd = qemu_running_script(vmlinux, initrd, &script, &work.join("qemu-initrd.cpio"), MEMORY_MIB)?;
    cmd.arg("-drive")
        .arg(format!("id=disk0,file={},format=raw,if=none", disk.display()))
        .args(["-device", "virtio-blk-device,drive=disk0"]);
    let r = run_until_marker(cmd, DONE_MARKER, QEMU_TIMEOUT, Duration::from_secs(5))?;
    Ok(parse_job_times(&jobs_console(r, DONE_MARKER, QEMU_TIMEOUT)?, &jobs))
}

/// MiB/s of each job in `console` (the guest pipe moves 4 MiB, the disk jobs
/// the whole disk).
fn parse_job_times(console: &str, jobs: &[(&str, String)]) -> Vec<(String, f64)> {
    job_seconds(console)
        .into_iter()
        .filter_map(|(i, secs)| {
            let (key, _) = jobs.get(i)?;
            let mib = if i == 0 { 4.0 } else { DISK_MIB as f64 };
            Some((key.to_string(), mib / secs))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_console_job_times_are_paired_with_their_markers() {
        let jobs = guest_jobs();
        let got = parse_job_times(crate::bench_compare::SAMPLE_CONSOLE, &jobs);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], ("guest pipe 4 MiB MiB/s".to_string(), 2.0));
        assert_eq!(got[1].1, DISK_MIB as f64 / 64.0);
        assert_eq!(got[2].1, DISK_MIB as f64 / 8.0);
    }
}
