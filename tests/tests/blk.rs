//! virtio-blk with a real guest: guest writes reach the host file after a flush,
//! guest reads see the host file, a read-only disk refuses writes inside the guest
//! while the host file stays untouched.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use sm_api::{Disk, ExecRequest, ExitStatus, Vm, VmConfig};
use sm_tests::{agent_image, hypervisor, temp_dir};

const DISK_SIZE: usize = 4 << 20;

#[test]
fn guest_writes_reach_the_host_file_and_read_only_disks_refuse_writes() {
    let Some(hv) = hypervisor("blk") else { return };
    let Some(image) = agent_image("blk") else { return };
    let dir = temp_dir("blk");
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    std::fs::write(&rw, vec![0u8; DISK_SIZE]).unwrap();
    let pattern: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&ro, &pattern).unwrap();

    let mut config = VmConfig::new(image);
    config.disks = vec![Disk { path: rw.clone(), read_only: false }, Disk { path: ro.clone(), read_only: true }];
    let t0 = Instant::now();
    let vm = Vm::boot(&*hv, config).unwrap();
    eprintln!("guest with two disks ready after {:?}", t0.elapsed());

    // The guest writes a block at sector 8 of /dev/vda and flushes (conv=fsync).
    vm.write_file("/tmp/block", 0o644, &[0x5au8; 512]).unwrap();
    let dd = ExecRequest::new(["/bin/dd", "if=/tmp/block", "of=/dev/vda", "bs=512", "seek=8", "conv=fsync"]);
    let out = vm.exec(&dd, None).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", String::from_utf8_lossy(&out.stderr));
    let mut on_host = [0u8; 512];
    std::fs::File::open(&rw).unwrap().read_exact_at(&mut on_host, 8 * 512).unwrap();
    assert_eq!(on_host, [0x5a; 512], "the guest's write must be in the host file after the flush");

    // The guest reads what the host put on the read-only disk.
    let out = vm.exec(&ExecRequest::new(["/bin/dd", "if=/dev/vdb", "bs=512", "skip=3", "count=2"]), None).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout, &pattern[3 * 512..5 * 512]);

    // Writing the read-only disk fails inside the guest; the host file is unchanged
    // and the VM carries on.
    let dd_ro = ExecRequest::new(["/bin/dd", "if=/tmp/block", "of=/dev/vdb", "bs=512", "conv=fsync"]);
    let out = vm.exec(&dd_ro, None).unwrap();
    assert_ne!(out.status, ExitStatus::Code(0), "a write to the read-only disk must fail in the guest");
    eprintln!("read-only write refused in the guest: {}", String::from_utf8_lossy(&out.stderr).trim());
    assert_eq!(std::fs::read(&ro).unwrap(), pattern);
    assert_eq!(vm.exec(&ExecRequest::new(["/bin/true"]), None).unwrap().status, ExitStatus::Code(0));

    // Random bytes written with O_DIRECT reach the host file exactly, and a direct
    // read (past the guest page cache, from the device) returns them exactly.
    let random = sm_tests::random_bytes(1 << 20);
    vm.write_file("/tmp/random", 0o644, &random).unwrap();
    let dd = ExecRequest::new([
        "/bin/dd",
        "if=/tmp/random",
        "of=/dev/vda",
        "bs=65536",
        "seek=8",
        "oflag=direct",
        "conv=fsync",
    ]);
    let out = vm.exec(&dd, None).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", String::from_utf8_lossy(&out.stderr));
    let mut on_host = vec![0u8; random.len()];
    std::fs::File::open(&rw).unwrap().read_exact_at(&mut on_host, 8 * 65536).unwrap();
    assert!(on_host == random, "1 MiB written by the guest (O_DIRECT) differs in the host file");
    let dd = ExecRequest::new(["/bin/dd", "if=/dev/vda", "bs=65536", "skip=8", "count=16", "iflag=direct"]);
    let out = vm.exec(&dd, None).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == random, "1 MiB read back from the device (O_DIRECT) differs from what was written");
    vm.stop();
}
