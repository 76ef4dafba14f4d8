//! Starting a process with `clone(CLONE_VM | CLONE_VFORK)` and a handful of
//! syscalls in the child.
//!
//! Why not `std::process::Command`: std uses glibc's `posix_spawn`, whose
//! child resets all 64 signal dispositions one by one (~130 syscalls before
//! `execve`), or `fork` when a user or a pty is involved (copying the page
//! tables, then copy-on-write faults in both processes). In the guest every
//! syscall and fault goes through an emulated kernel, so this child does
//! only what the exec needs: session or process group, three `dup2`, an
//! optional `chdir` and user switch, `SIGPIPE` back to default, unblock
//! signals, `execve` — about ten syscalls.
//!
//! The child shares the agent's memory (`CLONE_VM`) and runs on a private
//! stack while the calling thread is suspended (`CLONE_VFORK`) until the
//! child execs or exits. So the child must not allocate, lock or touch
//! thread-locals beyond `errno`, and must not use glibc's `setuid` family
//! (which would signal the agent's other threads to change *their* ids):
//! it uses raw syscalls for those. All signals are blocked across the clone,
//! so no agent signal handler can run on the child's stack; the child
//! unblocks them just before `execve`.

use std::ffi::{c_void, CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

use super::lock;

/// The child's stack: it only calls thin syscall wrappers.
const CHILD_STACK: usize = 64 * 1024;

/// One reusable stack for all spawns (they are serialised by the child
/// registry's lock anyway; this lock is then never contended).
static SPAWN_STACK: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// How the child is detached from the agent's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Session {
    /// `setpgid(0, 0)`: its own process group (timeouts kill the group).
    NewProcessGroup,
    /// `setsid()` and the terminal on fd 0 as controlling tty.
    NewSessionWithTty,
}

/// The step of the child's setup that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FailedStep {
    None = 0,
    Clone,
    Session,
    Stdio,
    Chdir,
    Identity,
    Exec,
}

/// A failed spawn: which step, and the OS error.
#[derive(Debug)]
pub(crate) struct SpawnError {
    pub(crate) step: FailedStep,
    pub(crate) error: io::Error,
}

/// What to start. The strings are prepared by the caller, so the child never
/// allocates.
pub(crate) struct SpawnRequest<'a> {
    pub(crate) program: &'a CStr,
    pub(crate) argv: &'a [CString],
    pub(crate) envp: &'a [CString],
    pub(crate) cwd: Option<&'a CStr>,
    /// (uid, gid) to switch to; supplementary groups are dropped when the
    /// agent is root.
    pub(crate) identity: Option<(u32, u32)>,
    /// Descriptors for the child's fds 0, 1, 2 (open for the whole call).
    pub(crate) stdio: [RawFd; 3],
    pub(crate) session: Session,
}

/// Everything the child reads, as raw pointers into the caller's data, plus
/// the failure report the child writes back.
#[repr(C)]
struct ChildContext {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Null for "stay in the agent's directory".
    cwd: *const libc::c_char,
    identity: Option<(u32, u32)>,
    drop_groups: bool,
    stdio: [RawFd; 3],
    session: Session,
    failed_step: FailedStep,
    errno: libc::c_int,
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

fn errno() -> libc::c_int {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Whether the agent runs as root (then it drops supplementary groups when
/// switching users). The agent never changes its own ids, so cache it.
fn agent_is_root() -> bool {
    static IS_ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: geteuid has no preconditions.
    *IS_ROOT.get_or_init(|| unsafe { libc::geteuid() } == 0)
}

/// Starts `req`; returns the child's pid once it has called `execve`.
/// A child that failed before exec has already been reaped.
pub(crate) fn spawn(req: &SpawnRequest<'_>) -> Result<libc::pid_t, SpawnError> {
    let argv = null_terminated(req.argv);
    let envp = null_terminated(req.envp);
    let mut ctx = ChildContext {
        program: req.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: req.cwd.map_or(std::ptr::null(), CStr::as_ptr),
        identity: req.identity,
        drop_groups: req.identity.is_some() && agent_is_root(),
        stdio: req.stdio,
        session: req.session,
        failed_step: FailedStep::None,
        errno: 0,
    };
    let mut stack = lock(&SPAWN_STACK);
    if stack.len() < CHILD_STACK {
        stack.resize(CHILD_STACK, 0);
    }
    // The stack grows down from its 16-byte aligned top.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;

    // SAFETY: an all-zero sigset_t is valid; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` and `previous` are valid sigset_t out/in pointers.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
    }
    let ctx_ptr: *mut ChildContext = &mut ctx;
    // SAFETY: `child_main` runs on `top`, the top of a CHILD_STACK-byte
    // buffer that stays locked and alive until clone returns (CLONE_VFORK:
    // this thread is suspended until the child execs or exits). `ctx_ptr`
    // points to `ctx`, which outlives the call; the child only reads the
    // pointed-to strings (kept alive by `req`, `argv`, `envp`) and writes
    // the failure fields of `ctx`.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            ctx_ptr.cast::<c_void>(),
        )
    };
    let clone_errno = errno();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(SpawnError { step: FailedStep::Clone, error: io::Error::from_raw_os_error(clone_errno) });
    }
    // SAFETY: the child is finished with `ctx` (it exec'd or exited before
    // clone returned); volatile reads because it was written behind the
    // compiler's back.
    let (step, child_errno) =
        unsafe { (std::ptr::read_volatile(&(*ctx_ptr).failed_step), std::ptr::read_volatile(&(*ctx_ptr).errno)) };
    if step == FailedStep::None {
        return Ok(pid);
    }
    // The child has exited; reap it here (the caller holds the registry
    // lock, so the reaper cannot have taken it).
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; the child is our zombie.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Err(SpawnError { step, error: io::Error::from_raw_os_error(child_errno) })
}

/// Records the failed step and errno for the parent, then exits.
///
/// # Safety
/// `ctx` must be the context passed to clone.
unsafe fn fail(ctx: *mut ChildContext, step: FailedStep) -> ! {
    let e = errno();
    // SAFETY: the caller passes the valid context; the parent is suspended.
    unsafe {
        std::ptr::write_volatile(&mut (*ctx).errno, e);
        std::ptr::write_volatile(&mut (*ctx).failed_step, step);
        libc::_exit(127)
    }
}

/// The child side: runs on the spawn stack in the agent's memory.
extern "C" fn child_main(arg: *mut c_void) -> libc::c_int {
    let ctx = arg.cast::<ChildContext>();
    // SAFETY: `arg` is the ChildContext pointer given to clone, valid and
    // unaliased while the parent is suspended. Every call below is a plain
    // syscall wrapper: no allocation, no locks.
    unsafe {
        // A copy: no reference into `*ctx` lives while `fail` writes to it.
        let c = std::ptr::read(ctx);
        match c.session {
            Session::NewProcessGroup => {
                if libc::setpgid(0, 0) != 0 {
                    fail(ctx, FailedStep::Session);
                }
            }
            Session::NewSessionWithTty => {
                if libc::setsid() < 0 {
                    fail(ctx, FailedStep::Session);
                }
            }
        }
        for (target, &source) in c.stdio.iter().enumerate() {
            let target = target as RawFd;
            // dup2 onto itself would keep close-on-exec set: clear it instead.
            let rc = if source == target { libc::fcntl(target, libc::F_SETFD, 0) } else { libc::dup2(source, target) };
            if rc < 0 {
                fail(ctx, FailedStep::Stdio);
            }
        }
        if c.session == Session::NewSessionWithTty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(ctx, FailedStep::Session);
        }
        if !c.cwd.is_null() && libc::chdir(c.cwd) != 0 {
            fail(ctx, FailedStep::Chdir);
        }
        if let Some((uid, gid)) = c.identity {
            // Raw syscalls: glibc's wrappers would broadcast the id change
            // to the threads glibc believes this process has (the agent's).
            if c.drop_groups && libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0 {
                fail(ctx, FailedStep::Identity);
            }
            if libc::syscall(libc::SYS_setgid, gid) != 0 || libc::syscall(libc::SYS_setuid, uid) != 0 {
                fail(ctx, FailedStep::Identity);
            }
        }
        // The agent ignores SIGPIPE; an ignored disposition survives execve.
        let mut default_action: libc::sigaction = std::mem::zeroed();
        default_action.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGPIPE, &default_action, std::ptr::null_mut());
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(c.program, c.argv, c.envp);
        fail(ctx, FailedStep::Exec)
    }
}
