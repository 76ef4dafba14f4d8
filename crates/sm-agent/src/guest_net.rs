//! Guest network set-up by PID 1, before any command runs (no DHCP wait):
//! `sm.net=ADDRESS/PREFIX,GATEWAY,DNS` on the kernel command line configures
//! `eth0` statically (address, netmask, up, default route), writes
//! `/etc/resolv.conf` and adds `host.supermachine.internal` (the gateway) to
//! `/etc/hosts`. Without `sm.net`, only `lo` comes up.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The interface `sm.net` configures.
pub const INTERFACE: &str = "eth0";
/// The name the gateway (the host) has in the guest.
pub const HOST_NAME: &str = "host.supermachine.internal";

/// `sm.net=` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Its prefix length (0..=32).
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// The DNS server.
    pub dns: Ipv4Addr,
}

impl GuestNet {
    /// Parses `ADDRESS/PREFIX,GATEWAY,DNS`; `None` when malformed.
    pub fn parse(value: &str) -> Option<GuestNet> {
        let mut parts = value.split(',');
        let (address, prefix) = parts.next()?.split_once('/')?;
        let net = GuestNet {
            address: address.parse().ok()?,
            prefix: prefix.parse().ok().filter(|p| *p <= 32)?,
            gateway: parts.next()?.parse().ok()?,
            dns: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(net)
    }

    /// The netmask of the prefix.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0))
    }
}

/// Configures `eth0`, the default route, resolv.conf and hosts.
pub fn configure(net: &GuestNet) -> io::Result<()> {
    let sock = inet_socket()?;
    set_address(&sock, INTERFACE, libc::SIOCSIFADDR, net.address)?;
    set_address(&sock, INTERFACE, libc::SIOCSIFNETMASK, net.netmask())?;
    interface_up(&sock, INTERFACE)?;
    add_default_route(&sock, net.gateway)?;
    std::fs::create_dir_all("/etc")?;
    write_files(Path::new("/etc"), net)
}

/// `resolv.conf` and `hosts` in `etc`. Either may be a symlink in an image
/// (Ubuntu's resolv.conf points into /run/systemd, absent here): the link is
/// replaced by a file of ours instead of written through.
fn write_files(etc: &Path, net: &GuestNet) -> io::Result<()> {
    let hosts_path = etc.join("hosts");
    let mut hosts = std::fs::read_to_string(&hosts_path).unwrap_or_default();
    if !hosts.is_empty() && !hosts.ends_with('\n') {
        hosts.push('\n');
    }
    hosts.push_str(&format!("{} {HOST_NAME}\n", net.gateway));
    replace_file(&etc.join("resolv.conf"), format!("nameserver {}\n", net.dns).as_bytes())?;
    replace_file(&hosts_path, hosts.as_bytes())
}

/// Writes `path`, first removing it if it is a symlink.
fn replace_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path)?;
    }
    std::fs::write(path, contents)
}

/// `ip link set lo up`, so localhost works inside the guest.
pub fn loopback_up() -> io::Result<()> {
    interface_up(&inet_socket()?, "lo")
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes integers only; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero ifreq is a valid value of this plain C struct.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().take(libc::IFNAMSIZ - 1).zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and every
    // bit pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(sock: &OwnedFd, request: libc::Ioctl, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: `arg` is a valid, initialised struct of the type `request` takes.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn set_address(sock: &OwnedFd, name: &str, request: libc::Ioctl, addr: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(sock, request, &mut req, &format!("setting {addr} on {name}"))
}

fn interface_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req, &format!("reading the flags of {name}"))?;
    // SAFETY: SIOCGIFFLAGS set the flags member of the union, read here.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req, &format!("bringing {name} up"))
}

fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    // SAFETY: an all-zero rtentry is a valid value of this plain C struct.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(sock, libc::SIOCADDRT, &mut route, &format!("adding the default route via {gateway}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlinked_resolv_conf_is_replaced_and_hosts_keeps_its_lines() {
        let etc = tempfile::tempdir().unwrap();
        let elsewhere = etc.path().join("run-stub");
        std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", etc.path().join("resolv.conf")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, etc.path().join("hosts")).unwrap();
        std::fs::write(&elsewhere, "127.0.0.1 localhost").unwrap();
        let net = GuestNet::parse("10.0.2.15/24,10.0.2.2,10.0.2.3").unwrap();
        write_files(etc.path(), &net).unwrap();
        assert_eq!(std::fs::read_to_string(etc.path().join("resolv.conf")).unwrap(), "nameserver 10.0.2.3\n");
        let hosts = std::fs::read_to_string(etc.path().join("hosts")).unwrap();
        assert_eq!(hosts, "127.0.0.1 localhost\n10.0.2.2 host.supermachine.internal\n");
        assert!(!std::fs::symlink_metadata(etc.path().join("hosts")).unwrap().file_type().is_symlink());
        assert_eq!(
            std::fs::read_to_string(&elsewhere).unwrap(),
            "127.0.0.1 localhost",
            "the link's target is left alone"
        );
    }

    #[test]
    fn sm_net_parses_and_malformed_values_are_refused() {
        let n = GuestNet::parse("10.0.2.15/24,10.0.2.2,10.0.2.3").unwrap();
        assert_eq!(n.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(n.gateway, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(n.dns, Ipv4Addr::new(10, 0, 2, 3));
        assert_eq!(GuestNet::parse("10.0.0.1/0,10.0.0.2,10.0.0.3").unwrap().netmask(), Ipv4Addr::UNSPECIFIED);
        for bad in [
            "",
            "10.0.2.15,10.0.2.2,10.0.2.3",
            "10.0.2.15/33,1.1.1.1,1.1.1.1",
            "10.0.2.15/24,10.0.2.2",
            "a/24,b,c",
            "10.0.2.15/24,10.0.2.2,10.0.2.3,x",
        ] {
            assert_eq!(GuestNet::parse(bad), None, "{bad:?}");
        }
    }
}
