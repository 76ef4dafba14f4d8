//! `cargo xtask bench net`: guest network throughput both ways, connection
//! set-up, and a published-port request round trip — supermachine (virtio-net
//! to passt, through the egress filter) beside QEMU microvm on passt
//! (`-netdev stream`) booting the same kernel and busybox, in the same run
//! against the same host servers. Printed, not asserted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_compare::{
    job_seconds, jobs_console, print_comparison, qemu_running_script, run_sm_bench, timed_jobs_script,
};
use crate::child::run_until_marker;
use crate::{agent, apt, bench, kernel, paths};

const MEMORY_MIB: u64 = 128;
/// Connections the set-up job opens.
const CONNECTIONS: u32 = 20;
const QEMU_TIMEOUT: Duration = Duration::from_secs(900);
const DONE_MARKER: &str = "SM_NET_DONE";
/// How long the QEMU guest keeps serving after its jobs, for the host's
/// published-port requests.
const SERVE_SECS: u64 = 45;
/// How long the upload sink waits for the next bytes of an upload.
const UPLOAD_IDLE: Duration = Duration::from_secs(300);

/// Servers on host loopback: HTTP/1.0 (`GET /big` sends `mib` MiB, anything
/// else is a short page) and an upload sink: it greets each connection with
/// one line at once, takes exactly `mib` MiB and records their rate on the
/// host's clock (first byte to last).
///
/// The greeting is what keeps the upload alive through Debian bookworm's
/// passt (0.0~git20230309): it resets a guest-opened TCP connection on which
/// the host side has sent nothing for about 24 s (it never counts the guest's
/// first ACK as progress; fixed upstream by passt commit 4e73e9b, 2023-03-29),
/// and an 8 MiB upload from this host's emulated guest takes longer.
struct HostServers {
    http_port: u16,
    upload_port: u16,
    uploads: Arc<Mutex<Vec<f64>>>,
}

impl HostServers {
    fn start(mib: u64) -> Result<HostServers> {
        let http = TcpListener::bind("127.0.0.1:0").context("binding the benchmark's HTTP server")?;
        let http_port = http.local_addr()?.port();
        std::thread::spawn(move || {
            for conn in http.incoming().flatten() {
                std::thread::spawn(move || serve_http(conn, mib));
            }
        });
        let sink = TcpListener::bind("127.0.0.1:0").context("binding the benchmark's upload sink")?;
        let upload_port = sink.local_addr()?.port();
        let uploads = Arc::new(Mutex::new(Vec::new()));
        let recorded = uploads.clone();
        std::thread::spawn(move || {
            for conn in sink.incoming().flatten() {
                let recorded = recorded.clone();
                std::thread::spawn(move || take_upload(conn, mib << 20, &recorded));
            }
        });
        Ok(HostServers { http_port, upload_port, uploads })
    }
}

/// Greets, reads `len` bytes, records MiB/s (first byte to last), closes.
/// A guest that stops sending for [`UPLOAD_IDLE`] is given up on.
fn take_upload(mut conn: TcpStream, len: u64, uploads: &Mutex<Vec<f64>>) {
    if conn.set_read_timeout(Some(UPLOAD_IDLE)).is_err() || conn.write_all(b"send\n").is_err() {
        return;
    }
    let mut left = len;
    let mut buf = vec![0u8; 1 << 16];
    let mut first = None;
    while left > 0 {
        match conn.read(&mut buf[..left.min(1 << 16) as usize]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                left -= n as u64;
            }
        }
    }
    if let Some(first) = first {
        let rate = len as f64 / f64::from(1u32 << 20) / first.elapsed().as_secs_f64();
        uploads.lock().unwrap_or_else(|p| p.into_inner()).push(rate);
    }
}

fn serve_http(conn: TcpStream, mib: u64) {
    let Ok(clone) = conn.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut request_line = String::new();
    if reader.by_ref().take(8192).read_line(&mut request_line).is_err() {
        return;
    }
    let mut line = String::new();
    while reader.by_ref().take(8192).read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let mut conn = conn;
    let big = request_line.contains(" /big ");
    let len = if big { mib << 20 } else { 3 };
    let _ = write!(conn, "HTTP/1.0 200 OK\r\nContent-Length: {len}\r\n\r\n");
    if big {
        let chunk = vec![0x5au8; 1 << 16];
        for _ in 0..(mib << 4) {
            if conn.write_all(&chunk).is_err() {
                return;
            }
        }
    } else {
        let _ = conn.write_all(b"ok\n");
    }
}

/// The guest jobs both VMMs time: (label, command, divisor turning seconds
/// into the printed unit).
fn guest_jobs(servers: &HostServers, mib: u64) -> Vec<(String, String)> {
    let (http, sink) = (servers.http_port, servers.upload_port);
    vec![
        (format!("host->guest {mib} MiB MiB/s"), format!("wget -q -O /dev/null http://10.0.2.2:{http}/big")),
        (
            format!("guest->host {mib} MiB MiB/s"),
            // The rate comes from the sink (host clock); nc ends when the sink
            // has taken it all and closes.
            format!("dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc 10.0.2.2 {sink} > /dev/null", mib * 16),
        ),
        (
            "connect + GET ms (guest wget)".into(),
            format!(
                "i=0; while [ $i -lt {CONNECTIONS} ]; do wget -q -O /dev/null http://10.0.2.2:{http}/small; i=$((i+1)); done"
            ),
        ),
    ]
}

/// The printed value of job `i` that took `secs` (none for the upload,
/// which the HTTP server measures).
fn job_value(i: usize, secs: f64, mib: u64) -> Option<f64> {
    match i {
        0 => Some(mib as f64 / secs),
        1 => None,
        _ => Some(secs * 1e3 / f64::from(CONNECTIONS)),
    }
}

/// The printed value of each job in `console`, and the upload rate the server
/// recorded last (the run that just ended).
fn parse_jobs(console: &str, jobs: &[(String, String)], mib: u64, servers: &HostServers) -> Vec<(String, f64)> {
    let mut values: Vec<(String, f64)> = job_seconds(console)
        .into_iter()
        .filter_map(|(i, secs)| Some((jobs.get(i)?.0.clone(), job_value(i, secs, mib)?)))
        .collect();
    if let Some(rate) = servers.uploads.lock().unwrap_or_else(|p| p.into_inner()).pop() {
        values.push((jobs[1].0.clone(), rate));
    }
    values
}

/// Runs the benchmark.
pub fn run(runs: usize, mib: u64) -> Result<()> {
    apt::ensure(&["passt", "qemu-system-x86"], "`cargo xtask bench net`")?;
    let vmlinux = kernel::build(false)?;
    let initrd = agent::build_initrd()?;
    let ours = bench::build_release_bench()?;
    let work = paths::guest_dir().join("bench-net");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let servers = HostServers::start(mib)?;
    let jobs = guest_jobs(&servers, mib);
    println!(
        "net benchmark: 1 vCPU, {MEMORY_MIB} MiB, agent initrd with busybox; both VMMs on passt (MTU 1500); \
         {mib} MiB each way, {CONNECTIONS} connections, {runs} published-port requests"
    );

    println!("supermachine (progress below) ...");
    servers.uploads.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let mut cmd = Command::new(&ours);
    cmd.args(["net", "--runs", &runs.to_string()]);
    for (_, job) in &jobs {
        cmd.arg("--job").arg(job);
    }
    cmd.arg("--kernel").arg(&vmlinux).arg("--initrd").arg(&initrd);
    let out = run_sm_bench(cmd, "sm-bench net")?;
    let mut ours_m = parse_jobs(&out.job_console, &jobs, mib, &servers);
    ours_m.extend(out.values);

    println!("qemu-microvm on passt: same kernel and busybox; the jobs run from a shell script as init ...");
    servers.uploads.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let qemu_m = qemu(&work, &vmlinux, &initrd, &jobs, mib, runs, &servers).unwrap_or_else(|e| {
        println!("qemu-microvm: failed: {e:#}");
        Vec::new()
    });

    print_comparison(&ours_m, &qemu_m, 40);
    println!(
        "(MiB/s: higher is better, the ratio below 1.0 where QEMU is slower; ms: lower is better. Guest-side \
         times include the guest's own work, which is emulated on kvm_pvm hosts and bounds both VMMs alike.)"
    );
    Ok(())
}

/// passt for QEMU on a socket of its own, publishing `host_port` -> guest 8000.
fn passt_for_qemu(socket: &Path, host_port: u16) -> Result<Child> {
    let _ = std::fs::remove_file(socket);
    let child = Command::new("passt")
        .args(["--foreground", "--quiet", "--one-off", "--ipv4-only"])
        .arg("--socket")
        .arg(socket)
        .args(["--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2", "--mtu", "1500"])
        .args(["--dns-forward", "10.0.2.3", "--udp-ports", "none"])
        .args(["-t", &format!("127.0.0.1/{host_port}:8000")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting passt")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("passt made no socket at {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Requests through `port` once the guest serves, `runs` of them; the median ms.
fn measure_port(port: u16, runs: usize, stop: Arc<AtomicBool>, result: Arc<Mutex<Option<f64>>>) {
    let get = || -> std::io::Result<String> {
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
        let mut page = String::new();
        c.read_to_string(&mut page)?;
        Ok(page)
    };
    while !stop.load(Ordering::Relaxed) {
        if get().is_ok_and(|p| p.contains(" 200 ")) {
            let mut rtts = Vec::new();
            for _ in 0..runs {
                let t = Instant::now();
                if !get().is_ok_and(|p| p.contains(" 200 ")) {
                    return;
                }
                rtts.push(t.elapsed().as_secs_f64() * 1e3);
            }
            rtts.sort_by(|a, b| a.total_cmp(b));
            *result.lock().unwrap_or_else(|p| p.into_inner()) = rtts.get(rtts.len() / 2).copied();
            return;
        }
        // Seldom: each probe is work for the guest while its jobs are timed.
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn qemu(
    work: &Path,
    vmlinux: &Path,
    initrd: &Path,
    jobs: &[(String, String)],
    mib: u64,
    runs: usize,
    servers: &HostServers,
) -> Result<Vec<(String, f64)>> {
    let script = timed_jobs_script(
        "mount -t devtmpfs dev /dev\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n\
         ip link set lo up\nip addr add 10.0.2.15/24 dev eth0\nip link set eth0 up\nip route add default via 10.0.2.2\n",
        jobs.iter().map(|(_, job)| job.as_str()),
        &format!(
            "mkdir -p /tmp/www && echo page > /tmp/www/index.html && httpd -p 8000 -h /tmp/www\n\
             echo SM_NET_SERVING\nsleep {SERVE_SECS}\necho {DONE_MARKER}\nreboot -f\n"
        ),
    );
    let mut cmd = qemu_running_script(vmlinux, initrd, &script, &work.join("qemu-net-initrd.cpio"), MEMORY_MIB)?;

    let host_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    // passt drops root for nobody: its socket goes in a world-readable place.
    let socket = std::env::temp_dir().join(format!("sm-bench-net-{}.sock", std::process::id()));
    let mut passt = passt_for_qemu(&socket, host_port)?;
    let stop = Arc::new(AtomicBool::new(false));
    let rtt = Arc::new(Mutex::new(None));
    let measurer = {
        let (stop, rtt) = (stop.clone(), rtt.clone());
        std::thread::spawn(move || measure_port(host_port, runs, stop, rtt))
    };
    cmd.arg("-netdev")
        .arg(format!("stream,id=n0,server=off,addr.type=unix,addr.path={}", socket.display()))
        .args(["-device", "virtio-net-device,netdev=n0"]);
    let r = run_until_marker(cmd, DONE_MARKER, QEMU_TIMEOUT, Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let _ = measurer.join();
    let _ = passt.kill();
    let _ = passt.wait();
    let _ = std::fs::remove_file(&socket);
    let console = jobs_console(r?, DONE_MARKER, QEMU_TIMEOUT)?;
    let mut m = parse_jobs(&console, jobs, mib, servers);
    if let Some(ms) = *rtt.lock().unwrap_or_else(|p| p.into_inner()) {
        m.push(("published port GET ms".into(), ms));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_is_greeted_then_timed_by_the_sink() {
        let servers = HostServers::start(1).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", servers.upload_port)).unwrap();
        let mut greeting = [0u8; 5];
        c.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"send\n", "the sink speaks first");
        c.write_all(&vec![7u8; 1 << 20]).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the sink closes once it has it all");
        assert_eq!(servers.uploads.lock().unwrap().len(), 1, "one upload recorded");
    }

    #[test]
    fn job_times_become_rates_and_per_connection_times() {
        let servers = HostServers { http_port: 1, upload_port: 2, uploads: Arc::new(Mutex::new(vec![3.0])) };
        let jobs = guest_jobs(&servers, 8);
        // The QEMU script runs each job inside single quotes.
        assert!(jobs.iter().all(|(_, job)| !job.contains('\'')), "{jobs:?}");
        let console = "SM_JOB 0\r\nreal\t0m 2.00s\r\nSM_JOB 1\nreal\t0m 4.00s\nSM_JOB 2\nreal\t0m 1.00s\n";
        let got = parse_jobs(console, &jobs, 8, &servers);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], ("host->guest 8 MiB MiB/s".to_string(), 4.0));
        assert_eq!(got[1].1, 1000.0 / f64::from(CONNECTIONS));
        assert_eq!(got[2], ("guest->host 8 MiB MiB/s".to_string(), 3.0), "the upload rate is the server's");
        assert!(servers.uploads.lock().unwrap().is_empty(), "taken for this run");
    }
}
