//! Pseudo-terminals for `tty` execs.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A new pty pair.
pub(crate) struct Pty {
    /// The agent's end: output is read here, input written here.
    pub(crate) master: OwnedFd,
    /// The process's end (its stdin, stdout, stderr and controlling tty).
    pub(crate) slave: OwnedFd,
}

use crate::check_rc as check;

/// Opens /dev/ptmx and its slave (both close-on-exec, the slave without
/// becoming our controlling tty), with an 80x24 window.
pub(crate) fn open() -> io::Result<Pty> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: posix_openpt takes flags only; the result is checked.
    let fd = unsafe { libc::posix_openpt(flags) };
    let fd = check(fd, "posix_openpt")?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `master` is an open pty master descriptor.
    let rc = unsafe { libc::grantpt(master.as_raw_fd()) };
    check(rc, "grantpt")?;
    // SAFETY: as above.
    let rc = unsafe { libc::unlockpt(master.as_raw_fd()) };
    check(rc, "unlockpt")?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is writable for its full length, which is passed.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: on success ptsname_r stored a NUL-terminated name in `name`.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    // SAFETY: `path` is a valid C string; the result is checked.
    let sfd = unsafe { libc::open(path.as_ptr(), flags) };
    let sfd = check(sfd, "opening the pty slave")?;
    // SAFETY: `sfd` was just opened and is owned by nothing else.
    let slave = unsafe { OwnedFd::from_raw_fd(sfd) };
    resize(&master, 24, 80)?;
    Ok(Pty { master, slave })
}

/// Sets the window size of the pty behind `fd` (its foreground process
/// group gets SIGWINCH when it changes).
pub(crate) fn resize(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the valid pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    check(rc, "TIOCSWINSZ").map(drop)
}
