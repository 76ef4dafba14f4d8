//! `cargo xtask bench burst [--vms N]`: N VMs restored from one snapshot as
//! fast as this host allows, each answering one exec (sm-bench burst), beside
//! Firecracker loading one snapshot into N fresh processes (the same kernel,
//! its test-init guest: Firecracker cannot run our agent's vsock protocol
//! setup here, so its "answered" is not measured). Printed, not asserted.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{bench, initrd, kernel, paths};

const MEMORY_MIB: u64 = 128;

/// Runs the benchmark.
pub fn run(vms: usize, threads: usize) -> Result<()> {
    let vmlinux = kernel::build(false)?;
    let test_initrd = initrd::build()?;
    let agent_initrd = crate::agent::build_initrd()?;
    let ours = bench::build_release_bench()?;
    let work = paths::guest_dir().join("bench-burst");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    println!("burst benchmark: {vms} VMs of 1 vCPU, {MEMORY_MIB} MiB from one snapshot, {threads} threads");

    let out = Command::new(&ours)
        .args(["burst", "--vms", &vms.to_string(), "--threads", &threads.to_string()])
        .args(["--memory", &MEMORY_MIB.to_string()])
        .arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&agent_initrd)
        .arg("--dir")
        .arg(work.join("ours"))
        .stderr(Stdio::inherit())
        .output()
        .context("running sm-bench burst")?;
    if !out.status.success() {
        bail!("sm-bench burst failed (its error is above)");
    }
    let mut ours_m = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(rest) = line.strip_prefix("bench: ") else { continue };
        match rest.rsplit_once(' ').map(|(k, v)| (k, v.parse::<f64>())) {
            Some((key, Ok(value))) if !key.starts_with("note") => ours_m.push((key.to_string(), value)),
            _ => println!("  {rest}"),
        }
    }

    let anchors = paths::workspace_root().parent().map(|p| p.join("shared/anchors"));
    let fc = match anchors.filter(|a| a.join("firecracker").is_file() && a.join("fc_snapshot.py").is_file()) {
        None => {
            println!("firecracker: not in ../shared/anchors, skipped");
            Vec::new()
        }
        Some(anchors) => firecracker_burst(&anchors, &vmlinux, &test_initrd, &work.join("fc"), vms, threads)?,
    };

    println!();
    println!("{:<36}{:>16}{:>16}{:>14}", "", "supermachine", "firecracker", "fc/ours");
    for (key, value) in &ours_m {
        let fc = fc.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
        let ratio = fc.filter(|_| *value > 0.0).map_or("n/a".to_string(), |f| format!("{:.1}x", f / value));
        println!("{key:<36}{value:>16.2}{:>16}{ratio:>14}", fc.map_or("n/a".to_string(), |f| format!("{f:.2}")));
    }
    Ok(())
}

/// Boots Firecracker on the test init, snapshots it (fc_snapshot.py with no
/// restores), then loads that snapshot into `vms` fresh Firecracker processes
/// on `threads` threads. Returns its figures under our keys.
fn firecracker_burst(
    anchors: &Path,
    vmlinux: &Path,
    initrd: &Path,
    work: &Path,
    vms: usize,
    threads: usize,
) -> Result<Vec<(String, f64)>> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let config = crate::bench_snapshot::write_firecracker_tick_config(work, vmlinux, initrd, MEMORY_MIB)?;
    eprintln!("firecracker: booting and snapshotting its guest ...");
    let made = Command::new("python3")
        .arg(anchors.join("fc_snapshot.py"))
        .arg(anchors.join("firecracker"))
        .arg(&config)
        .arg(work)
        .env("RESTORES", "0")
        .output()
        .context("running fc_snapshot.py")?;
    let (snap, mem) = (work.join("vm.snap"), work.join("vm.mem"));
    if !snap.is_file() || !mem.is_file() {
        bail!("fc_snapshot.py made no snapshot: {}", String::from_utf8_lossy(&made.stdout));
    }

    eprintln!("firecracker: loading the snapshot into {vms} processes ...");
    let fc_bin = anchors.join("firecracker");
    let children: Mutex<Vec<Child>> = Mutex::new(Vec::new());
    let running: Mutex<Vec<f64>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let next = Mutex::new(0usize);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                    if *n >= vms || failure.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                match load_one(&fc_bin, work, i, &snap, &mem) {
                    Ok(child) => {
                        running.lock().unwrap_or_else(|e| e.into_inner()).push(start.elapsed().as_secs_f64() * 1e3);
                        children.lock().unwrap_or_else(|e| e.into_inner()).push(child);
                    }
                    Err(e) => *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("VM {i}: {e:#}")),
                }
            });
        }
    });
    let all_running = start.elapsed().as_secs_f64() * 1e3;
    let mut children = children.into_inner().unwrap_or_else(|e| e.into_inner());
    let private_kib: u64 = children.iter().map(|c| private_kib(c.id())).sum();
    let n = children.len();
    // As for ours: CPU the idle VMs cost the host over a quiet window (after
    // a settling pause like ours gets while its VMs answer their exec).
    std::thread::sleep(Duration::from_secs(5));
    let window = Duration::from_secs(5);
    let before: u64 = children.iter().map(|c| cpu_ticks(c.id())).sum();
    std::thread::sleep(window);
    let idle_ticks = children.iter().map(|c| cpu_ticks(c.id())).sum::<u64>().saturating_sub(before);
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        println!("firecracker: stopped at {n} VMs: {f}");
    }
    let running = running.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut sorted = running.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied();
    let mut figures = vec![("vms_running".to_string(), n as f64), ("all_running_ms".to_string(), all_running)];
    if let (Some(p50), Some(p99)) = (pct(0.5), pct(0.99)) {
        figures.push(("running_p50_ms".into(), p50));
        figures.push(("running_p99_ms".into(), p99));
    }
    if n > 0 {
        // A whole process per VM: its private memory (RSS not shared with
        // the others), against our VMs' added anonymous memory in one process.
        figures.push(("private_kib_per_vm_running".into(), private_kib as f64 / n as f64));
        // USER_HZ is 100 on Linux. Not a ratio against ours: this guest (the
        // test init) prints a line every 100 ms, ours idles in its agent.
        let percent = idle_ticks as f64 / 100.0 / window.as_secs_f64() * 100.0 / n as f64;
        println!("firecracker: host CPU per VM while its guest ticks (a line every 100 ms): {percent:.2}%");
    }
    Ok(figures)
}

/// Starts one Firecracker process and has it load and resume the snapshot.
fn load_one(fc: &Path, work: &Path, i: usize, snap: &Path, mem: &Path) -> Result<Child> {
    let sock: PathBuf = work.join(format!("burst-{i}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(fc)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", fc.display()))?;
    let body = format!(
        r#"{{"snapshot_path": {s:?}, "mem_backend": {{"backend_type": "File", "backend_path": {m:?}}}, "resume_vm": true}}"#,
        s = snap.display().to_string(),
        m = mem.display().to_string()
    );
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(e).context("connecting to the Firecracker API socket"),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            stream,
            "PUT /snapshot/load HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut reply = [0u8; 512];
        let got = stream.read(&mut reply)?;
        let text = String::from_utf8_lossy(&reply[..got]);
        if !text.starts_with("HTTP/1.1 2") {
            bail!("snapshot load answered: {}", text.lines().next().unwrap_or(""));
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(child),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// A process's private memory (RSS not shared), KiB.
fn private_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14, 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: fields count after its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 is at index 0, so fields 14 and 15 at 11 and 12.
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}
