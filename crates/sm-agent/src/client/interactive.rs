//! Full-duplex exec: the process's stdin fed while its output is awaited.
//!
//! `ExecSession::next_event` blocks (a read timeout would leave the
//! connection out of sync), so this speaks the same protocol messages with one
//! thread reading frames, one reading the input, and the caller's writing and
//! honouring the agent's stdin window.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use super::{AgentClient, ClientError};
use crate::protocol::{read_message, write_message, ExecRequest, ExitReport, Message, ProtocolError, STDIN_CHUNK};

/// Where the process's output goes; after a write error (e.g. a closed pipe)
/// that stream's output is dropped, the process keeps running.
pub struct ExecOutput {
    stdout: Option<Box<dyn Write + Send>>,
    stderr: Option<Box<dyn Write + Send>>,
}

impl ExecOutput {
    /// This process's stdout and stderr.
    pub fn terminal() -> ExecOutput {
        ExecOutput::new(Box::new(io::stdout()), Box::new(io::stderr()))
    }

    /// Output to `stdout` and `stderr`.
    pub fn new(stdout: Box<dyn Write + Send>, stderr: Box<dyn Write + Send>) -> ExecOutput {
        ExecOutput { stdout: Some(stdout), stderr: Some(stderr) }
    }

    fn write(sink: &mut Option<Box<dyn Write + Send>>, data: &[u8]) {
        if let Some(w) = sink {
            if w.write_all(data).and_then(|()| w.flush()).is_err() {
                *sink = None;
            }
        }
    }

    /// Writes process stdout.
    pub fn stdout(&mut self, data: &[u8]) {
        Self::write(&mut self.stdout, data);
    }

    /// Writes process stderr.
    pub fn stderr(&mut self, data: &[u8]) {
        Self::write(&mut self.stderr, data);
    }
}

enum Event {
    Agent(Result<Message, ProtocolError>),
    /// A chunk of host stdin; empty at EOF.
    Stdin(io::Result<Vec<u8>>),
}

impl AgentClient<UnixStream> {
    /// Runs `req` full-duplex: `input` is forwarded as the process's stdin
    /// (closed at its EOF, within the agent's stdin window, so a process that
    /// does not read cannot make us buffer all of `input`) while its output
    /// streams to `out`; ends with the exit report. Works with `req.tty`.
    pub fn exec_interactive(
        self,
        req: &ExecRequest,
        input: impl Read + Send + 'static,
        out: ExecOutput,
    ) -> Result<ExitReport, ClientError> {
        interactive(self, req, input, out)
    }
}

fn interactive(
    client: AgentClient<UnixStream>,
    req: &ExecRequest,
    input: impl Read + Send + 'static,
    mut out: ExecOutput,
) -> Result<ExitReport, ClientError> {
    let mut sock = client.into_inner();
    write_message(&mut sock, &Message::Exec(ExecRequest { stdin: true, ..req.clone() }))?;
    let mut reader = BufReader::new(sock.try_clone()?);
    let mut credit = match read_message(&mut reader)? {
        Message::Started { stdin_window, .. } => u64::from(stdin_window),
        other => return Err(unexpected(other, "in reply to Exec")),
    };

    let (tx, rx) = mpsc::channel();
    let agent_tx = tx.clone();
    std::thread::spawn(move || loop {
        let msg = read_message(&mut reader);
        let more = matches!(msg, Ok(Message::Stdout { .. } | Message::Stderr { .. } | Message::StdinAck { .. }));
        if agent_tx.send(Event::Agent(msg)).is_err() || !more {
            break;
        }
    });
    // One chunk of stdin in flight at a time: the reader waits for `next`
    // before reading more, so a process that does not read cannot make us
    // buffer all of our stdin.
    let (next_tx, next_rx) = mpsc::sync_channel::<()>(1);
    std::thread::spawn(move || {
        let mut stdin = input;
        loop {
            let mut buf = vec![0u8; STDIN_CHUNK];
            let read = loop {
                match stdin.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            let eof = !matches!(read, Ok(n) if n > 0);
            let chunk = read.map(|n| {
                buf.truncate(n);
                buf
            });
            if tx.send(Event::Stdin(chunk)).is_err() || eof || next_rx.recv().is_err() {
                break;
            }
        }
    });

    let mut pending: VecDeque<u8> = VecDeque::new();
    let mut eof = false;
    let mut stdin_open = true;
    loop {
        let Ok(event) = rx.recv() else {
            return Err(ProtocolError::Closed.into());
        };
        match event {
            Event::Agent(msg) => match msg? {
                Message::Stdout { data } => out.stdout(&data),
                Message::Stderr { data } => out.stderr(&data),
                Message::StdinAck { bytes } => credit += u64::from(bytes),
                Message::Exited(report) => return Ok(report),
                other => return Err(unexpected(other, "during an exec")),
            },
            Event::Stdin(Ok(data)) if !data.is_empty() => pending.extend(data),
            Event::Stdin(result) => {
                // A read error of the input ends it like EOF: the process's
                // stdin is closed (the process decides what that means).
                let _ = result;
                eof = true;
            }
        }
        // Send what the window allows; ask for more stdin once all is sent.
        let had_pending = !pending.is_empty();
        while stdin_open && !pending.is_empty() && credit > 0 {
            let n = pending.len().min(STDIN_CHUNK).min(usize::try_from(credit).unwrap_or(usize::MAX));
            let data: Vec<u8> = pending.drain(..n).collect();
            credit -= n as u64;
            if write_message(&mut sock, &Message::Stdin { data }).is_err() {
                // The process (or the agent) is gone; its exit report follows.
                stdin_open = false;
            }
        }
        if stdin_open && pending.is_empty() {
            if eof {
                stdin_open = false;
                // As above: a failure here means the exit report follows.
                let _ = write_message(&mut sock, &Message::StdinClose);
            } else if had_pending {
                let _ = next_tx.try_send(());
            }
        }
        if !stdin_open {
            pending.clear();
        }
    }
}

fn unexpected(msg: Message, context: &'static str) -> ClientError {
    match msg {
        Message::Error { kind, message } => ClientError::Agent { kind, message },
        other => ProtocolError::Unexpected { got: other.message_type(), context }.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// `interactive` against the real agent server (on this host, over a
    /// socket pair): 3 MiB through `cat`, more than the stdin window, byte exact.
    #[test]
    fn interactive_stdin_round_trips_through_the_agent() {
        let (host, agent) = UnixStream::pair().unwrap();
        std::thread::spawn(move || crate::Server::new().serve_connection(agent));
        let client = AgentClient::connect(host).unwrap();
        let input: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let (stdout, stderr) = (Shared::default(), Shared::default());
        let out = ExecOutput::new(Box::new(stdout.clone()), Box::new(stderr.clone()));
        let req = ExecRequest::new(["cat"]);
        let report = client.exec_interactive(&req, io::Cursor::new(input.clone()), out).unwrap();
        assert!(report.status.success(), "{report:?}");
        assert!(stdout.0.lock().unwrap().as_slice() == input.as_slice(), "stdout differs from stdin");
        assert!(stderr.0.lock().unwrap().is_empty());
    }
}
