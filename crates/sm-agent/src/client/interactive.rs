//! Full-duplex exec: the process's stdin fed while its output is awaited
//! (a [`super::RunningProcess`] waited for at once).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use super::{AgentClient, ClientError};
use crate::protocol::{ExecRequest, ExitReport};

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
        self.spawn(req, Some(Box::new(input)), out)?.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::super::process::tests::Shared;
    use super::*;

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
