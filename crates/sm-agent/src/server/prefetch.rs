//! `Prefetch`: reads programs into the guest's page cache before a snapshot
//! is baked, so that every VM restored from it starts them without reading
//! the root disk (on kvm_pvm, reading busybox from an erofs disk costs the
//! first exec ~1 s of emulated kernel work; from the page cache, nothing).
//!
//! Each program is resolved like `execvp` would (a name without `/` in the
//! default `PATH`), mapped with `MAP_POPULATE` (the kernel reads it into the
//! page cache without copying it to the agent) and unmapped; then the same
//! for its `#!` interpreter or ELF `PT_INTERP`. Shared libraries beyond the
//! interpreter are not followed. What cannot be found or read is skipped:
//! prefetching is an optimisation, never a reason to fail a bake.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::command::DEFAULT_PATH;

/// At most this many bytes are prefetched per request (the page cache
/// pages end up in every snapshot taken after).
pub(crate) const MAX_PREFETCH_BYTES: u64 = 64 << 20;

/// At most this many programs per request (interpreters included).
pub(crate) const MAX_PREFETCH_PROGRAMS: usize = 32;

/// Bytes of a file's head read to find its interpreter.
const HEAD: usize = 4096;

/// What was prefetched.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Prefetched {
    pub(crate) files: Vec<PathBuf>,
    pub(crate) bytes: u64,
}

/// Prefetches `programs` and their interpreters, within the limits above.
pub(crate) fn prefetch(programs: &[String]) -> Prefetched {
    let mut done = Prefetched::default();
    let mut queue: Vec<PathBuf> = programs.iter().filter_map(|p| resolve(p)).collect();
    queue.reverse();
    // Every path is looked at once (scripts naming each other with `#!`
    // end), and at most twice the program count are looked at.
    let mut seen: Vec<PathBuf> = Vec::new();
    while let Some(path) = queue.pop() {
        if done.files.len() >= MAX_PREFETCH_PROGRAMS || seen.len() >= 2 * MAX_PREFETCH_PROGRAMS || seen.contains(&path)
        {
            continue;
        }
        seen.push(path.clone());
        // Non-blocking and no controlling tty: a FIFO or a device named as a
        // program is skipped below, never waited on.
        let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(&path);
        let Ok(mut file) = opened else { continue };
        let Ok(meta) = file.metadata() else { continue };
        if !meta.is_file() || meta.len() == 0 || done.bytes + meta.len() > MAX_PREFETCH_BYTES {
            continue;
        }
        let mut head = vec![0u8; HEAD];
        let n = read_head(&mut file, &mut head);
        head.truncate(n);
        if populate(&file, meta.len()) {
            done.bytes += meta.len();
            done.files.push(path.clone());
        }
        if let Some(interp) = interpreter(&head) {
            queue.push(interp);
        }
    }
    done
}

fn read_head(file: &mut File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    filled
}

/// Where `execvp` would find `program`.
fn resolve(program: &str) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    DEFAULT_PATH.split(':').map(|dir| Path::new(dir).join(program)).find(|p| p.is_file())
}

/// Maps `len` bytes of `file` with `MAP_POPULATE` and unmaps them: the
/// pages stay in the page cache. False if the kernel refused the mapping.
fn populate(file: &File, len: u64) -> bool {
    let Ok(len) = usize::try_from(len) else { return false };
    // SAFETY: a fresh read-only private mapping of an open file, chosen by
    // the kernel (no fixed address), unmapped below; nothing reads it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_POPULATE,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: `addr` is the mapping of `len` bytes made above.
    unsafe { libc::munmap(addr, len) };
    true
}

/// The interpreter a file's head names: `#!` line, or ELF `PT_INTERP`.
fn interpreter(head: &[u8]) -> Option<PathBuf> {
    if let Some(line) = head.strip_prefix(b"#!") {
        let line = line.split(|&b| b == b'\n').next()?;
        let text = std::str::from_utf8(line).ok()?.trim_start();
        let path = text.split_whitespace().next()?;
        return path.starts_with('/').then(|| PathBuf::from(path));
    }
    elf_interpreter(head)
}

/// `PT_INTERP` of a 64-bit little-endian ELF whose program headers and
/// interpreter string lie within `head`.
fn elf_interpreter(head: &[u8]) -> Option<PathBuf> {
    const PT_INTERP: u32 = 3;
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let bytes = |o: usize, n: usize| head.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes(o, 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bytes(o, 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes(o, 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 56 {
        return None;
    }
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != PT_INTERP {
            continue;
        }
        let offset = usize::try_from(u64_at(ph.checked_add(8)?)?).ok()?;
        let size = usize::try_from(u64_at(ph.checked_add(32)?)?).ok()?;
        let raw = head.get(offset..offset.checked_add(size)?)?;
        let raw = raw.split(|&b| b == 0).next()?;
        if raw.first() != Some(&b'/') {
            return None;
        }
        return Some(PathBuf::from(std::ffi::OsStr::from_bytes(raw)));
    }
    None
}

/// For logs: the prefetched files as one line.
pub(crate) fn describe(p: &Prefetched) -> String {
    let names: Vec<String> = p.files.iter().map(|f| f.display().to_string()).collect();
    format!("{} bytes: {}", p.bytes, names.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreters_are_found_in_scripts_and_elf_headers() {
        assert_eq!(interpreter(b"#!/bin/sh -e\necho"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(interpreter(b"#! /usr/bin/env python3\n"), Some(PathBuf::from("/usr/bin/env")));
        assert_eq!(interpreter(b"#!relative\n"), None);
        assert_eq!(interpreter(b"plain text"), None);
        // This test binary itself: a dynamic ELF names its loader.
        let mut own = File::open("/proc/self/exe").unwrap();
        let mut head = vec![0u8; HEAD];
        let n = read_head(&mut own, &mut head);
        if let Some(interp) = interpreter(&head[..n]) {
            assert!(interp.is_file(), "{}", interp.display());
        }
    }

    #[test]
    fn hostile_elf_headers_give_no_interpreter() {
        let mut head = vec![0u8; 128];
        head[..6].copy_from_slice(b"\x7fELF\x02\x01");
        // Program headers far beyond the head, huge counts, overflowing offsets.
        head[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        head[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        head[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(elf_interpreter(&head), None);
        head[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        head[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        head[64..68].copy_from_slice(&3u32.to_le_bytes());
        head[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
        head[96..104].copy_from_slice(&16u64.to_le_bytes());
        assert_eq!(elf_interpreter(&head), None);
    }

    #[test]
    fn programs_and_interpreters_are_read_within_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        let target = dir.path().join("interp");
        std::fs::write(&target, vec![7u8; 10_000]).unwrap();
        std::fs::write(&script, format!("#!{}\n", target.display())).unwrap();
        let missing = dir.path().join("missing").display().to_string();
        let done = prefetch(&[script.display().to_string(), missing, String::new()]);
        assert_eq!(done.files, vec![script.clone(), target.clone()]);
        assert_eq!(done.bytes, std::fs::metadata(&script).unwrap().len() + 10_000);
        // A name is looked up in PATH.
        let sh = prefetch(&["sh".to_string()]);
        assert!(sh.files.first().is_some_and(|f| f.ends_with("sh")), "{sh:?}");
        // The same file twice is read once; too many programs: the rest is skipped.
        assert_eq!(prefetch(&[target.display().to_string(), target.display().to_string()]).files, vec![target]);
        let many: Vec<String> = (0..MAX_PREFETCH_PROGRAMS + 5)
            .map(|i| {
                let p = dir.path().join(format!("p{i}"));
                std::fs::write(&p, b"x").unwrap();
                p.display().to_string()
            })
            .collect();
        assert_eq!(prefetch(&many).files.len(), MAX_PREFETCH_PROGRAMS);
    }

    #[test]
    fn fifos_devices_and_scripts_naming_each_other_neither_block_nor_loop() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, format!("#!{}\n", b.display())).unwrap();
        std::fs::write(&b, format!("#!{}\n", a.display())).unwrap();
        let by_fifo = dir.path().join("by-fifo");
        std::fs::write(&by_fifo, format!("#!{}\n", fifo.display())).unwrap();
        let programs: Vec<String> = [&fifo, &a, &by_fifo].iter().map(|p| p.display().to_string()).collect();
        let done = prefetch(&[programs, vec!["/dev/zero".into()]].concat());
        assert_eq!(done.files, vec![a, b, by_fifo]);
    }
}
