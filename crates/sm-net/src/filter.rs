//! The egress policy enforced on the host side of virtio-net: a back end that
//! wraps another one (passt) and inspects every frame the guest sends before
//! it leaves the VMM, so nothing the guest does can get around it.
//!
//! - ARP passes; IPv6 and other EtherTypes are dropped (the network is IPv4).
//! - An IPv4 packet is judged by its destination address and TCP/UDP port
//!   ([`EgressPolicy::decide`]). A denied TCP segment is answered with a reset,
//!   anything else denied with ICMP "administratively prohibited", so the guest
//!   fails at once instead of waiting for a timeout; each denial is counted and
//!   logged (rate-limited).
//! - Replies of connections coming in through a published port pass: SYNs from
//!   the back end to a published guest port are remembered (bounded).
//! - The guest's resolver, 10.0.2.3:53 (UDP), is answered here through a
//!   [`DnsRelay`] to an upstream resolver; under `deny-all` only queries for
//!   the names of host-name rules are relayed (others could carry data out).
//!   Host-name rules learn their addresses from the relayed answers (which
//!   the guest cannot forge): the A records of an answer to a question whose
//!   name matches a rule become allowed by that rule, for the VM's life
//!   (bounded).

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{Icmpv4Type, LinkSlice, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use sm_virtio::net::NetBackend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::addressing::{DNS, MTU};
use crate::dns_relay::{Asker, DnsRelay, MAX_MESSAGE};
use crate::policy::{name_matches, Action, EgressPolicy, Reason, Verdict};

/// Replies to denied packets waiting for the guest; more are dropped.
const INJECT_LIMIT: usize = 64;
/// Addresses learned from DNS answers, over all rules.
const LEARNED_LIMIT: usize = 4096;
/// Remembered incoming connections on published ports.
const INBOUND_LIMIT: usize = 4096;
/// Denials logged one by one; after that every `LOG_EVERY`th.
const LOG_FIRST: u64 = 16;
const LOG_EVERY: u64 = 1000;
/// The MAC the filter answers ARP for the resolver's address with, where the
/// back end has nobody there (a TAP device): locally administered.
pub const RESOLVER_MAC: [u8; 6] = [0x02, 0x53, 0x4d, 0x00, 0x00, 0x03];

/// Counters of a filter, shared with its owner.
#[derive(Debug, Default)]
pub struct EgressStats {
    /// Packets the guest sent that the policy let out.
    pub allowed: AtomicU64,
    /// Packets the policy denied.
    pub denied: AtomicU64,
    /// Frames dropped as not carried (IPv6, unknown EtherTypes, malformed).
    pub dropped: AtomicU64,
    /// Addresses learned from DNS answers.
    pub learned: AtomicU64,
}

/// A back end behind the egress policy.
pub struct EgressFilter<B> {
    inner: B,
    policy: EgressPolicy,
    /// (rule, address) pairs learned from DNS.
    learned: BoundedSet<(usize, Ipv4Addr)>,
    /// Guest TCP ports published to the host.
    published: Vec<u16>,
    /// (remote address, remote port, guest port) of incoming connections.
    inbound: BoundedSet<(Ipv4Addr, u16, u16)>,
    /// Frames made here for the guest (resets, ICMP errors).
    injected: VecDeque<Vec<u8>>,
    /// Answers the guest's resolver address; `None`: DNS queries are refused.
    dns: Option<DnsRelay>,
    /// ARP requests for the resolver's address are answered here.
    answer_resolver_arp: bool,
    /// Readable while `injected` is not empty.
    wake: EventFd,
    /// Readable when the inner back end or `wake` is: the device polls it.
    ready: Epoll,
    stats: Arc<EgressStats>,
}

/// A set that forgets its oldest member beyond `limit` members.
struct BoundedSet<T> {
    members: HashSet<T>,
    /// Oldest first.
    order: VecDeque<T>,
    limit: usize,
}

impl<T: Copy + Eq + std::hash::Hash> BoundedSet<T> {
    fn new(limit: usize) -> BoundedSet<T> {
        BoundedSet { members: HashSet::new(), order: VecDeque::new(), limit }
    }

    fn contains(&self, value: &T) -> bool {
        self.members.contains(value)
    }

    /// Adds `value`; whether it was new.
    fn insert(&mut self, value: T) -> bool {
        if !self.members.insert(value) {
            return false;
        }
        self.order.push_back(value);
        if self.order.len() > self.limit {
            let oldest = self.order.pop_front().expect("not empty");
            self.members.remove(&oldest);
        }
        true
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for BoundedSet<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(&self.order).finish()
    }
}

/// What to do with a frame from the guest.
enum Outcome<'a> {
    Pass,
    Drop,
    /// Answered here (ARP for the resolver): the reply goes to the guest.
    Answer(Vec<u8>),
    /// A query to the guest's resolver, allowed: relay it.
    Relay {
        query: &'a [u8],
        asker: Asker,
    },
    Deny {
        verdict: Verdict,
        reply: Option<Vec<u8>>,
        what: String,
    },
}

impl<B: NetBackend> EgressFilter<B> {
    /// Wraps `inner`; `published` are the guest TCP ports published to the
    /// host; `dns` answers the guest's resolver address.
    pub fn new(
        inner: B,
        policy: EgressPolicy,
        published: Vec<u16>,
        dns: Option<DnsRelay>,
    ) -> io::Result<EgressFilter<B>> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let ready = Epoll::new()?;
        ready.ctl(ControlOperation::Add, inner.ready_fd(), EpollEvent::new(EventSet::IN, 0))?;
        ready.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, 1))?;
        if let Some(relay) = &dns {
            ready.ctl(ControlOperation::Add, relay.fd(), EpollEvent::new(EventSet::IN, 2))?;
        }
        Ok(EgressFilter {
            inner,
            policy,
            learned: BoundedSet::new(LEARNED_LIMIT),
            published,
            inbound: BoundedSet::new(INBOUND_LIMIT),
            injected: VecDeque::new(),
            dns,
            answer_resolver_arp: false,
            wake,
            ready,
            stats: Arc::new(EgressStats::default()),
        })
    }

    /// Tells the back end the guest's MAC and address with a gratuitous ARP,
    /// as if the guest had sent it. passt learns the guest's MAC only from a
    /// frame the guest sends and until then addresses it as broadcast, which
    /// the guest's TCP drops: without this, a connection coming in through a
    /// published port fails until the guest has sent something — always the
    /// case for a guest just restored with a new passt.
    pub fn announce(&mut self, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
        let frame = arp_frame(etherparse::ArpOperation::REQUEST, (mac, ip), ([0; 6], ip), [0xff; 6])?;
        self.inner.send(&frame)
    }

    /// Answers the guest's ARP requests for the resolver's address (10.0.2.3)
    /// with [`RESOLVER_MAC`], for back ends where nothing else would (a TAP
    /// device; passt answers them itself). Only with a DNS relay.
    pub fn answer_resolver_arp(&mut self) {
        self.answer_resolver_arp = self.dns.is_some();
    }

    /// The ARP reply for the resolver, when `arp` asks for it.
    fn resolver_arp_reply(&self, arp: &etherparse::ArpPacketSlice<'_>) -> Option<Vec<u8>> {
        let asks = self.answer_resolver_arp
            && arp.operation() == etherparse::ArpOperation::REQUEST
            && arp.target_protocol_addr() == DNS.octets();
        if !asks {
            return None;
        }
        let sender_mac: [u8; 6] = arp.sender_hw_addr().try_into().ok()?;
        let sender_ip: [u8; 4] = arp.sender_protocol_addr().try_into().ok()?;
        let target = (sender_mac, Ipv4Addr::from(sender_ip));
        arp_frame(etherparse::ArpOperation::REPLY, (RESOLVER_MAC, DNS), target, sender_mac).ok()
    }

    /// The filter's counters.
    pub fn stats(&self) -> Arc<EgressStats> {
        self.stats.clone()
    }

    fn judge<'a>(&self, frame: &'a [u8]) -> Outcome<'a> {
        let Ok(packet) = SlicedPacket::from_ethernet(frame) else { return Outcome::Drop };
        let ip = match &packet.net {
            Some(NetSlice::Arp(arp)) => match self.resolver_arp_reply(arp) {
                Some(reply) => return Outcome::Answer(reply),
                None => return Outcome::Pass,
            },
            Some(NetSlice::Ipv4(ip)) => ip,
            _ => return Outcome::Drop,
        };
        let header = ip.header();
        let dst = header.destination_addr();
        let (proto, port) = match &packet.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                let key = (dst, tcp.destination_port(), tcp.source_port());
                if self.inbound.contains(&key) {
                    return Outcome::Pass;
                }
                ("tcp", Some(tcp.destination_port()))
            }
            Some(TransportSlice::Udp(udp)) => ("udp", Some(udp.destination_port())),
            Some(TransportSlice::Icmpv4(_)) => ("icmp", None),
            _ if ip.is_payload_fragmented() => ("fragment", None),
            _ => ("ip", None),
        };
        let mut verdict = self.policy.decide(dst, port, |rule, addr| self.learned.contains(&(rule, addr)));
        if verdict.reason == Reason::Resolver && proto != "udp" {
            // The resolver is answered over UDP only (by the relay); TCP to it
            // would go to passt, which has nothing there: refuse it at once.
            verdict = Verdict { action: Action::Deny, reason: Reason::Range("resolver (UDP only)") };
        }
        if verdict.action == Action::Allow {
            if let (Some(TransportSlice::Udp(udp)), Some(LinkSlice::Ethernet2(eth))) = (&packet.transport, &packet.link)
            {
                if dst == DNS && udp.destination_port() == 53 && self.dns.is_some() {
                    if self.policy.deny_all && !self.asks_only_listed_names(udp.payload()) {
                        // Under deny-all, DNS is only for the rules' names: a
                        // query for anything else could carry data out.
                        let verdict = Verdict { action: Action::Deny, reason: Reason::DenyAll };
                        let what = "DNS query for a name no rule lists".to_string();
                        return Outcome::Deny { verdict, reply: refusal(&packet), what };
                    }
                    let asker = Asker {
                        port: udp.source_port(),
                        guest_ip: header.source_addr(),
                        guest_mac: eth.source(),
                        gateway_mac: eth.destination(),
                    };
                    return Outcome::Relay { query: udp.payload(), asker };
                }
            }
            return Outcome::Pass;
        }
        let what = match port {
            Some(p) => format!("{proto} to {dst}:{p}"),
            None => format!("{proto} to {dst}"),
        };
        Outcome::Deny { verdict, reply: refusal(&packet), what }
    }

    /// Whether every question of DNS query `query` names a host-name rule.
    fn asks_only_listed_names(&self, query: &[u8]) -> bool {
        let Ok(message) = simple_dns::Packet::parse(query) else { return false };
        !message.questions.is_empty()
            && message.questions.iter().all(|q| {
                let name = q.qname.to_string();
                self.policy.name_rules().any(|(_, pattern)| name_matches(pattern, &name))
            })
    }

    /// Looks at a frame going to the guest: incoming SYNs on published ports.
    fn observe(&mut self, frame: &[u8]) {
        let Ok(packet) = SlicedPacket::from_ethernet(frame) else { return };
        let Some(NetSlice::Ipv4(ip)) = &packet.net else { return };
        let src = ip.header().source_addr();
        match &packet.transport {
            Some(TransportSlice::Tcp(tcp))
                if tcp.syn() && !tcp.ack() && self.published.contains(&tcp.destination_port()) =>
            {
                let key = (src, tcp.source_port(), tcp.destination_port());
                self.inbound.insert(key);
            }
            _ => {}
        }
    }

    /// Learns the addresses of a DNS answer for the host-name rules its
    /// question matches.
    fn learn(&mut self, dns: &[u8]) {
        let Ok(message) = simple_dns::Packet::parse(dns) else { return };
        let names: Vec<String> = message.questions.iter().map(|q| q.qname.to_string()).collect();
        let rules: Vec<usize> = self
            .policy
            .name_rules()
            .filter(|(_, pattern)| names.iter().any(|n| name_matches(pattern, n)))
            .map(|(i, _)| i)
            .collect();
        if rules.is_empty() {
            return;
        }
        for answer in &message.answers {
            let simple_dns::rdata::RData::A(a) = &answer.rdata else { continue };
            let addr = Ipv4Addr::from(a.address);
            for &rule in &rules {
                if self.learned.insert((rule, addr)) {
                    tracing::debug!(rule, %addr, "egress: learned from DNS");
                    self.stats.learned.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The next answer of the DNS relay as a frame for the guest (learning
    /// from it first). An answer too large for one frame is cut to its header
    /// with TC set, so the guest's resolver knows it was truncated. A failure
    /// of the relay loses that answer only (the guest's resolver asks again):
    /// an error returned from `recv` would end the device's whole receive side.
    fn relayed_answer(&mut self) -> Option<Vec<u8>> {
        let relay = self.dns.as_mut()?;
        let mut msg = [0u8; MAX_MESSAGE];
        let (n, asker) = match relay.answer(&mut msg) {
            Ok(answer) => answer?,
            Err(e) => {
                tracing::debug!("DNS relay from {}: {e}", relay.upstream());
                return None;
            }
        };
        self.learn(&msg[..n]);
        const HEADERS: usize = 20 + 8;
        let mut answer = &msg[..n];
        if n + HEADERS > usize::from(MTU) {
            msg[2] |= 0x02; // TC
            msg[4..12].fill(0); // no questions or records in what is left
            answer = &msg[..12];
        }
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(asker.gateway_mac, asker.guest_mac)
            .ipv4(DNS.octets(), asker.guest_ip.octets(), 64)
            .udp(53, asker.port)
            .write(&mut frame, answer)
            .ok()?;
        Some(frame)
    }

    fn log_denial(&self, what: &str, verdict: Verdict) {
        let n = self.stats.denied.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= LOG_FIRST || n.is_multiple_of(LOG_EVERY) {
            let why = match verdict.reason {
                Reason::Rule(i) => format!("rule {} ({:?})", i + 1, self.policy.rules[i]),
                Reason::DenyAll => "deny-all".to_string(),
                Reason::Range(range) => format!("default: {range} range"),
                Reason::Resolver | Reason::Public => "default".to_string(),
            };
            tracing::info!(denied = n, "egress denied: {what} by {why}");
        }
    }
}

/// An Ethernet frame to `eth_dst` carrying an IPv4 ARP `operation` from
/// `sender` about `target` (each a MAC and an address).
pub fn arp_frame(
    operation: etherparse::ArpOperation,
    sender: ([u8; 6], Ipv4Addr),
    target: ([u8; 6], Ipv4Addr),
    eth_dst: [u8; 6],
) -> io::Result<Vec<u8>> {
    let arp = etherparse::ArpEthIpv4Packet {
        operation,
        sender_mac: sender.0,
        sender_ipv4: sender.1.octets(),
        target_mac: target.0,
        target_ipv4: target.1.octets(),
    };
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(sender.0, eth_dst)
        .arp(arp.into())
        .write(&mut frame)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(frame)
}

/// The frame that tells the guest at once that `packet` was refused: a TCP
/// reset, or ICMP destination unreachable (administratively prohibited); none
/// for resets and ICMP errors themselves.
fn refusal(packet: &SlicedPacket<'_>) -> Option<Vec<u8>> {
    let Some(LinkSlice::Ethernet2(eth)) = &packet.link else { return None };
    let Some(NetSlice::Ipv4(ip)) = &packet.net else { return None };
    let h = ip.header();
    // From where the guest sent it (the gateway's MAC), back to the guest.
    let base = PacketBuilder::ethernet2(eth.destination(), eth.source()).ipv4(h.destination(), h.source(), 64);
    let mut out = Vec::new();
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) if tcp.rst() => return None,
        Some(TransportSlice::Tcp(tcp)) => {
            // RFC 9293 3.10.7.1: a reset answering an ACK carries the ACK's
            // number as its sequence; otherwise it acknowledges the segment
            // (SYN and FIN count as one each).
            let (seq, ack) = if tcp.ack() {
                (tcp.acknowledgment_number(), None)
            } else {
                let len = tcp.payload().len() as u32 + u32::from(tcp.syn()) + u32::from(tcp.fin());
                (0, Some(tcp.sequence_number().wrapping_add(len)))
            };
            let reset = base.tcp(tcp.destination_port(), tcp.source_port(), seq, 0).rst();
            let reset = match ack {
                Some(n) => reset.ack(n),
                None => reset,
            };
            reset.write(&mut out, &[]).ok()?;
        }
        Some(TransportSlice::Icmpv4(icmp)) if !matches!(icmp.icmp_type(), Icmpv4Type::EchoRequest(_)) => return None,
        _ => {
            // The offending IP header and the first 8 bytes of its payload.
            let payload = ip.payload().payload;
            let quoted = [h.slice(), &payload[..payload.len().min(8)]].concat();
            let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::HostProhibited);
            base.icmpv4(unreachable).write(&mut out, &quoted).ok()?;
        }
    }
    Some(out)
}

impl<B: NetBackend> NetBackend for EgressFilter<B> {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.judge(frame) {
            Outcome::Pass => {
                self.stats.allowed.fetch_add(1, Ordering::Relaxed);
                self.inner.send(frame)
            }
            Outcome::Drop => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Outcome::Answer(reply) => {
                if self.injected.len() < INJECT_LIMIT {
                    self.injected.push_back(reply);
                    self.wake.write(1)?;
                }
                Ok(())
            }
            Outcome::Relay { query, asker } => {
                self.stats.allowed.fetch_add(1, Ordering::Relaxed);
                let relay = self.dns.as_mut().expect("judged a relay only with a relay");
                if let Err(e) = relay.forward(query, asker) {
                    tracing::debug!("DNS relay to {}: {e}", relay.upstream());
                }
                Ok(())
            }
            Outcome::Deny { verdict, reply, what } => {
                self.log_denial(&what, verdict);
                if let Some(reply) = reply.filter(|_| self.injected.len() < INJECT_LIMIT) {
                    self.injected.push_back(reply);
                    self.wake.write(1)?;
                }
                Ok(())
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if let Some(frame) = self.injected.pop_front() {
            if self.injected.is_empty() {
                // Not readable any more until the next reply is queued.
                let _ = self.wake.read();
            }
            // Replies are a few dozen bytes; one that did not fit would be
            // dropped, never an error (which would end the receive side).
            if frame.len() <= buf.len() {
                buf[..frame.len()].copy_from_slice(&frame);
                return Ok(Some(frame.len()));
            }
        }
        if let Some(frame) = self.relayed_answer().filter(|f| f.len() <= buf.len()) {
            buf[..frame.len()].copy_from_slice(&frame);
            return Ok(Some(frame.len()));
        }
        let got = self.inner.recv(buf)?;
        if let Some(n) = got {
            self.observe(&buf[..n]);
        }
        Ok(got)
    }

    fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

#[cfg(test)]
mod tests;
