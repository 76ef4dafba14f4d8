//! `cargo xtask bench shim`: `ctr run --rm busybox true` under Debian's
//! containerd, timed end to end as a user sees it, for runc (a container, no
//! VM: the peer every Kubernetes node has), supermachine restoring the image's
//! baked snapshot per container, and supermachine with a warm pool (an idle
//! VM handed over). Medians, and ratios to runc, in the same run. Printed,
//! not asserted.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use sm_tests::containerd::{Containerd, BOOT_TIMEOUT};
use sm_tests::{busybox_layout, temp_dir, Registry};

use crate::child::median;
use crate::{agent, bench, kernel, paths};

/// containerd's own runtime for plain containers.
const RUNC: &str = "io.containerd.runc.v2";
/// The pool case waits this long between containers (outside the timing):
/// the released VM is reset and idle, as with containers that do not come
/// back to back.
const SETTLE: Duration = Duration::from_secs(2);

/// One configuration measured.
struct Case {
    name: &'static str,
    runtime: &'static str,
    env: &'static [(&'static str, &'static str)],
    settle: bool,
}

/// Runs the benchmark with `runs` timed containers per configuration.
pub fn run(runs: usize) -> Result<()> {
    for tool in ["/usr/bin/containerd", "/usr/bin/ctr", "/usr/bin/docker-registry", "/usr/bin/skopeo"] {
        if !Path::new(tool).exists() {
            bail!(
                "{tool} is missing: `cargo xtask test` installs what this needs (containerd, docker-registry, skopeo)"
            );
        }
    }
    kernel::build(false)?;
    agent::build_initrd()?;
    let shim = bench::build_release("sm-shim", sm_tests::containerd::SHIM_BINARY)?;
    let registry = Registry::start();
    let layout = temp_dir("bench-shim-busybox");
    busybox_layout(layout.path());
    registry.push(layout.path(), "busybox:latest");
    let image = format!("127.0.0.1:{}/busybox:latest", registry.port);
    println!("shim benchmark: `ctr run --rm {image} ID true`, {runs} timed runs each (after one untimed)");

    let cases = [
        Case { name: "runc", runtime: RUNC, env: &[], settle: false },
        Case { name: "supermachine (restore)", runtime: sm_tests::containerd::RUNTIME, env: &[], settle: false },
        Case {
            name: "supermachine (warm pool)",
            runtime: sm_tests::containerd::RUNTIME,
            env: &[("SM_SHIM_WARM_VMS", "1"), ("SM_SHIM_WARM_SECONDS", "60")],
            settle: true,
        },
    ];
    let mut medians = Vec::new();
    for case in &cases {
        let ctd = Containerd::start_with_env(&shim, &paths::guest_dir(), case.env);
        ctd.pull(&image);
        let mut times = Vec::new();
        for i in 0..=runs {
            if case.settle && i > 0 {
                std::thread::sleep(SETTLE);
            }
            let id = format!("bench-{i}");
            let t = Instant::now();
            let out = ctd.ctr(&["run", "--rm", "--runtime", case.runtime, &image, &id, "true"], BOOT_TIMEOUT);
            let took = t.elapsed().as_secs_f64();
            if out.code != Some(0) {
                bail!("{}: ctr run failed ({:?}): {}{}", case.name, out.code, out.stdout, out.stderr);
            }
            // The first run of an image bakes (supermachine) or warms caches.
            if i > 0 {
                times.push(took);
            }
            eprint!("\r{}: {i}/{runs}", case.name);
        }
        eprintln!();
        let m = median(&mut times).unwrap_or(f64::NAN);
        println!("  {:<26} median {:>7.3} s", case.name, m);
        medians.push((case.name, m));
    }
    let runc = medians[0].1;
    println!("ratios to runc (lower is faster):");
    for (name, m) in &medians[1..] {
        println!("  {name:<26} {:>6.1}x", m / runc);
    }
    Ok(())
}
