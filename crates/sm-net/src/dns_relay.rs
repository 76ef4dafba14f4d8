//! The guest's resolver (10.0.2.3:53, UDP) answered from the VMM: queries the
//! egress filter lets through are relayed to an upstream resolver on a socket
//! of the VMM's own, and the answers are handed back to the guest as if from
//! 10.0.2.3. The filter learns host-name rules' addresses from exactly these
//! answers, which the guest cannot forge. Relaying in the VMM (rather than
//! passt's `--dns-forward`) also works with a resolver on the host's loopback
//! (systemd-resolved's 127.0.0.53), whose answers passt would present as
//! coming from the gateway.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// Queries waiting for an answer; the oldest is forgotten beyond this.
const PENDING_LIMIT: usize = 256;
/// The largest DNS message over UDP we relay (EDNS0 sizes included).
pub const MAX_MESSAGE: usize = 4096;

/// Who asked, and where the answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asker {
    /// The guest's UDP source port.
    pub port: u16,
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The guest's MAC.
    pub guest_mac: [u8; 6],
    /// The destination MAC of the query (the gateway's), the answer's source.
    pub gateway_mac: [u8; 6],
}

/// A UDP relay to one upstream resolver.
pub struct DnsRelay {
    sock: UdpSocket,
    upstream: SocketAddrV4,
    /// Query id -> who asked, bounded; the oldest first.
    pending: HashMap<u16, Asker>,
    order: VecDeque<u16>,
}

impl DnsRelay {
    /// A relay to `upstream` (a resolver's address and port, usually 53) on a
    /// non-blocking socket of its own.
    pub fn new(upstream: SocketAddrV4) -> io::Result<DnsRelay> {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sock.connect(upstream)?;
        sock.set_nonblocking(true)?;
        Ok(DnsRelay { sock, upstream, pending: HashMap::new(), order: VecDeque::new() })
    }

    /// The upstream resolver.
    pub fn upstream(&self) -> SocketAddrV4 {
        self.upstream
    }

    /// Readable when an answer may be waiting.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends a guest's query upstream and remembers who asked.
    pub fn forward(&mut self, query: &[u8], asker: Asker) -> io::Result<()> {
        if query.len() < 12 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "DNS message shorter than its header"));
        }
        let id = u16::from_be_bytes([query[0], query[1]]);
        if self.pending.insert(id, asker).is_none() {
            self.order.push_back(id);
            if self.order.len() > PENDING_LIMIT {
                let old = self.order.pop_front().expect("not empty");
                self.pending.remove(&old);
            }
        }
        match self.sock.send(query) {
            Ok(_) => Ok(()),
            // Full socket buffer: the guest's resolver retries.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The next answer for a query we relayed, into `buf`: its length and
    /// who asked. Answers nobody asked for are skipped.
    pub fn answer(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, Asker)>> {
        loop {
            let n = match self.sock.recv(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                // ICMP port unreachable from the upstream: nothing to hand back.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            if n < 12 {
                continue;
            }
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            if let Some(asker) = self.pending.remove(&id) {
                self.order.retain(|&i| i != id);
                return Ok(Some((n, asker)));
            }
        }
    }
}

/// The first IPv4 `nameserver` of a resolv.conf.
pub fn first_nameserver(resolv_conf: &Path) -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string(resolv_conf).ok()?;
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver")).then(|| words.next()?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_go_back_to_who_asked_and_strangers_are_ignored() {
        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = upstream.local_addr().unwrap().port();
        let mut relay = DnsRelay::new(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).unwrap();
        let asker = Asker { port: 40000, guest_ip: Ipv4Addr::LOCALHOST, guest_mac: [1; 6], gateway_mac: [2; 6] };
        let mut query = vec![0u8; 12];
        query[0..2].copy_from_slice(&0x1234u16.to_be_bytes());
        relay.forward(&query, asker).unwrap();
        assert!(relay.forward(&[1, 2], asker).is_err(), "too short");
        let mut buf = [0u8; 64];
        let (n, from) = upstream.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &query[..]);
        // An answer for an id nobody asked, then the real one.
        let mut stranger = query.clone();
        stranger[0] = 0x99;
        upstream.send_to(&stranger, from).unwrap();
        upstream.send_to(&query, from).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut out = [0u8; MAX_MESSAGE];
        assert_eq!(relay.answer(&mut out).unwrap(), Some((12, asker)));
        assert_eq!(relay.answer(&mut out).unwrap(), None);
    }

    #[test]
    fn pending_queries_are_bounded() {
        let mut relay = DnsRelay::new(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9)).unwrap();
        let asker = Asker { port: 1, guest_ip: Ipv4Addr::LOCALHOST, guest_mac: [0; 6], gateway_mac: [0; 6] };
        for id in 0..(PENDING_LIMIT as u16 + 50) {
            let mut q = vec![0u8; 12];
            q[0..2].copy_from_slice(&id.to_be_bytes());
            let _ = relay.forward(&q, asker);
        }
        assert_eq!(relay.pending.len(), PENDING_LIMIT);
        assert_eq!(relay.order.len(), PENDING_LIMIT);
    }

    #[test]
    fn the_first_ipv4_nameserver_is_taken() {
        let file = tempfile::Builder::new().prefix("sm-net-resolv-").tempfile().unwrap();
        let path = file.path();
        std::fs::write(path, "# c\nsearch x\nnameserver fe80::1\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n")
            .unwrap();
        assert_eq!(first_nameserver(path), Some(Ipv4Addr::new(10, 255, 255, 53)));
        std::fs::write(path, "search x\n").unwrap();
        assert_eq!(first_nameserver(path), None);
    }
}
