//! Read-only root disks built from an image, cached in the store per manifest
//! digest (`ROOT/rootfs/<hex>.<format>`).
//!
//! Formats (the guest kernel mounts all of them): erofs (`mkfs.erofs`,
//! uncompressed or lz4hc), squashfs (`mksquashfs`, zstd or xz) and ext4
//! (`mkfs.ext4 -d`). Measured on a Debian bookworm minbase + python3 tree
//! (8335 entries, 244 MiB of file data; 2 shared cores; see
//! `tests/slow_debian.rs`):
//!
//! | format          | build  | size      |
//! |-----------------|--------|-----------|
//! | erofs           | 1.35 s | 245.6 MiB |
//! | erofs-lz4hc     | 14.1 s | 154.4 MiB |
//! | squashfs-zstd:3 | 0.76 s | 114.4 MiB |
//! | squashfs-xz     | 20.5 s | 101.4 MiB |
//! | ext4 (no journal) | 0.76 s | 338.5 MiB (265.9 allocated) |
//!
//! The default, [`RootfsFormat::SquashfsZstd`] at zstd level 3, is the fastest
//! to build and less than half the size of erofs/ext4 (zstd level 15, mksquashfs'
//! default, is 11 s for 110 MiB). It is reproducible byte for byte
//! (`-mkfs-time 0`, fixed block size, per-file mtimes kept), and it can carry
//! exact ownership when the unpack ran without root (pseudo-file records).
//! erofs-utils 1.5 is reproducible only by zeroing every mtime, and cannot set
//! per-file owners; ext4 images must be sized up front and are the largest.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::store::{ImageInfo, Store};
use crate::unpack::{unpack_image, UnpackReport};

/// Fixed filesystem UUID, so equal trees give equal disks.
const FS_UUID: &str = "5e7a0c1e-0000-4000-8000-0000005e7a0c";

/// On-disk format of a root disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum RootfsFormat {
    /// erofs, no compression: fastest to build and read, largest of the read-only ones.
    Erofs,
    /// erofs with lz4hc.
    ErofsLz4hc,
    /// squashfs with zstd level 3 (the default).
    #[default]
    SquashfsZstd,
    /// squashfs with xz: smallest, slowest to build.
    SquashfsXz,
    /// ext4 (`mkfs.ext4 -d`), no journal.
    Ext4,
}

impl RootfsFormat {
    /// All formats.
    pub const ALL: [RootfsFormat; 5] = [
        RootfsFormat::Erofs,
        RootfsFormat::ErofsLz4hc,
        RootfsFormat::SquashfsZstd,
        RootfsFormat::SquashfsXz,
        RootfsFormat::Ext4,
    ];

    /// File extension / name (`erofs`, `erofs-lz4hc`, `squashfs-zstd`, `squashfs-xz`, `ext4`).
    pub fn name(self) -> &'static str {
        match self {
            RootfsFormat::Erofs => "erofs",
            RootfsFormat::ErofsLz4hc => "erofs-lz4hc",
            RootfsFormat::SquashfsZstd => "squashfs-zstd",
            RootfsFormat::SquashfsXz => "squashfs-xz",
            RootfsFormat::Ext4 => "ext4",
        }
    }

    /// The filesystem type to mount it with (`erofs`, `squashfs`, `ext4`).
    pub fn fstype(self) -> &'static str {
        match self {
            RootfsFormat::Erofs | RootfsFormat::ErofsLz4hc => "erofs",
            RootfsFormat::SquashfsZstd | RootfsFormat::SquashfsXz => "squashfs",
            RootfsFormat::Ext4 => "ext4",
        }
    }

    fn tool(self) -> (&'static str, &'static str) {
        match self.fstype() {
            "erofs" => ("mkfs.erofs", "erofs-utils"),
            "squashfs" => ("mksquashfs", "squashfs-tools"),
            _ => ("mkfs.ext4", "e2fsprogs"),
        }
    }
}

impl fmt::Display for RootfsFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RootfsFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        RootfsFormat::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            Error::invalid(
                "rootfs format",
                format!("unknown format {s:?} (erofs, erofs-lz4hc, squashfs-zstd, squashfs-xz, ext4)"),
            )
        })
    }
}

/// A built (or cached) root disk.
#[derive(Clone, Debug)]
pub struct Rootfs {
    /// The disk image file.
    pub path: PathBuf,
    /// Its format.
    pub format: RootfsFormat,
    /// Size in bytes.
    pub size: u64,
    /// Whether it came from the cache.
    pub cached: bool,
    /// Time to unpack the layers (zero when cached).
    pub unpack_time: Duration,
    /// Time to build the filesystem (zero when cached).
    pub build_time: Duration,
}

/// Bumped when the unpack or the disk build makes a different tree from the
/// same image (2: device nodes and extended attributes kept), so disks cached
/// by an older version are built anew.
const DISK_RECIPE: u32 = 2;

/// Where the cached disk for `image` in `format` lives (whether or not built):
/// `<manifest hex>.r<recipe>.<format>`.
pub fn cached_path(store: &Store, image: &ImageInfo, format: RootfsFormat) -> PathBuf {
    store.rootfs_dir().join(format!("{}.r{DISK_RECIPE}.{}", image.manifest_digest.hex(), format.name()))
}

/// The root disk of `image`: from the cache, or unpacked and built now.
pub fn build_rootfs(store: &Store, image: &ImageInfo, format: RootfsFormat) -> Result<Rootfs> {
    let out = cached_path(store, image, format);
    if let Ok(m) = std::fs::metadata(&out) {
        return Ok(Rootfs {
            path: out,
            format,
            size: m.len(),
            cached: true,
            unpack_time: Duration::ZERO,
            build_time: Duration::ZERO,
        });
    }
    let _gc = store.gc_shared()?;
    let dir = store.temp_path("unpack");
    let tmp_out = store.temp_path("rootfs");
    let result = (|| {
        let t = Instant::now();
        let report = unpack_image(store, image, &dir)?;
        let unpack_time = t.elapsed();
        let t = Instant::now();
        build_from_dir(&dir, &tmp_out, format, &report)?;
        let build_time = t.elapsed();
        std::fs::rename(&tmp_out, &out).at("storing root disk", &out)?;
        let size = std::fs::metadata(&out).at("stat", &out)?.len();
        Ok(Rootfs { path: out.clone(), format, size, cached: false, unpack_time, build_time })
    })();
    let _ = std::fs::remove_file(&tmp_out);
    remove_tree(&dir);
    result
}

/// A root disk of `format` at `out` built from the tree `dir` as it is (a
/// container runtime's prepared root file system, say; owners kept as they
/// are on disk), replacing any file at `out`.
pub fn build_rootfs_from_dir(dir: &Path, out: &Path, format: RootfsFormat) -> Result<Rootfs> {
    let t = Instant::now();
    build_from_dir(dir, out, format, &UnpackReport::default())?;
    let size = std::fs::metadata(out).at("stat", out)?.len();
    Ok(Rootfs {
        path: out.to_path_buf(),
        format,
        size,
        cached: false,
        unpack_time: Duration::ZERO,
        build_time: t.elapsed(),
    })
}

/// Remove a tree that may contain read-only directories.
pub(crate) fn remove_tree(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_err() {
        let _ = Command::new("chmod").arg("-R").arg("u+rwx").arg(dir).status();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Find a program on PATH or in the sbin directories.
pub fn find_tool(tool: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingTool { tool: tool.to_string(), package: package.to_string() })
}

/// Build a disk image of `format` at `out` from the tree `dir`. `report` (from
/// the unpack) carries ownership that could not be applied without root.
pub fn build_from_dir(dir: &Path, out: &Path, format: RootfsFormat, report: &UnpackReport) -> Result<()> {
    let (tool, package) = format.tool();
    let exe = find_tool(tool, package)?;
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new(&exe);
    let mut pseudo: Option<PathBuf> = None;
    match format {
        RootfsFormat::Erofs | RootfsFormat::ErofsLz4hc => {
            cmd.arg("--quiet").arg(format!("-U{FS_UUID}"));
            if format == RootfsFormat::ErofsLz4hc {
                cmd.arg("-zlz4hc");
            }
            if !report.unowned.is_empty() {
                tracing::warn!(
                    "unpacked without root: {} entries owned by others; erofs disk maps everything to root",
                    report.unowned.len()
                );
                cmd.arg("--all-root");
            }
            cmd.arg(out).arg(dir);
        }
        RootfsFormat::SquashfsZstd | RootfsFormat::SquashfsXz => {
            cmd.arg(dir).arg(out).args(["-noappend", "-no-progress", "-quiet", "-xattrs"]);
            if format == RootfsFormat::SquashfsZstd {
                // Level 3: ~10x faster than the default 15 for ~8% more bytes.
                cmd.args(["-comp", "zstd", "-Xcompression-level", "3"]);
            } else {
                cmd.args(["-comp", "xz"]);
            }
            cmd.args(["-mkfs-time", "0", "-b", "131072"]);
            if !report.unowned.is_empty() {
                // Unpacked without root: owners from the unpack record, root otherwise.
                let p = out.with_extension("pseudo");
                let (uid, gid) = write_pseudo(dir, &p, report)?;
                cmd.arg("-pf").arg(&p);
                cmd.arg("-root-uid").arg(uid.to_string()).arg("-root-gid").arg(gid.to_string());
                pseudo = Some(p);
            }
        }
        RootfsFormat::Ext4 => {
            let size = ext4_size(dir)?;
            let f = std::fs::File::create(out).at("creating", out)?;
            f.set_len(size).at("sizing", out)?;
            drop(f);
            cmd.env("E2FSPROGS_FAKE_TIME", "1").args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-m",
                "0",
                "-O",
                "^has_journal,^resize_inode",
            ]);
            cmd.arg("-U").arg(FS_UUID).arg("-E").arg(format!("hash_seed={FS_UUID},lazy_itable_init=0"));
            cmd.arg("-d").arg(dir).arg(out);
            if !report.unowned.is_empty() {
                tracing::warn!("unpacked without root: ext4 disk keeps this user's ownership");
            }
        }
    }
    let output = cmd.stdin(Stdio::null()).output().at("running", &exe);
    if let Some(p) = pseudo {
        let _ = std::fs::remove_file(p);
    }
    let output = output?;
    if !output.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(Error::Tool {
            tool: tool.to_string(),
            detail: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        });
    }
    Ok(())
}

/// mksquashfs pseudo file: `"/path" m MODE UID GID` for every entry below the
/// root: the owner recorded by the unpack, else root (the files on disk belong
/// to the unprivileged user who unpacked them). Returns the root's owner.
fn write_pseudo(dir: &Path, p: &Path, report: &UnpackReport) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, rel: &Path, f: &mut impl Write, report: &UnpackReport, p: &Path) -> Result<()> {
        let full = dir.join(rel);
        let mut names: Vec<_> =
            std::fs::read_dir(&full).at("listing", &full)?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let m = std::fs::symlink_metadata(dir.join(&r)).at("stat", &dir.join(&r))?;
            let (uid, gid) = report.unowned.get(&r).copied().unwrap_or((0, 0));
            let quoted = format!("/{}", r.display()).replace('\\', "\\\\").replace('"', "\\\"");
            writeln!(f, "\"{quoted}\" m {:o} {uid} {gid}", m.mode() & 0o7777).at("writing", p)?;
            if m.is_dir() {
                walk(dir, &r, f, report, p)?;
            }
        }
        Ok(())
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(p).at("creating", p)?);
    walk(dir, Path::new(""), &mut f, report, p)?;
    f.flush().at("writing", p)?;
    Ok(report.unowned.get(Path::new("/")).copied().unwrap_or((0, 0)))
}

/// Bytes for an ext4 image holding `dir`: data in 4 KiB blocks, an inode each,
/// plus 20% and 16 MiB of slack.
fn ext4_size(dir: &Path) -> Result<u64> {
    fn walk(p: &Path, total: &mut u64) -> Result<()> {
        for e in std::fs::read_dir(p).at("listing", p)? {
            let e = e.at("listing", p)?;
            let m = e.path().symlink_metadata().at("stat", &e.path())?;
            *total += m.len().div_ceil(4096) * 4096 + 256;
            if m.is_dir() {
                walk(&e.path(), total)?;
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(dir, &mut total)?;
    Ok((total + total / 5 + (16 << 20)).div_ceil(4096) * 4096)
}
