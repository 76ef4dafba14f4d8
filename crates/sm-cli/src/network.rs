//! `run`'s network flags: `--network none|passt|tap:NAME`, `--egress`, `-p/--publish` (with `/tls`
//! and its certificate), `--dns`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use sm_api::TlsIdentity;

/// The guest's network (`run`).
#[derive(Args)]
pub struct NetworkArgs {
    /// none (loopback only; the default), passt: virtio-net to a passt
    /// process of the VM's own (rootless; Debian package passt), the guest
    /// 10.0.2.15 behind 10.0.2.2, which is also host.supermachine.internal (the
    /// host's loopback), or tap:NAME: virtio-net to an existing TAP interface
    /// (10.0.2.2/24 on its host side; routing beyond it is the host's). The
    /// egress policy applies to both. --egress, -p and --dns imply passt;
    /// with --network none, -p ports are tunnelled through the agent over
    /// vsock (plain TCP, no network device in the guest).
    #[arg(long, value_parser = parse_mode, value_name = "none|passt|tap:NAME")]
    network: Option<NetworkMode>,
    /// Egress rule, repeatable, first match wins: allow=HOST|CIDR[:PORT],
    /// deny=HOST|CIDR[:PORT], or deny-all. After the rules: public addresses
    /// allowed; loopback, private, link-local (cloud metadata) and
    /// host.supermachine.internal denied. HOST may be *.DOMAIN; a name's
    /// addresses are learned from the guest's DNS answers.
    #[arg(long = "egress", value_name = "RULE")]
    egress: Vec<String>,
    /// Publish a guest TCP port: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/tls] (host
    /// IP 127.0.0.1 by default; HOSTPORT 0 picks a free one, printed at
    /// start). /tls terminates TLS on the host (--tls-cert/--tls-key, else a
    /// self-signed certificate kept in $SUPERMACHINE_HOME/tls, its path and
    /// fingerprint printed) and forwards plain TCP to the guest.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    publish: Vec<String>,
    /// PEM certificate chain (leaf first) for -p .../tls ports.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The resolver the guest's DNS is relayed to, ADDR[:PORT] (default: the
    /// host's first nameserver).
    #[arg(long, value_name = "ADDR[:PORT]")]
    dns: Option<String>,
}

/// `--network` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// Loopback only.
    None,
    /// virtio-net to passt, under the egress policy.
    Passt,
    /// virtio-net to this TAP interface, under the egress policy.
    Tap(String),
}

fn parse_mode(s: &str) -> std::result::Result<NetworkMode, String> {
    match s {
        "none" => Ok(NetworkMode::None),
        "passt" => Ok(NetworkMode::Passt),
        _ => match s.strip_prefix("tap:") {
            Some(name) if !name.is_empty() => Ok(NetworkMode::Tap(name.to_string())),
            _ => Err("expected none, passt or tap:NAME".into()),
        },
    }
}

/// What `run` sets up: the VM's network, and the ports to publish over
/// vsock through the agent (`--network none -p ...`).
pub struct NetworkChoice {
    /// The VM's network.
    pub network: sm_api::Network,
    /// Published without a network device ([`sm_api::Vm::forward_port`]).
    pub vsock_ports: Vec<sm_api::PublishedPort>,
}

impl NetworkArgs {
    /// The network these flags ask for.
    pub fn network(&self) -> Result<NetworkChoice> {
        let none = |vsock_ports| Ok(NetworkChoice { network: sm_api::Network::None, vsock_ports });
        let implied =
            !self.egress.is_empty() || !self.publish.is_empty() || self.dns.is_some() || self.tls_cert.is_some();
        match &self.network {
            Some(NetworkMode::None) if !self.egress.is_empty() || self.dns.is_some() => {
                bail!("--egress and --dns need a network: drop --network none (or use --network passt)")
            }
            Some(NetworkMode::None) if self.tls_cert.is_some() => {
                bail!("/tls ports need --network passt (without a network, ports are plain TCP over vsock)")
            }
            Some(NetworkMode::None) => return none(self.published_ports()?),
            None if !implied => return none(Vec::new()),
            _ => {}
        }
        let egress = sm_api::EgressPolicy::parse(&self.egress)?;
        let dns = self.dns.as_deref().map(parse_resolver).transpose()?;
        if let Some(NetworkMode::Tap(name)) = &self.network {
            if !self.publish.is_empty() {
                bail!("-p needs --network passt: on a TAP the guest is reached at 10.0.2.15 through {name}");
            }
            if self.tls_cert.is_some() {
                bail!("--tls-cert is for -p HOSTPORT:GUESTPORT/tls ports, which need --network passt");
            }
            let network = sm_api::Network::Tap(sm_api::TapNetwork { name: name.clone(), egress, dns });
            return Ok(NetworkChoice { network, vsock_ports: Vec::new() });
        }
        let publish = self.published_ports()?;
        let tls = if publish.iter().any(|p| p.tls) {
            let identity = self.tls_identity()?;
            eprintln!(
                "supermachine: TLS certificate {} (SHA-256 {})",
                identity.source().display(),
                identity.fingerprint()
            );
            Some(Arc::new(identity))
        } else if self.tls_cert.is_some() {
            bail!("--tls-cert is for -p HOSTPORT:GUESTPORT/tls ports, and none is published");
        } else {
            None
        };
        let network = sm_api::Network::Passt(sm_api::PasstNetwork { egress, publish, tls, dns });
        Ok(NetworkChoice { network, vsock_ports: Vec::new() })
    }

    /// The `-p` ports, checked here, before anything is pulled or booted: a
    /// taken host port fails at once (port 0 is picked again when the VM
    /// starts).
    fn published_ports(&self) -> Result<Vec<sm_api::PublishedPort>> {
        let ports = self
            .publish
            .iter()
            .map(|p| {
                let port = sm_api::PublishedPort::parse(p)?;
                port.resolve()?;
                Ok(port)
            })
            .collect::<std::result::Result<Vec<_>, sm_api::NetError>>()?;
        if self.network == Some(NetworkMode::None) && ports.iter().any(|p| p.tls) {
            bail!("/tls ports need --network passt (without a network, ports are plain TCP over vsock)");
        }
        Ok(ports)
    }

    /// The certificate of `/tls` ports: the given files, or the self-signed
    /// one kept beside the image store.
    fn tls_identity(&self) -> Result<TlsIdentity> {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            return Ok(TlsIdentity::from_pem_files(cert, key)?);
        }
        let dir = tls_dir();
        TlsIdentity::load_or_create_self_signed(&dir)
            .with_context(|| format!("the self-signed certificate for -p .../tls in {}", dir.display()))
    }
}

/// `$SUPERMACHINE_HOME/tls` (beside the image store).
fn tls_dir() -> PathBuf {
    let images = sm_api::oci::Store::default_root();
    images.parent().unwrap_or(Path::new(".")).join("tls")
}

/// `ADDR` or `ADDR:PORT` (port 53 by default).
fn parse_resolver(s: &str) -> Result<std::net::SocketAddrV4> {
    if let Ok(a) = s.parse::<std::net::SocketAddrV4>() {
        return Ok(a);
    }
    let addr = s.parse::<std::net::Ipv4Addr>().with_context(|| format!("--dns {s:?}: expected IPV4ADDR[:PORT]"))?;
    Ok(std::net::SocketAddrV4::new(addr, 53))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_modes_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_mode("none"), Ok(NetworkMode::None));
        assert_eq!(parse_mode("passt"), Ok(NetworkMode::Passt));
        assert_eq!(parse_mode("tap:tap0"), Ok(NetworkMode::Tap("tap0".into())));
        for bad in ["tap:", "tap", "bridge", ""] {
            assert_eq!(parse_mode(bad), Err("expected none, passt or tap:NAME".to_string()), "{bad:?}");
        }
    }
}
