//! The OCI bundle containerd prepares: `config.json` (what to run) and the
//! root file system (mounts handed over in Create, or `rootfs/` as it is),
//! turned into what a VM boots: a read-only root disk image.

use std::path::{Path, PathBuf};

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use containerd_shim::protos::api::Mount;
use oci_spec::runtime::{Process, Spec};
use sm_api::oci::{Digest, Store};
use sm_api::ExecRequest;

use crate::error::{Result, ShimError};

/// The root disk image the shim builds in the bundle (removed at delete).
const ROOT_DISK_NAME: &str = "supermachine-root.img";
/// Marks a root file system this shim mounted (so delete unmounts it).
const MOUNTED_MARK: &str = "supermachine-rootfs-mounted";

/// A bundle's runtime spec.
pub fn load_spec(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| ShimError::Spec { path, source })
}

/// What the guest agent runs for an OCI `process` (the bundle's, or an
/// exec's): argv, env, working directory, user, terminal.
pub fn exec_request(process: &Process) -> Result<ExecRequest> {
    let argv = process.args().clone().unwrap_or_default();
    if argv.is_empty() {
        return Err(ShimError::InvalidArgument("the process has no args: nothing to run".into()));
    }
    let user = process.user();
    Ok(ExecRequest {
        argv,
        env: process.env().clone().unwrap_or_default(),
        cwd: Some(process.cwd().to_string_lossy().into_owned()).filter(|c| !c.is_empty()),
        user: Some(format!("{}:{}", user.uid(), user.gid())),
        tty: process.terminal().unwrap_or(false),
        ..ExecRequest::default()
    })
}

/// The directory the bundle's root file system is (or is mounted) at.
pub fn rootfs_dir(bundle: &Path, spec: &Spec) -> PathBuf {
    let root = spec.root().as_ref().map_or_else(|| PathBuf::from("rootfs"), |r| r.path().clone());
    bundle.join(root)
}

/// Mounts `mounts` (containerd's snapshot of the image, usually one overlay)
/// at `target`, in order. Nothing to do when containerd handed over none
/// (the root file system is then already in place).
pub fn mount_rootfs(mounts: &[Mount], bundle: &Path, target: &Path) -> Result<()> {
    if mounts.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(ShimError::io(format!("creating {}", target.display())))?;
    std::fs::write(bundle.join(MOUNTED_MARK), target.as_os_str().as_encoded_bytes())
        .map_err(ShimError::io("marking the root file system as mounted by this shim"))?;
    for m in mounts {
        mount(m, target).map_err(|error| ShimError::Mount {
            fs_type: m.type_.clone(),
            source_dir: m.source.clone(),
            target: target.to_path_buf(),
            error,
        })?;
    }
    Ok(())
}

/// The mount(2) flags and data of containerd's mount `options`.
fn mount_flags(fs_type: &str, options: &[String]) -> (libc::c_ulong, String) {
    let mut flags: libc::c_ulong = if fs_type == "bind" { libc::MS_BIND } else { 0 };
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => flags &= !libc::MS_RDONLY,
            "bind" => flags |= libc::MS_BIND,
            "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            // Propagation is the mount namespace's business, not this mount's data.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable" | "runbindable" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// One mount, in this process (no fork: the shim is multi-threaded).
fn mount(m: &Mount, target: &Path) -> std::io::Result<()> {
    let invalid = |e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let (flags, data) = mount_flags(&m.type_, &m.options);
    // The kernel takes at most a page of options (long overlay lowerdir lists).
    if data.len() >= 4096 {
        return Err(invalid(format!("{} bytes of mount options, more than the kernel's 4095", data.len())));
    }
    let cstr = |s: &[u8]| std::ffi::CString::new(s).map_err(|e| invalid(e.to_string()));
    let (source, fs_type, target, data) = (
        cstr(m.source.as_bytes())?,
        cstr(m.type_.as_bytes())?,
        cstr(target.as_os_str().as_encoded_bytes())?,
        cstr(data.as_bytes())?,
    );
    // SAFETY: every pointer is a NUL-terminated string alive for the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fs_type.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A bind mount takes its read-only flag only on a remount.
    if flags & libc::MS_BIND != 0 && flags & libc::MS_RDONLY != 0 {
        // SAFETY: as above; source and type are ignored by a remount.
        let rc = unsafe {
            libc::mount(source.as_ptr(), target.as_ptr(), fs_type.as_ptr(), flags | libc::MS_REMOUNT, std::ptr::null())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A key naming the content of the root file system containerd handed over,
/// when that content cannot change under us: one overlay mount whose upper
/// layer (the container's own writes) is absent or empty — its lower layers
/// are committed snapshots, which containerd never changes. Each lower
/// directory counts with its inode and change time, so a snapshot directory
/// recreated under the same path (a containerd root wiped) is a new key.
pub fn rootfs_key(mounts: &[Mount]) -> Option<Digest> {
    let [m] = mounts else { return None };
    if m.type_ != "overlay" {
        return None;
    }
    let mut key = String::from("containerd overlay rootfs v2\n");
    for option in &m.options {
        if let Some(upper) = option.strip_prefix("upperdir=") {
            let mut entries = std::fs::read_dir(upper).ok()?;
            if entries.next().is_some() {
                return None;
            }
        } else if option.starts_with("workdir=") {
            // Per container, and empty: not content.
        } else if let Some(lower) = option.strip_prefix("lowerdir=") {
            for dir in lower.split(':') {
                let m = std::fs::metadata(dir).ok()?;
                key.push_str(&format!("lower {dir} {}:{} {}.{}\n", m.dev(), m.ino(), m.ctime(), m.ctime_nsec()));
            }
        } else {
            // Anything else may change what the files look like (id maps...).
            key.push_str(&format!("option {option}\n"));
        }
    }
    Some(Digest::of(key.as_bytes()))
}

/// The root disk of the container: for a keyed root file system
/// ([`rootfs_key`]) the one cached in `store` (built now if missing, and
/// then shared by every later container of the same image), otherwise one
/// built inside the bundle. Mounts the root file system only to build.
pub fn root_disk(
    bundle: &Path,
    rootfs: &Path,
    mounts: &[Mount],
    store: &Store,
) -> Result<(sm_api::oci::Rootfs, Option<Digest>)> {
    let format = sm_api::default_rootfs_format();
    let key = rootfs_key(mounts);
    let Some(key) = key else {
        mount_rootfs(mounts, bundle, rootfs)?;
        let out = bundle.join(ROOT_DISK_NAME);
        let built = sm_api::oci::build_rootfs_from_dir(rootfs, &out, format).map_err(sm_api::Error::from);
        // The disk holds the tree now; the mount is no longer needed.
        unmount_rootfs(bundle);
        return Ok((built?, None));
    };
    let cached = store.rootfs_dir().join(format!("{}.containerd.{}", key.hex(), format.name()));
    if let Ok(meta) = std::fs::metadata(&cached) {
        let disk = sm_api::oci::Rootfs {
            path: cached,
            format,
            size: meta.len(),
            cached: true,
            unpack_time: Duration::ZERO,
            build_time: Duration::ZERO,
        };
        return Ok((disk, Some(key)));
    }
    // Built under a name of this process, on the disk for good, then
    // renamed: a concurrent Create of the same image (or one after a crash)
    // never sees half a disk.
    let partial = store.rootfs_dir().join(format!("{}.containerd.partial-{}", key.hex(), std::process::id()));
    mount_rootfs(mounts, bundle, rootfs)?;
    let built = (|| {
        let mut disk = sm_api::oci::build_rootfs_from_dir(rootfs, &partial, format).map_err(sm_api::Error::from)?;
        let synced = std::fs::File::open(&partial).and_then(|f| f.sync_all());
        synced.map_err(ShimError::io(format!("syncing {}", partial.display())))?;
        std::fs::rename(&partial, &cached).map_err(ShimError::io(format!("storing {}", cached.display())))?;
        disk.path = cached;
        Ok((disk, Some(key)))
    })();
    let _ = std::fs::remove_file(&partial);
    // The disk holds the tree now; the mount is no longer needed.
    unmount_rootfs(bundle);
    built
}

/// Unmounts the root file system if this shim mounted it. Safe to repeat.
fn unmount_rootfs(bundle: &Path) {
    let mark = bundle.join(MOUNTED_MARK);
    if let Ok(target) = std::fs::read(&mark) {
        let target = PathBuf::from(String::from_utf8_lossy(&target).into_owned());
        if let Err(e) = unmount(&target) {
            tracing::warn!("unmounting {}: {e}", target.display());
            return;
        }
        let _ = std::fs::remove_file(&mark);
    }
}

/// Undoes what Create did to the bundle: unmounts the root file system if
/// this shim mounted it, removes the root disk. Safe to repeat.
pub fn clean_up(bundle: &Path) {
    unmount_rootfs(bundle);
    let _ = std::fs::remove_file(bundle.join(ROOT_DISK_NAME));
}

/// Unmounts every mount stacked at `target` (lazily, so a reader still
/// inside it cannot keep the mount behind).
fn unmount(target: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    loop {
        // SAFETY: umount2 reads the NUL-terminated path `c`, alive for the call.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: not (or no longer) a mount point — done.
            return if e.raw_os_error() == Some(libc::EINVAL) { Ok(()) } else { Err(e) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(process: serde_json::Value) -> Spec {
        let json = serde_json::json!({ "ociVersion": "1.0.2", "process": process, "root": { "path": "rootfs" } });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_bundle_process_becomes_an_exec_request() {
        let spec = spec_with(serde_json::json!({
            "terminal": true, "user": { "uid": 1000, "gid": 100 }, "args": ["sh", "-c", "id"],
            "env": ["PATH=/bin", "A=b"], "cwd": "/work"
        }));
        let req = exec_request(spec.process().as_ref().unwrap()).unwrap();
        assert_eq!(req.argv, ["sh", "-c", "id"]);
        assert_eq!(req.env, ["PATH=/bin", "A=b"]);
        assert_eq!(req.cwd.as_deref(), Some("/work"));
        assert_eq!(req.user.as_deref(), Some("1000:100"));
        assert!(req.tty);
        assert_eq!(rootfs_dir(Path::new("/b"), &spec), Path::new("/b/rootfs"));
    }

    #[test]
    fn a_process_without_args_is_refused_with_why() {
        let spec = spec_with(serde_json::json!({ "user": { "uid": 0, "gid": 0 }, "cwd": "/" }));
        let err = exec_request(spec.process().as_ref().unwrap()).unwrap_err();
        assert!(err.to_string().contains("no args"), "{err}");
    }

    #[test]
    fn a_missing_or_broken_config_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_spec(dir.path()).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::write(dir.path().join("config.json"), b"{ not json").unwrap();
        assert!(load_spec(dir.path()).unwrap_err().to_string().contains("config.json"));
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let opts = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (flags, data) =
            mount_flags("overlay", &opts(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"]));
        assert_eq!(flags, 0);
        assert_eq!(data, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2");
        let (flags, data) = mount_flags("bind", &opts(&["rbind", "ro", "rprivate", "noatime"]));
        assert_eq!(flags, libc::MS_BIND | libc::MS_REC | libc::MS_RDONLY | libc::MS_NOATIME);
        assert!(data.is_empty(), "propagation is not mount data: {data}");
    }

    fn overlay(options: &[String]) -> Mount {
        Mount { type_: "overlay".into(), source: "overlay".into(), options: options.to_vec(), ..Default::default() }
    }

    #[test]
    fn only_an_overlay_without_writes_of_its_own_gets_a_content_key() {
        let dir = tempfile::tempdir().unwrap();
        let (l1, l2, upper) = (dir.path().join("l1"), dir.path().join("l2"), dir.path().join("upper"));
        for d in [&l1, &l2, &upper] {
            std::fs::create_dir(d).unwrap();
        }
        let opts = vec![
            format!("lowerdir={}:{}", l1.display(), l2.display()),
            format!("upperdir={}", upper.display()),
            "workdir=/w".to_string(),
        ];
        let key = rootfs_key(&[overlay(&opts)]).expect("empty upper layer: keyed");
        assert_eq!(rootfs_key(&[overlay(&opts)]), Some(key.clone()), "the same layers: the same key");
        let read_only = vec![opts[0].clone()];
        assert!(rootfs_key(&[overlay(&read_only)]).is_some(), "no upper layer at all: keyed");
        let mut mapped = opts.clone();
        mapped.push("uidmap=0:1000:65536".into());
        assert_ne!(rootfs_key(&[overlay(&mapped)]), Some(key.clone()), "an id map changes what the files look like");

        std::fs::remove_dir(&l2).unwrap();
        std::fs::create_dir(&l2).unwrap();
        assert_ne!(rootfs_key(&[overlay(&opts)]), Some(key), "a recreated layer directory is new content");

        std::fs::write(upper.join("written"), b"x").unwrap();
        assert!(rootfs_key(&[overlay(&opts)]).is_none(), "the container's own writes: not shared");
        let bind = Mount { type_: "bind".into(), source: l1.display().to_string(), ..Default::default() };
        assert!(rootfs_key(&[bind]).is_none(), "a bind mount can change: not keyed");
        assert!(rootfs_key(&[]).is_none());
    }

    #[test]
    fn clean_up_of_an_untouched_bundle_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        clean_up(dir.path());
        assert!(dir.path().join("config.json").exists());
    }
}
