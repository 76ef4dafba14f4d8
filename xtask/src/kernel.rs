//! `cargo xtask kernel`: build the guest kernel (an uncompressed `vmlinux`).
//!
//! Source: Debian's `linux-source-6.1` tarball. Recipe: `make tinyconfig`,
//! merge `guest/kernel/config.fragment`, `make olddefconfig`, check that every
//! option of the fragment survived, apply `guest/kernel/patches/*.patch` (in
//! name order), `make vmlinux`. The result is cached under
//! `target/guest/kernel-<hash>/vmlinux`, where the hash covers every input
//! (tarball identity, fragment, patches, compiler, [`BUILD_RECIPE_VERSION`]),
//! and linked/copied to `target/guest/vmlinux`.
//!
//! Environment:
//! - `SM_KEEP_KERNEL_BUILD=1` keeps the ~1.5 GB build tree
//!   (`target/guest/build/linux-6.1-<hash>`) after a successful build.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::paths;

/// Bump whenever the build steps change in a way that changes the output
/// (commands, make variables, how patches are applied): it invalidates caches.
const BUILD_RECIPE_VERSION: u32 = 1;

/// Debian package that ships the kernel source tarball.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Everything the build needs from apt (checked with dpkg-query, installed
/// only when something is missing).
const APT_PACKAGES: &[&str] =
    &[SOURCE_PACKAGE, "bc", "bison", "build-essential", "flex", "libelf-dev", "libssl-dev", "patch", "tar", "xz-utils"];

const KEEP_BUILD_ENV: &str = "SM_KEEP_KERNEL_BUILD";

/// Non-TTY progress: one status line per this interval.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// Build (or fetch from cache) the guest kernel; returns the cached
/// `target/guest/kernel-<hash>/vmlinux`.
pub fn build(force: bool) -> Result<PathBuf> {
    let root = paths::workspace_root();
    let inputs = root.join("guest").join("kernel");
    let fragment = inputs.join("config.fragment");
    let patches = list_patches(&inputs.join("patches"))?;

    crate::apt::ensure(APT_PACKAGES, "the kernel build")?;

    let hash = input_hash(&fragment, &patches)?;
    let guest = paths::guest_dir();
    let out_dir = guest.join(format!("kernel-{hash}"));
    let out_vmlinux = out_dir.join("vmlinux");
    let latest = guest.join("vmlinux");

    if out_vmlinux.is_file() && !force {
        link_latest(&out_vmlinux, &latest)?;
        eprintln!("kernel: up to date ({})", out_vmlinux.display());
        return Ok(out_vmlinux);
    }

    let build_root = guest.join("build");
    let tree = build_root.join(format!("linux-6.1-{hash}"));
    let log_path = build_root.join(format!("linux-6.1-{hash}.log"));
    fs::create_dir_all(&build_root).with_context(|| format!("creating {}", build_root.display()))?;
    let mut log = Log::create(&log_path)?;
    let started = Instant::now();

    eprintln!("kernel: building {hash} in {}", tree.display());
    eprintln!("kernel: full log: {}", log_path.display());

    // 1. Fresh source tree (a leftover one may be half-patched).
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing stale build tree {}", tree.display()))?;
    }
    fs::create_dir_all(&tree).with_context(|| format!("creating {}", tree.display()))?;
    step("extracting linux-source-6.1", || {
        let mut tar = Command::new("tar");
        tar.arg("-xf").arg(TARBALL).arg("-C").arg(&tree).arg("--strip-components=1");
        log.run(&mut tar, "extracting the kernel tarball").with_context(|| {
            format!("is {TARBALL} intact? reinstall with `apt-get install --reinstall {SOURCE_PACKAGE}`")
        })
    })?;

    // 2. Patches, in name order.
    step(&format!("applying {} patches", patches.len()), || {
        for patch in &patches {
            let name = file_name(patch);
            let mut cmd = Command::new("patch");
            cmd.current_dir(&tree).args(["-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-i"]).arg(patch);
            log.run(&mut cmd, &format!("applying {name}")).with_context(|| {
                format!(
                    "patch {} does not apply to {SOURCE_PACKAGE} ({}); refresh it against {TARBALL}",
                    patch.display(),
                    package_version(SOURCE_PACKAGE).unwrap_or_else(|| "unknown version".into())
                )
            })?;
        }
        Ok(())
    })?;

    // 3. Configure.
    step("configuring (tinyconfig + config.fragment)", || {
        log.run(make(&tree).arg("tinyconfig"), "make tinyconfig")?;
        let mut merge = Command::new("sh");
        merge
            .current_dir(&tree)
            .env_remove("KCONFIG_CONFIG")
            .args(["scripts/kconfig/merge_config.sh", "-m", ".config"])
            .arg(&fragment);
        log.run(&mut merge, "merging config.fragment (merge_config.sh -m)")?;
        log.run(make(&tree).arg("olddefconfig"), "make olddefconfig")?;
        verify_config(&fragment, &tree.join(".config"))
    })?;

    // 4. Compile.
    let steps_file = build_root.join("kernel-build-steps");
    let expected_steps = fs::read_to_string(&steps_file).ok().and_then(|s| s.trim().parse().ok());
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let done = make_vmlinux(&tree, jobs, expected_steps, &mut log)?;
    // Only a hint for the next build's progress bar: failing to save it is harmless.
    let _ = fs::write(&steps_file, format!("{done}\n"));

    // 5. Publish atomically, then point target/guest/vmlinux at it.
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    copy_atomic(&tree.join(".config"), &out_dir.join("config"))?;
    copy_atomic(&tree.join("vmlinux"), &out_vmlinux)?;
    link_latest(&out_vmlinux, &latest)?;
    drop(log);
    // The log is kept next to the kernel it describes; losing it is harmless.
    let _ = fs::rename(&log_path, out_dir.join("build.log"));

    if std::env::var(KEEP_BUILD_ENV).is_ok_and(|v| v == "1") {
        eprintln!("kernel: keeping build tree {} ({KEEP_BUILD_ENV}=1)", tree.display());
    } else {
        fs::remove_dir_all(&tree)
            .with_context(|| format!("removing build tree {} (the kernel itself is built)", tree.display()))?;
    }
    eprintln!("kernel: built {} in {}", out_vmlinux.display(), fmt_duration(started.elapsed()));
    Ok(out_vmlinux)
}

/// Runs one named phase, printing its name and duration.
fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("kernel: {what} ...");
    let t = Instant::now();
    let r = f().with_context(|| format!("kernel build step failed: {what}"))?;
    eprintln!("kernel: {what}: done in {}", fmt_duration(t.elapsed()));
    Ok(r)
}

/// `make ARCH=x86_64` in `tree`, with a reproducible build identity and no
/// jobserver/config variables inherited from an outer make or cargo.
fn make(tree: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(tree)
        .arg("ARCH=x86_64")
        .env("KBUILD_BUILD_USER", "supermachine")
        .env("KBUILD_BUILD_HOST", "supermachine")
        .env("KBUILD_BUILD_TIMESTAMP", "2026-01-01")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .env_remove("KCONFIG_CONFIG")
        .env_remove("O")
        .env_remove("KBUILD_OUTPUT");
    cmd
}

// ---------------------------------------------------------------------------
// Inputs and cache key

fn list_patches(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading the kernel patch directory {}", dir.display()))?;
    let mut patches = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        if path.extension().is_some_and(|e| e == "patch") {
            patches.push(path);
        }
    }
    patches.sort();
    Ok(patches)
}

/// Hex SHA-256 prefix over everything that determines the vmlinux.
fn input_hash(fragment: &Path, patches: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut field = |tag: &str, data: &[u8]| {
        h.update((tag.len() as u64).to_le_bytes());
        h.update(tag.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    };
    field("recipe", &BUILD_RECIPE_VERSION.to_le_bytes());

    let meta = fs::metadata(TARBALL)
        .with_context(|| format!("{TARBALL} is missing: install it with `apt-get install {SOURCE_PACKAGE}`"))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    field("tarball-size", &meta.len().to_le_bytes());
    field("tarball-mtime", &mtime.to_le_bytes());
    field("tarball-version", package_version(SOURCE_PACKAGE).unwrap_or_default().as_bytes());

    let frag =
        fs::read(fragment).with_context(|| format!("reading the kernel config fragment {}", fragment.display()))?;
    field("fragment", &frag);
    for patch in patches {
        let body = fs::read(patch).with_context(|| format!("reading {}", patch.display()))?;
        field("patch-name", file_name(patch).as_bytes());
        field("patch", &body);
    }
    field("cc", compiler_version().as_bytes());

    let digest = h.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// First line of `gcc --version` (the compiler changes the output).
fn compiler_version() -> String {
    Command::new("gcc")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default()
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
}

// ---------------------------------------------------------------------------
// apt packages

fn package_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg]).output().ok()?;
    let v = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !v.is_empty()).then_some(v)
}

// ---------------------------------------------------------------------------
// Config verification

/// One requirement from the fragment.
#[derive(Debug, PartialEq)]
enum Want {
    /// `CONFIG_X=value`: the same line must be in .config.
    Value(String, String),
    /// `# CONFIG_X is not set`: .config must not enable it.
    Unset(String),
}

fn parse_fragment(text: &str) -> Vec<Want> {
    text.lines()
        .map(str::trim)
        .filter_map(|l| {
            if let Some(rest) = l.strip_prefix("# CONFIG_") {
                let name = rest.strip_suffix(" is not set")?;
                Some(Want::Unset(format!("CONFIG_{name}")))
            } else if l.starts_with("CONFIG_") {
                let (k, v) = l.split_once('=')?;
                Some(Want::Value(k.to_owned(), v.to_owned()))
            } else {
                None
            }
        })
        .collect()
}

/// Every fragment requirement not met by `config` (the final .config text).
fn unmet(wants: &[Want], config: &str) -> Vec<String> {
    let actual = |key: &str| {
        config.lines().find_map(|l| {
            if l.strip_prefix(key).is_some_and(|r| r.starts_with('=')) {
                Some(l[key.len() + 1..].to_owned())
            } else if l.strip_prefix("# ").and_then(|r| r.strip_prefix(key)) == Some(" is not set") {
                Some("n".to_owned())
            } else {
                None
            }
        })
    };
    wants
        .iter()
        .filter_map(|w| match w {
            Want::Value(k, v) => match actual(k) {
                Some(a) if &a == v => None,
                Some(a) => Some(format!("{k}={v} (got {a})")),
                None => Some(format!("{k}={v} (absent: unmet dependency?)")),
            },
            Want::Unset(k) => match actual(k) {
                Some(a) if a != "n" => Some(format!("{k} off (got {a})")),
                _ => None,
            },
        })
        .collect()
}

fn verify_config(fragment: &Path, config: &Path) -> Result<()> {
    let wants =
        parse_fragment(&fs::read_to_string(fragment).with_context(|| format!("reading {}", fragment.display()))?);
    let have = fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let bad = unmet(&wants, &have);
    if !bad.is_empty() {
        bail!(
            "{} option(s) of {} did not survive `make olddefconfig`:\n  {}\n\
             add the missing dependencies to the fragment (see `make menuconfig` help, \
             e.g. SQUASHFS needs MISC_FILESYSTEMS and BLOCK)",
            bad.len(),
            fragment.display(),
            bad.join("\n  ")
        );
    }
    eprintln!("kernel: all {} fragment options present in .config", wants.len());
    Ok(())
}

// ---------------------------------------------------------------------------
// Running commands

/// Build log; short steps write straight into it, failures quote its tail.
struct Log {
    path: PathBuf,
    file: fs::File,
}

impl Log {
    fn create(path: &Path) -> Result<Self> {
        let file = fs::File::create(path).with_context(|| format!("creating build log {}", path.display()))?;
        Ok(Log { path: path.to_owned(), file })
    }

    fn line(&mut self, text: &str) -> Result<()> {
        writeln!(self.file, "{text}").with_context(|| format!("writing {}", self.path.display()))
    }

    /// Runs `cmd` with both output streams appended to the log.
    fn run(&mut self, cmd: &mut Command, what: &str) -> Result<()> {
        self.line(&format!("### {what}: {cmd:?}"))?;
        let out = self.file.try_clone().context("duplicating the log file handle")?;
        let err = self.file.try_clone().context("duplicating the log file handle")?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
        if !status.success() {
            bail!("{what} failed ({status}); last lines of {}:\n{}", self.path.display(), self.tail(25));
        }
        Ok(())
    }

    fn tail(&self, n: usize) -> String {
        let mut text = String::new();
        if fs::File::open(&self.path).and_then(|mut f| f.read_to_string(&mut text)).is_err() {
            return "(log unreadable)".into();
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// `make -jN vmlinux` with progress; returns the number of kbuild steps seen.
fn make_vmlinux(tree: &Path, jobs: usize, expected: Option<u64>, log: &mut Log) -> Result<u64> {
    eprintln!("kernel: make -j{jobs} vmlinux (about 4 min on 2 cores) ...");
    log.line(&format!("### make -j{jobs} vmlinux"))?;
    let mut child = make(tree)
        .arg(format!("-j{jobs}"))
        .arg("vmlinux")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `make vmlinux`")?;

    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let stdout = child.stdout.take().context("make stdout pipe")?;
    let stderr = child.stderr.take().context("make stderr pipe")?;
    for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);

    let mut progress = Progress::new(expected);
    let mut recent: VecDeque<String> = VecDeque::with_capacity(40);
    let mut steps = 0u64;
    let mut log_error = None;
    for line in rx {
        if let Err(e) = log.line(&line) {
            log_error.get_or_insert(e);
        }
        // kbuild's quiet output: "  CC      fs/ext4/inode.o"
        if line.starts_with("  ") && !line.trim().is_empty() {
            steps += 1;
        }
        progress.update(steps, line.trim());
        if recent.len() == recent.capacity() {
            recent.pop_front();
        }
        recent.push_back(line);
    }
    for r in readers {
        // A reader only ends at EOF or when the channel is gone; a panic there
        // cannot lose anything that matters more than make's exit status.
        let _ = r.join();
    }
    let status = child.wait().context("waiting for `make vmlinux`")?;
    progress.finish(steps, status.success());

    if !status.success() {
        let tail: Vec<&str> = recent.iter().map(String::as_str).collect();
        bail!(
            "`make vmlinux` failed ({status}) in {}; last output:\n{}\nfull log: {}\n\
             if a patch broke the build, fix it under guest/kernel/patches/; \
             rerun with {KEEP_BUILD_ENV}=1 to keep the tree for inspection",
            tree.display(),
            tail.join("\n"),
            log.path.display()
        );
    }
    if let Some(e) = log_error {
        return Err(e);
    }
    if !tree.join("vmlinux").is_file() {
        bail!("`make vmlinux` succeeded but {} is missing", tree.join("vmlinux").display());
    }
    Ok(steps)
}

/// Spinner/bar with the current make line on a TTY; otherwise a plain status
/// line every [`PLAIN_PROGRESS_EVERY`] so CI logs show progress without flooding.
enum Progress {
    Tty(ProgressBar),
    Plain { started: Instant, last: Instant, current: String },
}

impl Progress {
    fn new(expected: Option<u64>) -> Self {
        if !std::io::stderr().is_terminal() {
            let now = Instant::now();
            return Progress::Plain { started: now, last: now, current: String::new() };
        }
        let (bar, template) = match expected {
            Some(n) if n > 0 => {
                (ProgressBar::new(n), "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/~{len} {wide_msg}")
            }
            _ => (ProgressBar::new_spinner(), "{spinner} [{elapsed_precise}] {pos} steps {wide_msg}"),
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress::Tty(bar)
    }

    fn update(&mut self, steps: u64, line: &str) {
        match self {
            Progress::Tty(bar) => {
                if bar.length().is_some_and(|len| steps > len) {
                    bar.set_length(steps);
                }
                bar.set_position(steps);
                bar.set_message(line.to_owned());
            }
            Progress::Plain { started, last, current } => {
                line.clone_into(current);
                if last.elapsed() >= PLAIN_PROGRESS_EVERY {
                    *last = Instant::now();
                    eprintln!(
                        "kernel: make vmlinux: {} elapsed, {steps} steps, now: {current}",
                        fmt_duration(started.elapsed())
                    );
                }
            }
        }
    }

    fn finish(&self, steps: u64, ok: bool) {
        let verdict = if ok { "done" } else { "FAILED" };
        match self {
            Progress::Tty(bar) => {
                let elapsed = bar.elapsed();
                bar.finish_and_clear();
                eprintln!("kernel: make vmlinux {verdict}: {steps} steps in {}", fmt_duration(elapsed));
            }
            Progress::Plain { started, .. } => {
                eprintln!("kernel: make vmlinux {verdict}: {steps} steps in {}", fmt_duration(started.elapsed()))
            }
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

// ---------------------------------------------------------------------------
// Output files

/// Copies `from` to `to` through a temporary file and a rename, so readers
/// never see a partial file.
fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

/// Makes `latest` (target/guest/vmlinux) the same file as `built`: a hard link
/// when possible, else a copy. Cheap when it already is.
fn link_latest(built: &Path, latest: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let b = fs::metadata(built).with_context(|| format!("reading {}", built.display()))?;
    if let Ok(l) = fs::metadata(latest) {
        if l.dev() == b.dev() && l.ino() == b.ino() {
            return Ok(());
        }
    }
    let tmp = latest.with_extension("tmp");
    // A leftover temp file from an interrupted run would make hard_link fail.
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(built, &tmp).is_err() {
        fs::copy(built, &tmp).with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    }
    fs::rename(&tmp, latest).with_context(|| format!("renaming {} to {}", tmp.display(), latest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_parsing_and_verification() {
        let frag = "# comment\nCONFIG_A=y\nCONFIG_N=64\n# CONFIG_B is not set\nCONFIG_C=y\n# CONFIG_D is not set\n";
        let wants = parse_fragment(frag);
        assert_eq!(
            wants,
            vec![
                Want::Value("CONFIG_A".into(), "y".into()),
                Want::Value("CONFIG_N".into(), "64".into()),
                Want::Unset("CONFIG_B".into()),
                Want::Value("CONFIG_C".into(), "y".into()),
                Want::Unset("CONFIG_D".into()),
            ]
        );
        let config = "CONFIG_A=y\nCONFIG_AB=y\nCONFIG_N=32\n# CONFIG_B is not set\nCONFIG_D=y\n";
        assert_eq!(
            unmet(&wants, config),
            vec![
                "CONFIG_N=64 (got 32)".to_owned(),
                "CONFIG_C=y (absent: unmet dependency?)".to_owned(),
                "CONFIG_D off (got y)".to_owned(),
            ]
        );
        let good = "CONFIG_A=y\nCONFIG_N=64\nCONFIG_C=y\n# CONFIG_D is not set\n";
        assert!(unmet(&wants, good).is_empty());
    }

    #[test]
    fn the_shipped_fragment_parses() {
        let path = paths::workspace_root().join("guest/kernel/config.fragment");
        let text = fs::read_to_string(&path).expect("config.fragment is readable");
        let wants = parse_fragment(&text);
        assert!(wants.contains(&Want::Value("CONFIG_VIRTIO_MMIO".into(), "y".into())));
        assert!(wants.contains(&Want::Unset("CONFIG_PCI".into())));
    }
}
