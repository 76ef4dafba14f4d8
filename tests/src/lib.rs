//! Shared helpers of the end-to-end tests in `tests/tests/`: finding KVM and the
//! guest artifacts, failing loudly in CI when they are missing, driving the
//! `supermachine` binary against a real local registry, and building test
//! images (host busybox; a Debian rootfs with python3 from debootstrap, cached
//! under `target/test-images/`). `cargo xtask bench image` uses them too.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sm_api::Hypervisor;

mod agent_snapshot;
pub mod containerd;
mod http;

pub use agent_snapshot::agent_snapshot;
pub use http::http_server;
pub use sm_testkit::{
    guest_artifacts, guest_dir, must_not_skip, random_bytes, sha256_hex, skip_or_fail, temp_dir, workspace_root,
    GuestArtifacts, SplitMix64, TempDir,
};

/// Opens KVM, or skips/fails with the reason.
pub fn hypervisor(test: &str) -> Option<Box<dyn Hypervisor>> {
    match sm_api::default_hypervisor() {
        Ok(hv) => Some(hv),
        Err(e) => skip_or_fail(test, e.to_string()),
    }
}

/// The agent guest image (kernel + agent initrd), or skips/fails with what to run.
pub fn agent_image(test: &str) -> Option<sm_api::GuestImage> {
    match sm_api::GuestImage::from_dir(&guest_dir()) {
        Ok(image) => Some(image),
        Err(e) => skip_or_fail(test, e.to_string()),
    }
}

// ---------------------------------------------------------------------------
// The `supermachine` binary, a real local registry, test images.

/// A `supermachine run`: a boot (cold here: ~30 s) plus a command, with room for a busy host.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The debug `supermachine` binary (`$SM_CLI_BIN` overrides), or skips/fails
/// with what to build.
pub fn cli_binary(test: &str) -> Option<PathBuf> {
    let bin = std::env::var_os("SM_CLI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/supermachine"));
    if bin.is_file() {
        Some(bin)
    } else {
        skip_or_fail(test, format!("{} is missing: run `cargo build -p sm-cli` first", bin.display()))
    }
}

/// Whether every `(path, package)` tool exists; skips/fails naming the
/// package to install otherwise.
pub fn tools(test: &str, tools: &[(&str, &str)]) -> bool {
    for (path, package) in tools {
        if !Path::new(path).exists() {
            return skip_or_fail::<()>(test, format!("{path} is missing: apt-get install {package}")).is_some();
        }
    }
    true
}

/// What a CLI test that runs VMs from a local registry needs: the CLI binary,
/// KVM, the agent guest, docker-registry, skopeo, mksquashfs and `extra` tools.
/// Returns the binary, or skips/fails naming what is missing.
pub fn cli_vm_prerequisites(test: &str, extra: &[(&str, &str)]) -> Option<PathBuf> {
    let bin = cli_binary(test)?;
    hypervisor(test)?;
    agent_image(test)?;
    let registry_tools = [
        ("/usr/bin/docker-registry", "docker-registry"),
        ("/usr/bin/skopeo", "skopeo"),
        ("/usr/bin/mksquashfs", "squashfs-tools"),
    ];
    let all: Vec<(&str, &str)> = registry_tools.iter().chain(extra).copied().collect();
    tools(test, &all).then_some(bin)
}

/// Writes an OCI image layout at `dir` holding a one-layer image of the
/// host's static busybox with applet links, tagged `latest`.
pub fn busybox_layout(dir: &Path) {
    let image =
        sm_api::oci::builtin::busybox_image(Path::new("/bin/busybox"), &["sh"], &["IMAGE_VAR=from-image"]).unwrap();
    image.write_layout(dir, "latest").unwrap();
}

/// `docker-registry` on 127.0.0.1:<free port>; killed on drop.
pub struct Registry {
    /// The port it listens on (plain HTTP).
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl Registry {
    /// Starts `/usr/bin/docker-registry` with its storage in a temp dir.
    pub fn start() -> Registry {
        let dir = temp_dir("registry");
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let cfg = dir.path().join("config.yml");
            std::fs::write(
                &cfg,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
                     rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                    dir.path().join("storage").display()
                ),
            )
            .unwrap();
            let mut child = Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting docker-registry");
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Registry { port, child, _dir: dir };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start");
    }

    /// Pushes the `latest` tag of the OCI layout at `layout` as `name` (`repo:tag`) with skopeo.
    pub fn push(&self, layout: &Path, name: &str) {
        let out = Command::new("/usr/bin/skopeo")
            .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://127.0.0.1:{}/{name}", self.port))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one CLI run showed.
pub struct CliOutput {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

/// Runs the CLI with its store in `home`, killing it after `timeout`.
pub fn cli(bin: &Path, home: &Path, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CliOutput {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    run_cli(cmd, home, args, stdin, timeout)
}

/// [`cli`] inside the network namespace `netns` (`ip netns exec`; root).
pub fn cli_in_netns(
    netns: &str,
    bin: &Path,
    home: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> CliOutput {
    let mut cmd = Command::new("/usr/sbin/ip");
    cmd.args(["netns", "exec", netns]).arg(bin).args(args);
    run_cli(cmd, home, args, stdin, timeout)
}

fn run_cli(mut cmd: Command, home: &Path, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CliOutput {
    cmd.env("SUPERMACHINE_HOME", home);
    run_command(cmd, &format!("supermachine {args:?}"), stdin, timeout)
}

/// Runs `cmd` (described as `what` in messages) with `stdin`, collecting its
/// output; kills it and panics after `timeout`.
pub fn run_command(mut cmd: Command, what: &str, stdin: Option<&[u8]>, timeout: Duration) -> CliOutput {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}; stderr:\n{}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = CliOutput { code: status.code(), stdout: out.join().unwrap(), stderr: err.join().unwrap() };
    eprintln!("{what}: exit {:?} after {:.1?}", o.code, t0.elapsed());
    o
}

// ---------------------------------------------------------------------------
// A realistic image: Debian (debootstrap, minbase) with python3.

/// Debian release of the Debian test image.
pub const DEBIAN_SUITE: &str = "bookworm";
/// debootstrap variant of the Debian test image.
pub const DEBIAN_VARIANT: &str = "minbase";
/// Packages debootstrap adds to [`DEBIAN_VARIANT`] for the Debian test image.
pub const DEBIAN_PACKAGES: &[&str] = &["python3"];
/// Bump when the way the layout is made from the rootfs changes: a new cache key.
const DEBIAN_LAYOUT_VERSION: u32 = 1;
/// The Debian mirror debootstrap uses unless `$SM_DEBIAN_MIRROR` names another
/// (the one the host's apt uses).
pub const DEFAULT_DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// Where the Debian test image's OCI layout is cached:
/// `target/test-images/debian-<suite>-<packages>-<key>`, the key a hash of the
/// suite, variant, package list and layout version (a changed list builds anew).
pub fn debian_python_layout_path() -> PathBuf {
    let recipe = format!("{DEBIAN_SUITE} {DEBIAN_VARIANT} {} v{DEBIAN_LAYOUT_VERSION}", DEBIAN_PACKAGES.join(","));
    let key = sm_api::oci::Digest::of(recipe.as_bytes()).hex()[..16].to_string();
    workspace_root()
        .join("target/test-images")
        .join(format!("debian-{DEBIAN_SUITE}-{}-{key}", DEBIAN_PACKAGES.join("-")))
}

/// The cached Debian test image layout, if a previous run built it.
pub fn cached_debian_python_layout() -> Option<PathBuf> {
    let path = debian_python_layout_path();
    path.join("index.json").is_file().then_some(path)
}

/// An OCI image layout (tag `latest`, one gzip layer; CMD `python3`) of a
/// Debian rootfs made by debootstrap with [`DEBIAN_PACKAGES`]: from the cache,
/// or built now (~1 min; needs root, `debootstrap` and the Debian mirror) and
/// cached. Skips/fails when it cannot be built.
pub fn debian_python_layout(test: &str) -> Option<PathBuf> {
    if let Some(path) = cached_debian_python_layout() {
        eprintln!("{test}: Debian image from the cache: {}", path.display());
        return Some(path);
    }
    if !tools(test, &[("/usr/sbin/debootstrap", "debootstrap")]) {
        return None;
    }
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX) != 0 {
        return skip_or_fail(test, "debootstrap needs root to build the Debian test image".into());
    }
    let dest = debian_python_layout_path();
    let cache = dest.parent().expect("the cache path has a parent").to_path_buf();
    remove_abandoned_builds(&cache);
    let work = cache.join(format!(".build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("creating the Debian image build dir");
    let result = build_debian_layout(test, &work, &dest);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Removes `.build-<pid>` dirs of builds whose process is gone (killed runs).
fn remove_abandoned_builds(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(".build-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn build_debian_layout(test: &str, work: &Path, dest: &Path) -> Option<PathBuf> {
    let rootfs = work.join("rootfs");
    let mirror = std::env::var("SM_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_DEBIAN_MIRROR.to_string());
    let log_path = work.join("debootstrap.log");
    let log = std::fs::File::create(&log_path).expect("creating the debootstrap log");
    let t = Instant::now();
    eprintln!(
        "{test}: debootstrap --variant={DEBIAN_VARIANT} --include={} {DEBIAN_SUITE} ({mirror}); ~1 min, cached afterwards",
        DEBIAN_PACKAGES.join(",")
    );
    let status = Command::new("/usr/sbin/debootstrap")
        .arg(format!("--variant={DEBIAN_VARIANT}"))
        .arg(format!("--include={}", DEBIAN_PACKAGES.join(",")))
        .arg(DEBIAN_SUITE)
        .arg(&rootfs)
        .arg(&mirror)
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("cloning the log handle"))
        .stderr(log)
        .status()
        .expect("starting debootstrap");
    if !status.success() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return skip_or_fail(test, format!("debootstrap from {mirror} failed ({status}):\n{}", tail.join("\n")));
    }
    eprintln!("{test}: debootstrap done in {:.1?}", t.elapsed());

    // Like Debian's own container images: no package caches or index lists.
    for dir in ["var/cache/apt/archives", "var/cache/apt", "var/lib/apt/lists"] {
        if let Ok(entries) = std::fs::read_dir(rootfs.join(dir)) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    // The layer is tarred here, compressed and hashed by gzip and sha256sum
    // (this crate's debug build takes ~40 s for that in Rust).
    let t = Instant::now();
    let tar = work.join("layer.tar");
    tar_tree(&rootfs, &tar);
    let gz = work.join("layer.tar.gz");
    let status = Command::new("gzip")
        .args(["-n", "-c"])
        .stdin(std::fs::File::open(&tar).expect("opening the layer tar"))
        .stdout(std::fs::File::create(&gz).expect("creating the gzip layer"))
        .status()
        .expect("starting gzip");
    assert!(status.success(), "gzip failed: {status}");
    let diff_id = sha256_file(&tar);
    let layer_digest = sha256_file(&gz);
    let (tar_size, gz_size) = (file_size(&tar), file_size(&gz));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["python3"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sm_api::oci::Digest::of(&config).to_string(),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{layer_digest}"),
            "size": gz_size,
        }],
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sm_api::oci::Digest::of(&manifest).to_string(),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    })
    .to_string();
    let staged = work.join("layout");
    let blobs = staged.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("creating the layout");
    std::fs::rename(&gz, blobs.join(&layer_digest)).expect("moving the layer into the layout");
    for bytes in [&config, &manifest] {
        std::fs::write(blobs.join(sm_api::oci::Digest::of(bytes).hex()), bytes).expect("writing a blob");
    }
    std::fs::write(staged.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("writing oci-layout");
    std::fs::write(staged.join("index.json"), index).expect("writing index.json");
    eprintln!(
        "{test}: layer {:.1} MiB tar, {:.1} MiB gzip, in {:.1?}",
        tar_size as f64 / 1048576.0,
        gz_size as f64 / 1048576.0,
        t.elapsed()
    );
    // Atomic: a concurrent build that got there first wins, with the same content.
    if std::fs::rename(&staged, dest).is_err() && !dest.join("index.json").is_file() {
        panic!("could not move the Debian image layout to {}", dest.display());
    }
    Some(dest.to_path_buf())
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len()
}

/// The hex SHA-256 of the file at `path` (`sha256sum`).
fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).stdin(Stdio::null()).output().expect("starting sha256sum");
    assert!(out.status.success(), "sha256sum {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let hex = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(hex.len(), 64, "sha256sum {}: {:?}", path.display(), String::from_utf8_lossy(&out.stdout));
    hex
}

/// Writes an uncompressed tar of the tree at `root` to `out` (entries relative
/// to it, owners, modes and mtimes kept, symlinks not followed); device nodes
/// and sockets are left out, and so is what is below `dev`, `proc` and `sys`.
fn tar_tree(root: &Path, out: &Path) {
    type Tar = tar::Builder<std::io::BufWriter<std::fs::File>>;
    fn walk(b: &mut Tar, root: &Path, dir: &Path) {
        use std::os::unix::fs::FileTypeExt;
        let mut paths: Vec<PathBuf> =
            std::fs::read_dir(dir).expect("reading the rootfs").map(|e| e.expect("rootfs entry").path()).collect();
        paths.sort();
        for p in paths {
            let rel = p.strip_prefix(root).expect("below the root");
            let ft = std::fs::symlink_metadata(&p).expect("rootfs entry metadata").file_type();
            if ft.is_char_device() || ft.is_block_device() || ft.is_socket() {
                continue;
            }
            b.append_path_with_name(&p, rel).unwrap_or_else(|e| panic!("adding {} to the layer: {e}", p.display()));
            let pseudo = ["dev", "proc", "sys"].iter().any(|s| rel == Path::new(s));
            if ft.is_dir() && !pseudo {
                walk(b, root, &p);
            }
        }
    }
    let file = std::fs::File::create(out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    b.follow_symlinks(false);
    walk(&mut b, root, root);
    b.into_inner().expect("finishing the layer tar").flush().expect("writing the layer tar");
}
