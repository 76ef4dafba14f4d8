//! Capabilities of a confined thread: none, or — for a thread that serves a
//! shared directory (its files keep the guest's owners and modes) — only
//! those file work as root needs. Dropped from the effective, permitted,
//! inheritable, ambient and bounding sets of the thread (capabilities are
//! per thread; threads it starts inherit them).

use caps::{CapSet, Capability, CapsHashSet};

use crate::SeccompError;

/// What a thread serving a share keeps when the VMM runs as root: chown to
/// the guest's owners, reach and change files whatever their owner and mode,
/// keep set-group-ID bits, write into a file system's reserved blocks (as
/// root does). Not kept: setting file capabilities or trusted.* xattrs.
const SHARE_CAPABILITIES: [Capability; 6] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SYS_RESOURCE,
];

/// Drops every capability of the calling thread but, with `serves_files`,
/// [`SHARE_CAPABILITIES`]. Also in a thread started by a confined one (a
/// device worker a vCPU thread starts at the driver's DRIVER_OK): `capset`
/// is allowed by the seccomp filter, since it can only lower the permitted
/// set, which is reduced before the filter is installed.
pub(crate) fn drop_capabilities(serves_files: bool) -> Result<(), SeccompError> {
    let keep: CapsHashSet = if serves_files { SHARE_CAPABILITIES.into_iter().collect() } else { CapsHashSet::new() };
    // The bounding set first: dropping from it needs CAP_SETPCAP, about to go.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    Ok(())
}
