//! A process's stdio as containerd hands it over: paths of FIFOs (made by
//! the client, e.g. `ctr`), `file://` paths, or empty (no such stream).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
        (!self.stdin.is_empty()).then(|| {
            let path = PathBuf::from(&self.stdin);
            Box::new(LazyInput { path, state: InputState::Pending, bytes: 0 }) as Box<dyn Read + Send>
        })
    }
}

/// How long an output FIFO may wait for its reader (the client, e.g. `ctr`,
/// opens it around the time of Create; a detached client never does): past
/// it the stream's output is dropped rather than holding up the process.
const READER_WAIT: Duration = Duration::from_secs(60);

/// An output stream: a FIFO (opened on the first write, once its reader
/// is there: see [`LazyOutput`]), a `file://` log, or nothing.
fn open_output(path: &str) -> Result<Box<dyn Write + Send>> {
    if path.is_empty() {
        return Ok(Box::new(io::sink()));
    }
    match path.split_once("://") {
        None => {
            // Fail now on a path that is not there, not at the first write.
            std::fs::metadata(path).map_err(ShimError::io(format!("the output FIFO {path}")))?;
            Ok(Box::new(LazyOutput::new(PathBuf::from(path), READER_WAIT)))
        }
        Some(("file", file)) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .map_err(ShimError::io(format!("opening the log file {file}")))?;
            Ok(Box::new(f))
        }
        Some((scheme, _)) => Err(ShimError::InvalidArgument(format!(
            "stdio {path}: {scheme}:// log destinations are not supported (a FIFO path or file:// is)"
        ))),
    }
}

/// A FIFO written once its reader has opened it: the first write retries a
/// non-blocking open (ENXIO: no reader yet) for up to `wait`, then writes
/// block as a pipe's do. Without a reader by then, or once the reader has
/// gone (EPIPE), writes fail and the stream's output is dropped — the
/// process is never held up for good by a client that does not read.
struct LazyOutput {
    path: PathBuf,
    wait: Duration,
    file: Option<File>,
    failed: bool,
    /// Bytes written (logged when the stream ends).
    bytes: u64,
}

impl Drop for LazyOutput {
    fn drop(&mut self) {
        tracing::debug!("output {}: {} bytes written", self.path.display(), self.bytes);
    }
}

impl LazyOutput {
    fn new(path: PathBuf, wait: Duration) -> LazyOutput {
        LazyOutput { path, wait, file: None, failed: false, bytes: 0 }
    }

    fn open(&mut self) -> io::Result<&mut File> {
        if self.failed {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the output's reader is gone"));
        }
        if self.file.is_none() {
            let deadline = Instant::now() + self.wait;
            let file = loop {
                match OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&self.path) {
                    Ok(f) => break f,
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        self.failed = true;
                        tracing::warn!("{}: no reader ({e}); this output is dropped", self.path.display());
                        return Err(e);
                    }
                }
            };
            // From now on a full pipe makes the writer wait, as a pipe does.
            // SAFETY: F_GETFL/F_SETFL on a descriptor `file` owns; no pointers.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            // SAFETY: as above.
            if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
                self.failed = true;
                return Err(io::Error::last_os_error());
            }
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }
}

impl Write for LazyOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.open()?.write(data) {
            Ok(n) => {
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed = true;
                    tracing::warn!("{}: {e} after {} bytes; the rest is dropped", self.path.display(), self.bytes);
                }
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

enum InputState {
    Pending,
    Open(File),
    Done,
}

/// A stdin FIFO opened on the first read.
struct LazyInput {
    path: PathBuf,
    state: InputState,
    /// Bytes read so far (logged at its end).
    bytes: u64,
}

impl Read for LazyInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let InputState::Pending = self.state {
            self.state = match File::open(&self.path) {
                Ok(f) => InputState::Open(f),
                Err(e) => {
                    tracing::warn!("opening the stdin FIFO {}: {e}; stdin is closed", self.path.display());
                    InputState::Done
                }
            };
        }
        let InputState::Open(f) = &mut self.state else { return Ok(0) };
        let n = f.read(buf)?;
        self.bytes += n as u64;
        if n == 0 {
            tracing::debug!("stdin {}: {} bytes, then its end", self.path.display(), self.bytes);
            self.state = InputState::Done;
        }
        Ok(n)
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
    fn output_waits_for_a_late_reader_then_fails_once_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path(), "out");
        let mut w = open_output(p.to_str().unwrap()).unwrap();
        // The reader opens after the first write began (a client slower than the process).
        let reader_path = p.clone();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut r = File::open(&reader_path).unwrap();
            let mut got = [0u8; 5];
            r.read_exact(&mut got).unwrap();
            (r, got)
        });
        w.write_all(b"hello").unwrap();
        let (r, got) = reader.join().unwrap();
        assert_eq!(&got, b"hello", "nothing written before the reader came is lost");
        drop(r);
        assert!(w.write_all(b"more").is_err(), "no reader left: the write fails instead of blocking");
    }

    #[test]
    fn output_without_a_reader_is_dropped_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path(), "out");
        let mut w = LazyOutput::new(p, Duration::from_millis(200));
        let t = Instant::now();
        assert!(w.write_all(b"x").is_err(), "nobody reads: dropped, never blocks for good");
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(w.write_all(b"y").is_err(), "and stays dropped");
        assert!(open_output("/nonexistent/fifo").is_err(), "a missing FIFO is an error at once");
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
