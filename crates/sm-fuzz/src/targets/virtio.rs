//! A hostile guest driving a virtio-mmio transport: register reads and
//! writes, guest memory it fills with rings and descriptors, queue
//! notifications — against a virtio-blk device on a small temp file, whose
//! worker thread serves whatever the rings say. And the transport state a
//! snapshot carries.

use std::sync::Arc;

use sm_virtio::block::Block;
use sm_virtio::mmio::{MmioTransport, TransportState};
use sm_virtio::{GuestMemory, InterruptLine};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};

use crate::Target;

/// Guest RAM of the rig: rings, descriptors and buffers live here.
const RAM: u64 = 64 << 10;
/// Operations one input may hold.
const MAX_OPS: usize = 256;

pub fn mmio() -> Target {
    Target {
        name: "virtio-mmio",
        what: "sm-virtio: a guest's register accesses, ring contents and notifications on virtio-blk over mmio",
        run: run_mmio,
        seeds: mmio_seeds,
        max_len: 1024,
        cost: 30,
    }
}

pub fn state() -> Target {
    Target {
        name: "virtio-state",
        what: "sm-virtio: TransportState::decode (a snapshot's transport section) and restore",
        run: run_state,
        seeds: state_seeds,
        max_len: 512,
        cost: 20,
    }
}

struct NoLine;

impl InterruptLine for NoLine {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn rig() -> (MmioTransport, GuestMemory, tempfile::NamedTempFile) {
    let disk = tempfile::NamedTempFile::new().expect("disk file");
    disk.as_file().set_len(8 * 512).expect("disk size");
    let block = Block::new(disk.path(), false, None).expect("block device");
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory");
    let transport = MmioTransport::new(Box::new(block), mem.clone(), Arc::new(NoLine)).expect("transport");
    (transport, mem, disk)
}

/// One operation: `[op][offset: u16 le][value: u32 le]` (7 bytes).
/// op % 4: 0 register write, 1 register read, 2 guest memory write (the
/// value at offset * 4), 3 queue notify.
fn run_mmio(data: &[u8]) {
    let (mut t, mem, _disk) = rig();
    for op in data.chunks_exact(7).take(MAX_OPS) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match op[0] % 4 {
            0 => t.write(offset % 0x200, &(u64::from(value) * 0x1_0000_0001).to_le_bytes()[..width(op[0])]),
            1 => {
                let mut b = [0u8; 8];
                t.read(offset % 0x200, &mut b[..width(op[0])]);
            }
            2 => {
                let _ = mem.write_slice(&value.to_le_bytes(), GuestAddress((offset * 4) % RAM));
            }
            _ => t.write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &value.to_le_bytes()),
        }
    }
    t.reset();
}

/// 1, 2, 4 or 8 bytes, from the op's high bits (drivers use 4).
fn width(op: u8) -> usize {
    [4, 1, 2, 8][usize::from(op >> 6)]
}

fn op(kind: u8, offset: u32, value: u32) -> Vec<u8> {
    let o = (offset as u16).to_le_bytes();
    let v = value.to_le_bytes();
    vec![kind, o[0], o[1], v[0], v[1], v[2], v[3]]
}

/// A driver bringing queue 0 up at 0x1000 (descriptors), 0x2000 (avail)
/// and 0x3000 (used), then a read request of sector 0 into 0x4000.
fn mmio_seeds() -> Vec<Vec<u8>> {
    let w = |reg: u32, v: u32| op(0, reg, v);
    let m = |addr: u32, v: u32| op(2, addr / 4, v);
    let mut s = Vec::new();
    for status in [1, 3] {
        s.push(w(VIRTIO_MMIO_STATUS, status));
    }
    s.push(w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1));
    s.push(w(VIRTIO_MMIO_DRIVER_FEATURES, 1)); // VERSION_1
    s.push(w(VIRTIO_MMIO_STATUS, 11));
    s.push(w(VIRTIO_MMIO_QUEUE_SEL, 0));
    s.push(w(VIRTIO_MMIO_QUEUE_NUM, 8));
    s.push(w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000));
    s.push(w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000));
    s.push(w(VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000));
    s.push(w(VIRTIO_MMIO_QUEUE_READY, 1));
    s.push(w(VIRTIO_MMIO_STATUS, 15));
    // Descriptors: header (16 B) -> data (512 B, write) -> status (1 B, write).
    let desc = |i: u32, addr: u32, len: u32, flags: u16, next: u16| {
        let base = 0x1000 + i * 16;
        vec![m(base, addr), m(base + 4, 0), m(base + 8, len), m(base + 12, u32::from(flags) | (u32::from(next) << 16))]
    };
    s.extend(desc(0, 0x5000, 16, 1, 1));
    s.extend(desc(1, 0x4000, 512, 3, 2));
    s.extend(desc(2, 0x5100, 1, 2, 0));
    s.push(m(0x5000, 0)); // VIRTIO_BLK_T_IN
    s.push(m(0x2004, 0)); // avail ring[0] = head 0
    s.push(m(0x2000, 1 << 16)); // avail idx = 1
    s.push(op(3, 0, 0));
    let seed = s.concat();
    let mut bad_status_first = op(0, VIRTIO_MMIO_STATUS, 15);
    bad_status_first.extend_from_slice(&seed);
    vec![seed, bad_status_first]
}

fn run_state(data: &[u8]) {
    let Ok(state) = TransportState::decode(data) else { return };
    let (mut t, _mem, _disk) = rig();
    let _ = t.restore(&state);
    t.reset();
}

fn state_seeds() -> Vec<Vec<u8>> {
    let (mut t, _mem, _disk) = rig();
    let fresh = t.state().encode();
    for (reg, v) in [
        (VIRTIO_MMIO_STATUS, 1),
        (VIRTIO_MMIO_STATUS, 3),
        (VIRTIO_MMIO_QUEUE_NUM, 8),
        (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000),
        (VIRTIO_MMIO_QUEUE_READY, 1u32),
    ] {
        t.write(u64::from(reg), &v.to_le_bytes());
    }
    vec![fresh, t.state().encode()]
}
