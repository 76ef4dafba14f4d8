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
