//! Images built locally from a static busybox, with no registry: the built-in
//! default image `supermachine run` uses when given no image (so a fresh,
//! offline machine can run something), and small test images.
//!
//! One uncompressed layer: `/bin/busybox`, a symlink per applet in `/bin`,
//! `/etc/passwd` + `/etc/group` (root, nobody), `/tmp`, `/root`. Entries are
//! owned by root with a fixed mtime, so the same busybox gives the same digest.

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::error::{Error, Result};
use crate::store::{ImageRecord, Store};
use crate::Digest;

/// The store name of the built-in default image.
pub const DEFAULT_IMAGE: &str = "builtin:default";

/// Where the default image takes its busybox from (Debian's busybox-static).
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// What the default image runs without a command.
const DEFAULT_CMD: &str = "echo \"Hello from a supermachine microVM: $(uname -sr), $(nproc) vCPU, \
                           $(free -m | awk '/Mem:/ {print $2}') MiB\"";

const MTIME: u64 = 1_700_000_000;

/// The blobs of a one-layer image.
pub struct BuiltImage {
    /// The layer (uncompressed tar).
    pub layer: Vec<u8>,
    /// The image config JSON.
    pub config: Vec<u8>,
    /// The manifest JSON.
    pub manifest: Vec<u8>,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

/// The applets `busybox` provides (`busybox --list`).
fn applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| Error::io(format!("running {} --list", busybox.display()), e))?;
    if !out.status.success() {
        return Err(Error::invalid(busybox.display().to_string(), "`--list` failed: not a busybox binary"));
    }
    let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(String::from)
        .collect();
    Ok(list)
}

/// Builds the image from the static busybox at `busybox`: its config runs
/// `cmd` with `env` (`PATH` is always set).
pub fn busybox_image(busybox: &Path, cmd: &[&str], env: &[&str]) -> Result<BuiltImage> {
    let bb = fs::read(busybox).map_err(|e| {
        Error::io(format!("reading {} (install busybox-static: apt-get install busybox-static)", busybox.display()), e)
    })?;
    let applets = applets(busybox)?;
    let io = |e: std::io::Error| Error::io("building the busybox layer", e);
    let mut tar = tar::Builder::new(Vec::new());
    for (dir, mode) in
        [("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("root", 0o700), ("usr", 0o755), ("usr/bin", 0o755)]
    {
        tar.append_data(&mut header(tar::EntryType::Directory, mode, 0), dir, std::io::empty()).map_err(io)?;
    }
    tar.append_data(&mut header(tar::EntryType::Regular, 0o755, bb.len() as u64), "bin/busybox", &bb[..])
        .map_err(io)?;
    let files: [(&str, &[u8]); 2] = [
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        ("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
    ];
    for (name, data) in files {
        tar.append_data(&mut header(tar::EntryType::Regular, 0o644, data.len() as u64), name, data).map_err(io)?;
    }
    for applet in &applets {
        tar.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0), format!("bin/{applet}"), "busybox")
            .map_err(io)?;
    }
    let layer = tar.into_inner().map_err(io)?;
    let layer_digest = Digest::of(&layer);

    let mut full_env = vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    full_env.extend(env.iter().map(|e| e.to_string()));
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": full_env},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]},
    })
    .to_string()
    .into_bytes();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": Digest::of(&config).to_string(),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest.to_string(),
            "size": layer.len(),
        }],
    })
    .to_string()
    .into_bytes();
    Ok(BuiltImage { layer, config, manifest })
}

impl BuiltImage {
    /// Writes the image as an OCI image layout at `dir`, tagged `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| Error::io(format!("creating {}", blobs.display()), e))?;
        for bytes in [&self.layer, &self.config, &self.manifest] {
            let p = blobs.join(Digest::of(bytes).hex());
            fs::write(&p, bytes).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": Digest::of(&self.manifest).to_string(),
                "size": self.manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        for (name, data) in
            [("index.json", index.to_string()), ("oci-layout", r#"{"imageLayoutVersion":"1.0.0"}"#.into())]
        {
            let p = dir.join(name);
            fs::write(&p, data).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        Ok(())
    }

    /// Puts the blobs into `store` and records the image under `name`.
    pub fn store_as(&self, store: &Store, name: &str) -> Result<ImageRecord> {
        let _gc = store.gc_shared()?;
        for bytes in [&self.layer, &self.config, &self.manifest] {
            store.put_blob(bytes, None)?;
        }
        let rec = ImageRecord { name: name.to_string(), manifest: Digest::of(&self.manifest), index: None };
        store.set_image(&rec)?;
        Ok(rec)
    }
}

/// The built-in default image: from the store, or built now from
/// [`DEFAULT_BUSYBOX`] (a few MiB, no network).
pub fn default_image(store: &Store) -> Result<ImageRecord> {
    if let Some(rec) = store.image(DEFAULT_IMAGE)? {
        if store.info_for(&rec).is_ok() {
            return Ok(rec);
        }
    }
    let image =
        busybox_image(Path::new(DEFAULT_BUSYBOX), &["sh", "-c", DEFAULT_CMD], &["SUPERMACHINE_IMAGE=builtin:default"])?;
    image.store_as(store, DEFAULT_IMAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_image_is_built_once_with_every_applet_and_is_reproducible() {
        if !Path::new(DEFAULT_BUSYBOX).exists() {
            eprintln!("skipped: {DEFAULT_BUSYBOX} missing (apt-get install busybox-static)");
            return;
        }
        let tmp = tempfile::Builder::new().prefix("sm-oci-builtin-").tempdir().unwrap();
        let dir = tmp.path();
        let store = Store::open(dir.join("store")).unwrap();
        let rec = default_image(&store).unwrap();
        assert_eq!(rec.name, DEFAULT_IMAGE);
        let info = store.info_for(&rec).unwrap();
        assert_eq!(info.layers.len(), 1);
        let spec = info.config.resolve(&Default::default()).unwrap();
        assert_eq!(spec.argv[0], "sh");
        assert!(spec.env.iter().any(|e| e == "SUPERMACHINE_IMAGE=builtin:default"), "{:?}", spec.env);
        // Same busybox, same digest; a second call reuses the stored image.
        let again = busybox_image(
            Path::new(DEFAULT_BUSYBOX),
            &["sh", "-c", DEFAULT_CMD],
            &["SUPERMACHINE_IMAGE=builtin:default"],
        )
        .unwrap();
        assert_eq!(Digest::of(&again.manifest), rec.manifest);
        assert_eq!(default_image(&store).unwrap().manifest, rec.manifest);
        // The layer has busybox and its applet links.
        let mut names = Vec::new();
        let mut archive = tar::Archive::new(&again.layer[..]);
        for e in archive.entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        for want in ["bin/busybox", "bin/sh", "bin/uname", "etc/passwd"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    }

    #[test]
    fn a_missing_busybox_names_the_package() {
        let err = busybox_image(Path::new("/nonexistent/busybox"), &["sh"], &[]).err().unwrap().to_string();
        assert!(err.contains("busybox-static"), "{err}");
    }
}
