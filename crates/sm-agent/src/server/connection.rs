//! One connection: the handshake, then requests read and dispatched on the
//! connection's thread (the exec's own threads write its output).
//!
//! Bad frames never take the agent down: an unknown type or malformed
//! payload is answered with `Error{InvalidRequest}` and the connection goes
//! on (the frame was consumed); an oversized frame is answered and the
//! connection closed (the stream cannot be resynchronised); a truncated
//! frame or I/O error just closes it. A running exec whose connection
//! closes is killed.

use std::io::{BufReader, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::exec::{self, ExecContext};
use super::mount;
use super::prefetch;
use super::reaper::ChildRegistry;
use super::system::{self, FileSink};
use super::writer::FrameWriter;
use super::{lock, AgentStream, RequestError};
use crate::protocol::{read_message, ErrorKind, Message, ProtocolError, PROTOCOL_VERSION};

/// Read buffer: a whole `Stdin` or `FileData` frame usually arrives in one read.
const READ_BUFFER: usize = 256 * 1024;

/// The longest error text sent (keeps `Error` frames far below the frame limit).
const MAX_ERROR_TEXT: usize = 4096;

/// How long `Connect` waits for the guest's TCP server to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes a `Connect` tunnel moves per read.
const TUNNEL_CHUNK: usize = 64 * 1024;

/// What the connection loop does after a frame.
enum Next {
    Continue,
    Close,
}

struct Connection<R: Read> {
    reader: BufReader<R>,
    ctx: ExecContext,
    next_exec_id: u64,
}

/// Serves `stream` until the host closes it.
pub(crate) fn serve<S: AgentStream>(stream: S, registry: &'static ChildRegistry) {
    let write_half = match stream.try_clone_stream() {
        Ok(w) => w,
        Err(e) => {
            agent_log!("cannot clone a connection: {e}");
            return;
        }
    };
    let mut conn = Connection {
        reader: BufReader::with_capacity(READ_BUFFER, stream),
        ctx: ExecContext {
            writer: Arc::new(FrameWriter::new(Box::new(write_half))),
            active: Arc::new(Mutex::new(None)),
            registry,
        },
        next_exec_id: 0,
    };
    if conn.handshake() {
        while let Next::Continue = conn.serve_one() {}
    }
    conn.kill_running_exec();
}

impl<R: AgentStream> Connection<R> {
    fn reply_error(&self, kind: ErrorKind, message: &str) {
        let mut text = message.to_owned();
        if text.len() > MAX_ERROR_TEXT {
            let mut cut = MAX_ERROR_TEXT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        // A failed write means the host is gone; the next read notices.
        let _ = self.ctx.writer.send(&Message::error(kind, text));
    }

    fn reply(&self, result: Result<(), RequestError>) {
        match result {
            Ok(()) => {
                let _ = self.ctx.writer.send(&Message::Ok);
            }
            Err(e) => self.reply_error(e.kind, &e.message),
        }
    }

    /// Both sides send `Hello`; false if the connection should end.
    fn handshake(&mut self) -> bool {
        let hello = Message::Hello { version: PROTOCOL_VERSION };
        if self.ctx.writer.send(&hello).is_err() {
            return false;
        }
        match read_message(&mut self.reader) {
            Ok(Message::Hello { version }) if version == PROTOCOL_VERSION => true,
            Ok(Message::Hello { version }) => {
                let e = ProtocolError::VersionMismatch { ours: PROTOCOL_VERSION, peer: version };
                self.reply_error(ErrorKind::VersionMismatch, &e.to_string());
                false
            }
            Ok(other) => {
                let text = format!("expected Hello, got {}", other.message_type());
                self.reply_error(ErrorKind::InvalidRequest, &text);
                false
            }
            Err(e) => {
                self.report_bad_frame(&e);
                false
            }
        }
    }

    /// Answers a frame that could not be read; says whether to go on.
    fn report_bad_frame(&self, e: &ProtocolError) -> Next {
        match e {
            ProtocolError::Closed => Next::Close,
            e if e.frame_was_consumed() => {
                self.reply_error(ErrorKind::InvalidRequest, &e.to_string());
                Next::Continue
            }
            ProtocolError::Oversized { .. } => {
                self.reply_error(ErrorKind::InvalidRequest, &e.to_string());
                Next::Close
            }
            // Truncated, I/O: the host is gone or broken.
            _ => Next::Close,
        }
    }

    fn serve_one(&mut self) -> Next {
        match read_message(&mut self.reader) {
            Ok(msg) => self.dispatch(msg),
            Err(e) => self.report_bad_frame(&e),
        }
    }

    /// The running exec's id and pid, if any.
    fn running(&self) -> Option<(u64, libc::pid_t)> {
        lock(&self.ctx.active).as_ref().map(|a| (a.id, a.pid))
    }

    /// Replies `Busy` if an exec runs; true if the request may proceed.
    fn idle_or_busy_reply(&self) -> bool {
        match self.running() {
            None => true,
            Some((_, pid)) => {
                let text = format!("exec of pid {pid} is still running on this connection");
                self.reply_error(ErrorKind::Busy, &text);
                false
            }
        }
    }

    fn dispatch(&mut self, msg: Message) -> Next {
        match msg {
            Message::Ping => {
                if self.idle_or_busy_reply() {
                    let _ = self.ctx.writer.send(&Message::Pong);
                }
            }
            Message::Exec(req) => {
                if self.idle_or_busy_reply() {
                    self.next_exec_id += 1;
                    if let Err(e) = exec::start(&req, self.next_exec_id, &self.ctx) {
                        self.reply_error(e.kind, &e.message);
                    }
                }
            }
            Message::Stdin { data } => return self.forward_stdin(data),
            Message::StdinClose => {
                let feeder = lock(&self.ctx.active).as_mut().and_then(|a| a.stdin.take());
                if let Some(feeder) = feeder {
                    feeder.close();
                }
            }
            Message::Signal { signo } => {
                // Late signals (the exec already ended) are dropped.
                if let Some((_, pid)) = self.running() {
                    if let Err(e) = self.ctx.registry.signal(pid, signo, false) {
                        agent_log!("signal {signo} to pid {pid}: {e}");
                    }
                }
            }
            Message::ReadFile { path, max_len } => {
                if self.idle_or_busy_reply() {
                    if let Err(e) = system::read_file(&path, max_len, &self.ctx.writer) {
                        self.reply_error(e.kind, &e.message);
                    }
                }
            }
            Message::WriteFile { path, mode } => return self.receive_file(&path, mode),
            Message::SetTime { unix_nanos } => {
                if self.idle_or_busy_reply() {
                    self.reply(system::set_time(unix_nanos));
                }
            }
            Message::AddEntropy { bytes } => {
                if self.idle_or_busy_reply() {
                    self.reply(system::add_entropy(&bytes));
                }
            }
            Message::Mount(req) => {
                if self.idle_or_busy_reply() {
                    self.reply(mount::mount(&req));
                }
            }
            Message::Unmount { target } => {
                if self.idle_or_busy_reply() {
                    self.reply(mount::unmount(&target));
                }
            }
            Message::Connect { port } => return self.tunnel(port),
            Message::Prefetch { programs } => {
                if self.idle_or_busy_reply() {
                    let done = prefetch::prefetch(&programs);
                    agent_log!("prefetched {}", prefetch::describe(&done));
                    self.reply(Ok(()));
                }
            }
            Message::Resize { rows, cols } => {
                // Late (the exec ended) or without a terminal: nothing to resize.
                if let Some(pty) = lock(&self.ctx.active).as_ref().and_then(|a| a.pty.as_ref()) {
                    if let Err(e) = super::pty::resize(pty, rows, cols) {
                        agent_log!("resizing the terminal to {rows}x{cols}: {e}");
                    }
                }
            }
            Message::FileData { .. } | Message::FileEnd | Message::Hello { .. } => {
                let text = format!("{} is not valid here", msg.message_type());
                self.reply_error(ErrorKind::InvalidRequest, &text);
            }
            Message::Pong
            | Message::Ok
            | Message::Error { .. }
            | Message::Started { .. }
            | Message::Stdout { .. }
            | Message::Stderr { .. }
            | Message::Exited(_)
            | Message::StdinAck { .. } => {
                let text = format!("{} is an agent-to-host message", msg.message_type());
                self.reply_error(ErrorKind::InvalidRequest, &text);
            }
        }
        Next::Continue
    }

    fn forward_stdin(&mut self, data: Vec<u8>) -> Next {
        let overrun = {
            let active = lock(&self.ctx.active);
            match active.as_ref().and_then(|a| a.stdin.as_ref()) {
                // No exec, or its stdin closed: a late chunk, dropped.
                None => return Next::Continue,
                Some(feeder) => feeder.push(data).err(),
            }
        };
        match overrun {
            None => Next::Continue,
            Some(text) => {
                // Unbounded buffering is what the window prevents: end it.
                self.reply_error(ErrorKind::InvalidRequest, &text);
                Next::Close
            }
        }
    }

    /// `WriteFile`: consumes `FileData`* + `FileEnd`, then replies.
    fn receive_file(&mut self, path: &str, mode: u32) -> Next {
        // When busy, `Busy` was replied and the data is consumed unused.
        let mut sink = self.idle_or_busy_reply().then(|| FileSink::open(path, mode));
        loop {
            match read_message(&mut self.reader) {
                Ok(Message::FileData { data }) => {
                    if let Some(sink) = &mut sink {
                        sink.write(&data);
                    }
                }
                Ok(Message::FileEnd) => break,
                Ok(other) => {
                    let text = format!("expected FileData or FileEnd during WriteFile, got {}", other.message_type());
                    self.reply_error(ErrorKind::InvalidRequest, &text);
                    return Next::Continue;
                }
                Err(e) => return self.report_bad_frame(&e),
            }
        }
        if let Some(sink) = sink {
            self.reply(sink.finish());
        }
        Next::Continue
    }

    /// `Connect`: joins this connection to the guest's `127.0.0.1:port` until
    /// either side closes; the connection ends with it.
    fn tunnel(&mut self, port: u16) -> Next {
        if !self.idle_or_busy_reply() {
            return Next::Continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(tcp) => tcp,
            Err(e) => {
                let kind =
                    if e.kind() == std::io::ErrorKind::ConnectionRefused { ErrorKind::NotFound } else { ErrorKind::Io };
                self.reply_error(kind, &format!("connecting to {addr} in the guest: {e}"));
                return Next::Continue;
            }
        };
        let (mut from_guest, host_side) = match (tcp.try_clone(), self.reader.get_ref().try_clone_stream()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                self.reply_error(ErrorKind::Io, &format!("tunnel to {addr}: {e}"));
                return Next::Continue;
            }
        };
        // The pump starts first but waits for the `Ok` to be written: a
        // thread that cannot start is an `Error` reply, never a silent tunnel.
        let (go, wait) = std::sync::mpsc::channel::<bool>();
        let writer = self.ctx.writer.clone();
        let pump = std::thread::Builder::new().name("tunnel".into()).spawn(move || {
            if wait.recv() != Ok(true) {
                return;
            }
            let mut buf = vec![0u8; TUNNEL_CHUNK];
            loop {
                match from_guest.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if writer.send_raw(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            // The guest's server closed: the host reads end of file.
            let _ = host_side.shutdown_write();
        });
        let pump = match pump {
            Ok(pump) => pump,
            Err(e) => {
                self.reply_error(ErrorKind::Io, &format!("tunnel to {addr}: starting its thread: {e}"));
                return Next::Continue;
            }
        };
        if self.ctx.writer.send(&Message::Ok).is_err() {
            let _ = go.send(false);
            let _ = pump.join();
            return Next::Close;
        }
        let _ = go.send(true);
        // Host -> guest, buffered bytes first; the host's end of file (the
        // VMM turns it into a full shutdown) ends both directions.
        let mut to_guest = &tcp;
        let _ = std::io::copy(&mut self.reader, &mut to_guest);
        let _ = tcp.shutdown(Shutdown::Both);
        let _ = pump.join();
        Next::Close
    }

    fn kill_running_exec(&self) {
        let retired = lock(&self.ctx.active).take();
        if let Some(exec) = retired {
            agent_log!("connection closed during the exec of pid {}; killing it", exec.pid);
            super::exec::kill_exec(self.ctx.registry, exec.pid);
        }
    }
}
