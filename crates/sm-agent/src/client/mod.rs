//! The host side: [`AgentClient`] speaks the protocol over any `Read + Write`
//! stream (a vsock connection to a guest, a unix socket in tests).
//!
//! One client is one connection and runs one request at a time; open one
//! connection per exec to run execs concurrently.

mod greeting;
mod interactive;
mod process;
mod session;

pub use greeting::{FILE_REQUEST_SILENCE, GREETING_TIMEOUT};
pub use interactive::ExecOutput;
pub use process::RunningProcess;
pub use session::{ExecEvent, ExecSession};

use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::protocol::{
    self, ErrorKind, ExecRequest, ExitStatus, GuestCost, Message, MountRequest, ProtocolError, DEFAULT_READ_LIMIT,
    FILE_CHUNK, PROTOCOL_VERSION,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed or the agent sent something invalid.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent answered with an `Error` message.
    #[error("agent error ({kind}): {message}")]
    Agent {
        /// Machine-readable class.
        kind: ErrorKind,
        /// The agent's description.
        message: String,
    },
    /// An earlier request was abandoned half-way (e.g. an [`ExecSession`]
    /// dropped before its `Exited`); the stream position is unknown.
    #[error("the connection is out of sync after an abandoned request; open a new one")]
    Desynchronized,
    /// A background process's connection broke (or the agent sent something
    /// unexpected) before its exit report: how it ended is unknown.
    #[error("lost the process before its exit report: {0}")]
    ProcessLost(String),
    /// The caller passed something the protocol cannot carry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The agent did not answer in time (see [`GREETING_TIMEOUT`]): the
    /// guest is hung, starved, or not running this agent.
    #[error("the guest agent did not answer {context} within {waited:?} (the guest is hung or starved of CPU)")]
    NoAnswer {
        /// What went unanswered.
        context: &'static str,
        /// How long the host waited.
        waited: Duration,
    },
    /// A collected exec printed more than its limit; the connection is out
    /// of sync (drop it: the agent then kills the process group).
    #[error("the command printed more than {limit} bytes, the most an exec collects; it is killed when this connection is dropped (stream its output with exec_streaming instead)")]
    OutputTooLarge {
        /// The limit, in bytes (stdout and stderr together).
        limit: usize,
    },
}

/// Output [`AgentClient::exec`] collects at most (stdout and stderr together).
pub const DEFAULT_OUTPUT_LIMIT: usize = 256 << 20;

impl ClientError {
    /// The agent's error kind, if the agent reported the failure.
    pub fn agent_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Agent { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Whether the agent speaks another protocol version (a guest image or
    /// snapshot older or newer than this host's build: retrying cannot help).
    pub fn is_version_mismatch(&self) -> bool {
        matches!(self, ClientError::Protocol(ProtocolError::VersionMismatch { .. }))
    }

    /// For a failed exec: the exit code a shell would report (127 command
    /// not found, 126 not executable).
    pub fn shell_exit_code(&self) -> Option<i32> {
        self.agent_kind().and_then(ErrorKind::shell_exit_code)
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Protocol(ProtocolError::Io(e))
    }
}

/// The result of [`AgentClient::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// The guest pid the process had.
    pub pid: i32,
    /// How it ended.
    pub status: ExitStatus,
    /// The agent killed it at the timeout.
    pub timed_out: bool,
    /// Everything it wrote to stdout (or the pty).
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
    /// From spawn to exit, measured in the guest.
    pub duration: Duration,
    /// What it cost in the guest (agent steps, process CPU time and faults).
    pub cost: GuestCost,
    /// When the host saw it start, print and end.
    pub timeline: ExecTimeline,
}

/// Host-side times of one exec, each from the `Exec` frame sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExecTimeline {
    /// `Started` received.
    pub started: Duration,
    /// The first `Stdout`/`Stderr` frame received (none if it printed nothing).
    pub first_output: Option<Duration>,
    /// `Exited` received.
    pub exited: Duration,
}

/// A connection to an agent.
pub struct AgentClient<S: Read + Write> {
    stream: BufReader<S>,
    desynchronized: bool,
}

impl<S: Read + Write> AgentClient<S> {
    /// Wraps a connected stream without talking yet; call [`Self::hello`] first.
    pub fn new(stream: S) -> Self {
        AgentClient { stream: BufReader::with_capacity(128 * 1024, stream), desynchronized: false }
    }

    /// Wraps `stream` and exchanges `Hello`.
    pub fn connect(stream: S) -> Result<Self, ClientError> {
        let mut client = AgentClient::new(stream);
        client.hello()?;
        Ok(client)
    }

    /// The underlying stream (e.g. to set a read timeout).
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.stream.into_inner()
    }

    pub(crate) fn send(&mut self, msg: &Message) -> Result<(), ClientError> {
        protocol::write_message(self.stream.get_mut(), msg)?;
        Ok(())
    }

    pub(crate) fn recv(&mut self) -> Result<Message, ClientError> {
        match protocol::read_message(&mut self.stream) {
            Ok(m) => Ok(m),
            Err(e) => {
                if !e.frame_was_consumed() {
                    self.desynchronized = true;
                }
                Err(e.into())
            }
        }
    }

    fn check_in_sync(&self) -> Result<(), ClientError> {
        if self.desynchronized {
            Err(ClientError::Desynchronized)
        } else {
            Ok(())
        }
    }

    pub(crate) fn mark_desynchronized(&mut self) {
        self.desynchronized = true;
    }

    /// Receives the reply to a request that answers `Ok` or `Error`.
    fn recv_ok(&mut self, context: &'static str) -> Result<(), ClientError> {
        match self.recv()? {
            Message::Ok => Ok(()),
            other => Err(self.unexpected(other, context)),
        }
    }

    /// Turns an unexpected reply into an error (an agent `Error` keeps its kind).
    pub(crate) fn unexpected(&mut self, msg: Message, context: &'static str) -> ClientError {
        match msg {
            Message::Error { kind, message } => ClientError::Agent { kind, message },
            other => {
                self.desynchronized = true;
                ProtocolError::Unexpected { got: other.message_type(), context }.into()
            }
        }
    }

    /// Exchanges `Hello`; returns the agent's protocol version (always
    /// [`PROTOCOL_VERSION`]: a mismatch is an error).
    pub fn hello(&mut self) -> Result<u32, ClientError> {
        self.send(&Message::Hello { version: PROTOCOL_VERSION })?;
        match self.recv()? {
            Message::Hello { version } if version == PROTOCOL_VERSION => Ok(version),
            Message::Hello { version } => {
                self.desynchronized = true;
                Err(ProtocolError::VersionMismatch { ours: PROTOCOL_VERSION, peer: version }.into())
            }
            other => Err(self.unexpected(other, "instead of Hello")),
        }
    }

    /// A round trip through the agent.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.check_in_sync()?;
        self.send(&Message::Ping)?;
        match self.recv()? {
            Message::Pong => Ok(()),
            other => Err(self.unexpected(other, "in reply to Ping")),
        }
    }

    /// Runs `req` to completion and collects its output. With `stdin`, the
    /// data is streamed to the process and its stdin closed (this overrides
    /// `req.stdin`); without, stdin is /dev/null (or an idle pty).
    ///
    /// A process that could not start is an `Err` whose
    /// [`ClientError::shell_exit_code`] gives 127/126 where a shell would.
    /// At most [`DEFAULT_OUTPUT_LIMIT`] bytes of output are collected; past
    /// that the error is [`ClientError::OutputTooLarge`] and dropping the
    /// client kills the process group.
    pub fn exec(&mut self, req: &ExecRequest, stdin: Option<&[u8]>) -> Result<ExecOutcome, ClientError> {
        self.exec_limited(req, stdin, DEFAULT_OUTPUT_LIMIT)
    }

    /// [`AgentClient::exec`] collecting at most `limit` bytes of output: past
    /// it the error is [`ClientError::OutputTooLarge`], and dropping this
    /// (then out-of-sync) client kills the process group.
    pub fn exec_limited(
        &mut self,
        req: &ExecRequest,
        stdin: Option<&[u8]>,
        limit: usize,
    ) -> Result<ExecOutcome, ClientError> {
        let req = ExecRequest { stdin: stdin.is_some(), ..req.clone() };
        let mut session = self.exec_streaming(&req)?;
        session.pending_limit = limit;
        if let Some(data) = stdin {
            session.send_stdin(data)?;
            session.close_stdin()?;
        }
        session.wait_limited(limit)
    }

    /// Starts `req` and returns a session that yields its output as it
    /// arrives and accepts stdin and signals.
    pub fn exec_streaming(&mut self, req: &ExecRequest) -> Result<ExecSession<'_, S>, ClientError> {
        self.check_in_sync()?;
        if req.argv.is_empty() {
            return Err(ClientError::InvalidArgument("argv is empty".into()));
        }
        let sent_at = Instant::now();
        self.send(&Message::Exec(req.clone()))?;
        match self.recv()? {
            Message::Started { pid, stdin_window } => Ok(ExecSession::new(self, pid, stdin_window, req.stdin, sent_at)),
            other => Err(self.unexpected(other, "in reply to Exec")),
        }
    }

    /// Reads a guest file of at most [`DEFAULT_READ_LIMIT`] bytes.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.read_file_limited(path, DEFAULT_READ_LIMIT)
    }

    /// Reads a guest file; the agent refuses (`TooLarge`) files above `max_len`.
    pub fn read_file_limited(&mut self, path: &str, max_len: u64) -> Result<Vec<u8>, ClientError> {
        self.check_in_sync()?;
        self.send(&Message::ReadFile { path: path.to_owned(), max_len })?;
        let mut out = Vec::new();
        loop {
            match self.recv()? {
                Message::FileData { data } => {
                    if (out.len() + data.len()) as u64 > max_len {
                        self.desynchronized = true;
                        return Err(ClientError::Agent {
                            kind: ErrorKind::TooLarge,
                            message: format!("agent sent more than {max_len} bytes of {path}"),
                        });
                    }
                    out.extend_from_slice(&data);
                }
                Message::FileEnd => return Ok(out),
                other => return Err(self.unexpected(other, "while reading a file")),
            }
        }
    }

    /// Creates or truncates a guest file with exactly `mode` permission bits
    /// and writes `data` to it.
    pub fn write_file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), ClientError> {
        self.check_in_sync()?;
        self.send(&Message::WriteFile { path: path.to_owned(), mode })?;
        for chunk in data.chunks(FILE_CHUNK) {
            self.send(&Message::FileData { data: chunk.to_vec() })?;
        }
        self.send(&Message::FileEnd)?;
        self.recv_ok("in reply to WriteFile")
    }

    /// Sets the guest's CLOCK_REALTIME to `unix_nanos` since the epoch.
    pub fn set_time(&mut self, unix_nanos: u64) -> Result<(), ClientError> {
        self.check_in_sync()?;
        self.send(&Message::SetTime { unix_nanos })?;
        self.recv_ok("in reply to SetTime")
    }

    /// Sets the guest clock to the host's current time (after a restore).
    pub fn sync_time(&mut self) -> Result<(), ClientError> {
        self.set_time(host_unix_nanos()?)
    }

    /// Wraps `stream` and, in one round trip, exchanges `Hello`, sets the
    /// guest clock to the host's time and (with `entropy`) reseeds the
    /// guest's entropy pool: the three requests are sent back to back and
    /// their three answers read after. What a restored guest needs before
    /// anything runs in it, without three waits on its emulated kernel.
    pub fn connect_refreshed(stream: S, entropy: Option<&[u8]>) -> Result<Self, ClientError> {
        let mut client = AgentClient::new(stream);
        let mut frames = Vec::new();
        protocol::write_message(&mut frames, &Message::Hello { version: PROTOCOL_VERSION })?;
        protocol::write_message(&mut frames, &Message::SetTime { unix_nanos: host_unix_nanos()? })?;
        if let Some(bytes) = entropy {
            protocol::write_message(&mut frames, &Message::AddEntropy { bytes: bytes.to_vec() })?;
        }
        let stream = client.stream.get_mut();
        stream.write_all(&frames)?;
        stream.flush()?;
        match client.recv()? {
            Message::Hello { version } if version == PROTOCOL_VERSION => {}
            Message::Hello { version } => {
                client.desynchronized = true;
                return Err(ProtocolError::VersionMismatch { ours: PROTOCOL_VERSION, peer: version }.into());
            }
            other => return Err(client.unexpected(other, "instead of Hello")),
        }
        client.recv_ok("in reply to SetTime")?;
        if entropy.is_some() {
            client.recv_ok("in reply to AddEntropy")?;
        }
        Ok(client)
    }

    /// False once a request was abandoned half-way (see
    /// [`ClientError::Desynchronized`]): the connection must not be reused.
    pub fn is_in_sync(&self) -> bool {
        !self.desynchronized
    }

    /// Mixes `bytes` into the guest kernel's entropy pool and credits them.
    pub fn add_entropy(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.check_in_sync()?;
        self.send(&Message::AddEntropy { bytes: bytes.to_vec() })?;
        self.recv_ok("in reply to AddEntropy")
    }

    /// Reads `programs` (names looked up in the guest's `PATH`, or paths)
    /// and their ELF interpreters into the guest's page cache, so that a
    /// snapshot taken next starts them without reading the disk. Missing
    /// ones are skipped.
    pub fn prefetch(&mut self, programs: &[String]) -> Result<(), ClientError> {
        self.check_in_sync()?;
        self.send(&Message::Prefetch { programs: programs.to_vec() })?;
        self.recv_ok("in reply to Prefetch")
    }

    /// Mounts a file system in the guest (a volume's disk) for the commands
    /// that follow; see [`MountRequest`].
    pub fn mount(&mut self, req: &MountRequest) -> Result<(), ClientError> {
        self.check_in_sync()?;
        self.send(&Message::Mount(req.clone()))?;
        self.recv_ok("in reply to Mount")
    }

    /// Flushes and unmounts what is mounted at `target` (busy mounts are
    /// flushed and stay).
    pub fn unmount(&mut self, target: &str) -> Result<(), ClientError> {
        self.check_in_sync()?;
        self.send(&Message::Unmount { target: target.to_string() })?;
        self.recv_ok("in reply to Unmount")
    }

    /// Connects to TCP `port` on the guest's loopback; the connection becomes
    /// that TCP stream (the agent protocol ends on it). A port nobody listens
    /// on is `ErrorKind::NotFound`.
    pub fn connect_tcp(mut self, port: u16) -> Result<Tunnel<S>, ClientError> {
        self.check_in_sync()?;
        self.send(&Message::Connect { port })?;
        self.recv_ok("in reply to Connect")?;
        // Bytes the guest's server sent right after accepting may sit in our
        // read buffer behind the `Ok`.
        let early = self.stream.buffer().to_vec();
        Ok(Tunnel { early, stream: self.stream.into_inner() })
    }
}

/// The host's wall clock in nanoseconds since the Unix epoch.
fn host_unix_nanos() -> Result<u64, ClientError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| ClientError::InvalidArgument(format!("host clock before 1970: {e}")))?;
    u64::try_from(now.as_nanos()).map_err(|_| ClientError::InvalidArgument("host clock after 2554".into()))
}

/// A TCP connection to a guest port through the agent ([`AgentClient::connect_tcp`]).
pub struct Tunnel<S> {
    /// Bytes already received (read first).
    early: Vec<u8>,
    stream: S,
}

impl<S> Tunnel<S> {
    /// The bytes already received and the stream the rest comes on.
    pub fn into_parts(self) -> (Vec<u8>, S) {
        (self.early, self.stream)
    }
}

impl<S: Read> Read for Tunnel<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.early.is_empty() {
            let n = buf.len().min(self.early.len());
            buf[..n].copy_from_slice(&self.early[..n]);
            self.early.drain(..n);
            return Ok(n);
        }
        self.stream.read(buf)
    }
}

impl<S: Write> Write for Tunnel<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests;
