//! virtio-blk: well-formed requests, processed synchronously and through the
//! real transport.

use std::path::Path;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::request::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use super::*;
use crate::worker::testing::{
    add_chains, device_queue, guest_memory, mock_queue, set_used_event, used_entries, wait_for, Rig, R, W,
};
use crate::{mmio, INT_VRING};

/// Guest addresses used by the tests (the mock queue lives below 0x1000).
pub(super) const HDR: u64 = 0x1_0000;
pub(super) const HDR2: u64 = 0x1_1000;
pub(super) const DATA: u64 = 0x2_0000;
pub(super) const DATA2: u64 = 0x4_0000;
pub(super) const STATUS: u64 = 0x8_0000;
pub(super) const STATUS2: u64 = 0x8_0010;

/// A disk image in the temp directory, removed on drop.
pub(super) struct TempFile(tempfile::NamedTempFile);

impl TempFile {
    /// A disk of `sectors` sectors whose byte `i` is `i % 251`.
    pub(super) fn disk(sectors: usize) -> TempFile {
        let file = tempfile::Builder::new().prefix("sm-virtio-blk-").suffix(".img").tempfile().expect("temp disk");
        let bytes: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
        std::fs::write(file.path(), bytes).expect("write temp disk");
        TempFile(file)
    }

    pub(super) fn path(&self) -> &Path {
        self.0.path()
    }

    pub(super) fn contents(&self) -> Vec<u8> {
        std::fs::read(self.0.path()).expect("read temp disk")
    }
}

/// Writes a request header at `addr`.
pub(super) fn header(mem: &GuestMemory, addr: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

pub(super) fn status(mem: &GuestMemory, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

pub(super) fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Adds `chains` to a fresh 16-entry queue, runs the device once and returns the
/// used entries and whether it asked for an interrupt.
pub(super) fn run(block: &Block, mem: &GuestMemory, chains: &[&[(u64, u32, u16)]]) -> (Vec<(u32, u32)>, bool) {
    let mq = mock_queue(mem, 0);
    add_chains(&mq, chains);
    let mut q = device_queue(&mq, 16);
    let notify = block.process_queue(mem, &mut q);
    (used_entries(&mq), notify)
}

/// Pre-fills the status byte with a marker so tests see it was written.
pub(super) fn poison_status(mem: &GuestMemory, addr: u64) {
    mem.write_obj(0xeeu8, GuestAddress(addr)).unwrap();
}

#[test]
fn write_then_flush_reaches_the_host_file_and_reads_back() {
    let disk = TempFile::disk(8);
    let block = Block::new(disk.path(), false, None).unwrap();
    let mem = guest_memory();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern[..512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&pattern[512..], GuestAddress(DATA2)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 2);
    header(&mem, HDR2, VIRTIO_BLK_T_FLUSH, 0);
    poison_status(&mem, STATUS);
    poison_status(&mem, STATUS2);
    // OUT with its data split over two descriptors, then FLUSH.
    let (used, notify) = run(
        &block,
        &mem,
        &[&[(HDR, 16, R), (DATA, 512, R), (DATA2, 512, R), (STATUS, 1, W)], &[(HDR2, 16, R), (STATUS2, 1, W)]],
    );
    assert_eq!(used, vec![(0, 1), (4, 1)]);
    assert!(notify);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(status(&mem, STATUS2), VIRTIO_BLK_S_OK);
    let file = disk.contents();
    assert_eq!(&file[1024..2048], &pattern[..], "data is in the host file");
    assert_eq!(file[1023], (1023 % 251) as u8, "neighbouring sectors untouched");
    assert_eq!(file[2048], (2048 % 251) as u8);

    // Read it back into different guest buffers.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    poison_status(&mem, STATUS);
    let (used, _) = run(&block, &mem, &[&[(HDR, 16, R), (0x6_0000, 1024, W), (STATUS, 1, W)]]);
    assert_eq!(used, vec![(0, 1025)], "used length counts data and status");
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(read_guest(&mem, 0x6_0000, 1024), pattern);
}

#[test]
fn read_returns_the_files_sectors() {
    let disk = TempFile::disk(16);
    let block = Block::new(disk.path(), true, None).unwrap();
    let mem = guest_memory();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 15);
    let (used, _) = run(&block, &mem, &[&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]]);
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(read_guest(&mem, DATA, 512), disk.contents()[15 * 512..].to_vec());
}

#[test]
fn read_only_disk_refuses_writes_and_leaves_the_file_alone() {
    let disk = TempFile::disk(4);
    let before = disk.contents();
    let block = Block::new(disk.path(), true, None).unwrap();
    assert!(block.read_only());
    assert_ne!(block.device_features() & VIRTIO_BLK_F_RO, 0, "RO offered");
    let mem = guest_memory();
    mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    poison_status(&mem, STATUS);
    let (used, _) = run(&block, &mem, &[&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]]);
    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    assert_eq!(disk.contents(), before);

    // A read-write disk does not offer RO (once the reader has let go of it).
    drop(block);
    let rw = Block::new(disk.path(), false, None).unwrap();
    assert_eq!(rw.device_features() & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn transfers_beyond_capacity_fail_with_ioerr() {
    let disk = TempFile::disk(4);
    let before = disk.contents();
    let block = Block::new(disk.path(), false, None).unwrap();
    assert_eq!(block.capacity_sectors(), 4);
    let mem = guest_memory();
    // Last sector + one more, a start past the end, and a sector that overflows.
    for (req, sector, len) in [
        (VIRTIO_BLK_T_IN, 3u64, 1024u32),
        (VIRTIO_BLK_T_IN, 4, 512),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_OUT, 3, 1024),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512, 512),
    ] {
        header(&mem, HDR, req, sector);
        poison_status(&mem, STATUS);
        let dir = if req == VIRTIO_BLK_T_IN { W } else { R };
        let (used, _) = run(&block, &mem, &[&[(HDR, 16, R), (DATA, len, dir), (STATUS, 1, W)]]);
        assert_eq!(used.len(), 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR, "type {req} sector {sector} len {len}");
    }
    assert_eq!(disk.contents(), before, "nothing written, file not extended");

    // The last sector itself is fine.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    run(&block, &mem, &[&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
}

#[test]
fn data_length_must_be_whole_sectors() {
    let disk = TempFile::disk(4);
    let block = Block::new(disk.path(), false, None).unwrap();
    let mem = guest_memory();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    run(&block, &mem, &[&[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)]]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
}

#[test]
fn get_id_returns_the_zero_padded_serial() {
    let disk = TempFile::disk(1);
    let block = Block::new(disk.path(), false, Some("disk-7".into())).unwrap();
    let mem = guest_memory();
    mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let (used, _) = run(&block, &mem, &[&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]]);
    assert_eq!(used, vec![(0, 21)]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    let mut want = [0u8; 20];
    want[..6].copy_from_slice(b"disk-7");
    assert_eq!(read_guest(&mem, DATA, 20), want);
    assert_eq!(read_guest(&mem, DATA + 20, 12), vec![0xaa; 12], "nothing written past 20 bytes");

    // A buffer shorter than 20 bytes is refused.
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    run(&block, &mem, &[&[(HDR, 16, R), (DATA, 8, W), (STATUS, 1, W)]]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);

    // Without an id the serial is derived from the file and not empty.
    drop(block);
    let default = Block::new(disk.path(), false, None).unwrap();
    assert_ne!(default.id()[0], 0);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let disk = TempFile::disk(2);
    let before = disk.contents();
    let block = Block::new(disk.path(), false, None).unwrap();
    let mem = guest_memory();
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_WRITE_ZEROES};
    for req in [VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 0xdead_beef] {
        header(&mem, HDR, req, 0);
        poison_status(&mem, STATUS);
        let (used, _) = run(&block, &mem, &[&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]]);
        assert_eq!(used, vec![(0, 1)]);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_UNSUPP, "type {req:#x}");
    }
    assert_eq!(disk.contents(), before);
}

#[test]
fn open_errors_name_the_path() {
    let missing = std::env::temp_dir().join("sm-virtio-no-such-disk.img");
    let e = Block::new(&missing, false, None).err().expect("missing file refused");
    assert!(matches!(e, BlockError::Open { .. }));
    assert!(e.to_string().contains("sm-virtio-no-such-disk.img"), "{e}");

    let dir = std::env::temp_dir();
    let e = Block::new(&dir, true, None).err().expect("directory refused");
    assert!(e.to_string().contains(&dir.display().to_string()), "{e}");

    let disk = TempFile::disk(1);
    let e = Block::new(disk.path(), false, Some("x".repeat(21))).err().expect("long id refused");
    assert!(matches!(e, BlockError::IdTooLong { .. }), "{e}");
}

#[test]
fn config_space_reports_capacity_and_limits() {
    let disk = TempFile::disk(9);
    let block = Block::new(disk.path(), false, None).unwrap();
    let mut b8 = [0u8; 8];
    block.read_config(0, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 9);
    let mut b4 = [0u8; 4];
    block.read_config(12, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), SEG_MAX);
    block.read_config(20, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 512);
    // Split reads of the capacity and reads past the end.
    block.read_config(4, &mut b4);
    assert_eq!(b4, [0; 4]);
    block.read_config(0x80, &mut b4);
    assert_eq!(b4, [0; 4]);
    let f = block.device_features();
    for bit in
        [VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_RING_F_EVENT_IDX]
    {
        assert_ne!(f & bit, 0, "feature {bit:#x} offered");
    }
    assert_eq!(block.device_type(), 2);
    assert_eq!(block.queue_max_sizes(), &[QUEUE_SIZE]);
}

#[test]
fn interrupt_requested_only_when_the_driver_asks() {
    let disk = TempFile::disk(2);
    let block = Block::new(disk.path(), false, None).unwrap();
    let mem = guest_memory();
    for (used_event, expect) in [(5u16, false), (0u16, true)] {
        let mq = mock_queue(&mem, 0);
        add_chains(&mq, &[&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]]);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        set_used_event(&mem, &mq, 16, used_event);
        let mut q = device_queue(&mq, 16);
        q.set_event_idx(true);
        assert_eq!(block.process_queue(&mem, &mut q), expect, "used_event {used_event}");
        assert_eq!(used_entries(&mq).len(), 1);
    }
}

#[test]
fn threaded_through_the_mmio_transport() {
    let disk = TempFile::disk(8);
    let block = Block::new(disk.path(), false, Some("threaded".into())).unwrap();
    let mem = guest_memory();
    let mut rig = Rig::new(Box::new(block), &mem);
    assert_eq!(rig.r(mmio::REG_DEVICE_ID), 2);
    let features = rig.device_features();
    let mq = mock_queue(&mem, 0);
    rig.negotiate(features);
    rig.setup_queue(0, 16, &mq);
    rig.driver_ok();

    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    add_chains(&mq, &[&[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]]);
    rig.notify(0);
    wait_for("used ring", || mq.used().idx().load() == 1);
    wait_for("interrupt", || rig.line.count() >= 1);
    assert_ne!(rig.r(mmio::REG_INTERRUPT_STATUS) & INT_VRING, 0);
    assert_eq!(used_entries(&mq), vec![(0, 1025)]);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(read_guest(&mem, DATA, 1024), disk.contents()[512..1536].to_vec());

    // Reset stops the worker: later notifications are not served.
    rig.w(mmio::REG_STATUS, 0);
    assert!(!rig.t.is_activated());
    add_chains(&mq, &[&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]]);
    rig.notify(0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(mq.used().idx().load(), 1);
}

#[test]
fn pause_resume_and_restore_keep_the_ring_positions() {
    let disk = TempFile::disk(8);
    let mem = guest_memory();
    let mut rig = Rig::new(Box::new(Block::new(disk.path(), false, None).unwrap()), &mem);
    let features = rig.device_features();
    let mq = mock_queue(&mem, 0);
    rig.negotiate(features);
    rig.setup_queue(0, 16, &mq);
    rig.driver_ok();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    add_chains(&mq, &[&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]]);
    rig.notify(0);
    wait_for("first request", || mq.used().idx().load() == 1);

    rig.t.pause().expect("block supports pause");
    assert_eq!(rig.t.state().queues[0].next_used, 1);
    assert_eq!(rig.t.state().queues[0].next_avail, 1);
    // A request made while paused waits...
    mq.add_desc_chains(&crate::worker::testing::chain(3, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), 3).unwrap();
    rig.notify(0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(mq.used().idx().load(), 1);
    // ...and is served after resume.
    rig.t.resume();
    wait_for("request after resume", || mq.used().idx().load() == 2);

    // Restore into a fresh transport (another process, in real life): a request
    // the driver made available before the capture is served without a new
    // notification.
    rig.t.pause().unwrap();
    mq.add_desc_chains(&crate::worker::testing::chain(6, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), 6).unwrap();
    let state = rig.t.state();
    drop(rig);
    let mut fresh = Rig::new(Box::new(Block::new(disk.path(), false, None).unwrap()), &mem);
    fresh.t.restore(&state).unwrap();
    assert!(fresh.t.is_activated());
    wait_for("pending request after restore", || mq.used().idx().load() == 3);
    assert_eq!(used_entries(&mq), vec![(0, 513), (3, 513), (6, 513)]);
}

#[test]
fn one_writer_or_many_readers_per_image() {
    let disk = TempFile::disk(2);
    let reader = Block::new(disk.path(), true, None).unwrap();
    let second_reader = Block::new(disk.path(), true, None).expect("readers share an image");
    let err = Block::new(disk.path(), false, None).err().expect("a writer beside readers is refused");
    assert!(matches!(err, BlockError::InUse { read_only: false, .. }), "{err}");
    assert!(err.to_string().contains("in use by another VM"), "{err}");
    drop((reader, second_reader));
    let writer = Block::new(disk.path(), false, None).expect("the readers are gone");
    let err = Block::new(disk.path(), true, None).err().expect("a reader beside a writer is refused");
    assert!(matches!(err, BlockError::InUse { read_only: true, .. }), "{err}");
    assert!(Block::new(disk.path(), false, None).is_err(), "a second writer is refused");
    drop(writer);
    Block::new(disk.path(), false, None).expect("the lock goes with the device");
}
