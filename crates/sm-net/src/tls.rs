//! TLS termination for published ports (`-p HOSTPORT:GUESTPORT/tls`).
//!
//! The host port is ours: a [`TlsProxy`] accepts there, completes the TLS
//! handshake with rustls (ring provider) and forwards the plain bytes to an
//! internal loopback port that passt publishes into the guest, so the guest
//! serves plain TCP. The certificate is the user's ([`TlsIdentity::from_pem_files`])
//! or a self-signed one made with rcgen ([`TlsIdentity::load_or_create_self_signed`])
//! whose SHA-256 fingerprint is printed for clients to pin.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections per published port at once
//! (more are closed at accept), a handshake must finish within
//! [`HANDSHAKE_TIMEOUT`], and a connection with no byte either way for
//! [`IDLE_TIMEOUT`] is closed.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use sha2::{Digest, Sha256};

use crate::NetError;

/// Connections one TLS port serves at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no byte either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The names the self-signed certificate is valid for.
const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "host.supermachine.internal"];
/// File names of the self-signed certificate and its key.
const SELF_SIGNED_CERT: &str = "self-signed.crt";
const SELF_SIGNED_KEY: &str = "self-signed.key";

/// A certificate chain and its private key, for TLS on published ports.
pub struct TlsIdentity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Where the certificate came from (a file, or "self-signed").
    source: PathBuf,
}

impl TlsIdentity {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key, and
    /// checks that they go together.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsIdentity, NetError> {
        let pem_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NetError::TlsPem { path, source }
        };
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(pem_error(cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_error(cert))?;
        if certs.is_empty() {
            return Err(NetError::TlsPem {
                path: cert.to_path_buf(),
                source: rustls::pki_types::pem::Error::NoItemsFound,
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key))?;
        let identity = TlsIdentity { certs, key, source: cert.to_path_buf() };
        identity.server_config()?;
        Ok(identity)
    }

    /// A new self-signed certificate for localhost, 127.0.0.1 and
    /// host.supermachine.internal; returns it with its PEM certificate and key.
    pub fn self_signed() -> Result<(TlsIdentity, String, String), NetError> {
        let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| s.to_string()).collect();
        let made = rcgen::generate_simple_self_signed(names)?;
        let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
            .map_err(|why| NetError::TlsKey { why: why.to_string() })?;
        let identity = TlsIdentity { certs: vec![made.cert.der().clone()], key, source: PathBuf::from("self-signed") };
        Ok((identity, made.cert.pem(), made.signing_key.serialize_pem()))
    }

    /// The self-signed certificate kept in `dir` (`self-signed.crt`, its key
    /// `self-signed.key`, mode 0600), made on first use, so that clients can
    /// trust or pin it once. Two first uses at once make one pair (a lock
    /// file), and each file appears whole (written aside, then renamed).
    pub fn load_or_create_self_signed(dir: &Path) -> Result<TlsIdentity, NetError> {
        let cert = dir.join(SELF_SIGNED_CERT);
        let key = dir.join(SELF_SIGNED_KEY);
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NetError::TlsFile { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let lock_path = dir.join("self-signed.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        // SAFETY: flock on a descriptor `lock` owns; released when it closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(NetError::TlsFile { path: lock_path, source: io::Error::last_os_error() });
        }
        if cert.is_file() && key.is_file() {
            return TlsIdentity::from_pem_files(&cert, &key);
        }
        let (mut identity, cert_pem, key_pem) = TlsIdentity::self_signed()?;
        write_private(&key, key_pem.as_bytes()).map_err(io_error(&key))?;
        write_private(&cert, cert_pem.as_bytes()).map_err(io_error(&cert))?;
        identity.source = cert;
        Ok(identity)
    }

    /// The SHA-256 fingerprint of the leaf certificate, as `AB:CD:...`.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.certs[0].as_ref());
        digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
    }

    /// Where the certificate came from: its file, or `self-signed`.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The rustls server configuration (ring provider, TLS 1.2 and 1.3).
    pub(crate) fn server_config(&self) -> Result<Arc<ServerConfig>, NetError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").field("source", &self.source).field("fingerprint", &self.fingerprint()).finish()
    }
}

impl PartialEq for TlsIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.certs == other.certs
    }
}

impl Eq for TlsIdentity {}

/// Writes `path` readable by its owner only (the key must not leak): a new
/// file beside it, renamed over it once whole.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".{}.tmp", std::process::id()));
    let aside = PathBuf::from(aside);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&aside)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&aside, path)
}

/// Accepts TLS on a host port and forwards the plain stream to `backend`;
/// stops (closing its listener and every connection) when dropped.
pub(crate) struct TlsProxy {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TlsProxy {
    /// Serves `listener` (already bound) on a thread of its own.
    pub(crate) fn start(
        listener: TcpListener,
        backend: SocketAddr,
        config: Arc<ServerConfig>,
    ) -> Result<TlsProxy, NetError> {
        listener.set_nonblocking(true).map_err(NetError::Socket)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(NetError::Socket)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("tls-proxy".into())
            .spawn(move || runtime.block_on(serve(listener, backend, config, stopped)))
            .map_err(NetError::Socket)?;
        Ok(TlsProxy { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The accept loop; returns when `stopped` fires (or its sender is gone).
async fn serve(
    listener: TcpListener,
    backend: SocketAddr,
    config: Arc<ServerConfig>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("TLS proxy: cannot use the listener: {e}");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "TLS proxy: {MAX_CONNECTIONS} connections open, closing a new one");
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Err(e) = forward(tcp, acceptor, backend).await {
                            tracing::debug!(%peer, "TLS proxy: connection ended: {e}");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("TLS proxy: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// One connection: handshake (bounded in time), then bytes both ways until
/// either side closes or nothing moved for [`IDLE_TIMEOUT`].
async fn forward(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    backend: SocketAddr,
) -> io::Result<()> {
    forward_with_idle(tcp, acceptor, backend, IDLE_TIMEOUT).await
}

async fn forward_with_idle(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    backend: SocketAddr,
    idle: Duration,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let plain = tokio::net::TcpStream::connect(backend).await?;
    plain.set_nodelay(true)?;
    let (tls_read, tls_write) = tokio::io::split(tls);
    let (plain_read, plain_write) = plain.into_split();
    let activity = tokio::sync::Notify::new();
    let up = pump(tls_read, plain_write, &activity);
    let down = pump(plain_read, tls_write, &activity);
    let both = async { tokio::join!(up, down) };
    tokio::pin!(both);
    loop {
        tokio::select! {
            _ = &mut both => return Ok(()),
            _ = activity.notified() => {}
            _ = tokio::time::sleep(idle) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no traffic: closed"));
            }
        }
    }
}

/// Copies `from` to `to` until end of file (then shuts `to` down) or an
/// error, telling `activity` of every chunk.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    activity: &tokio::sync::Notify,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                activity.notify_one();
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn client_config(identity: &TlsIdentity) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.certs[0].clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A TLS client of `addr` for `localhost` that trusts only `identity`.
    fn connect(
        identity: &TlsIdentity,
        addr: SocketAddr,
    ) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(client_config(identity), name).unwrap();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    }

    #[test]
    fn the_proxy_terminates_tls_and_forwards_plain_bytes_both_ways() {
        // The "guest": an echo server that upper-cases one line.
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let (mut conn, _) = backend.accept().unwrap();
            let mut buf = [0u8; 6];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(&buf.to_ascii_uppercase()).unwrap();
        });
        let (identity, _, _) = TlsIdentity::self_signed().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = TlsProxy::start(listener, backend_addr, identity.server_config().unwrap()).unwrap();

        let mut tls = connect(&identity, addr);
        tls.write_all(b"hello\n").unwrap();
        let mut reply = [0u8; 6];
        tls.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"HELLO\n");
        echo.join().unwrap();
        drop(tls);

        // Dropped: the port is closed.
        drop(proxy);
        assert!(std::net::TcpStream::connect(addr).is_err(), "the listener went with the proxy");
    }

    #[test]
    fn a_client_that_does_not_trust_the_certificate_gets_nothing_through() {
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let (identity, _, _) = TlsIdentity::self_signed().unwrap();
        let (other, _, _) = TlsIdentity::self_signed().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _proxy =
            TlsProxy::start(listener, backend.local_addr().unwrap(), identity.server_config().unwrap()).unwrap();
        let mut tls = connect(&other, addr);
        let err = tls.write_all(b"x").and_then(|_| tls.flush()).and_then(|_| tls.read(&mut [0u8; 1]));
        assert!(err.is_err(), "an untrusted certificate fails the handshake: {err:?}");
        backend.set_nonblocking(true).unwrap();
        assert!(backend.accept().is_err(), "nothing reached the guest side");
    }

    #[test]
    fn an_idle_connection_is_closed() {
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let (identity, _, _) = TlsIdentity::self_signed().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut tls = connect(&identity, addr);
            tls.write_all(b"x").unwrap();
            // Then nothing: the proxy ends the connection.
            let t0 = std::time::Instant::now();
            let mut buf = [0u8; 1];
            let _ = tls.read(&mut buf);
            t0.elapsed()
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let result = runtime.block_on(async {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            forward_with_idle(tcp, acceptor, backend_addr, Duration::from_millis(300)).await
        });
        let (guest, _) = backend.accept().unwrap();
        drop(guest);
        let err = result.expect_err("closed for idling");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(client.join().unwrap() < Duration::from_secs(20), "the client saw the close");
    }

    #[test]
    fn the_self_signed_certificate_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = TlsIdentity::load_or_create_self_signed(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(SELF_SIGNED_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is its owner's only");
        let again = TlsIdentity::load_or_create_self_signed(dir.path()).unwrap();
        assert_eq!(first, again);
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 32 * 3 - 1);
        assert_eq!(again.source(), dir.path().join(SELF_SIGNED_CERT));
    }

    #[test]
    fn bad_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let e = TlsIdentity::from_pem_files(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("c.pem"), "{e}");
        let missing = TlsIdentity::from_pem_files(&dir.path().join("none.pem"), &key).unwrap_err().to_string();
        assert!(missing.contains("none.pem"), "{missing}");

        // A key that does not belong to the certificate is refused.
        let (_, cert_pem, _) = TlsIdentity::self_signed().unwrap();
        let (_, _, other_key) = TlsIdentity::self_signed().unwrap();
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, other_key).unwrap();
        let e = TlsIdentity::from_pem_files(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("TLS"), "{e}");
    }
}
