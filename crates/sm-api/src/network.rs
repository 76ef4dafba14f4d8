//! A VM's network: none (loopback only, the default), virtio-net to a passt
//! process of its own, or to a TAP interface the host prepared — behind the
//! VM's egress policy either way.

use std::net::SocketAddrV4;
use std::path::Path;
use std::sync::Arc;

use sm_net::addressing::{DNS, GATEWAY, GUEST_IP, GUEST_MAC, MTU, PREFIX_LEN};
use sm_net::{DnsRelay, EgressFilter, Passt, PasstOptions, Tap};
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
    /// virtio-net to an existing TAP interface (made by an administrator:
    /// `ip tuntap add NAME mode tap user USER`, 10.0.2.2/24 on it, routing or
    /// NAT beyond it as the host needs). The guest has the same addressing
    /// as with passt; the host side of the TAP is its gateway. No published
    /// ports: the guest is reachable at 10.0.2.15 through the TAP.
    Tap(TapNetwork),
}

/// Settings of [`Network::Tap`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapNetwork {
    /// The interface name.
    pub name: String,
    /// Enforced on every frame the guest sends, as with passt.
    pub egress: EgressPolicy,
    /// The resolver the guest's DNS (10.0.2.3) is relayed to; default: the
    /// host's first IPv4 nameserver.
    pub dns: Option<SocketAddrV4>,
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
    /// The passt process (none on a TAP).
    _passt: Option<Passt>,
    pub(crate) stats: Arc<EgressStats>,
    pub(crate) published: Vec<PublishedPort>,
}

/// The device, its back end and the kernel command-line word for the agent.
pub(crate) fn start(network: &Network) -> Result<Option<(Box<Net>, NetworkBackend, String)>> {
    match network {
        Network::None => Ok(None),
        Network::Passt(settings) => start_passt(settings).map(Some),
        Network::Tap(settings) => start_tap(settings).map(Some),
    }
}

/// The DNS relay to `dns`, else to the host's first nameserver.
fn dns_relay(dns: Option<SocketAddrV4>) -> Option<DnsRelay> {
    let upstream = dns.or_else(|| {
        sm_net::dns_relay::first_nameserver(Path::new("/etc/resolv.conf")).map(|a| SocketAddrV4::new(a, 53))
    });
    if upstream.is_none() {
        tracing::warn!(
            "no IPv4 nameserver in /etc/resolv.conf: the guest's DNS is not relayed, name rules learn nothing"
        );
    }
    let upstream = upstream?;
    match DnsRelay::new(upstream) {
        Ok(relay) => Some(relay),
        Err(e) => {
            // No route to it from here (a namespace without one, say): the
            // VM still starts; its DNS is refused and name rules learn nothing.
            tracing::warn!("cannot relay the guest's DNS to {upstream}: {e}");
            None
        }
    }
}

/// The kernel command-line word the agent configures eth0 from.
fn agent_cmdline() -> String {
    format!("sm.net={GUEST_IP}/{PREFIX_LEN},{GATEWAY},{DNS}")
}

fn start_tap(settings: &TapNetwork) -> Result<(Box<Net>, NetworkBackend, String)> {
    let tap = Tap::open(&settings.name, MTU)?;
    let relay = dns_relay(settings.dns);
    let mut filter =
        EgressFilter::new(tap, settings.egress.clone(), Vec::new(), relay).map_err(sm_net::NetError::Socket)?;
    filter.answer_resolver_arp();
    filter.announce(GUEST_MAC, GUEST_IP).map_err(sm_net::NetError::Socket)?;
    let stats = filter.stats();
    let device = Net::new(NetConfig { mac: GUEST_MAC, mtu: MTU }, Box::new(filter))?;
    Ok((Box::new(device), NetworkBackend { _passt: None, stats, published: Vec::new() }, agent_cmdline()))
}

fn start_passt(settings: &PasstNetwork) -> Result<(Box<Net>, NetworkBackend, String)> {
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
    let relay = dns_relay(settings.dns);
    let (passt, stream) = Passt::spawn(&options)?;
    let guest_ports = published.iter().map(|p| p.guest_port).collect();
    let mut filter =
        EgressFilter::new(stream, settings.egress.clone(), guest_ports, relay).map_err(sm_net::NetError::Socket)?;
    filter.announce(GUEST_MAC, GUEST_IP).map_err(sm_net::NetError::Socket)?;
    let stats = filter.stats();
    let device = Net::new(NetConfig { mac: GUEST_MAC, mtu: MTU }, Box::new(filter))?;
    Ok((Box::new(device), NetworkBackend { _passt: Some(passt), stats, published }, agent_cmdline()))
}
