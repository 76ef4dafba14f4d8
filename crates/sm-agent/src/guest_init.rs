//! PID 1 duties before serving: the pseudo file systems, an optional
//! overlay root on a disk named on the kernel command line, hostname and
//! loopback.
//!
//! Kernel command line (read from /proc/cmdline: the kernel does not pass
//! dotted parameters to init):
//! - `sm.root=/dev/vda` — mount it read-only at /mnt/lower, a tmpfs at
//!   /mnt/rw (upper + work dirs), the overlay of both at /mnt/root, move
//!   /proc /sys /dev /tmp /run into it and make it the root (switch_root
//!   style: `mount --move . /` + `chroot .`). Without it the agent stays in
//!   the initrd.
//! - `sm.rootfstype=ext4|squashfs|erofs` — the disk's file system (tried in
//!   that order when absent).
//! - `sm.agent_port=N` — the vsock port (default [`crate::DEFAULT_AGENT_PORT`]).
//! - `sm.hostname=NAME` — the hostname (default `supermachine`).
//! - `sm.net=ADDRESS/PREFIX,GATEWAY,DNS` — configure `eth0` (see
//!   [`crate::guest_net`]); after the root switch, so resolv.conf and hosts land
//!   in the root the commands see.
//!
//! Every step logs its failure and goes on: PID 1 must not exit.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::time::Duration;

/// The hostname unless `sm.hostname=` says otherwise.
pub const DEFAULT_HOSTNAME: &str = "supermachine";

/// File systems tried for `sm.root` when `sm.rootfstype` is absent.
const ROOT_FS_TYPES: [&str; 3] = ["ext4", "squashfs", "erofs"];

/// Settings from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Root disk device (`sm.root`).
    pub root: Option<String>,
    /// Its file system (`sm.rootfstype`).
    pub root_fs_type: Option<String>,
    /// vsock port to listen on (`sm.agent_port`).
    pub agent_port: u32,
    /// Hostname (`sm.hostname`).
    pub hostname: String,
    /// Guest network (`sm.net`).
    pub net: Option<crate::guest_net::GuestNet>,
}

impl BootConfig {
    /// Parses a kernel command line; unknown words are ignored, and so is
    /// everything after `--` (those are init's arguments).
    pub fn from_cmdline(cmdline: &str) -> BootConfig {
        let mut config = BootConfig {
            root: None,
            root_fs_type: None,
            agent_port: crate::DEFAULT_AGENT_PORT,
            hostname: DEFAULT_HOSTNAME.to_owned(),
            net: None,
        };
        for word in cmdline.split_whitespace() {
            if word == "--" {
                break;
            }
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "sm.root" if !value.is_empty() => config.root = Some(value.to_owned()),
                "sm.rootfstype" if !value.is_empty() => {
                    config.root_fs_type = Some(value.to_owned());
                }
                "sm.agent_port" => match value.parse() {
                    Ok(port) => config.agent_port = port,
                    Err(_) => agent_log!("ignoring invalid sm.agent_port={value}"),
                },
                "sm.hostname" if !value.is_empty() => config.hostname = value.to_owned(),
                "sm.net" => match crate::guest_net::GuestNet::parse(value) {
                    Some(net) => config.net = Some(net),
                    None => agent_log!("ignoring invalid sm.net={value}"),
                },
                _ => {}
            }
        }
        config
    }
}

/// Sets up the guest as PID 1 and returns the boot settings.
pub fn setup() -> BootConfig {
    log_err("mounting /proc", mount_fs("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        agent_log!("cannot read /proc/cmdline: {e}");
        String::new()
    });
    let config = BootConfig::from_cmdline(&cmdline);
    mount_pseudo_filesystems();
    if let Some(root) = &config.root {
        if let Err(e) = switch_to_disk_root(root, config.root_fs_type.as_deref()) {
            agent_log!("root disk {root}: {e}; staying in the initrd");
        }
    }
    log_err("setting the hostname", set_hostname(&config.hostname));
    log_err("bringing up lo", crate::guest_net::loopback_up());
    if let Some(net) = &config.net {
        log_err("configuring the network", crate::guest_net::configure(net));
    }
    config
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

fn log_err(what: &str, result: io::Result<()>) {
    if let Err(e) = result {
        agent_log!("{what}: {e}");
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// mount(2); creates `target` first. Already mounted (EBUSY) counts as done.
fn mount_fs(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    if let Err(e) = std::fs::create_dir_all(target) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    let (source_c, target_c, fstype_c) = (cstring(source)?, cstring(target)?, cstring(fstype)?);
    let data_c = data.map(cstring).transpose()?;
    let data_ptr = data_c.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: all pointers are valid NUL-terminated strings (or null data)
    // that outlive the call.
    let rc = unsafe { libc::mount(source_c.as_ptr(), target_c.as_ptr(), fstype_c.as_ptr(), flags, data_ptr) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) && flags & libc::MS_MOVE == 0 {
        return Ok(());
    }
    Err(e)
}

/// Moves the mount at `from` to `to` (MS_MOVE).
fn move_mount(from: &str, to: &str) -> io::Result<()> {
    let (from_c, to_c) = (cstring(from)?, cstring(to)?);
    // SAFETY: valid NUL-terminated strings; fstype and data may be null for MS_MOVE.
    let rc = unsafe { libc::mount(from_c.as_ptr(), to_c.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount_pseudo_filesystems() {
    let mounts: [(&str, &str, &str, libc::c_ulong, Option<&str>); 6] = [
        ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, Some("mode=0755")),
        ("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, Some("mode=0620,gid=5,ptmxmode=0666")),
        ("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=1777")),
        ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=0755")),
    ];
    for (source, target, fstype, flags, data) in mounts {
        log_err(&format!("mounting {target}"), mount_fs(source, target, fstype, flags, data));
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                agent_log!("symlink {link}: {e}");
            }
            _ => {}
        }
    }
}

/// Overlay root on `device` (see the module docs).
fn switch_to_disk_root(device: &str, fs_type: Option<&str>) -> io::Result<()> {
    // virtio-blk probes before init runs; allow a short settle anyway.
    for _ in 0..50 {
        if Path::new(device).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let types: Vec<&str> = match fs_type {
        Some(t) => vec![t],
        None => ROOT_FS_TYPES.to_vec(),
    };
    let mut last_err = io::Error::new(io::ErrorKind::NotFound, "no file system type to try");
    let mut mounted = false;
    for t in types {
        match mount_fs(device, "/mnt/lower", t, libc::MS_RDONLY, None) {
            Ok(()) => {
                mounted = true;
                break;
            }
            Err(e) => last_err = io::Error::new(e.kind(), format!("mount as {t}: {e}")),
        }
    }
    if !mounted {
        return Err(last_err);
    }
    mount_fs("tmpfs", "/mnt/rw", "tmpfs", 0, Some("mode=0755"))?;
    std::fs::create_dir_all("/mnt/rw/upper")?;
    std::fs::create_dir_all("/mnt/rw/work")?;
    mount_fs(
        "overlay",
        "/mnt/root",
        "overlay",
        0,
        Some("lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work"),
    )?;
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run"] {
        let target = format!("/mnt/root{dir}");
        if let Err(e) = std::fs::create_dir_all(&target) {
            agent_log!("creating {target}: {e}");
        }
        log_err(&format!("moving {dir} into the new root"), move_mount(dir, &target));
    }
    std::env::set_current_dir("/mnt/root")?;
    move_mount(".", "/")?;
    let dot = cstring(".")?;
    // SAFETY: `dot` is a valid NUL-terminated string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")?;
    Ok(())
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast::<libc::c_char>(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_settings_parse() {
        let c = BootConfig::from_cmdline(
            "console=ttyS0 reboot=k sm.root=/dev/vda sm.rootfstype=erofs sm.agent_port=2048 \
             sm.hostname=box sm.net=10.0.2.15/24,10.0.2.2,10.0.2.3 -- sm.root=/dev/ignored tick",
        );
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(c.root_fs_type.as_deref(), Some("erofs"));
        assert_eq!(c.agent_port, 2048);
        assert_eq!(c.hostname, "box");
        assert_eq!(c.net.map(|n| n.address.to_string()).as_deref(), Some("10.0.2.15"));
    }

    #[test]
    fn cmdline_defaults_and_bad_values() {
        let c = BootConfig::from_cmdline("console=ttyS0 sm.agent_port=notanumber sm.root= quiet\n");
        assert_eq!(c.root, None);
        assert_eq!(c.root_fs_type, None);
        assert_eq!(c.agent_port, crate::DEFAULT_AGENT_PORT);
        assert_eq!(c.hostname, DEFAULT_HOSTNAME);
        assert_eq!(BootConfig::from_cmdline(""), c);
    }
}
