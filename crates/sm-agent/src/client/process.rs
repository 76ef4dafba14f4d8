//! A guest process that runs on in the background ([`RunningProcess`]): its
//! output streams to host writers, its stdin is fed from a host reader, and
//! it can be signalled, resized or waited for from any thread — what a
//! container runtime needs of a container's processes.
//!
//! Four threads per process, so that no one of them can block another: one
//! reads the agent's frames, one writes the output to its sinks (behind a
//! bounded queue: a sink nobody reads holds up the output — the agent's
//! window then stalls the guest process, as a full pipe would — but never
//! the exit report once the process was signalled), one reads the host
//! input, and one owns the socket's writing side (stdin within the agent's
//! window, signals, resizes, stdin close).

use std::collections::VecDeque;
use std::io::{self, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{AgentClient, ClientError, ExecOutput};
use crate::protocol::{read_message, write_message, ExecRequest, ExitReport, Message, ProtocolError, STDIN_CHUNK};

/// How long the agent may take to start the process (its `Started`).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one write to the agent may block (the agent reads its socket
/// promptly: stdin is sent within its window only).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Control messages waiting for the writing thread.
const CONTROL_QUEUE: usize = 64;
/// Output chunks waiting for their sink.
const OUTPUT_QUEUE: usize = 64;
/// Once the process was signalled, how long a full output queue may hold up
/// the frames behind it (the exit report) before its chunks are dropped.
const SIGNALLED_OUTPUT_STALL: Duration = Duration::from_secs(5);

/// What the writing thread acts on.
enum Control {
    /// A chunk of host input; empty at its EOF (or a read error).
    Stdin(Vec<u8>),
    /// The agent acknowledged stdin bytes (added to the shared credit).
    Credit,
    Signal(i32),
    Resize(u16, u16),
    CloseStdin,
    /// The reading side ended (exit report or a broken connection).
    Ended,
}

enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// How a process ended, as every waiter sees it.
#[derive(Debug, Clone)]
enum Ending {
    Exited(ExitReport),
    /// The connection broke or the agent sent something unexpected.
    Lost(String),
}

#[derive(Default)]
struct ExitSlot {
    ending: Mutex<Option<Ending>>,
    ended: Condvar,
}

impl ExitSlot {
    fn set(&self, ending: Ending) {
        let mut slot = self.ending.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(ending);
        self.ended.notify_all();
    }
}

/// What the threads of one process share.
struct Shared {
    exit: ExitSlot,
    /// Stdin bytes the agent's window still allows.
    credit: AtomicU64,
    /// A signal was sent: a stalled output sink no longer holds up the exit.
    signalled: AtomicBool,
    /// Output bytes dropped because their sink stalled after a signal.
    dropped_output: AtomicU64,
}

/// A process started by [`AgentClient::spawn`], running until it exits.
///
/// Dropping the handle does not stop the process: its output keeps flowing
/// to the writers it was given until it exits.
pub struct RunningProcess {
    pid: i32,
    control: mpsc::SyncSender<Control>,
    shared: Arc<Shared>,
}

impl AgentClient<UnixStream> {
    /// Starts `req` and returns once the agent started it (or after
    /// [`START_TIMEOUT`]): output streams to `out`; `input`, when given, is
    /// the process's stdin (closed at its EOF; fed within the agent's stdin
    /// window, so a process that does not read cannot make us buffer all of
    /// it), otherwise stdin is `/dev/null`. Works with `req.tty` (output then
    /// arrives as stdout).
    pub fn spawn(
        self,
        req: &ExecRequest,
        input: Option<Box<dyn Read + Send>>,
        out: ExecOutput,
    ) -> Result<RunningProcess, ClientError> {
        let mut sock = self.into_inner();
        let with_stdin = input.is_some();
        sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
        write_message(&mut sock, &Message::Exec(ExecRequest { stdin: with_stdin, ..req.clone() }))?;
        let mut reader = BufReader::new(sock.try_clone()?);
        sock.set_read_timeout(Some(START_TIMEOUT))?;
        let (pid, window) = match read_message(&mut reader)? {
            Message::Started { pid, stdin_window } => (pid, stdin_window),
            other => return Err(unexpected(other, "in reply to Exec")),
        };
        // From here on the process may run for as long as it likes.
        sock.set_read_timeout(None)?;
        // If a thread cannot be started the process must not run on
        // unwatched: hanging up makes the agent kill it.
        let guard = sock.try_clone()?;
        let started = start_threads(sock, reader, input, out, pid, window);
        if started.is_err() {
            let _ = guard.shutdown(std::net::Shutdown::Both);
        }
        let (control, shared) = started?;
        Ok(RunningProcess { pid, control, shared })
    }
}

/// The threads of a started process; the control sender and shared state.
fn start_threads(
    sock: UnixStream,
    reader: BufReader<UnixStream>,
    input: Option<Box<dyn Read + Send>>,
    out: ExecOutput,
    pid: i32,
    window: u32,
) -> io::Result<(mpsc::SyncSender<Control>, Arc<Shared>)> {
    let with_stdin = input.is_some();
    let (control, control_rx) = mpsc::sync_channel(CONTROL_QUEUE);
    let shared = Arc::new(Shared {
        exit: ExitSlot::default(),
        credit: AtomicU64::new(u64::from(window)),
        signalled: AtomicBool::new(false),
        dropped_output: AtomicU64::new(0),
    });

    let (out_tx, out_rx) = mpsc::sync_channel(OUTPUT_QUEUE);
    let (flushed_tx, flushed_rx) = mpsc::channel::<()>();
    std::thread::Builder::new().name(format!("exec-{pid}-sink")).spawn(move || {
        write_output(out, &out_rx);
        let _ = flushed_tx.send(());
    })?;
    let (reader_control, reader_shared) = (control.clone(), Arc::clone(&shared));
    std::thread::Builder::new().name(format!("exec-{pid}-out")).spawn(move || {
        read_frames(reader, out_tx, &flushed_rx, &reader_control, &reader_shared);
    })?;
    // One chunk of input in flight at a time: the reader waits for `next`
    // before reading more.
    let (next_tx, next_rx) = mpsc::sync_channel::<()>(1);
    if let Some(input) = input {
        let input_control = control.clone();
        std::thread::Builder::new()
            .name(format!("exec-{pid}-in"))
            .spawn(move || read_input(input, &input_control, &next_rx))?;
    }
    let control_shared = Arc::clone(&shared);
    std::thread::Builder::new().name(format!("exec-{pid}-ctl")).spawn(move || {
        write_control(sock, &control_rx, &next_tx, &control_shared, with_stdin);
    })?;
    Ok((control, shared))
}

impl RunningProcess {
    /// The process's pid in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn send(&self, what: Control) -> Result<(), ClientError> {
        if self.has_ended() {
            return Err(ClientError::InvalidArgument(format!("process {} has already exited", self.pid)));
        }
        self.control.send(what).map_err(|_| ProtocolError::Closed.into())
    }

    /// Sends signal `signo` to the process (the agent delivers it in the
    /// guest). An error means it has ended (or the connection is gone).
    pub fn signal(&self, signo: i32) -> Result<(), ClientError> {
        if !(1..=64).contains(&signo) {
            return Err(ClientError::InvalidArgument(format!("signal {signo} is not in 1..=64")));
        }
        self.shared.signalled.store(true, Ordering::Relaxed);
        self.send(Control::Signal(signo))
    }

    /// Sets the size of the process's terminal (ignored by the agent for a
    /// process without one). An error means it has ended.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.send(Control::Resize(rows, cols))
    }

    /// Closes the process's stdin (the rest of the input is not sent).
    pub fn close_stdin(&self) {
        // Once the process has ended there is nothing to close.
        let _ = self.send(Control::CloseStdin);
    }

    /// Output bytes dropped because their sink did not take them within
    /// [`SIGNALLED_OUTPUT_STALL`] after the process was signalled (so that
    /// the exit report behind them was not held up).
    pub fn dropped_output(&self) -> u64 {
        self.shared.dropped_output.load(Ordering::Relaxed)
    }

    /// Whether the process has exited (or its connection broke).
    pub fn has_ended(&self) -> bool {
        self.shared.exit.ending.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Waits for the exit report.
    pub fn wait(&self) -> Result<ExitReport, ClientError> {
        self.wait_until(None).expect("no deadline: waits for the end")
    }

    /// Waits at most `timeout` for the exit report; `None` if still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<ExitReport, ClientError>> {
        self.wait_until(Some(Instant::now() + timeout))
    }

    /// The exit report, once there, or `None` at `deadline`.
    fn wait_until(&self, deadline: Option<Instant>) -> Option<Result<ExitReport, ClientError>> {
        let exit = &self.shared.exit;
        let mut slot = exit.ending.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(ending) = slot.as_ref() {
                return Some(ending_result(ending));
            }
            slot = match deadline {
                None => exit.ended.wait(slot).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    exit.ended.wait_timeout(slot, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }
}

fn ending_result(ending: &Ending) -> Result<ExitReport, ClientError> {
    match ending {
        Ending::Exited(report) => Ok(*report),
        Ending::Lost(why) => Err(ClientError::ProcessLost(why.clone())),
    }
}

/// The sink thread: output chunks to `out` in order.
fn write_output(mut out: ExecOutput, chunks: &mpsc::Receiver<Output>) {
    for chunk in chunks {
        match chunk {
            Output::Stdout(data) => out.stdout(&data),
            Output::Stderr(data) => out.stderr(&data),
        }
    }
}

/// Queues `chunk` for the sink; waits while the queue is full, except that
/// once the process was signalled a sink stalled past
/// [`SIGNALLED_OUTPUT_STALL`] loses the chunk (counted) — and from then on
/// (`draining`) every chunk that finds the queue full.
fn queue_output(out: &mpsc::SyncSender<Output>, mut chunk: Output, shared: &Shared, draining: &mut bool) {
    let mut stalled_since: Option<Instant> = None;
    loop {
        match out.try_send(chunk) {
            Ok(()) => {
                // The sink moves again: no more dropping.
                *draining = false;
                return;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return,
            Err(mpsc::TrySendError::Full(back)) => chunk = back,
        }
        let since = *stalled_since.get_or_insert_with(Instant::now);
        let signalled = shared.signalled.load(Ordering::Relaxed);
        if signalled && (*draining || since.elapsed() > SIGNALLED_OUTPUT_STALL) {
            *draining = true;
            let len = match &chunk {
                Output::Stdout(d) | Output::Stderr(d) => d.len() as u64,
            };
            shared.dropped_output.fetch_add(len, Ordering::Relaxed);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The reading thread: frames until the exit report.
fn read_frames(
    mut reader: BufReader<UnixStream>,
    out: mpsc::SyncSender<Output>,
    flushed: &mpsc::Receiver<()>,
    control: &mpsc::SyncSender<Control>,
    shared: &Shared,
) {
    let mut draining = false;
    let ending = loop {
        match read_message(&mut reader) {
            Ok(Message::Stdout { data }) => queue_output(&out, Output::Stdout(data), shared, &mut draining),
            Ok(Message::Stderr { data }) => queue_output(&out, Output::Stderr(data), shared, &mut draining),
            Ok(Message::StdinAck { bytes }) => {
                shared.credit.fetch_add(u64::from(bytes), Ordering::Relaxed);
                // One wake-up pending is enough: a full queue already has one.
                let _ = control.try_send(Control::Credit);
            }
            Ok(Message::Exited(report)) => break Ending::Exited(report),
            Ok(other) => break Ending::Lost(unexpected(other, "during an exec").to_string()),
            Err(e) => break Ending::Lost(e.to_string()),
        }
    };
    // The output is complete before anyone learns of the exit — unless the
    // process was signalled and its sink is stalled.
    drop(out);
    let mut signalled_at: Option<Instant> = None;
    while let Err(mpsc::RecvTimeoutError::Timeout) = flushed.recv_timeout(Duration::from_millis(100)) {
        // A signal sent while the sink is stuck (now or later) bounds the wait.
        if shared.signalled.load(Ordering::Relaxed) {
            let since = *signalled_at.get_or_insert_with(Instant::now);
            if since.elapsed() > SIGNALLED_OUTPUT_STALL {
                break;
            }
        }
    }
    shared.exit.set(ending);
    // The writer may be full; it also stops when every sender is gone.
    let _ = control.try_send(Control::Ended);
}

/// The input thread: chunks of `input` until its EOF.
fn read_input(mut input: Box<dyn Read + Send>, control: &mpsc::SyncSender<Control>, next: &mpsc::Receiver<()>) {
    loop {
        let mut buf = vec![0u8; STDIN_CHUNK];
        let read = loop {
            match input.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        // A read error ends the input like EOF: the process's stdin is
        // closed (the process decides what that means).
        let n = read.unwrap_or(0);
        buf.truncate(n);
        if control.send(Control::Stdin(buf)).is_err() || n == 0 || next.recv().is_err() {
            break;
        }
    }
}

/// The writing thread: stdin within the window, signals, resizes, close.
/// Ends when the process has ended (or every handle is gone).
fn write_control(
    mut sock: UnixStream,
    control: &mpsc::Receiver<Control>,
    next: &mpsc::SyncSender<()>,
    shared: &Shared,
    with_stdin: bool,
) {
    let mut pending: VecDeque<u8> = VecDeque::new();
    let (mut eof, mut stdin_open) = (false, with_stdin);
    // A failed (or timed-out) write may have left half a frame: nothing more
    // can be said on this connection. Hanging up makes the agent kill the
    // process; the reader then reports the connection lost.
    let hang_up = |sock: &UnixStream| {
        let _ = sock.shutdown(std::net::Shutdown::Both);
    };
    while let Ok(event) = control.recv() {
        match event {
            Control::Stdin(data) if data.is_empty() => eof = true,
            Control::Stdin(data) => pending.extend(data),
            Control::Credit => {}
            Control::Signal(signo) => {
                if write_message(&mut sock, &Message::Signal { signo }).is_err() {
                    hang_up(&sock);
                    break;
                }
            }
            Control::Resize(rows, cols) => {
                if write_message(&mut sock, &Message::Resize { rows, cols }).is_err() {
                    hang_up(&sock);
                    break;
                }
            }
            Control::CloseStdin => {
                pending.clear();
                eof = true;
            }
            Control::Ended => break,
        }
        if shared.exit.ending.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            break;
        }
        // Input waiting now; once all of it is sent, the input thread may read more.
        let had_pending = !pending.is_empty();
        let mut credit = shared.credit.load(Ordering::Relaxed);
        while stdin_open && !pending.is_empty() && credit > 0 {
            let n = pending.len().min(STDIN_CHUNK).min(usize::try_from(credit).unwrap_or(usize::MAX));
            let data: Vec<u8> = pending.drain(..n).collect();
            credit = shared.credit.fetch_sub(n as u64, Ordering::Relaxed) - n as u64;
            if write_message(&mut sock, &Message::Stdin { data }).is_err() {
                hang_up(&sock);
                return;
            }
        }
        if stdin_open && pending.is_empty() {
            if eof {
                stdin_open = false;
                if write_message(&mut sock, &Message::StdinClose).is_err() {
                    hang_up(&sock);
                    return;
                }
            } else if had_pending {
                let _ = next.try_send(());
            }
        }
        if !stdin_open {
            pending.clear();
        }
    }
}

pub(super) fn unexpected(msg: Message, context: &'static str) -> ClientError {
    match msg {
        Message::Error { kind, message } => ClientError::Agent { kind, message },
        other => ProtocolError::Unexpected { got: other.message_type(), context }.into(),
    }
}

#[cfg(test)]
#[path = "process_tests.rs"]
pub(super) mod tests;
