//! Shared test harness: runs the real `sm-agent` binary on a unix socket in
//! a private temporary directory and connects clients to it.

#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sm_agent::AgentClient;

/// A directory removed on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = tempfile::Builder::new().prefix(&format!("sm-agent-{tag}-")).tempdir().expect("create temp dir");
        // World-accessible, so an agent running as nobody can use it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// `name` inside the directory, as a string for the protocol.
    pub fn file(&self, name: &str) -> String {
        self.path().join(name).to_str().expect("utf-8 temp path").to_owned()
    }
}

/// A running agent process.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
}

/// Whether the tests run as root (some checks differ without privileges).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Agent {
    /// Starts the agent with the test's privileges.
    pub fn start() -> Agent {
        Agent::spawn(None)
    }

    /// Starts the agent as uid/gid 65534 (nobody); only callable as root.
    pub fn start_unprivileged() -> Agent {
        Agent::spawn(Some(65534))
    }

    fn spawn(uid: Option<u32>) -> Agent {
        let dir = TempDir::new("agent");
        let socket = dir.path().join("agent.sock");
        // SM_AGENT_BIN runs the suite against another build (e.g. the static
        // release binary from `cargo xtask agent`).
        let bin = std::env::var_os("SM_AGENT_BIN")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sm-agent")), PathBuf::from);
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            // Must not leak into execs: the agent gives them only what is asked.
            .env("SM_AGENT_TEST_SECRET", "leaked")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if let Some(id) = uid {
            cmd.uid(id).gid(id);
        }
        let mut child = cmd.spawn().expect("spawn sm-agent");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("agent printed its ready line within 60 s");
        let expected = format!("{} unix={}\n", sm_agent::READY_MARKER, socket.display());
        assert_eq!(line, expected, "ready line");
        Agent { child, socket, dir }
    }

    /// The agent's pid on this host.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A raw connection (no handshake), with generous timeouts so a broken
    /// agent fails the test instead of hanging it.
    pub fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).expect("connect to the agent");
        s.set_read_timeout(Some(Duration::from_secs(120))).expect("read timeout");
        s.set_write_timeout(Some(Duration::from_secs(120))).expect("write timeout");
        s
    }

    /// A connected client after `Hello`.
    pub fn client(&self) -> AgentClient<UnixStream> {
        AgentClient::connect(self.raw()).expect("hello")
    }

    /// Whether the agent process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
