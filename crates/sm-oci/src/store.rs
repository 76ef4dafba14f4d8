//! The content-addressed local image store.
//!
//! ```text
//! ROOT/
//!   blobs/sha256/<hex>     manifests, indexes, configs, layers: shared by every image
//!   images.json            image name -> manifest digest (and index digest)
//!   rootfs/<hex>.<format>  read-only root disks, cached per manifest digest
//!   tmp/                   in-flight writes (renamed into place when verified)
//!   gc.lock, images.lock   flock(2) files
//! ```
//!
//! Every blob is written to `tmp/`, hashed while written, and renamed into
//! `blobs/` only when its digest (and size, when known) matches. Pulls and imports
//! hold `gc.lock` shared; [`Store::prune`] holds it exclusive, so it never removes
//! blobs of an import in progress.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::ImageManifest;
use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, IoContext, Result};
use crate::image::{check_manifest, descriptor_digest, parse_manifest_or_index, Parsed};

/// Largest manifest/index/config read into memory.
const MAX_METADATA_BLOB: u64 = 16 << 20;

/// A handle on a store directory. Cheap to clone; safe to share between threads
/// and processes (file locks and atomic renames).
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// One named image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The name it is stored under: a normalized reference
    /// (`docker.io/library/busybox:latest`) or a local source string.
    pub name: String,
    /// Digest of the single-platform image manifest.
    pub manifest: Digest,
    /// Digest of the index / manifest list it was selected from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
}

/// A layer of an image as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// Digest of the (possibly compressed) blob.
    pub digest: Digest,
    /// Blob size in bytes.
    pub size: u64,
    /// Media type from the manifest.
    pub media_type: String,
}

/// An image loaded from the store: manifest, config and layers.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// Name it is stored under.
    pub name: String,
    /// Manifest digest: the image identity (rootfs cache key).
    pub manifest_digest: Digest,
    /// Index digest, if selected from one.
    pub index_digest: Option<Digest>,
    /// Config blob digest.
    pub config_digest: Digest,
    /// The parsed run configuration.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<LayerInfo>,
}

/// What [`Store::prune`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Blobs deleted.
    pub blobs_removed: usize,
    /// Bytes freed by deleted blobs and root disks.
    pub bytes_freed: u64,
    /// Cached root disks deleted.
    pub rootfs_removed: usize,
    /// Baked VM snapshots deleted.
    pub snapshots_removed: usize,
}

#[derive(Default, Serialize, Deserialize)]
struct ImagesFile {
    version: u32,
    images: BTreeMap<String, ImageEntry>,
}

#[derive(Clone, Serialize, Deserialize)]
struct ImageEntry {
    manifest: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    index: Option<Digest>,
}

/// Holds a flock until dropped.
#[derive(Debug)]
pub struct LockGuard(#[allow(dead_code)] File);

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Open (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for d in ["blobs/sha256", "rootfs", "baked", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).at("creating store directory", &p)?;
        }
        // Unpacks happen below tmp/ and may hold device nodes and setuid files
        // (as in the image) until the root disk is built: only we may enter.
        let tmp = root.join("tmp");
        let mode = fs::metadata(&tmp).at("stat", &tmp)?.permissions();
        if std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077 != 0 {
            if let Err(e) = fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o700)) {
                // A store shared with us by another user: theirs to restrict.
                tracing::warn!("cannot restrict {} to its owner: {e}", tmp.display());
            }
        }
        Ok(Store { root })
    }

    /// The default location: `$SUPERMACHINE_HOME/oci`, else
    /// `$XDG_DATA_HOME/supermachine/oci`, else `~/.local/share/supermachine/oci`.
    pub fn default_root() -> PathBuf {
        if let Some(h) = std::env::var_os("SUPERMACHINE_HOME") {
            return PathBuf::from(h).join("oci");
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
            return PathBuf::from(x).join("supermachine/oci");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".local/share/supermachine/oci")
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it exists).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Open a blob for reading.
    pub fn open_blob(&self, d: &Digest) -> Result<File> {
        let p = self.blob_path(d);
        File::open(&p).at("opening blob", &p)
    }

    /// Read a small blob (manifest, config) into memory, re-verifying its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let mut f = self.open_blob(d)?;
        let mut buf = Vec::new();
        (&mut f).take(MAX_METADATA_BLOB + 1).read_to_end(&mut buf).at("reading blob", &self.blob_path(d))?;
        if buf.len() as u64 > MAX_METADATA_BLOB {
            return Err(Error::invalid(d.to_string(), "metadata blob larger than 16 MiB"));
        }
        d.verify(&Digest::of(&buf), format_args!("stored blob {d}"))?;
        Ok(buf)
    }

    /// Store bytes as a blob. With `expected`, refuse bytes that do not match it.
    pub fn put_blob(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<Digest> {
        let actual = Digest::of(bytes);
        if let Some(e) = expected {
            e.verify(&actual, format_args!("blob {e}"))?;
        }
        if self.has_blob(&actual) {
            return Ok(actual);
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes).ctx(|| "writing blob".into())?;
        w.commit(&actual, Some(bytes.len() as u64))?;
        Ok(actual)
    }

    /// A writer for a new blob: write, then [`BlobWriter::commit`] with the
    /// expected digest, or [`BlobWriter::commit_computed`].
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let (file, path) = self.temp_file("blob")?;
        Ok(BlobWriter { inner: Some(HashingWriter::new(file)), tmp: path, blobs: self.root.join("blobs/sha256") })
    }

    /// Create a uniquely named file in `tmp/`.
    pub(crate) fn temp_file(&self, prefix: &str) -> Result<(File, PathBuf)> {
        let p = self.temp_path(prefix);
        let f = OpenOptions::new().write(true).create_new(true).open(&p).at("creating temporary file", &p)?;
        Ok((f, p))
    }

    /// A fresh unique path in `tmp/` (not created).
    pub(crate) fn temp_path(&self, prefix: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        self.root.join("tmp").join(format!("{prefix}-{}-{n}-{t}", std::process::id()))
    }

    /// Directory of cached root disks.
    pub fn rootfs_dir(&self) -> PathBuf {
        self.root.join("rootfs")
    }

    /// Directory of caches a runtime derives from an image, e.g. baked VM
    /// snapshots. Entries are named `<manifest hex>-...`; `prune` removes those
    /// whose image is gone, and all of them with `prune_baked`.
    pub fn baked_dir(&self) -> PathBuf {
        self.root.join("baked")
    }

    fn lock(&self, name: &str, op: FlockOperation) -> Result<LockGuard> {
        let p = self.root.join(name);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .at("opening lock file", &p)?;
        rustix::fs::flock(&f, op).at("locking", &p)?;
        Ok(LockGuard(f))
    }

    /// Shared hold on the store against [`Store::prune`], taken by pulls and imports.
    pub fn gc_shared(&self) -> Result<LockGuard> {
        self.lock("gc.lock", FlockOperation::LockShared)
    }

    fn read_images(&self) -> Result<ImagesFile> {
        let p = self.root.join("images.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::invalid(p.display().to_string(), format!("corrupt image table: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ImagesFile { version: 1, images: BTreeMap::new() }),
            Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
        }
    }

    fn write_images(&self, f: &ImagesFile) -> Result<()> {
        let p = self.root.join("images.json");
        let tmp = self.temp_path("images");
        let bytes = serde_json::to_vec_pretty(f).map_err(|e| Error::io("encoding image table", e.into()))?;
        let mut file = File::create(&tmp).at("creating", &tmp)?;
        file.write_all(&bytes).at("writing", &tmp)?;
        file.sync_all().at("syncing", &tmp)?;
        fs::rename(&tmp, &p).at("replacing", &p)?;
        Ok(())
    }

    /// All images, sorted by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        Ok(self
            .read_images()?
            .images
            .into_iter()
            .map(|(name, e)| ImageRecord { name, manifest: e.manifest, index: e.index })
            .collect())
    }

    /// The record stored under `name`, if any.
    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>> {
        Ok(self.read_images()?.images.get(name).map(|e| ImageRecord {
            name: name.to_string(),
            manifest: e.manifest.clone(),
            index: e.index.clone(),
        }))
    }

    /// Record (or re-point) an image name. Its manifest, config and layers must
    /// already be in the store.
    pub fn set_image(&self, rec: &ImageRecord) -> Result<()> {
        self.load_manifest_blobs(&rec.manifest)?;
        let _g = self.lock("images.lock", FlockOperation::LockExclusive)?;
        let mut f = self.read_images()?;
        f.version = 1;
        f.images.insert(rec.name.clone(), ImageEntry { manifest: rec.manifest.clone(), index: rec.index.clone() });
        self.write_images(&f)
    }

    /// Forget an image name (blobs stay until [`Store::prune`]). Returns whether
    /// it existed.
    pub fn remove_image(&self, name: &str) -> Result<bool> {
        let _g = self.lock("images.lock", FlockOperation::LockExclusive)?;
        let mut f = self.read_images()?;
        let had = f.images.remove(name).is_some();
        if had {
            self.write_images(&f)?;
        }
        Ok(had)
    }

    /// Read and check a manifest blob, and check that its config and layers are present.
    fn load_manifest_blobs(&self, manifest: &Digest) -> Result<ImageManifest> {
        let bytes = self.read_blob(manifest)?;
        let m = match parse_manifest_or_index(&bytes, manifest.as_str())? {
            Parsed::Manifest(m) => *m,
            Parsed::Index(_) => {
                return Err(Error::invalid(manifest.to_string(), "expected an image manifest, found an index"))
            }
        };
        check_manifest(&m, manifest.as_str())?;
        for d in std::iter::once(m.config()).chain(m.layers()) {
            let dg = descriptor_digest(d)?;
            if !self.has_blob(&dg) {
                return Err(Error::invalid(manifest.to_string(), format!("blob {dg} missing from the store")));
            }
        }
        Ok(m)
    }

    /// Load an image by name.
    pub fn image_info(&self, name: &str) -> Result<ImageInfo> {
        let rec = self.image(name)?.ok_or_else(|| Error::ImageNotInStore(name.to_string()))?;
        self.info_for(&rec)
    }

    /// Load an image from its record.
    pub fn info_for(&self, rec: &ImageRecord) -> Result<ImageInfo> {
        let m = self.load_manifest_blobs(&rec.manifest)?;
        let config_digest = descriptor_digest(m.config())?;
        let config = ImageConfig::from_json(&self.read_blob(&config_digest)?)?;
        let layers = m
            .layers()
            .iter()
            .map(|l| {
                Ok(LayerInfo { digest: descriptor_digest(l)?, size: l.size(), media_type: l.media_type().to_string() })
            })
            .collect::<Result<Vec<_>>>()?;
        if !config.diff_ids.is_empty() && config.diff_ids.len() != layers.len() {
            return Err(Error::invalid(
                rec.name.clone(),
                format!("config lists {} diff_ids for {} layers", config.diff_ids.len(), layers.len()),
            ));
        }
        Ok(ImageInfo {
            name: rec.name.clone(),
            manifest_digest: rec.manifest.clone(),
            index_digest: rec.index.clone(),
            config_digest,
            config,
            layers,
        })
    }

    /// Remove blobs no image references, cached root disks and baked entries of
    /// images no longer present, and leftovers in `tmp/`.
    pub fn prune(&self) -> Result<PruneReport> {
        let _gc = self.lock("gc.lock", FlockOperation::LockExclusive)?;
        let _g = self.lock("images.lock", FlockOperation::LockExclusive)?;
        let mut keep = BTreeSet::new();
        let mut manifests = BTreeSet::new();
        for rec in self.images()? {
            keep.insert(rec.manifest.hex().to_string());
            manifests.insert(rec.manifest.hex().to_string());
            if let Some(i) = &rec.index {
                keep.insert(i.hex().to_string());
            }
            // A damaged image keeps whatever it still references.
            if let Ok(bytes) = self.read_blob(&rec.manifest) {
                if let Ok(Parsed::Manifest(m)) = parse_manifest_or_index(&bytes, "") {
                    for d in std::iter::once(m.config()).chain(m.layers()) {
                        if let Ok(dg) = descriptor_digest(d) {
                            keep.insert(dg.hex().to_string());
                        }
                    }
                }
            }
        }
        let mut report = PruneReport::default();
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs).at("listing", &blobs)? {
            let e = e.at("listing", &blobs)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                report.bytes_freed += e.metadata().map_or(0, |m| m.len());
                fs::remove_file(e.path()).at("removing blob", &e.path())?;
                report.blobs_removed += 1;
            }
        }
        let rootfs = self.rootfs_dir();
        for e in fs::read_dir(&rootfs).at("listing", &rootfs)? {
            let e = e.at("listing", &rootfs)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or("");
            if !manifests.contains(hex) {
                report.bytes_freed += e.metadata().map_or(0, |m| m.len());
                fs::remove_file(e.path()).at("removing root disk", &e.path())?;
                report.rootfs_removed += 1;
            }
        }
        let baked = self.baked_dir();
        for e in fs::read_dir(&baked).at("listing", &baked)? {
            let e = e.at("listing", &baked)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.split(['-', '.']).next().unwrap_or("");
            if !manifests.contains(hex) {
                // Allocated size: snapshots are sparse files.
                report.bytes_freed += e.metadata().map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
                fs::remove_file(e.path()).at("removing baked snapshot", &e.path())?;
                report.snapshots_removed += 1;
            }
        }
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).at("listing", &tmp)? {
            let e = e.at("listing", &tmp)?;
            let p = e.path();
            let r = if e.file_type().is_ok_and(|t| t.is_dir()) { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            r.at("removing", &p)?;
        }
        Ok(report)
    }
}

/// A blob being written: hashed as it goes, renamed into the store on a
/// successful commit, deleted when dropped uncommitted.
pub struct BlobWriter {
    inner: Option<HashingWriter<File>>,
    tmp: PathBuf,
    blobs: PathBuf,
}

impl BlobWriter {
    /// Verify against `expected` (and `size`, if given) and move into place.
    pub fn commit(mut self, expected: &Digest, size: Option<u64>) -> Result<Digest> {
        let (actual, n, file) = self.take()?;
        if let Some(s) = size {
            if s != n {
                return Err(Error::SizeMismatch { what: format!("blob {expected}"), expected: s, actual: n });
            }
        }
        expected.verify(&actual, format_args!("blob {expected}"))?;
        self.place(file, &actual)?;
        Ok(actual)
    }

    /// Move into place under the digest of what was written; returns it and the size.
    pub fn commit_computed(mut self) -> Result<(Digest, u64)> {
        let (actual, n, file) = self.take()?;
        self.place(file, &actual)?;
        Ok((actual, n))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.count_so_far())
    }

    fn take(&mut self) -> Result<(Digest, u64, File)> {
        let mut w = self.inner.take().ok_or_else(|| Error::io("blob writer", io::Error::other("already committed")))?;
        w.flush().at("flushing", &self.tmp)?;
        Ok(w.finish())
    }

    fn place(&mut self, file: File, d: &Digest) -> Result<()> {
        file.sync_all().at("syncing", &self.tmp)?;
        drop(file);
        let dst = self.blobs.join(d.hex());
        fs::rename(&self.tmp, &dst).at("committing blob", &dst)?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("blob already committed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("sm-oci-unit-{tag}-")).tempdir().unwrap()
    }

    #[test]
    fn blob_verified_before_commit() {
        let dir = tempdir("blob");
        let s = Store::open(dir.path()).unwrap();
        let d = s.put_blob(b"hello", None).unwrap();
        assert!(s.has_blob(&d));
        assert_eq!(s.read_blob(&d).unwrap(), b"hello");
        let wrong = Digest::of(b"other");
        let e = s.put_blob(b"hello2", Some(&wrong)).unwrap_err();
        assert!(e.is_integrity(), "{e}");
        assert!(!s.has_blob(&Digest::of(b"hello2")));
        let mut w = s.blob_writer().unwrap();
        w.write_all(b"abc").unwrap();
        let e = w.commit(&Digest::of(b"abc"), Some(4)).unwrap_err();
        assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");
        assert!(!s.has_blob(&Digest::of(b"abc")));
        // nothing left behind in tmp/
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // corrupt on disk -> read_blob refuses
        fs::write(s.blob_path(&d), b"hellO").unwrap();
        assert!(s.read_blob(&d).unwrap_err().is_integrity());
    }

    #[test]
    fn images_and_prune() {
        let dir = tempdir("prune");
        let s = Store::open(dir.path()).unwrap();
        let cfg = serde_json::json!({"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}});
        let cfg_d = s.put_blob(cfg.to_string().as_bytes(), None).unwrap();
        let layer_a = s.put_blob(b"layer-a", None).unwrap();
        let layer_b = s.put_blob(b"layer-b", None).unwrap();
        let junk = s.put_blob(b"junk", None).unwrap();
        let manifest = |layers: &[&Digest]| {
            serde_json::json!({
                "schemaVersion": 2, "mediaType": crate::image::OCI_MANIFEST,
                "config": {"mediaType": crate::image::OCI_CONFIG, "digest": cfg_d.as_str(), "size": cfg.to_string().len()},
                "layers": layers.iter().map(|d| serde_json::json!({"mediaType": crate::image::OCI_LAYER_TAR, "digest": d.as_str(), "size": 7})).collect::<Vec<_>>()
            }).to_string()
        };
        let m1 = s.put_blob(manifest(&[&layer_a]).as_bytes(), None).unwrap();
        let m2 = s.put_blob(manifest(&[&layer_a, &layer_b]).as_bytes(), None).unwrap();
        s.set_image(&ImageRecord { name: "one".into(), manifest: m1.clone(), index: None }).unwrap();
        s.set_image(&ImageRecord { name: "two".into(), manifest: m2.clone(), index: None }).unwrap();
        assert_eq!(s.images().unwrap().len(), 2);
        let info = s.image_info("two").unwrap();
        assert_eq!(info.layers.len(), 2);
        fs::write(s.rootfs_dir().join(format!("{}.erofs", m2.hex())), b"x").unwrap();
        fs::write(s.rootfs_dir().join(format!("{}.erofs", junk.hex())), b"x").unwrap();

        let r = s.prune().unwrap();
        assert_eq!(r.blobs_removed, 1);
        assert_eq!(r.rootfs_removed, 1);
        assert!(!s.has_blob(&junk));
        assert!(s.remove_image("two").unwrap());
        assert!(!s.remove_image("two").unwrap());
        s.prune().unwrap();
        assert!(s.has_blob(&layer_a) && s.has_blob(&m1) && s.has_blob(&cfg_d));
        assert!(!s.has_blob(&layer_b) && !s.has_blob(&m2));
        assert!(s.image_info("two").is_err());
        // Unknown blob referenced -> refused.
        let m3 = s.put_blob(manifest(&[&Digest::of(b"absent")]).as_bytes(), None).unwrap();
        assert!(s.set_image(&ImageRecord { name: "three".into(), manifest: m3, index: None }).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
