//! A hostile guest driving a virtio-mmio transport: register reads and
//! writes, guest memory it fills with rings and descriptors, queue
//! notifications — against each device kind, whose worker thread serves
//! whatever the rings say: virtio-blk on a small temp file, virtio-rng,
//! virtio-balloon, vsock (a host socket of its own) and virtio-net (its back
//! end a passt-framed stream whose host side sends the input's bytes as
//! frames). And the transport state a snapshot carries.

use std::any::Any;
use std::io::Write;
use std::os::unix::net::UnixStream;
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
        run: |data| run_mmio(Kind::Block, data),
        seeds: mmio_seeds,
        max_len: 2048,
        cost: 30,
    }
}

pub fn mmio_rng() -> Target {
    Target {
        name: "virtio-mmio-rng",
        what: "sm-virtio: a guest's register accesses, ring contents and notifications on virtio-rng over mmio",
        run: |data| run_mmio(Kind::Rng, data),
        seeds: mmio_seeds,
        max_len: 2048,
        cost: 30,
    }
}

pub fn mmio_balloon() -> Target {
    Target {
        name: "virtio-mmio-balloon",
        what: "sm-virtio: a guest's register accesses, ring contents and notifications on virtio-balloon over mmio",
        run: |data| run_mmio(Kind::Balloon, data),
        seeds: mmio_seeds,
        max_len: 2048,
        cost: 30,
    }
}

pub fn mmio_vsock() -> Target {
    Target {
        name: "virtio-mmio-vsock",
        what: "sm-virtio: a guest's register accesses, ring contents and notifications on vsock over mmio",
        run: |data| run_mmio(Kind::Vsock, data),
        seeds: mmio_seeds,
        max_len: 2048,
        cost: 40,
    }
}

pub fn mmio_net() -> Target {
    Target {
        name: "virtio-mmio-net",
        what: "sm-virtio: a guest's register accesses, ring contents and notifications on virtio-net over mmio, \
               the input's bytes also arriving from its back end as passt-framed frames",
        run: |data| run_mmio(Kind::Net, data),
        seeds: mmio_seeds,
        max_len: 2048,
        cost: 30,
    }
}

/// The device behind the transport.
#[derive(Clone, Copy)]
enum Kind {
    Block,
    Rng,
    Balloon,
    Vsock,
    Net,
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

/// The transport over a device of `kind`, guest memory, and what must live
/// as long as the device (its disk file, socket directory, back end peer).
/// `backend_bytes` is what a net back end's host side sends.
fn rig(kind: Kind, backend_bytes: &[u8]) -> (MmioTransport, GuestMemory, Box<dyn Any>) {
    let (device, keep): (Box<dyn sm_virtio::VirtioDevice>, Box<dyn Any>) = match kind {
        Kind::Block => {
            let disk = tempfile::NamedTempFile::new().expect("disk file");
            disk.as_file().set_len(8 * 512).expect("disk size");
            (Box::new(Block::new(disk.path(), false, None).expect("block device")), Box::new(disk))
        }
        Kind::Rng => (Box::new(sm_virtio::rng::Rng::new().expect("rng device")), Box::new(())),
        Kind::Balloon => (Box::new(sm_virtio::balloon::Balloon::new(true).expect("balloon device")), Box::new(())),
        Kind::Vsock => {
            let dir = tempfile::tempdir().expect("socket directory");
            let vsock = sm_virtio::vsock::Vsock::new(3, &dir.path().join("v.sock")).expect("vsock device");
            (Box::new(vsock), Box::new(dir))
        }
        Kind::Net => {
            let (ours, mut peer) = UnixStream::pair().expect("socketpair");
            // passt's framing: a 4-byte big-endian length, then the frame.
            let mut framed = (backend_bytes.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(backend_bytes);
            framed.extend_from_slice(&64u32.to_be_bytes());
            framed.extend_from_slice(&[0xab; 64]);
            let _ = peer.write_all(&framed);
            let backend = sm_net::StreamFramer::new(ours).expect("framer");
            let config = sm_virtio::net::NetConfig { mac: [2, 0, 0, 0, 0, 1], mtu: 1500 };
            (Box::new(sm_virtio::net::Net::new(config, Box::new(backend)).expect("net device")), Box::new(peer))
        }
    };
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory");
    let transport = MmioTransport::new(device, mem.clone(), Arc::new(NoLine)).expect("transport");
    (transport, mem, keep)
}

/// One operation: `[op][offset: u16 le][value: u32 le]` (7 bytes).
/// op % 4: 0 register write, 1 register read, 2 guest memory write (the
/// value at offset * 4), 3 queue notify.
fn run_mmio(kind: Kind, data: &[u8]) {
    let (mut t, mem, _keep) = rig(kind, data);
    for op in data.chunks_exact(7).take(MAX_OPS) {
        apply(&mut t, &mem, op);
    }
    t.reset();
}

/// One 7-byte operation (see [`run_mmio`]).
fn apply(t: &mut MmioTransport, mem: &GuestMemory, op: &[u8]) {
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

/// 1, 2, 4 or 8 bytes, from the op's high bits (drivers use 4).
fn width(op: u8) -> usize {
    [4, 1, 2, 8][usize::from(op >> 6)]
}

fn op(kind: u8, offset: u32, value: u32) -> Vec<u8> {
    let o = (offset as u16).to_le_bytes();
    let v = value.to_le_bytes();
    vec![kind, o[0], o[1], v[0], v[1], v[2], v[3]]
}

/// A driver bringing `queues` queues up — queue q's descriptors at
/// 0x1000 + q * 0x3000, its avail and used rings 0x1000 and 0x2000 above —
/// then, on every queue, a chain: a 16-byte readable header at 0xd000
/// (a virtio-blk read request of sector 0), a 512-byte writable buffer at
/// 0xe000 and a 1-byte writable status at 0xd100, and a notify.
fn driver_seed(queues: u32) -> Vec<u8> {
    let w = |reg: u32, v: u32| op(0, reg, v);
    let m = |addr: u32, v: u32| op(2, addr / 4, v);
    let mut s = Vec::new();
    for status in [1, 3] {
        s.push(w(VIRTIO_MMIO_STATUS, status));
    }
    s.push(w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1));
    s.push(w(VIRTIO_MMIO_DRIVER_FEATURES, 1)); // VERSION_1
    s.push(w(VIRTIO_MMIO_STATUS, 11));
    for q in 0..queues {
        let base = 0x1000 + q * 0x3000;
        s.push(w(VIRTIO_MMIO_QUEUE_SEL, q));
        s.push(w(VIRTIO_MMIO_QUEUE_NUM, 8));
        s.push(w(VIRTIO_MMIO_QUEUE_DESC_LOW, base));
        s.push(w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000));
        s.push(w(VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000));
        s.push(w(VIRTIO_MMIO_QUEUE_READY, 1));
    }
    s.push(w(VIRTIO_MMIO_STATUS, 15));
    s.push(m(0xd000, 0)); // VIRTIO_BLK_T_IN
    for q in 0..queues {
        let base = 0x1000 + q * 0x3000;
        // Descriptors: header (16 B) -> data (512 B, write) -> status (1 B, write).
        let desc = |i: u32, addr: u32, len: u32, flags: u16, next: u16| {
            let at = base + i * 16;
            vec![m(at, addr), m(at + 4, 0), m(at + 8, len), m(at + 12, u32::from(flags) | (u32::from(next) << 16))]
        };
        s.extend(desc(0, 0xd000, 16, 1, 1));
        s.extend(desc(1, 0xe000, 512, 3, 2));
        s.extend(desc(2, 0xd100, 1, 2, 0));
        s.push(m(base + 0x1004, 0)); // avail ring[0] = head 0
        s.push(m(base + 0x1000, 1 << 16)); // avail idx = 1
        s.push(op(3, 0, q));
    }
    s.concat()
}

/// The driver seed for 1, 2 and 3 queues (blk and rng have 1, net 2,
/// balloon and vsock 3), and one that sets DRIVER_OK first.
fn mmio_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = (1..=3).map(driver_seed).collect();
    let mut bad_status_first = op(0, VIRTIO_MMIO_STATUS, 15);
    bad_status_first.extend_from_slice(&seeds[0]);
    seeds.push(bad_status_first);
    seeds
}

/// The seeds do reach each device: the transport activates it (so the
/// fuzzer starts from a device serving its rings, not from refusals).
#[cfg(test)]
#[test]
fn the_driver_seed_activates_every_device_kind() {
    for (kind, queues) in [(Kind::Block, 1), (Kind::Rng, 1), (Kind::Net, 2), (Kind::Balloon, 3), (Kind::Vsock, 3)] {
        let (mut t, mem, _keep) = rig(kind, &[]);
        for op in driver_seed(queues).chunks_exact(7) {
            apply(&mut t, &mem, op);
        }
        assert!(t.is_activated(), "{queues} queue(s): status {:#x}", t.status());
        t.reset();
    }
}

fn run_state(data: &[u8]) {
    let Ok(state) = TransportState::decode(data) else { return };
    let (mut t, _mem, _keep) = rig(Kind::Block, &[]);
    let _ = t.restore(&state);
    t.reset();
}

fn state_seeds() -> Vec<Vec<u8>> {
    let (mut t, _mem, _keep) = rig(Kind::Block, &[]);
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
