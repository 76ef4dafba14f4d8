//! `cargo xtask demo`: the built-in default job. Builds the guest (kernel, agent
//! initrd with busybox), boots it, runs a command through the agent, snapshots the
//! VM to a file, restores it copy-on-write into a fresh VM, runs a command there,
//! and prints the host-side timings of each step. Then runs the CLI on the
//! built-in default image twice: `supermachine run` (cold boot, bakes a snapshot)
//! and again (restores it).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sm_api::ConsoleOutput;
use sm_api::{ExecRequest, GuestImage, Vm, VmConfig};

use crate::{agent, kernel, paths};

fn ms(d: Duration) -> String {
    format!("{:>9.2} ms", d.as_secs_f64() * 1e3)
}

fn run_cmd(vm: &Vm, argv: &[&str]) -> Result<(String, Duration)> {
    let t0 = Instant::now();
    let out = vm.exec(&ExecRequest::new(argv.iter().copied()), None).with_context(|| format!("running {argv:?}"))?;
    let took = t0.elapsed();
    if !out.stderr.is_empty() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((String::from_utf8_lossy(&out.stdout).trim_end().to_string(), took))
}

/// Runs the demo.
pub fn run() -> Result<()> {
    kernel::build(false)?;
    agent::build_initrd()?;
    let image = GuestImage::from_dir(&paths::guest_dir())?;
    let hv = sm_api::default_hypervisor().context("the demo needs KVM")?;

    println!("== boot {} + {} (1 vCPU, 128 MiB)", image.kernel.display(), image.initrd.display());
    let t0 = Instant::now();
    let mut vm = Vm::boot(&*hv, VmConfig::new(image))?;
    let booted = t0.elapsed();
    let m = vm.machine();
    println!("  VM + vCPU created          {}", ms(m.timings().created));
    println!("  first console byte         {}", ms(m.console().first_byte_at().unwrap_or_default()));
    println!("  agent ready                {}", ms(booted));

    println!("== run a command");
    let (out, took) = run_cmd(&vm, &["/bin/uname", "-a"])?;
    println!("  $ uname -a\n  {out}");
    println!("  exec round trip            {}", ms(took));

    let dir = paths::guest_dir().join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let snap = dir.join("demo.snap");
    println!("== snapshot to {}", snap.display());
    let report = vm.snapshot(&snap)?;
    vm.stop();
    println!("  pause                      {}", ms(report.pause));
    println!("  write (sparse)             {}", ms(report.write.duration));
    println!(
        "  file: {} MiB logical, {} MiB of non-zero pages",
        report.write.file_size >> 20,
        report.write.ram_written >> 20
    );

    println!("== restore copy-on-write into a fresh VM");
    let t0 = Instant::now();
    let restored = Vm::restore(&*hv, &snap, ConsoleOutput::Null, &[])?;
    let ready = t0.elapsed();
    let (out, took) =
        run_cmd(&restored, &["/bin/sh", "-c", "echo restored guest: up $(cut -d' ' -f1 /proc/uptime) s"])?;
    println!("  restore + clock sync       {}", ms(ready));
    println!("  $ echo ...\n  {out}");
    println!("  first exec after restore   {}", ms(took));
    if !out.starts_with("restored guest") {
        bail!("unexpected output from the restored guest: {out:?}");
    }
    restored.stop();
    let _ = std::fs::remove_file(&snap);

    println!("== supermachine run: the built-in default image (busybox, built locally, no registry)");
    // The default image is made from the host's busybox; its root disk needs
    // the mkfs tool of the format `run` picks (erofs here, squashfs elsewhere).
    crate::apt::ensure(&["busybox-static", "erofs-utils", "squashfs-tools"], "the demo's `supermachine run`")?;
    crate::test::cargo(&["build", "--quiet", "-p", "sm-cli"], &[])?;
    let cli = paths::workspace_root().join("target/debug/supermachine");
    // A store of its own, emptied, so the first run really boots and bakes.
    let home = dir.join("home");
    if home.exists() {
        std::fs::remove_dir_all(&home).with_context(|| format!("removing {}", home.display()))?;
    }
    for (label, args) in [
        ("first run: cold boot, bakes a snapshot", &["run", "--timings"][..]),
        ("second run: restores the baked snapshot", &["run", "--timings", "builtin:default", "uname", "-a"][..]),
    ] {
        println!("  $ supermachine {}    # {label}", args.join(" "));
        let status = std::process::Command::new(&cli)
            .args(args)
            .env("SUPERMACHINE_HOME", &home)
            .env("SM_GUEST_DIR", paths::guest_dir())
            .status()
            .with_context(|| format!("running {}", cli.display()))?;
        if !status.success() {
            bail!("supermachine {} failed ({status})", args.join(" "));
        }
    }
    println!("== done");
    Ok(())
}
