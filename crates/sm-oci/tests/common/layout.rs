//! Building OCI image layouts in Rust: layers written header by header (so
//! hostile names can be crafted), gzip/zstd/plain, config, manifest, index.json.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::Digest as _;

/// Fixed mtime of every entry built here.
pub const MTIME: u64 = 1_700_000_000;

/// One tar entry.
#[derive(Clone, Debug)]
pub enum Entry {
    Dir(&'static str, u32),
    File(String, Vec<u8>, u32),
    Symlink(String, String),
    Hardlink(String, String),
    CharDev(String),
    BlockDev(String),
    Fifo(String),
    /// File owned by uid:gid.
    Owned(String, Vec<u8>, u32, u32),
    /// An entry preceded by a PAX header with these records.
    Pax(Box<Entry>, Vec<(String, Vec<u8>)>),
}

/// `entry` with extended attributes (`SCHILY.xattr.NAME` PAX records, as
/// Docker and umoci write them).
pub fn with_xattrs(entry: Entry, xattrs: &[(&str, &[u8])]) -> Entry {
    Entry::Pax(Box::new(entry), xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.to_vec())).collect())
}

/// `entry` preceded by these PAX records.
pub fn with_pax(entry: Entry, records: &[(&str, &[u8])]) -> Entry {
    Entry::Pax(Box::new(entry), records.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect())
}

pub fn file(path: &str, data: &[u8]) -> Entry {
    Entry::File(path.to_string(), data.to_vec(), 0o644)
}
pub fn exe(path: &str, data: &[u8]) -> Entry {
    Entry::File(path.to_string(), data.to_vec(), 0o755)
}
pub fn symlink(path: &str, target: &str) -> Entry {
    Entry::Symlink(path.to_string(), target.to_string())
}
pub fn hardlink(path: &str, target: &str) -> Entry {
    Entry::Hardlink(path.to_string(), target.to_string())
}

fn header(name: &[u8], kind: tar::EntryType, size: u64, mode: u32, link: &[u8]) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    {
        let u = h.as_ustar_mut().unwrap();
        assert!(name.len() <= 100 && link.len() <= 100, "test names must fit ustar fields");
        u.name = [0; 100];
        u.name[..name.len()].copy_from_slice(name);
        u.linkname = [0; 100];
        u.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_cksum();
    h
}

/// An uncompressed tar of `entries` (names written verbatim, unchecked).
pub fn tar_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        append_entry(&mut b, e);
    }
    b.into_inner().unwrap()
}

fn append_entry(b: &mut tar::Builder<Vec<u8>>, e: &Entry) {
    let (h, data): (tar::Header, &[u8]) = match e {
        Entry::Pax(inner, records) => {
            b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
            return append_entry(b, inner);
        }
        Entry::Dir(p, mode) => (header(p.as_bytes(), tar::EntryType::Directory, 0, *mode, b""), &[]),
        Entry::File(p, d, mode) => (header(p.as_bytes(), tar::EntryType::Regular, d.len() as u64, *mode, b""), d),
        Entry::Owned(p, d, uid, gid) => {
            let mut h = header(p.as_bytes(), tar::EntryType::Regular, d.len() as u64, 0o640, b"");
            h.set_uid(u64::from(*uid));
            h.set_gid(u64::from(*gid));
            h.set_cksum();
            (h, d)
        }
        Entry::Symlink(p, t) => (header(p.as_bytes(), tar::EntryType::Symlink, 0, 0o777, t.as_bytes()), &[]),
        Entry::Hardlink(p, t) => (header(p.as_bytes(), tar::EntryType::Link, 0, 0o644, t.as_bytes()), &[]),
        Entry::CharDev(p) => (header(p.as_bytes(), tar::EntryType::Char, 0, 0o666, b""), &[]),
        Entry::BlockDev(p) => (header(p.as_bytes(), tar::EntryType::Block, 0, 0o660, b""), &[]),
        Entry::Fifo(p) => (header(p.as_bytes(), tar::EntryType::Fifo, 0, 0o644, b""), &[]),
    };
    b.append(&h, data).unwrap();
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

pub fn sha(data: &[u8]) -> String {
    let d = sha2::Sha256::digest(data);
    format!("sha256:{}", d.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// What goes into an image.
pub struct ImageSpec {
    pub layers: Vec<Vec<Entry>>,
    pub compression: Compression,
    pub config: Value,
    pub architecture: &'static str,
}

impl ImageSpec {
    pub fn new(layers: Vec<Vec<Entry>>) -> ImageSpec {
        ImageSpec {
            layers,
            compression: Compression::Gzip,
            config: json!({"Cmd": ["sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}),
            architecture: "amd64",
        }
    }
}

/// A descriptor as JSON (mediaType, digest, size).
#[derive(Clone, Debug)]
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Desc {
    pub fn json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// An OCI image layout directory being written.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn create(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::write(dir.join("index.json"), json!({"schemaVersion": 2, "manifests": []}).to_string()).unwrap();
        Layout { dir: dir.to_path_buf() }
    }

    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> Desc {
        let d = sha(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
        Desc { media_type: media_type.to_string(), digest: d, size: bytes.len() as u64 }
    }

    /// Write layers, config and manifest; returns the manifest descriptor.
    pub fn image(&self, spec: &ImageSpec) -> Desc {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for entries in &spec.layers {
            let tar = tar_bytes(entries);
            diff_ids.push(sha(&tar));
            let (mt, bytes) = match spec.compression {
                Compression::None => ("application/vnd.oci.image.layer.v1.tar", tar),
                Compression::Gzip => ("application/vnd.oci.image.layer.v1.tar+gzip", gzip(&tar)),
                Compression::Zstd => ("application/vnd.oci.image.layer.v1.tar+zstd", zstd_compress(&tar)),
            };
            layers.push(self.blob(mt, &bytes).json());
        }
        let config = json!({
            "architecture": spec.architecture,
            "os": "linux",
            "config": spec.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "sm-oci tests"}],
        });
        let cfg = self.blob("application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cfg.json(),
            "layers": layers,
        });
        self.blob("application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes())
    }

    /// An index over (descriptor, architecture) pairs; returns its descriptor.
    pub fn index(&self, entries: &[(Desc, &str)]) -> Desc {
        let manifests: Vec<Value> = entries
            .iter()
            .map(|(d, arch)| {
                let mut v = d.json();
                v["platform"] = json!({"os": "linux", "architecture": arch});
                v
            })
            .collect();
        let idx =
            json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        self.blob("application/vnd.oci.image.index.v1+json", idx.to_string().as_bytes())
    }

    /// Add `desc` to index.json under `tag`.
    pub fn tag(&self, desc: &Desc, tag: &str) {
        let p = self.dir.join("index.json");
        let mut idx: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let mut v = desc.json();
        v["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        idx["manifests"].as_array_mut().unwrap().push(v);
        std::fs::write(&p, idx.to_string()).unwrap();
    }
}

/// The static busybox binary and a few applet symlinks, as one layer.
pub fn busybox_layer() -> Vec<Entry> {
    let bb = std::fs::read(super::require_tool("/bin/busybox", "busybox-static")).unwrap();
    let mut v = vec![
        Entry::Dir("bin/", 0o755),
        Entry::File("bin/busybox".into(), bb, 0o755),
        Entry::Dir("etc/", 0o755),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        Entry::Dir("tmp/", 0o1777),
        Entry::Dir("root/", 0o700),
        Entry::Dir("usr/", 0o755),
        Entry::Dir("usr/bin/", 0o755),
        symlink("usr/bin/env", "/bin/busybox"),
    ];
    for applet in ["sh", "ls", "cat", "echo", "true", "mkdir"] {
        v.push(symlink(&format!("bin/{applet}"), "busybox"));
    }
    v
}

/// Checks that the busybox tree is right.
pub fn check_busybox_tree(root: &Path) {
    let bb = root.join("bin/busybox");
    let m = std::fs::symlink_metadata(&bb)
        .unwrap_or_else(|e| panic!("bin/busybox: {e}; tree: {:?}", super::list_tree(root)));
    assert!(m.is_file());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(m.permissions().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::read(&bb).unwrap(), std::fs::read("/bin/busybox").unwrap());
    for applet in ["sh", "ls", "cat"] {
        let l = root.join("bin").join(applet);
        assert_eq!(std::fs::read_link(&l).unwrap(), PathBuf::from("busybox"));
        assert_eq!(std::fs::canonicalize(&l).unwrap(), std::fs::canonicalize(&bb).unwrap());
    }
    assert_eq!(std::fs::read_link(root.join("usr/bin/env")).unwrap(), PathBuf::from("/bin/busybox"));
    let tmp = std::fs::metadata(root.join("tmp")).unwrap();
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.mtime(), MTIME as i64);
}

/// A layout holding the busybox image as `tag`; returns the manifest descriptor.
pub fn busybox_layout(dir: &Path, tag: &str) -> Desc {
    let l = Layout::create(dir);
    let d = l.image(&ImageSpec::new(vec![busybox_layer()]));
    l.tag(&d, tag);
    d
}

/// Two layers exercising whiteouts, an opaque directory, hard links.
pub fn whiteout_layers() -> Vec<Vec<Entry>> {
    let lower = vec![
        Entry::Dir("etc/", 0o755),
        file("etc/keep", b"keep"),
        file("etc/gone", b"gone"),
        Entry::Dir("dir/", 0o755),
        file("dir/a", b"old a"),
        Entry::Dir("dir/sub/", 0o755),
        file("dir/sub/b", b"b"),
        Entry::Dir("opq/", 0o755),
        file("opq/lower1", b"lower"),
        Entry::Dir("opq/lowerdir/", 0o755),
        file("opq/lowerdir/x", b"x"),
        Entry::Dir("removed-dir/", 0o755),
        file("removed-dir/inner", b"inner"),
        file("data", b"shared data"),
    ];
    let upper = vec![
        file("etc/.wh.gone", b""),
        file(".wh.removed-dir", b""),
        file("dir/a", b"new a"),
        Entry::Dir("opq/", 0o750),
        file("opq/upper", b"upper"),
        file("opq/.wh..wh..opq", b""),
        file("opq/upper2", b"upper2"),
        hardlink("data-link", "data"),
        Entry::Owned("owned".into(), b"owned by 1234".to_vec(), 1234, 4321),
    ];
    vec![lower, upper]
}

pub fn check_whiteout_tree(root: &Path) {
    let list = super::list_tree(root);
    let has = |p: &str| std::fs::symlink_metadata(root.join(p)).is_ok();
    assert!(has("etc/keep"), "{list:?}");
    assert!(!has("etc/gone"), "whiteout did not remove etc/gone: {list:?}");
    assert!(!has("removed-dir"), "whiteout did not remove removed-dir: {list:?}");
    assert!(!has("etc/.wh.gone") && !has(".wh.removed-dir"), "whiteout markers must not appear: {list:?}");
    assert_eq!(std::fs::read(root.join("dir/a")).unwrap(), b"new a");
    assert!(has("dir/sub/b"));
    let mut opq: Vec<String> = std::fs::read_dir(root.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    opq.sort();
    assert_eq!(
        opq,
        vec!["upper".to_string(), "upper2".to_string()],
        "opaque dir must hold only the upper layer's content"
    );
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(root.join("opq")).unwrap().permissions().mode() & 0o777, 0o750);
    let a = std::fs::metadata(root.join("data")).unwrap();
    let b = std::fs::metadata(root.join("data-link")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link must share the inode");
    let o = std::fs::metadata(root.join("owned")).unwrap();
    if rustix_is_root() {
        assert_eq!((o.uid(), o.gid()), (1234, 4321));
    }
}

pub fn rustix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })
        .unwrap_or(false)
}

/// sha256 of a file, streamed.
pub fn sha_file(p: &Path) -> String {
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// gzip `src` into `dst`, streamed.
pub fn gzip_file(src: &Path, dst: &Path) {
    let mut r = std::io::BufReader::new(std::fs::File::open(src).unwrap());
    let mut e = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(std::fs::File::create(dst).unwrap()),
        flate2::Compression::fast(),
    );
    std::io::copy(&mut r, &mut e).unwrap();
    e.finish().unwrap().flush().unwrap();
}

impl Layout {
    /// An image from prepared (tar, tar.gz) layer files.
    pub fn image_from_files(&self, layers: &[(&Path, &Path)], config: Value) -> Desc {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, gz) in layers {
            diff_ids.push(sha_file(tar));
            let d = sha_file(gz);
            std::fs::copy(gz, self.dir.join("blobs/sha256").join(&d[7..])).unwrap();
            let size = std::fs::metadata(gz).unwrap().len();
            descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size}));
        }
        let cfg = json!({"architecture": "amd64", "os": "linux", "config": config, "rootfs": {"type": "layers", "diff_ids": diff_ids}});
        let cfg = self.blob("application/vnd.oci.image.config.v1+json", cfg.to_string().as_bytes());
        let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg.json(), "layers": descs});
        self.blob("application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes())
    }
}
