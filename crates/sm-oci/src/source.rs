//! Where an image comes from: a registry reference or a local file/directory.
//!
//! ```text
//! busybox, 127.0.0.1:5000/a/b:tag      registry (see `reference`)
//! oci-layout:DIR[:tag]                 an OCI image layout directory
//! oci-archive:FILE.tar[:tag]           the same, as a tar file
//! docker-archive:FILE.tar[:name:tag]   `docker save` output
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::pull::PullOptions;
use crate::reference::Reference;
use crate::store::{ImageRecord, Store};

/// A parsed image source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// An image in a registry.
    Registry(Reference),
    /// An OCI image layout directory, optionally a tag (`org.opencontainers.image.ref.name`).
    OciLayout {
        /// Layout directory.
        dir: PathBuf,
        /// Tag to pick from `index.json`.
        tag: Option<String>,
    },
    /// An OCI image layout in a tar file.
    OciArchive {
        /// The tar file.
        file: PathBuf,
        /// Tag to pick.
        tag: Option<String>,
    },
    /// A `docker save` tar (manifest.json + layer tars).
    DockerArchive {
        /// The tar file.
        file: PathBuf,
        /// `RepoTags` entry to pick.
        reference: Option<String>,
    },
}

impl ImageSource {
    /// Parse a source string. Local paths must exist (a `:suffix` is split off
    /// only when the part before it exists).
    pub fn parse(s: &str) -> Result<ImageSource> {
        if let Some(rest) = s.strip_prefix("oci-layout:").or_else(|| s.strip_prefix("oci:")) {
            let (dir, tag) = split_existing(rest, s)?;
            return Ok(ImageSource::OciLayout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (file, tag) = split_existing(rest, s)?;
            return Ok(ImageSource::OciArchive { file, tag });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (file, reference) = split_existing(rest, s)?;
            return Ok(ImageSource::DockerArchive { file, reference });
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            return Ok(ImageSource::Registry(Reference::parse(rest)?));
        }
        Ok(ImageSource::Registry(Reference::parse(s)?))
    }

    /// The name the image is recorded under in the store: the normalized
    /// reference, or the source string with an absolute path.
    pub fn store_name(&self) -> String {
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
        let suffix = |t: &Option<String>| t.as_ref().map(|t| format!(":{t}")).unwrap_or_default();
        match self {
            ImageSource::Registry(r) => r.to_string(),
            ImageSource::OciLayout { dir, tag } => {
                format!("oci-layout:{}{}", abs(dir), suffix(tag))
            }
            ImageSource::OciArchive { file, tag } => {
                format!("oci-archive:{}{}", abs(file), suffix(tag))
            }
            ImageSource::DockerArchive { file, reference } => {
                format!("docker-archive:{}{}", abs(file), suffix(reference))
            }
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.store_name())
    }
}

/// The store name for what a user typed (`busybox` -> `docker.io/library/busybox:latest`),
/// to look an image up with [`Store::image_info`].
pub fn store_name(input: &str) -> Result<String> {
    Ok(ImageSource::parse(input)?.store_name())
}

/// Fetch `source` into `store`: pull from its registry, or import the local file.
pub async fn fetch(
    store: &Store,
    source: &ImageSource,
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord> {
    match source {
        ImageSource::Registry(r) => crate::pull::pull(store, r, opts, progress).await,
        local => {
            let (store, local, platform) = (store.clone(), local.clone(), opts.platform.clone());
            tokio::task::spawn_blocking(move || crate::local::import(&store, &local, &platform, &*progress))
                .await
                .map_err(|e| Error::io("import task", std::io::Error::other(e)))?
        }
    }
}

/// Split `PATH[:suffix]` where PATH exists; the whole string wins if it exists.
fn split_existing(rest: &str, input: &str) -> Result<(PathBuf, Option<String>)> {
    if rest.is_empty() {
        return Err(Error::InvalidReference { input: input.to_string(), reason: "missing path".into() });
    }
    if Path::new(rest).exists() {
        return Ok((PathBuf::from(rest), None));
    }
    for (i, _) in rest.match_indices(':') {
        let (p, t) = (&rest[..i], &rest[i + 1..]);
        if !p.is_empty() && Path::new(p).exists() {
            let t = (!t.is_empty()).then(|| t.to_string());
            return Ok((PathBuf::from(p), t));
        }
    }
    Err(Error::InvalidReference { input: input.to_string(), reason: format!("{rest:?} does not exist") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        let tmp = tempfile::Builder::new().prefix("sm-oci-src-").tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let d = dir.display().to_string();
        assert_eq!(
            ImageSource::parse(&format!("oci-layout:{d}:v1")).unwrap(),
            ImageSource::OciLayout { dir: dir.clone(), tag: Some("v1".into()) }
        );
        assert_eq!(
            ImageSource::parse(&format!("oci-layout:{d}")).unwrap(),
            ImageSource::OciLayout { dir: dir.clone(), tag: None }
        );
        let f = dir.join("img.tar");
        std::fs::write(&f, b"").unwrap();
        let fs = f.display().to_string();
        assert_eq!(
            ImageSource::parse(&format!("docker-archive:{fs}:busybox:latest")).unwrap(),
            ImageSource::DockerArchive { file: f.clone(), reference: Some("busybox:latest".into()) }
        );
        assert_eq!(
            ImageSource::parse(&format!("oci-archive:{fs}")).unwrap(),
            ImageSource::OciArchive { file: f.clone(), tag: None }
        );
        assert!(ImageSource::parse("oci-archive:/nonexistent/x.tar").is_err());
        assert!(ImageSource::parse("oci-layout:").is_err());
        assert_eq!(store_name("busybox").unwrap(), "docker.io/library/busybox:latest");
        assert_eq!(
            ImageSource::parse("docker://alpine:3").unwrap(),
            ImageSource::Registry(Reference::parse("alpine:3").unwrap())
        );
    }
}
