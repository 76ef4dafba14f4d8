//! Published ports without a network device (`--network none -p ...`): a host
//! TCP listener whose connections each become an agent `Connect` tunnel to
//! the guest's loopback port, over vsock.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] tunnels per port at once (more are
//! closed at accept). A host-side half close ends the connection (the vsock
//! device turns a host end of file into a full shutdown).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sm_agent::AgentClient;

use crate::network::PublishedPort;
use crate::{connect_vsock, Error, Result};

/// Tunnels one published port serves at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How often the accept loop looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);
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
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!("published port {guest_port}: accept failed: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("published port {guest_port}: {MAX_CONNECTIONS} connections open, closing a new one");
            continue;
        }
        let vsock = vsock.clone();
        let open = open.clone();
        let spawned = std::thread::Builder::new().name("forward-conn".into()).spawn(move || {
            if let Err(e) = tunnel(conn, &vsock, agent_port, guest_port) {
                tracing::debug!("published port {guest_port}: {e}");
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::warn!("published port {guest_port}: cannot start a connection thread: {e}");
        }
    }
}

/// One connection: a tunnel to the guest port, then bytes both ways.
fn tunnel(conn: TcpStream, vsock: &std::path::Path, agent_port: u32, guest_port: u16) -> Result<()> {
    conn.set_nonblocking(false).map_err(|source| Error::Io { what: "accepted connection".into(), source })?;
    let stream = connect_vsock(vsock, agent_port)?;
    let (early, guest) = AgentClient::connect(stream)?.connect_tcp(guest_port)?.into_parts();
    let io = |source| Error::Io { what: format!("forwarding to guest port {guest_port}"), source };
    let mut to_client = conn.try_clone().map_err(io)?;
    to_client.write_all(&early).map_err(io)?;
    let guest_reader = guest.try_clone().map_err(io)?;
    let down = std::thread::Builder::new()
        .name("forward-down".into())
        .spawn(move || {
            copy(guest_reader, &mut to_client);
            let _ = to_client.shutdown(Shutdown::Write);
        })
        .map_err(io)?;
    let mut to_guest = guest;
    copy(conn, &mut to_guest);
    // The client is done sending: the tunnel ends (see the module doc).
    let _ = to_guest.shutdown(Shutdown::Write);
    let _ = down.join();
    Ok(())
}

/// Copies until end of file or an error on either side.
fn copy(mut from: impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// The stream type of a tunnel to a guest port ([`crate::Vm::connect_tcp`]).
pub type GuestTcpStream = sm_agent::Tunnel<UnixStream>;
