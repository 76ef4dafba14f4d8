//! Shared helpers of the end-to-end tests in `tests/tests/`: finding KVM and the
//! guest artifacts, and failing loudly in CI when they are missing.

use std::path::PathBuf;

use sm_hypervisor::Hypervisor;

/// Whether missing KVM or guest artifacts must fail the test instead of skipping it
/// (`CI=true`, or `SM_REQUIRE_KVM=1` as set by `cargo xtask test`).
pub fn must_not_skip() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
        || std::env::var("SM_REQUIRE_KVM").map(|v| v == "1").unwrap_or(false)
}

/// Skips (returns `None` after saying so on stderr) or fails, per [`must_not_skip`].
fn skip_or_fail<T>(test: &str, why: String) -> Option<T> {
    if must_not_skip() {
        panic!("{test}: {why} (CI=true / SM_REQUIRE_KVM=1 forbid skipping)");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// Opens KVM, or skips/fails with the reason.
pub fn hypervisor(test: &str) -> Option<Box<dyn Hypervisor>> {
    match sm_kvm::KvmHypervisor::new() {
        Ok(kvm) => Some(Box::new(kvm)),
        Err(e) => skip_or_fail(test, e.to_string()),
    }
}

/// Workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// Paths of the guest kernel and test initrd built by `cargo xtask kernel` and
/// `cargo xtask initrd` (overridable with `SM_KERNEL` / `SM_TEST_INITRD`).
pub struct GuestArtifacts {
    /// vmlinux.
    pub kernel: PathBuf,
    /// Test initrd (static init printing `SM_INIT_READY cpus=N`).
    pub initrd: PathBuf,
}

/// Finds the guest artifacts, or skips/fails with what to run.
pub fn guest_artifacts(test: &str) -> Option<GuestArtifacts> {
    let guest = workspace_root().join("target/guest");
    let kernel = std::env::var_os("SM_KERNEL").map(PathBuf::from).unwrap_or_else(|| guest.join("vmlinux"));
    let initrd =
        std::env::var_os("SM_TEST_INITRD").map(PathBuf::from).unwrap_or_else(|| guest.join("initrd-test.cpio"));
    for p in [&kernel, &initrd] {
        if !p.exists() {
            return skip_or_fail(
                test,
                format!("{} is missing: run `cargo xtask kernel` and `cargo xtask initrd` first", p.display()),
            );
        }
    }
    Some(GuestArtifacts { kernel, initrd })
}

/// The agent guest image (kernel + agent initrd), or skips/fails with what to run.
pub fn agent_image(test: &str) -> Option<sm_api::GuestImage> {
    match sm_api::GuestImage::from_dir(&workspace_root().join("target/guest")) {
        Ok(image) => Some(image),
        Err(e) => skip_or_fail(test, e.to_string()),
    }
}

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
        let dir = std::env::temp_dir().join(format!("sm-e2e-agent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("agent.snap");
        vm.snapshot(&path).expect("snapshot the agent guest");
        vm.stop();
        Some(path)
    })
    .as_ref()
}

/// A scratch directory under the system temp dir, named after the test and this
/// process, emptied on creation and removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `<tmp>/sm-e2e-<tag>-<pid>`.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("sm-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
