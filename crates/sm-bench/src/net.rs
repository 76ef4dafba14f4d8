//! `sm-bench net`: the in-process half of `cargo xtask bench net`. Boots the
//! agent guest with a passt network (host loopback allowed, guest port 8000
//! published), times the given guest jobs (transfers to and from servers
//! xtask runs on the host's loopback) with busybox `time`, then measures a
//! published-port request round trip from the host. Prints `bench:` and
//! `bench-job:` lines on stdout, progress on stderr.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use sm_api::{EgressPolicy, ExecRequest, GuestImage, Network, PasstNetwork, PublishedPort, Vm, VmConfig};

use crate::stats::{median, ms};

#[derive(Args)]
pub struct BenchNetArgs {
    /// vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Agent initrd (with busybox).
    #[arg(long)]
    initrd: PathBuf,
    /// Requests through the published port.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// A shell command to time in the guest with busybox `time` (repeatable).
    #[arg(long = "job")]
    jobs: Vec<String>,
}

/// Time budget for one guest job.
const JOB_TIMEOUT: Duration = Duration::from_secs(900);
/// The guest port the page is served on.
const GUEST_PORT: u16 = 8000;

/// One HTTP/1.0 GET of `/index.html` through `addr`; the response.
pub fn get_page(addr: (std::net::Ipv4Addr, u16)) -> std::io::Result<String> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut page = String::new();
    c.read_to_string(&mut page)?;
    Ok(page)
}

fn exec(vm: &Vm, argv: &[&str]) -> Result<sm_api::ExecOutcome> {
    let request = ExecRequest::new(argv.iter().copied()).timeout(JOB_TIMEOUT);
    let out = vm.exec(&request, None).with_context(|| format!("running {argv:?} in the guest"))?;
    if out.timed_out || !out.status.success() {
        bail!("{argv:?} failed in the guest ({:?}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

pub fn run(args: BenchNetArgs) -> Result<()> {
    let image = GuestImage { kernel: args.kernel.clone(), initrd: args.initrd.clone() };
    let hypervisor = sm_api::default_hypervisor()?;
    // What the network costs the boot: the same guest without a device first.
    eprintln!("booting the agent guest without a network ...");
    let t0 = Instant::now();
    Vm::boot(&*hypervisor, VmConfig::new(image.clone()))?.stop();
    println!("bench: boot to agent, no network ms {:.1}", ms(t0.elapsed()));
    let mut config = VmConfig::new(image);
    config.network = Network::Passt(PasstNetwork {
        egress: EgressPolicy::parse(&["allow=host.supermachine.internal"])?,
        publish: vec![PublishedPort::parse(&format!("0:{GUEST_PORT}"))?],
        ..Default::default()
    });
    eprintln!("booting the agent guest with a passt network ...");
    let t0 = Instant::now();
    let vm = Vm::boot(&*hypervisor, config)?;
    println!("bench: boot to agent, passt network ms {:.1}", ms(t0.elapsed()));

    crate::stats::time_guest_jobs(&args.jobs, |argv| exec(&vm, argv))?;

    eprintln!("published-port round trips ({} runs) ...", args.runs);
    exec(&vm, &["sh", "-c", "mkdir -p /tmp/www && echo page > /tmp/www/index.html"])?;
    exec(&vm, &["httpd", "-p", &GUEST_PORT.to_string(), "-h", "/tmp/www"])?;
    let port = vm.published_ports()[0];
    let addr = (port.host_ip, port.host_port);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get_page(addr).is_ok_and(|p| p.contains(" 200 ")) {
        if Instant::now() > deadline {
            bail!("the guest's httpd never answered through {port}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rtts = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let page = get_page(addr).context("a request through the published port")?;
        if !page.contains(" 200 ") {
            bail!("the published port answered: {page}");
        }
        rtts.push(ms(t.elapsed()));
    }
    println!("bench: published port GET ms {:.2}", median(rtts));
    vm.stop();
    Ok(())
}
