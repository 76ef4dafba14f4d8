//! The warm pool: with `SM_SHIM_WARM_VMS` set in containerd's environment,
//! one shim process per containerd namespace serves every container of the
//! runtime, and a container's VM, once deleted, is reset in place to its
//! image's baked snapshot and kept running for the next container of that
//! image (a hand-over, not a restore: the guest is awake, its agent
//! answering). Without it, each container has a shim and a VM of its own.
//!
//! A pooled VM is the image's snapshot again when it is handed out: RAM,
//! devices and the guest's writable layer (a tmpfs overlay in guest RAM)
//! come back as baked, so nothing of the previous container is left.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sm_api::{Admission, Disk, Pool, PoolConfig, PooledVm};

use crate::error::{Result, ShimError};

/// Idle VMs kept per image (a count; unset or 0: no pool).
pub const WARM_VMS_ENV: &str = "SM_SHIM_WARM_VMS";
/// How long an idle VM stays warm, in seconds (default [`DEFAULT_WARM_SECONDS`]).
pub const WARM_SECONDS_ENV: &str = "SM_SHIM_WARM_SECONDS";
/// How long an idle VM stays warm when [`WARM_SECONDS_ENV`] is unset.
pub const DEFAULT_WARM_SECONDS: u64 = 60;
/// The most idle VMs per image a setting may ask for.
const MAX_WARM_VMS: usize = 64;
/// VMs of one image alive at once (in use and idle): far above what a host
/// runs; host memory is the real bound (a VM is refused, with an error
/// naming the shortfall, when fewer than [`MEMORY_RESERVE_MIB`] would remain).
const MAX_VMS_PER_IMAGE: usize = 4096;
/// Host memory left free when admitting another VM.
const MEMORY_RESERVE_MIB: u64 = 256;

/// The warm pool's settings, from the environment containerd gives its shims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmSettings {
    /// Idle VMs kept per image.
    pub vms: usize,
    /// How long an idle VM stays warm.
    pub idle: Duration,
}

impl WarmSettings {
    /// The settings in this process's environment; `None`: no pool.
    pub fn from_env() -> Result<Option<WarmSettings>> {
        let vms = std::env::var(WARM_VMS_ENV).ok();
        let seconds = std::env::var(WARM_SECONDS_ENV).ok();
        WarmSettings::parse(vms.as_deref(), seconds.as_deref())
    }

    fn parse(vms: Option<&str>, seconds: Option<&str>) -> Result<Option<WarmSettings>> {
        let vms = match vms.map(str::trim).filter(|v| !v.is_empty()) {
            None => return Ok(None),
            Some(v) => v.parse::<usize>().ok().filter(|n| *n <= MAX_WARM_VMS).ok_or_else(|| {
                ShimError::InvalidArgument(format!(
                    "{WARM_VMS_ENV}={v:?} in containerd's environment is not a count of idle VMs per image \
                     (0 to {MAX_WARM_VMS}; 0 or unset: no warm pool)"
                ))
            })?,
        };
        if vms == 0 {
            return Ok(None);
        }
        let idle = match seconds.map(str::trim).filter(|v| !v.is_empty()) {
            None => Duration::from_secs(DEFAULT_WARM_SECONDS),
            Some(v) => v.parse::<u64>().ok().filter(|s| *s > 0).map(Duration::from_secs).ok_or_else(|| {
                ShimError::InvalidArgument(format!(
                    "{WARM_SECONDS_ENV}={v:?} in containerd's environment is not a number of seconds above 0 \
                     (how long an idle VM stays warm)"
                ))
            })?,
        };
        Ok(Some(WarmSettings { vms, idle }))
    }
}

/// The pools of one shim process: one per baked snapshot (an image with a
/// memory size), made on its first use.
pub struct WarmPools {
    settings: WarmSettings,
    pools: Mutex<HashMap<PathBuf, Arc<Pool>>>,
}

impl WarmPools {
    /// No pools yet.
    pub fn new(settings: WarmSettings) -> WarmPools {
        WarmPools { settings, pools: Mutex::new(HashMap::new()) }
    }

    fn pools(&self) -> MutexGuard<'_, HashMap<PathBuf, Arc<Pool>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A running VM of `snapshot` (whose root disk is `disks`): an idle one
    /// of its pool, else one restored now. On an error the caller starts
    /// the VM as without a pool (which rebakes a snapshot that cannot be
    /// restored, at the same path: the pool restores the new one then).
    pub fn acquire(&self, snapshot: &Path, disks: &[Disk]) -> Result<(PooledVm, bool)> {
        let pool = self.pool(snapshot, disks)?;
        let hits = pool.stats().hits;
        let vm = pool.acquire()?;
        Ok((vm, pool.stats().hits > hits))
    }

    fn pool(&self, snapshot: &Path, disks: &[Disk]) -> Result<Arc<Pool>> {
        let mut pools = self.pools();
        if let Some(pool) = pools.get(snapshot) {
            return Ok(Arc::clone(pool));
        }
        let mut config = PoolConfig::new(snapshot.to_path_buf());
        config.min_idle = 0;
        config.max_idle = self.settings.vms;
        config.max = MAX_VMS_PER_IMAGE;
        config.idle_timeout = self.settings.idle;
        config.admission = Admission::Refuse;
        config.memory_reserve_mib = MEMORY_RESERVE_MIB;
        config.disks = disks.to_vec();
        let pool = Arc::new(Pool::new(sm_api::default_hypervisor()?, config)?);
        pools.insert(snapshot.to_path_buf(), Arc::clone(&pool));
        Ok(pool)
    }

    /// VMs alive in all pools (in use and idle); pools left with none, and
    /// in no Create's hands, are dropped.
    pub fn alive(&self) -> usize {
        let mut pools = self.pools();
        pools.retain(|_, pool| pool.stats().alive > 0 || Arc::strong_count(pool) > 1);
        pools.values().map(|pool| pool.stats().alive).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_two_variables_and_name_a_bad_value() {
        assert_eq!(WarmSettings::parse(None, Some("5")).unwrap(), None, "no count: no pool");
        assert_eq!(WarmSettings::parse(Some("0"), None).unwrap(), None, "0: no pool");
        assert_eq!(
            WarmSettings::parse(Some("2"), None).unwrap(),
            Some(WarmSettings { vms: 2, idle: Duration::from_secs(DEFAULT_WARM_SECONDS) })
        );
        assert_eq!(
            WarmSettings::parse(Some(" 1 "), Some("5")).unwrap(),
            Some(WarmSettings { vms: 1, idle: Duration::from_secs(5) })
        );
        for (vms, seconds, named) in [
            ("two", "5", WARM_VMS_ENV),
            ("65", "5", WARM_VMS_ENV),
            ("1", "0", WARM_SECONDS_ENV),
            ("1", "-3", WARM_SECONDS_ENV),
        ] {
            let e = WarmSettings::parse(Some(vms), Some(seconds)).unwrap_err().to_string();
            assert!(e.contains(named), "{vms}/{seconds}: {e}");
        }
    }
}
