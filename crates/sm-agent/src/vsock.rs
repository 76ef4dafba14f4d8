//! AF_VSOCK stream sockets (std has none): the guest side listens on
//! `VMADDR_CID_ANY:<port>`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

/// A connected vsock socket; reads and writes are plain read(2)/write(2).
#[derive(Debug)]
pub struct VsockStream {
    file: File,
}

use crate::check_rc as check;

impl VsockListener {
    /// Listens on `port` for connections to any CID of this machine.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        Self::bind_cid(libc::VMADDR_CID_ANY, port)
    }

    /// Listens on `cid:port`.
    pub fn bind_cid(cid: u32, port: u32) -> io::Result<VsockListener> {
        let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
        // SAFETY: socket takes integers only; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_VSOCK, flags, 0) };
        let raw = check(raw, "socket(AF_VSOCK)")?;
        // SAFETY: `raw` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_vm is valid; the fields are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = cid;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        let addr_ptr = (&addr as *const libc::sockaddr_vm).cast::<libc::sockaddr>();
        // SAFETY: `addr_ptr` points to a valid sockaddr_vm of `len` bytes.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), addr_ptr, len) };
        check(rc, "bind(AF_VSOCK)")?;
        // SAFETY: listen takes integers only.
        let rc = unsafe { libc::listen(fd.as_raw_fd(), 128) };
        check(rc, "listen(AF_VSOCK)")?;
        Ok(VsockListener { fd, port })
    }

    /// The port listened on.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Blocks until a connection arrives.
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: null address pointers are allowed (peer address not wanted).
            let rc = unsafe {
                libc::accept4(self.fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
            };
            if rc >= 0 {
                // SAFETY: `rc` is a new descriptor owned by nothing else.
                let fd = unsafe { OwnedFd::from_raw_fd(rc) };
                return Ok(VsockStream { file: File::from(fd) });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl VsockStream {
    /// A second handle to the same connection.
    pub fn try_clone(&self) -> io::Result<VsockStream> {
        Ok(VsockStream { file: self.file.try_clone()? })
    }

    /// Half close: the peer reads end of file; reading goes on.
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown on a descriptor this stream owns; no memory is passed.
        if unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_WR) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
