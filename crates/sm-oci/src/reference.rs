//! Image references, parsed like docker does.
//!
//! `busybox` is `docker.io/library/busybox:latest`; `user/app:1.2` is
//! `docker.io/user/app:1.2`; the first path component names a registry when it
//! contains `.` or `:` or is `localhost` (`localhost:5000/app@sha256:...`,
//! `127.0.0.1:5000/a/b:tag`, `ghcr.io/o/r`).
//!
//! Why not `oci_client::Reference` (which is oci-spec's
//! `distribution::Reference`): it agrees with this parser on the defaults,
//! the registry rule, repository and tag grammar and display, but falls short
//! where a user types a reference: it cannot parse IPv6 registries
//! (`[::1]:5000/x`), takes any port (`localhost:99999/x`) and host
//! (`bad_host.com/x`), accepts upper-case repositories after a registry
//! (`User/app`) and upper-case or sha512 digests (the store holds sha256 only),
//! accepts non-ASCII tags, and answers every mistake with "invalid reference
//! format". This type does the parsing and names the problem; a pull converts
//! it into oci-client's type (`From<&Reference>`), bypassing that parser.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";
/// The tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed, normalized image reference.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parse a reference (`[registry/]repo[:tag][@digest]`).
    pub fn parse(input: &str) -> Result<Reference> {
        let bad = |reason: String| Error::InvalidReference { input: input.to_string(), reason };
        if input.is_empty() {
            return Err(bad("empty reference".into()));
        }
        if input.trim() != input || input.chars().any(char::is_whitespace) {
            return Err(bad("whitespace is not allowed".into()));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((n, d)) => {
                let d = Digest::parse(d).map_err(|e| bad(e.to_string()))?;
                (n, Some(d))
            }
            None => (input, None),
        };
        // A tag is a ':' after the last '/': a ':' before it is a registry port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let (n, t) = rest.split_at(last_slash + i);
                (n, Some(t[1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            validate_tag(t).map_err(bad)?;
        }
        if name.is_empty() {
            return Err(bad("missing repository name".into()));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if is_registry_component(first) => (first.to_string(), path),
            _ => (DOCKER_HUB.to_string(), name),
        };
        validate_registry(&registry).map_err(bad)?;
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        validate_repository(path).map_err(bad)?;
        let repository =
            if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path.to_string() };
        if repository.len() > 255 {
            return Err(bad("repository name longer than 255 characters".into()));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// Registry `host[:port]`, e.g. `docker.io`, `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Host part of the registry (without port, without IPv6 brackets).
    pub fn registry_host(&self) -> &str {
        registry_host(&self.registry)
    }

    /// True for registries on this machine (`localhost`, 127.0.0.0/8, `::1`):
    /// like docker, those are spoken to over plain HTTP.
    pub fn is_loopback_registry(&self) -> bool {
        is_loopback_host(self.registry_host())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The reference oci-client pulls: by digest when one is pinned (the tag is
/// then only for display), else by tag.
impl From<&Reference> for oci_client::Reference {
    fn from(r: &Reference) -> Self {
        match (&r.digest, &r.tag) {
            (Some(d), _) => oci_client::Reference::with_digest(r.registry.clone(), r.repository.clone(), d.to_string()),
            (None, tag) => oci_client::Reference::with_tag(
                r.registry.clone(),
                r.repository.clone(),
                tag.clone().unwrap_or_else(|| DEFAULT_TAG.to_string()),
            ),
        }
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

fn is_registry_component(s: &str) -> bool {
    s.contains('.') || s.contains(':') || s == "localhost" || s.starts_with('[')
}

pub(crate) fn registry_host(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback()),
    }
}

fn validate_registry(r: &str) -> std::result::Result<(), String> {
    let (host, port) = if let Some(rest) = r.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| format!("registry {r:?}: unterminated IPv6 address"))?;
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(format!("registry {r:?}: invalid IPv6 address"));
        }
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(|| format!("registry {r:?}: junk after IPv6 address"))?)),
        }
    } else {
        match r.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (r, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty()
            || p.len() > 5
            || !p.bytes().all(|b| b.is_ascii_digit())
            || p.parse::<u32>().map_or(true, |n| n == 0 || n > 65535)
        {
            return Err(format!("registry {r:?}: invalid port {p:?}"));
        }
    }
    if !r.starts_with('[') {
        if host.is_empty() {
            return Err(format!("registry {r:?}: empty host"));
        }
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!("registry {r:?}: invalid host name"));
            }
        }
    }
    Ok(())
}

/// Path components: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, joined by `/`.
fn validate_repository(path: &str) -> std::result::Result<(), String> {
    if path.is_empty() {
        return Err("missing repository name".into());
    }
    for comp in path.split('/') {
        if comp.is_empty() {
            return Err("empty path component in repository name".into());
        }
        if comp.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("repository name must be lowercase ({comp:?} has uppercase letters)"));
        }
        let b = comp.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return Err(format!("repository component {comp:?} must start and end with a lowercase letter or digit"));
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            // A separator run: ".", "_", "__", or one or more "-".
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &comp[start..i];
            let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|c| c == b'-');
            if !ok {
                return Err(format!("repository component {comp:?} has an invalid character or separator {sep:?}"));
            }
        }
    }
    Ok(())
}

/// Tags: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn validate_tag(t: &str) -> std::result::Result<(), String> {
    let b = t.as_bytes();
    if b.is_empty() {
        return Err("empty tag".into());
    }
    if b.len() > 128 {
        return Err("tag longer than 128 characters".into());
    }
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if !word(b[0]) || !b.iter().all(|&c| word(c) || c == b'.' || c == b'-') {
        return Err(format!(
            "invalid tag {t:?} (allowed: letters, digits, '_', '.', '-'; not starting with '.' or '-')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn converts_into_the_reference_oci_client_pulls() {
        let hex = "a".repeat(64);
        let pinned = p(&format!("localhost:5000/app:1.0@sha256:{hex}"));
        let o = oci_client::Reference::from(&pinned);
        assert_eq!((o.registry(), o.repository()), ("localhost:5000", "app"));
        assert_eq!(o.digest(), Some(format!("sha256:{hex}").as_str()), "a pinned digest is what is pulled");
        let tagged = oci_client::Reference::from(&p("busybox"));
        assert_eq!(
            (tagged.registry(), tagged.repository(), tagged.tag()),
            ("docker.io", "library/busybox", Some("latest"))
        );
        assert_eq!(tagged.digest(), None);
        // IPv6 registries, which oci-client's own parser refuses, pass through.
        assert_eq!(oci_client::Reference::from(&p("[::1]:5000/x:t")).registry(), "[::1]:5000");
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("busybox");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r = p("user/app:1.2");
        assert_eq!(r.to_string(), "docker.io/user/app:1.2");
        assert_eq!(p("docker.io/busybox").to_string(), "docker.io/library/busybox:latest");
        assert_eq!(p("index.docker.io/library/busybox:1").to_string(), "docker.io/library/busybox:1");
    }

    #[test]
    fn registries_and_ports() {
        let r = p(&format!("localhost:5000/app@{D}"));
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "app");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().as_str(), D);
        assert!(r.is_loopback_registry());

        let r = p("127.0.0.1:5000/a/b:tag");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.tag(), Some("tag"));
        assert!(r.is_loopback_registry());
        assert_eq!(r.registry_host(), "127.0.0.1");

        let r = p("localhost/app");
        assert_eq!(r.registry(), "localhost");
        assert!(r.is_loopback_registry());

        let r = p("ghcr.io/owner/repo:v1");
        assert_eq!(r.registry(), "ghcr.io");
        assert!(!r.is_loopback_registry());

        // No '.', ':' or localhost: a Docker Hub user name.
        let r = p("myhost/app");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "myhost/app");

        let r = p("127.1.2.3:80/x");
        assert!(r.is_loopback_registry());
        let r = p("[::1]:5000/x:y");
        assert_eq!(r.registry(), "[::1]:5000");
        assert!(r.is_loopback_registry());
        let r = p("10.0.0.1:5000/x");
        assert!(!r.is_loopback_registry());
    }

    #[test]
    fn tag_and_digest() {
        let r = p(&format!("busybox:1.36@{D}"));
        assert_eq!(r.tag(), Some("1.36"));
        assert!(r.digest().is_some());
        assert_eq!(r.to_string(), format!("docker.io/library/busybox:1.36@{D}"));
        // Display output parses back to the same reference.
        assert_eq!(p(&r.to_string()), r);
    }

    #[test]
    fn separators() {
        assert_eq!(p("x/a.b_c__d-e---f/g").repository(), "x/a.b_c__d-e---f/g");
        assert!(Reference::parse("a..b").is_err());
        assert!(Reference::parse("a___b").is_err());
        assert!(Reference::parse("-ab").is_err());
        assert!(Reference::parse("ab-").is_err());
    }

    #[test]
    fn bad_references() {
        let e = Reference::parse("").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = Reference::parse("Busybox").unwrap_err().to_string();
        assert!(e.contains("lowercase"), "{e}");
        let e = Reference::parse("user/App:1").unwrap_err().to_string();
        assert!(e.contains("lowercase"), "{e}");
        let e = Reference::parse("busybox@sha256:1234").unwrap_err().to_string();
        assert!(e.contains("64 hex"), "{e}");
        let e = Reference::parse("busybox@md5:1234").unwrap_err().to_string();
        assert!(e.contains("sha256"), "{e}");
        assert!(Reference::parse(&format!("busybox@{}", D.to_uppercase().replace("SHA256", "sha256"))).is_err());
        assert!(Reference::parse("busybox:").is_err());
        assert!(Reference::parse("busybox:.x").is_err());
        assert!(Reference::parse("busy box").is_err());
        assert!(Reference::parse("localhost:99999/x").is_err());
        assert!(Reference::parse("localhost:abc/x").is_err());
        assert!(Reference::parse("a//b").is_err());
        assert!(Reference::parse("/a").is_err());
        assert!(Reference::parse("a/").is_err());
        assert!(Reference::parse("example.com:5000/").is_err());
        assert!(Reference::parse(&format!("x:{}", "t".repeat(129))).is_err());
        assert!(Reference::parse("bad_host.com:5000/x").is_err());
    }
}
