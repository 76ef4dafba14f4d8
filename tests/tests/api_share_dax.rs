//! A shared directory with a DAX window (`ShareMount::dax`): the guest mounts
//! it `dax=always`, file data crosses both ways byte-exact through pages
//! mapped from the host (checked by SHA-256 on both sides), and a snapshot
//! taken with files mapped restores with the mappings in place.

use std::path::Path;

use sm_api::{ConsoleOutput, ExecRequest, ExitStatus, RestoreConfig, ShareMount, Vm, VmConfig};
use sm_tests::{agent_image, hypervisor, random_bytes, sha256_hex, temp_dir};

fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec(&ExecRequest::new(["/bin/sh", "-c", script]), None).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status, ExitStatus::Code(0), "{script}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn dax_share(dir: &Path) -> ShareMount {
    ShareMount { dax: true, ..ShareMount::new(dir, "/src") }
}

#[test]
fn a_dax_share_carries_bytes_both_ways_and_through_a_snapshot() {
    let test = "api share dax";
    let Some(hv) = hypervisor(test) else { return };
    let Some(image) = agent_image(test) else { return };
    let tmp = temp_dir("apisharedax");
    let dir = tmp.path().join("share");
    std::fs::create_dir(&dir).unwrap();
    // Larger than one 2 MiB DAX range and not a multiple of a page.
    let from_host = random_bytes(3 * 1024 * 1024 + 4321);
    std::fs::write(dir.join("from-host"), &from_host).unwrap();

    let mut config = VmConfig::new(image);
    config.shares = vec![dax_share(&dir)];
    let mut vm = Vm::boot(&*hv, config).unwrap();
    let mounts = sh(&vm, "grep ' /src ' /proc/mounts");
    assert!(mounts.contains("virtiofs") && mounts.contains("dax=always"), "{mounts}");

    let sum = sh(&vm, "sha256sum /src/from-host");
    assert!(sum.starts_with(&sha256_hex(&from_host)), "guest read through DAX: {sum}");
    // The guest writes a file (through the window) and grows it.
    sh(&vm, "dd if=/src/from-host of=/src/from-guest bs=65536 2>/dev/null && echo tail >> /src/from-guest");
    let mut want = from_host.clone();
    want.extend_from_slice(b"tail\n");
    assert_eq!(sha256_hex(&std::fs::read(dir.join("from-guest")).unwrap()), sha256_hex(&want));

    // A snapshot with those files mapped, restored: the mappings come back.
    let snap = tmp.path().join("dax.snap");
    vm.snapshot(&snap).unwrap();
    vm.stop();
    let config = RestoreConfig { shares: vec![dax_share(&dir)], ..RestoreConfig::new(ConsoleOutput::Null) };
    let vm = Vm::restore_with(&*hv, &snap, &config).unwrap();
    let sums = sh(&vm, "sha256sum /src/from-host /src/from-guest");
    assert!(sums.contains(&sha256_hex(&from_host)) && sums.contains(&sha256_hex(&want)), "{sums}");
    drop(vm);

    // Restoring it without DAX is refused, naming why.
    let config =
        RestoreConfig { shares: vec![ShareMount::new(&dir, "/src")], ..RestoreConfig::new(ConsoleOutput::Null) };
    let err = match Vm::restore_with(&*hv, &snap, &config) {
        Ok(_) => panic!("a DAX snapshot restored without its window"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("DAX window"), "{err}");
}
