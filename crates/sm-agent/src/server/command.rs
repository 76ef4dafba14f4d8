//! Turning an `Exec` request into a ready-to-spawn process: validation,
//! program lookup in `PATH`, environment defaults, user, pipes or a pty.
//!
//! The agent resolves the program itself (rather than letting `execvp` do
//! it) so "not found" (127) and "not executable" (126) are told apart before
//! spawning, and the child makes a single `execve`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::spawn::{self, FailedStep, Session, SpawnError, SpawnRequest};
use super::{pty, user, RequestError};
use crate::protocol::{ErrorKind, ExecRequest, MessageType};

/// `PATH` when the request's environment has none.
pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process ready to spawn, with the agent's ends of its stdio.
pub(crate) struct Prepared {
    argv0: String,
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
    identity: Option<(u32, u32)>,
    session: Session,
    /// The child's fds 0, 1, 2.
    child_stdio: [RawFd; 3],
    /// Owns the child's ends (closed in the agent once the child runs).
    child_ends: Vec<OwnedFd>,
    /// What to forward to the host: stdout + stderr pipes, or the pty master.
    pub(crate) outputs: Vec<(File, MessageType)>,
    /// Where the host's stdin goes (pipe or pty master), if it sends any.
    pub(crate) stdin_sink: Option<File>,
    /// For a pty: a master fd to hold until the process is reaped.
    pub(crate) pty_keepalive: Option<File>,
}

impl Prepared {
    /// Starts the process; returns its pid. The agent's copies of the
    /// child's stdio ends are closed afterwards either way.
    pub(crate) fn spawn(&mut self) -> Result<libc::pid_t, RequestError> {
        let result = spawn::spawn(&SpawnRequest {
            program: &self.program,
            argv: &self.argv,
            envp: &self.envp,
            cwd: self.cwd.as_deref(),
            identity: self.identity,
            stdio: self.child_stdio,
            session: self.session,
        });
        self.child_ends.clear();
        result.map_err(|e| spawn_error(&self.argv0, &e))
    }
}

/// /dev/null, opened once: the stdin of execs without stdin.
fn dev_null() -> Result<RawFd, RequestError> {
    static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| RequestError::io("/dev/null", &e))?;
    Ok(DEV_NULL.get_or_init(|| OwnedFd::from(file)).as_raw_fd())
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> Result<(OwnedFd, OwnedFd), RequestError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(RequestError::io("pipe2", &std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded: both descriptors are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn cstring(s: &str) -> Result<CString, RequestError> {
    CString::new(s).map_err(|_| RequestError::new(ErrorKind::InvalidRequest, format!("{s:?} contains a NUL byte")))
}

/// Validates `req` and prepares its process.
pub(crate) fn prepare(req: &ExecRequest) -> Result<Prepared, RequestError> {
    validate(req)?;
    let identity = match &req.user {
        Some(spec) => Some(user::resolve(spec).map_err(|m| RequestError::new(ErrorKind::InvalidRequest, m))?),
        None => None,
    };
    let mut env: Vec<(&str, &str)> = req.env.iter().filter_map(|kv| kv.split_once('=')).collect();
    let has = |env: &[(&str, &str)], key: &str| env.iter().any(|(k, _)| *k == key);
    if !has(&env, "PATH") {
        env.push(("PATH", DEFAULT_PATH));
    }
    if !has(&env, "HOME") {
        let home = match &identity {
            Some(id) => id.home.as_deref().unwrap_or("/"),
            None => "/root",
        };
        env.push(("HOME", home));
    }
    // The kernel command line may set glibc tunables for the whole guest (the
    // agent gets them as PID 1; see sm_vmm::DEFAULT_CMDLINE): pass them on.
    let inherited_tunables = std::env::var("GLIBC_TUNABLES").ok();
    if let (false, Some(t)) = (has(&env, "GLIBC_TUNABLES"), inherited_tunables.as_deref()) {
        env.push(("GLIBC_TUNABLES", t));
    }
    if req.tty && !has(&env, "TERM") {
        env.push(("TERM", "xterm"));
    }
    // The last PATH entry wins, as it does for getenv in the child.
    let path_var = env.iter().rev().find(|(k, _)| *k == "PATH").map_or(DEFAULT_PATH, |(_, v)| *v);

    let cwd = Path::new(req.cwd.as_deref().unwrap_or("/"));
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(RequestError::new(
                ErrorKind::InvalidRequest,
                format!("working directory {} is not a directory", cwd.display()),
            ))
        }
        Err(e) => return Err(RequestError::io(&format!("working directory {}", cwd.display()), &e)),
    }
    let program = resolve_program(&req.argv[0], path_var, cwd)?;
    let program = cstring(
        program.to_str().ok_or_else(|| RequestError::new(ErrorKind::InvalidRequest, "program path is not UTF-8"))?,
    )?;
    let argv = req.argv.iter().map(|a| cstring(a)).collect::<Result<Vec<_>, _>>()?;
    let envp = env.iter().map(|(k, v)| cstring(&format!("{k}={v}"))).collect::<Result<Vec<_>, _>>()?;
    // The agent's own cwd is "/", so only change it when asked.
    let cwd = req.cwd.as_deref().map(cstring).transpose()?;

    let mut prepared = Prepared {
        argv0: req.argv[0].clone(),
        program,
        argv,
        envp,
        cwd,
        identity: identity.map(|id| (id.uid, id.gid)),
        session: Session::NewProcessGroup,
        child_stdio: [-1; 3],
        child_ends: Vec::with_capacity(3),
        outputs: Vec::with_capacity(2),
        stdin_sink: None,
        pty_keepalive: None,
    };
    if req.tty {
        let pty = pty::open().map_err(|e| RequestError::io("opening a pty", &e))?;
        let master = File::from(pty.master);
        let dup = |f: &File| f.try_clone().map_err(|e| RequestError::io("pty", &e));
        if req.stdin {
            prepared.stdin_sink = Some(dup(&master)?);
        }
        // Closing the last master fd hangs the terminal up (SIGHUP to the
        // session). The output pump closes its fd when the slave side
        // closes, which can be just before the process exits; this one is
        // held until the process has been reaped.
        prepared.pty_keepalive = Some(dup(&master)?);
        prepared.outputs.push((master, MessageType::Stdout));
        prepared.session = Session::NewSessionWithTty;
        prepared.child_stdio = [pty.slave.as_raw_fd(); 3];
        prepared.child_ends.push(pty.slave);
    } else {
        let stdin = if req.stdin {
            let (read, write) = pipe()?;
            prepared.stdin_sink = Some(File::from(write));
            let fd = read.as_raw_fd();
            prepared.child_ends.push(read);
            fd
        } else {
            dev_null()?
        };
        let (out_read, out_write) = pipe()?;
        let (err_read, err_write) = pipe()?;
        prepared.child_stdio = [stdin, out_write.as_raw_fd(), err_write.as_raw_fd()];
        prepared.child_ends.push(out_write);
        prepared.child_ends.push(err_write);
        prepared.outputs.push((File::from(out_read), MessageType::Stdout));
        prepared.outputs.push((File::from(err_read), MessageType::Stderr));
    }
    Ok(prepared)
}

fn validate(req: &ExecRequest) -> Result<(), RequestError> {
    let invalid = |m: String| Err(RequestError::new(ErrorKind::InvalidRequest, m));
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return invalid("argv is empty".into());
    }
    let strings = req.argv.iter().chain(&req.env).chain(req.cwd.iter()).chain(req.user.iter());
    for s in strings {
        if s.contains('\0') {
            return invalid(format!("{s:?} contains a NUL byte"));
        }
    }
    for kv in &req.env {
        match kv.split_once('=') {
            Some((k, _)) if !k.is_empty() => {}
            _ => return invalid(format!("environment entry {kv:?} is not KEY=VALUE")),
        }
    }
    Ok(())
}

/// Finds `name` like a shell: names with a `/` are taken as paths (relative
/// to `cwd`), others are searched in `path_var`.
pub(crate) fn resolve_program(name: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, RequestError> {
    let not_found = || RequestError::new(ErrorKind::CommandNotFound, format!("{name}: command not found"));
    let not_executable = |why: &str| RequestError::new(ErrorKind::NotExecutable, format!("{name}: {why}"));
    if name.contains('/') {
        let path = cwd.join(name);
        return match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Err(not_executable("is a directory")),
            Ok(_) => Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found()),
            Err(e) => Err(not_executable(&e.to_string())),
        };
    }
    let mut found_not_executable = false;
    for dir in path_var.split(':') {
        // An empty entry means the current directory.
        let candidate = cwd.join(if dir.is_empty() { "." } else { dir }).join(name);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_file() => found_not_executable = true,
            _ => {}
        }
    }
    if found_not_executable {
        Err(not_executable("Permission denied"))
    } else {
        Err(not_found())
    }
}

/// Classifies a spawn failure like a shell would (127 / 126).
pub(crate) fn spawn_error(program: &str, e: &SpawnError) -> RequestError {
    let errno = e.error.raw_os_error();
    let kind = match (e.step, errno) {
        // E.g. a missing #! interpreter.
        (FailedStep::Exec, Some(libc::ENOENT)) => ErrorKind::CommandNotFound,
        (FailedStep::Exec, Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY | libc::EPERM)) => {
            ErrorKind::NotExecutable
        }
        (_, Some(libc::EPERM | libc::EACCES)) => ErrorKind::PermissionDenied,
        (FailedStep::Chdir, Some(libc::ENOENT | libc::ENOTDIR)) => ErrorKind::NotFound,
        _ => ErrorKind::Io,
    };
    let what = match e.step {
        FailedStep::None | FailedStep::Exec => "",
        FailedStep::Clone => "starting a process: ",
        FailedStep::Session => "new session: ",
        FailedStep::Stdio => "redirecting stdio: ",
        FailedStep::Chdir => "changing directory: ",
        FailedStep::Identity => "switching user: ",
    };
    RequestError::new(kind, format!("{program}: {what}{}", e.error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_like_a_shell() {
        let root = Path::new("/");
        let sh = resolve_program("sh", DEFAULT_PATH, root).expect("sh is installed");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        let missing = resolve_program("sm-agent-no-such-command", DEFAULT_PATH, root).expect_err("missing command");
        assert_eq!(missing.kind, ErrorKind::CommandNotFound);
        assert_eq!(
            resolve_program("/no/such/file", DEFAULT_PATH, root).expect_err("missing path").kind,
            ErrorKind::CommandNotFound
        );
        assert_eq!(resolve_program("/", DEFAULT_PATH, root).expect_err("a directory").kind, ErrorKind::NotExecutable);
        // Relative paths with a slash resolve against the working directory.
        let rel = resolve_program("./sh", DEFAULT_PATH, sh.parent().expect("bin dir")).expect("./sh in its directory");
        assert_eq!(std::fs::canonicalize(rel).ok(), std::fs::canonicalize(&sh).ok());
        // A PATH listing only a directory without the command.
        assert_eq!(resolve_program("sh", "/proc", root).expect_err("not in /proc").kind, ErrorKind::CommandNotFound);
    }

    #[test]
    fn invalid_requests_are_rejected_before_spawning() {
        let cases = [
            ExecRequest::new(Vec::<String>::new()),
            ExecRequest::new([""]),
            ExecRequest::new(["echo", "a\0b"]),
            ExecRequest { env: vec!["NOEQUALS".into()], ..ExecRequest::new(["true"]) },
            ExecRequest { env: vec!["=value".into()], ..ExecRequest::new(["true"]) },
            ExecRequest::new(["true"]).cwd("/no/such/dir"),
            ExecRequest::new(["true"]).cwd("/proc/self/status"),
            ExecRequest::new(["true"]).user("no-such-user-here"),
        ];
        for req in cases {
            let err = prepare(&req).err().unwrap_or_else(|| panic!("{req:?} accepted"));
            assert!(matches!(err.kind, ErrorKind::InvalidRequest | ErrorKind::NotFound), "{req:?}: {err:?}");
        }
    }

    #[test]
    fn spawn_errors_map_to_shell_codes() {
        let e =
            |step, errno| spawn_error("x", &SpawnError { step, error: std::io::Error::from_raw_os_error(errno) }).kind;
        assert_eq!(e(FailedStep::Exec, libc::ENOENT), ErrorKind::CommandNotFound);
        assert_eq!(e(FailedStep::Exec, libc::EACCES), ErrorKind::NotExecutable);
        assert_eq!(e(FailedStep::Exec, libc::ENOEXEC), ErrorKind::NotExecutable);
        assert_eq!(e(FailedStep::Identity, libc::EPERM), ErrorKind::PermissionDenied);
        assert_eq!(e(FailedStep::Chdir, libc::ENOENT), ErrorKind::NotFound);
        assert_eq!(e(FailedStep::Clone, libc::ENOMEM), ErrorKind::Io);
    }
}
