//! virtio-blk against a hostile driver: every malformed chain completes with an
//! error status or is given back with nothing written; nothing panics or hangs.

use vm_memory::{Address, Bytes, GuestAddress};

use super::request::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use super::tests::{header, poison_status, read_guest, run, status, TempFile, DATA, HDR, STATUS};
use super::*;
use crate::worker::testing::{device_queue, guest_memory, mock_queue, raw, used_entries, NEXT, R, W};

const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

fn rig() -> (TempFile, Vec<u8>, Block, GuestMemory) {
    let disk = TempFile::disk(8);
    let before = disk.contents();
    let block = Block::new(disk.path(), false, None).unwrap();
    (disk, before, block, guest_memory())
}

/// Runs hand-made descriptors (their `next` fields as given) with the available
/// ring pointing at `heads`.
fn run_raw(
    block: &Block,
    mem: &GuestMemory,
    descs: &[virtio_queue::desc::RawDescriptor],
    heads: &[u16],
) -> Vec<(u32, u32)> {
    let mq = mock_queue(mem, 0);
    for (i, d) in descs.iter().enumerate() {
        mq.desc_table().store(i as u16, *d).unwrap();
    }
    for (i, &h) in heads.iter().enumerate() {
        mq.avail().ring().ref_at(i).unwrap().store(h.to_le());
    }
    mq.avail().idx().store(heads.len() as u16);
    let mut q = device_queue(&mq, 16);
    block.process_queue(mem, &mut q);
    used_entries(&mq)
}

#[test]
fn descriptor_loop_is_dropped() {
    let (disk, before, block, mem) = rig();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    poison_status(&mem, STATUS);
    // 0 -> 1 -> 0 -> ... : the iterator gives up after queue-size steps.
    let descs = [raw(HDR, 16, R | NEXT, 1), raw(STATUS, 1, W | NEXT, 0)];
    assert_eq!(run_raw(&block, &mem, &descs, &[0]), vec![(0, 0)]);
    assert_eq!(status(&mem, STATUS), 0xee, "nothing written");
    assert_eq!(disk.contents(), before);
}

#[test]
fn next_index_out_of_range_is_dropped() {
    let (_disk, _before, block, mem) = rig();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let descs = [raw(HDR, 16, R | NEXT, 200)];
    assert_eq!(run_raw(&block, &mem, &descs, &[0]), vec![(0, 0)]);
}

#[test]
fn head_index_out_of_range_is_skipped() {
    let (_disk, _before, block, mem) = rig();
    // The chain is empty and its head cannot be put on the used ring; the next
    // chain is still served.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let descs = [raw(HDR, 16, R | NEXT, 1), raw(DATA, 512, W | NEXT, 2), raw(STATUS, 1, W, 0)];
    assert_eq!(run_raw(&block, &mem, &descs, &[500, 0]), vec![(0, 513)]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
}

#[test]
fn available_index_far_ahead_does_not_hang() {
    let (_disk, _before, block, mem) = rig();
    let mq = mock_queue(&mem, 0);
    mq.avail().idx().store(1000);
    let mut q = device_queue(&mq, 16);
    assert!(!block.process_queue(&mem, &mut q));
    assert!(used_entries(&mq).is_empty());
}

#[test]
fn buffers_outside_guest_memory_fail_with_ioerr() {
    let (disk, before, block, mem) = rig();
    for (req, addr, len) in [
        (VIRTIO_BLK_T_IN, 0x1000_0000u64, 512u32), // beyond the end of RAM
        (VIRTIO_BLK_T_IN, 0xf_ff00, 512),          // straddles the end
        (VIRTIO_BLK_T_IN, DATA, 0x8000_0000),      // huge length
        (VIRTIO_BLK_T_OUT, u64::MAX - 100, 512),   // wraps around
    ] {
        header(&mem, HDR, req, 0);
        poison_status(&mem, STATUS);
        let dir = if req == VIRTIO_BLK_T_IN { W } else { R };
        let used = run(&block, &mem, &[&[(HDR, 16, R), (addr, len, dir), (STATUS, 1, W)]]).0;
        assert_eq!(used, vec![(0, 1)], "addr {addr:#x} len {len:#x}");
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR, "addr {addr:#x} len {len:#x}");
    }
    // A chain of more than 4 GiB is cut short by the chain iterator: dropped.
    poison_status(&mem, STATUS);
    let used = run(&block, &mem, &[&[(HDR, 16, R), (DATA, u32::MAX, W), (STATUS, 1, W)]]).0;
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(status(&mem, STATUS), 0xee);
    // Header outside guest memory.
    poison_status(&mem, STATUS);
    run(&block, &mem, &[&[(0x2000_0000, 16, R), (DATA, 512, W), (STATUS, 1, W)]]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    assert_eq!(disk.contents(), before);
}

#[test]
fn requests_over_the_size_limit_fail_before_any_io() {
    let disk = TempFile::disk(8);
    let block = Block::new(disk.path(), false, None).unwrap();
    // Enough (lazily mapped) RAM to describe a buffer over the limit.
    let big = MAX_REQUEST_BYTES as usize + (2 << 20);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), big)]).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    poison_status(&mem, STATUS);
    let len = (MAX_REQUEST_BYTES + 512) as u32;
    run(&block, &mem, &[&[(HDR, 16, R), (0x10_0000, len, W), (STATUS, 1, W)]]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    assert_eq!(read_guest(&mem, 0x10_0000, 512), vec![0; 512], "nothing read into the buffer");
}

#[test]
fn data_in_the_wrong_direction_fails_with_ioerr() {
    let (disk, before, block, mem) = rig();
    // IN whose data buffer is device-readable.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    run(&block, &mem, &[&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    assert_eq!(read_guest(&mem, DATA, 512), vec![0x77; 512]);
    // OUT whose data buffer is device-writable.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    poison_status(&mem, STATUS);
    run(&block, &mem, &[&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    // A readable descriptor after a writable one.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    poison_status(&mem, STATUS);
    run(&block, &mem, &[&[(HDR, 16, R), (DATA, 512, W), (0x3_0000, 16, R), (STATUS, 1, W)]]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    assert_eq!(disk.contents(), before);
}

#[test]
fn bad_headers_fail_with_ioerr() {
    let (_disk, _before, block, mem) = rig();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    for chain in [
        &[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)][..],  // short
        &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)][..], // device-writable
        &[(STATUS, 1, W)][..],                               // no header at all
    ] {
        poison_status(&mem, STATUS);
        let used = run(&block, &mem, &[chain]).0;
        assert_eq!(used.len(), 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR, "{chain:x?}");
    }
}

#[test]
fn missing_or_bad_status_descriptor_is_dropped() {
    let (disk, before, block, mem) = rig();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    for chain in [
        &[(HDR, 16, R), (DATA, 512, R)][..],                      // no status
        &[(HDR, 16, R), (DATA, 512, R), (STATUS, 0, W)][..],      // empty status
        &[(HDR, 16, R), (DATA, 512, R), (0x4000_0000, 1, W)][..], // status outside RAM
    ] {
        let used = run(&block, &mem, &[chain]).0;
        assert_eq!(used, vec![(0, 0)], "{chain:x?}");
    }
    assert_eq!(disk.contents(), before, "no write happened");
}

#[test]
fn any_layout_header_split_over_descriptors_is_served() {
    let (_disk, before, block, mem) = rig();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    // Header in two halves, data and status in one descriptor.
    let hdr2 = 0x1_2000;
    let mut second = [0u8; 8];
    mem.read_slice(&mut second, GuestAddress(HDR + 8)).unwrap();
    mem.write_slice(&second, GuestAddress(hdr2)).unwrap();
    let used = run(&block, &mem, &[&[(HDR, 8, R), (hdr2, 8, R), (DATA, 513, W)]]).0;
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(status(&mem, DATA + 512), VIRTIO_BLK_S_OK);
    assert_eq!(read_guest(&mem, DATA, 512), before[512..1024].to_vec());
}

#[test]
fn indirect_tables_are_followed_and_bounded() {
    let (_disk, before, block, mem) = rig();
    let table = GuestAddress(0x9_0000);
    // A valid indirect request.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    let entries = [raw(HDR, 16, R | NEXT, 1), raw(DATA, 512, W | NEXT, 2), raw(STATUS, 1, W, 0)];
    for (i, d) in entries.iter().enumerate() {
        mem.write_obj(*d, table.unchecked_add(16 * i as u64)).unwrap();
    }
    let used = run_raw(&block, &mem, &[raw(table.0, 48, INDIRECT, 0)], &[0]);
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(read_guest(&mem, DATA, 512), before[1024..1536].to_vec());

    // A 2000-entry indirect chain is longer than any real request: dropped.
    let n = 2000u16;
    for i in 0..n {
        let d = if i + 1 < n { raw(DATA, 16, R | NEXT, i + 1) } else { raw(STATUS, 1, W, 0) };
        mem.write_obj(d, table.unchecked_add(16 * u64::from(i))).unwrap();
    }
    poison_status(&mem, STATUS);
    let used = run_raw(&block, &mem, &[raw(table.0, 16 * u32::from(n), INDIRECT, 0)], &[0]);
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(status(&mem, STATUS), 0xee);

    // An indirect table outside guest memory.
    let used = run_raw(&block, &mem, &[raw(0x7000_0000, 48, INDIRECT, 0)], &[0]);
    assert_eq!(used, vec![(0, 0)]);
}
