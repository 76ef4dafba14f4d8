//! A process's stdio as containerd hands it over: paths of FIFOs (made by
//! the client, e.g. `ctr`), `file://` paths, or empty (no such stream).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::error::{Result, ShimError};

/// The stdio paths of one process.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    /// Stdin path; empty: stdin is `/dev/null`.
    pub stdin: String,
    /// Stdout path; empty: discarded.
    pub stdout: String,
    /// Stderr path; empty: discarded (always, with a terminal).
    pub stderr: String,
    /// Run on a pseudo-terminal.
    pub terminal: bool,
}

impl Stdio {
    /// Where the process's output goes.
    pub fn output(&self) -> Result<sm_api::ExecOutput> {
        Ok(sm_api::ExecOutput::new(open_output(&self.stdout)?, open_output(&self.stderr)?))
    }

    /// The process's input, if it has one: opened on the first read (a FIFO
    /// open blocks until its writer opens it too, so it happens on the
    /// input's own thread).
    pub fn input(&self) -> Option<Box<dyn Read + Send>> {
        (!self.stdin.is_empty()).then(|| Box::new(LazyInput::Path(PathBuf::from(&self.stdin))) as Box<dyn Read + Send>)
    }
}

/// An output stream: a FIFO opened for writing without waiting for its
/// reader (held open read-write for the moment of the second open, as
/// containerd's own shims do), so that when the reader goes away writes fail
/// (the output is then dropped) instead of blocking the process forever.
fn open_output(path: &str) -> Result<Box<dyn Write + Send>> {
    if path.is_empty() {
        return Ok(Box::new(io::sink()));
    }
    let path = match path.split_once("://") {
        None => path,
        Some(("file", file)) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .map_err(ShimError::io(format!("opening the log file {file}")))?;
            return Ok(Box::new(f));
        }
        Some((scheme, _)) => {
            return Err(ShimError::InvalidArgument(format!(
                "stdio {path}: {scheme}:// log destinations are not supported (a FIFO path or file:// is)"
            )))
        }
    };
    let hold = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(ShimError::io(format!("opening the output FIFO {path}")))?;
    let writer = OpenOptions::new().write(true).open(path).map_err(ShimError::io(format!("opening {path}")))?;
    drop(hold);
    Ok(Box::new(writer))
}

enum LazyInput {
    Path(PathBuf),
    Open(File),
    Failed,
}

impl Read for LazyInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let LazyInput::Path(p) = self {
            *self = match File::open(&*p) {
                Ok(f) => LazyInput::Open(f),
                Err(e) => {
                    tracing::warn!("opening the stdin FIFO {}: {e}; stdin is closed", p.display());
                    LazyInput::Failed
                }
            };
        }
        match self {
            LazyInput::Open(f) => f.read(buf),
            _ => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &std::path::Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, alive for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    #[test]
    fn output_to_a_fifo_reaches_its_reader_and_fails_once_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path(), "out");
        let mut reader = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&p).unwrap();
        let mut w = open_output(p.to_str().unwrap()).unwrap();
        w.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(reader);
        assert!(w.write_all(b"more").is_err(), "no reader left: the write fails instead of blocking");
    }

    #[test]
    fn output_without_a_reader_opens_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path(), "out");
        let mut w = open_output(p.to_str().unwrap()).unwrap();
        assert!(w.write_all(b"x").is_err(), "nobody reads: dropped, never blocks");
    }

    #[test]
    fn file_urls_append_and_other_schemes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let url = format!("file://{}", log.display());
        open_output(&url).unwrap().write_all(b"a").unwrap();
        open_output(&url).unwrap().write_all(b"b").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"ab");
        let err = open_output("binary:///usr/bin/logger").err().unwrap();
        assert!(err.to_string().contains("binary://"), "{err}");
        assert!(Stdio::default().input().is_none());
    }

    #[test]
    fn input_opens_its_fifo_on_the_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path(), "in");
        let stdio = Stdio { stdin: p.to_str().unwrap().into(), ..Stdio::default() };
        let mut input = stdio.input().unwrap();
        let writer = std::thread::spawn(move || std::fs::write(&p, b"typed").unwrap());
        let mut got = Vec::new();
        input.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got, b"typed");
    }
}
