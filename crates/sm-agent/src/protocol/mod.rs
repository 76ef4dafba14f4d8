//! The host <-> agent wire protocol, version [`PROTOCOL_VERSION`].
//!
//! # Framing
//!
//! Every message is one frame: `u32` little-endian payload length, one `u8`
//! message type ([`MessageType`]), then the payload. Payloads larger than
//! [`MAX_FRAME`] are rejected before anything is allocated. Payload fields are
//! written in order with a hand-written encoding (see [`codec`]): integers
//! little-endian, `bool` as one byte 0/1, byte strings and UTF-8 strings as a
//! `u32` length plus the bytes, optional values as a one-byte tag 0/1 plus the
//! value, lists as a `u32` count plus the items. A payload must be consumed
//! exactly: trailing bytes make it malformed.
//!
//! # Conversation
//!
//! Both sides send `Hello{version}` first; a version mismatch ends the
//! connection with an `Error{VersionMismatch}`. Then the host sends one request
//! at a time and reads its reply before the next request (open one connection
//! per concurrent exec):
//!
//! | request | reply |
//! |---|---|
//! | `Ping` | `Pong` |
//! | `Exec` | `Started{pid, stdin_window}`, then `Stdout`/`Stderr`/`StdinAck` in any order, finally `Exited`; or `Error` if it could not start |
//! | `ReadFile{path, max_len}` | `FileData`* then `FileEnd`, or `Error` |
//! | `WriteFile{path, mode}` + `FileData`* + `FileEnd` | `Ok` or `Error` |
//! | `SetTime{unix_nanos}` | `Ok` or `Error` |
//! | `AddEntropy{bytes}` | `Ok` or `Error` |
//! | `Mount{source, target, fstype, read_only, expect_sectors}` | `Ok` or `Error` |
//! | `Unmount{target}` | `Ok` (flushed; unmounted unless busy) or `Error` |
//! | `Connect{port}` | `Ok`, then raw bytes of a TCP connection to the guest's `127.0.0.1:port` both ways until either side closes (the frame protocol ends on that connection); or `Error` |
//!
//! While an exec runs the host may send `Stdin`, `StdinClose` and `Signal`.
//! Stdin is flow-controlled: the host may have at most `stdin_window` bytes
//! sent but not yet acknowledged by `StdinAck` (the agent acknowledges once the
//! bytes are written to the process), so neither side ever blocks the other.

pub mod codec;
mod exec;
mod frame;
mod message;
mod mount;

#[cfg(test)]
mod tests;

pub use exec::{ExecRequest, ExitReport, ExitStatus, GuestCost};
pub use frame::{decode_frame, decode_payload, encode_frame, read_message, write_message, DataFrame, FRAME_HEADER_LEN};
pub use message::{ErrorKind, Message, MessageType};
pub use mount::MountRequest;

use std::io;

/// The protocol version both sides announce in `Hello`.
pub const PROTOCOL_VERSION: u32 = 3;

/// The largest payload a frame may carry (1 MiB).
pub const MAX_FRAME: usize = 1 << 20;

/// The largest data chunk of a `Stdout`/`Stderr` frame the agent sends.
pub const OUTPUT_CHUNK: usize = 64 * 1024;

/// The largest data chunk of a `Stdin` frame the client sends.
pub const STDIN_CHUNK: usize = 64 * 1024;

/// The largest data chunk of a `FileData` frame either side sends.
pub const FILE_CHUNK: usize = 256 * 1024;

/// How many unacknowledged stdin bytes the agent accepts per exec.
pub const STDIN_WINDOW: u32 = 256 * 1024;

/// The default size cap of `ReadFile` used by the client (64 MiB).
pub const DEFAULT_READ_LIMIT: u64 = 64 << 20;

/// Everything that can go wrong reading or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection cleanly, between two frames.
    #[error("connection closed by the peer")]
    Closed,
    /// The stream ended inside a frame.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the frame needs (header included).
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A frame announced (or a message needs) a payload above [`MAX_FRAME`].
    #[error("frame payload of {len} bytes exceeds the {max} byte limit")]
    Oversized {
        /// The announced or needed payload length.
        len: usize,
        /// [`MAX_FRAME`].
        max: usize,
    },
    /// The type byte names no message of this protocol version.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The payload does not decode as its message type.
    #[error("malformed {ty} message: {reason}")]
    Malformed {
        /// The frame's message type.
        ty: MessageType,
        /// What was wrong.
        reason: String,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this side speaks {ours}, the peer {peer}")]
    VersionMismatch {
        /// [`PROTOCOL_VERSION`].
        ours: u32,
        /// The version the peer announced.
        peer: u32,
    },
    /// A well-formed message that makes no sense at this point of the conversation.
    #[error("unexpected {got} message {context}")]
    Unexpected {
        /// The type that arrived.
        got: MessageType,
        /// What was expected instead.
        context: &'static str,
    },
}

impl ProtocolError {
    /// Whether the stream is still in sync after this error, i.e. the whole
    /// frame was consumed and the next frame can be read.
    pub fn frame_was_consumed(&self) -> bool {
        matches!(self, ProtocolError::UnknownType(_) | ProtocolError::Malformed { .. })
    }
}
