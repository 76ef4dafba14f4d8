//! The messages of the protocol and their payload encodings.

use std::fmt;

use super::codec::{DecodeError, Decoder, Encoder};
use super::exec::{ExecRequest, ExitReport, ExitStatus, GuestCost};
use super::mount::MountRequest;

/// Wire numbers of the message types (the frame's type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Both ways, first frame of a connection.
    Hello = 0x01,
    /// Host -> agent liveness check.
    Ping = 0x02,
    /// Agent -> host answer to `Ping`.
    Pong = 0x03,
    /// Agent -> host success without data.
    Ok = 0x04,
    /// Agent -> host failure.
    Error = 0x05,
    /// Host -> agent: run a process.
    Exec = 0x10,
    /// Host -> agent: bytes for the running process's stdin.
    Stdin = 0x11,
    /// Host -> agent: end of stdin.
    StdinClose = 0x12,
    /// Host -> agent: send a signal to the running process.
    Signal = 0x13,
    /// Host -> agent: read a file.
    ReadFile = 0x14,
    /// Host -> agent: write a file (data follows as `FileData` + `FileEnd`).
    WriteFile = 0x15,
    /// Both ways: a chunk of file contents.
    FileData = 0x16,
    /// Both ways: end of file contents.
    FileEnd = 0x17,
    /// Host -> agent: set CLOCK_REALTIME.
    SetTime = 0x18,
    /// Host -> agent: add (and credit) entropy to the kernel pool.
    AddEntropy = 0x19,
    /// Agent -> host: the process started.
    Started = 0x20,
    /// Agent -> host: process stdout (or pty output).
    Stdout = 0x21,
    /// Agent -> host: process stderr.
    Stderr = 0x22,
    /// Agent -> host: the process ended; last frame of an exec.
    Exited = 0x23,
    /// Agent -> host: stdin bytes written to the process (flow control).
    StdinAck = 0x24,
    /// Host -> agent: mount a file system (a volume disk) before commands run.
    Mount = 0x1a,
    /// Host -> agent: flush and unmount a file system (before the VM stops).
    Unmount = 0x1b,
    /// Host -> agent: connect to a TCP port on the guest's loopback; after
    /// `Ok` the connection carries that stream's raw bytes both ways.
    Connect = 0x1c,
    /// Host -> agent: read programs into the guest's page cache (before a
    /// snapshot is baked, so that restored VMs start them warm).
    Prefetch = 0x1d,
    /// Host -> agent: the running exec's terminal has a new size.
    Resize = 0x1e,
}

impl MessageType {
    /// Every type, for tests and diagnostics.
    pub const ALL: [MessageType; 25] = [
        MessageType::Hello,
        MessageType::Ping,
        MessageType::Pong,
        MessageType::Ok,
        MessageType::Error,
        MessageType::Exec,
        MessageType::Stdin,
        MessageType::StdinClose,
        MessageType::Signal,
        MessageType::ReadFile,
        MessageType::WriteFile,
        MessageType::FileData,
        MessageType::FileEnd,
        MessageType::SetTime,
        MessageType::AddEntropy,
        MessageType::Started,
        MessageType::Stdout,
        MessageType::Stderr,
        MessageType::Exited,
        MessageType::StdinAck,
        MessageType::Mount,
        MessageType::Unmount,
        MessageType::Connect,
        MessageType::Prefetch,
        MessageType::Resize,
    ];

    /// The type with wire number `b`, if any.
    pub fn from_wire(b: u8) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| *t as u8 == b)
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Classifies an `Error` message so the host can react without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorKind {
    /// Anything not covered below (also: a kind this version does not know).
    Other = 0,
    /// Exec: the program was not found (a shell would exit 127).
    CommandNotFound = 1,
    /// Exec: the program exists but cannot be executed (a shell would exit 126).
    NotExecutable = 2,
    /// A file or directory named in the request does not exist.
    NotFound = 3,
    /// The agent lacks the permission (EPERM/EACCES).
    PermissionDenied = 4,
    /// The request is invalid (empty argv, bad user, malformed frame...).
    InvalidRequest = 5,
    /// A request arrived while an exec is still running on this connection.
    Busy = 6,
    /// The peer speaks another protocol version.
    VersionMismatch = 7,
    /// A file exceeds the requested size cap.
    TooLarge = 8,
    /// An I/O or system call error.
    Io = 9,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::Other,
        ErrorKind::CommandNotFound,
        ErrorKind::NotExecutable,
        ErrorKind::NotFound,
        ErrorKind::PermissionDenied,
        ErrorKind::InvalidRequest,
        ErrorKind::Busy,
        ErrorKind::VersionMismatch,
        ErrorKind::TooLarge,
        ErrorKind::Io,
    ];

    /// The kind with wire number `b`; unknown numbers (a newer agent) map to `Other`.
    pub fn from_wire(b: u8) -> ErrorKind {
        ErrorKind::ALL.into_iter().find(|k| *k as u8 == b).unwrap_or(ErrorKind::Other)
    }

    /// The exit code a shell reports for an exec that failed this way:
    /// 127 (not found), 126 (not executable); `None` for other kinds.
    pub fn shell_exit_code(self) -> Option<i32> {
        match self {
            ErrorKind::CommandNotFound => Some(127),
            ErrorKind::NotExecutable => Some(126),
            _ => None,
        }
    }

    /// The kind for an OS error from the agent's side.
    pub fn from_io(e: &std::io::Error) -> ErrorKind {
        match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            std::io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
            _ => ErrorKind::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One protocol message. See the module docs for who sends what when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Protocol version announcement.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the sender.
        version: u32,
    },
    /// Liveness check.
    Ping,
    /// Answer to `Ping`.
    Pong,
    /// Success without data.
    Ok,
    /// A request failed.
    Error {
        /// Machine-readable class.
        kind: ErrorKind,
        /// Human-readable detail.
        message: String,
    },
    /// Run a process.
    Exec(ExecRequest),
    /// Stdin bytes.
    Stdin {
        /// The bytes.
        data: Vec<u8>,
    },
    /// End of stdin.
    StdinClose,
    /// Deliver a signal to the process.
    Signal {
        /// Signal number (1..=64).
        signo: i32,
    },
    /// Read a file.
    ReadFile {
        /// Absolute path in the guest.
        path: String,
        /// Fail with `TooLarge` if the file is bigger than this.
        max_len: u64,
    },
    /// Write (create or truncate) a file; contents follow as `FileData` + `FileEnd`.
    WriteFile {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits (e.g. 0o644), applied exactly (no umask).
        mode: u32,
    },
    /// A chunk of file contents.
    FileData {
        /// The bytes.
        data: Vec<u8>,
    },
    /// End of file contents.
    FileEnd,
    /// Set CLOCK_REALTIME.
    SetTime {
        /// Nanoseconds since the Unix epoch.
        unix_nanos: u64,
    },
    /// Add entropy to the kernel pool (RNDADDENTROPY, credited at 8 bits per byte).
    AddEntropy {
        /// Random bytes from the host.
        bytes: Vec<u8>,
    },
    /// The process runs.
    Started {
        /// Its pid in the guest (also its process group).
        pid: i32,
        /// Unacknowledged stdin bytes the host may have in flight.
        stdin_window: u32,
    },
    /// Output on stdout (or the pty).
    Stdout {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Output on stderr.
    Stderr {
        /// The bytes.
        data: Vec<u8>,
    },
    /// The process ended.
    Exited(ExitReport),
    /// Stdin bytes delivered to the process.
    StdinAck {
        /// How many.
        bytes: u32,
    },
    /// Mount a file system in the guest.
    Mount(MountRequest),
    /// Flush and unmount the file system mounted at `target`.
    Unmount {
        /// Absolute path in the guest.
        target: String,
    },
    /// Connect to `127.0.0.1:port` in the guest; after `Ok` the connection
    /// carries that TCP stream's bytes, unframed, until either side closes.
    Connect {
        /// The guest TCP port.
        port: u16,
    },
    /// Read these programs (looked up in `PATH` unless they contain a `/`),
    /// and the ELF interpreter each names, into the page cache; answered
    /// with `Ok` (what cannot be found or read is skipped).
    Prefetch {
        /// Program names or paths.
        programs: Vec<String>,
    },
    /// Set the size of the running exec's terminal (ignored without one);
    /// its process group gets SIGWINCH.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

impl Message {
    /// This message's wire type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::Ping => MessageType::Ping,
            Message::Pong => MessageType::Pong,
            Message::Ok => MessageType::Ok,
            Message::Error { .. } => MessageType::Error,
            Message::Exec(_) => MessageType::Exec,
            Message::Stdin { .. } => MessageType::Stdin,
            Message::StdinClose => MessageType::StdinClose,
            Message::Signal { .. } => MessageType::Signal,
            Message::ReadFile { .. } => MessageType::ReadFile,
            Message::WriteFile { .. } => MessageType::WriteFile,
            Message::FileData { .. } => MessageType::FileData,
            Message::FileEnd => MessageType::FileEnd,
            Message::SetTime { .. } => MessageType::SetTime,
            Message::AddEntropy { .. } => MessageType::AddEntropy,
            Message::Started { .. } => MessageType::Started,
            Message::Stdout { .. } => MessageType::Stdout,
            Message::Stderr { .. } => MessageType::Stderr,
            Message::Exited(_) => MessageType::Exited,
            Message::StdinAck { .. } => MessageType::StdinAck,
            Message::Mount(_) => MessageType::Mount,
            Message::Unmount { .. } => MessageType::Unmount,
            Message::Connect { .. } => MessageType::Connect,
            Message::Prefetch { .. } => MessageType::Prefetch,
            Message::Resize { .. } => MessageType::Resize,
        }
    }

    /// An `Error` message.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Message {
        Message::Error { kind, message: message.into() }
    }

    /// Appends the payload fields.
    pub(crate) fn encode_payload(&self, e: &mut Encoder) {
        match self {
            Message::Ping | Message::Pong | Message::Ok | Message::StdinClose | Message::FileEnd => {}
            Message::Hello { version } => e.u32(*version),
            Message::Error { kind, message } => {
                e.u8(*kind as u8);
                e.str(message);
            }
            Message::Exec(req) => req.encode(e),
            Message::Stdin { data }
            | Message::FileData { data }
            | Message::Stdout { data }
            | Message::Stderr { data } => e.bytes(data),
            Message::Signal { signo } => e.i32(*signo),
            Message::ReadFile { path, max_len } => {
                e.str(path);
                e.u64(*max_len);
            }
            Message::WriteFile { path, mode } => {
                e.str(path);
                e.u32(*mode);
            }
            Message::SetTime { unix_nanos } => e.u64(*unix_nanos),
            Message::AddEntropy { bytes } => e.bytes(bytes),
            Message::Started { pid, stdin_window } => {
                e.i32(*pid);
                e.u32(*stdin_window);
            }
            Message::Exited(report) => {
                match report.status {
                    ExitStatus::Code(c) => {
                        e.u8(0);
                        e.i32(c);
                    }
                    ExitStatus::Signal(s) => {
                        e.u8(1);
                        e.i32(s);
                    }
                }
                e.bool(report.timed_out);
                e.u64(report.duration_us);
                report.cost.encode(e);
            }
            Message::StdinAck { bytes } => e.u32(*bytes),
            Message::Mount(req) => req.encode(e),
            Message::Unmount { target } => e.str(target),
            Message::Connect { port } => e.u16(*port),
            Message::Prefetch { programs } => e.str_list(programs),
            Message::Resize { rows, cols } => {
                e.u16(*rows);
                e.u16(*cols);
            }
        }
    }

    /// Decodes the payload of a `ty` frame; the whole payload must be used.
    pub(crate) fn decode_payload(ty: MessageType, payload: &[u8]) -> Result<Message, DecodeError> {
        let mut d = Decoder::new(payload);
        let msg = match ty {
            MessageType::Hello => Message::Hello { version: d.u32("version")? },
            MessageType::Ping => Message::Ping,
            MessageType::Pong => Message::Pong,
            MessageType::Ok => Message::Ok,
            MessageType::Error => {
                Message::Error { kind: ErrorKind::from_wire(d.u8("kind")?), message: d.string("message")? }
            }
            MessageType::Exec => Message::Exec(ExecRequest::decode(&mut d)?),
            MessageType::Stdin => Message::Stdin { data: d.bytes("data")? },
            MessageType::StdinClose => Message::StdinClose,
            MessageType::Signal => Message::Signal { signo: d.i32("signo")? },
            MessageType::ReadFile => Message::ReadFile { path: d.string("path")?, max_len: d.u64("max_len")? },
            MessageType::WriteFile => Message::WriteFile { path: d.string("path")?, mode: d.u32("mode")? },
            MessageType::FileData => Message::FileData { data: d.bytes("data")? },
            MessageType::FileEnd => Message::FileEnd,
            MessageType::SetTime => Message::SetTime { unix_nanos: d.u64("unix_nanos")? },
            MessageType::AddEntropy => Message::AddEntropy { bytes: d.bytes("bytes")? },
            MessageType::Started => Message::Started { pid: d.i32("pid")?, stdin_window: d.u32("stdin_window")? },
            MessageType::Stdout => Message::Stdout { data: d.bytes("data")? },
            MessageType::Stderr => Message::Stderr { data: d.bytes("data")? },
            MessageType::Exited => {
                let status = match d.u8("status kind")? {
                    0 => ExitStatus::Code(d.i32("exit code")?),
                    1 => ExitStatus::Signal(d.i32("signal")?),
                    k => return Err(DecodeError(format!("status kind: invalid value {k}"))),
                };
                Message::Exited(ExitReport {
                    status,
                    timed_out: d.bool("timed_out")?,
                    duration_us: d.u64("duration_us")?,
                    cost: GuestCost::decode(&mut d)?,
                })
            }
            MessageType::StdinAck => Message::StdinAck { bytes: d.u32("bytes")? },
            MessageType::Mount => Message::Mount(MountRequest::decode(&mut d)?),
            MessageType::Unmount => Message::Unmount { target: d.string("target")? },
            MessageType::Connect => Message::Connect { port: d.u16("port")? },
            MessageType::Prefetch => Message::Prefetch { programs: d.string_list("programs")? },
            MessageType::Resize => Message::Resize { rows: d.u16("rows")?, cols: d.u16("cols")? },
        };
        d.finish()?;
        Ok(msg)
    }
}
