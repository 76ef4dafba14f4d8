//! The agent side of the protocol: accepts connections from any listener and
//! serves each on its own thread.
//!
//! Per exec the agent runs a few blocking threads — one per output pipe (or
//! the pty), one writing stdin when the host sends any, one waiting for the
//! exit — instead of a poll loop: each syscall is expensive in the guest, and
//! a blocked thread costs none. Threads come from a pool (`workers`), and
//! processes are started by a lean vfork-style spawner (`spawn`), both to
//! keep the syscall count per exec low. All children are reaped by one
//! process-wide reaper (`reaper`), which also reaps orphans when the agent
//! is PID 1.

mod command;
mod connection;
mod exec;
mod group_kill;
mod mount;
mod prefetch;
mod pty;
mod reaper;
mod spawn;
mod system;
mod user;
mod workers;
mod writer;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::Duration;

use crate::protocol::ErrorKind;
use crate::vsock::{VsockListener, VsockStream};

use reaper::ChildRegistry;

/// Stack size of the agent's worker threads: they only shuffle buffers that
/// live on the heap.
const WORKER_STACK: usize = 256 * 1024;

/// A connected byte stream the agent reads on one thread and writes from
/// others (output pumps), hence `try_clone_stream`.
pub trait AgentStream: Read + Write + Send + Sized + 'static {
    /// A second handle to the same connection.
    fn try_clone_stream(&self) -> io::Result<Self>;
    /// Tells the peer no more bytes come (half close).
    fn shutdown_write(&self) -> io::Result<()>;
}

impl AgentStream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl AgentStream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl AgentStream for VsockStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown_write()
    }
}

/// Something that yields connections.
pub trait AgentListener {
    /// The connection type.
    type Stream: AgentStream;
    /// Blocks until the next connection.
    fn accept_stream(&self) -> io::Result<Self::Stream>;
}

impl AgentListener for UnixListener {
    type Stream = UnixStream;
    fn accept_stream(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl AgentListener for TcpListener {
    type Stream = TcpStream;
    fn accept_stream(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl AgentListener for VsockListener {
    type Stream = VsockStream;
    fn accept_stream(&self) -> io::Result<VsockStream> {
        self.accept()
    }
}

/// A request that failed; becomes an `Error` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestError {
    pub(crate) kind: ErrorKind,
    pub(crate) message: String,
}

impl RequestError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RequestError { kind, message: message.into() }
    }

    /// From an OS error, with `context` saying what failed.
    pub(crate) fn io(context: &str, e: &io::Error) -> Self {
        RequestError::new(ErrorKind::from_io(e), format!("{context}: {e}"))
    }
}

/// The agent server. All servers of a process share one child reaper.
///
/// The reaper calls `waitpid(-1)`: a process hosting a server must not wait
/// for children itself (e.g. `std::process::Child::wait`), or the two steal
/// each other's exit statuses.
#[derive(Clone, Copy)]
pub struct Server {
    registry: &'static ChildRegistry,
}

impl Default for Server {
    fn default() -> Self {
        Server::new()
    }
}

impl Server {
    /// A server; starts the process-wide reaper on first use.
    pub fn new() -> Self {
        Server { registry: ChildRegistry::global() }
    }

    /// Accepts connections forever, each served on its own thread. Accept
    /// errors are logged and retried with a growing pause (up to 1 s).
    pub fn serve<L: AgentListener>(&self, listener: &L) -> ! {
        let mut failures: u32 = 0;
        loop {
            match listener.accept_stream() {
                Ok(stream) => {
                    failures = 0;
                    self.spawn_connection(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failures = failures.saturating_add(1);
                    agent_log!("accept failed: {e}");
                    let pause_ms = 10u64 << failures.min(7);
                    thread::sleep(Duration::from_millis(pause_ms.min(1000)));
                }
            }
        }
    }

    /// Serves one connection on the calling thread until it closes.
    pub fn serve_connection<S: AgentStream>(&self, stream: S) {
        connection::serve(stream, self.registry);
    }

    fn spawn_connection<S: AgentStream>(&self, stream: S) {
        let registry = self.registry;
        if let Err(e) = workers::run(move || connection::serve(stream, registry)) {
            // The stream was moved into the failed closure and is closed.
            agent_log!("cannot start a connection thread: {e}");
        }
    }
}

/// Locks `m`, ignoring poisoning: the agent's shared state stays consistent
/// across a panicking holder (every critical section is a few assignments).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
