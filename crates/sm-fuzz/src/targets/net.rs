//! What a guest sends on its network and what passt sends back: frames
//! through the egress filter both ways, egress rules as typed on a command
//! line, and passt's length-prefixed stream.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use etherparse::PacketBuilder;
use sm_net::addressing::{DNS, GATEWAY, GUEST_IP, GUEST_MAC};
use sm_net::filter::arp_frame;
use sm_net::{DnsRelay, EgressFilter, EgressPolicy, StreamFramer};
use sm_virtio::net::{NetBackend, MAX_FRAME};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Target;

pub fn egress_frames() -> Target {
    Target {
        name: "egress-frames",
        what: "sm-net: EgressFilter on frames from the guest and from the back end (with a DNS relay)",
        run: run_frames,
        seeds: frame_seeds,
        max_len: 2048,
        cost: 4,
    }
}

pub fn egress_rules() -> Target {
    Target {
        name: "egress-rules",
        what: "sm-net: EgressPolicy::parse of --egress values, then decisions",
        run: run_rules,
        seeds: rule_seeds,
        max_len: 256,
        cost: 1,
    }
}

pub fn passt_stream() -> Target {
    Target {
        name: "passt-stream",
        what: "sm-net: StreamFramer reading passt's length-prefixed frames from a socket",
        run: run_stream,
        seeds: stream_seeds,
        max_len: 4096,
        cost: 2,
    }
}

/// A back end that swallows what it is sent and hands out queued frames.
struct Queue {
    to_guest: Arc<Mutex<VecDeque<Vec<u8>>>>,
    ready: EventFd,
}

impl NetBackend for Queue {
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(frame) = self.to_guest.lock().expect("queue").pop_front() else { return Ok(None) };
        if frame.len() > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too long"));
        }
        buf[..frame.len()].copy_from_slice(&frame);
        Ok(Some(frame.len()))
    }
    fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

/// Chunks of `[direction][len u16 le][frame]`: even direction bytes are
/// frames from the guest, odd ones frames from the back end.
fn run_frames(data: &[u8]) {
    // The relay's upstream: a socket of ours on loopback that never answers.
    let upstream = UdpSocket::bind("127.0.0.1:0").expect("upstream socket");
    let Ok(std::net::SocketAddr::V4(addr)) = upstream.local_addr() else { return };
    let relay = DnsRelay::new(addr).expect("relay");
    let policy =
        EgressPolicy::parse(&["allow=example.test:443", "deny=10.0.0.0/8", "allow=host.supermachine.internal:80"])
            .expect("policy");
    let to_guest = Arc::new(Mutex::new(VecDeque::new()));
    let backend = Queue { to_guest: to_guest.clone(), ready: EventFd::new(EFD_NONBLOCK).expect("eventfd") };
    let mut filter = EgressFilter::new(backend, policy, vec![8000], Some(relay)).expect("filter");
    filter.answer_resolver_arp();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut rest = data;
    while rest.len() >= 3 {
        let from_guest = rest[0].is_multiple_of(2);
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let frame = &rest[3..3 + len];
        rest = &rest[3 + len..];
        if from_guest {
            let _ = filter.send(frame);
        } else {
            to_guest.lock().expect("queue").push_back(frame.to_vec());
        }
        // Whatever the filter made for the guest (resets, ICMP, ARP, DNS).
        for _ in 0..70 {
            match filter.recv(&mut buf) {
                Ok(Some(n)) => assert!(n <= buf.len()),
                _ => break,
            }
        }
    }
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let eth = || PacketBuilder::ethernet2(GUEST_MAC, [0x9a; 6]);
    let mut syn = Vec::new();
    eth().ipv4(GUEST_IP.octets(), [10, 1, 2, 3], 64).tcp(40000, 443, 1, 64240).syn().write(&mut syn, &[]).unwrap();
    let mut syn_gw = Vec::new();
    eth().ipv4(GUEST_IP.octets(), GATEWAY.octets(), 64).tcp(40001, 80, 1, 64240).syn().write(&mut syn_gw, &[]).unwrap();
    let mut dns = Vec::new();
    let query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 4, b't', b'e', b's',
        b't', 0, 0, 1, 0, 1,
    ];
    eth().ipv4(GUEST_IP.octets(), DNS.octets(), 64).udp(5353, 53).write(&mut dns, &query).unwrap();
    let mut ping = Vec::new();
    eth().ipv4(GUEST_IP.octets(), [1, 1, 1, 1], 64).icmpv4_echo_request(1, 1).write(&mut ping, b"ping").unwrap();
    let mut inbound = Vec::new();
    PacketBuilder::ethernet2([0x9a; 6], GUEST_MAC)
        .ipv4(GATEWAY.octets(), GUEST_IP.octets(), 64)
        .tcp(50000, 8000, 1, 64240)
        .syn()
        .write(&mut inbound, &[])
        .unwrap();
    let arp_frame =
        arp_frame(etherparse::ArpOperation::REQUEST, (GUEST_MAC, GUEST_IP), ([0; 6], DNS), [0xff; 6]).unwrap();
    let chunk = |dir: u8, f: &[u8]| [&[dir][..], &(f.len() as u16).to_le_bytes(), f].concat();
    vec![
        [chunk(0, &syn), chunk(0, &syn_gw), chunk(0, &dns)].concat(),
        [chunk(1, &inbound), chunk(0, &ping), chunk(0, &arp_frame)].concat(),
    ]
}

fn run_rules(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let rules: Vec<&str> = text.split('\n').collect();
    if let Ok(policy) = EgressPolicy::parse(&rules) {
        for (addr, port) in
            [(Ipv4Addr::new(8, 8, 8, 8), Some(53)), (GATEWAY, Some(80)), (DNS, None), (Ipv4Addr::BROADCAST, Some(0))]
        {
            let _ = policy.decide(addr, port, |_, _| false);
            let _ = policy.decide(addr, port, |_, _| true);
        }
    }
}

fn rule_seeds() -> Vec<Vec<u8>> {
    vec![
        b"allow=pypi.org:443\ndeny=10.0.0.0/8\ndeny-all".to_vec(),
        b"allow=*.example.com\nallow=192.168.1.0/24:8080\ndeny=host.supermachine.internal".to_vec(),
    ]
}

fn run_stream(data: &[u8]) {
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    let mut framer = StreamFramer::new(ours).expect("framer");
    theirs.write_all(data).expect("the bytes fit the socket buffer");
    drop(theirs);
    let mut buf = vec![0u8; MAX_FRAME];
    for _ in 0..data.len() + 1 {
        match framer.recv(&mut buf) {
            Ok(Some(n)) => assert!(n <= buf.len()),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = framer.send(b"a frame back");
}

fn stream_seeds() -> Vec<Vec<u8>> {
    let frame = |len: usize| [&(len as u32).to_be_bytes()[..], &vec![0x42; len]].concat();
    vec![[frame(60), frame(1514), frame(0)].concat(), frame(14)]
}
