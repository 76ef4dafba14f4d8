//! Manifests, indexes, media types and platform selection.

use std::fmt;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Uncompressed OCI layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// gzip OCI layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// zstd OCI layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The OCI annotation that names a manifest in an `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Media types sent in `Accept` when fetching manifests.
pub const MANIFEST_ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];

/// An os/architecture[/variant] pair, e.g. `linux/amd64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// GOOS value.
    pub os: String,
    /// GOARCH value.
    pub architecture: String,
    /// CPU variant (`v8`, `v7`...), if it matters.
    pub variant: Option<String>,
}

impl Default for Platform {
    /// `linux/amd64`: what the guest runs.
    fn default() -> Self {
        Platform { os: "linux".into(), architecture: "amd64".into(), variant: None }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A manifest or an index, told apart by content.
#[derive(Debug)]
pub enum Parsed {
    /// A single-platform image manifest.
    Manifest(Box<ImageManifest>),
    /// An image index / manifest list.
    Index(Box<ImageIndex>),
}

/// Parse manifest bytes into a manifest or an index.
pub fn parse_manifest_or_index(bytes: &[u8], what: &str) -> Result<Parsed> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Error::invalid(what, format!("manifest is not JSON: {e}")))?;
    let media = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
    if v.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err(Error::invalid(what, "unsupported manifest schemaVersion (need 2)"));
    }
    if media == OCI_INDEX || media == DOCKER_MANIFEST_LIST || (media.is_empty() && v.get("manifests").is_some()) {
        let idx: ImageIndex =
            serde_json::from_value(v).map_err(|e| Error::invalid(what, format!("bad image index: {e}")))?;
        return Ok(Parsed::Index(Box::new(idx)));
    }
    if !(media.is_empty() || media == OCI_MANIFEST || media == DOCKER_MANIFEST) {
        return Err(Error::invalid(what, format!("unsupported manifest media type {media}")));
    }
    let m: ImageManifest =
        serde_json::from_value(v).map_err(|e| Error::invalid(what, format!("bad image manifest: {e}")))?;
    check_manifest(&m, what)?;
    Ok(Parsed::Manifest(Box::new(m)))
}

/// Refuse manifests that are not container images (artifacts, foreign layers).
pub fn check_manifest(m: &ImageManifest, what: &str) -> Result<()> {
    let cfg = m.config().media_type().as_ref();
    if cfg != OCI_CONFIG && cfg != DOCKER_CONFIG {
        return Err(Error::invalid(what, format!("not a container image (config media type {cfg})")));
    }
    for l in m.layers() {
        layer_compression(l.media_type().as_ref())
            .ok_or_else(|| Error::invalid(what, format!("unsupported layer media type {}", l.media_type().as_ref())))?;
        descriptor_digest(l)?;
    }
    descriptor_digest(m.config())?;
    Ok(())
}

/// Compression of a layer media type: `Some("gzip" | "zstd" | "none")`, or
/// `None` for types that are not unpackable layers.
pub fn layer_compression(media: &str) -> Option<&'static str> {
    match media {
        OCI_LAYER_TAR | "application/vnd.docker.image.rootfs.diff.tar" => Some("none"),
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Some("gzip"),
        OCI_LAYER_ZSTD | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some("zstd"),
        _ => None,
    }
}

/// The descriptor's digest as our (sha256-only) type.
pub fn descriptor_digest(d: &Descriptor) -> Result<Digest> {
    Digest::try_from(d.digest())
}

/// Pick the manifest for `want` from an index. Entries without a platform
/// (attestations, `unknown/unknown`) never match. Without a wanted variant an
/// entry with no variant (or `v1`) is preferred over others.
pub fn select_platform<'a>(index: &'a ImageIndex, want: &Platform, what: &str) -> Result<&'a Descriptor> {
    let mut best: Option<(&Descriptor, u8)> = None;
    for d in index.manifests() {
        let Some(p) = d.platform() else { continue };
        if p.os().to_string() != want.os || p.architecture().to_string() != want.architecture {
            continue;
        }
        let score = match (&want.variant, p.variant()) {
            (Some(w), Some(v)) if w == v => 3,
            (Some(_), _) => continue,
            (None, None) => 2,
            (None, Some(v)) if v == "v1" => 2,
            (None, Some(_)) => 1,
        };
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((d, score));
        }
    }
    best.map(|(d, _)| d).ok_or_else(|| {
        let available: Vec<String> = index
            .manifests()
            .iter()
            .filter_map(|d| d.platform().as_ref())
            .map(|p| match p.variant() {
                Some(v) => format!("{}/{}/{}", p.os(), p.architecture(), v),
                None => format!("{}/{}", p.os(), p.architecture()),
            })
            .collect();
        Error::NoMatchingPlatform {
            reference: what.to_string(),
            platform: want.to_string(),
            available: if available.is_empty() { "none".into() } else { available.join(", ") },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>, char)]) -> ImageIndex {
        let ms: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, var, c)| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = var {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": format!("sha256:{}", c.to_string().repeat(64)),
                    "size": 1,
                    "platform": p,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": ms}))
            .unwrap()
    }

    #[test]
    fn picks_linux_amd64() {
        let idx = index(&[
            ("linux", "arm64", Some("v8"), 'a'),
            ("unknown", "unknown", None, 'b'),
            ("linux", "amd64", Some("v3"), 'c'),
            ("linux", "amd64", None, 'd'),
        ]);
        let d = select_platform(&idx, &Platform::default(), "x").unwrap();
        assert!(d.digest().as_ref().ends_with("dddd"));
        let idx = index(&[("linux", "arm64", Some("v8"), 'a'), ("windows", "amd64", None, 'b')]);
        let e = select_platform(&idx, &Platform::default(), "img").unwrap_err().to_string();
        assert!(e.contains("linux/arm64/v8") && e.contains("linux/amd64"), "{e}");
    }

    #[test]
    fn refuses_non_images() {
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": format!("sha256:{}", "a".repeat(64)), "size": 1},
            "layers": []
        });
        let e = parse_manifest_or_index(m.to_string().as_bytes(), "x").unwrap_err().to_string();
        assert!(e.contains("not a container image"), "{e}");
        assert!(parse_manifest_or_index(b"{", "x").is_err());
    }
}
