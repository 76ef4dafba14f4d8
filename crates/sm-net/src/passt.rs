//! One passt process per VM, on a socketpair.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use crate::addressing::{DNS, GATEWAY, GUEST_IP, MTU, PREFIX_LEN};
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
}

impl Default for PasstOptions {
    fn default() -> Self {
        let program = std::env::var_os("SM_PASST").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_PROGRAM));
        PasstOptions { program, map_host_loopback: false }
    }
}

/// A running passt, killed and reaped when dropped. It also exits by itself
/// when the other end of its socket closes (`--one-off`), so it does not
/// outlive a VMM that is killed.
pub struct Passt {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Passt {
    /// Starts passt for one VM with the fixed guest addressing, no ports
    /// forwarded in, IPv4 only; returns it and the frame stream to give the
    /// virtio-net device.
    pub fn spawn(options: &PasstOptions) -> Result<(Passt, StreamFramer), NetError> {
        let program = &options.program;
        if !program.is_file() {
            return Err(NetError::PasstMissing { path: program.clone(), package: PASST_PACKAGE });
        }
        let (ours, theirs) = UnixStream::pair().map_err(NetError::Socket)?;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.args(["--foreground", "--quiet", "--one-off", "--ipv4-only"])
            .args(["--fd", &CHILD_FD.to_string()])
            .args(["--address", &GUEST_IP.to_string(), "--netmask", &PREFIX_LEN.to_string()])
            .args(["--gateway", &GATEWAY.to_string(), "--mtu", &MTU.to_string()])
            .args(["--dns-forward", &DNS.to_string()])
            .args(["--tcp-ports", "none", "--udp-ports", "none"])
            .args(if options.map_host_loopback { &[][..] } else { &["--no-map-gw"][..] })
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
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    tracing::debug!(pid, "passt: {line}");
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    t.push_str(&line);
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
        let mut passt = Passt { child, stderr };
        if let Some(status) = passt.exited() {
            return Err(NetError::Exited { status, stderr: passt.stderr_tail() });
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

impl Drop for Passt {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
