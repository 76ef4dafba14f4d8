//! File-system confinement with Landlock: a confined thread opens nothing
//! but what its VM's devices serve (a virtio-fs share's directory,
//! read-only or read-write as the share is). Files the VMM opened before —
//! disk images, the console, sockets, KVM — stay usable: Landlock checks a
//! path when it is opened, never a descriptor already held.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, RestrictionStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

use crate::SeccompError;

/// The Landlock ABI whose file-system rights are asked for (read, write,
/// execute, make, remove, rename across directories, truncate; best effort
/// on older kernels).
const ABI_WANTED: ABI = ABI::V3;

/// A host path a confined thread may still open below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsRule {
    /// A directory.
    pub path: PathBuf,
    /// Writes (create, remove, rename, truncate) too, not only reads.
    pub writable: bool,
}

static WARNED: AtomicBool = AtomicBool::new(false);

/// The running kernel's Landlock ABI version (0: none).
fn kernel_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a NULL attribute, size 0 and the VERSION flag the call
    // only returns the ABI version; no memory is passed.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

fn warn_once(why: &str) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!("{why}: VMM threads are not confined in the file system (seccomp still is on)");
    }
}

/// Restricts the calling thread (and the threads it starts) to `rules`.
pub(crate) fn restrict_current_thread(rules: &[FsRule]) -> Result<(), SeccompError> {
    // Landlock before ABI 2 refuses every rename or link across directories
    // (no Refer right): a writable share would break in the guest (`mv a/x b/`).
    if rules.iter().any(|r| r.writable) && kernel_abi() < 2 {
        warn_once("this kernel's Landlock (ABI < 2) cannot allow moves between a share's directories");
        return Ok(());
    }
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(ABI_WANTED))?.create()?;
    for rule in rules {
        let access = if rule.writable { AccessFs::from_all(ABI_WANTED) } else { AccessFs::from_read(ABI_WANTED) };
        let dir = PathFd::new(&rule.path).map_err(|e| SeccompError::LandlockPath(rule.path.clone(), e.to_string()))?;
        ruleset = ruleset.add_rule(PathBeneath::new(dir, access))?;
    }
    let status: RestrictionStatus = ruleset.restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced {
        warn_once("this kernel has no Landlock");
    }
    Ok(())
}
