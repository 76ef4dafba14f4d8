//! `cargo xtask bench image`: images end to end with the release CLI and a real
//! local registry (Debian's `docker-registry` on 127.0.0.1). Printed, not asserted:
//!
//! - `supermachine pull` into a fresh store vs `skopeo copy` of the same image
//!   from the same registry into a local OCI directory;
//! - root disk build time (`run --timings`, the `root disk ... (built)` figure)
//!   per MiB of unpacked layers;
//! - `supermachine run` of the built-in default image, first run (cold boot +
//!   bake) and second run (restore of the baked snapshot).
//!
//! The image is the Debian+python3 one the `cli_python` test caches under
//! `target/test-images/` when it is there, else the host's busybox.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::child::median;
use crate::{agent, bench, kernel, paths};

/// A cold boot of a Debian image plus a command here (~1 min), with room.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// Name of the pushed image in the registry.
const REPO: &str = "bench/image:latest";

/// Runs the benchmark with `runs` repetitions of each measurement.
pub fn run(runs: usize) -> Result<()> {
    let runs = runs.max(1);
    for (tool, package) in [("/usr/bin/docker-registry", "docker-registry"), ("/usr/bin/skopeo", "skopeo")] {
        if !Path::new(tool).exists() {
            bail!("{tool} is missing: apt-get install {package}");
        }
    }
    kernel::build(false)?;
    agent::build_initrd()?;
    let cli = bench::build_release_cli()?;
    let work = paths::guest_dir().join("bench-image");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let (layout, label) = match sm_tests::cached_debian_python_layout() {
        Some(layout) => (layout, "Debian bookworm minbase + python3 (cached by the cli_python test)".to_string()),
        None => {
            println!(
                "no cached Debian+python3 image in target/test-images (`cargo test -p sm-tests --test cli_python` \
                 builds it): using the host's busybox"
            );
            if !Path::new("/bin/busybox").exists() {
                bail!("/bin/busybox is missing: apt-get install busybox-static");
            }
            let layout = work.join("busybox-layout");
            sm_tests::busybox_layout(&layout);
            (layout, "busybox (host's busybox-static, one layer)".to_string())
        }
    };
    let sizes = layout_sizes(&layout)?;
    let registry = sm_tests::Registry::start();
    registry.push(&layout, REPO);
    let image = format!("127.0.0.1:{}/{REPO}", registry.port);
    println!(
        "image benchmark: {label}; {:.1} MiB of layers in the registry, {:.1} MiB unpacked; {runs} run(s) each, \
         release CLI, local docker-registry at 127.0.0.1:{}",
        mib(sizes.compressed),
        mib(sizes.unpacked),
        registry.port
    );

    // Pull: a fresh store each time vs skopeo into a fresh OCI directory.
    let mut pull_s = Vec::new();
    let mut skopeo_s = Vec::new();
    let mut homes = Vec::new();
    for i in 0..runs {
        let home = work.join(format!("home-{i}"));
        let t = Instant::now();
        let o = sm_tests::cli(&cli, &home, &["pull", &image], None, RUN_TIMEOUT);
        let el = t.elapsed().as_secs_f64();
        if o.code != Some(0) {
            bail!("supermachine pull {image} failed ({:?}):\n{}", o.code, o.stderr);
        }
        pull_s.push(el);
        homes.push(home);

        let dir = work.join(format!("skopeo-{i}"));
        let t = Instant::now();
        let out = Command::new("/usr/bin/skopeo")
            .args(["--insecure-policy", "copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{image}"))
            .arg(format!("oci:{}:latest", dir.display()))
            .stdin(Stdio::null())
            .output()
            .context("running skopeo")?;
        let el = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        eprintln!("skopeo copy docker://{image}: {el:.2}s");
        skopeo_s.push(el);
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Root disk: built on the first run of the image in each fresh store
    // (pulled above); --no-snapshot so no time goes to baking.
    let mut disk_s = Vec::new();
    for home in &homes {
        let o = sm_tests::cli(&cli, home, &["run", "--timings", "--no-snapshot", &image, "true"], None, RUN_TIMEOUT);
        if o.code != Some(0) {
            bail!("supermachine run {image} true failed ({:?}):\n{}", o.code, o.stderr);
        }
        match timing(&o.stderr, "root disk") {
            Some((secs, note)) if note == "built" => disk_s.push(secs),
            other => bail!("no `root disk ... (built)` figure in the run's timings ({other:?}):\n{}", o.stderr),
        }
        let _ = std::fs::remove_dir_all(home);
    }

    // The built-in default image end to end: cold boot + bake, then restore.
    let mut first = Runs::default();
    let mut second = Runs::default();
    for i in 0..runs {
        let home = work.join(format!("default-{i}"));
        for r in [&mut first, &mut second] {
            let t = Instant::now();
            let o = sm_tests::cli(&cli, &home, &["run", "--timings"], None, RUN_TIMEOUT);
            let el = t.elapsed().as_secs_f64();
            if o.code != Some(0) {
                bail!("supermachine run (builtin:default) failed ({:?}):\n{}", o.code, o.stderr);
            }
            r.wall.push(el);
            if let Some((secs, note)) = timing(&o.stderr, "VM start") {
                r.vm_start.push(secs);
                r.note = note;
            }
        }
        let _ = std::fs::remove_dir_all(&home);
    }
    let _ = std::fs::remove_dir_all(&work);

    let pull = median(&mut pull_s);
    let skopeo = median(&mut skopeo_s);
    let disk = median(&mut disk_s);
    let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    let mut rows: Vec<(String, String)> = vec![
        ("supermachine pull, fresh store (s)".into(), fmt(pull)),
        ("skopeo copy to an oci: dir, same registry (s)".into(), fmt(skopeo)),
        (
            "pull / skopeo copy".into(),
            match (pull, skopeo) {
                (Some(p), Some(s)) if s > 0.0 => format!("{:.2}x", p / s),
                _ => "n/a".into(),
            },
        ),
        ("root disk build, `run --timings`, auto format (s)".into(), fmt(disk)),
        (
            format!("root disk build per MiB unpacked, {:.1} MiB (ms/MiB)", mib(sizes.unpacked)),
            fmt(disk.filter(|_| sizes.unpacked > 0).map(|d| d * 1e3 / mib(sizes.unpacked))),
        ),
    ];
    for (label, r) in [
        ("run builtin:default, first: cold boot + bake", &mut first),
        ("run builtin:default, second: restore", &mut second),
    ] {
        rows.push((format!("{label} (s)"), fmt(median(&mut r.wall))));
        rows.push((format!("  of which VM start: {} (s)", r.note), fmt(median(&mut r.vm_start))));
    }
    let width = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0) + 2;
    println!();
    println!("{:<width$}{:>10}", "median", "value");
    for (label, value) in &rows {
        println!("{label:<width$}{value:>10}");
    }
    println!(
        "(wall times of the release CLI processes; pull and skopeo both fetch every blob over loopback HTTP \
         and verify digests. Root disk time is what `run --timings` reports: unpacking the layers and mkfs.)"
    );
    Ok(())
}

/// Wall times of one kind of run, and the `VM start` figure and its note.
#[derive(Default)]
struct Runs {
    wall: Vec<f64>,
    vm_start: Vec<f64>,
    note: String,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Sizes of the image in an OCI layout (tag `latest` or its only manifest).
struct Sizes {
    /// Layer blobs as stored and transferred.
    compressed: u64,
    /// Layer tars after decompression.
    unpacked: u64,
}

/// Reads the layout's manifest and measures its layers (gzip ones by `gzip -dc`).
fn layout_sizes(layout: &Path) -> Result<Sizes> {
    let read_json = |p: PathBuf| -> Result<serde_json::Value> {
        let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let blob = |digest: &str| -> Result<PathBuf> {
        let hex = digest.strip_prefix("sha256:").with_context(|| format!("unsupported digest {digest}"))?;
        Ok(layout.join("blobs/sha256").join(hex))
    };
    let index = read_json(layout.join("index.json"))?;
    let manifest_digest = index["manifests"][0]["digest"].as_str().context("index.json has no manifest")?;
    let manifest = read_json(blob(manifest_digest)?)?;
    let mut sizes = Sizes { compressed: 0, unpacked: 0 };
    for layer in manifest["layers"].as_array().context("manifest has no layers")? {
        let path = blob(layer["digest"].as_str().context("layer without digest")?)?;
        let size = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?.len();
        sizes.compressed += size;
        let media_type = layer["mediaType"].as_str().unwrap_or_default();
        sizes.unpacked += if media_type.ends_with("gzip") {
            gunzipped_size(&path)?
        } else if media_type.ends_with(".tar") {
            size
        } else {
            bail!("{}: layer media type {media_type} is not measured here", path.display());
        };
    }
    Ok(sizes)
}

fn gunzipped_size(path: &Path) -> Result<u64> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .context("running gzip (apt-get install gzip)")?;
    let mut out = child.stdout.take().context("gzip stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = out.read(&mut buf).context("reading gzip's output")?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    if !child.wait().context("waiting for gzip")?.success() {
        bail!("gzip -dc {} failed", path.display());
    }
    Ok(total)
}

/// The `LABEL <duration> (<note>)` figure of `run --timings`' stderr line
/// `timings: image 6.34s, root disk 12.67s (built), VM start 30.18s (cold boot, ...), ...`:
/// seconds and the note ("" without one).
fn timing(stderr: &str, label: &str) -> Option<(f64, String)> {
    let line = stderr.lines().find_map(|l| l.strip_prefix("timings: "))?;
    let start = line.find(&format!("{label} "))? + label.len() + 1;
    let rest = &line[start..];
    let value = rest.split([' ', ',']).next()?;
    let secs = duration_secs(value)?;
    let after = rest[value.len()..].trim_start();
    let note = after.strip_prefix('(').and_then(|n| n.find(')').map(|end| n[..end].to_string())).unwrap_or_default();
    Some((secs, note))
}

/// Seconds of a `{:.2?}`-formatted Duration: `1.23s`, `45.60ms`, `7.89µs`, `12ns`.
fn duration_secs(s: &str) -> Option<f64> {
    for (unit, per_second) in [("ns", 1e9), ("µs", 1e6), ("ms", 1e3), ("s", 1.0)] {
        if let Some(n) = s.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v / per_second);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "noise\ntimings: image 6.34s, root disk 12.67s (built), VM start 30.18s (cold boot, snapshot \
                        baked for the next run), command 19.51s, total 68.73s\n";

    #[test]
    fn parses_the_run_timings_line() {
        assert_eq!(timing(LINE, "root disk"), Some((12.67, "built".to_string())));
        let (secs, note) = timing(LINE, "VM start").unwrap();
        assert_eq!(secs, 30.18);
        assert_eq!(note, "cold boot, snapshot baked for the next run");
        assert_eq!(timing(LINE, "total"), Some((68.73, String::new())));
        assert_eq!(timing("nothing", "root disk"), None);
        let cached = "timings: image 551.34µs, root disk 17.18µs (cached), VM start 3.55s (restored)";
        let (secs, note) = timing(cached, "root disk").unwrap();
        assert!((secs - 17.18e-6).abs() < 1e-12, "{secs}");
        assert_eq!(note, "cached");
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(duration_secs("2.50s"), Some(2.5));
        assert_eq!(duration_secs("250.00ms"), Some(0.25));
        assert_eq!(duration_secs("12ns"), Some(12e-9));
        assert_eq!(duration_secs("fast"), None);
    }

    #[test]
    fn measures_a_busybox_layout() {
        if !Path::new("/bin/busybox").exists() {
            eprintln!("skipped: /bin/busybox missing (apt-get install busybox-static)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-bench-image-{}", std::process::id()));
        sm_tests::busybox_layout(&dir);
        let sizes = layout_sizes(&dir).unwrap();
        assert_eq!(sizes.compressed, sizes.unpacked, "an uncompressed layer");
        assert!(sizes.unpacked > 1 << 20, "{}", sizes.unpacked);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
