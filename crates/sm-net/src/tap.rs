//! A TAP device as the back end (`--network tap:NAME`), for hosts where an
//! administrator prepared one (`ip tuntap add NAME mode tap user USER`, an
//! address such as 10.0.2.2/24 on it, routing or NAT beyond it).
//!
//! Frames are read and written whole, without a packet-information prefix or
//! a virtio-net header (IFF_TAP | IFF_NO_PI: the device offers no offloads).
//! The interface must exist: opening a missing name would make a new,
//! unconfigured TAP as root, so a typo is refused instead.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sm_virtio::net::NetBackend;

use crate::NetError;

/// Longest interface name Linux takes (IFNAMSIZ less the NUL).
const MAX_NAME: usize = 15;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

/// An open TAP interface.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing TAP interface `name`, whose MTU must carry the
    /// guest's `mtu`.
    pub fn open(name: &str, mtu: u16) -> Result<Tap, NetError> {
        let bad = |why: String| NetError::Tap { name: name.to_string(), why };
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid {
            return Err(bad(format!("not an interface name (1-{MAX_NAME} of A-Z a-z 0-9 - _ .)")));
        }
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(bad(format!(
                "no such interface: create it first (ip tuntap add {name} mode tap user $USER; \
                 ip addr add 10.0.2.2/24 dev {name}; ip link set {name} up)"
            )));
        }
        if !sys.join("tun_flags").exists() {
            return Err(bad("the interface is not a TUN/TAP device".into()));
        }
        let ifindex = || std::fs::read_to_string(sys.join("ifindex")).ok();
        let before = ifindex();
        let host_mtu = std::fs::read_to_string(sys.join("mtu")).ok().and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(host_mtu) = host_mtu.filter(|&m| m < u32::from(mtu)) {
            return Err(bad(format!("its MTU is {host_mtu}, the guest's is {mtu}: ip link set {name} mtu {mtu}")));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| NetError::TapIo {
                name: name.to_string(),
                what: "opening /dev/net/tun",
                source,
                hint: "",
            })?;
        let mut req =
            IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short, _union_rest: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq (40 bytes, IfReq's layout) from a
        // valid pointer that outlives the call, on a descriptor we own.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EBUSY) => " (another VM or program has it open)",
                Some(libc::EPERM) => " (it belongs to another user: ip tuntap add ... user $USER)",
                Some(libc::EINVAL) => " (it is a TUN, not a TAP, device)",
                _ => "",
            };
            return Err(NetError::TapIo { name: name.to_string(), what: "attaching", source, hint });
        }
        // Removed (and, as root, made anew by TUNSETIFF) since the check:
        // closing `file` removes what we made.
        if ifindex() != before {
            return Err(bad("it was removed while attaching: create it again".into()));
        }
        Ok(Tap { file, name: name.to_string() })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // One write is one frame; a full queue (EAGAIN) drops it, as a busy
        // link would.
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the TAP device took part of a frame"));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn ready_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_has_ifreqs_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::offset_of!(IfReq, flags), 16);
    }

    #[test]
    fn bad_and_missing_names_are_refused_with_what_to_do() {
        for name in ["", "a/b", "x y", "sixteen-chars-xx", "../eth0"] {
            let e = Tap::open(name, 1500).err().unwrap().to_string();
            assert!(e.contains("not an interface name"), "{name:?}: {e}");
        }
        let e = Tap::open("smnosuchtap0", 1500).err().unwrap().to_string();
        assert!(e.contains("smnosuchtap0") && e.contains("ip tuntap add smnosuchtap0 mode tap"), "{e}");
        // lo exists but is no TAP device.
        let e = Tap::open("lo", 1500).err().unwrap().to_string();
        assert!(e.contains("not a TUN/TAP device"), "{e}");
    }
}
