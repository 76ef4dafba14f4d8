//! Volumes and shared directories of a running VM: mounted by the agent when
//! the VM comes up, flushed and unmounted before it stops, and the reason a
//! VM with mounts is not snapshotted.

use std::time::Duration;

use sm_agent::AgentClient;

use super::Vm;
use crate::share::ShareMount;
use crate::volume::VolumeMount;
use crate::{Error, Result};

/// How long the guest may take to flush one mount before the VM stops.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

impl Vm {
    /// Has the agent mount the shared directories (virtio-fs tags by slot).
    pub(super) fn mount_shares(&mut self, shares: &[ShareMount]) -> Result<()> {
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
            };
            agent.mount(&req).map_err(|source| Error::Mount { target: req.target.clone(), source })?;
            self.mounts.push(req.target);
        }
        Ok(())
    }

    /// Has the agent mount `volumes`, the disks from index `first` on.
    pub(super) fn mount_volumes(&mut self, first: usize, volumes: &[VolumeMount]) -> Result<()> {
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
            };
            agent.mount(&req).map_err(|source| Error::Mount { target: req.target.clone(), source })?;
            self.mounts.push(req.target);
        }
        Ok(())
    }

    /// A snapshot of a guest with volumes or shares mounted would hold their
    /// file-system state (page cache, journal position, FUSE node ids) while
    /// the files go on changing: a restore would corrupt a volume or see stale
    /// nodes. Such VMs are refused; baked images get volumes and shares in
    /// placeholder slots instead (see [`crate::Image::start`]).
    pub(super) fn refuse_with_mounts(&self) -> Result<()> {
        if self.mounts.is_empty() {
            return Ok(());
        }
        Err(Error::Unsupported(format!(
            "a snapshot of a VM with volumes or shared directories mounted ({}) would not restore safely; \
             snapshot it without them (Image::start bakes them as empty slots)",
            self.mounts.join(", ")
        )))
    }

    /// Has the agent flush and unmount every mounted volume and share, last
    /// mounted first; bounded by [`FLUSH_TIMEOUT`] per request. A guest that
    /// does not answer (hung, or already stopped) is logged and skipped.
    pub(super) fn flush_mounts(&mut self) {
        let mounts = std::mem::take(&mut self.mounts);
        if mounts.is_empty() || self.machine.exit_reason().is_some() {
            return;
        }
        let flushed = self.connect(self.agent_port).and_then(|stream| {
            stream
                .set_read_timeout(Some(FLUSH_TIMEOUT))
                .map_err(|e| Error::Io { what: "agent socket".into(), source: e })?;
            let mut agent = AgentClient::connect(stream)?;
            for target in mounts.iter().rev() {
                agent.unmount(target).map_err(|source| Error::Mount { target: target.clone(), source })?;
            }
            Ok(())
        });
        if let Err(e) = flushed {
            tracing::warn!("flushing the VM's volumes and shares before it stops: {e}");
        }
    }
}
