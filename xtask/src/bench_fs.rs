//! `cargo xtask bench fs`: file I/O and metadata work in the guest on a
//! shared host directory (virtio-fs, without and with DAX) and on a named
//! volume (ext4 on virtio-blk), beside QEMU microvm sharing a directory over
//! 9p (`virtio-9p-device`, the `-virtfs` transport on virtio-mmio) with the
//! same kernel and busybox. The same shell jobs run in both, timed with
//! busybox `time`; medians over `--runs`, and the ratio 9p / virtio-fs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench_compare::{job_seconds, jobs_console, qemu_running_script, run_sm_bench, timed_jobs_script};
use crate::child::run_until_marker;
use crate::{agent, apt, bench, kernel, paths};

const MEMORY_MIB: u64 = 256;
const QEMU_TIMEOUT: Duration = Duration::from_secs(3600);
const DONE_MARKER: &str = "SM_FS_DONE";
/// Files in the tree that is untarred, found and listed.
const TREE_FILES: u32 = 200;
/// Random 4 KiB reads per run.
const RANDOM_READS: u32 = 100;

/// Where each system under test sees its file system in the guest.
const TARGETS: [(&str, &str); 3] = [("virtio-fs", "/fs"), ("virtio-fs+dax", "/dax"), ("volume", "/vol")];
const QEMU_TARGET: (&str, &str) = ("qemu 9p", "/9p");

/// What a job measures and how its seconds become the printed value.
#[derive(Clone, Copy)]
enum Measure {
    /// Not printed (set-up and clean-up).
    Untimed,
    /// `MiB / seconds`.
    MibPerSec(u64),
    /// `seconds * 1000 / count`.
    MsEach(u32),
    /// `seconds * 1000`.
    Ms,
}

/// The jobs for a file system mounted at `dir`: (label, shell command,
/// measure). No single quotes (the QEMU script quotes each job).
fn jobs(dir: &str, mib: u64) -> Vec<(String, String, Measure)> {
    let pages = mib * 256;
    vec![
        (
            format!("seq write {mib} MiB MiB/s"),
            format!(
                "dd if=/dev/zero of={dir}/seq bs=1048576 count={mib} conv=fsync 2>/dev/null && sync && \
                 echo 3 > /proc/sys/vm/drop_caches"
            ),
            Measure::MibPerSec(mib),
        ),
        (
            format!("seq read {mib} MiB MiB/s"),
            format!("dd if={dir}/seq of=/dev/null bs=1048576 2>/dev/null"),
            Measure::MibPerSec(mib),
        ),
        (
            "random 4 KiB read ms (a dd each)".into(),
            format!(
                "i=1; n=0; while [ $n -lt {RANDOM_READS} ]; do i=$(( (i * 1103515245 + 12345) % 2147483648 )); \
                 dd if={dir}/seq of=/dev/null bs=4096 count=1 skip=$(( i % {pages} )) 2>/dev/null || exit 1; \
                 n=$((n+1)); done"
            ),
            Measure::MsEach(RANDOM_READS),
        ),
        (
            format!("untar {TREE_FILES} files ms"),
            format!("mkdir -p {dir}/m && tar xf /tmp/tree.tar -C {dir}/m && sync && echo 3 > /proc/sys/vm/drop_caches"),
            Measure::Ms,
        ),
        (format!("find {TREE_FILES} files ms"), format!("find {dir}/m > /dev/null"), Measure::Ms),
        (format!("ls -lR {TREE_FILES} files ms"), format!("ls -lR {dir}/m > /dev/null"), Measure::Ms),
        (String::new(), format!("rm -rf {dir}/m {dir}/seq"), Measure::Untimed),
    ]
}

/// Makes the tree to untar, in the guest's tmpfs (once per VM, untimed).
fn tree_setup() -> String {
    format!(
        "mkdir -p /tmp/tree/a /tmp/tree/b && i=0; while [ $i -lt {TREE_FILES} ]; do \
         if [ $((i % 2)) -eq 0 ]; then d=a; else d=b; fi; echo file $i > /tmp/tree/$d/f$i; i=$((i+1)); done; \
         tar cf /tmp/tree.tar -C /tmp tree && rm -rf /tmp/tree"
    )
}

/// Every job of one VM: the set-up, then for each run and each target its jobs.
/// Returns the commands and, per command, `(target, label, measure)`.
fn plan(targets: &[(&str, &str)], mib: u64, runs: usize) -> (Vec<String>, Vec<(String, String, Measure)>) {
    let mut commands = vec![tree_setup()];
    let mut meaning = vec![(String::new(), String::new(), Measure::Untimed)];
    for _ in 0..runs {
        for (target, dir) in targets {
            for (label, command, measure) in jobs(dir, mib) {
                commands.push(command);
                meaning.push((target.to_string(), label, measure));
            }
        }
    }
    (commands, meaning)
}

/// `(target, label, value)` of each timed job found in `console`.
fn values(console: &str, meaning: &[(String, String, Measure)]) -> Vec<(String, String, f64)> {
    job_seconds(console)
        .into_iter()
        .filter_map(|(i, secs)| {
            let (target, label, measure) = meaning.get(i)?;
            let value = match *measure {
                Measure::Untimed => return None,
                Measure::MibPerSec(mib) => mib as f64 / secs.max(1e-3),
                Measure::MsEach(n) => secs * 1e3 / f64::from(n),
                Measure::Ms => secs * 1e3,
            };
            Some((target.clone(), label.clone(), value))
        })
        .collect()
}

fn median_of(all: &[(String, String, f64)], target: &str, label: &str) -> Option<f64> {
    let mut v: Vec<f64> = all.iter().filter(|(t, l, _)| t == target && l == label).map(|(_, _, x)| *x).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// Runs the benchmark.
pub fn run(runs: usize, mib: u64) -> Result<()> {
    apt::ensure(&["qemu-system-x86", "e2fsprogs"], "`cargo xtask bench fs`")?;
    let vmlinux = kernel::build(false)?;
    let initrd = agent::build_initrd()?;
    let ours = bench::build_release_bench()?;
    let work = paths::guest_dir().join("bench-fs");
    let _ = std::fs::remove_dir_all(&work);
    for d in ["fs", "dax", "9p"] {
        std::fs::create_dir_all(work.join(d)).with_context(|| format!("creating {}", work.join(d).display()))?;
    }
    let volume = work.join("volume.ext4");
    make_volume(&volume, mib)?;
    println!(
        "fs benchmark: 1 vCPU, {MEMORY_MIB} MiB, agent initrd with busybox; {mib} MiB files, {RANDOM_READS} random \
         reads, a tree of {TREE_FILES} files; median of {runs} run(s); host directories under {}",
        work.display()
    );

    println!("supermachine (progress below) ...");
    let (commands, meaning) = plan(&TARGETS, mib, runs);
    let mut cmd = Command::new(&ours);
    cmd.arg("fs").arg("--kernel").arg(&vmlinux).arg("--initrd").arg(&initrd);
    cmd.arg("--share").arg(work.join("fs")).arg("--dax-share").arg(work.join("dax")).arg("--volume").arg(&volume);
    cmd.args(["--memory-mib", &MEMORY_MIB.to_string()]);
    for c in &commands {
        cmd.arg("--job").arg(c);
    }
    let out = run_sm_bench(cmd, "sm-bench fs")?;
    let mut all = values(&out.job_console, &meaning);

    println!(
        "qemu-microvm with a 9p share (virtio-9p-device): same kernel and busybox; the jobs run from a script ..."
    );
    match qemu(&work, &vmlinux, &initrd, mib, runs) {
        Ok(v) => all.extend(v),
        Err(e) => println!("qemu-microvm: failed: {e:#}"),
    }

    print_table(&all, mib);
    for (name, value) in out.values {
        println!("{name}: {value:.1}");
    }
    println!(
        "(MiB/s: higher is better; ms: lower is better; 9p/virtio-fs above 1.0 for MiB/s, below 1.0 for ms, means \
         9p is faster. Guest-side times include the guest's own work, which is emulated on kvm_pvm hosts and \
         bounds every column alike.)"
    );
    Ok(())
}

fn print_table(all: &[(String, String, f64)], mib: u64) {
    let columns: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).chain([QEMU_TARGET.0]).collect();
    println!();
    print!("{:<34}", "median");
    for c in &columns {
        print!("{c:>15}");
    }
    println!("{:>14}", "9p/virtio-fs");
    for (label, _, _) in jobs("/x", mib).into_iter().filter(|(l, _, _)| !l.is_empty()) {
        print!("{label:<34}");
        for c in &columns {
            print!("{:>15}", median_of(all, c, &label).map_or("n/a".into(), |v| format!("{v:.2}")));
        }
        let ratio = match (median_of(all, QEMU_TARGET.0, &label), median_of(all, TARGETS[0].0, &label)) {
            (Some(q), Some(o)) if o > 0.0 => format!("{:.2}x", q / o),
            _ => "n/a".into(),
        };
        println!("{ratio:>14}");
    }
}

/// A sparse ext4 image big enough for the jobs.
fn make_volume(path: &Path, mib: u64) -> Result<()> {
    let size = (mib * 4 + 64) << 20;
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(path)
        .status()
        .context("running mkfs.ext4 (e2fsprogs)")?;
    if !status.success() {
        bail!("mkfs.ext4 {} failed", path.display());
    }
    Ok(())
}

fn qemu(work: &Path, vmlinux: &Path, initrd: &Path, mib: u64, runs: usize) -> Result<Vec<(String, String, f64)>> {
    let (commands, meaning) = plan(&[QEMU_TARGET], mib, runs);
    let script = timed_jobs_script(
        "mount -t devtmpfs dev /dev\nmount -t proc proc /proc\nmount -t sysfs sys /sys\nmkdir -p /tmp /9p\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose bench9p /9p || echo SM_JOB_FAILED mount\n",
        commands.iter().map(String::as_str),
        &format!("echo {DONE_MARKER}\nreboot -f\n"),
    );
    let mut cmd = qemu_running_script(vmlinux, initrd, &script, &work.join("qemu-fs-initrd.cpio"), MEMORY_MIB)?;
    cmd.arg("-fsdev")
        .arg(format!("local,id=f0,path={},security_model=none", work.join("9p").display()))
        .args(["-device", "virtio-9p-device,fsdev=f0,mount_tag=bench9p"]);
    let r = run_until_marker(cmd, DONE_MARKER, QEMU_TIMEOUT, Duration::from_secs(5))?;
    Ok(values(&jobs_console(r, DONE_MARKER, QEMU_TIMEOUT)?, &meaning))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_job_holds_a_single_quote() {
        let (commands, _) = plan(&TARGETS, 8, 2);
        assert!(commands.iter().all(|c| !c.contains('\'')));
    }

    #[test]
    fn job_times_become_values_per_target_and_medians() {
        let (_, meaning) = plan(&[("a", "/a")], 8, 3);
        // Set-up, then three runs of seven jobs: time the seq writes at 2, 4 and 8 s.
        let console = "SM_JOB 0\nreal\t0m 1.00s\nSM_JOB 1\nreal\t0m 2.00s\nSM_JOB 8\nreal\t0m 4.00s\n\
                       SM_JOB 15\nreal\t0m 8.00s\nSM_JOB 3\nreal\t0m 5.00s\nSM_JOB 7\nreal\t0m 9.00s\n";
        let v = values(console, &meaning);
        assert_eq!(
            v.len(),
            4,
            "the set-up and clean-up are not values: {:?}",
            v.iter().map(|x| &x.1).collect::<Vec<_>>()
        );
        assert_eq!(median_of(&v, "a", "seq write 8 MiB MiB/s"), Some(2.0));
        assert_eq!(median_of(&v, "a", "random 4 KiB read ms (a dd each)"), Some(50.0));
        assert_eq!(median_of(&v, "b", "seq write 8 MiB MiB/s"), None);
    }
}
