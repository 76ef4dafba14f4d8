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

/// Restricts the calling thread (and the threads it starts) to `rules`.
pub(crate) fn restrict_current_thread(rules: &[FsRule]) -> Result<(), SeccompError> {
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(ABI_WANTED))?.create()?;
    for rule in rules {
        let access = if rule.writable { AccessFs::from_all(ABI_WANTED) } else { AccessFs::from_read(ABI_WANTED) };
        let dir = PathFd::new(&rule.path).map_err(|e| SeccompError::LandlockPath(rule.path.clone(), e.to_string()))?;
        ruleset = ruleset.add_rule(PathBeneath::new(dir, access))?;
    }
    let status: RestrictionStatus = ruleset.restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "this kernel has no Landlock: VMM threads are not confined to their files (seccomp still is on)"
        );
    }
    Ok(())
}
