//! Where the workspace and its build artifacts live.

use std::path::PathBuf;

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().expect("xtask lives one level below the workspace root").to_path_buf()
}

/// Directory for guest artifacts (kernel, initrds): `target/guest`.
pub fn guest_dir() -> PathBuf {
    workspace_root().join("target").join("guest")
}
