//! Pulls from a real registry (Debian's docker-registry on 127.0.0.1).

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::layout::{self, check_busybox_tree, check_whiteout_tree, Compression, ImageSpec, Layout};
use common::proxy::{Mode, Proxy};
use common::{runtime, Registry, TempDir};
use sm_oci::progress::BlobKind;
use sm_oci::{Auth, Digest, Error, NoProgress, Progress, PullOptions, Reference, Store};

fn pull(store: &Store, reference: &str, opts: &PullOptions) -> sm_oci::Result<sm_oci::ImageRecord> {
    pull_with(store, reference, opts, Arc::new(NoProgress))
}

fn pull_with(
    store: &Store,
    reference: &str,
    opts: &PullOptions,
    p: Arc<dyn Progress>,
) -> sm_oci::Result<sm_oci::ImageRecord> {
    let r = Reference::parse(reference).unwrap();
    runtime().block_on(sm_oci::pull(store, &r, opts, p))
}

fn fast_retries() -> PullOptions {
    PullOptions { retry_backoff: std::time::Duration::from_millis(20), ..Default::default() }
}

#[derive(Default)]
struct Counting {
    fetched: AtomicU32,
    cached: AtomicU32,
    retries: AtomicU32,
    bytes: AtomicU32,
}

impl Progress for Counting {
    fn blob_advanced(&self, _d: &Digest, n: u64) {
        self.bytes.fetch_add(n as u32, Ordering::Relaxed);
    }
    fn blob_retrying(&self, _d: &Digest, _a: u32, _e: &str) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    fn blob_finished(&self, _d: &Digest, kind: BlobKind, cached: bool) {
        if kind == BlobKind::Layer {
            if cached {
                self.cached.fetch_add(1, Ordering::Relaxed);
            } else {
                self.fetched.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[test]
fn pull_busybox_unpack_and_rootfs() {
    let reg = Registry::start();
    let tmp = TempDir::new("busybox");
    let desc = layout::busybox_layout(&tmp.join("layout"), "v1");
    reg.push(&tmp.join("layout"), "v1", "tiny/busybox:v1", false);

    let store = Store::open(tmp.join("store")).unwrap();
    let progress = Arc::new(Counting::default());
    let name = format!("{}/tiny/busybox:v1", reg.host());
    let rec = pull_with(&store, &name, &PullOptions::default(), progress.clone()).unwrap();
    assert_eq!(rec.name, name);
    assert_eq!(rec.manifest.as_str(), desc.digest, "skopeo keeps the OCI manifest as is");
    assert_eq!(progress.fetched.load(Ordering::Relaxed), 1);
    assert!(progress.bytes.load(Ordering::Relaxed) > 1000);

    let info = store.image_info(&name).unwrap();
    assert_eq!(info.layers.len(), 1);
    assert_eq!(info.config.cmd, vec!["sh".to_string()]);
    let spec = info.config.resolve(&sm_oci::RunOverrides::default()).unwrap();
    assert_eq!(spec.argv, vec!["sh".to_string()]);

    let root = tmp.join("root");
    let report = sm_oci::unpack_image(&store, &info, &root).unwrap();
    assert_eq!(report.layers, 1);
    check_busybox_tree(&root);
    // The unpacked busybox really runs.
    let out = std::process::Command::new(root.join("bin/busybox")).args(["echo", "hello"]).output().unwrap();
    assert_eq!(out.stdout, b"hello\n");

    // Pulling again fetches nothing.
    let again = Arc::new(Counting::default());
    pull_with(&store, &name, &PullOptions::default(), again.clone()).unwrap();
    assert_eq!(again.fetched.load(Ordering::Relaxed), 0);
    assert_eq!(again.cached.load(Ordering::Relaxed), 1);

    // Root disk: built once, then cached.
    let fs = sm_oci::build_rootfs(&store, &info, sm_oci::RootfsFormat::default()).unwrap();
    assert!(!fs.cached && fs.size > 0 && fs.path.starts_with(store.root()));
    let list = std::process::Command::new("unsquashfs").args(["-lls", "-d", ""]).arg(&fs.path).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("/bin/busybox") && list.contains("/bin/sh -> busybox"), "{list}");
    let fs2 = sm_oci::build_rootfs(&store, &info, sm_oci::RootfsFormat::default()).unwrap();
    assert!(fs2.cached);
    assert_eq!(fs2.path, fs.path);
    // Nothing left in tmp/.
    assert_eq!(std::fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn pull_whiteouts_and_opaque_dirs() {
    let reg = Registry::start();
    let tmp = TempDir::new("whiteout");
    let l = Layout::create(&tmp.join("layout"));
    let d = l.image(&ImageSpec::new(layout::whiteout_layers()));
    l.tag(&d, "latest");
    reg.push(&tmp.join("layout"), "latest", "wh/img:latest", false);
    let store = Store::open(tmp.join("store")).unwrap();
    let name = format!("{}/wh/img", reg.host());
    pull(&store, &name, &PullOptions::default()).unwrap();
    let info = store.image_info(&format!("{name}:latest")).unwrap();
    assert_eq!(info.layers.len(), 2);
    let root = tmp.join("root");
    sm_oci::unpack_image(&store, &info, &root).unwrap();
    check_whiteout_tree(&root);
}

#[test]
fn multi_platform_index_and_pull_by_digest() {
    let reg = Registry::start();
    let tmp = TempDir::new("index");
    let l = Layout::create(&tmp.join("layout"));
    let amd = l.image(&ImageSpec::new(vec![vec![layout::file("which", b"amd64")]]));
    let mut arm_spec = ImageSpec::new(vec![vec![layout::file("which", b"arm64")]]);
    arm_spec.architecture = "arm64";
    arm_spec.compression = Compression::Zstd;
    let arm = l.image(&arm_spec);
    let idx = l.index(&[(arm, "arm64"), (amd.clone(), "amd64")]);
    l.tag(&idx, "multi");
    reg.push(&tmp.join("layout"), "multi", "multi/img:multi", true);

    let store = Store::open(tmp.join("store")).unwrap();
    let name = format!("{}/multi/img:multi", reg.host());
    let rec = pull(&store, &name, &PullOptions::default()).unwrap();
    assert_eq!(rec.manifest.as_str(), amd.digest);
    assert_eq!(rec.index.as_ref().map(|d| d.to_string()), Some(idx.digest.clone()));
    let info = store.image_info(&name).unwrap();
    let root = tmp.join("root");
    sm_oci::unpack_image(&store, &info, &root).unwrap();
    assert_eq!(std::fs::read(root.join("which")).unwrap(), b"amd64");

    // By digest.
    let by_digest = format!("{}/multi/img@{}", reg.host(), amd.digest);
    let rec = pull(&store, &by_digest, &PullOptions::default()).unwrap();
    assert_eq!(rec.manifest.as_str(), amd.digest);

    // A platform that is not there.
    let opts = PullOptions {
        platform: sm_oci::Platform { os: "linux".into(), architecture: "s390x".into(), variant: None },
        ..Default::default()
    };
    let e = pull(&store, &name, &opts).unwrap_err();
    assert!(matches!(e, Error::NoMatchingPlatform { .. }), "{e}");
    assert!(e.to_string().contains("linux/arm64"), "{e}");

    // Unknown tag.
    let e = pull(&store, &format!("{}/multi/img:nope", reg.host()), &PullOptions::default()).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
}

#[test]
fn basic_auth_registry() {
    let reg = Registry::start_with_auth("alice", "s3cret");
    let tmp = TempDir::new("auth");
    layout::busybox_layout(&tmp.join("layout"), "v1");
    reg.push(&tmp.join("layout"), "v1", "private/bb:v1", false);
    let store = Store::open(tmp.join("store")).unwrap();
    let name = format!("{}/private/bb:v1", reg.host());

    let e = pull(&store, &name, &PullOptions::default()).unwrap_err();
    eprintln!("no credentials: {e}");
    assert!(e.is_unauthorized(), "{e}");
    assert!(e.to_string().contains("authentication required"), "{e}");

    let wrong =
        PullOptions { auth: Auth::Basic { username: "alice".into(), password: "nope".into() }, ..Default::default() };
    let e = pull(&store, &name, &wrong).unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    assert!(store.images().unwrap().is_empty());

    let right =
        PullOptions { auth: Auth::Basic { username: "alice".into(), password: "s3cret".into() }, ..Default::default() };
    pull(&store, &name, &right).unwrap();
    let info = store.image_info(&name).unwrap();
    sm_oci::unpack_image(&store, &info, &tmp.join("root")).unwrap();
    check_busybox_tree(&tmp.join("root"));
}

#[test]
fn bearer_token_auth() {
    let reg = Registry::start();
    let tmp = TempDir::new("bearer");
    layout::busybox_layout(&tmp.join("layout"), "v1");
    reg.push(&tmp.join("layout"), "v1", "tok/bb:v1", false);
    let proxy =
        Proxy::start(reg.port, Mode::Bearer { token: "tkn-123".into(), user: "bob".into(), pass: "pw".into() }, 0);
    let store = Store::open(tmp.join("store")).unwrap();
    let name = format!("{}/tok/bb:v1", proxy.host());

    let e = pull(&store, &name, &PullOptions::default()).unwrap_err();
    eprintln!("bearer, no credentials: {e}");
    assert!(e.is_unauthorized(), "{e}");
    let bad = PullOptions { auth: Auth::Basic { username: "bob".into(), password: "x".into() }, ..Default::default() };
    assert!(pull(&store, &name, &bad).unwrap_err().is_unauthorized());

    let good =
        PullOptions { auth: Auth::Basic { username: "bob".into(), password: "pw".into() }, ..Default::default() };
    pull(&store, &name, &good).unwrap();
    assert!(proxy.tokens_issued.load(Ordering::SeqCst) >= 1);

    // A ready token works too.
    let store2 = Store::open(tmp.join("store2")).unwrap();
    let tok = PullOptions { auth: Auth::Bearer("tkn-123".into()), ..Default::default() };
    pull(&store2, &name, &tok).unwrap();
    sm_oci::unpack_image(&store2, &store2.image_info(&name).unwrap(), &tmp.join("root")).unwrap();
    check_busybox_tree(&tmp.join("root"));
}

#[test]
fn corrupted_blob_in_registry_is_refused() {
    let reg = Registry::start();
    let tmp = TempDir::new("corrupt");
    let desc = layout::busybox_layout(&tmp.join("layout"), "v1");
    reg.push(&tmp.join("layout"), "v1", "c/bb:v1", false);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.join("layout/blobs/sha256").join(&desc.digest[7..])).unwrap())
            .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let data = reg.blob_data(&layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();

    let store = Store::open(tmp.join("store")).unwrap();
    let name = format!("{}/c/bb:v1", reg.host());
    let e = pull(&store, &name, &fast_retries()).unwrap_err();
    eprintln!("flipped byte: {e}");
    assert!(e.is_integrity(), "expected a digest error, got: {e}");
    assert!(e.to_string().contains(&layer), "{e}");
    assert!(!store.has_blob(&Digest::parse(&layer).unwrap()));
    assert!(store.images().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);

    // Truncated on disk: the registry serves fewer bytes than the descriptor says.
    bytes[mid] ^= 0x40;
    bytes.truncate(mid);
    std::fs::write(&data, &bytes).unwrap();
    let e = pull(&store, &name, &fast_retries()).unwrap_err();
    eprintln!("truncated: {e}");
    assert!(e.is_integrity(), "expected an integrity error, got: {e}");
    assert!(store.images().unwrap().is_empty());
}

#[test]
fn transient_failures_are_retried() {
    let reg = Registry::start();
    let tmp = TempDir::new("retry");
    layout::busybox_layout(&tmp.join("layout"), "v1");
    reg.push(&tmp.join("layout"), "v1", "r/bb:v1", false);

    // Two 503s on blob fetches, then success.
    let proxy = Proxy::start(reg.port, Mode::FailBlobs, 2);
    let store = Store::open(tmp.join("store")).unwrap();
    let progress = Arc::new(Counting::default());
    pull_with(&store, &format!("{}/r/bb:v1", proxy.host()), &fast_retries(), progress.clone()).unwrap();
    assert_eq!(proxy.injected.load(Ordering::SeqCst), 2);

    // Bodies cut short by the connection closing early: retried, then fine.
    let proxy = Proxy::start(reg.port, Mode::TruncateBlobs, 1);
    let store = Store::open(tmp.join("store-t")).unwrap();
    pull(&store, &format!("{}/r/bb:v1", proxy.host()), &fast_retries()).unwrap();
    assert_eq!(proxy.injected.load(Ordering::SeqCst), 1);
    sm_oci::unpack_image(&store, &store.image_info(&format!("{}/r/bb:v1", proxy.host())).unwrap(), &tmp.join("root"))
        .unwrap();
    check_busybox_tree(&tmp.join("root"));

    // A server that always truncates: refused after the retries.
    let proxy = Proxy::start(reg.port, Mode::AlwaysTruncate, 0);
    let store = Store::open(tmp.join("store-a")).unwrap();
    let opts = PullOptions { retries: 2, ..fast_retries() };
    let e = pull(&store, &format!("{}/r/bb:v1", proxy.host()), &opts).unwrap_err();
    eprintln!("always truncated: {e}");
    assert!(store.images().unwrap().is_empty(), "{e}");
    assert!(proxy.injected.load(Ordering::SeqCst) >= 3, "{e}");
}

#[test]
fn https_registry_with_private_ca() {
    let (reg, pem) = Registry::start_tls();
    let tmp = TempDir::new("tls");
    layout::busybox_layout(&tmp.join("layout"), "v1");
    reg.push(&tmp.join("layout"), "v1", "tls/bb:v1", false);
    let store = Store::open(tmp.join("store")).unwrap();
    let name = format!("{}/tls/bb:v1", reg.host());

    // Loopback defaults to plain HTTP, which this HTTPS-only registry refuses.
    let e = pull(&store, &name, &PullOptions { retries: 0, ..Default::default() }).unwrap_err();
    eprintln!("plain http to an https registry: {e}");
    // HTTPS with an unknown CA: refused.
    let https = PullOptions { loopback_plain_http: false, retries: 0, ..Default::default() };
    let e = pull(&store, &name, &https).unwrap_err();
    eprintln!("unknown CA: {e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // Trusting the CA: works.
    let trusted = PullOptions { extra_root_certificates_pem: vec![pem], ..https };
    pull(&store, &name, &trusted).unwrap();
    sm_oci::unpack_image(&store, &store.image_info(&name).unwrap(), &tmp.join("root")).unwrap();
    check_busybox_tree(&tmp.join("root"));
}
