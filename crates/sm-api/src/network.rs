//! A VM's network: none (loopback only, the default) or virtio-net to a passt
//! process of its own, behind the VM's egress policy.

use std::net::SocketAddrV4;
use std::path::Path;
use std::sync::Arc;

use sm_net::addressing::{DNS, GATEWAY, GUEST_IP, GUEST_MAC, MTU, PREFIX_LEN};
use sm_net::{DnsRelay, EgressFilter, Passt, PasstOptions};
use sm_virtio::net::{Net, NetConfig};

pub use sm_net::policy::{Action, Rule, Target, HOST_INTERNAL};
pub use sm_net::{EgressPolicy, EgressStats, NetError, PolicyError, PublishedPort, TlsIdentity};

use crate::Result;

/// How a VM reaches the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Network {
    /// Only loopback inside the guest.
    #[default]
    None,
    /// virtio-net to a passt process of the VM's own (rootless): the guest is
    /// 10.0.2.15/24 behind the gateway 10.0.2.2 (`host.supermachine.internal`,
    /// the host's loopback), with DNS at 10.0.2.3 forwarded to the host's
    /// resolver. What the guest may reach is [`PasstNetwork::egress`].
    Passt(PasstNetwork),
}

/// Settings of [`Network::Passt`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasstNetwork {
    /// Enforced on every frame the guest sends, in the VMM. The default policy
    /// allows public addresses and denies loopback, private and link-local
    /// ranges (cloud metadata included) and `host.supermachine.internal`.
    pub egress: EgressPolicy,
    /// Host TCP ports forwarded into the guest (`-p`); port 0 picks a free one
    /// ([`crate::Vm::published_ports`] tells which). A `/tls` port
    /// terminates TLS on the host with [`PasstNetwork::tls`] and forwards
    /// plain TCP to the guest.
    pub publish: Vec<PublishedPort>,
    /// The certificate of `/tls` ports; `None`: a self-signed one made when
    /// the VM starts (its fingerprint is logged). Keep one with
    /// [`TlsIdentity::load_or_create_self_signed`] for clients to trust.
    pub tls: Option<Arc<TlsIdentity>>,
    /// The resolver (address and port) the guest's DNS queries are relayed
    /// to by the VMM; default: the first IPv4 nameserver of the host's
    /// /etc/resolv.conf, port 53.
    pub dns: Option<SocketAddrV4>,
}

/// A VM's running network back end; dropped after its device.
pub(crate) struct NetworkBackend {
    _passt: Passt,
    pub(crate) stats: Arc<EgressStats>,
    pub(crate) published: Vec<PublishedPort>,
}

/// The device, its back end and the kernel command-line word for the agent.
pub(crate) fn start(network: &Network) -> Result<Option<(Box<Net>, NetworkBackend, String)>> {
    let Network::Passt(settings) = network else { return Ok(None) };
    let published = settings.publish.iter().map(|p| p.resolve()).collect::<std::result::Result<Vec<_>, _>>()?;
    let tls = match &settings.tls {
        Some(identity) => Some(identity.clone()),
        None if published.iter().any(|p| p.tls) => {
            let (identity, _, _) = TlsIdentity::self_signed()?;
            tracing::info!(
                fingerprint = identity.fingerprint(),
                "TLS on published ports: a new self-signed certificate"
            );
            Some(Arc::new(identity))
        }
        None => None,
    };
    let options = PasstOptions {
        // The gateway reaches the host's loopback; the egress filter in front
        // of passt denies it unless the policy allows it.
        map_host_loopback: true,
        publish: published.clone(),
        tls,
        ..PasstOptions::default()
    };
    let upstream = settings.dns.or_else(|| {
        sm_net::dns_relay::first_nameserver(Path::new("/etc/resolv.conf")).map(|a| SocketAddrV4::new(a, 53))
    });
    if upstream.is_none() {
        tracing::warn!(
            "no IPv4 nameserver in /etc/resolv.conf: the guest's DNS goes to passt, name rules learn nothing"
        );
    }
    let relay = upstream.map(DnsRelay::new).transpose().map_err(sm_net::NetError::Socket)?;
    let (passt, stream) = Passt::spawn(&options)?;
    let guest_ports = published.iter().map(|p| p.guest_port).collect();
    let mut filter =
        EgressFilter::new(stream, settings.egress.clone(), guest_ports, relay).map_err(sm_net::NetError::Socket)?;
    filter.announce(GUEST_MAC, GUEST_IP).map_err(sm_net::NetError::Socket)?;
    let stats = filter.stats();
    let device = Net::new(NetConfig { mac: GUEST_MAC, mtu: MTU }, Box::new(filter))?;
    let cmdline = format!("sm.net={GUEST_IP}/{PREFIX_LEN},{GATEWAY},{DNS}");
    Ok(Some((Box::new(device), NetworkBackend { _passt: passt, stats, published }, cmdline)))
}
