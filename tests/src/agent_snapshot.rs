//! The agent guest booted once per test binary and snapshotted ("boot
//! once, restore many"), and the snapshot's directory removed when the
//! process exits (or, for a killed one, by the next test binary).

use std::path::{Path, PathBuf};

use crate::{agent_image, hypervisor};

/// Boots the agent guest once per test binary and snapshots it; every test then
/// restores its own VM from that file ("boot once, restore many").
pub fn agent_snapshot(test: &str) -> Option<&'static PathBuf> {
    static SNAP: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    SNAP.get_or_init(|| {
        let hv = hypervisor(test)?;
        let image = agent_image(test)?;
        let t0 = std::time::Instant::now();
        let mut vm = sm_api::Vm::boot(&*hv, sm_api::VmConfig::new(image)).expect("boot the agent guest");
        eprintln!("agent guest ready after {:?}", t0.elapsed());
        sweep_agent_snapshot_dirs();
        let dir = agent_snapshot_dir(std::process::id());
        std::fs::create_dir_all(&dir).expect("temp dir");
        // SAFETY: registers a plain `extern "C" fn` that takes no arguments and
        // touches only the file system; atexit has no other precondition.
        unsafe { libc::atexit(remove_own_agent_snapshot_dir) };
        let path = dir.join("agent.snap");
        vm.snapshot(&path).expect("snapshot the agent guest");
        vm.stop();
        Some(path)
    })
    .as_ref()
}

/// Where the test binary of process `pid` keeps its agent snapshot (~19 MiB).
fn agent_snapshot_dir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("sm-e2e-agent-{pid}"))
}

/// Runs at process exit (the statics holding the path are never dropped):
/// the snapshot is not left behind in $TMPDIR, run after run.
extern "C" fn remove_own_agent_snapshot_dir() {
    let _ = std::fs::remove_dir_all(agent_snapshot_dir(std::process::id()));
}

/// Removes the snapshot directories of test processes that are gone without
/// exiting (killed by a timeout or a signal).
fn sweep_agent_snapshot_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("sm-e2e-agent-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
