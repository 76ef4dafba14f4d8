use std::collections::VecDeque;

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::addressing::{GATEWAY, GUEST_IP, GUEST_MAC};

const GW_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

/// A back end that records what it is sent and hands out queued frames.
struct Recorder {
    sent: Vec<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
    ready: EventFd,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder { sent: Vec::new(), to_guest: VecDeque::new(), ready: EventFd::new(EFD_NONBLOCK).unwrap() }
    }
}

impl NetBackend for Recorder {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sent.push(frame.to_vec());
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.to_guest.pop_front().map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            f.len()
        }))
    }
    fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

fn filter(args: &[&str], published: Vec<u16>) -> EgressFilter<Recorder> {
    EgressFilter::new(Recorder::new(), EgressPolicy::parse(args).unwrap(), published, None).unwrap()
}

fn from_guest() -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
}

fn tcp_syn(dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let b = from_guest().ipv4(GUEST_IP.octets(), dst.octets(), 64).tcp(40000, port, 1000, 64240).syn();
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GW_MAC, GUEST_MAC).ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn poll_readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

fn recv(f: &mut EgressFilter<Recorder>) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    f.recv(&mut buf).unwrap().map(|n| buf[..n].to_vec())
}

#[test]
fn a_denied_syn_never_leaves_and_the_guest_gets_a_reset_at_once() {
    let mut f = filter(&[], vec![]);
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    f.send(&tcp_syn(metadata, 80)).unwrap();
    assert!(f.inner.sent.is_empty(), "a denied packet must not reach the back end");
    assert!(poll_readable(f.ready_fd()), "the reply makes the device poll");
    let reply = recv(&mut f).expect("a reset for the guest");
    assert!(!poll_readable(f.ready_fd()), "nothing more is pending");
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
    assert_eq!((ip.header().source_addr(), ip.header().destination_addr()), (metadata, GUEST_IP));
    let Some(TransportSlice::Tcp(tcp)) = &p.transport else { panic!("not TCP") };
    assert!(tcp.rst() && tcp.ack());
    assert_eq!((tcp.source_port(), tcp.destination_port()), (80, 40000));
    assert_eq!(tcp.acknowledgment_number(), 1001, "acknowledges the SYN");
    // The checksums etherparse wrote are right.
    let mut check = Vec::new();
    PacketBuilder::ethernet2(GW_MAC, GUEST_MAC)
        .ipv4(metadata.octets(), GUEST_IP.octets(), 64)
        .tcp(80, 40000, 0, 0)
        .rst()
        .ack(1001)
        .write(&mut check, &[])
        .unwrap();
    assert_eq!(reply, check);
    assert_eq!(f.stats.denied.load(Ordering::Relaxed), 1);
}

#[test]
fn allowed_traffic_and_arp_pass_ipv6_and_junk_are_dropped() {
    let mut f = filter(&[], vec![]);
    f.send(&tcp_syn(Ipv4Addr::new(93, 184, 216, 34), 443)).unwrap();
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GATEWAY.octets());
    f.send(&arp).unwrap();
    assert_eq!(f.inner.sent.len(), 2);
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .ipv6([0xfd; 16], [0x20; 16], 64)
        .udp(1, 2)
        .write(&mut v6, b"x")
        .unwrap();
    f.send(&v6).unwrap();
    f.send(&[0u8; 5]).unwrap();
    f.send(&[]).unwrap();
    assert_eq!(f.inner.sent.len(), 2, "IPv6 and junk do not leave");
    assert_eq!(f.stats.dropped.load(Ordering::Relaxed), 3);
    assert!(recv(&mut f).is_none());
}

#[test]
fn denied_udp_gets_icmp_prohibited_quoting_the_packet() {
    let mut f = filter(&["deny-all"], vec![]);
    let frame = udp(GUEST_IP, Ipv4Addr::new(8, 8, 8, 8), 5000, 53, b"query");
    f.send(&frame).unwrap();
    assert!(f.inner.sent.is_empty());
    let reply = recv(&mut f).unwrap();
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("not ICMP") };
    assert!(matches!(icmp.icmp_type(), Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::HostProhibited)));
    assert_eq!(icmp.payload(), &frame[14..14 + 28], "IP header + 8 bytes");
}

#[test]
fn a_flood_of_denied_packets_queues_a_bounded_number_of_replies() {
    let mut f = filter(&["deny-all"], vec![]);
    for _ in 0..10 * INJECT_LIMIT {
        f.send(&tcp_syn(Ipv4Addr::new(1, 2, 3, 4), 80)).unwrap();
    }
    assert_eq!(f.injected.len(), INJECT_LIMIT);
    assert_eq!(f.stats.denied.load(Ordering::Relaxed), 10 * INJECT_LIMIT as u64);
    // Resets are not answered.
    let mut f = filter(&["deny-all"], vec![]);
    let mut rst = Vec::new();
    from_guest().ipv4(GUEST_IP.octets(), [1, 2, 3, 4], 64).tcp(1, 2, 3, 0).rst().write(&mut rst, &[]).unwrap();
    f.send(&rst).unwrap();
    assert!(f.injected.is_empty());
}

fn dns_answer(name: &str, addrs: &[[u8; 4]]) -> Vec<u8> {
    let mut reply = simple_dns::Packet::new_reply(7);
    let qname = simple_dns::Name::new_unchecked(name);
    reply.questions.push(simple_dns::Question::new(
        qname.clone(),
        simple_dns::TYPE::A.into(),
        simple_dns::CLASS::IN.into(),
        false,
    ));
    for a in addrs {
        reply.answers.push(simple_dns::ResourceRecord::new(
            qname.clone(),
            simple_dns::CLASS::IN,
            60,
            simple_dns::rdata::RData::A(simple_dns::rdata::A { address: u32::from_be_bytes(*a) }),
        ));
    }
    reply.build_bytes_vec().unwrap()
}

/// A filter whose DNS relay goes to a socket of the test's (the upstream).
fn filter_with_resolver(args: &[&str]) -> (EgressFilter<Recorder>, std::net::UdpSocket) {
    let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    upstream.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let addr = std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, upstream.local_addr().unwrap().port());
    let relay = DnsRelay::new(addr).unwrap();
    let f = EgressFilter::new(Recorder::new(), EgressPolicy::parse(args).unwrap(), vec![], Some(relay)).unwrap();
    (f, upstream)
}

/// The guest asks `name`; the upstream answers `addrs`; returns the frame the
/// guest gets.
fn resolve(f: &mut EgressFilter<Recorder>, upstream: &std::net::UdpSocket, name: &str, addrs: &[[u8; 4]]) -> Vec<u8> {
    let query = dns_answer(name, &[]); // a message with the question (id 7)
    let mut frame = Vec::new();
    from_guest().ipv4(GUEST_IP.octets(), DNS.octets(), 64).udp(5353, 53).write(&mut frame, &query).unwrap();
    f.send(&frame).unwrap();
    assert!(f.inner.sent.iter().all(|s| s != &frame), "DNS is relayed, not sent to the back end");
    let mut buf = [0u8; 512];
    let (n, relay_addr) = upstream.recv_from(&mut buf).expect("the relay forwards the query");
    assert_eq!(&buf[..n], &query[..]);
    upstream.send_to(&dns_answer(name, addrs), relay_addr).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(frame) = recv(f) {
            return frame;
        }
        assert!(std::time::Instant::now() < deadline, "no answer for the guest");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn names_are_allowed_by_the_addresses_the_relayed_answers_give() {
    let (mut f, upstream) = filter_with_resolver(&["deny-all", "allow=pypi.org:443", "allow=*.example.com"]);
    let pypi = Ipv4Addr::new(151, 101, 0, 223);
    f.send(&tcp_syn(pypi, 443)).unwrap();
    assert!(f.inner.sent.is_empty(), "not resolved yet");
    let _ = recv(&mut f);
    // A DNS answer coming from the back end's side teaches nothing, even one
    // that claims to be from the resolver's address.
    let forged = udp(DNS, GUEST_IP, 53, 5000, &dns_answer("pypi.org", &[pypi.octets()]));
    f.inner.to_guest.push_back(forged);
    assert!(recv(&mut f).is_some());
    f.send(&tcp_syn(pypi, 443)).unwrap();
    assert!(f.inner.sent.is_empty());
    let _ = recv(&mut f);
    // The relayed answer does, and reaches the guest from 10.0.2.3:53.
    let frame = resolve(&mut f, &upstream, "PyPI.org", &[pypi.octets()]);
    let p = SlicedPacket::from_ethernet(&frame).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
    assert_eq!((ip.header().source_addr(), ip.header().destination_addr()), (DNS, GUEST_IP));
    let Some(TransportSlice::Udp(u)) = &p.transport else { panic!("not UDP") };
    assert_eq!((u.source_port(), u.destination_port()), (53, 5353));
    assert!(simple_dns::Packet::parse(u.payload()).is_ok());
    f.send(&tcp_syn(pypi, 443)).unwrap();
    assert_eq!(f.inner.sent.len(), 1, "allowed once resolved");
    f.send(&tcp_syn(pypi, 80)).unwrap();
    assert_eq!(f.inner.sent.len(), 1, "the rule's port still applies");
    assert!(f.injected.len() == 1 && recv(&mut f).is_some(), "its reset");
    // A wildcard rule; a name that matches no rule teaches nothing.
    let cdn = Ipv4Addr::new(203, 0, 113, 9);
    f.learn(&dns_answer("evil.org", &[cdn.octets()]));
    f.send(&tcp_syn(cdn, 22)).unwrap();
    assert_eq!(f.inner.sent.len(), 1);
    let _ = recv(&mut f);
    resolve(&mut f, &upstream, "www.example.com", &[cdn.octets()]);
    f.send(&tcp_syn(cdn, 22)).unwrap();
    assert_eq!(f.inner.sent.len(), 2, "{:?}", f.learned);
    assert_eq!(f.stats.learned.load(Ordering::Relaxed), 2);
}

#[test]
fn the_resolver_is_udp_only_tcp_to_it_is_reset() {
    let (mut f, _upstream) = filter_with_resolver(&[]);
    f.send(&tcp_syn(DNS, 53)).unwrap();
    assert!(f.inner.sent.is_empty());
    let reply = recv(&mut f).expect("a reset");
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    assert!(matches!(&p.transport, Some(TransportSlice::Tcp(t)) if t.rst()));
}

#[test]
fn without_a_name_rule_deny_all_refuses_dns_too() {
    let (mut f, upstream) = filter_with_resolver(&["deny-all", "allow=1.1.1.1"]);
    let mut frame = Vec::new();
    from_guest().ipv4(GUEST_IP.octets(), DNS.octets(), 64).udp(5353, 53).write(&mut frame, &[0; 12]).unwrap();
    f.send(&frame).unwrap();
    upstream.set_read_timeout(Some(std::time::Duration::from_millis(100))).unwrap();
    assert!(upstream.recv_from(&mut [0u8; 64]).is_err(), "nothing relayed");
    assert_eq!(f.stats.denied.load(Ordering::Relaxed), 1);
}

#[test]
fn learned_addresses_are_bounded() {
    let mut f = filter(&["allow=*.example.com"], vec![]);
    for i in 0..(LEARNED_LIMIT as u32 + 100) {
        f.learn(&dns_answer("a.example.com", &[(0x0b00_0000 + i).to_be_bytes()]));
    }
    assert_eq!(f.learned.members.len(), LEARNED_LIMIT);
    assert_eq!(f.learned.order.len(), LEARNED_LIMIT);
}

#[test]
fn replies_on_a_published_port_pass_but_the_port_opens_nothing_else() {
    let mut f = filter(&["deny-all"], vec![8080]);
    let client = GATEWAY;
    // The host connects in: SYN from the back end to guest port 8080.
    let mut syn = Vec::new();
    PacketBuilder::ethernet2(GW_MAC, GUEST_MAC)
        .ipv4(client.octets(), GUEST_IP.octets(), 64)
        .tcp(51000, 8080, 5, 64240)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    f.inner.to_guest.push_back(syn);
    assert!(recv(&mut f).is_some());
    let synack = |dport: u16| {
        let mut out = Vec::new();
        from_guest()
            .ipv4(GUEST_IP.octets(), client.octets(), 64)
            .tcp(8080, dport, 9, 64240)
            .syn()
            .ack(6)
            .write(&mut out, &[])
            .unwrap();
        out
    };
    f.send(&synack(51000)).unwrap();
    assert_eq!(f.inner.sent.len(), 1, "the reply to the incoming connection passes");
    f.send(&synack(51001)).unwrap();
    assert_eq!(f.inner.sent.len(), 1, "from the published port to another peer port: denied");
}

#[test]
fn the_guest_is_announced_to_the_back_end_with_a_gratuitous_arp() {
    let mut f = filter(&[], vec![]);
    f.announce(GUEST_MAC, GUEST_IP).unwrap();
    let frame = &f.inner.sent[0];
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else { panic!("not Ethernet") };
    assert_eq!((eth.source(), eth.destination()), (GUEST_MAC, [0xff; 6]));
    let Some(NetSlice::Arp(arp)) = &p.net else { panic!("not ARP") };
    assert_eq!(arp.sender_hw_addr(), GUEST_MAC);
    assert_eq!(
        (arp.sender_protocol_addr(), arp.target_protocol_addr()),
        (&GUEST_IP.octets()[..], &GUEST_IP.octets()[..])
    );
}

#[test]
fn under_deny_all_only_the_rules_names_are_resolved() {
    let (mut f, upstream) = filter_with_resolver(&["deny-all", "allow=pypi.org"]);
    upstream.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
    let ask = |f: &mut EgressFilter<Recorder>, name: &str| {
        let mut frame = Vec::new();
        from_guest()
            .ipv4(GUEST_IP.octets(), DNS.octets(), 64)
            .udp(5353, 53)
            .write(&mut frame, &dns_answer(name, &[]))
            .unwrap();
        f.send(&frame).unwrap();
    };
    ask(&mut f, "exfiltrate-this.attacker.example");
    assert!(upstream.recv_from(&mut [0u8; 512]).is_err(), "an unlisted name is not relayed");
    assert!(recv(&mut f).is_some(), "the guest is told at once (ICMP)");
    assert_eq!(f.stats.denied.load(Ordering::Relaxed), 1);
    ask(&mut f, "pypi.org");
    assert!(upstream.recv_from(&mut [0u8; 512]).is_ok(), "a listed name is relayed");
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    arp_frame(etherparse::ArpOperation::REQUEST, (GUEST_MAC, GUEST_IP), ([0; 6], target), [0xff; 6]).unwrap()
}

#[test]
fn on_a_tap_the_filter_answers_arp_for_the_resolver_and_nothing_else() {
    let (mut f, _upstream) = filter_with_resolver(&[]);
    // Off by default (passt answers ARP itself): the request goes out.
    f.send(&arp_request(DNS)).unwrap();
    assert_eq!(f.inner.sent.len(), 1);
    assert_eq!(recv(&mut f), None);

    f.answer_resolver_arp();
    f.send(&arp_request(DNS)).unwrap();
    assert_eq!(f.inner.sent.len(), 1, "answered here, not sent on");
    assert!(poll_readable(f.ready_fd()), "the answer wakes the device");
    let reply = recv(&mut f).expect("an ARP reply");
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else { panic!("not Ethernet") };
    assert_eq!((eth.source(), eth.destination()), (RESOLVER_MAC, GUEST_MAC));
    let Some(NetSlice::Arp(arp)) = &p.net else { panic!("not ARP") };
    assert_eq!(arp.operation(), etherparse::ArpOperation::REPLY);
    assert_eq!((arp.sender_hw_addr(), arp.sender_protocol_addr()), (&RESOLVER_MAC[..], &DNS.octets()[..]));
    assert_eq!((arp.target_hw_addr(), arp.target_protocol_addr()), (&GUEST_MAC[..], &GUEST_IP.octets()[..]));

    // ARP for the gateway is the back end's to answer.
    f.send(&arp_request(GATEWAY)).unwrap();
    assert_eq!(f.inner.sent.len(), 2);
    assert_eq!(recv(&mut f), None);

    // Without a relay there is nobody to answer for.
    let mut plain = filter(&[], vec![]);
    plain.answer_resolver_arp();
    plain.send(&arp_request(DNS)).unwrap();
    assert_eq!(plain.inner.sent.len(), 1);
}
