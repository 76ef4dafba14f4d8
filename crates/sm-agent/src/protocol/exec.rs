//! The payloads of an exec: the request, and how the process ended.

use std::fmt;

use super::codec::{DecodeError, Decoder, Encoder};

/// What to run, as sent in `Exec`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` unless it has a `/`.
    pub argv: Vec<String>,
    /// The whole environment as `KEY=VALUE` entries (the agent's own is not
    /// inherited; `PATH` and `HOME` get defaults when missing).
    pub env: Vec<String>,
    /// Working directory; `/` when `None`.
    pub cwd: Option<String>,
    /// `uid[:gid]`, `name[:group]` (resolved via /etc/passwd, /etc/group); root when `None`.
    pub user: Option<String>,
    /// Run on a new pseudo-terminal (stdout and stderr merge into `Stdout`).
    pub tty: bool,
    /// The host will send stdin; otherwise stdin is /dev/null (or the idle pty).
    pub stdin: bool,
    /// Kill the process group after this many milliseconds and report `timed_out`.
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    /// A request running `argv` with no environment, as root, in `/`.
    pub fn new<I, A>(argv: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        ExecRequest { argv: argv.into_iter().map(Into::into).collect(), ..ExecRequest::default() }
    }

    /// Adds `key=value` to the environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets the user (`uid[:gid]` or `name[:group]`).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Runs on a pseudo-terminal.
    pub fn tty(mut self, tty: bool) -> Self {
        self.tty = tty;
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    pub(super) fn encode(&self, e: &mut Encoder) {
        e.str_list(&self.argv);
        e.str_list(&self.env);
        e.opt_str(self.cwd.as_deref());
        e.opt_str(self.user.as_deref());
        e.bool(self.tty);
        e.bool(self.stdin);
        e.opt_u64(self.timeout_ms);
    }

    pub(super) fn decode(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(ExecRequest {
            argv: d.string_list("argv")?,
            env: d.string_list("env")?,
            cwd: d.opt_string("cwd")?,
            user: d.opt_string("user")?,
            tty: d.bool("tty")?,
            stdin: d.bool("stdin")?,
            timeout_ms: d.opt_u64("timeout_ms")?,
        })
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It called exit with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The exit code, if it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(c),
            ExitStatus::Signal(_) => None,
        }
    }

    /// The signal, if one killed it.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Code(_) => None,
            ExitStatus::Signal(s) => Some(s),
        }
    }

    /// The status as a shell reports it: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// The payload of `Exited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    /// How the process ended.
    pub status: ExitStatus,
    /// The agent killed it because `timeout_ms` passed.
    pub timed_out: bool,
    /// From spawn to reaping, in microseconds.
    pub duration_us: u64,
    /// What the exec cost in the guest (agent and process).
    pub cost: GuestCost,
}

/// What one exec cost inside the guest, measured by the agent: its own
/// steps, and the process's resource usage as the kernel reports it at
/// reaping (`wait4`). In microseconds, or counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestCost {
    /// From the `Exec` frame read to the process exec'd: resolving the
    /// command, pipes, the spawn.
    pub spawn_us: u64,
    /// From the process reaped to `Exited` written (output drained).
    pub finish_us: u64,
    /// The process's (and its waited-for children's) user CPU time.
    pub user_us: u64,
    /// Its guest-kernel CPU time (syscalls and faults; emulated on kvm_pvm).
    pub system_us: u64,
    /// Page faults served without I/O.
    pub minor_faults: u64,
    /// Page faults that read from a disk.
    pub major_faults: u64,
    /// Guest-kernel CPU time of the agent's thread from the `Exec` frame
    /// read to `Started` written (its syscalls for this spawn).
    pub agent_system_us: u64,
}

impl GuestCost {
    pub(super) fn encode(&self, e: &mut Encoder) {
        e.u64(self.spawn_us);
        e.u64(self.finish_us);
        e.u64(self.user_us);
        e.u64(self.system_us);
        e.u64(self.minor_faults);
        e.u64(self.major_faults);
        e.u64(self.agent_system_us);
    }

    pub(super) fn decode(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(GuestCost {
            spawn_us: d.u64("spawn_us")?,
            finish_us: d.u64("finish_us")?,
            user_us: d.u64("user_us")?,
            system_us: d.u64("system_us")?,
            minor_faults: d.u64("minor_faults")?,
            major_faults: d.u64("major_faults")?,
            agent_system_us: d.u64("agent_system_us")?,
        })
    }
}
