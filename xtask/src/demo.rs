//! `cargo xtask demo`: the built-in default job. Builds the guest, boots it, captures
//! the running VM's state and memory, restores it into a fresh VM, and prints the
//! host-side timings of each step.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sm_vmm::{ExitReason, LinuxBoot, Machine, MachineConfig, DEFAULT_CMDLINE};
use vm_memory::{Bytes, GuestAddress};

use crate::{initrd, kernel};

const MEMORY_MIB: u64 = 128;
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn ms(d: Duration) -> String {
    format!("{:>9.2} ms", d.as_secs_f64() * 1e3)
}

fn last_tick(m: &Machine) -> Option<u64> {
    m.console().lines().iter().rev().find_map(|(_, l)| l.strip_prefix("TICK ").and_then(|n| n.trim().parse().ok()))
}

/// Runs the demo.
pub fn run() -> Result<()> {
    let vmlinux = kernel::build(false)?;
    let initrd = initrd::build()?;
    let hv = sm_vmm::default_hypervisor().context("the demo needs KVM")?;
    let config = MachineConfig { vcpus: 1, memory_mib: MEMORY_MIB, ..Default::default() };

    println!("== boot: {} + {} (1 vCPU, {MEMORY_MIB} MiB)", vmlinux.display(), initrd.display());
    let mut a = Machine::new(&*hv, config.clone())?;
    a.load_linux(&LinuxBoot { kernel: vmlinux, initrd: Some(initrd), cmdline: format!("{DEFAULT_CMDLINE} -- tick") })?;
    a.start()?;
    let Some((init_at, init_line)) = a.console().wait_for("SM_INIT_READY", BOOT_TIMEOUT) else {
        let reason = a.stop();
        bail!("the guest did not reach init within {BOOT_TIMEOUT:?} ({reason:?}); console:\n{}", a.console().text());
    };
    println!("guest init says: {init_line}");
    a.console().wait_for("TICK 1", Duration::from_secs(30)).context("the guest's init stopped ticking")?;
    let t = a.timings();
    println!("  VM + vCPU created          {}", ms(t.created));
    println!("  first console byte         {}", ms(a.console().first_byte_at().unwrap_or_default()));
    println!("  init running               {}", ms(init_at));

    println!("== capture: pause, save vCPU + device state, copy guest RAM");
    let t0 = Instant::now();
    a.pause();
    let paused = t0.elapsed();
    let state = a.save_state()?;
    let saved = t0.elapsed();
    let mut ram = vec![0u8; (MEMORY_MIB << 20) as usize];
    a.memory().read_slice(&mut ram, GuestAddress(0)).context("reading guest RAM")?;
    let copied = t0.elapsed();
    let tick_before = last_tick(&a).unwrap_or(0);
    drop(a);
    println!("  pause (all vCPUs out)      {}", ms(paused));
    println!("  save vCPU + VM state       {}", ms(saved - paused));
    println!("  copy {MEMORY_MIB} MiB RAM            {}", ms(copied - saved));

    println!("== restore into a fresh VM");
    let t0 = Instant::now();
    let mut b = Machine::new(&*hv, config)?;
    let created = t0.elapsed();
    b.memory().write_slice(&ram, GuestAddress(0)).context("writing guest RAM")?;
    let loaded = t0.elapsed();
    b.restore_state(&state)?;
    b.start()?;
    let running = t0.elapsed();
    let next = format!("TICK {}", tick_before + 1);
    let seen = b.console().wait_for(&next, Duration::from_secs(30));
    let output = t0.elapsed();
    let reason = b.stop();
    println!("  new VM + vCPU              {}", ms(created));
    println!("  load {MEMORY_MIB} MiB RAM            {}", ms(loaded - created));
    println!("  restore state -> running   {}", ms(running - loaded));
    match seen {
        Some(_) => println!("  first guest output ({next}) {}", ms(output)),
        None => bail!("the restored guest printed nothing within 30 s; console:\n{}", b.console().text()),
    }
    if reason != ExitReason::Stopped {
        bail!("the restored guest ended on its own: {reason:?}");
    }
    println!("== done (running commands in the guest arrives with the guest agent)");
    Ok(())
}
