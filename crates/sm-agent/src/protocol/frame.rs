//! Frames: `u32` LE payload length + `u8` message type + payload.

use std::io::{self, Read, Write};

use super::codec::Encoder;
use super::{Message, MessageType, ProtocolError, MAX_FRAME};

/// Length of the frame header (payload length + type byte).
pub const FRAME_HEADER_LEN: usize = 5;

/// Encodes `msg` as one frame. Fails with `Oversized` if the payload would
/// exceed [`MAX_FRAME`].
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, ProtocolError> {
    let mut e = Encoder::with_prefix(&[0; FRAME_HEADER_LEN]);
    msg.encode_payload(&mut e);
    let mut frame = e.into_bytes();
    let len = frame.len() - FRAME_HEADER_LEN;
    if len > MAX_FRAME {
        return Err(ProtocolError::Oversized { len, max: MAX_FRAME });
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    frame[4] = msg.message_type() as u8;
    Ok(frame)
}

/// Decodes a payload of wire type `ty`.
pub fn decode_payload(ty: u8, payload: &[u8]) -> Result<Message, ProtocolError> {
    let mtype = MessageType::from_wire(ty).ok_or(ProtocolError::UnknownType(ty))?;
    Message::decode_payload(mtype, payload).map_err(|e| ProtocolError::Malformed { ty: mtype, reason: e.0 })
}

/// Decodes the first frame of `buf`; returns the message and the bytes used.
/// An incomplete frame is `Truncated` (or `Closed` for an empty buffer).
pub fn decode_frame(buf: &[u8]) -> Result<(Message, usize), ProtocolError> {
    if buf.is_empty() {
        return Err(ProtocolError::Closed);
    }
    if buf.len() < FRAME_HEADER_LEN {
        return Err(ProtocolError::Truncated { expected: FRAME_HEADER_LEN, got: buf.len() });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::Oversized { len, max: MAX_FRAME });
    }
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        return Err(ProtocolError::Truncated { expected: total, got: buf.len() });
    }
    let msg = decode_payload(buf[4], &buf[FRAME_HEADER_LEN..total])?;
    Ok((msg, total))
}

/// Fills `buf` from `r`. `Ok(false)` if the stream ended before the first byte
/// and `eof_ok`; a later end is `Truncated` (reported relative to `frame_offset`).
fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    frame_offset: usize,
    frame_len: usize,
    eof_ok: bool,
) -> Result<bool, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && eof_ok => return Ok(false),
            Ok(0) => return Err(ProtocolError::Truncated { expected: frame_len, got: frame_offset + got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Reads one frame and decodes it. A clean end of stream between frames is
/// `Closed`. The payload is read completely before its type and contents are
/// checked, so after `UnknownType` or `Malformed` the stream is still in sync
/// (see [`ProtocolError::frame_was_consumed`]); after `Oversized` it is not.
pub fn read_message<R: Read>(r: &mut R) -> Result<Message, ProtocolError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    if !read_full(r, &mut header, 0, FRAME_HEADER_LEN, true)? {
        return Err(ProtocolError::Closed);
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::Oversized { len, max: MAX_FRAME });
    }
    let mut payload = vec![0u8; len];
    read_full(r, &mut payload, FRAME_HEADER_LEN, FRAME_HEADER_LEN + len, false)?;
    decode_payload(header[4], &payload)
}

/// Encodes `msg` and writes it with a single `write_all`.
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> Result<(), ProtocolError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// A reusable buffer for data frames (`Stdout`, `Stderr`, `Stdin`,
/// `FileData`): the data is read straight into place behind a reserved
/// header, so forwarding a chunk costs one read and one write, no copy.
#[derive(Debug)]
pub struct DataFrame {
    buf: Vec<u8>,
}

impl DataFrame {
    /// Frame header + the data's `u32` length prefix.
    pub const PREFIX: usize = FRAME_HEADER_LEN + 4;

    /// A buffer for chunks of up to `max_data` bytes (capped so the frame
    /// stays within [`MAX_FRAME`]).
    pub fn new(max_data: usize) -> Self {
        let max_data = max_data.min(MAX_FRAME - 4);
        DataFrame { buf: vec![0; Self::PREFIX + max_data] }
    }

    /// Where the next chunk's data goes.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[Self::PREFIX..]
    }

    /// Writes the header for `len` data bytes of type `ty` and returns the
    /// complete frame. `len` is clamped to the buffer.
    pub fn seal(&mut self, ty: MessageType, len: usize) -> &[u8] {
        let len = len.min(self.buf.len() - Self::PREFIX);
        let payload_len = (len + 4) as u32;
        self.buf[..4].copy_from_slice(&payload_len.to_le_bytes());
        self.buf[4] = ty as u8;
        self.buf[FRAME_HEADER_LEN..Self::PREFIX].copy_from_slice(&(len as u32).to_le_bytes());
        &self.buf[..Self::PREFIX + len]
    }
}
