//! Published ports without a network device (`--network none -p ...`): a host
//! TCP listener whose connections each become an agent `Connect` tunnel to
//! the guest's loopback port, over vsock.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] tunnels per port at once (more are
//! closed at accept); a tunnel with no byte either way for [`IDLE_TIMEOUT`]
//! is closed. A host-side half close ends the connection (the vsock device
//! turns a host end of file into a full shutdown).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sm_agent::AgentClient;

use crate::network::PublishedPort;
use crate::{connect_vsock, Error, Result};

/// Tunnels one published port serves at once.
pub const MAX_CONNECTIONS: usize = 128;
/// A tunnel with no byte either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How often the accept loop looks at its stop flag (it wakes at once for a
/// connection), and how often a copy looks at the idle clock.
const POLL: Duration = Duration::from_millis(100);
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// Bytes copied per read.
const CHUNK: usize = 64 * 1024;

/// A guest port published on the host over vsock; stops listening when
/// dropped (open connections end with the VM or their peers).
pub struct PortForward {
    port: PublishedPort,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PortForward {
    /// Listens on `port`'s host address (port 0 picks one) and tunnels each
    /// connection to its guest port through the agent at `vsock`/`agent_port`.
    pub(crate) fn start(vsock: PathBuf, agent_port: u32, port: PublishedPort) -> Result<PortForward> {
        if port.tls {
            return Err(Error::Unsupported(format!(
                "{port}: TLS on a port published without a network device; use a passt network for /tls"
            )));
        }
        let listener = TcpListener::bind((port.host_ip, port.host_port)).map_err(|source| {
            sm_net::NetError::PortUnavailable { addr: format!("{}:{}", port.host_ip, port.host_port), source }
        })?;
        let io = |what: &str| {
            let what = format!("{what} for published port {port}");
            move |source| Error::Io { what, source }
        };
        let host_port = listener.local_addr().map_err(io("reading the listener's address"))?.port();
        listener.set_nonblocking(true).map_err(io("making the listener non-blocking"))?;
        let port = PublishedPort { host_port, ..port };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("forward-{host_port}"))
            .spawn(move || accept_loop(listener, vsock, agent_port, port.guest_port, &stopped))
            .map_err(io("starting the accept thread"))?;
        Ok(PortForward { port, stop, thread: Some(thread) })
    }

    /// The published port, with the host port picked for 0.
    pub fn port(&self) -> PublishedPort {
        self.port
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, vsock: PathBuf, agent_port: u32, guest_port: u16, stop: &AtomicBool) {
    let open = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(&listener, POLL);
                continue;
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!("published port {guest_port}: accept failed: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let Some(slot) = Slot::take(&open) else {
            tracing::warn!("published port {guest_port}: {MAX_CONNECTIONS} connections open, closing a new one");
            continue;
        };
        let vsock = vsock.clone();
        // The slot goes back when the thread ends, or with the closure if
        // the thread cannot start.
        let spawned = std::thread::Builder::new().name("forward-conn".into()).spawn(move || {
            let _slot = slot;
            if let Err(e) = tunnel(conn, &vsock, agent_port, guest_port) {
                tracing::debug!("published port {guest_port}: {e}");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("published port {guest_port}: cannot start a connection thread: {e}");
        }
    }
}

/// One of a port's [`MAX_CONNECTIONS`] places, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Slot> {
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits until `listener` has a connection, at most `timeout`.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd on a descriptor the listener owns, for the call.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
}

/// When either direction of a tunnel last moved a byte (ms since its start).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// One connection: a tunnel to the guest port, then bytes both ways.
fn tunnel(conn: TcpStream, vsock: &std::path::Path, agent_port: u32, guest_port: u16) -> Result<()> {
    let io = |source| Error::Io { what: format!("forwarding to guest port {guest_port}"), source };
    conn.set_nonblocking(false).map_err(io)?;
    conn.set_nodelay(true).map_err(io)?;
    let stream = connect_vsock(vsock, agent_port)?;
    let agent = AgentClient::connect_within(stream, sm_agent::GREETING_TIMEOUT)?;
    let (early, guest) = agent.connect_tcp(guest_port)?.into_parts();
    // Reads wake now and then to look at the idle clock.
    conn.set_read_timeout(Some(IDLE_CHECK)).map_err(io)?;
    guest.set_read_timeout(Some(IDLE_CHECK)).map_err(io)?;
    let mut to_client = conn.try_clone().map_err(io)?;
    to_client.write_all(&early).map_err(io)?;
    let guest_reader = guest.try_clone().map_err(io)?;
    let activity = Arc::new(Activity { start: Instant::now(), last_ms: AtomicU64::new(0) });
    let down_activity = activity.clone();
    let down = std::thread::Builder::new()
        .name("forward-down".into())
        .spawn(move || {
            copy(guest_reader, &mut to_client, &down_activity);
            let _ = to_client.shutdown(Shutdown::Write);
        })
        .map_err(io)?;
    let mut to_guest = guest;
    copy(conn.try_clone().map_err(io)?, &mut to_guest, &activity);
    // The client is done sending (or the tunnel idled out): it ends (see the
    // module doc); the client's side is closed too so the other copy ends.
    let _ = to_guest.shutdown(Shutdown::Both);
    let _ = conn.shutdown(Shutdown::Both);
    let _ = down.join();
    Ok(())
}

/// Copies until end of file, an error on either side, or [`IDLE_TIMEOUT`]
/// without a byte either way.
fn copy(mut from: impl Read, to: &mut impl Write, activity: &Activity) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                activity.touch();
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if activity.idle() >= IDLE_TIMEOUT {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The stream type of a tunnel to a guest port ([`crate::Vm::connect_tcp`]).
pub type GuestTcpStream = sm_agent::Tunnel<UnixStream>;
