//! The targets, one module per component.

mod agent;
mod fuse;
mod kvm;
mod net;
mod oci;
mod snapshot;
mod virtio;

use crate::Target;

/// Every target.
pub fn all() -> Vec<Target> {
    vec![
        agent::frames(),
        snapshot::file(),
        kvm::state(),
        oci::manifest(),
        oci::config(),
        oci::names(),
        oci::layer(),
        fuse::request(),
        fuse::session(),
        net::egress_frames(),
        net::egress_rules(),
        net::passt_stream(),
        virtio::mmio(),
        virtio::mmio_rng(),
        virtio::mmio_balloon(),
        virtio::mmio_vsock(),
        virtio::mmio_net(),
        virtio::state(),
    ]
}
