//! Running one exec: spawn, output pumps, stdin feeder, exit and timeout.
//!
//! Threads per exec (pooled): one pump per output (stdout + stderr, or the
//! pty master), a stdin feeder if the host sends stdin, and a finisher that
//! waits for the exit status (killing the process group at the timeout),
//! lets the pumps drain, and writes `Exited`. Each blocks in one syscall at a
//! time; nothing polls.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::command::{self, Prepared};
use super::reaper::{timeval_us, ChildRegistry, ChildUsage, Reaped};
use super::writer::FrameWriter;
use super::{lock, RequestError};
use crate::protocol::{
    DataFrame, ExecRequest, ExitReport, ExitStatus, GuestCost, Message, MessageType, OUTPUT_CHUNK, STDIN_WINDOW,
};

/// After the process exited, how long its output pipes may stay idle before
/// `Exited` is sent anyway (a background process may hold them open; its
/// later output is dropped).
const PIPE_GRACE: Duration = Duration::from_millis(200);

/// What a connection shares with the threads of its exec.
#[derive(Clone)]
pub(crate) struct ExecContext {
    pub(crate) writer: Arc<FrameWriter>,
    pub(crate) active: Arc<Mutex<Option<ActiveExec>>>,
    pub(crate) registry: &'static ChildRegistry,
}

/// The exec currently running on a connection.
pub(crate) struct ActiveExec {
    pub(crate) id: u64,
    pub(crate) pid: libc::pid_t,
    /// Present while the host may still send stdin.
    pub(crate) stdin: Option<StdinFeeder>,
    /// The pty master of a `tty` exec (a duplicate), for resizing.
    pub(crate) pty: Option<File>,
}

enum StdinChunk {
    Data(Vec<u8>),
    Eof,
}

/// The connection's handle to the stdin feeder thread.
pub(crate) struct StdinFeeder {
    tx: Sender<StdinChunk>,
    in_flight: Arc<AtomicU64>,
}

impl StdinFeeder {
    /// Queues `data` for the process. Fails if the host overran the window.
    pub(crate) fn push(&self, data: Vec<u8>) -> Result<(), String> {
        let len = data.len() as u64;
        let in_flight = self.in_flight.fetch_add(len, Ordering::SeqCst) + len;
        if in_flight > u64::from(STDIN_WINDOW) {
            return Err(format!("{in_flight} unacknowledged stdin bytes exceed the window of {STDIN_WINDOW}"));
        }
        // A gone feeder (process exited) just drops the data.
        let _ = self.tx.send(StdinChunk::Data(data));
        Ok(())
    }

    /// Ends stdin (closes the pipe; on a pty sends ^D).
    pub(crate) fn close(self) {
        let _ = self.tx.send(StdinChunk::Eof);
    }
}

/// Counts open output pumps and their progress, so the finisher can tell
/// "still draining" from "held open by a background process".
struct PumpTracker {
    open: Mutex<usize>,
    all_closed: Condvar,
    /// Chunks forwarded so far.
    progress: AtomicU64,
    /// Pumps in the middle of writing a chunk to the host.
    busy: AtomicUsize,
}

impl PumpTracker {
    fn new(open: usize) -> Self {
        PumpTracker {
            open: Mutex::new(open),
            all_closed: Condvar::new(),
            progress: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn pump_closed(&self) {
        let mut open = lock(&self.open);
        *open = open.saturating_sub(1);
        if *open == 0 {
            self.all_closed.notify_all();
        }
    }

    /// Returns when every pump reached EOF, or when they made no progress
    /// for `grace` while none was writing.
    fn wait_drained(&self, grace: Duration) {
        let mut open = lock(&self.open);
        let mut last_progress = self.progress.load(Ordering::SeqCst);
        while *open > 0 {
            let (guard, timeout) =
                self.all_closed.wait_timeout(open, grace).unwrap_or_else(std::sync::PoisonError::into_inner);
            open = guard;
            if timeout.timed_out() {
                let progress = self.progress.load(Ordering::SeqCst);
                if progress == last_progress && self.busy.load(Ordering::SeqCst) == 0 {
                    return;
                }
                last_progress = progress;
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Guest-kernel CPU time of the calling thread so far.
fn thread_system_us() -> u64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0;
    }
    timeval_us(usage.ru_stime)
}

fn spawn_worker(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    super::workers::run(job)
}

/// Kills the process group of `pid` and `pid` itself (in case it left the
/// group); once `pid` is reaped, what is left of its group.
pub(crate) fn kill_exec(registry: &ChildRegistry, pid: libc::pid_t) -> bool {
    let group = registry.signal(pid, libc::SIGKILL, true);
    let single = registry.signal(pid, libc::SIGKILL, false);
    if matches!(group, Ok(false)) {
        let left = super::group_kill::signal_group_members(std::path::Path::new("/proc"), pid, libc::SIGKILL);
        if left > 0 {
            agent_log!("killed {left} processes left in the group of exec pid {pid} after it ended");
        }
        return left > 0;
    }
    matches!(group, Ok(true)) || matches!(single, Ok(true))
}

/// Starts `req` as exec `id`: on success `Started` has been written and the
/// exec's threads run; on failure nothing was written.
pub(crate) fn start(req: &ExecRequest, id: u64, ctx: &ExecContext) -> Result<(), RequestError> {
    let received = Instant::now();
    let agent_system_before = thread_system_us();
    let mut prepared = command::prepare(req)?;
    let (pid, status_rx) = ctx.registry.spawn(|| prepared.spawn())?;
    let started = Instant::now();
    let Prepared { outputs, stdin_sink, pty_keepalive, .. } = prepared;
    let abort = |what: &str, e: io::Error| {
        kill_exec(ctx.registry, pid);
        RequestError::io(what, &e)
    };

    let feeder = match stdin_sink {
        Some(sink) => Some(
            start_stdin_feeder(sink, id, req.tty, ctx.writer.clone())
                .map_err(|e| abort("starting the stdin thread", e))?,
        ),
        None => None,
    };
    let pty = pty_keepalive.as_ref().and_then(|f| f.try_clone().ok());
    *lock(&ctx.active) = Some(ActiveExec { id, pid, stdin: feeder, pty });
    let started_msg = Message::Started { pid, stdin_window: STDIN_WINDOW };
    if ctx.writer.begin_exec(id, &started_msg).is_err() {
        // The host is gone; the connection thread notices on its next read.
        kill_exec(ctx.registry, pid);
        lock(&ctx.active).take();
        return Ok(());
    }
    let spawn_cost = GuestCost {
        spawn_us: micros(received.elapsed()),
        agent_system_us: thread_system_us().saturating_sub(agent_system_before),
        ..GuestCost::default()
    };

    let tracker = Arc::new(PumpTracker::new(outputs.len()));
    for (source, ty) in outputs {
        let (writer, pump_tracker) = (ctx.writer.clone(), tracker.clone());
        let spawned = spawn_worker(move || {
            pump(source, ty, id, &writer, &pump_tracker);
        });
        if let Err(e) = spawned {
            agent_log!("cannot start an output thread for pid {pid}: {e}; killing it");
            kill_exec(ctx.registry, pid);
            tracker.pump_closed();
        }
    }

    let finisher = Finisher {
        ctx: ctx.clone(),
        id,
        pid,
        status_rx,
        timeout: req.timeout_ms.map(Duration::from_millis),
        started,
        spawn_cost,
        tracker,
        pty_keepalive,
    };
    // If no thread can be started, finish on this thread after a kill.
    let slot = Arc::new(Mutex::new(Some(finisher)));
    let thread_slot = slot.clone();
    let spawned = spawn_worker(move || {
        if let Some(f) = lock(&thread_slot).take() {
            f.run();
        }
    });
    if let Err(e) = spawned {
        agent_log!("cannot start the exit thread for pid {pid}: {e}; killing it");
        kill_exec(ctx.registry, pid);
        let finisher = lock(&slot).take();
        if let Some(f) = finisher {
            f.run();
        }
    }
    Ok(())
}

/// Forwards one output of the process until EOF (or EIO: pty hangup).
fn pump(mut source: File, ty: MessageType, id: u64, writer: &FrameWriter, tracker: &PumpTracker) {
    let mut frame = DataFrame::new(OUTPUT_CHUNK);
    let mut forwarding = true;
    loop {
        let n = match source.read(frame.data_mut()) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if forwarding {
            tracker.busy.fetch_add(1, Ordering::SeqCst);
            // After the exec finished (or the host left) keep draining the
            // pipe so writers do not block, but forward nothing.
            forwarding = matches!(writer.send_exec_frame(id, frame.seal(ty, n)), Ok(true));
            tracker.busy.fetch_sub(1, Ordering::SeqCst);
        }
        tracker.progress.fetch_add(1, Ordering::SeqCst);
    }
    drop(source);
    tracker.pump_closed();
}

fn start_stdin_feeder(sink: File, id: u64, tty: bool, writer: Arc<FrameWriter>) -> io::Result<StdinFeeder> {
    let (tx, rx) = mpsc::channel();
    let in_flight = Arc::new(AtomicU64::new(0));
    let counter = in_flight.clone();
    spawn_worker(move || {
        feed_stdin(sink, &rx, id, tty, &writer, &counter);
    })?;
    Ok(StdinFeeder { tx, in_flight })
}

/// Writes stdin chunks to the process and acknowledges each.
fn feed_stdin(
    mut sink: File,
    rx: &Receiver<StdinChunk>,
    id: u64,
    tty: bool,
    writer: &FrameWriter,
    in_flight: &AtomicU64,
) {
    let mut open = true;
    let mut at_line_start = true;
    for chunk in rx.iter() {
        match chunk {
            StdinChunk::Data(data) => {
                if open {
                    // EPIPE: the process closed stdin; drop the rest, keep acking.
                    open = sink.write_all(&data).is_ok();
                    if let Some(&last) = data.last() {
                        at_line_start = last == b'\n';
                    }
                }
                in_flight.fetch_sub(data.len() as u64, Ordering::SeqCst);
                let ack = Message::StdinAck { bytes: data.len() as u32 };
                let _ = writer.send_exec_message(id, &ack);
            }
            StdinChunk::Eof => {
                if tty && open {
                    // A pty has no EOF of its own: ^D at the start of a line
                    // is one (a first ^D flushes a pending partial line).
                    let eof: &[u8] = if at_line_start { b"\x04" } else { b"\x04\x04" };
                    let _ = sink.write_all(eof);
                }
                break;
            }
        }
    }
    // Dropping `sink` closes the pipe: EOF for the process.
}

/// Waits for the exit and ends the exec.
struct Finisher {
    ctx: ExecContext,
    id: u64,
    pid: libc::pid_t,
    status_rx: Receiver<Reaped>,
    timeout: Option<Duration>,
    started: Instant,
    /// The agent's side of the spawn.
    spawn_cost: GuestCost,
    tracker: Arc<PumpTracker>,
    /// A pty master fd held until the process is reaped.
    pty_keepalive: Option<File>,
}

impl Finisher {
    fn run(self) {
        let mut timed_out = false;
        let reaped = match self.timeout {
            Some(limit) => {
                let left = limit.saturating_sub(self.started.elapsed());
                match self.status_rx.recv_timeout(left) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => {
                        timed_out = kill_exec(self.ctx.registry, self.pid);
                        self.status_rx.recv().ok()
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            }
            None => self.status_rx.recv().ok(),
        };
        let (status, ended, usage) = match reaped {
            Some(r) => (r.status, r.at, r.usage),
            None => {
                agent_log!("lost the exit status of pid {}", self.pid);
                (ExitStatus::Code(255), Instant::now(), ChildUsage::default())
            }
        };
        drop(self.pty_keepalive);
        self.tracker.wait_drained(PIPE_GRACE);

        // Retire the exec before `Exited` goes out, so the host's next
        // request never finds it busy. Dropping it ends the stdin feeder.
        let retired = {
            let mut active = lock(&self.ctx.active);
            if active.as_ref().is_some_and(|a| a.id == self.id) {
                active.take()
            } else {
                None
            }
        };
        drop(retired);
        let report = ExitReport {
            status,
            timed_out,
            duration_us: micros(ended.duration_since(self.started)),
            cost: GuestCost {
                finish_us: micros(ended.elapsed()),
                user_us: usage.user_us,
                system_us: usage.system_us,
                minor_faults: usage.minor_faults,
                major_faults: usage.major_faults,
                ..self.spawn_cost
            },
        };
        let _ = self.ctx.writer.finish_exec(self.id, &Message::Exited(report));
    }
}
