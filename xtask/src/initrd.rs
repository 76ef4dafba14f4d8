//! `cargo xtask initrd`: the minimal test initrd.
//!
//! Builds `guest/testinit` (a static no-std PID 1, see its `src/main.rs`) and
//! packs it as `/init` into an uncompressed `newc` cpio archive at
//! `target/guest/initrd-test.cpio` (uncompressed: unpacking gzip costs
//! ~10 s/MB in an emulated guest kernel). The archive also holds a
//! `dev/console` character node (5:1): the kernel opens it as fds 0/1/2 for
//! init, so output works before anything is mounted. The archive is written
//! here byte by byte, so no root privileges (mknod) are needed.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::paths;

/// Build the test initrd; returns its path.
pub fn build() -> Result<PathBuf> {
    let init = build_testinit()?;
    let init_bytes = fs::read(&init).with_context(|| format!("reading {}", init.display()))?;
    check_static_elf(&init_bytes).with_context(|| format!("{} is not a usable static init", init.display()))?;

    let out_dir = paths::guest_dir();
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("initrd-test.cpio");
    let tmp = out.with_extension("cpio.tmp");
    fs::write(&tmp, test_archive(&init_bytes)).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    eprintln!("initrd: {} ({} byte init)", out.display(), init_bytes.len());
    Ok(out)
}

/// `cargo build --release` in guest/testinit; returns the binary's path.
fn build_testinit() -> Result<PathBuf> {
    let dir = paths::workspace_root().join("guest").join("testinit");
    // Cargo reads .cargo/config.toml relative to the working directory, so run
    // it inside guest/testinit; drop variables that would override its flags.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&dir)
        .args(["build", "--release", "--quiet"])
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .status()
        .with_context(|| format!("running {} build in {}", cargo.to_string_lossy(), dir.display()))?;
    if !status.success() {
        bail!(
            "building guest/testinit failed ({status}); see cargo's output above \
             (try `cd {} && cargo build --release`)",
            dir.display()
        );
    }
    let bin = dir.join("target/x86_64-unknown-linux-gnu/release/sm-testinit");
    if !bin.is_file() {
        bail!("guest/testinit built but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Checks that `elf` is an x86_64 executable with no program interpreter,
/// i.e. something the kernel can run as /init without any libraries.
pub(crate) fn check_static_elf(elf: &[u8]) -> Result<()> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("not a little-endian 64-bit ELF file");
    }
    if u16_at(16) != Some(2) || u16_at(18) != Some(0x3e) {
        bail!("not an x86_64 ET_EXEC executable (e_type {:?}, e_machine {:?})", u16_at(16), u16_at(18));
    }
    let phoff = u64_at(32).context("truncated ELF header")? as usize;
    let phentsize = usize::from(u16_at(54).context("truncated ELF header")?);
    let phnum = usize::from(u16_at(56).context("truncated ELF header")?);
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize).context("truncated program headers")?;
        if p_type == 3 {
            bail!("it has a PT_INTERP (dynamically linked)");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// cpio "newc" (SVR4 without CRC) writer

pub(crate) const S_IFDIR: u32 = 0o040000;
pub(crate) const S_IFCHR: u32 = 0o020000;
pub(crate) const S_IFREG: u32 = 0o100000;

/// One archive member.
pub(crate) struct Entry<'a> {
    pub(crate) name: &'a str,
    pub(crate) mode: u32,
    pub(crate) rdev: (u32, u32),
    pub(crate) data: &'a [u8],
}

impl<'a> Entry<'a> {
    /// A directory (0755).
    pub(crate) fn dir(name: &'a str) -> Self {
        Entry { name, mode: S_IFDIR | 0o755, rdev: (0, 0), data: &[] }
    }
}

/// What every initrd of ours starts with: `dev`, `dev/console` (5:1, so the
/// kernel can give init its stdio before devtmpfs is mounted) and `init`.
pub(crate) fn init_entries(init: &[u8]) -> Vec<Entry<'_>> {
    vec![
        Entry::dir("dev"),
        Entry { name: "dev/console", mode: S_IFCHR | 0o600, rdev: (5, 1), data: &[] },
        Entry { name: "init", mode: S_IFREG | 0o755, rdev: (0, 0), data: init },
    ]
}

/// The test initrd's members, in an order where parents precede children.
fn test_archive(init: &[u8]) -> Vec<u8> {
    let mut entries = init_entries(init);
    entries.extend([Entry::dir("proc"), Entry::dir("sys")]);
    write_newc(&entries)
}

/// Serialises `entries` plus the `TRAILER!!!` record. Owner root, mtime 0
/// (reproducible), inode numbers 1.., one link each (two for directories).
pub(crate) fn write_newc(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let nlink = if e.mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        push_member(&mut out, i as u32 + 1, e.mode, nlink, e.rdev, e.name, e.data);
    }
    push_member(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
    out
}

fn push_member(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), name: &str, data: &[u8]) {
    let name_size = name.len() as u32 + 1; // includes the NUL
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        name_size,
        0, // check (unused in newc)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// Header + name and file data each end on a 4-byte boundary.
fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A member as read back from the archive.
    #[derive(Debug)]
    pub(crate) struct Parsed {
        pub(crate) ino: u32,
        pub(crate) mode: u32,
        pub(crate) uid: u32,
        pub(crate) gid: u32,
        pub(crate) nlink: u32,
        pub(crate) mtime: u32,
        pub(crate) rdev: (u32, u32),
        pub(crate) name: String,
        pub(crate) data: Vec<u8>,
    }

    /// An independent newc reader: checks magic, hex fields, NUL-terminated
    /// names, 4-byte alignment and that the archive ends right after the trailer.
    pub(crate) fn parse_newc(buf: &[u8]) -> Vec<Parsed> {
        let mut pos = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(pos % 4, 0, "header at {pos} not 4-byte aligned");
            let hdr = &buf[pos..pos + 110];
            assert_eq!(&hdr[..6], b"070701", "bad magic at {pos}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&hdr[6 + i * 8..14 + i * 8]).expect("ascii field");
                assert!(s.bytes().all(|b| b.is_ascii_hexdigit()), "non-hex field {s:?}");
                u32::from_str_radix(s, 16).expect("hex field")
            };
            let filesize = field(6) as usize;
            let namesize = field(11) as usize;
            assert_eq!(field(12), 0, "check field");
            let name_start = pos + 110;
            let name_bytes = &buf[name_start..name_start + namesize];
            assert_eq!(name_bytes.last(), Some(&0), "name not NUL-terminated");
            let name = std::str::from_utf8(&name_bytes[..namesize - 1]).expect("utf8 name").to_owned();
            let data_start = (name_start + namesize).next_multiple_of(4);
            assert!(buf[name_start + namesize..data_start].iter().all(|&b| b == 0), "name padding");
            let data = buf[data_start..data_start + filesize].to_vec();
            pos = (data_start + filesize).next_multiple_of(4);
            assert!(buf[data_start + filesize..pos].iter().all(|&b| b == 0), "data padding");
            let done = name == "TRAILER!!!";
            out.push(Parsed {
                ino: field(0),
                mode: field(1),
                uid: field(2),
                gid: field(3),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                name,
                data,
            });
            if done {
                assert_eq!(pos, buf.len(), "bytes after the trailer");
                return out;
            }
        }
    }

    #[test]
    fn test_archive_round_trips() {
        let init = b"\x7fELF pretend init, 27 bytes".to_vec(); // odd length: exercises padding
        let archive = test_archive(&init);
        let members = parse_newc(&archive);
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "proc", "sys", "TRAILER!!!"]);

        let by_name = |n: &str| members.iter().find(|m| m.name == n).expect("member present");
        let console = by_name("dev/console");
        assert_eq!(console.mode & 0o170000, S_IFCHR);
        assert_eq!(console.rdev, (5, 1));
        assert!(console.data.is_empty());

        let init_m = by_name("init");
        assert_eq!(init_m.mode, S_IFREG | 0o755);
        assert_eq!(init_m.data, init);
        assert_eq!(init_m.nlink, 1);

        for d in ["dev", "proc", "sys"] {
            let m = by_name(d);
            assert_eq!(m.mode, S_IFDIR | 0o755, "{d}");
            assert_eq!(m.nlink, 2, "{d}");
        }
        for m in &members[..members.len() - 1] {
            assert_eq!((m.uid, m.gid, m.mtime), (0, 0, 0), "{}", m.name);
        }
        let mut inos: Vec<u32> = members[..members.len() - 1].iter().map(|m| m.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        assert_eq!(inos.len(), members.len() - 1, "inode numbers must be distinct");
    }

    #[test]
    fn elf_check_rejects_non_static() {
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[16] = 2; // ET_EXEC
        elf[18] = 0x3e; // x86_64
        elf[32] = 64; // e_phoff
        elf[54] = 56; // e_phentsize
        elf[56] = 1; // e_phnum
        elf[64] = 1; // PT_LOAD
        assert!(check_static_elf(&elf).is_ok());
        elf[64] = 3; // PT_INTERP
        assert!(check_static_elf(&elf).is_err());
    }
}
