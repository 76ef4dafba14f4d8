//! Volumes and shared directories of a running VM: mounted by the agent when
//! the VM comes up, flushed and unmounted before it stops, and the reason a
//! VM with volumes mounted is not snapshotted.

use std::time::Duration;

use sm_agent::AgentClient;

use super::Vm;
use crate::share::ShareMount;
use crate::volume::VolumeMount;
use crate::{Error, Result};

/// A volume or share the agent mounted.
pub(super) struct Mounted {
    /// Guest path.
    pub(super) target: String,
    /// A named volume (ext4 on virtio-blk), not a share.
    pub(super) volume: bool,
}

/// What a VM mounts when it comes up (boot or restore) and after a reset.
#[derive(Debug, Clone, Default)]
pub(super) struct MountPlan {
    /// Disk index of the first volume.
    first_volume_disk: usize,
    volumes: Vec<VolumeMount>,
    shares: Vec<ShareMount>,
}

impl MountPlan {
    pub(super) fn new(first_volume_disk: usize, volumes: &[VolumeMount], shares: &[ShareMount]) -> Self {
        MountPlan { first_volume_disk, volumes: volumes.to_vec(), shares: shares.to_vec() }
    }
}

/// How long the guest may take to flush one mount before the VM stops.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

impl Vm {
    /// Has the agent mount what the plan says: volumes, then shares.
    pub(super) fn mount_planned(&mut self) -> Result<()> {
        let plan = self.mount_plan.clone();
        self.mount_volumes(plan.first_volume_disk, &plan.volumes)?;
        self.mount_shares(&plan.shares)
    }

    /// Has the agent mount the shared directories (virtio-fs tags by slot).
    fn mount_shares(&mut self, shares: &[ShareMount]) -> Result<()> {
        if shares.is_empty() {
            return Ok(());
        }
        let mut agent = self.agent()?;
        for (i, s) in shares.iter().enumerate() {
            let req = sm_agent::MountRequest {
                source: crate::share::tag(i),
                target: s.guest_path.clone(),
                fstype: "virtiofs".into(),
                read_only: s.read_only,
                expect_sectors: 0,
                dax: s.dax,
            };
            agent.mount(&req).map_err(|source| Error::Mount { target: req.target.clone(), source })?;
            self.mounts.push(Mounted { target: req.target, volume: false });
        }
        self.keep_idle(agent);
        Ok(())
    }

    /// Has the agent mount `volumes`, the disks from index `first` on.
    fn mount_volumes(&mut self, first: usize, volumes: &[VolumeMount]) -> Result<()> {
        if volumes.is_empty() {
            return Ok(());
        }
        let mut agent = self.agent()?;
        for (i, v) in volumes.iter().enumerate() {
            let size = std::fs::metadata(&v.path)
                .map_err(|e| Error::Io { what: format!("reading {}", v.path.display()), source: e })?
                .len();
            let req = sm_agent::MountRequest {
                source: crate::volume::guest_disk_name(first + i),
                target: v.guest_path.clone(),
                fstype: "ext4".into(),
                read_only: v.read_only,
                expect_sectors: size / 512,
                dax: false,
            };
            agent.mount(&req).map_err(|source| Error::Mount { target: req.target.clone(), source })?;
            self.mounts.push(Mounted { target: req.target, volume: true });
        }
        self.keep_idle(agent);
        Ok(())
    }

    /// A snapshot of a guest with a volume mounted would hold its ext4 state
    /// (page cache, dirty pages, journal position) while the disk file goes on
    /// changing in later runs: a restore would corrupt the volume. Such VMs
    /// are refused; baked images get volumes in placeholder slots instead (see
    /// [`crate::Image::start`]). Shared directories are no reason: their FUSE
    /// session is part of the snapshot (node ids and open files reopened by
    /// path on restore, see `sm_fuse::persist`).
    pub(super) fn refuse_with_volumes(&self) -> Result<()> {
        let volumes: Vec<&str> = self.mounts.iter().filter(|m| m.volume).map(|m| m.target.as_str()).collect();
        if volumes.is_empty() {
            return Ok(());
        }
        Err(Error::Unsupported(format!(
            "a snapshot of a VM with volumes mounted ({}) would not restore safely (the guest's file-system state \
             of a disk that goes on changing); snapshot it without them (Image::start bakes them as empty slots)",
            volumes.join(", ")
        )))
    }

    /// Has the agent flush and unmount every mounted volume and share, last
    /// mounted first; bounded by [`FLUSH_TIMEOUT`] per request. A guest that
    /// does not answer (hung, or already stopped) is logged and skipped.
    pub(super) fn flush_mounts(&mut self) {
        let mounts = std::mem::take(&mut self.mounts);
        // A paused VM (after `snapshot`) cannot answer; an ended one is gone.
        if mounts.is_empty() || self.machine.exit_reason().is_some() || !self.machine.is_running() {
            return;
        }
        let flushed = self.connect(self.agent_port).and_then(|stream| {
            stream
                .set_read_timeout(Some(FLUSH_TIMEOUT))
                .map_err(|e| Error::Io { what: "agent socket".into(), source: e })?;
            let mut agent = AgentClient::connect(stream)?;
            for Mounted { target, .. } in mounts.iter().rev() {
                agent.unmount(target).map_err(|source| Error::Mount { target: target.clone(), source })?;
            }
            Ok(())
        });
        if let Err(e) = flushed {
            tracing::warn!("flushing the VM's volumes and shares before it stops: {e}");
        }
    }
}
