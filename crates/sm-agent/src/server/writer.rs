//! The write side of a connection, shared by the connection thread and the
//! threads of its running exec.
//!
//! Frames of an exec (`Stdout`, `Stderr`, `StdinAck`) are only written while
//! that exec is current: `finish_exec` writes `Exited` and closes the gate in
//! one step under the lock, so a pump still draining a pipe held open by a
//! background process can never write into the next request's reply.

use std::io::{self, Write};
use std::sync::Mutex;

use super::lock;
use crate::protocol::{self, Message};

struct WriterState {
    stream: Box<dyn Write + Send>,
    /// The exec whose frames may be written.
    current_exec: Option<u64>,
    /// A write failed: the peer is gone, later writes fail fast.
    failed: bool,
}

/// Serialises frame writes to one connection.
pub(crate) struct FrameWriter {
    state: Mutex<WriterState>,
}

fn write_frame(state: &mut WriterState, frame: &[u8]) -> io::Result<()> {
    if state.failed {
        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "an earlier write to this connection failed"));
    }
    let result = state.stream.write_all(frame).and_then(|()| state.stream.flush());
    if result.is_err() {
        state.failed = true;
    }
    result
}

fn encode(msg: &Message) -> io::Result<Vec<u8>> {
    protocol::encode_frame(msg).map_err(io::Error::other)
}

impl FrameWriter {
    pub(crate) fn new(stream: Box<dyn Write + Send>) -> Self {
        FrameWriter { state: Mutex::new(WriterState { stream, current_exec: None, failed: false }) }
    }

    /// Writes a message that belongs to no exec.
    pub(crate) fn send(&self, msg: &Message) -> io::Result<()> {
        let frame = encode(msg)?;
        write_frame(&mut lock(&self.state), &frame)
    }

    /// Writes an already encoded frame that belongs to no exec.
    pub(crate) fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        write_frame(&mut lock(&self.state), frame)
    }

    /// Writes bytes as they are (a `Connect` tunnel: no frames any more).
    pub(crate) fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        write_frame(&mut lock(&self.state), bytes)
    }

    /// Makes `exec_id` current and writes its `Started`.
    pub(crate) fn begin_exec(&self, exec_id: u64, started: &Message) -> io::Result<()> {
        let frame = encode(started)?;
        let mut state = lock(&self.state);
        state.current_exec = Some(exec_id);
        write_frame(&mut state, &frame)
    }

    /// Writes `frame` if `exec_id` is still current; `Ok(false)` if it is not.
    pub(crate) fn send_exec_frame(&self, exec_id: u64, frame: &[u8]) -> io::Result<bool> {
        let mut state = lock(&self.state);
        if state.current_exec != Some(exec_id) {
            return Ok(false);
        }
        write_frame(&mut state, frame).map(|()| true)
    }

    /// [`Self::send_exec_frame`] for a message.
    pub(crate) fn send_exec_message(&self, exec_id: u64, msg: &Message) -> io::Result<bool> {
        self.send_exec_frame(exec_id, &encode(msg)?)
    }

    /// Writes `exited` and ends `exec_id`: none of its frames follow.
    pub(crate) fn finish_exec(&self, exec_id: u64, exited: &Message) -> io::Result<()> {
        let frame = encode(exited)?;
        let mut state = lock(&self.state);
        if state.current_exec != Some(exec_id) {
            return Ok(());
        }
        state.current_exec = None;
        write_frame(&mut state, &frame)
    }
}
