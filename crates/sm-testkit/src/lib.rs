//! Helpers shared by the workspace's test suites — the end-to-end tests in
//! `tests/` (through `sm-tests`, which re-exports these) and the VMM-level
//! tests in `crates/sm-vmm/tests/`. It depends on no supermachine crate, so
//! either can use it without a dependency cycle.
//!
//! - [`must_not_skip`] / [`skip_or_fail`]: a test whose prerequisites (KVM,
//!   guest artifacts, tools) are missing skips on a developer's machine and
//!   fails in CI.
//! - [`guest_artifacts`]: the guest kernel and test initrd `cargo xtask` builds.
//! - [`temp_dir`]: a scratch directory (tempfile: unique, mode 0700, removed on drop).
//! - [`SplitMix64`], [`random_bytes`], [`sha256_hex`]: reproducible payloads and their digests.

use std::path::{Path, PathBuf};

pub use tempfile::TempDir;

/// Whether missing KVM or guest artifacts must fail the test instead of skipping it
/// (`CI=true`, or `SM_REQUIRE_KVM=1` as set by `cargo xtask test`).
pub fn must_not_skip() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
        || std::env::var("SM_REQUIRE_KVM").map(|v| v == "1").unwrap_or(false)
}

/// Skips (returns `None` after saying so on stderr) or fails, per [`must_not_skip`].
pub fn skip_or_fail<T>(test: &str, why: String) -> Option<T> {
    if must_not_skip() {
        panic!("{test}: {why} (CI=true / SM_REQUIRE_KVM=1 forbid skipping)");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/sm-testkit is two levels inside the workspace")
        .to_path_buf()
}

/// Where `cargo xtask kernel|agent|initrd` put the guest artifacts.
pub fn guest_dir() -> PathBuf {
    workspace_root().join("target/guest")
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
    let guest = guest_dir();
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

/// A fresh scratch directory `<tmp>/sm-<tag>-XXXXXX` (unique, mode 0700),
/// removed with everything in it when the returned value drops.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("sm-{tag}-")).tempdir().expect("creating a temporary directory")
}

/// splitmix64: a small seeded generator for test payloads (reproducible from
/// its seed, which the tests print).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// A generator seeded from the clock.
    pub fn from_clock() -> SplitMix64 {
        SplitMix64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// `len` random bytes from a clock-seeded [`SplitMix64`].
pub fn random_bytes(len: usize) -> Vec<u8> {
    SplitMix64::from_clock().bytes(len)
}

/// The lower-case hex SHA-256 of `data` (what `sha256sum` prints).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of `result`, or skips/fails (per [`must_not_skip`]) with its
/// error: `let Some(hv) = ok_or_skip("boot", sm_vmm::default_hypervisor()) else { return };`.
pub fn ok_or_skip<T, E: std::fmt::Display>(test: &str, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => skip_or_fail(test, e.to_string()),
    }
}
