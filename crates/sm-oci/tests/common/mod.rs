//! Test harness: temp dirs, a real registry (Debian's `docker-registry`),
//! OCI layouts built here (tar + gzip layers, config, manifest, index.json),
//! `skopeo` pushes, and a tree digest to compare unpacked trees.

#![allow(dead_code)]

pub mod layout;
pub mod proxy;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::Digest as _;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Fail (with the apt package to install) when a program is missing.
pub fn require_tool(path: &str, package: &str) -> PathBuf {
    let p = PathBuf::from(path);
    if !p.exists() {
        panic!("{path} is missing: the sm-oci tests need Debian's {package} package: apt-get install {package}");
    }
    p
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "sm-oci-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(&self.0).is_err() {
            let _ = Command::new("chmod").arg("-R").arg("u+rwx").arg(&self.0).status();
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `docker-registry` on 127.0.0.1:<free port>, storage in a temp dir; killed on drop.
pub struct Registry {
    pub port: u16,
    pub dir: TempDir,
    child: Child,
    pub creds: Option<(String, String)>,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_inner(None, false)
    }

    /// HTTPS with a self-signed certificate for 127.0.0.1; returns its PEM too.
    pub fn start_tls() -> (Registry, Vec<u8>) {
        let reg = Self::start_inner(None, true);
        let pem = std::fs::read(reg.dir.join("cert.pem")).unwrap();
        (reg, pem)
    }

    /// With htpasswd (basic) auth for `user`/`pass`.
    pub fn start_with_auth(user: &str, pass: &str) -> Registry {
        Self::start_inner(Some((user.to_string(), pass.to_string())), false)
    }

    fn start_inner(creds: Option<(String, String)>, tls: bool) -> Registry {
        let bin = require_tool("/usr/bin/docker-registry", "docker-registry");
        let dir = TempDir::new("registry");
        let tls = tls.then(|| {
            let openssl = require_tool("/usr/bin/openssl", "openssl");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            let out = Command::new(openssl)
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=sm-oci-test"])
                .args(["-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .unwrap();
            assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
            format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display())
        });
        let mut auth = String::new();
        if let Some((u, p)) = &creds {
            let htpasswd = require_tool("/usr/bin/htpasswd", "apache2-utils");
            let out = Command::new(htpasswd).args(["-Bbn", u, p]).output().unwrap();
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
            auth =
                format!("auth:\n  htpasswd:\n    realm: sm-oci-test\n    path: {}\n", dir.join("htpasswd").display());
        }
        for attempt in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{}{auth}",
                dir.join("storage").display(),
                tls.as_deref().unwrap_or("")
            );
            let cfg = dir.join("config.yml");
            std::fs::write(&cfg, config).unwrap();
            let log = std::fs::File::create(dir.join("registry.log")).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting docker-registry");
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Registry { port, dir, child, creds };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "registry did not come up (attempt {attempt}): {}",
                std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
        }
        panic!("docker-registry did not start");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy` an OCI layout tag into this registry as `name:tag` (`--all`: every platform).
    pub fn push(&self, layout: &Path, layout_tag: &str, name: &str, all: bool) {
        let mut args =
            vec!["--insecure-policy".to_string(), "copy".into(), "-q".into(), "--dest-tls-verify=false".into()];
        if all {
            args.push("--all".into());
        }
        if let Some((u, p)) = &self.creds {
            args.push("--dest-creds".into());
            args.push(format!("{u}:{p}"));
        }
        args.push(format!("oci:{}:{layout_tag}", layout.display()));
        args.push(format!("docker://{}/{name}", self.host()));
        skopeo(&args);
    }

    /// The registry's on-disk data file for a blob.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.join("storage/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn skopeo(args: &[String]) {
    let bin = require_tool("/usr/bin/skopeo", "skopeo");
    let out = Command::new(bin).args(args).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "skopeo {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A digest of a whole tree: every entry's relative path, type, mode, owner,
/// mtime (not for the root), size, content hash or link target, and link count.
pub fn tree_digest(root: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("l {}", std::fs::read_link(&p).unwrap().display())
            } else if ft.is_dir() {
                "d".to_string()
            } else if ft.is_file() {
                let data = std::fs::read(&p).unwrap();
                let h: String = sha2::Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
                format!("f {} {h}", data.len())
            } else {
                "other".to_string()
            };
            out.push(format!(
                "{rel} {what} mode={:o} uid={} gid={} mtime={} nlink={}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                if ft.is_dir() { 0 } else { m.nlink() }
            ));
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut lines = Vec::new();
    walk(root, root, &mut lines);
    let joined = lines.join("\n");
    let d = sha2::Sha256::digest(joined.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Listing of a tree (for assertion messages).
pub fn list_tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut v: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
        v.sort();
        for p in v {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

pub fn sha256_file(p: &Path) -> String {
    let d = sha2::Sha256::digest(std::fs::read(p).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}
