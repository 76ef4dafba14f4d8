//! A VM's network: none (loopback only, the default) or virtio-net to a passt
//! process of its own.

use sm_net::addressing::{DNS, GATEWAY, GUEST_IP, GUEST_MAC, MTU, PREFIX_LEN};
use sm_net::{Passt, PasstOptions};
use sm_virtio::net::{Net, NetConfig};

use crate::Result;

/// How a VM reaches the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Network {
    /// Only loopback inside the guest.
    #[default]
    None,
    /// virtio-net to a passt process of the VM's own (rootless): the guest is
    /// 10.0.2.15/24 behind the gateway 10.0.2.2, with DNS at 10.0.2.3 forwarded
    /// to the host's resolver, and reaches what the host reaches. No egress
    /// policy is enforced yet: use it for trusted workloads only.
    Passt(PasstNetwork),
}

/// Settings of [`Network::Passt`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasstNetwork {
    /// The gateway (`host.supermachine.internal` in the guest) reaches the
    /// host's loopback; off by default.
    pub host_loopback: bool,
}

/// A VM's running network back end; dropped after its device.
pub(crate) struct NetworkBackend {
    _passt: Passt,
}

/// The device, its back end and the kernel command-line word for the agent.
pub(crate) fn start(network: &Network) -> Result<Option<(Box<Net>, NetworkBackend, String)>> {
    let Network::Passt(settings) = network else { return Ok(None) };
    let options = PasstOptions { map_host_loopback: settings.host_loopback, ..PasstOptions::default() };
    let (passt, stream) = Passt::spawn(&options)?;
    let device = Net::new(NetConfig { mac: GUEST_MAC, mtu: MTU }, Box::new(stream))?;
    let cmdline = format!("sm.net={GUEST_IP}/{PREFIX_LEN},{GATEWAY},{DNS}");
    Ok(Some((Box::new(device), NetworkBackend { _passt: passt }, cmdline)))
}
