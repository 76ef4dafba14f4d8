//! One passt process per VM, on a socketpair.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use crate::addressing::{DNS, GATEWAY, GUEST_IP, MTU, PREFIX_LEN};
use crate::tls::{TlsIdentity, TlsProxy};
use crate::{NetError, StreamFramer};

/// The Debian package with passt.
pub const PASST_PACKAGE: &str = "passt";
/// Where Debian installs it.
const DEFAULT_PROGRAM: &str = "/usr/bin/passt";
/// The descriptor passt finds its end of the socketpair on.
const CHILD_FD: libc::c_int = 3;
/// Bytes of passt's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// How to start passt.
#[derive(Debug, Clone)]
pub struct PasstOptions {
    /// The program (default `/usr/bin/passt`, or `$SM_PASST`).
    pub program: PathBuf,
    /// The gateway address reaches the host's loopback (passt's gateway
    /// mapping); off by default (`--no-map-gw`).
    pub map_host_loopback: bool,
    /// Host TCP ports forwarded into the guest (`-t ADDR/PORT:GUESTPORT`).
    /// A `/tls` port is ours instead: a TLS proxy listens on it and forwards
    /// to an internal loopback port that passt publishes.
    pub publish: Vec<PublishedPort>,
    /// The certificate for `/tls` ports (required when there are any).
    pub tls: Option<Arc<TlsIdentity>>,
}

/// A host TCP port forwarded to a guest port, as `docker run -p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedPort {
    /// The host address it listens on.
    pub host_ip: Ipv4Addr,
    /// The host port; 0 picks a free one (see [`PublishedPort::resolve`]).
    pub host_port: u16,
    /// The guest port connections go to.
    pub guest_port: u16,
    /// TLS is terminated on the host (`/tls`); the guest serves plain TCP.
    pub tls: bool,
}

impl PublishedPort {
    /// `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/tls]` (default host address
    /// 127.0.0.1; `/tls`: TLS terminated on the host, plain TCP to the guest).
    pub fn parse(spec: &str) -> Result<PublishedPort, NetError> {
        let bad = |why: &str| NetError::BadPort { spec: spec.to_string(), reason: why.to_string() };
        let (ports, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
        let tls = match proto {
            "tcp" => false,
            "tls" => true,
            "udp" => return Err(bad("only TCP ports can be published (UDP is not supported yet)")),
            _ => return Err(bad("the protocol must be tcp or tls")),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (ip, host, guest) = match parts[..] {
            [host, guest] => ("127.0.0.1", host, guest),
            [ip, host, guest] => (ip, host, guest),
            _ => return Err(bad("expected [HOSTIP:]HOSTPORT:GUESTPORT")),
        };
        let host_ip = ip.parse::<Ipv4Addr>().map_err(|_| bad("bad host address (IPv4 only)"))?;
        let host_port = host.parse::<u16>().map_err(|_| bad("bad host port"))?;
        let guest_port = guest.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("bad guest port"))?;
        Ok(PublishedPort { host_ip, host_port, guest_port, tls })
    }

    /// Checks that the host port can be listened on, and picks a free one for
    /// port 0 (another program could take it before passt does: rare, and
    /// passt then fails to start with the port named).
    pub fn resolve(self) -> Result<PublishedPort, NetError> {
        let listener = std::net::TcpListener::bind((self.host_ip, self.host_port)).map_err(|source| {
            NetError::PortUnavailable { addr: format!("{}:{}", self.host_ip, self.host_port), source }
        })?;
        let host_port = listener.local_addr().map_err(NetError::Socket)?.port();
        Ok(PublishedPort { host_port, ..self })
    }
}

impl std::fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.tls { "tls" } else { "tcp" };
        write!(f, "{}:{}->{}/{proto}", self.host_ip, self.host_port, self.guest_port)
    }
}

impl Default for PasstOptions {
    fn default() -> Self {
        let program = std::env::var_os("SM_PASST").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_PROGRAM));
        PasstOptions { program, map_host_loopback: false, publish: Vec::new(), tls: None }
    }
}

/// A running passt, killed and reaped when dropped. It also exits by itself
/// when the other end of its socket closes (`--one-off`), so it does not
/// outlive a VMM that is killed.
pub struct Passt {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// One per `/tls` port; they go before passt does.
    _tls: Vec<TlsProxy>,
}

impl Passt {
    /// Starts passt for one VM with the fixed guest addressing, IPv4 only,
    /// forwarding in only the published ports (resolved already: no port 0);
    /// returns it and the frame stream to give the virtio-net device.
    pub fn spawn(options: &PasstOptions) -> Result<(Passt, StreamFramer), NetError> {
        let program = &options.program;
        if !program.is_file() {
            return Err(NetError::PasstMissing { path: program.clone(), package: PASST_PACKAGE });
        }
        let (forwards, tls_ports) = split_tls_ports(options)?;
        let (ours, theirs) = UnixStream::pair().map_err(NetError::Socket)?;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.args(["--foreground", "--quiet", "--one-off", "--ipv4-only"])
            .args(["--fd", &CHILD_FD.to_string()])
            .args(["--address", &GUEST_IP.to_string(), "--netmask", &PREFIX_LEN.to_string()])
            .args(["--gateway", &GATEWAY.to_string(), "--mtu", &MTU.to_string()])
            .args(["--dns-forward", &DNS.to_string()])
            .args(["--udp-ports", "none"])
            .args(if options.map_host_loopback { &[][..] } else { &["--no-map-gw"][..] })
            .args(tcp_port_args(&forwards))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and calls
        // only dup2 and fcntl, which are async-signal-safe; `their_fd` is open
        // (held by `theirs` in the parent until spawn returns).
        unsafe {
            cmd.pre_exec(move || {
                if their_fd == CHILD_FD {
                    // dup2 onto itself would keep close-on-exec set.
                    if libc::fcntl(CHILD_FD, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(their_fd, CHILD_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| NetError::Spawn { path: program.clone(), source })?;
        drop(theirs);
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(pipe) = child.stderr.take() {
            let tail = stderr.clone();
            let pid = child.id();
            let reader = std::thread::Builder::new().name("passt-stderr".into()).spawn(move || {
                let mut pipe = BufReader::new(pipe);
                // Lines are cut at STDERR_TAIL bytes: an endless line is
                // never buffered whole.
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match (&mut pipe).take(STDERR_TAIL as u64).read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches('\n');
                    tracing::debug!(pid, "passt: {text}");
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    t.push_str(text);
                    t.push('\n');
                    if t.len() > STDERR_TAIL {
                        let cut = t.len() - STDERR_TAIL;
                        let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(t.len());
                        t.drain(..cut);
                    }
                }
            });
            if let Err(e) = reader {
                tracing::warn!("passt: cannot start the thread that reads its stderr: {e}");
            }
        }
        let framer = StreamFramer::new(ours).map_err(NetError::Socket)?;
        let mut passt = Passt { child, stderr, _tls: Vec::new() };
        if let Some(status) = passt.exited() {
            return Err(NetError::Exited { status, stderr: passt.stderr_tail() });
        }
        for tls in tls_ports {
            passt._tls.push(TlsProxy::start(tls.listener, tls.backend, tls.config.clone())?);
        }
        Ok((passt, framer))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it has (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines it printed on stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).trim().to_string()
    }
}

/// A `/tls` port: our listener on the published host port, and the internal
/// loopback port passt forwards to the guest.
struct TlsPort {
    listener: TcpListener,
    backend: SocketAddr,
    config: Arc<rustls::ServerConfig>,
}

/// What passt forwards (the plain ports, and an internal loopback port per
/// `/tls` port), and the `/tls` ports' listeners, bound here.
fn split_tls_ports(options: &PasstOptions) -> Result<(Vec<PublishedPort>, Vec<TlsPort>), NetError> {
    let mut forwards = Vec::new();
    let mut tls_ports = Vec::new();
    for port in &options.publish {
        if !port.tls {
            forwards.push(*port);
            continue;
        }
        let identity = options.tls.as_ref().ok_or_else(|| NetError::TlsIdentityMissing { port: port.to_string() })?;
        let listener = TcpListener::bind((port.host_ip, port.host_port)).map_err(|source| {
            NetError::PortUnavailable { addr: format!("{}:{}", port.host_ip, port.host_port), source }
        })?;
        // passt binds the internal port itself a moment later; another program
        // taking it in between makes passt fail at start, naming it.
        let internal = PublishedPort { host_ip: Ipv4Addr::LOCALHOST, host_port: 0, tls: false, ..*port }.resolve()?;
        forwards.push(internal);
        let backend = SocketAddr::from((Ipv4Addr::LOCALHOST, internal.host_port));
        tls_ports.push(TlsPort { listener, backend, config: identity.server_config()? });
    }
    Ok((forwards, tls_ports))
}

/// passt's `-t` arguments for `publish` (`none` without any).
fn tcp_port_args(publish: &[PublishedPort]) -> Vec<String> {
    if publish.is_empty() {
        return vec!["--tcp-ports".into(), "none".into()];
    }
    publish.iter().flat_map(|p| ["-t".to_string(), format!("{}/{}:{}", p.host_ip, p.host_port, p.guest_port)]).collect()
}

impl Drop for Passt {
    fn drop(&mut self) {
        // The TLS proxies first: no new connection reaches a passt going away.
        self._tls.clear();
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_parse_as_docker_run_p() {
        let p = PublishedPort::parse("8080:80").unwrap();
        assert_eq!(p, PublishedPort { host_ip: Ipv4Addr::LOCALHOST, host_port: 8080, guest_port: 80, tls: false });
        let p = PublishedPort::parse("0.0.0.0:0:8000/tcp").unwrap();
        assert_eq!(p, PublishedPort { host_ip: Ipv4Addr::UNSPECIFIED, host_port: 0, guest_port: 8000, tls: false });
        assert_eq!(p.to_string(), "0.0.0.0:0->8000/tcp");
        let p = PublishedPort::parse("8443:80/tls").unwrap();
        assert_eq!(p, PublishedPort { host_ip: Ipv4Addr::LOCALHOST, host_port: 8443, guest_port: 80, tls: true });
        assert_eq!(p.to_string(), "127.0.0.1:8443->80/tls");
        for (bad, why) in [
            ("53:53/udp", "UDP"),
            ("53:53/sctp", "tcp or tls"),
            ("80", "HOSTPORT:GUESTPORT"),
            ("a:80", "host port"),
            ("80:0", "guest port"),
            ("::1:80:80", "expected"),
            ("1.2.3:80:80", "host address"),
        ] {
            let e = PublishedPort::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn port_zero_resolves_to_a_free_port_and_a_taken_port_is_named() {
        let p = PublishedPort::parse("0:80").unwrap().resolve().unwrap();
        assert_ne!(p.host_port, 0);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = PublishedPort::parse(&format!("{port}:80")).unwrap().resolve().unwrap_err().to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("another program"), "{e}");
        assert_eq!(tcp_port_args(&[p]), ["-t".to_string(), format!("127.0.0.1/{}:80", p.host_port)]);
        assert_eq!(tcp_port_args(&[]), ["--tcp-ports", "none"]);
    }

    #[test]
    fn tls_ports_are_ours_and_passt_forwards_an_internal_loopback_port() {
        let mut options = PasstOptions {
            publish: vec![
                PublishedPort::parse("0:80").unwrap().resolve().unwrap(),
                PublishedPort::parse("0:443/tls").unwrap().resolve().unwrap(),
            ],
            ..PasstOptions::default()
        };
        let e = split_tls_ports(&options).err().unwrap().to_string();
        assert!(e.contains("->443/tls") && e.contains("no certificate"), "{e}");

        options.tls = Some(Arc::new(TlsIdentity::self_signed().unwrap().0));
        let (forwards, tls) = split_tls_ports(&options).unwrap();
        assert_eq!(forwards[0], options.publish[0], "plain ports go to passt as they are");
        assert_eq!(forwards[1].host_ip, Ipv4Addr::LOCALHOST);
        assert_ne!(forwards[1].host_port, options.publish[1].host_port);
        assert_eq!((forwards[1].guest_port, forwards[1].tls), (443, false));
        assert_eq!(tls.len(), 1);
        assert_eq!(tls[0].listener.local_addr().unwrap().port(), options.publish[1].host_port, "we hold the host port");
        assert_eq!(tls[0].backend.port(), forwards[1].host_port);
    }
}
