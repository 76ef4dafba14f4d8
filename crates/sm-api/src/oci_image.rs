//! [`Image`]: an OCI image ready to run — its read-only root disk built, and
//! VMs started from its baked snapshot.
//!
//! The first VM of an image (per VM configuration) cold-boots and, once the
//! agent is up on the image's root disk, takes a live snapshot into the store
//! (`<store>/baked/<manifest>-<key>.snap`); later VMs restore it copy-on-write
//! instead of booting. The key covers everything the snapshot depends on: the
//! image manifest, the root disk file (format, size, inode, mtime), the guest
//! kernel and agent initrd (same), RAM, vCPUs, the kernel command line and this
//! library's version. A snapshot that fails to restore is deleted and rebaked.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest as _, Sha256};
use sm_hypervisor::Hypervisor;
use sm_oci::{ImageInfo, RootfsFormat, Rootfs, RunOverrides, RunSpec, Store};
use sm_vmm::ConsoleOutput;

use crate::{Disk, Error, ExecRequest, GuestImage, Result, Vm, VmConfig};

/// How a VM of an image came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Restored from the image's baked snapshot.
    Restored,
    /// Booted cold, and a snapshot was baked for the next VM.
    BootedAndBaked,
    /// Booted cold (baking off, or it failed: see the log).
    Booted,
}

impl Start {
    /// A short description, e.g. for timings output.
    pub fn describe(self) -> &'static str {
        match self {
            Start::Restored => "restored from a baked snapshot",
            Start::BootedAndBaked => "cold boot, snapshot baked for the next run",
            Start::Booted => "cold boot",
        }
    }
}

/// The root disk format that boots best on this host: squashfs + zstd, except
/// erofs on kvm_pvm hosts (their emulated guest kernel cannot run the BMI2
/// code of the kernel's zstd decompressor).
pub fn default_rootfs_format() -> RootfsFormat {
    if Path::new("/sys/module/kvm_pvm").exists() {
        RootfsFormat::Erofs
    } else {
        RootfsFormat::default()
    }
}

/// An image from the store with its root disk.
pub struct Image {
    store: Store,
    info: ImageInfo,
    disk: Rootfs,
}

impl Image {
    /// The image `info` from `store`, building (or reusing) its root disk in `format`.
    pub fn new(store: Store, info: ImageInfo, format: RootfsFormat) -> Result<Image> {
        let disk = sm_oci::build_rootfs(&store, &info, format)?;
        Ok(Image { store, info, disk })
    }

    /// The built-in default image (busybox from the host, built locally, no
    /// registry) in `store`.
    pub fn builtin_default(store: Store) -> Result<Image> {
        let rec = sm_oci::builtin::default_image(&store)?;
        let info = store.info_for(&rec)?;
        Image::new(store, info, default_rootfs_format())
    }

    /// What the store knows of the image (name, digests, config, layers).
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    /// The read-only root disk.
    pub fn disk(&self) -> &Rootfs {
        &self.disk
    }

    /// What to run: the image's entrypoint, command, env, working directory and
    /// user with `overrides` applied (docker's rules).
    pub fn run_spec(&self, overrides: &RunOverrides) -> Result<RunSpec> {
        Ok(self.info.config.resolve(overrides)?)
    }

    /// An exec request for `spec` (no tty, no stdin, no timeout).
    pub fn exec_request(spec: &RunSpec) -> ExecRequest {
        ExecRequest {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: Some(spec.working_dir.clone()),
            user: (!spec.user.is_empty()).then(|| spec.user.clone()),
            ..ExecRequest::default()
        }
    }

    /// A VM configuration booting `guest` with this image's root disk as
    /// `/dev/vda` (the agent mounts it under a tmpfs overlay and switches to it).
    pub fn vm_config(&self, guest: GuestImage) -> VmConfig {
        let mut config = VmConfig::new(guest);
        config.console = ConsoleOutput::Null;
        config.disks = vec![Disk { path: self.disk.path.clone(), read_only: true }];
        config.extra_cmdline = Some(format!("sm.root=/dev/vda sm.rootfstype={}", self.disk.format.fstype()));
        config
    }

    /// Where the baked snapshot for `config` lives (whether or not it exists).
    pub fn baked_snapshot_path(&self, config: &VmConfig) -> Result<PathBuf> {
        let mut key = String::new();
        let _ = writeln!(key, "supermachine {}", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(key, "manifest {}", self.info.manifest_digest);
        let _ = writeln!(key, "rootfs {} {}", self.disk.format.fstype(), file_identity(&self.disk.path)?);
        let _ = writeln!(key, "kernel {}", file_identity(&config.image.kernel)?);
        let _ = writeln!(key, "initrd {}", file_identity(&config.image.initrd)?);
        let _ = writeln!(key, "vcpus {} memory {}", config.vcpus, config.memory_mib);
        let _ = writeln!(key, "cmdline {} {}", sm_vmm::DEFAULT_CMDLINE, config.extra_cmdline.as_deref().unwrap_or(""));
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Ok(self.store.baked_dir().join(format!("{}-{hex}.snap", self.info.manifest_digest.hex())))
    }

    /// Starts a VM of this image with `config` (from [`Image::vm_config`]):
    /// restored from the baked snapshot when there is one (and `bake`), else
    /// booted cold and, with `bake`, baked for the next time.
    pub fn start(&self, hypervisor: &dyn Hypervisor, config: VmConfig, bake: bool) -> Result<(Vm, Start)> {
        let snapshot = if bake { Some(self.baked_snapshot_path(&config)?) } else { None };
        if let Some(path) = snapshot.as_ref().filter(|p| p.exists()) {
            match Vm::restore(hypervisor, path, config.console.clone(), &config.disks) {
                Ok(vm) => return Ok((vm, Start::Restored)),
                Err(e) => {
                    tracing::warn!("the baked snapshot {} cannot be restored ({e}); booting cold and baking a new one", path.display());
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let mut vm = Vm::boot(hypervisor, config)?;
        // The agent stays in its initrd when it cannot mount the disk: never
        // treat that as the image.
        if let Some((_, line)) = vm.machine().console().find("sm-agent: root disk") {
            vm.stop();
            return Err(Error::NotReady(format!("the guest could not switch to the root disk of {}: {line}", self.info.name)));
        }
        let Some(path) = snapshot else { return Ok((vm, Start::Booted)) };
        // The guest is idle on the image's root disk: the state every later VM
        // starts from. A failed bake costs this VM nothing.
        match vm.snapshot_live(&path) {
            Ok(_) => Ok((vm, Start::BootedAndBaked)),
            Err(e) => {
                tracing::warn!("could not bake a snapshot of {} ({e}); the next VM boots cold too", self.info.name);
                Ok((vm, Start::Booted))
            }
        }
    }
}

/// Identity of a file for cache keys: path, size, inode, mtime (ns).
fn file_identity(path: &Path) -> Result<String> {
    let m = std::fs::metadata(path).map_err(|source| Error::Io { what: format!("reading {}", path.display()), source })?;
    let mtime = m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(format!("{}:{}:{}:{}", path.display(), m.len(), m.ino(), mtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_identity_changes_when_the_file_does() {
        let dir = std::env::temp_dir().join(format!("sm-api-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("kernel");
        std::fs::write(&f, b"one").unwrap();
        let a = file_identity(&f).unwrap();
        std::fs::write(&f, b"three").unwrap();
        assert_ne!(a, file_identity(&f).unwrap());
        assert!(file_identity(&dir.join("missing")).unwrap_err().to_string().contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
