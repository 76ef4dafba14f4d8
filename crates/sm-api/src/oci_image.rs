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
//!
//! Volumes ([`crate::VolumeMount`]) and shared host directories
//! ([`crate::ShareMount`]) are not part of a snapshot: it is baked with an
//! empty placeholder in each slot (a 0-byte disk, an empty directory; the key
//! holds only the number of slots and the volumes' read-only flags; the
//! warm-up runs without them), and every VM, the baking one included, is a
//! restore with the real ones in the slots, which the agent then mounts.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use sm_hypervisor::Hypervisor;
use sm_oci::{ImageInfo, Rootfs, RootfsFormat, RunOverrides, RunSpec, Store};

use crate::volume::VolumeMount;
use crate::{Error, ExecRequest, GuestImage, RestoreConfig, Result, ShareMount, Vm, VmConfig};

/// Empty stand-ins for the volumes (0-byte disk files) and shares (empty
/// directories) while a snapshot is baked; a restore puts the real ones in
/// their slots.
struct SlotPlaceholders {
    _dir: tempfile::TempDir,
    volumes: Vec<VolumeMount>,
    shares: Vec<ShareMount>,
}

impl SlotPlaceholders {
    fn new(volumes: &[VolumeMount], shares: &[ShareMount]) -> Result<Self> {
        let io = |what: String| move |source| Error::Io { what, source };
        let dir = tempfile::Builder::new()
            .prefix("supermachine-slots-")
            .tempdir()
            .map_err(io("creating slot placeholders".into()))?;
        let volumes = volumes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let path = dir.path().join(format!("volume{i}"));
                std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
                Ok(VolumeMount { path, ..v.clone() })
            })
            .collect::<Result<_>>()?;
        let shares = shares
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let host_dir = dir.path().join(format!("share{i}"));
                std::fs::create_dir(&host_dir).map_err(io(format!("creating {}", host_dir.display())))?;
                Ok(ShareMount { host_dir, ..s.clone() })
            })
            .collect::<Result<_>>()?;
        Ok(SlotPlaceholders { _dir: dir, volumes, shares })
    }
}

/// What happens between the first cold boot of an image and its baked
/// snapshot, so later VMs start from a warmed-up state.
#[derive(Debug, Clone)]
pub struct BakeOptions {
    /// Run to completion (exit 0) first, e.g. to fill caches or start a server
    /// in the background.
    pub warmup: Option<ExecRequest>,
    /// Then wait until the guest listens on this TCP port.
    pub wait_port: Option<u16>,
    /// Limit for the warm-up and the port wait together.
    pub timeout: Duration,
    /// Programs (names looked up in `PATH`, or paths) read into the guest's
    /// page cache before the snapshot, so restored VMs start them without
    /// reading the root disk: e.g. the command of the run that bakes. The
    /// image's own entrypoint (or command) and `/bin/sh` always are. Not part
    /// of the snapshot's key: it only makes the first start of these faster.
    pub prefetch: Vec<String>,
}

impl Default for BakeOptions {
    fn default() -> Self {
        BakeOptions { warmup: None, wait_port: None, timeout: Duration::from_secs(300), prefetch: Vec::new() }
    }
}

/// Whether `/proc/net/tcp` (or `tcp6`) text shows a socket listening on `port`.
pub fn listens_on(proc_net_tcp: &str, port: u16) -> bool {
    const LISTEN: &str = "0A";
    proc_net_tcp.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port =
            fields.get(1).and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        local_port == Some(port) && fields.get(3) == Some(&LISTEN)
    })
}

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

    /// An image whose root disk was built elsewhere (a container runtime's
    /// prepared root file system, say): `key` names the disk's content (its
    /// baked snapshots are filed under it in `store`, and `supermachine
    /// prune` removes them as it does any snapshot of an image it does not
    /// hold), `name` is what messages call it. There is no image config:
    /// the caller says what to run.
    pub fn from_root_disk(store: Store, name: String, key: sm_oci::Digest, disk: Rootfs) -> Image {
        let info = ImageInfo {
            name,
            manifest_digest: key.clone(),
            index_digest: None,
            config_digest: key,
            config: sm_oci::ImageConfig::default(),
            layers: Vec::new(),
        };
        Image { store, info, disk }
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
        VmConfig::with_root_disk(guest, &self.disk)
    }

    /// Where the baked snapshot for `config` and `bake` lives (whether or not it exists).
    pub fn baked_snapshot_path(&self, config: &VmConfig, bake: &BakeOptions) -> Result<PathBuf> {
        let mut key = String::new();
        let _ = writeln!(key, "supermachine {}", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(key, "manifest {}", self.info.manifest_digest);
        let _ = writeln!(key, "rootfs {} {}", self.disk.format.fstype(), file_identity(&self.disk.path)?);
        let _ = writeln!(key, "kernel {}", file_identity(&config.image.kernel)?);
        let _ = writeln!(key, "initrd {}", file_identity(&config.image.initrd)?);
        let _ = writeln!(key, "vcpus {} memory {}", config.vcpus, config.memory_mib);
        let _ = writeln!(key, "cmdline {} {}", sm_vmm::DEFAULT_CMDLINE, config.extra_cmdline.as_deref().unwrap_or(""));
        // The network's settings live on the host side (policy, ports,
        // resolver): only whether the guest has the device is in the snapshot.
        if config.network != crate::Network::None {
            let _ = writeln!(key, "network virtio-net");
        }
        // Volumes fill slots baked with placeholders: only how many, and
        // whether each is read-only (the guest learns that at probe), count.
        if !config.volumes.is_empty() {
            let modes: Vec<&str> = config.volumes.iter().map(|v| if v.read_only { "ro" } else { "rw" }).collect();
            let _ = writeln!(key, "volumes {}", modes.join(","));
        }
        // Shares likewise; a DAX window is part of the device the guest probed.
        if !config.shares.is_empty() {
            let dax: Vec<&str> = config.shares.iter().map(|s| if s.dax { "dax" } else { "-" }).collect();
            let _ = writeln!(key, "shares {} {}", config.shares.len(), dax.join(","));
        }
        if let Some(w) = &bake.warmup {
            let _ = writeln!(key, "warmup {:?} {:?} {:?} {:?}", w.argv, w.env, w.cwd, w.user);
        }
        if let Some(p) = bake.wait_port {
            let _ = writeln!(key, "port {p}");
        }
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Ok(self.store.baked_dir().join(format!("{}-{hex}.snap", self.info.manifest_digest.hex())))
    }

    /// Starts a VM of this image with `config` (from [`Image::vm_config`]):
    /// with `bake`, restored from the baked snapshot when there is one, else
    /// booted cold, warmed up as `bake` says and baked for the next time;
    /// without, booted cold.
    pub fn start(
        &self,
        hypervisor: &dyn Hypervisor,
        config: VmConfig,
        bake: Option<&BakeOptions>,
    ) -> Result<(Vm, Start)> {
        let snapshot = bake.map(|b| self.baked_snapshot_path(&config, b)).transpose()?;
        let restore_config = RestoreConfig {
            console: config.console.clone(),
            disks: config.disks.clone(),
            volumes: config.volumes.clone(),
            shares: config.shares.clone(),
            network: config.network.clone(),
        };
        if let Some(path) = snapshot.as_ref().filter(|p| p.exists()) {
            match Vm::restore_with(hypervisor, path, &restore_config) {
                Ok(vm) => return Ok((vm, Start::Restored)),
                // Only a snapshot that can never be restored is thrown away
                // (damaged, another format, other devices, a guest whose
                // agent never answers); anything else (out of memory or
                // descriptors, a volume in use elsewhere) is the error.
                Err(e) if snapshot_is_unusable(&e) => {
                    tracing::warn!(
                        "the baked snapshot {} cannot be restored ({e}); booting cold and baking a new one",
                        path.display()
                    );
                    let _ = std::fs::remove_file(path);
                }
                Err(e) => return Err(e),
            }
        }
        // Baking with volumes or shares: the snapshot gets empty placeholders
        // in their slots, and this VM then restores it with the real ones.
        let slots = !config.volumes.is_empty() || !config.shares.is_empty();
        let placeholders = match (&snapshot, slots) {
            (Some(_), true) => Some(SlotPlaceholders::new(&config.volumes, &config.shares)?),
            _ => None,
        };
        let mut vm = match &placeholders {
            Some(p) => {
                let boot_config = VmConfig { volumes: p.volumes.clone(), shares: p.shares.clone(), ..config };
                Vm::boot_unmounted(hypervisor, boot_config)?
            }
            None => Vm::boot(hypervisor, config)?,
        };
        // The agent stays in its initrd when it cannot mount the disk: never
        // treat that as the image.
        if let Some((_, line)) = vm.machine().console().find("sm-agent: root disk") {
            vm.stop();
            return Err(Error::NotReady(format!(
                "the guest could not switch to the root disk of {}: {line}",
                self.info.name
            )));
        }
        let (Some(path), Some(bake)) = (snapshot, bake) else { return Ok((vm, Start::Booted)) };
        if let Err(e) = self.warm_up(&vm, bake) {
            vm.stop();
            return Err(e);
        }
        // The guest is idle (or serving) on the image's root disk: the state
        // every later VM starts from. A failed bake costs this VM nothing.
        let baked = vm.snapshot_live(&path);
        if placeholders.is_some() {
            // This VM has placeholders, not the volumes: the VM to hand out is
            // the snapshot restored with them.
            vm.stop();
            drop(placeholders);
            if let Err(e) = &baked {
                let _ = std::fs::remove_file(&path);
                return Err(Error::NotReady(format!(
                    "could not bake a snapshot of {} with volume slots: {e}",
                    self.info.name
                )));
            }
            return Ok((Vm::restore_with(hypervisor, &path, &restore_config)?, Start::BootedAndBaked));
        }
        match baked {
            Ok(_) => Ok((vm, Start::BootedAndBaked)),
            Err(e) => {
                tracing::warn!("could not bake a snapshot of {} ({e}); the next VM boots cold too", self.info.name);
                Ok((vm, Start::Booted))
            }
        }
    }

    /// Runs the warm-up command and waits for the port, before a bake.
    fn warm_up(&self, vm: &Vm, bake: &BakeOptions) -> Result<()> {
        let deadline = Instant::now() + bake.timeout;
        vm.with_agent(|agent| agent.prefetch(&self.prefetch_list(bake)))?;
        if let Some(warmup) = &bake.warmup {
            let mut req = warmup.clone();
            req.timeout_ms = Some(bake.timeout.as_millis() as u64);
            let out = vm.exec(&req, None)?;
            if out.timed_out || !out.status.success() {
                return Err(Error::NotReady(format!(
                    "the warm-up command {:?} of {} failed ({:?}{}): {}",
                    req.argv,
                    self.info.name,
                    out.status,
                    if out.timed_out { ", timed out" } else { "" },
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        let Some(port) = bake.wait_port else { return Ok(()) };
        loop {
            let listening = ["/proc/net/tcp", "/proc/net/tcp6"]
                .iter()
                .any(|f| vm.read_file(f).is_ok_and(|b| listens_on(&String::from_utf8_lossy(&b), port)));
            if listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady(format!(
                    "{} did not listen on TCP port {port} within {:?} (nothing to bake)",
                    self.info.name, bake.timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Image {
    /// What a bake reads into the page cache: `bake.prefetch`, the image's
    /// own program, `/bin/sh`.
    fn prefetch_list(&self, bake: &BakeOptions) -> Vec<String> {
        let mut programs = bake.prefetch.clone();
        if let Ok(spec) = self.info.config.resolve(&RunOverrides::default()) {
            programs.extend(spec.argv.first().cloned());
        }
        programs.push("/bin/sh".into());
        programs
    }
}

/// Identity of a file for cache keys: path, size, inode, mtime (ns).
fn file_identity(path: &Path) -> Result<String> {
    let m =
        std::fs::metadata(path).map_err(|source| Error::Io { what: format!("reading {}", path.display()), source })?;
    let mtime = m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(format!("{}:{}:{}:{}", path.display(), m.len(), m.ino(), mtime))
}

/// Whether a restore error condemns the baked snapshot (see
/// [`sm_vmm::Error::snapshot_is_unusable`]); a restored guest whose agent
/// never answered counts too (its guest is broken; a new bake is the remedy).
fn snapshot_is_unusable(e: &Error) -> bool {
    match e {
        Error::Vmm(v) => v.snapshot_is_unusable(),
        Error::NotReady(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_in_proc_net_tcp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1\n\
                   1: 0100007F:0016 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 1235 1\n";
        assert!(listens_on(tcp, 8080));
        assert!(!listens_on(tcp, 22), "an established connection is not a listener");
        assert!(!listens_on(tcp, 80));
        assert!(!listens_on("", 8080));
    }

    #[test]
    fn file_identity_changes_when_the_file_does() {
        let tmp = tempfile::Builder::new().prefix("sm-api-image-").tempdir().unwrap();
        let dir = tmp.path();
        let f = dir.join("kernel");
        std::fs::write(&f, b"one").unwrap();
        let a = file_identity(&f).unwrap();
        std::fs::write(&f, b"three").unwrap();
        assert_ne!(a, file_identity(&f).unwrap());
        assert!(file_identity(&dir.join("missing")).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn only_an_unusable_snapshot_is_thrown_away() {
        let path = std::path::PathBuf::from("/baked/x.snap");
        let io = |errno| {
            Error::Vmm(sm_vmm::Error::Snapshot(sm_snapshot::Error::Io {
                what: "mapping",
                path: path.clone(),
                source: std::io::Error::from_raw_os_error(errno),
            }))
        };
        assert!(!snapshot_is_unusable(&io(libc::ENOMEM)), "out of memory says nothing against the file");
        assert!(!snapshot_is_unusable(&io(libc::EMFILE)), "nor does running out of descriptors");
        let mmap = sm_snapshot::Error::Memory("mmap of guest RAM: Cannot allocate memory".into());
        assert!(!snapshot_is_unusable(&Error::Vmm(mmap.into())), "a mapping the host refused says nothing either");
        assert!(!snapshot_is_unusable(&Error::Volume(crate::volume::VolumeError::InUse("data".into()))));
        let invalid = sm_snapshot::Error::Invalid { path: path.clone(), reason: "checksum mismatch".into() };
        assert!(snapshot_is_unusable(&Error::Vmm(invalid.into())));
        let version = sm_snapshot::Error::Version { path: path.clone(), found: 99 };
        assert!(snapshot_is_unusable(&Error::Vmm(version.into())));
        let devices = sm_vmm::Error::SnapshotContents { path, reason: "taken with other devices".into() };
        assert!(snapshot_is_unusable(&Error::Vmm(devices)));
        assert!(snapshot_is_unusable(&Error::NotReady("the agent never answered".into())));
    }
}
