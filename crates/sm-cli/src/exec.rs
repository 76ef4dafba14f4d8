//! Running the image's process through the guest agent and streaming its
//! output to the terminal as it arrives.
//!
//! Without stdin this is the agent client's [`sm_agent::ExecSession`]. With
//! stdin (`-i`) the process must be fed while its output is awaited, and
//! `ExecSession::next_event` blocks (a read timeout would leave the connection
//! out of sync), so [`interactive`] speaks the same protocol messages with one
//! thread reading frames, one reading host stdin, and this one writing and
//! honouring the agent's stdin window.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use sm_agent::protocol::{read_message, write_message, ProtocolError, STDIN_CHUNK};
use sm_agent::{AgentClient, ClientError, ExecEvent, ExecRequest, ExitReport, Message};

/// Where the process's output goes; after a write error (e.g. a closed pipe)
/// that stream's output is dropped, the process keeps running.
pub struct Output {
    stdout: Option<Box<dyn Write>>,
    stderr: Option<Box<dyn Write>>,
}

impl Output {
    /// Our stdout and stderr.
    pub fn terminal() -> Output {
        Output { stdout: Some(Box::new(io::stdout())), stderr: Some(Box::new(io::stderr())) }
    }

    fn write(sink: &mut Option<Box<dyn Write>>, data: &[u8]) {
        if let Some(w) = sink {
            if w.write_all(data).and_then(|()| w.flush()).is_err() {
                *sink = None;
            }
        }
    }

    fn stdout(&mut self, data: &[u8]) {
        Self::write(&mut self.stdout, data);
    }

    fn stderr(&mut self, data: &[u8]) {
        Self::write(&mut self.stderr, data);
    }
}

/// Runs `req` (stdin: /dev/null or an idle pty) and streams its output.
pub fn stream(client: &mut AgentClient<UnixStream>, req: &ExecRequest) -> Result<ExitReport, ClientError> {
    let req = ExecRequest { stdin: false, ..req.clone() };
    let mut session = client.exec_streaming(&req)?;
    let mut out = Output::terminal();
    while let Some(event) = session.next_event()? {
        match event {
            ExecEvent::Stdout(d) => out.stdout(&d),
            ExecEvent::Stderr(d) => out.stderr(&d),
            ExecEvent::Exited(report) => return Ok(report),
        }
    }
    Err(ProtocolError::Closed.into())
}

enum Event {
    Agent(Result<Message, ProtocolError>),
    /// A chunk of host stdin; empty at EOF.
    Stdin(io::Result<Vec<u8>>),
}

/// Runs `req` with `input` (our stdin) forwarded, closed at its EOF, and its
/// output streamed to `out`.
pub fn interactive(
    client: AgentClient<UnixStream>,
    req: &ExecRequest,
    input: impl Read + Send + 'static,
    mut out: Output,
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
                if let Err(e) = result {
                    eprintln!("supermachine: reading stdin: {e}; closing the process's stdin");
                }
                eof = true;
            }
        }
        // Send what the window allows; ask for more stdin once all is sent.
        let had_pending = !pending.is_empty();
        while stdin_open && !pending.is_empty() && credit > 0 {
            let n = pending.len().min(STDIN_CHUNK).min(usize::try_from(credit).unwrap_or(usize::MAX));
            let data: Vec<u8> = pending.drain(..n).collect();
            credit -= n as u64;
            if let Err(e) = write_message(&mut sock, &Message::Stdin { data }) {
                // The process (or the agent) is gone; its exit report follows.
                tracing::debug!("sending stdin: {e}");
                stdin_open = false;
            }
        }
        if stdin_open && pending.is_empty() {
            if eof {
                stdin_open = false;
                if let Err(e) = write_message(&mut sock, &Message::StdinClose) {
                    tracing::debug!("closing stdin: {e}");
                }
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
        std::thread::spawn(move || sm_agent::Server::new().serve_connection(agent));
        let client = AgentClient::connect(host).unwrap();
        let input: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let (stdout, stderr) = (Shared::default(), Shared::default());
        let out = Output { stdout: Some(Box::new(stdout.clone())), stderr: Some(Box::new(stderr.clone())) };
        let req = ExecRequest::new(["cat"]);
        let report = interactive(client, &req, io::Cursor::new(input.clone()), out).unwrap();
        assert!(report.status.success(), "{report:?}");
        assert!(stdout.0.lock().unwrap().as_slice() == input.as_slice(), "stdout differs from stdin");
        assert!(stderr.0.lock().unwrap().is_empty());
    }
}
