//! `Mount`: a volume's file system or a shared directory, mounted in the guest's root before the
//! commands that use it run.
//!
//! After a restore the disk behind a volume slot is new to the guest: the
//! device announces its size with a configuration-change interrupt, which the
//! guest kernel handles asynchronously, and the block device's page cache may
//! hold pages read from the placeholder the snapshot was baked with. So the
//! mount waits (bounded) for the expected size, then drops the device's
//! buffers (BLKFLSBUF) before mounting.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::RequestError;
use crate::protocol::{ErrorKind, MountRequest};

/// `BLKFLSBUF` = `_IO(0x12, 97)` from <linux/fs.h>.
const BLKFLSBUF: libc::c_ulong = 0x1261;
/// How long a device may take to appear with its size.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// File systems a volume disk may have.
const DISK_FS_TYPES: [&str; 1] = ["ext4"];
/// The file system of a shared host directory (its source is the device's tag).
const VIRTIOFS: &str = "virtiofs";

/// Mounts as `req` says (see the module docs): a volume disk (`ext4` on a
/// `/dev` block device) or a shared directory (`virtiofs`, source = the tag).
pub(crate) fn mount(req: &MountRequest) -> Result<(), RequestError> {
    let invalid = |what: String| RequestError::new(ErrorKind::InvalidRequest, what);
    if !req.target.starts_with('/') || req.target.split('/').any(|c| c == "..") {
        return Err(invalid(format!("mount target {:?} must be an absolute path without ..", req.target)));
    }
    if req.fstype == VIRTIOFS {
        let tag_ok = !req.source.is_empty()
            && req.source.len() <= 36
            && req.source.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !tag_ok {
            return Err(invalid(format!("virtio-fs tag {:?} is not 1..=36 letters, digits, - or _", req.source)));
        }
    } else if req.dax {
        return Err(invalid("dax is for virtiofs shares only".into()));
    } else {
        let device = req
            .source
            .strip_prefix("/dev/")
            .filter(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric()))
            .ok_or_else(|| invalid(format!("mount source {:?} is not a /dev block device", req.source)))?;
        if !DISK_FS_TYPES.contains(&req.fstype.as_str()) {
            return Err(invalid(format!(
                "file system type {:?} is not one of {DISK_FS_TYPES:?} or {VIRTIOFS}",
                req.fstype
            )));
        }
        wait_for_size(device, req.expect_sectors)?;
        drop_buffers(&req.source)?;
    }
    std::fs::create_dir_all(&req.target).map_err(|e| RequestError::io(&format!("creating {}", req.target), &e))?;
    let cstr = |s: &str| CString::new(s).map_err(|_| invalid("NUL in a mount argument".into()));
    let (source, target, fstype) = (cstr(&req.source)?, cstr(&req.target)?, cstr(&req.fstype)?);
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if req.read_only {
        flags |= libc::MS_RDONLY;
    }
    // A share mounted before a snapshot is still mounted after its restore
    // (the FUSE session comes back with the device): keep it, switching
    // read-only on or off as asked. The host files may have changed since the
    // snapshot while the guest's caches still hold what they were then, so
    // the clean caches go (no FUSE notification reaches a virtio-fs guest).
    if req.fstype == VIRTIOFS {
        if let Some(read_only) = mounted_read_only(&req.source, &req.target, VIRTIOFS) {
            drop_clean_caches();
            if read_only == req.read_only {
                return Ok(());
            }
            flags |= libc::MS_REMOUNT;
        }
    }
    let data = if req.dax && flags & libc::MS_REMOUNT == 0 { Some(c"dax=always") } else { None };
    let data_ptr = data.map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: NUL-terminated strings that outlive the call; `data` is a static C string or null.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data_ptr) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(RequestError::io(&format!("mounting {} ({}) at {}", req.source, req.fstype, req.target), &e));
    }
    Ok(())
}

/// Drops the guest's clean page cache, dentries and inodes (writes "3" to
/// /proc/sys/vm/drop_caches); a failure is logged, the caches then expire by
/// their FUSE timeouts (one second).
fn drop_clean_caches() {
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", b"3") {
        agent_log!("dropping caches after a restore: {e}");
    }
}

/// Whether `/proc/self/mounts` lists `source` on `target` as `fstype`, and
/// then whether it is mounted read-only.
fn mounted_read_only(source: &str, target: &str, fstype: &str) -> Option<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let (s, t, f, options) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
        (s == mounts_escaped(source) && t == mounts_escaped(target) && f == fstype)
            .then(|| options.split(',').any(|o| o == "ro"))
    })
}

/// `s` as /proc/self/mounts writes it: space, tab, newline and backslash as
/// octal escapes.
fn mounts_escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

/// Flushes the file system at `target` to its disk or share and unmounts it,
/// so the volume is clean for the next VM. A mount still in use (a process
/// left running in the background) is flushed and stays mounted.
pub(crate) fn unmount(target: &str) -> Result<(), RequestError> {
    let c = CString::new(target).map_err(|_| RequestError::new(ErrorKind::InvalidRequest, "NUL in a path"))?;
    let dir = File::open(target).map_err(|e| RequestError::io(target, &e))?;
    // SAFETY: a valid fd for the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(RequestError::io(&format!("syncfs {target}"), &io::Error::last_os_error()));
    }
    drop(dir);
    // SAFETY: a NUL-terminated path alive for the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(RequestError::io(&format!("unmounting {target}"), &e));
        }
        agent_log!("{target} is busy: flushed, left mounted");
    }
    Ok(())
}

/// Waits until `/sys/block/<device>/size` reads `sectors` (any size when 0).
fn wait_for_size(device: &str, sectors: u64) -> Result<(), RequestError> {
    let size_file = format!("/sys/block/{device}/size");
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        let size = std::fs::read_to_string(&size_file).ok().and_then(|s| s.trim().parse::<u64>().ok());
        match size {
            Some(n) if sectors == 0 || n == sectors => return Ok(()),
            _ if Instant::now() >= deadline => {
                let seen = size.map_or_else(|| "no such device".to_string(), |n| format!("{n} sectors"));
                return Err(RequestError::new(
                    ErrorKind::NotFound,
                    format!("/dev/{device} did not come up with {sectors} sectors within {DEVICE_WAIT:?} ({seen})"),
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Drops the block device's cached pages (they may predate its disk).
fn drop_buffers(source: &str) -> Result<(), RequestError> {
    let dev = File::open(Path::new(source)).map_err(|e| RequestError::io(source, &e))?;
    // SAFETY: BLKFLSBUF takes no argument; the fd is valid for the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), BLKFLSBUF, 0) } != 0 {
        return Err(RequestError::io(&format!("BLKFLSBUF on {source}"), &io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_are_escaped_as_proc_mounts_writes_them() {
        assert_eq!(super::mounts_escaped("/my dir\\x\ty\n"), "/my\\040dir\\134x\\011y\\012");
        assert_eq!(super::mounts_escaped("/plain"), "/plain");
    }
}
