//! Importing images from local sources into the [`Store`]: OCI layout
//! directories, OCI archives (a layout in a tar) and docker archives
//! (`docker save`: `manifest.json` + a tar per layer).
//!
//! Every blob is verified against its digest (and size) on the way in, as for
//! registry pulls. Docker archives carry uncompressed layers whose sha256 must
//! equal the config's diff_ids; an OCI manifest is synthesized for them.
//! Archives are indexed once (entry name -> offset) and read in place, never
//! extracted to disk; only regular files and in-archive symlinks are followed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::config::ImageConfig;
use crate::digest::{Digest, HashingReader};
use crate::error::{Error, IoContext, Result};
use crate::image::{
    descriptor_digest, parse_manifest_or_index, select_platform, Parsed, Platform, OCI_CONFIG, OCI_LAYER_GZIP,
    OCI_LAYER_TAR, OCI_LAYER_ZSTD, OCI_MANIFEST, REF_NAME_ANNOTATION,
};
use crate::progress::{BlobKind, Progress};
use crate::reference::Reference;
use crate::source::ImageSource;
use crate::store::{ImageRecord, Store};

const MAX_SMALL: u64 = 16 << 20;

/// Import a local source (not [`ImageSource::Registry`]) and record it under
/// [`ImageSource::store_name`].
pub fn import(
    store: &Store,
    source: &ImageSource,
    platform: &Platform,
    progress: &dyn Progress,
) -> Result<ImageRecord> {
    let _gc = store.gc_shared()?;
    let name = source.store_name();
    let r = match source {
        ImageSource::OciLayout { dir, tag } => {
            let mut files = DirFiles(dir.clone());
            import_layout(store, &mut files, tag.as_deref(), platform, name, progress)
        }
        ImageSource::OciArchive { file, tag } => {
            let mut files = TarFiles::index(file)?;
            import_layout(store, &mut files, tag.as_deref(), platform, name, progress)
        }
        ImageSource::DockerArchive { file, reference } => {
            let mut files = TarFiles::index(file)?;
            import_docker(store, &mut files, reference.as_deref(), name, progress)
        }
        ImageSource::Registry(r) => Err(Error::invalid(r.to_string(), "not a local source; use pull")),
    };
    progress.finished();
    r
}

/// Named files of a layout or archive.
trait Files {
    /// What it is, for messages.
    fn what(&self) -> String;
    /// Open a regular file and give its size; `None` if absent.
    fn open(&mut self, name: &str) -> Result<Option<(Box<dyn Read>, u64)>>;
}

struct DirFiles(PathBuf);

impl Files for DirFiles {
    fn what(&self) -> String {
        self.0.display().to_string()
    }
    fn open(&mut self, name: &str) -> Result<Option<(Box<dyn Read>, u64)>> {
        let rel = normalize(name).ok_or_else(|| Error::invalid(self.what(), format!("bad path {name:?}")))?;
        let p = self.0.join(rel);
        match File::open(&p) {
            Ok(f) => {
                let m = f.metadata().at("stat", &p)?;
                if !m.is_file() {
                    return Err(Error::invalid(self.what(), format!("{name} is not a regular file")));
                }
                Ok(Some((Box::new(f), m.len())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("opening {}", p.display()), e)),
        }
    }
}

enum TarItem {
    File { offset: u64, size: u64 },
    Symlink(String),
}

struct TarFiles {
    path: PathBuf,
    items: HashMap<String, TarItem>,
}

impl TarFiles {
    fn index(path: &Path) -> Result<TarFiles> {
        let f = File::open(path).at("opening", path)?;
        let corrupt =
            |e: std::io::Error| Error::invalid(path.display().to_string(), format!("not a valid tar archive: {e}"));
        let mut ar = tar::Archive::new(BufReader::new(f));
        let mut items = HashMap::new();
        for e in ar.entries().map_err(corrupt)? {
            let e = e.map_err(corrupt)?;
            let Some(name) = normalize(&String::from_utf8_lossy(&e.path_bytes())) else {
                continue;
            };
            let name = name.to_string_lossy().into_owned();
            match e.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    items.insert(name, TarItem::File { offset: e.raw_file_position(), size: e.size() });
                }
                tar::EntryType::Symlink => {
                    if let Some(t) = e.link_name_bytes() {
                        items.insert(name, TarItem::Symlink(String::from_utf8_lossy(&t).into_owned()));
                    }
                }
                _ => {}
            }
        }
        Ok(TarFiles { path: path.to_path_buf(), items })
    }
}

impl Files for TarFiles {
    fn what(&self) -> String {
        self.path.display().to_string()
    }
    fn open(&mut self, name: &str) -> Result<Option<(Box<dyn Read>, u64)>> {
        let mut cur = match normalize(name) {
            Some(n) => n.to_string_lossy().into_owned(),
            None => return Ok(None),
        };
        for _ in 0..8 {
            match self.items.get(&cur) {
                None => return Ok(None),
                Some(TarItem::File { offset, size }) => {
                    let mut f = File::open(&self.path).at("opening", &self.path)?;
                    f.seek(SeekFrom::Start(*offset)).at("seeking in", &self.path)?;
                    return Ok(Some((Box::new(f.take(*size)), *size)));
                }
                Some(TarItem::Symlink(t)) => {
                    let base = Path::new(&cur).parent().unwrap_or(Path::new(""));
                    let joined = if t.starts_with('/') { PathBuf::from(t) } else { base.join(t) };
                    cur = match normalize(&joined.to_string_lossy()) {
                        Some(n) => n.to_string_lossy().into_owned(),
                        None => return Ok(None),
                    };
                }
            }
        }
        Err(Error::invalid(self.what(), format!("symlink loop at {name}")))
    }
}

/// Lexically normalize a relative in-archive path; `None` if it leaves the top.
fn normalize(name: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(name.trim_start_matches('/')).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

fn read_small(files: &mut dyn Files, name: &str) -> Result<Vec<u8>> {
    let (r, size) = files.open(name)?.ok_or_else(|| Error::invalid(files.what(), format!("missing {name}")))?;
    if size > MAX_SMALL {
        return Err(Error::invalid(files.what(), format!("{name} is larger than 16 MiB")));
    }
    let mut buf = Vec::new();
    r.take(MAX_SMALL).read_to_end(&mut buf).ctx(|| format!("reading {name} in {}", files.what()))?;
    Ok(buf)
}

fn blob_name(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// Copy a blob from `files` into the store, verifying digest and size.
fn copy_blob(
    store: &Store,
    files: &mut dyn Files,
    d: &Digest,
    size: u64,
    kind: BlobKind,
    progress: &dyn Progress,
) -> Result<()> {
    if store.has_blob(d) {
        progress.blob_finished(d, kind, true);
        return Ok(());
    }
    let (mut r, _) =
        files.open(&blob_name(d))?.ok_or_else(|| Error::invalid(files.what(), format!("blob {d} is missing")))?;
    progress.blob_started(d, kind, size);
    let mut w = store.blob_writer()?;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = r.read(&mut buf).ctx(|| format!("reading blob {d} from {}", files.what()))?;
        if n == 0 {
            break;
        }
        if w.written() + n as u64 > size {
            return Err(Error::SizeMismatch {
                what: format!("blob {d}"),
                expected: size,
                actual: w.written() + n as u64,
            });
        }
        w.write_all(&buf[..n]).ctx(|| "writing blob".into())?;
        progress.blob_advanced(d, n as u64);
    }
    w.commit(d, Some(size))?;
    progress.blob_finished(d, kind, false);
    Ok(())
}

fn import_layout(
    store: &Store,
    files: &mut dyn Files,
    tag: Option<&str>,
    platform: &Platform,
    name: String,
    progress: &dyn Progress,
) -> Result<ImageRecord> {
    let what = files.what();
    let layout: serde_json::Value = serde_json::from_slice(&read_small(files, "oci-layout")?)
        .map_err(|e| Error::invalid(&what, format!("bad oci-layout file: {e}")))?;
    if layout.get("imageLayoutVersion").and_then(|v| v.as_str()).is_none() {
        return Err(Error::invalid(&what, "oci-layout has no imageLayoutVersion"));
    }
    let index_bytes = read_small(files, "index.json")?;
    let index = match parse_manifest_or_index(&index_bytes, &what)? {
        Parsed::Index(i) => i,
        Parsed::Manifest(_) => return Err(Error::invalid(&what, "index.json is not an image index")),
    };
    let ref_name =
        |d: &oci_spec::image::Descriptor| d.annotations().as_ref().and_then(|a| a.get(REF_NAME_ANNOTATION)).cloned();
    let desc = match tag {
        Some(t) => {
            index.manifests().iter().find(|d| ref_name(d).is_some_and(|n| tag_matches(&n, t))).ok_or_else(|| {
                let tags: Vec<String> = index.manifests().iter().filter_map(ref_name).collect();
                Error::NotFound(format!("tag {t:?} in {what} (tags: {})", tags.join(", ")))
            })?
        }
        None => match index.manifests().as_slice() {
            [one] => one,
            [] => return Err(Error::invalid(&what, "index.json lists no images")),
            many => {
                // Several entries: a multi-platform image list, or several tags.
                if many.iter().all(|d| d.platform().is_some()) {
                    select_platform(&index, platform, &what)?
                } else {
                    let tags: Vec<String> = many.iter().filter_map(ref_name).collect();
                    return Err(Error::invalid(
                        &what,
                        format!("holds several images; pick one with :TAG (tags: {})", tags.join(", ")),
                    ));
                }
            }
        },
    };
    let mut digest = descriptor_digest(desc)?;
    let mut size = desc.size();
    let mut index_digest = None;
    for _ in 0..4 {
        let (mut r, _) = files
            .open(&blob_name(&digest))?
            .ok_or_else(|| Error::invalid(&what, format!("blob {digest} is missing")))?;
        if size > MAX_SMALL {
            return Err(Error::invalid(&what, "manifest larger than 16 MiB"));
        }
        let mut bytes = Vec::new();
        (&mut r).take(size + 1).read_to_end(&mut bytes).ctx(|| format!("reading {digest}"))?;
        if bytes.len() as u64 != size {
            return Err(Error::SizeMismatch {
                what: format!("manifest {digest}"),
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        digest.verify(&Digest::of(&bytes), format_args!("manifest {digest} in {what}"))?;
        match parse_manifest_or_index(&bytes, &what)? {
            Parsed::Index(i) => {
                store.put_blob(&bytes, Some(&digest))?;
                index_digest = Some(digest.clone());
                let d = select_platform(&i, platform, &what)?;
                digest = descriptor_digest(d)?;
                size = d.size();
            }
            Parsed::Manifest(m) => {
                let total = m.layers().iter().map(|l| l.size()).sum();
                progress.resolved(&name, &digest, m.layers().len(), total);
                copy_blob(
                    store,
                    files,
                    &descriptor_digest(m.config())?,
                    m.config().size(),
                    BlobKind::Config,
                    progress,
                )?;
                for l in m.layers() {
                    copy_blob(store, files, &descriptor_digest(l)?, l.size(), BlobKind::Layer, progress)?;
                }
                store.put_blob(&bytes, Some(&digest))?;
                let rec = ImageRecord { name, manifest: digest, index: index_digest };
                store.set_image(&rec)?;
                return Ok(rec);
            }
        }
    }
    Err(Error::invalid(&what, "indexes nested too deeply"))
}

fn tag_matches(ref_name: &str, wanted: &str) -> bool {
    if ref_name == wanted || ref_name.ends_with(&format!(":{wanted}")) {
        return true;
    }
    matches!((Reference::parse(ref_name), Reference::parse(wanted)), (Ok(a), Ok(b)) if a == b)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn import_docker(
    store: &Store,
    files: &mut dyn Files,
    wanted: Option<&str>,
    name: String,
    progress: &dyn Progress,
) -> Result<ImageRecord> {
    let what = files.what();
    let entries: Vec<DockerEntry> = serde_json::from_slice(&read_small(files, "manifest.json")?)
        .map_err(|e| Error::invalid(&what, format!("bad manifest.json: {e}")))?;
    let tags_of = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let entry = match wanted {
        Some(w) => entries.iter().find(|e| tags_of(e).iter().any(|t| tag_matches(t, w))).ok_or_else(|| {
            let all: Vec<String> = entries.iter().flat_map(tags_of).collect();
            Error::NotFound(format!("{w:?} in {what} (tags: {})", all.join(", ")))
        })?,
        None => match entries.as_slice() {
            [one] => one,
            [] => return Err(Error::invalid(&what, "manifest.json lists no images")),
            _ => {
                let all: Vec<String> = entries.iter().flat_map(tags_of).collect();
                return Err(Error::invalid(
                    &what,
                    format!("holds several images; pick one with :NAME:TAG (tags: {})", all.join(", ")),
                ));
            }
        },
    };
    let config_bytes = read_small(files, &entry.config)?;
    let config_digest = Digest::of(&config_bytes);
    // `<hex>.json` (classic) or `blobs/sha256/<hex>` (docker 25+): the name is the digest.
    let stem = Path::new(&entry.config).file_name().map(|s| s.to_string_lossy().trim_end_matches(".json").to_string());
    if let Some(hex) = stem.filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())) {
        Digest::parse(&format!("sha256:{hex}"))?
            .verify(&config_digest, format_args!("config {} in {what}", entry.config))?;
    }
    let config = ImageConfig::from_json(&config_bytes)?;
    if config.diff_ids.len() != entry.layers.len() {
        return Err(Error::invalid(
            &what,
            format!("config lists {} diff_ids for {} layers", config.diff_ids.len(), entry.layers.len()),
        ));
    }
    store.put_blob(&config_bytes, Some(&config_digest))?;
    let mut layers = Vec::new();
    for (path, diff_id) in entry.layers.iter().zip(&config.diff_ids) {
        let (r, size) = files.open(path)?.ok_or_else(|| Error::invalid(&what, format!("layer {path} is missing")))?;
        progress.blob_started(diff_id, BlobKind::Layer, size);
        let mut br = BufReader::with_capacity(256 << 10, r);
        let head = br.fill_buf().ctx(|| format!("reading {path}"))?.to_vec();
        let media = if head.starts_with(&[0x1f, 0x8b]) {
            OCI_LAYER_GZIP
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            OCI_LAYER_ZSTD
        } else {
            OCI_LAYER_TAR
        };
        let mut w = store.blob_writer()?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = br.read(&mut buf).ctx(|| format!("reading {path} in {what}"))?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).ctx(|| "writing blob".into())?;
            progress.blob_advanced(diff_id, n as u64);
        }
        let (digest, n) = if media == OCI_LAYER_TAR {
            // Uncompressed: the blob digest is the diff_id.
            (w.commit(diff_id, Some(size))?, size)
        } else {
            let (d, n) = w.commit_computed()?;
            let f = store.open_blob(&d)?;
            let dec: Box<dyn Read> = if media == OCI_LAYER_GZIP {
                Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f)))
            } else {
                Box::new(zstd::stream::read::Decoder::new(f).ctx(|| format!("decompressing {path}"))?)
            };
            let (got, _) = HashingReader::new(dec)
                .drain_and_finish()
                .map_err(|e| Error::CorruptLayer { layer: path.clone(), detail: e.to_string() })?;
            diff_id.verify(&got, format_args!("layer {path} in {what} (diff_id)"))?;
            (d, n)
        };
        progress.blob_finished(diff_id, BlobKind::Layer, false);
        layers.push(serde_json::json!({"mediaType": media, "digest": digest.as_str(), "size": n}));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest.as_str(), "size": config_bytes.len()},
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::io("encoding manifest", e.into()))?;
    let manifest_digest = store.put_blob(&bytes, None)?;
    let rec = ImageRecord { name, manifest: manifest_digest, index: None };
    store.set_image(&rec)?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("./a/b/../c").unwrap(), PathBuf::from("a/c"));
        assert_eq!(normalize("/blobs/sha256/x").unwrap(), PathBuf::from("blobs/sha256/x"));
        assert!(normalize("../x").is_none());
        assert!(normalize("./").is_none());
    }

    #[test]
    fn tags() {
        assert!(tag_matches("latest", "latest"));
        assert!(tag_matches("docker.io/library/busybox:latest", "latest"));
        assert!(tag_matches("busybox:latest", "docker.io/library/busybox:latest"));
        assert!(!tag_matches("v1", "v2"));
    }
}
