//! Volumes and shared host directories through the library (sm-api only):
//! `VmConfig::volumes` / `VmConfig::shares` are mounted before `Vm::boot`
//! returns, what the guest writes is on the host after `Vm::stop` (flushed and
//! unmounted), and a snapshot of a VM with a volume mounted is refused with the reason
//! (shares alone snapshot: `api_share_snapshot`).

use sm_api::{ExecRequest, ExitStatus, ShareMount, Vm, VmConfig, VolumeMount, VolumeStore};
use sm_tests::{agent_image, hypervisor, temp_dir, tools};

#[test]
fn mounts_come_up_with_the_vm_are_flushed_at_stop_and_block_snapshots() {
    let test = "api mounts";
    let Some(hv) = hypervisor(test) else { return };
    let Some(image) = agent_image(test) else { return };
    if !tools(test, &[("/sbin/mkfs.ext4", "e2fsprogs"), ("/sbin/debugfs", "e2fsprogs")]) {
        return;
    }
    let tmp = temp_dir("apimounts");
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("in"), b"from the host\n").unwrap();
    let store = VolumeStore::open(tmp.path().join("volumes")).unwrap();
    let volume = store.create("data", 16 << 20).unwrap();

    let mut config = VmConfig::new(image);
    config.shares = vec![ShareMount::new(&share, "/src")];
    config.volumes = vec![VolumeMount { path: volume.path.clone(), guest_path: "/vol".into(), read_only: false }];
    let mut vm = Vm::boot(&*hv, config).unwrap();
    assert!(store.inspect("data").unwrap().in_use, "the running VM holds its volume");

    // No sync in the guest: stopping the VM must still bring both writes home.
    let script = "cat /src/in && echo to the host > /src/out && echo to the volume > /vol/f";
    let out = vm.exec(&ExecRequest::new(["/bin/sh", "-c", script]), None).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"from the host\n");

    let err = vm.snapshot_live(&tmp.path().join("x.snap")).unwrap_err().to_string();
    assert!(err.contains("would not restore safely") && err.contains("/vol") && !err.contains("/src"), "{err}");
    assert!(!tmp.path().join("x.snap").exists());

    vm.stop();
    assert_eq!(std::fs::read(share.join("out")).unwrap(), b"to the host\n");
    let f = std::process::Command::new("/sbin/debugfs").args(["-R", "cat /f"]).arg(&volume.path).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&f.stdout), "to the volume\n");
    assert!(!store.inspect("data").unwrap().in_use, "stopping released it");
}
