//! The worker over mock queues: a guest that sends without receiving.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{Worker, WorkerQueues};
use crate::vsock::muxer::Muxer;
use crate::vsock::packet::{HOST_CID, OP_RST, OP_RW, TYPE_STREAM};
use crate::worker::testing::{add_chains, device_queue, guest_memory, mock_queue, used_entries, CountingLine, R, W};
use crate::VirtioInterrupt;

const GUEST: u64 = 3;
const HEADER: usize = 44;

/// A packet header as the guest driver lays it out (little-endian).
fn guest_header(src_port: u32, dst_port: u32, op: u16) -> [u8; HEADER] {
    let mut b = [0u8; HEADER];
    b[0..8].copy_from_slice(&GUEST.to_le_bytes());
    b[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
    b[16..20].copy_from_slice(&src_port.to_le_bytes());
    b[20..24].copy_from_slice(&dst_port.to_le_bytes());
    // len 0 at 24..28: no data descriptor.
    b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
    b[30..32].copy_from_slice(&op.to_le_bytes());
    b
}

/// A worker over mock queues in leaked guest memory (the queues borrow it
/// for the whole test), its muxer listening in a temp dir.
struct Rig {
    worker: Worker,
    rx: MockSplitQueue<'static, crate::GuestMemory>,
    tx: MockSplitQueue<'static, crate::GuestMemory>,
    mem: &'static crate::GuestMemory,
    path: std::path::PathBuf,
    dir: tempfile::TempDir,
}

fn rig(prefix: &str, tune: impl FnOnce(&mut Muxer)) -> Rig {
    let mem: &'static crate::GuestMemory = Box::leak(Box::new(guest_memory()));
    let (rx, tx, event) = (mock_queue(mem, 0), mock_queue(mem, 0x4000), mock_queue(mem, 0x8000));
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    let mut muxer = Muxer::new(GUEST, path.clone(), UnixListener::bind(&path).unwrap()).unwrap();
    tune(&mut muxer);
    let queues = WorkerQueues {
        mem: mem.clone(),
        rx: device_queue(&rx, 64),
        tx: device_queue(&tx, 64),
        event: device_queue(&event, 64),
        rx_evt: EventFd::new(0).unwrap(),
        tx_evt: EventFd::new(0).unwrap(),
        event_evt: EventFd::new(0).unwrap(),
        interrupt: Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::default()))),
    };
    let worker = Worker::new(queues, EventFd::new(0).unwrap(), muxer).unwrap();
    Rig { worker, rx, tx, mem, path, dir }
}

#[test]
fn a_guest_flooding_without_receive_buffers_grows_nothing_and_its_queue_is_always_taken() {
    let limit = 8;
    let Rig { mut worker, rx, tx, mem, dir: _dir, .. } = rig("sm-vsock-flood-", |m| m.set_control_limit(limit));

    // 40 data packets for connections that do not exist: each would earn an RST.
    let packets = 40u32;
    let chains: Vec<[(u64, u32, u16); 1]> = (0..packets)
        .map(|i| {
            let at = 0x1_0000 + u64::from(i) * 0x100;
            mem.write_slice(&guest_header(5000 + i, 7000, OP_RW), GuestAddress(at)).unwrap();
            [(at, HEADER as u32, R)]
        })
        .collect();
    add_chains(&tx, &chains.iter().map(|c| &c[..]).collect::<Vec<_>>());

    // No receive buffers: every chain is still taken (a driver may stop
    // receiving until its own sends complete), the replies stop at the limit.
    worker.pump();
    assert_eq!(used_entries(&tx).len(), packets as usize, "every transmit chain taken");
    assert_eq!(worker.muxer.control_len(), limit);
    assert_eq!(worker.muxer.replies_dropped(), u64::from(packets) - limit as u64);

    // The guest posts receive buffers: the queued RSTs arrive, in order.
    let buffers: Vec<[(u64, u32, u16); 1]> =
        (0..packets).map(|i| [(0x3_0000 + u64::from(i) * 0x100, 0x100, W)]).collect();
    add_chains(&rx, &buffers.iter().map(|c| &c[..]).collect::<Vec<_>>());
    worker.pump();
    let delivered = used_entries(&rx);
    assert_eq!(delivered.len(), limit, "the replies kept");
    for (i, (id, len)) in delivered.iter().enumerate() {
        assert_eq!(*len as usize, HEADER);
        let mut h = [0u8; HEADER];
        mem.read_slice(&mut h, GuestAddress(0x3_0000 + u64::from(*id) * 0x100)).unwrap();
        assert_eq!(u16::from_le_bytes([h[30], h[31]]), OP_RST, "packet {i}");
        assert_eq!(u32::from_le_bytes(h[20..24].try_into().unwrap()), 5000 + i as u32, "RSTs in order");
    }
    assert_eq!(worker.muxer.control_len(), 0);
}

#[test]
fn a_host_connect_the_guest_never_answers_is_dropped_once_the_client_gives_up() {
    let Rig { mut worker, path, dir: _dir, .. } = rig("sm-vsock-silent-", |_| ());
    let mut events = vec![vmm_sys_util::epoll::EpollEvent::default(); 16];
    // The guest (no buffers, no answers) never accepts: the client times out.
    let client_path = path.clone();
    let client = std::thread::spawn(move || {
        crate::vsock::connect_timeout(&client_path, 52, std::time::Duration::from_millis(300)).map(drop)
    });
    let mut rounds = 0;
    while worker.muxer.conns.is_empty() {
        assert!(rounds < 100, "the client's CONNECT never reached the muxer");
        worker.serve_once(&mut events, 100);
        rounds += 1;
    }
    let err = client.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    // Its stream is closed: the worker sees the hang-up and drops the entry.
    let mut rounds = 0;
    while !worker.muxer.conns.is_empty() {
        assert!(rounds < 100, "a Connecting entry outlived its client: {:?}", worker.muxer.conns.keys());
        worker.serve_once(&mut events, 100);
        rounds += 1;
    }
}
