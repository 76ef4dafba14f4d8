//! Named volumes: data that outlives a VM, like `docker volume`.
//!
//! A volume is a sparse ext4 image file, `<dir>/<name>.ext4` (by default
//! `$SUPERMACHINE_HOME/volumes`, beside the image store, which `prune` of
//! images never touches). A VM gets it as one more virtio-blk disk after its
//! other disks, and the agent mounts it at the guest path before any command
//! runs ([`VolumeMount`]). The disk device holds a lock on the file (one
//! writer or many readers), so two running VMs cannot write one volume: the
//! second is refused with an error naming the volume.
//!
//! Baked snapshots and volumes: a snapshot is baked with an empty placeholder
//! disk in each volume slot (its key holds the number of slots and whether
//! each is read-only, never the volumes themselves); a restore puts the real
//! volume files in the slots, the device announces the new size, and the
//! agent mounts them. See [`crate::Image::start`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What can go wrong with a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Not a docker-style volume name.
    #[error("{0:?} is not a volume name: use letters, digits, '_', '.', '-', starting with a letter or digit")]
    InvalidName(String),
    /// Below [`MIN_VOLUME_SIZE`].
    #[error("volume size {0} bytes is too small: at least 8 MiB")]
    TooSmall(u64),
    /// `create` of a name that exists.
    #[error("volume {0} already exists")]
    Exists(String),
    /// No volume of that name.
    #[error("no volume named {0} (supermachine volume ls lists them)")]
    NotFound(String),
    /// A running VM has it attached.
    #[error("volume {0} is in use by a running VM")]
    InUse(String),
    /// The host lacks the tool that makes file systems.
    #[error("mkfs.ext4 is missing, which creates volumes: apt-get install e2fsprogs")]
    MkfsMissing,
    /// e2fsck could not replay the journal of a volume to be mounted read-only.
    #[error(
        "volume {} needs its journal replayed before a read-only mount (its last VM did not unmount it), \
         and e2fsck failed: {stderr}",
        path.display()
    )]
    JournalReplay {
        /// The image.
        path: PathBuf,
        /// What e2fsck printed (or why it could not run).
        stderr: String,
    },
    /// mkfs.ext4 failed.
    #[error("mkfs.ext4 failed on {}: {stderr}", path.display())]
    MkfsFailed {
        /// The image being made.
        path: PathBuf,
        /// What it printed.
        stderr: String,
    },
    /// An OS operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, VolumeError>;

/// Size of a volume created on first use without a size (sparse: it takes
/// host space only as the guest writes).
pub const DEFAULT_VOLUME_SIZE: u64 = 8 << 30;
/// The smallest volume: what ext4 with a journal needs to be useful.
pub const MIN_VOLUME_SIZE: u64 = 8 << 20;
/// Where `mkfs.ext4` is looked for.
const MKFS_EXT4: [&str; 2] = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"];
/// Where `e2fsck` is looked for.
const E2FSCK: [&str; 2] = ["/usr/sbin/e2fsck", "/sbin/e2fsck"];
/// ext4 superblock: at byte 1024; `s_feature_incompat` at 0x60 in it.
const INCOMPAT_AT: u64 = 1024 + 0x60;
/// `EXT3_FEATURE_INCOMPAT_RECOVER`: the journal holds transactions not yet
/// written home (the last VM using it did not unmount it).
const INCOMPAT_RECOVER: u32 = 0x4;
/// The file name suffix of a volume image.
const SUFFIX: &str = ".ext4";

/// A volume mounted in a VM: the image file, where the guest sees it, and
/// whether the guest may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// The volume's image file ([`VolumeInfo::path`]).
    pub path: PathBuf,
    /// Absolute path in the guest.
    pub guest_path: String,
    /// Mounted read-only (and the disk refuses writes).
    pub read_only: bool,
}

/// What `volume ls` / `inspect` show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The name.
    pub name: String,
    /// The image file.
    pub path: PathBuf,
    /// Its size as the guest sees it.
    pub size: u64,
    /// Host bytes it takes (the file is sparse).
    pub allocated: u64,
    /// A running VM has it attached.
    pub in_use: bool,
}

/// The directory of named volumes.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    dir: PathBuf,
}

impl VolumeStore {
    /// The default location: `volumes/` beside the default image store
    /// (`$SUPERMACHINE_HOME/volumes`, ...).
    pub fn default_dir() -> PathBuf {
        let images = sm_oci::Store::default_root();
        images.parent().unwrap_or(&images).join("volumes")
    }

    /// Opens (creating it if needed) the volume directory `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<VolumeStore> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
        Ok(VolumeStore { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates volume `name` of `size` bytes (an empty ext4 file system).
    /// Fails if it exists.
    pub fn create(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        validate_name(name)?;
        if size < MIN_VOLUME_SIZE {
            return Err(VolumeError::TooSmall(size));
        }
        let path = self.path_of(name);
        let mkfs = MKFS_EXT4.iter().map(Path::new).find(|p| p.exists()).ok_or(VolumeError::MkfsMissing)?;
        // Built under a temporary name and renamed: a volume is whole or absent.
        let partial = self.dir.join(format!(".{name}{SUFFIX}.partial"));
        let _ = std::fs::remove_file(&partial);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| io_error(format!("creating {}", partial.display()), e))?;
        file.set_len(size).map_err(|e| io_error(format!("sizing {}", partial.display()), e))?;
        drop(file);
        let out = Command::new(mkfs)
            .args(["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", "-L"])
            .arg(name.chars().take(16).collect::<String>())
            .arg(&partial)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io_error(format!("running {}", mkfs.display()), e));
        let made = out.and_then(|out| {
            if out.status.success() {
                Ok(())
            } else {
                Err(VolumeError::MkfsFailed {
                    path: partial.clone(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                })
            }
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        if path.exists() {
            let _ = std::fs::remove_file(&partial);
            return Err(VolumeError::Exists(name.to_string()));
        }
        std::fs::rename(&partial, &path).map_err(|e| io_error(format!("creating {}", path.display()), e))?;
        self.inspect(name)
    }

    /// Volume `name`, created with `size` if it does not exist; and whether
    /// it was created now.
    pub fn get_or_create(&self, name: &str, size: u64) -> Result<(VolumeInfo, bool)> {
        validate_name(name)?;
        if self.path_of(name).exists() {
            return Ok((self.inspect(name)?, false));
        }
        match self.create(name, size) {
            Ok(info) => Ok((info, true)),
            // Another process created it in between.
            Err(_) if self.path_of(name).exists() => Ok((self.inspect(name)?, false)),
            Err(e) => Err(e),
        }
    }

    /// Volume `name`.
    pub fn inspect(&self, name: &str) -> Result<VolumeInfo> {
        validate_name(name)?;
        let path = self.path_of(name);
        let meta = std::fs::metadata(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                VolumeError::NotFound(name.to_string())
            } else {
                io_error(format!("reading {}", path.display()), e)
            }
        })?;
        Ok(VolumeInfo {
            name: name.to_string(),
            in_use: in_use(&path)?,
            size: meta.len(),
            allocated: meta.blocks() * 512,
            path,
        })
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<VolumeInfo>> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| io_error(format!("reading {}", self.dir.display()), e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(SUFFIX)).map(str::to_string))
            .filter(|n| validate_name(n).is_ok())
            .collect();
        names.sort();
        names.iter().map(|n| self.inspect(n)).collect()
    }

    /// Deletes volume `name` and its data; refused while a VM uses it.
    pub fn remove(&self, name: &str) -> Result<()> {
        let info = self.inspect(name)?;
        // Held across the unlink, so no VM attaches it in between.
        let _lock = lock_exclusive(&info.path)?.ok_or_else(|| VolumeError::InUse(name.to_string()))?;
        std::fs::remove_file(&info.path).map_err(|e| io_error(format!("removing {}", info.path.display()), e))
    }

    /// Deletes every volume no running VM uses; returns their names.
    pub fn prune(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for info in self.list()? {
            if !info.in_use && self.remove(&info.name).is_ok() {
                removed.push(info.name);
            }
        }
        Ok(removed)
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{SUFFIX}"))
    }
}

/// Volume names as docker accepts them: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 128.
pub fn validate_name(name: &str) -> std::result::Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(name.to_string()))
    }
}

/// The guest's name of the virtio-blk disk at `index` (in the order the
/// disks are attached): vda..vdz, vdaa... (as Linux names them).
pub(crate) fn guest_disk_name(index: usize) -> String {
    let mut letters = Vec::new();
    let mut i = index as i64;
    loop {
        letters.push(b'a' + (i % 26) as u8);
        i = i / 26 - 1;
        if i < 0 {
            break;
        }
    }
    letters.reverse();
    format!("/dev/vd{}", String::from_utf8_lossy(&letters))
}

/// Makes a volume mountable read-only: a guest cannot replay a journal on a
/// read-only disk (the mount fails with EROFS), so when the last VM left
/// transactions in it (killed, or stopped without unmounting) they are
/// replayed here, on the host, with `e2fsck -E journal_only`, under the
/// volume's exclusive lock (refused while a VM uses it). Nothing is lost: the
/// replay writes home what the guest had committed.
pub(crate) fn prepare_read_only(path: &Path) -> Result<()> {
    if !needs_recovery(path)? {
        return Ok(());
    }
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let _lock = lock_exclusive(path)?.ok_or(VolumeError::InUse(name))?;
    let failed = |stderr: String| VolumeError::JournalReplay { path: path.to_path_buf(), stderr };
    let e2fsck = E2FSCK
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or_else(|| failed("e2fsck is missing: apt-get install e2fsprogs".into()))?;
    let out = Command::new(e2fsck)
        .args(["-p", "-E", "journal_only"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("running {}: {e}", e2fsck.display())))?;
    // 0: clean; 1: errors corrected (the replay).
    if out.status.code().is_some_and(|c| c <= 1) && !needs_recovery(path)? {
        tracing::info!(volume = %path.display(), "replayed the journal for a read-only mount");
        Ok(())
    } else {
        Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// Whether the ext4 image at `path` has journal transactions to replay.
fn needs_recovery(path: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
    let mut flags = [0u8; 4];
    match file.read_exact_at(&mut flags, INCOMPAT_AT) {
        Ok(()) => Ok(u32::from_le_bytes(flags) & INCOMPAT_RECOVER != 0),
        // Shorter than a superblock (a slot placeholder): nothing to replay.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_error(format!("reading {}", path.display()), e)),
    }
}

/// Whether a disk device (of a running VM, in any process) holds the file.
fn in_use(path: &Path) -> Result<bool> {
    Ok(lock_exclusive(path)?.is_none())
}

/// The file opened and exclusively locked, or `None` when a device holds it.
fn lock_exclusive(path: &Path) -> Result<Option<File>> {
    let file = File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
    // SAFETY: flock on a valid fd owned by `file` for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(io_error(format!("locking {}", path.display()), e))
    }
}

fn io_error(what: String, source: io::Error) -> VolumeError {
    VolumeError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_disk_names_follow_linux() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702].into_iter().map(guest_disk_name).collect();
        let want = ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa"];
        assert_eq!(names, want.map(|n| format!("/dev/{n}")));
    }

    #[test]
    fn names_are_docker_names() {
        for good in ["data", "a", "my_vol.1-x", &"v".repeat(128)] {
            validate_name(good).unwrap();
        }
        for bad in ["", "-x", ".x", "a/b", "..", "a b", "ä", &"v".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn volumes_are_created_listed_locked_and_removed() {
        if !MKFS_EXT4.iter().any(|p| Path::new(p).exists()) {
            eprintln!("skipped: mkfs.ext4 missing (apt-get install e2fsprogs)");
            return;
        }
        let tmp = tempfile::Builder::new().prefix("sm-api-volumes-").tempdir().unwrap();
        let store = VolumeStore::open(tmp.path()).unwrap();
        let info = store.create("data", 16 << 20).unwrap();
        assert_eq!((info.name.as_str(), info.size, info.in_use), ("data", 16 << 20, false));
        assert!(info.allocated < info.size, "sparse: {} of {}", info.allocated, info.size);
        assert!(store.create("data", 16 << 20).unwrap_err().to_string().contains("already exists"));
        assert!(store.create("tiny", 1 << 20).unwrap_err().to_string().contains("too small"));
        let (again, created) = store.get_or_create("data", 1 << 30).unwrap();
        assert_eq!((again.size, created), (16 << 20, false), "an existing volume keeps its size");
        store.get_or_create("other", 16 << 20).unwrap();
        let names: Vec<String> = store.list().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["data", "other"]);

        // A device holding it (as a VM's disk does) makes it in use.
        let held = File::open(&info.path).unwrap();
        // SAFETY: flock on a valid fd.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) }, 0);
        assert!(store.inspect("data").unwrap().in_use);
        assert!(store.remove("data").unwrap_err().to_string().contains("in use"));
        assert_eq!(store.prune().unwrap(), ["other"], "prune spares volumes in use");
        drop(held);
        store.remove("data").unwrap();
        assert!(store.list().unwrap().is_empty());
        assert!(store.inspect("data").unwrap_err().to_string().contains("no volume named data"));
    }
}
