//! passt's stream framing over a non-blocking unix stream socket: each frame is
//! a 4-byte big-endian length, then the Ethernet frame.
//!
//! Both directions are bounded: a frame longer than `sm_virtio::net::MAX_FRAME`
//! from the peer means the stream is out of step (an error, never a large
//! allocation); outgoing bytes the socket did not take wait in a buffer of at
//! most [`OUT_LIMIT`] bytes, and a frame that does not fit is refused whole
//! (the device drops it), so the stream never carries half a frame.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use sm_virtio::net::{NetBackend, MAX_FRAME};

/// Most bytes waiting to be written to the peer.
pub const OUT_LIMIT: usize = 1 << 20;
/// Length prefix size.
const LEN: usize = 4;

/// Length-prefixed frames over a unix stream socket.
pub struct StreamFramer {
    sock: UnixStream,
    /// Received bytes not yet returned as frames: `inbuf[..in_len]`.
    inbuf: Box<[u8]>,
    in_len: usize,
    /// Bytes accepted by `send` that the socket has not taken yet.
    out: Vec<u8>,
}

impl StreamFramer {
    /// Frames over `sock` (made non-blocking here).
    pub fn new(sock: UnixStream) -> io::Result<StreamFramer> {
        sock.set_nonblocking(true)?;
        Ok(StreamFramer { sock, inbuf: vec![0; LEN + MAX_FRAME].into_boxed_slice(), in_len: 0, out: Vec::new() })
    }

    /// Bytes waiting to be written.
    pub fn pending_out(&self) -> usize {
        self.out.len()
    }

    /// Writes what the socket takes of the waiting bytes.
    pub fn flush_out(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.sock.write(&self.out) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the peer took no bytes")),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A whole frame at the head of the received bytes, copied into `buf`.
    fn take_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.in_len < LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.inbuf[..LEN].try_into().expect("four bytes")) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the peer sent a frame length of {len} (more than {MAX_FRAME}): the stream is out of step"),
            ));
        }
        if self.in_len < LEN + len {
            return Ok(None);
        }
        if buf.len() < len {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "receive buffer shorter than the frame"));
        }
        buf[..len].copy_from_slice(&self.inbuf[LEN..LEN + len]);
        self.inbuf.copy_within(LEN + len..self.in_len, 0);
        self.in_len -= LEN + len;
        Ok(Some(len))
    }
}

impl NetBackend for StreamFramer {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.flush_out()?;
        if frame.len() > MAX_FRAME {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "frame longer than MAX_FRAME"));
        }
        if self.out.len() + LEN + frame.len() > OUT_LIMIT {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "the peer is not reading: frame dropped"));
        }
        self.out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.out.extend_from_slice(frame);
        self.flush_out()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // Waiting output goes out whenever we get the chance.
        self.flush_out()?;
        loop {
            if let Some(n) = self.take_frame(buf)? {
                return Ok(Some(n));
            }
            match self.sock.read(&mut self.inbuf[self.in_len..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the stream")),
                Ok(n) => self.in_len += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn ready_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
    }

    #[test]
    fn frames_cross_whole_however_the_bytes_are_split() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut f = StreamFramer::new(a).unwrap();
        let frames: Vec<Vec<u8>> = [14, 60, 1514, 9000, MAX_FRAME].iter().map(|&n| frame(n, n as u8)).collect();
        let mut wire = Vec::new();
        for fr in &frames {
            wire.extend_from_slice(&(fr.len() as u32).to_be_bytes());
            wire.extend_from_slice(fr);
        }
        let mut buf = vec![0u8; MAX_FRAME];
        let mut got = Vec::new();
        // Dribbled in pieces of 1, 3, 5, ... bytes.
        let (mut at, mut step) = (0, 1);
        while at < wire.len() {
            let end = (at + step).min(wire.len());
            b.write_all(&wire[at..end]).unwrap();
            at = end;
            step += 2;
            while let Some(n) = f.recv(&mut buf).unwrap() {
                got.push(buf[..n].to_vec());
            }
        }
        assert_eq!(got, frames);
        assert_eq!(f.recv(&mut buf).unwrap(), None);
    }

    #[test]
    fn a_length_past_the_bound_is_an_error_not_an_allocation() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut f = StreamFramer::new(a).unwrap();
        b.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let e = f.recv(&mut vec![0u8; MAX_FRAME]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("out of step"), "{e}");
    }

    #[test]
    fn a_closed_peer_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = StreamFramer::new(a).unwrap();
        drop(b);
        assert_eq!(f.recv(&mut [0u8; 64]).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_peer_that_does_not_read_gets_whole_frames_then_refusals_never_half_frames() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut f = StreamFramer::new(a).unwrap();
        let fr = frame(1514, 1);
        let mut sent = 0usize;
        let refused = loop {
            match f.send(&fr) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 100_000, "the output bound never applied");
        };
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
        assert!(f.pending_out() <= OUT_LIMIT);
        // The peer reads everything: exactly `sent` whole frames.
        b.set_nonblocking(true).unwrap();
        let mut wire = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            f.flush_out().unwrap();
            match b.read(&mut chunk) {
                Ok(n) => wire.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if f.pending_out() == 0 {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(wire.len(), sent * (LEN + fr.len()));
        for rec in wire.chunks(LEN + fr.len()) {
            assert_eq!(u32::from_be_bytes(rec[..4].try_into().unwrap()) as usize, fr.len());
            assert_eq!(&rec[4..], &fr[..]);
        }
    }
}
