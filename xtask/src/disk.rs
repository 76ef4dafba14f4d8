//! Free-disk check before `cargo xtask test`: a build or a test that runs out
//! of disk half-way fails with an error that names a random file
//! (mkfs.erofs: "No space left on device"); this names the shortfall up front.

use std::ffi::CString;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::paths;

const GIB: u64 = 1 << 30;

/// What a build of everything from scratch leaves in target/ (debug, line
/// tables only, no incremental cache, the guest kernel and agent: ~5 GiB
/// measured 2026-12-07; it was ~30 GiB with full debug info), with room.
const BUILD_BYTES: u64 = 8 * GIB;

/// What the tests write while they run (images, root disks, snapshots,
/// containerd's content store, the Debian+python3 image): a few GiB at peak.
const TEST_BYTES: u64 = 4 * GIB;

/// Fails when the disk holding target/ cannot take what is still to be built
/// plus what the tests write, naming both figures.
pub fn ensure_room() -> Result<()> {
    let target = paths::workspace_root().join("target");
    let probe = if target.exists() { target.clone() } else { paths::workspace_root() };
    let free = free_bytes(&probe)?;
    let built = dir_bytes(&target);
    let need = BUILD_BYTES.saturating_sub(built) + TEST_BYTES;
    eprintln!(
        "xtask: disk: {:.1} GiB free at {}, target/ holds {:.1} GiB, the build and tests need about {:.1} GiB more",
        gib(free),
        probe.display(),
        gib(built),
        gib(need)
    );
    let tmp = std::env::temp_dir();
    let tmp_free = free_bytes(&tmp)?;
    if free < need {
        bail!(
            "only {:.1} GiB free on the disk of {}, the build and tests need about {:.1} GiB: free some space \
             (e.g. old clones' target/ directories, `cargo clean`) and run again",
            gib(free),
            probe.display(),
            gib(need)
        );
    }
    if tmp_free < TEST_BYTES {
        bail!(
            "only {:.1} GiB free in {} (TMPDIR), the tests write about {:.1} GiB there: free some space or set TMPDIR",
            gib(tmp_free),
            tmp.display(),
            gib(TEST_BYTES)
        );
    }
    Ok(())
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

/// Bytes available to this user on the file system holding `path`.
fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes()).context("a path with a NUL byte")?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string and `stat` points to
    // writable memory of the right type; statvfs writes only into it.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statvfs {}", path.display()));
    }
    // SAFETY: statvfs returned 0, so it filled in the whole struct.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Bytes allocated to the files below `dir` (0 when it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        total += if meta.is_dir() { dir_bytes(&entry.path()) } else { meta.blocks() * 512 };
    }
    total
}
