use std::collections::VecDeque;
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::frames::{read_tx_frame, write_rx_frame, FrameError};
use super::*;
use crate::worker::testing::{add_chains, device_queue, guest_memory, mock_queue, used_entries, wait_for, Rig, R, W};
use crate::{mmio, INT_VRING};

const MAC: [u8; 6] = [0x02, 0x53, 0x4d, 0x00, 0x00, 0x01];

/// A frame of `len` bytes (Ethernet header included) with a recognisable pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// The frame behind a header as the Linux driver sends it without offloads (all zero).
fn with_header(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; NET_HDR_LEN];
    v.extend_from_slice(frame);
    v
}

/// A back end the test feeds and reads.
#[derive(Clone)]
struct TestBackend {
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    incoming: Arc<Mutex<VecDeque<Vec<u8>>>>,
    ready: Arc<EventFd>,
}

impl TestBackend {
    fn new() -> TestBackend {
        TestBackend {
            sent: Arc::default(),
            incoming: Arc::default(),
            ready: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        }
    }
    fn push(&self, frame: Vec<u8>) {
        self.incoming.lock().unwrap().push_back(frame);
        self.ready.write(1).unwrap();
    }
    fn sent(&self) -> Vec<Vec<u8>> {
        self.sent.lock().unwrap().clone()
    }
}

impl NetBackend for TestBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sent.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut q = self.incoming.lock().unwrap();
        let Some(f) = q.pop_front() else {
            let _ = self.ready.read();
            return Ok(None);
        };
        if q.is_empty() {
            let _ = self.ready.read();
        }
        buf[..f.len()].copy_from_slice(&f);
        Ok(Some(f.len()))
    }
    fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

fn net(backend: &TestBackend) -> Net {
    Net::new(NetConfig { mac: MAC, mtu: DEFAULT_MTU }, Box::new(backend.clone())).unwrap()
}

// --- frames, chain by chain ---------------------------------------------------

#[test]
fn transmit_chains_give_the_frame_behind_the_header_across_descriptors() {
    let mem = guest_memory();
    let mq = mock_queue(&mem, 0);
    let bytes = with_header(&frame(1514, 7));
    mem.write_slice(&bytes[..100], GuestAddress(0x1_0000)).unwrap();
    mem.write_slice(&bytes[100..], GuestAddress(0x2_0000)).unwrap();
    add_chains(&mq, &[&[(0x1_0000, 100, R), (0x2_0000, (bytes.len() - 100) as u32, R)]]);
    let mut q = device_queue(&mq, 16);
    let mut buf = Vec::new();
    let got = read_tx_frame(&mem, q.pop_descriptor_chain(&mem).unwrap(), &mut buf).unwrap();
    assert_eq!(got, &frame(1514, 7)[..]);
}

#[test]
fn hostile_transmit_chains_are_refused_without_reading_past_the_bound() {
    let mem = guest_memory();
    let mq = mock_queue(&mem, 0);
    add_chains(
        &mq,
        &[
            &[(0x1_0000, 64, R), (0x2_0000, 64, W)], // device-writable in TX
            &[(0x1_0000, 20, R)],                    // header + 8 bytes: no Ethernet header
            &[(0x1_0000, u32::MAX, R)],              // 4 GiB claimed
            &[(0x1000_0000, 100, R)],                // outside guest memory
        ],
    );
    let mut q = device_queue(&mq, 16);
    let mut buf = Vec::new();
    let mut next = || {
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        read_tx_frame(&mem, chain, &mut buf).map(|f| f.len())
    };
    assert!(matches!(next(), Err(FrameError::WritableInTx)));
    assert!(matches!(next(), Err(FrameError::TooShort(20))));
    assert!(matches!(next(), Err(FrameError::TooLong)));
    assert!(matches!(next(), Err(FrameError::Memory(_))));
    assert!(buf.capacity() <= NET_HDR_LEN + MAX_FRAME, "no buffer grown past the bound");
}

#[test]
fn received_frames_get_a_header_and_land_exactly_across_descriptors() {
    let mem = guest_memory();
    let mq = mock_queue(&mem, 0);
    add_chains(&mq, &[&[(0x1_0000, 0x10, R), (0x2_0000, 600, W), (0x3_0000, 2048, W)]]);
    let mut q = device_queue(&mq, 16);
    let f = frame(1514, 3);
    let n = write_rx_frame(&mem, q.pop_descriptor_chain(&mem).unwrap(), &f).unwrap();
    assert_eq!(n as usize, NET_HDR_LEN + f.len());
    let mut got = read(&mem, 0x2_0000, 600);
    got.extend(read(&mem, 0x3_0000, NET_HDR_LEN + f.len() - 600));
    let mut header = [0u8; NET_HDR_LEN];
    header[10] = 1; // num_buffers
    assert_eq!(&got[..NET_HDR_LEN], &header);
    assert_eq!(&got[NET_HDR_LEN..], &f[..]);
    assert_eq!(read(&mem, 0x1_0000, 0x10), vec![0; 0x10], "the readable descriptor is not written");
}

#[test]
fn receive_chains_too_small_or_outside_memory_are_left_untouched() {
    let mem = guest_memory();
    mem.write_slice(&[0xee; 64], GuestAddress(0x2_0000)).unwrap();
    let mq = mock_queue(&mem, 0);
    add_chains(
        &mq,
        &[
            &[(0x2_0000, 64, W)],                         // too small for header + 1514
            &[(0x2_0000, 64, W), (0x1000_0000, 4096, W)], // second half outside memory
        ],
    );
    let mut q = device_queue(&mq, 16);
    let f = frame(1514, 9);
    let e = write_rx_frame(&mem, q.pop_descriptor_chain(&mem).unwrap(), &f).unwrap_err();
    assert!(matches!(e, FrameError::NoRoom { room: 64, frame: 1514 }), "{e}");
    let e = write_rx_frame(&mem, q.pop_descriptor_chain(&mem).unwrap(), &f).unwrap_err();
    assert!(matches!(e, FrameError::Memory(_)), "{e}");
    assert_eq!(read(&mem, 0x2_0000, 64), vec![0xee; 64], "no half frame written");
}

#[test]
fn an_mtu_outside_ethernet_is_refused() {
    let b = TestBackend::new();
    for mtu in [0, 67] {
        let e = Net::new(NetConfig { mac: MAC, mtu }, Box::new(b.clone())).err().expect("refused");
        assert!(e.to_string().contains(&mtu.to_string()), "{e}");
    }
}

// --- the device behind the mmio transport, with its worker thread -----------

struct NetRig {
    rig: Rig,
    rx: virtio_queue::mock::MockSplitQueue<'static, GuestMemory>,
    tx: virtio_queue::mock::MockSplitQueue<'static, GuestMemory>,
    mem: &'static GuestMemory,
    stats: Arc<NetStats>,
}

fn running_net(backend: &TestBackend) -> NetRig {
    // Leaked: the mock queues borrow guest memory for the whole test.
    let mem: &'static GuestMemory = Box::leak(Box::new(guest_memory()));
    let device = net(backend);
    let stats = device.stats();
    let mut rig = Rig::new(Box::new(device), mem);
    assert_eq!(rig.r(mmio::REG_DEVICE_ID), 1);
    let features = rig.device_features();
    for bit in [VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS] {
        assert_ne!(features & (1 << bit), 0, "feature {bit} offered");
    }
    let rx = mock_queue(mem, 0);
    let tx = mock_queue(mem, 0x4000);
    rig.negotiate(features);
    rig.setup_queue(0, 16, &rx);
    rig.setup_queue(1, 16, &tx);
    rig.driver_ok();
    NetRig { rig, rx, tx, mem, stats }
}

#[test]
fn config_space_names_the_mac_link_and_mtu() {
    let b = TestBackend::new();
    let n = net(&b);
    let mut space = [0u8; 12];
    n.read_config(0, &mut space);
    assert_eq!(&space[..6], &MAC);
    assert_eq!(u16::from_le_bytes([space[6], space[7]]), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(u16::from_le_bytes([space[10], space[11]]), DEFAULT_MTU);
    let mut beyond = [0xffu8; 4];
    n.read_config(12, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn frames_flow_both_ways_and_wait_for_receive_buffers_in_order() {
    let b = TestBackend::new();
    let mut r = running_net(&b);

    // Transmit: two frames reach the back end exactly, in order.
    let (f1, f2) = (frame(60, 1), frame(1514, 2));
    r.mem.write_slice(&with_header(&f1), GuestAddress(0x1_0000)).unwrap();
    r.mem.write_slice(&with_header(&f2), GuestAddress(0x2_0000)).unwrap();
    add_chains(&r.tx, &[&[(0x1_0000, (NET_HDR_LEN + 60) as u32, R)], &[(0x2_0000, (NET_HDR_LEN + 1514) as u32, R)]]);
    r.rig.notify(1);
    wait_for("two frames sent", || b.sent().len() == 2);
    assert_eq!(b.sent(), vec![f1, f2]);
    wait_for("TX chains used", || r.tx.used().idx().load() == 2);
    wait_for("interrupt", || r.rig.line.count() >= 1);
    assert_ne!(r.rig.r(mmio::REG_INTERRUPT_STATUS) & INT_VRING, 0);

    // Receive: three frames, one guest buffer: one lands, two wait.
    let incoming: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i * 500, 10 + i as u8)).collect();
    add_chains(&r.rx, &[&[(0x5_0000, 2048, W)]]);
    r.rig.notify(0);
    for f in &incoming {
        b.push(f.clone());
    }
    wait_for("first frame delivered", || r.rx.used().idx().load() == 1);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(r.rx.used().idx().load(), 1, "no buffer, no delivery");
    assert_eq!(r.stats.rx_dropped.load(Ordering::Relaxed), 0, "waiting frames are not dropped");

    // The guest adds buffers: the waiting frames follow, in order.
    r.rx.add_desc_chains(&crate::worker::testing::chain(1, &[(0x6_0000, 2048, W)]), 1).unwrap();
    r.rx.add_desc_chains(&crate::worker::testing::chain(2, &[(0x7_0000, 2048, W)]), 2).unwrap();
    r.rig.notify(0);
    wait_for("all three delivered", || r.rx.used().idx().load() == 3);
    let used = used_entries(&r.rx);
    for (i, (addr, f)) in [0x5_0000u64, 0x6_0000, 0x7_0000].iter().zip(&incoming).enumerate() {
        assert_eq!(used[i], (i as u32, (NET_HDR_LEN + f.len()) as u32));
        assert_eq!(&read(r.mem, addr + NET_HDR_LEN as u64, f.len()), f, "frame {i}");
    }
    assert_eq!(r.stats.rx_frames.load(Ordering::Relaxed), 3);
    assert_eq!(r.stats.tx_frames.load(Ordering::Relaxed), 2);
}

#[test]
fn a_hostile_transmit_chain_is_dropped_and_counted_and_the_device_goes_on() {
    let b = TestBackend::new();
    let mut r = running_net(&b);
    let good = frame(64, 5);
    r.mem.write_slice(&with_header(&good), GuestAddress(0x2_0000)).unwrap();
    add_chains(&r.tx, &[&[(0x1000_0000, 100, R)], &[(0x1_0000, 8, R)], &[(0x2_0000, (NET_HDR_LEN + 64) as u32, R)]]);
    r.rig.notify(1);
    wait_for("all TX chains used", || r.tx.used().idx().load() == 3);
    assert_eq!(b.sent(), vec![good]);
    assert_eq!(r.stats.tx_dropped.load(Ordering::Relaxed), 2);
}

#[test]
fn pause_hands_back_both_queues_and_resume_serves_again() {
    let b = TestBackend::new();
    let mut r = running_net(&b);
    r.rig.t.pause().expect("virtio-net supports pause");
    let f = frame(80, 4);
    r.mem.write_slice(&with_header(&f), GuestAddress(0x1_0000)).unwrap();
    add_chains(&r.tx, &[&[(0x1_0000, (NET_HDR_LEN + 80) as u32, R)]]);
    r.rig.notify(1);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert!(b.sent().is_empty(), "nothing sent while paused");
    r.rig.t.resume();
    wait_for("sent after resume", || b.sent().len() == 1);
    r.rig.t.pause().unwrap();
    assert_eq!(r.rig.t.state().queues[1].next_used, 1);
}

/// A back end whose peer is gone: always readable, every receive an error.
struct DeadBackend {
    ready: EventFd,
    recv_calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl NetBackend for DeadBackend {
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
    }
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.recv_calls.fetch_add(1, Ordering::SeqCst);
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the stream"))
    }
    fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

#[test]
fn a_dead_back_end_is_not_polled_again_and_transmit_still_completes() {
    let mem: &'static GuestMemory = Box::leak(Box::new(guest_memory()));
    let recv_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ready = EventFd::new(EFD_NONBLOCK).unwrap();
    ready.write(1).unwrap(); // readable for good, like a closed socket
    let backend = DeadBackend { ready, recv_calls: recv_calls.clone() };
    let device = Net::new(NetConfig { mac: MAC, mtu: DEFAULT_MTU }, Box::new(backend)).unwrap();
    let stats = device.stats();
    let mut rig = Rig::new(Box::new(device), mem);
    let features = rig.device_features();
    let (rx, tx) = (mock_queue(mem, 0), mock_queue(mem, 0x4000));
    rig.negotiate(features);
    rig.setup_queue(0, 16, &rx);
    rig.setup_queue(1, 16, &tx);
    rig.driver_ok();
    wait_for("the failure seen", || recv_calls.load(Ordering::SeqCst) >= 1);
    // New receive buffers do not bring the dead back end back.
    add_chains(&rx, &[&[(0x5_0000, 2048, W)]]);
    rig.notify(0);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(recv_calls.load(Ordering::SeqCst), 1, "a dead back end must not be read in a loop");
    // The guest's frames are still consumed (and counted as dropped).
    mem.write_slice(&with_header(&frame(60, 1)), GuestAddress(0x1_0000)).unwrap();
    add_chains(&tx, &[&[(0x1_0000, (NET_HDR_LEN + 60) as u32, R)]]);
    rig.notify(1);
    wait_for("TX chain used", || tx.used().idx().load() == 1);
    assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 1);
}
