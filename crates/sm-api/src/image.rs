use std::path::PathBuf;

use crate::{Error, Result};

/// The guest a VM boots: a kernel and an initrd whose `/init` is the sm-agent.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// vmlinux or bzImage.
    pub kernel: PathBuf,
    /// initrd holding the agent as `/init`.
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The artifacts `cargo xtask kernel` and `cargo xtask agent` build, or
    /// `$SM_KERNEL` / `$SM_AGENT_INITRD` when set. `guest_dir` is usually
    /// `<workspace>/target/guest`.
    pub fn from_dir(guest_dir: &std::path::Path) -> Result<Self> {
        let pick =
            |env: &str, name: &str| std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| guest_dir.join(name));
        let image =
            GuestImage { kernel: pick("SM_KERNEL", "vmlinux"), initrd: pick("SM_AGENT_INITRD", "initrd-agent.cpio") };
        for (what, p, fix) in [
            ("guest kernel", &image.kernel, "cargo xtask kernel"),
            ("agent initrd", &image.initrd, "cargo xtask agent --initrd"),
        ] {
            if !p.is_file() {
                return Err(Error::Missing(format!("{what} {} not found: build it with `{fix}`", p.display())));
            }
        }
        Ok(image)
    }
}
