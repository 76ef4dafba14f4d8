//! The egress policy: which destinations a guest may reach.
//!
//! The guest's resolver (10.0.2.3:53) is allowed before any rule (under
//! `deny-all` only when a host-name rule needs it, and then only for the names
//! of the rules: see [`crate::filter`]). Rules are tried in order and the
//! first that matches decides; after them the
//! default applies: public addresses are allowed; loopback, private ranges,
//! link-local (cloud metadata at 169.254.169.254 included), carrier-grade NAT,
//! multicast and reserved ranges are denied — the gateway
//! (`host.supermachine.internal`, which reaches the host's loopback) as well.
//! `deny-all` makes the default a denial of everything.
//!
//! A rule names a CIDR (`10.1.0.0/16`, a bare address is a /32) or a host name
//! (`pypi.org`, or `*.example.com` for every name below it), optionally with a
//! port. A name's addresses are learned from the DNS answers the guest gets from
//! the forwarded resolver (see [`crate::filter`]); `host.supermachine.internal`
//! always stands for the gateway.

use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;

use crate::addressing::{DNS, GATEWAY};

/// The name the guest reaches the host's loopback by.
pub const HOST_INTERNAL: &str = "host.supermachine.internal";

/// Ranges the default denies.
const DENIED_BY_DEFAULT: [(Ipv4Net, &str); 10] = [
    (net(0, 0, 0, 0, 8), "this-network"),
    (net(10, 0, 0, 0, 8), "private"),
    (net(100, 64, 0, 0, 10), "carrier-grade NAT"),
    (net(127, 0, 0, 0, 8), "loopback"),
    (net(169, 254, 0, 0, 16), "link-local / cloud metadata"),
    (net(172, 16, 0, 0, 12), "private"),
    (net(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (net(192, 168, 0, 0, 16), "private"),
    (net(224, 0, 0, 0, 4), "multicast"),
    (net(240, 0, 0, 0, 4), "reserved / broadcast"),
];

/// `a.b.c.d/prefix`, checked at compile time.
const fn net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

/// What a rule does to what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let it through.
    Allow,
    /// Refuse it (TCP reset, ICMP unreachable otherwise).
    Deny,
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An IPv4 network.
    Cidr(Ipv4Net),
    /// A host name, lower case, without a trailing dot; `*.` in front matches
    /// every name below it (not the name itself).
    Host(String),
}

/// One `allow=` or `deny=` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// The destination.
    pub target: Target,
    /// Only this destination port (TCP or UDP); all ports when `None`.
    pub port: Option<u16>,
}

/// A guest's egress policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Tried in order, first match wins.
    pub rules: Vec<Rule>,
    /// After the rules, deny everything (instead of allowing public addresses).
    pub deny_all: bool,
}

/// A rule or policy that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("egress rule {rule:?}: {reason} (expected allow=HOST|CIDR[:PORT], deny=HOST|CIDR[:PORT] or deny-all)")]
pub struct PolicyError {
    /// The rule as given.
    pub rule: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Why a destination was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Rule number (from 0) in the policy.
    Rule(usize),
    /// The forwarded DNS resolver, which name rules need.
    Resolver,
    /// The default for public addresses.
    Public,
    /// The default denies this range (its description).
    Range(&'static str),
    /// `deny-all`.
    DenyAll,
}

/// A decision and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Allowed or denied.
    pub action: Action,
    /// Why.
    pub reason: Reason,
}

impl FromStr for Rule {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Rule, PolicyError> {
        let err = |reason: &str| PolicyError { rule: s.to_string(), reason: reason.to_string() };
        let (action, rest) = match s.split_once('=') {
            Some(("allow", rest)) => (Action::Allow, rest),
            Some(("deny", rest)) => (Action::Deny, rest),
            _ => return Err(err("it must start with allow= or deny=")),
        };
        let (dest, port) = match rest.rsplit_once(':') {
            Some((dest, port)) if !dest.contains(':') => {
                let port = port.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| err("bad port"))?;
                (dest, Some(port))
            }
            Some(_) => return Err(err("IPv6 is not supported: the guest network is IPv4 only")),
            None => (rest, None),
        };
        if dest.is_empty() {
            return Err(err("no destination"));
        }
        let target = if dest.starts_with(|c: char| c.is_ascii_digit()) {
            let net = if dest.contains('/') {
                dest.parse::<Ipv4Net>().map_err(|e| err(&format!("bad CIDR: {e}")))?
            } else {
                Ipv4Net::from(dest.parse::<Ipv4Addr>().map_err(|e| err(&format!("bad address: {e}")))?)
            };
            Target::Cidr(net.trunc())
        } else {
            let name = dest.trim_end_matches('.').to_ascii_lowercase();
            let bare = name.strip_prefix("*.").unwrap_or(&name);
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !l.starts_with('-')
            };
            if bare.len() > 253 || !bare.split('.').all(label_ok) {
                return Err(err("bad host name"));
            }
            Target::Host(name)
        };
        Ok(Rule { action, target, port })
    }
}

impl EgressPolicy {
    /// A policy from `--egress` values: `allow=...`, `deny=...`, `deny-all`.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<EgressPolicy, PolicyError> {
        let mut policy = EgressPolicy::default();
        for a in args {
            match a.as_ref() {
                "deny-all" => policy.deny_all = true,
                rule => policy.rules.push(rule.parse()?),
            }
        }
        Ok(policy)
    }

    /// Whether some rule can allow destinations by host name (other than the
    /// gateway's fixed name), so DNS must work.
    pub fn needs_resolver(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.action == Action::Allow && matches!(&r.target, Target::Host(h) if h != HOST_INTERNAL))
    }

    /// The host-name rules (index, pattern) whose addresses come from DNS.
    pub fn name_rules(&self) -> impl Iterator<Item = (usize, &str)> {
        self.rules.iter().enumerate().filter_map(|(i, r)| match &r.target {
            Target::Host(h) if h != HOST_INTERNAL => Some((i, h.as_str())),
            _ => None,
        })
    }

    /// Decides for a destination. `port` is the TCP/UDP destination port
    /// (`None` for other protocols and for IP fragments after the first);
    /// `learned(rule, addr)` tells whether DNS gave `addr` for host rule `rule`.
    pub fn decide(&self, dst: Ipv4Addr, port: Option<u16>, learned: impl Fn(usize, Ipv4Addr) -> bool) -> Verdict {
        // The guest's resolver first: a rule like deny=10.0.0.0/8 is meant for
        // networks, not for DNS (which goes to the host's resolver). Under
        // deny-all it works only when a name rule needs it.
        if dst == DNS && port == Some(53) && (!self.deny_all || self.needs_resolver()) {
            return Verdict { action: Action::Allow, reason: Reason::Resolver };
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.port.is_some() && rule.port != port {
                continue;
            }
            let hit = match &rule.target {
                Target::Cidr(net) => net.contains(&dst),
                Target::Host(h) if h == HOST_INTERNAL => dst == GATEWAY,
                Target::Host(_) => learned(i, dst),
            };
            if hit {
                return Verdict { action: rule.action, reason: Reason::Rule(i) };
            }
        }
        if self.deny_all {
            return Verdict { action: Action::Deny, reason: Reason::DenyAll };
        }
        match denied_range(dst) {
            Some(what) => Verdict { action: Action::Deny, reason: Reason::Range(what) },
            None => Verdict { action: Action::Allow, reason: Reason::Public },
        }
    }
}

/// The description of the default-denied range `addr` is in, if any.
pub fn denied_range(addr: Ipv4Addr) -> Option<&'static str> {
    DENIED_BY_DEFAULT.iter().find_map(|(net, what)| net.contains(&addr).then_some(*what))
}

/// Whether host-name pattern `pattern` (from a rule) matches `name` (from DNS,
/// any case, trailing dot allowed).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(parent) => {
            name.len() > parent.len() + 1 && name.ends_with(parent) && {
                let cut = name.len() - parent.len();
                name.as_bytes()[cut - 1] == b'.'
            }
        }
        None => name == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(args: &[&str]) -> EgressPolicy {
        EgressPolicy::parse(args).unwrap()
    }

    fn action(p: &EgressPolicy, dst: [u8; 4], port: Option<u16>) -> Action {
        p.decide(Ipv4Addr::from(dst), port, |_, _| false).action
    }

    #[test]
    fn default_allows_public_and_denies_private_loopback_metadata_and_the_gateway() {
        let p = EgressPolicy::default();
        assert_eq!(action(&p, [93, 184, 216, 34], Some(443)), Action::Allow);
        for denied in [[127, 0, 0, 1], [10, 1, 2, 3], [172, 20, 0, 1], [192, 168, 1, 1], [169, 254, 169, 254]] {
            assert_eq!(action(&p, denied, Some(80)), Action::Deny, "{denied:?}");
        }
        assert_eq!(action(&p, GATEWAY.octets(), Some(80)), Action::Deny);
        assert_eq!(action(&p, [224, 0, 0, 251], Some(5353)), Action::Deny);
        assert_eq!(action(&p, [255, 255, 255, 255], Some(67)), Action::Deny);
        // The forwarded resolver works by default.
        assert_eq!(p.decide(DNS, Some(53), |_, _| false).reason, Reason::Resolver);
        assert_eq!(action(&p, DNS.octets(), Some(80)), Action::Deny);
    }

    #[test]
    fn first_match_wins_and_ports_narrow_a_rule() {
        let p = policy(&["deny=93.184.0.0/16:443", "allow=10.9.0.0/16", "allow=host.supermachine.internal:8080"]);
        assert_eq!(action(&p, [93, 184, 1, 1], Some(443)), Action::Deny);
        assert_eq!(action(&p, [93, 184, 1, 1], Some(80)), Action::Allow);
        assert_eq!(action(&p, [10, 9, 3, 4], Some(22)), Action::Allow);
        assert_eq!(action(&p, [10, 8, 3, 4], Some(22)), Action::Deny);
        assert_eq!(action(&p, GATEWAY.octets(), Some(8080)), Action::Allow);
        assert_eq!(action(&p, GATEWAY.octets(), Some(8081)), Action::Deny);
        // A fragment without ports is not matched by a port rule.
        assert_eq!(action(&p, [93, 184, 1, 1], None), Action::Allow);
    }

    #[test]
    fn deny_all_keeps_allows_and_dns_only_when_names_need_it() {
        let p = policy(&["deny-all", "allow=1.1.1.1"]);
        assert_eq!(action(&p, [1, 1, 1, 1], Some(443)), Action::Allow);
        assert_eq!(action(&p, [8, 8, 8, 8], Some(443)), Action::Deny);
        assert_eq!(action(&p, DNS.octets(), Some(53)), Action::Deny, "no name rule: DNS would only leak");
        let p = policy(&["deny-all", "allow=pypi.org"]);
        assert_eq!(action(&p, DNS.octets(), Some(53)), Action::Allow);
        let learned = |rule: usize, a: Ipv4Addr| rule == 0 && a == Ipv4Addr::new(151, 101, 0, 223);
        assert_eq!(p.decide(Ipv4Addr::new(151, 101, 0, 223), Some(443), learned).action, Action::Allow);
        assert_eq!(p.decide(Ipv4Addr::new(151, 101, 0, 224), Some(443), learned).action, Action::Deny);
    }

    #[test]
    fn the_resolver_is_not_caught_by_a_network_rule() {
        let p = policy(&["deny=10.0.0.0/8"]);
        assert_eq!(p.decide(DNS, Some(53), |_, _| false).reason, Reason::Resolver);
        assert_eq!(action(&p, [10, 0, 2, 2], Some(53)), Action::Deny);
    }

    #[test]
    fn rules_parse_and_bad_ones_name_the_problem() {
        let r: Rule = "allow=Example.COM.:443".parse().unwrap();
        assert_eq!(r, Rule { action: Action::Allow, target: Target::Host("example.com".into()), port: Some(443) });
        let r: Rule = "deny=10.1.2.3/8".parse().unwrap();
        assert_eq!(r.target, Target::Cidr("10.0.0.0/8".parse().unwrap()));
        let r: Rule = "deny=169.254.169.254".parse().unwrap();
        assert_eq!(r.target, Target::Cidr("169.254.169.254/32".parse().unwrap()));
        for (bad, why) in [
            ("permit=1.2.3.4", "allow= or deny="),
            ("allow=1.2.3.4:0", "bad port"),
            ("allow=1.2.3.4:99999", "bad port"),
            ("allow=1.2.3.400", "bad address"),
            ("allow=1.2.3.0/33", "bad CIDR"),
            ("allow=[::1]:80", "IPv6"),
            ("allow=bad_host!", "bad host name"),
            ("allow=", "no destination"),
        ] {
            let e = bad.parse::<Rule>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn name_patterns() {
        assert!(name_matches("pypi.org", "PyPI.org."));
        assert!(!name_matches("pypi.org", "files.pypi.org"));
        assert!(name_matches("*.pypi.org", "files.pypi.org"));
        assert!(!name_matches("*.pypi.org", "pypi.org"));
        assert!(!name_matches("*.pypi.org", "evilpypi.org"));
    }
}
