//! The host side of vsock: one listening unix socket per VM multiplexing host
//! connections onto guest ports, and guest connections onto per-port host sockets
//! (the Firecracker convention).
//!
//! - Host -> guest: connect to `uds_path`, write `CONNECT <port>\n`; once the guest
//!   accepts, read `OK <host_port>\n`, then the stream carries data. If the guest
//!   refuses (RST), the stream is closed without `OK`.
//! - Guest -> host port P: the muxer connects to `<uds_path>_<P>`; if nothing
//!   listens there, the guest's connect is refused (RST).
//!
//! The muxer knows nothing about virtqueues: the worker feeds it guest packets
//! ([`Muxer::handle_guest_packet`]) and asks it for packets to deliver
//! ([`Muxer::next_control_packet`], [`Muxer::next_data_packet`]).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use super::connection::{ConnState, Connection, CONN_BUF_ALLOC};
use super::packet::*;

/// Host-initiated connections get host ports from here upwards.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest handshake line accepted from a host client.
const MAX_HANDSHAKE: usize = 64;
/// Replies the guest's own packets earn (an RST for a packet to no
/// connection or of another type, a credit update for a credit request) wait
/// for guest receive buffers only while fewer than this many control packets
/// wait; beyond, they are dropped (the guest's driver treats a lost RST like
/// an unanswered packet). So a guest sending garbage without receiving grows
/// nothing, while the guest's transmit queue is always taken (holding it back
/// could deadlock with a driver that stops receiving while its own replies
/// wait to be sent). Control packets for live connections (REQUEST,
/// RESPONSE, SHUTDOWN, resets of a connection) are always queued: they are
/// bounded by the connection table.
pub const MAX_CONTROL_PACKETS: usize = 256;
/// Connections a guest may open to host ports; a REQUEST beyond this is reset.
pub const MAX_GUEST_CONNECTIONS: usize = 1024;

/// (host port, guest port).
pub type ConnKey = (u32, u32);

/// A header for a packet on `conn`, carrying our current credit.
fn header(guest_cid: u64, conn: &Connection, op: u16) -> Header {
    let mut h = Header::to_guest(guest_cid, conn.local_port, conn.peer_port, op);
    h.buf_alloc = CONN_BUF_ALLOC;
    h.fwd_cnt = conn.fwd_cnt.0;
    h
}

/// A host client that connected but has not finished `CONNECT <port>\n` yet.
pub struct Handshake {
    /// The client stream.
    pub stream: UnixStream,
    buf: Vec<u8>,
}

/// What a stream event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamId {
    /// A client still sending its CONNECT line.
    Handshake(u64),
    /// An open connection.
    Conn(ConnKey),
}

/// Connection table and control-packet queue.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// The per-VM listening socket.
    pub listener: UnixListener,
    /// Connections by (host port, guest port).
    pub conns: HashMap<ConnKey, Connection>,
    /// Clients in the CONNECT handshake, by id.
    pub handshakes: HashMap<u64, Handshake>,
    next_handshake: u64,
    next_local_port: u32,
    control: VecDeque<Header>,
    control_limit: usize,
    connection_limit: usize,
    replies_dropped: u64,
}

impl Muxer {
    /// A muxer for guest `guest_cid` serving `listener` (bound at `uds_path`).
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            next_handshake: 0,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            control_limit: MAX_CONTROL_PACKETS,
            connection_limit: MAX_GUEST_CONNECTIONS,
            replies_dropped: 0,
        })
    }

    /// Queues a reply the guest's own packet earned, unless
    /// [`MAX_CONTROL_PACKETS`] already wait (then it is dropped and counted).
    fn queue_reply(&mut self, h: Header) {
        if !self.drop_reply_if_full() {
            self.control.push_back(h);
        }
    }

    /// True (and counted) when a reply to the guest must be dropped because
    /// [`MAX_CONTROL_PACKETS`] already wait.
    fn drop_reply_if_full(&mut self) -> bool {
        if self.control.len() < self.control_limit {
            return false;
        }
        self.replies_dropped += 1;
        if self.replies_dropped.is_power_of_two() {
            tracing::debug!(dropped = self.replies_dropped, "vsock: guest not receiving; replies dropped");
        }
        true
    }

    /// Replies to guest packets dropped because the guest did not receive.
    pub fn replies_dropped(&self) -> u64 {
        self.replies_dropped
    }

    /// Control packets waiting for the guest.
    pub fn control_len(&self) -> usize {
        self.control.len()
    }

    /// A smaller control-queue limit (tests: mock queues hold 64 entries).
    #[cfg(test)]
    pub fn set_control_limit(&mut self, limit: usize) {
        self.control_limit = limit;
    }

    /// A smaller guest-connection limit (tests: the real one needs 2048 fds).
    #[cfg(test)]
    pub fn set_connection_limit(&mut self, limit: usize) {
        self.connection_limit = limit;
    }

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.fwd_cnt_sent = conn.fwd_cnt;
        }
        let h = match self.conns.get(&key) {
            Some(conn) => {
                let mut h = header(self.guest_cid, conn, op);
                h.flags = flags;
                h
            }
            None => Header::to_guest(self.guest_cid, key.0, key.1, op),
        };
        self.control.push_back(h);
    }

    /// Ends `key` and tells the guest, unless the guest does not receive
    /// (then the RST is dropped like other replies: a guest re-opening and
    /// resetting one connection in a loop grows nothing either).
    fn reset(&mut self, key: ConnKey) {
        self.conns.remove(&key);
        self.queue_reply(Header::to_guest(self.guest_cid, key.0, key.1, OP_RST));
    }

    /// Accepts pending host clients; returns the ids of new handshakes.
    pub fn accept_clients(&mut self) -> Vec<u64> {
        let mut new = Vec::new();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: client socket: {e}");
                        continue;
                    }
                    let id = self.next_handshake;
                    self.next_handshake += 1;
                    self.handshakes.insert(id, Handshake { stream, buf: Vec::new() });
                    new.push(id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return new,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return new;
                }
            }
        }
    }

    /// Reads a client's handshake. Returns the key of the connection it opened once
    /// the `CONNECT` line is complete; malformed clients are dropped.
    pub fn progress_handshake(&mut self, id: u64) -> Option<ConnKey> {
        let hs = self.handshakes.get_mut(&id)?;
        let mut byte = [0u8; 1];
        // Byte by byte: nothing after the newline may be consumed here.
        loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => {
                    self.handshakes.remove(&id);
                    return None;
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => {
                    hs.buf.push(byte[0]);
                    if hs.buf.len() > MAX_HANDSHAKE {
                        tracing::debug!("vsock: handshake line too long, client dropped");
                        self.handshakes.remove(&id);
                        return None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(_) => {
                    self.handshakes.remove(&id);
                    return None;
                }
            }
        }
        let hs = self.handshakes.remove(&id)?;
        let line = String::from_utf8_lossy(&hs.buf).into_owned();
        let Some(port) = line.strip_prefix("CONNECT ").and_then(|p| p.trim().parse::<u32>().ok()) else {
            tracing::debug!(%line, "vsock: bad handshake, client dropped");
            return None;
        };
        let local = self.allocate_local_port(port);
        let key = (local, port);
        match Connection::new(hs.stream, local, port, ConnState::Connecting) {
            Ok(conn) => {
                self.conns.insert(key, conn);
                self.queue_control(key, OP_REQUEST, 0);
                Some(key)
            }
            Err(e) => {
                tracing::warn!("vsock: {e}");
                None
            }
        }
    }

    fn allocate_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    /// Handles one packet the guest sent. Returns the key of a connection that was
    /// opened by it (guest-initiated), if any.
    pub fn handle_guest_packet(&mut self, h: &Header, data: &[u8]) -> Option<ConnKey> {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            tracing::debug!(?h, "vsock: packet with foreign addresses dropped");
            return None;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.queue_reply(Header::to_guest(self.guest_cid, key.0, key.1, OP_RST));
            }
            return None;
        }
        if h.op == OP_REQUEST {
            return self.guest_connect(key, h);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.queue_reply(Header::to_guest(self.guest_cid, key.0, key.1, OP_RST));
            }
            return None;
        };
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        match h.op {
            OP_RESPONSE if conn.state == ConnState::Connecting => {
                conn.state = ConnState::Established;
                let ok = format!("OK {}\n", conn.local_port);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset(key);
                }
            }
            OP_RW if conn.state == ConnState::Established && !conn.guest_done_sending => {
                match conn.push_to_host(&data[..data.len().min(h.len as usize)]) {
                    Ok(true) => {
                        if conn.credit_update_due() {
                            self.queue_control(key, OP_CREDIT_UPDATE, 0);
                        }
                    }
                    Ok(false) => {
                        tracing::warn!(?key, "vsock: guest overran its credit; connection reset");
                        self.reset(key);
                    }
                    Err(_) => self.host_closed(key),
                }
            }
            OP_RW => {}
            OP_CREDIT_UPDATE => {}
            // A reply the guest asked for: dropped like the others when the
            // guest does not receive (every later packet carries our credit).
            OP_CREDIT_REQUEST => {
                if !self.drop_reply_if_full() {
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                }
                if h.flags & SHUTDOWN_RCV != 0 {
                    conn.no_more_to_guest = true;
                }
                if conn.guest_done_sending && conn.no_more_to_guest {
                    // Full close: flush what we can, then acknowledge with RST.
                    let _ = conn.flush_to_host();
                    self.reset(key);
                } else if conn.guest_done_sending && conn.to_host.is_empty() {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            OP_RST => {
                if let Some(mut conn) = self.conns.remove(&key) {
                    let _ = conn.flush_to_host();
                }
            }
            _ => self.reset(key),
        }
        None
    }

    fn guest_connect(&mut self, key: ConnKey, h: &Header) -> Option<ConnKey> {
        if self.conns.contains_key(&key) {
            self.reset(key);
            return None;
        }
        if self.conns.values().filter(|c| c.guest_opened).count() >= self.connection_limit {
            tracing::debug!(?key, "vsock: guest connect refused: {} guest connections open", self.connection_limit);
            self.queue_reply(Header::to_guest(self.guest_cid, key.0, key.1, OP_RST));
            return None;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        let conn = UnixStream::connect(&path).and_then(|s| Connection::new(s, key.0, key.1, ConnState::Established));
        match conn {
            Ok(mut conn) => {
                conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
                conn.guest_opened = true;
                self.conns.insert(key, conn);
                self.queue_control(key, OP_RESPONSE, 0);
                Some(key)
            }
            Err(e) => {
                tracing::debug!(%path, "vsock: guest connect refused: {e}");
                self.queue_reply(Header::to_guest(self.guest_cid, key.0, key.1, OP_RST));
                None
            }
        }
    }

    /// The host side of `key` closed: tell the guest, wait for its RST.
    pub fn host_closed(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        match conn.state {
            ConnState::Connecting => self.reset(key),
            ConnState::Established => {
                conn.state = ConnState::Closing;
                conn.no_more_to_guest = true;
                self.queue_control(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
            }
            ConnState::Closing => {}
        }
    }

    /// Flushes buffered guest data of `key` to its host stream.
    pub fn flush(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        match conn.flush_to_host() {
            Ok(true) => {
                if conn.guest_done_sending {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
                if conn.credit_update_due() {
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            Ok(false) => {}
            Err(_) => self.host_closed(key),
        }
    }

    /// The next header-only packet for the guest, if any.
    pub fn next_control_packet(&mut self) -> Option<Header> {
        self.control.pop_front()
    }

    /// Whether header-only packets are waiting.
    pub fn has_control_packets(&self) -> bool {
        !self.control.is_empty()
    }

    /// Reads host data for the guest into `buf` from some readable connection.
    /// Returns the header (with `len` set) of the packet to deliver, if any.
    pub fn next_data_packet(&mut self, buf: &mut [u8]) -> Option<Header> {
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.maybe_readable && c.state == ConnState::Established && !c.no_more_to_guest)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let conn = self.conns.get_mut(&key)?;
            match conn.read_from_host(buf) {
                Ok(Some(0)) | Err(_) => {
                    conn.maybe_readable = false;
                    self.host_closed(key);
                    // The SHUTDOWN now waits in the control queue.
                }
                Ok(Some(n)) => {
                    let mut h = header(self.guest_cid, conn, OP_RW);
                    h.len = n as u32;
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    return Some(h);
                }
                Ok(None) => {
                    if conn.peer_credit() > 0 {
                        conn.maybe_readable = false;
                    }
                }
            }
        }
        None
    }

    /// Drops every connection and handshake (device reset / transport reset).
    pub fn clear(&mut self) {
        self.conns.clear();
        self.handshakes.clear();
        self.control.clear();
    }

    /// Local port numbers in use, for tests and diagnostics.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Sets the next host port handed out (tests).
    #[cfg(test)]
    pub fn set_next_local_port(&mut self, p: u32) {
        self.next_local_port = p;
    }
}

/// How long [`connect`] waits for the guest to accept or refuse.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Connects to guest `port` through the VM's vsock socket at `uds_path`, doing the
/// `CONNECT`/`OK` handshake. Waits up to [`CONNECT_TIMEOUT`] for the guest to
/// accept or refuse.
pub fn connect(uds_path: &std::path::Path, port: u32) -> io::Result<UnixStream> {
    connect_timeout(uds_path, port, CONNECT_TIMEOUT)
}

/// [`connect`] waiting at most `timeout` for the guest's answer
/// (`ErrorKind::TimedOut` naming the port after it). The stream returned
/// has no read timeout.
pub fn connect_timeout(uds_path: &std::path::Path, port: u32, timeout: std::time::Duration) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds_path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_HANDSHAKE {
        let got = stream.read(&mut byte).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the guest did not answer a connection to vsock port {port} within {timeout:?}"),
            ),
            _ => e,
        })?;
        match got {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("guest refused vsock port {port} (nothing listening?)"),
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad vsock handshake reply {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}
