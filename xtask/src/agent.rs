//! `cargo xtask agent [--initrd]`: the guest agent (`crates/sm-agent`) as a
//! static glibc binary, and an initrd that runs it as `/init`.
//!
//! The binary is built with `--target x86_64-unknown-linux-gnu` so the
//! static-linking `RUSTFLAGS` reach only the target artifacts, not build
//! scripts or proc macros: `target/x86_64-unknown-linux-gnu/release/sm-agent`.
//! The initrd (`target/guest/initrd-agent.cpio`) is an uncompressed newc
//! archive, written by the same writer as the test initrd: the agent as
//! `/init`, the mount points it uses, `dev/console`, and — when the host has
//! a static busybox (`busybox-static`) — busybox with its applet links and
//! minimal account files, so the guest has a shell and coreutils.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::initrd::{check_static_elf, init_entries, write_newc, Entry, S_IFDIR, S_IFREG};
use crate::paths;

/// The target triple the agent is built for.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Static (glibc, crt-static), non-PIE (the ELF check wants ET_EXEC; it also
/// saves the self-relocation at start), stripped.
const RUSTFLAGS: &str = "-C target-feature=+crt-static -C relocation-model=static -C strip=symbols";

/// Builds the static agent binary; returns its path.
pub fn build() -> Result<PathBuf> {
    let root = paths::workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "--quiet", "-p", "sm-agent", "--target", TARGET])
        .env("RUSTFLAGS", RUSTFLAGS)
        // These would override RUSTFLAGS or move the output.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .status()
        .with_context(|| format!("running {} build -p sm-agent", cargo.to_string_lossy()))?;
    if !status.success() {
        bail!(
            "building sm-agent failed ({status}); see cargo's output above \
             (try `RUSTFLAGS=\"{RUSTFLAGS}\" cargo build --release -p sm-agent --target {TARGET}`)"
        );
    }
    let bin = root.join("target").join(TARGET).join("release").join("sm-agent");
    let elf = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    check_static_elf(&elf).with_context(|| format!("{} is not a static executable", bin.display()))?;
    eprintln!("agent: {} ({} bytes, static)", bin.display(), elf.len());
    Ok(bin)
}

/// Where a static busybox is looked for (Debian's `busybox-static`).
const BUSYBOX: &str = "/bin/busybox";

/// Builds the agent and packs it as `/init` into
/// `target/guest/initrd-agent.cpio`; returns the archive's path. With a
/// static busybox on the host (installed from apt as `busybox-static` when
/// missing and running as root), the initrd also gets `/bin/busybox`, its
/// applet links, a minimal /etc/passwd and /etc/group, so execs have a shell
/// and the usual tools.
pub fn build_initrd() -> Result<PathBuf> {
    let bin = build()?;
    let init = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    let busybox = load_busybox();
    let out_dir = paths::guest_dir();
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("initrd-agent.cpio");
    let tmp = out.with_extension("cpio.tmp");
    let archive = agent_archive(&init, busybox.as_ref().map(|(b, l)| (b.as_slice(), l.as_slice())));
    // Unchanged contents keep the file (and its mtime): baked VM snapshots are
    // keyed by the initrd's identity and stay valid.
    if fs::read(&out).ok().as_deref() != Some(archive.as_slice()) {
        fs::write(&tmp, archive).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    }
    match &busybox {
        Some((_, applets)) => {
            eprintln!("initrd: {} (agent as /init, busybox with {} applets)", out.display(), applets.len())
        }
        None => eprintln!("initrd: {} (agent as /init, no busybox)", out.display()),
    }
    Ok(out)
}

/// The host's static busybox and its applet paths (`usr/bin/head`...), or
/// `None` (with a warning) when there is none.
fn load_busybox() -> Option<(Vec<u8>, Vec<String>)> {
    if !std::path::Path::new(BUSYBOX).exists() {
        // Best effort: without it the initrd has no busybox (warned below).
        if let Err(e) = crate::apt::ensure(&["busybox-static"], "the agent initrd's busybox") {
            eprintln!("initrd: {e:#}");
        }
    }
    let loaded = (|| -> Result<(Vec<u8>, Vec<String>)> {
        let elf = fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
        check_static_elf(&elf).with_context(|| format!("{BUSYBOX} is not static"))?;
        let list = Command::new(BUSYBOX)
            .arg("--list-full")
            .output()
            .with_context(|| format!("running {BUSYBOX} --list-full"))?;
        if !list.status.success() {
            bail!("{BUSYBOX} --list-full failed ({})", list.status);
        }
        let applets = String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter(|l| l.contains('/') && !l.starts_with('/') && !l.contains(".."))
            .filter(|l| *l != "bin/busybox")
            .map(str::to_owned)
            .collect();
        Ok((elf, applets))
    })();
    match loaded {
        Ok(found) => Some(found),
        Err(e) => {
            eprintln!(
                "initrd: WARNING: no busybox in the agent initrd ({e:#}); execs will only find \
                 /init. Install it with `apt-get install busybox-static`."
            );
            None
        }
    }
}

const S_IFLNK: u32 = 0o120000;

/// Minimal account files, so `user` names resolve and tools can print them.
const ETC_PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const ETC_GROUP: &[u8] = b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n";

/// The agent initrd's members: `/init`, the mount points the agent uses
/// before (or instead of) switching to a root disk, and `dev/console` (5:1)
/// so the kernel can give init its stdio before devtmpfs is mounted; with
/// `busybox` (binary, applet paths) also the tools.
fn agent_archive(init: &[u8], busybox: Option<(&[u8], &[String])>) -> Vec<u8> {
    let dir = Entry::dir;
    let mut entries = init_entries(init);
    entries.extend([
        dir("mnt"),
        dir("proc"),
        dir("run"),
        dir("sys"),
        Entry { name: "tmp", mode: S_IFDIR | 0o1777, rdev: (0, 0), data: &[] },
    ]);
    if let Some((elf, applets)) = busybox {
        let file = |name, mode, data| Entry { name, mode: S_IFREG | mode, rdev: (0, 0), data };
        entries.extend([
            dir("bin"),
            file("bin/busybox", 0o755, elf),
            dir("etc"),
            file("etc/group", 0o644, ETC_GROUP),
            file("etc/passwd", 0o644, ETC_PASSWD),
            Entry { name: "root", mode: S_IFDIR | 0o700, rdev: (0, 0), data: &[] },
            dir("sbin"),
            dir("usr"),
            dir("usr/bin"),
            dir("usr/sbin"),
        ]);
        entries.extend(applets.iter().map(|path| Entry {
            name: path,
            mode: S_IFLNK | 0o777,
            rdev: (0, 0),
            data: b"/bin/busybox",
        }));
    }
    write_newc(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initrd::tests::parse_newc;
    use crate::initrd::S_IFCHR;

    #[test]
    fn agent_archive_has_init_console_and_mount_points() {
        let init = b"\x7fELF pretend agent".to_vec();
        let members = parse_newc(&agent_archive(&init, None));
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "mnt", "proc", "run", "sys", "tmp", "TRAILER!!!"]);
        let by_name = |n: &str| members.iter().find(|m| m.name == n).expect("member");
        assert_eq!(by_name("dev/console").rdev, (5, 1));
        assert_eq!(by_name("dev/console").mode & 0o170000, S_IFCHR);
        assert_eq!(by_name("init").data, init);
        assert_eq!(by_name("init").mode, S_IFREG | 0o755);
        assert_eq!(by_name("tmp").mode, S_IFDIR | 0o1777);
        for d in ["dev", "mnt", "proc", "run", "sys"] {
            assert_eq!(by_name(d).mode, S_IFDIR | 0o755, "{d}");
        }
    }

    #[test]
    fn busybox_adds_tools_links_and_accounts_after_their_directories() {
        let init = b"agent".to_vec();
        let elf = b"busybox binary".to_vec();
        let applets = vec!["bin/sh".to_owned(), "usr/bin/head".to_owned(), "sbin/ip".to_owned()];
        let members = parse_newc(&agent_archive(&init, Some((&elf, &applets))));
        let position = |n: &str| members.iter().position(|m| m.name == n).unwrap_or_else(|| panic!("{n} missing"));
        assert_eq!(members[position("bin/busybox")].data, elf);
        assert_eq!(members[position("init")].data, init);
        for link in &applets {
            let m = &members[position(link)];
            assert_eq!(m.mode, S_IFLNK | 0o777, "{link}");
            assert_eq!(m.data, b"/bin/busybox", "{link}");
            let parent = link.rsplit_once('/').expect("has a directory").0;
            assert!(position(parent) < position(link), "{parent} before {link}");
        }
        let passwd = String::from_utf8_lossy(&members[position("etc/passwd")].data).into_owned();
        assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
        assert!(position("etc") < position("etc/passwd"));
    }
}
