//! `sm-agent`: as PID 1 (the guest's `/init`) it sets the guest up and serves
//! the agent protocol on vsock; otherwise (host tests, debugging) it serves
//! on the address given with `--listen`.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use sm_agent::guest_init;
use sm_agent::server::AgentListener;
use sm_agent::vsock::VsockListener;
use sm_agent::{Server, READY_MARKER};

const USAGE: &str = "usage: sm-agent --listen unix:<path> | --listen vsock:<port>
As PID 1 (the guest's /init) it takes no arguments: it mounts the pseudo file
systems, switches to the root disk named by sm.root= on the kernel command
line, and serves on vsock port sm.agent_port= (default 1024).";

fn log(msg: std::fmt::Arguments<'_>) {
    sm_agent::log_line(msg);
}

/// Prints the ready line to stdout (the console when PID 1).
fn announce(what: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{READY_MARKER} {what}");
    let _ = out.flush();
}

/// Leaves fds 0-2 open (on /dev/null if they were closed, so pipes never
/// land there) and every other inherited descriptor close-on-exec, so execs
/// inherit nothing from whoever started the agent.
fn tidy_inherited_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: valid NUL-terminated path; open returns the lowest free fd.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on fds >= 3.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc != 0 {
        log(format_args!(
            "close_range: {}; inherited descriptors may leak into execs",
            std::io::Error::last_os_error()
        ));
    }
}

/// The kernel's `struct sigaction` on x86_64 (rt_sigaction(2)).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Not PID 1: resets signals the launcher left ignored (e.g. glibc's
/// posix_spawn ignores its internal real-time signals) back to default, as
/// the kernel starts PID 1, because ignored signals stay ignored across
/// exec. SIGPIPE stays ignored for the agent itself (execs get it back).
/// Raw syscalls: glibc refuses to touch its internal signals, which it has
/// not claimed here (the agent never cancels threads or changes ids).
fn reset_ignored_signals() {
    for sig in 1..=64 {
        if matches!(sig, libc::SIGPIPE | libc::SIGKILL | libc::SIGSTOP) {
            continue;
        }
        let mut old = KernelSigaction { handler: 0, flags: 0, restorer: 0, mask: 0 };
        // SAFETY: reads the disposition of `sig` into `old` (8 = sizeof(sigset)).
        let rc =
            unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, std::ptr::null::<KernelSigaction>(), &mut old, 8) };
        if rc == 0 && old.handler == libc::SIG_IGN {
            let default = KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
            // SAFETY: installs the default disposition from a valid struct.
            unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, &default, std::ptr::null_mut::<KernelSigaction>(), 8) };
        }
    }
}

fn main() {
    tidy_inherited_fds();
    if std::process::id() == 1 {
        run_as_init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["--listen", addr] => run_on(addr),
        ["--help" | "-h"] => println!("{USAGE}"),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

/// PID 1: never returns (PID 1 exiting panics the kernel).
fn run_as_init() -> ! {
    let config = guest_init::setup();
    let server = Server::new();
    loop {
        match VsockListener::bind(config.agent_port) {
            Ok(listener) => serve_forever(&server, &listener, &format!("port={}", listener.port())),
            Err(e) => {
                log(format_args!("cannot listen on vsock port {}: {e}; retrying", config.agent_port));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn serve_forever<L: AgentListener>(server: &Server, listener: &L, what: &str) -> ! {
    announce(what);
    server.serve(listener)
}

/// Not PID 1: serve on `addr` until killed.
fn run_on(addr: &str) {
    // Match the guest: execs without a cwd run in "/", and orphans of our
    // children are re-parented to (and reaped by) us.
    if let Err(e) = std::env::set_current_dir("/") {
        log(format_args!("chdir /: {e}"));
    }
    reset_ignored_signals();
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        log(format_args!("PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error()));
    }
    let server = Server::new();
    if let Some(path) = addr.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        match UnixListener::bind(path) {
            Ok(listener) => serve_forever(&server, &listener, &format!("unix={path}")),
            Err(e) => log(format_args!("cannot listen on {path}: {e}")),
        }
    } else if let Some(port) = addr.strip_prefix("vsock:") {
        let listener = port
            .parse()
            .map_err(|e| format!("invalid port {port:?}: {e}"))
            .and_then(|p| VsockListener::bind(p).map_err(|e| e.to_string()));
        match listener {
            Ok(l) => serve_forever(&server, &l, &format!("port={}", l.port())),
            Err(e) => log(format_args!("cannot listen on vsock:{port}: {e}")),
        }
    } else {
        eprintln!("{USAGE}");
    }
    std::process::exit(1);
}
