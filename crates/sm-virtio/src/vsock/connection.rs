//! One vsock stream between a guest port and a host unix socket, with
//! credit-based flow control in both directions.

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

/// Receive buffer we advertise to the guest for each connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// We sent SHUTDOWN (host side closed); waiting for the guest's RST.
    Closing,
}

/// A connection.
pub struct Connection {
    /// Host-side stream.
    pub stream: UnixStream,
    /// Our port (the host side of the vsock address pair).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// State.
    pub state: ConnState,
    /// Guest's receive buffer size.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// Bytes of guest data we delivered to the host stream.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` last advertised to the guest.
    pub fwd_cnt_sent: Wrapping<u32>,
    /// Guest data not yet accepted by the host stream.
    pub to_host: Vec<u8>,
    /// The guest will send no more data.
    pub guest_done_sending: bool,
    /// The guest will receive no more data, or the host stream hit EOF.
    pub no_more_to_guest: bool,
    /// The host stream reported readable and was not drained yet.
    pub maybe_readable: bool,
    /// epoll events currently registered for the stream.
    pub interest: u32,
    /// Opened by the guest (to a host port), not by a host client.
    pub guest_opened: bool,
}

impl Connection {
    /// A new connection over `stream` (made non-blocking).
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Connection {
            stream,
            local_port,
            peer_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            to_host: Vec::new(),
            guest_done_sending: false,
            no_more_to_guest: false,
            maybe_readable: false,
            interest: 0,
            guest_opened: false,
        })
    }

    /// Bytes we may still send to the guest before exceeding its buffer.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records the guest's credit fields from any packet it sent.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Whether the guest should hear about our consumed bytes now.
    pub fn credit_update_due(&self) -> bool {
        (self.fwd_cnt - self.fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 4
    }

    /// Takes guest data for the host stream. Returns false if the guest overran the
    /// buffer we advertised (a misbehaving guest: the caller resets the connection).
    pub fn push_to_host(&mut self, data: &[u8]) -> io::Result<bool> {
        if self.to_host.is_empty() {
            let written = match self.stream.write(data) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            self.fwd_cnt += Wrapping(written as u32);
            let rest = &data[written..];
            if rest.is_empty() {
                return Ok(true);
            }
            return self.buffer(rest);
        }
        self.buffer(data)
    }

    fn buffer(&mut self, data: &[u8]) -> io::Result<bool> {
        if self.to_host.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Ok(false);
        }
        self.to_host.extend_from_slice(data);
        Ok(true)
    }

    /// Writes buffered guest data to the host stream; returns whether all went.
    pub fn flush_to_host(&mut self) -> io::Result<bool> {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "host stream closed")),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads host data for the guest into `buf` (at most the guest's credit).
    /// `Ok(None)`: nothing available now. `Ok(Some(0))`: the host closed.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let max = buf.len().min(self.peer_credit() as usize);
        if max == 0 {
            return Ok(None);
        }
        match self.stream.read(&mut buf[..max]) {
            Ok(n) => {
                self.rx_cnt += Wrapping(n as u32);
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}
