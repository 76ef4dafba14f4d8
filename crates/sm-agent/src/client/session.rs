//! A running exec seen from the host: output events, stdin, signals.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::{AgentClient, ClientError, ExecOutcome, ExecTimeline, DEFAULT_OUTPUT_LIMIT};
use crate::protocol::{ExitReport, Message, STDIN_CHUNK};

/// One piece of a running exec's output, in the order the agent sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes on stdout (or the pty).
    Stdout(Vec<u8>),
    /// Bytes on stderr.
    Stderr(Vec<u8>),
    /// The process ended; the last event.
    Exited(ExitReport),
}

/// A started exec. Read events with [`Self::next_event`] (or collect them
/// with [`Self::wait`]); feed stdin with [`Self::send_stdin`].
///
/// Stdin is flow-controlled by the agent's window: when the window is full,
/// `send_stdin` reads events until the agent acknowledges, queueing them for
/// `next_event`, so a process that writes while it reads never deadlocks.
/// Dropping a session before `Exited` leaves the connection unusable
/// ([`ClientError::Desynchronized`]).
pub struct ExecSession<'c, S: Read + Write> {
    client: &'c mut AgentClient<S>,
    pid: i32,
    credit: u64,
    stdin_enabled: bool,
    stdin_open: bool,
    pending: VecDeque<ExecEvent>,
    /// Output bytes in `pending`, and how many may wait there.
    pending_bytes: usize,
    pub(super) pending_limit: usize,
    exit: Option<ExitReport>,
    /// When `Exec` was sent, and the host-side times seen since.
    sent_at: Instant,
    timeline: ExecTimeline,
}

impl<'c, S: Read + Write> ExecSession<'c, S> {
    pub(super) fn new(
        client: &'c mut AgentClient<S>,
        pid: i32,
        stdin_window: u32,
        stdin_enabled: bool,
        sent_at: Instant,
    ) -> Self {
        let timeline = ExecTimeline { started: sent_at.elapsed(), ..ExecTimeline::default() };
        ExecSession {
            client,
            pid,
            credit: u64::from(stdin_window),
            stdin_enabled,
            stdin_open: stdin_enabled,
            pending: VecDeque::new(),
            pending_bytes: 0,
            pending_limit: DEFAULT_OUTPUT_LIMIT,
            exit: None,
            sent_at,
            timeline,
        }
    }

    /// Host-side times of this exec so far (from `Exec` sent).
    pub fn timeline(&self) -> ExecTimeline {
        self.timeline
    }

    /// The process's pid in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The exit report, once `Exited` arrived.
    pub fn exit_report(&self) -> Option<ExitReport> {
        self.exit
    }

    /// Reads one message of this exec; stdin acknowledgements are consumed
    /// here and yield `None`.
    fn receive(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        let msg = self.client.recv()?;
        if matches!(msg, Message::Stdout { .. } | Message::Stderr { .. }) && self.timeline.first_output.is_none() {
            self.timeline.first_output = Some(self.sent_at.elapsed());
        }
        match msg {
            Message::Stdout { data } => Ok(Some(ExecEvent::Stdout(data))),
            Message::Stderr { data } => Ok(Some(ExecEvent::Stderr(data))),
            Message::Exited(report) => {
                self.timeline.exited = self.sent_at.elapsed();
                self.exit = Some(report);
                Ok(Some(ExecEvent::Exited(report)))
            }
            Message::StdinAck { bytes } => {
                self.credit += u64::from(bytes);
                Ok(None)
            }
            other => {
                // An Error here ends the exec abnormally; the agent closes.
                let err = self.client.unexpected(other, "during an exec");
                self.client.mark_desynchronized();
                Err(err)
            }
        }
    }

    /// The next output event; `None` after `Exited` was returned.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if let Some(ev) = self.pending.pop_front() {
            self.pending_bytes -= event_bytes(&ev);
            return Ok(Some(ev));
        }
        if self.exit.is_some() {
            return Ok(None);
        }
        loop {
            if let Some(ev) = self.receive()? {
                return Ok(Some(ev));
            }
        }
    }

    /// Sends `data` to the process's stdin, waiting for window credit as
    /// needed. If the process exits first, the rest is dropped (like a
    /// closed pipe) and this returns `Ok`.
    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if !self.stdin_enabled {
            return Err(ClientError::InvalidArgument("the exec was started without stdin".into()));
        }
        if !self.stdin_open {
            return Err(ClientError::InvalidArgument("stdin is already closed".into()));
        }
        let mut rest = data;
        while !rest.is_empty() && self.exit.is_none() {
            if self.credit == 0 {
                if let Some(ev) = self.receive()? {
                    // Output that arrives while the process does not read
                    // its stdin waits here, bounded like collected output.
                    self.pending_bytes += event_bytes(&ev);
                    if self.pending_bytes > self.pending_limit {
                        return Err(ClientError::OutputTooLarge { limit: self.pending_limit });
                    }
                    self.pending.push_back(ev);
                }
                continue;
            }
            let n = rest.len().min(STDIN_CHUNK).min(usize::try_from(self.credit).unwrap_or(usize::MAX));
            self.client.send(&Message::Stdin { data: rest[..n].to_vec() })?;
            self.credit -= n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Closes the process's stdin (EOF; on a pty: a Ctrl-D).
    pub fn close_stdin(&mut self) -> Result<(), ClientError> {
        if self.stdin_open && self.exit.is_none() {
            self.client.send(&Message::StdinClose)?;
        }
        self.stdin_open = false;
        Ok(())
    }

    /// Sends signal `signo` (1..=64) to the process, if it still runs.
    pub fn signal(&mut self, signo: i32) -> Result<(), ClientError> {
        if !(1..=64).contains(&signo) {
            return Err(ClientError::InvalidArgument(format!("signal {signo} is not in 1..=64")));
        }
        if self.exit.is_none() {
            self.client.send(&Message::Signal { signo })?;
        }
        Ok(())
    }

    /// Reads until `Exited`, collecting the remaining output, at most
    /// [`DEFAULT_OUTPUT_LIMIT`] bytes of it (see [`ExecSession::wait_limited`]).
    pub fn wait(self) -> Result<ExecOutcome, ClientError> {
        self.wait_limited(DEFAULT_OUTPUT_LIMIT)
    }

    /// Reads until `Exited`, collecting the remaining output. Past `limit`
    /// bytes (stdout and stderr together) the error is
    /// [`ClientError::OutputTooLarge`] at once, without waiting for the rest:
    /// the connection is then out of sync and must be dropped, which makes
    /// the agent kill the process's whole group. (No SIGKILL is sent first:
    /// once the leader is reaped the agent no longer knows its group, and a
    /// pipeline behind it would go on writing.)
    pub fn wait_limited(mut self, limit: usize) -> Result<ExecOutcome, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(ev) = self.next_event()? {
            let (is_stdout, data) = match ev {
                ExecEvent::Stdout(d) => (true, d),
                ExecEvent::Stderr(d) => (false, d),
                ExecEvent::Exited(_) => continue,
            };
            if stdout.len() + stderr.len() + data.len() > limit {
                return Err(ClientError::OutputTooLarge { limit });
            }
            if is_stdout {
                stdout.extend_from_slice(&data);
            } else {
                stderr.extend_from_slice(&data);
            }
        }
        let report = self.exit.expect("next_event returns None only after Exited arrived");
        Ok(ExecOutcome {
            pid: self.pid,
            status: report.status,
            timed_out: report.timed_out,
            stdout,
            stderr,
            duration: Duration::from_micros(report.duration_us),
            cost: report.cost,
            timeline: self.timeline,
        })
    }
}

impl<S: Read + Write> Drop for ExecSession<'_, S> {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.client.mark_desynchronized();
        }
    }
}

/// Output bytes an event carries.
fn event_bytes(ev: &ExecEvent) -> usize {
    match ev {
        ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => d.len(),
        ExecEvent::Exited(_) => 0,
    }
}
