//! Per-VM scratch directories (`$TMPDIR/supermachine-XXXXXX`, holding the
//! agent's vsock socket) and the sweep of those a killed process left.
//!
//! A VM's directory goes with the VM; a process killed with SIGKILL leaves
//! its directories behind. They are found by the socket in them: a live VM's
//! process listens on it, a dead one's socket refuses connections.

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Result};

const PREFIX: &str = "supermachine-";
/// The socket a live VM's process listens on.
pub(super) const VSOCK_SOCKET: &str = "vsock.sock";
/// A directory without its socket this long is a VM that never got one.
const UNFINISHED_AGE: Duration = Duration::from_secs(3600);
/// The most directories one sweep looks at (a huge $TMPDIR costs little).
const SWEEP_LIMIT: usize = 4096;

/// A per-VM scratch directory (the agent's vsock socket), removed with the VM.
/// Made like mkdtemp: an unpredictable name, created exclusively, mode 0700,
/// so no other local user can pre-create it or reach the socket in it.
pub(super) struct WorkDir(tempfile::TempDir);

impl WorkDir {
    /// A new directory in `$TMPDIR`; the first one a process makes first
    /// sweeps the stale ones there.
    pub(super) fn new() -> Result<Self> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        let tmp = std::env::temp_dir();
        SWEPT.call_once(|| {
            let removed = sweep_stale_work_dirs(&tmp);
            if !removed.is_empty() {
                tracing::info!("removed {} VM work directories left by killed processes", removed.len());
            }
        });
        tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir_in(&tmp)
            .map(WorkDir)
            .map_err(|e| Error::Io { what: format!("creating a VM work directory in {}", tmp.display()), source: e })
    }

    pub(super) fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Removes the VM work directories in `tmp` whose process is gone (their
/// socket refuses connections, or they never got one within an hour);
/// returns them. Only this user's directories named as [`WorkDir`] makes
/// them are looked at; a live VM's is never touched.
pub fn sweep_stale_work_dirs(tmp: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(tmp) else { return Vec::new() };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut removed = Vec::new();
    for entry in entries.flatten().take(SWEEP_LIMIT) {
        let name = entry.file_name();
        let Some(suffix) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else { continue };
        // tempfile's random part: 6 alphanumerics (not "slots-..." and such).
        if suffix.len() != 6 || !suffix.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        let dir = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&dir) else { continue };
        if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != me {
            continue;
        }
        if is_stale(&dir, &meta) && std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

fn is_stale(dir: &Path, meta: &std::fs::Metadata) -> bool {
    match UnixStream::connect(dir.join(VSOCK_SOCKET)) {
        // Someone listens: a live VM (the connection closes at once, before
        // it asks for a port, which the VM's vsock device just drops).
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => true,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age > UNFINISHED_AGE)
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn only_directories_of_dead_vms_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            d
        };
        let live = make("supermachine-Live01");
        let _listener = UnixListener::bind(live.join(VSOCK_SOCKET)).unwrap();
        let dead = make("supermachine-Dead01");
        drop(UnixListener::bind(dead.join(VSOCK_SOCKET)).unwrap());
        std::fs::write(dead.join("other"), b"x").unwrap();
        let young = make("supermachine-Young1");
        let slots = make("supermachine-slots-Dead02");
        drop(UnixListener::bind(slots.join(VSOCK_SOCKET)).unwrap());
        let not_ours = make("othertool-Dead03");
        drop(UnixListener::bind(not_ours.join(VSOCK_SOCKET)).unwrap());
        std::fs::write(tmp.path().join("supermachine-File01"), b"a file").unwrap();

        let removed = sweep_stale_work_dirs(tmp.path());
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists());
        for kept in [&live, &young, &slots, &not_ours] {
            assert!(kept.exists(), "{} kept", kept.display());
        }
        assert!(tmp.path().join("supermachine-File01").exists());
        assert!(sweep_stale_work_dirs(tmp.path()).is_empty(), "a second sweep finds nothing");
    }
}
