use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::worker::testing::{add_chains, device_queue, guest_memory, mock_queue, used_entries, wait_for, Rig, R, W};
use crate::{mmio, INT_VRING};

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Not all bytes equal, and enough distinct values to rule out a pattern fill.
fn looks_random(bytes: &[u8]) -> bool {
    let mut seen = [false; 256];
    for &b in bytes {
        seen[usize::from(b)] = true;
    }
    seen.iter().filter(|s| **s).count() > 64
}

#[test]
fn fills_writable_buffers_with_random_bytes() {
    let rng = Rng::new().unwrap();
    let mem = guest_memory();
    let mq = mock_queue(&mem, 0);
    // One chain of two writable descriptors, and a readable one that is ignored.
    mem.write_slice(&[0x11; 64], GuestAddress(0x3_0000)).unwrap();
    add_chains(&mq, &[&[(0x1_0000, 1024, W), (0x2_0000, 512, W)], &[(0x3_0000, 64, R)]]);
    let mut q = device_queue(&mq, 16);
    assert!(rng.process_queue(&mem, &mut q));
    assert_eq!(used_entries(&mq), vec![(0, 1536), (2, 0)]);
    let a = read(&mem, 0x1_0000, 1024);
    let b = read(&mem, 0x2_0000, 512);
    assert!(looks_random(&a), "{a:?}");
    assert!(looks_random(&b));
    assert_ne!(a[..512], b[..], "two buffers differ");
    assert_eq!(read(&mem, 0x3_0000, 64), vec![0x11; 64], "readable buffer untouched");
}

#[test]
fn requests_are_capped_and_bad_buffers_are_survived() {
    let rng = Rng::new().unwrap();
    let mem = guest_memory();
    let mq = mock_queue(&mem, 0);
    add_chains(
        &mq,
        &[
            &[(0x1_0000, 0x2_0000, W), (0x4_0000, 0x2_0000, W)], // 256 KiB asked
            &[(0x1000_0000, 4096, W)],                           // outside RAM
            &[(0x8_0000, u32::MAX, W)],                          // huge
        ],
    );
    let mut q = device_queue(&mq, 16);
    rng.process_queue(&mem, &mut q);
    let used = used_entries(&mq);
    assert_eq!(used[0], (0, MAX_BYTES_PER_REQUEST as u32));
    assert_eq!(used[1], (2, 0));
    assert_eq!(used[2].0, 3);
    assert!(u64::from(used[2].1) <= MAX_BYTES_PER_REQUEST);
    assert_eq!(read(&mem, 0x4_0000 + 0x1_0000, 16), vec![0; 16], "nothing past the cap");
}

#[test]
fn missing_source_is_reported_with_its_path() {
    let e = Rng::with_source("/nonexistent/sm-urandom").err().expect("refused");
    assert!(e.to_string().contains("/nonexistent/sm-urandom"), "{e}");
}

#[test]
fn threaded_through_the_mmio_transport() {
    let mem = guest_memory();
    let mut rig = Rig::new(Box::new(Rng::new().unwrap()), &mem);
    assert_eq!(rig.r(mmio::REG_DEVICE_ID), 4);
    let features = rig.device_features();
    let mq = mock_queue(&mem, 0);
    rig.negotiate(features);
    rig.setup_queue(0, 8, &mq);
    rig.driver_ok();

    add_chains(&mq, &[&[(0x1_0000, 256, W)]]);
    rig.notify(0);
    wait_for("used ring", || mq.used().idx().load() == 1);
    wait_for("interrupt", || rig.line.count() >= 1);
    assert_ne!(rig.r(mmio::REG_INTERRUPT_STATUS) & INT_VRING, 0);
    assert_eq!(used_entries(&mq), vec![(0, 256)]);
    assert!(looks_random(&read(&mem, 0x1_0000, 256)));
    rig.w(mmio::REG_STATUS, 0);
    assert!(!rig.t.is_activated());
}

#[test]
fn pause_hands_back_the_queue_and_resume_serves_again() {
    let mem = guest_memory();
    let mut rig = Rig::new(Box::new(Rng::new().unwrap()), &mem);
    let features = rig.device_features();
    let mq = mock_queue(&mem, 0);
    rig.negotiate(features);
    rig.setup_queue(0, 16, &mq);
    rig.driver_ok();
    rig.t.pause().expect("rng supports pause");
    assert!(!rig.t.is_activated());
    add_chains(&mq, &[&[(0x1_0000, 64, W)]]);
    rig.notify(0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(mq.used().idx().load(), 0, "nothing served while paused");
    rig.t.resume();
    wait_for("served after resume", || mq.used().idx().load() == 1);
    // The ring positions the transport reports are the ones handed back at pause.
    rig.t.pause().unwrap();
    assert_eq!(rig.t.state().queues[0].next_used, 1);
}
