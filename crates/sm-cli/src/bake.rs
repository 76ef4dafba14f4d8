//! Baked snapshots for `run`: the first run of an image (per VM configuration)
//! cold-boots, and right after the agent is up on the image's root disk takes a
//! live snapshot into the store (`<store>/baked/<manifest>-<key>.snap`). Later
//! runs restore it copy-on-write instead of booting, then run the command.
//!
//! The key covers everything the snapshot depends on: the image manifest, the
//! root disk file (format, size, mtime), the guest kernel and agent initrd
//! (size, mtime), RAM, vCPUs, the kernel command line and this binary's
//! version. A snapshot that fails to restore is deleted and rebaked.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};
use sm_api::{GuestImage, VmConfig};
use sm_oci::{ImageInfo, Rootfs, Store};

/// Identity of a file for cache keys: path, size, mtime (ns).
fn file_identity(path: &Path) -> Result<String> {
    let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mtime = m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(format!("{}:{}:{}:{}", path.display(), m.len(), m.ino(), mtime))
}

/// Where the baked snapshot of `image` for this VM configuration lives
/// (whether or not it exists yet).
pub fn snapshot_path(store: &Store, image: &ImageInfo, disk: &Rootfs, guest: &GuestImage, config: &VmConfig) -> Result<PathBuf> {
    let mut key = String::new();
    let _ = writeln!(key, "supermachine {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(key, "manifest {}", image.manifest_digest);
    let _ = writeln!(key, "rootfs {} {}", disk.format.fstype(), file_identity(&disk.path)?);
    let _ = writeln!(key, "kernel {}", file_identity(&guest.kernel)?);
    let _ = writeln!(key, "initrd {}", file_identity(&guest.initrd)?);
    let _ = writeln!(key, "vcpus {} memory {}", config.vcpus, config.memory_mib);
    let _ = writeln!(key, "cmdline {} {}", sm_vmm::DEFAULT_CMDLINE, config.extra_cmdline.as_deref().unwrap_or(""));
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(store.baked_dir().join(format!("{}-{hex}.snap", image.manifest_digest.hex())))
}

/// How the VM of a run came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Restored from a baked snapshot.
    Restored,
    /// Booted cold, and a snapshot was baked for the next run.
    BootedAndBaked,
    /// Booted cold (`--no-snapshot`, or baking failed).
    Booted,
}

impl Start {
    /// For `--timings`.
    pub fn describe(self) -> &'static str {
        match self {
            Start::Restored => "restored from a baked snapshot",
            Start::BootedAndBaked => "cold boot, snapshot baked for the next run",
            Start::Booted => "cold boot",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_identity_changes_when_the_file_does() {
        let dir = std::env::temp_dir().join(format!("sm-bake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("kernel");
        std::fs::write(&f, b"one").unwrap();
        let a = file_identity(&f).unwrap();
        std::fs::write(&f, b"three").unwrap();
        assert_ne!(a, file_identity(&f).unwrap());
        assert!(file_identity(&dir.join("missing")).unwrap_err().to_string().contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
