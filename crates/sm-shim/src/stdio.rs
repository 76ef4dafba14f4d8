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

    /// The process's stdin, opened now (at Start): the shim's write end of
    /// the FIFO (the keeper: dropped at CloseIO, as containerd's runc shim
    /// does) and the input to read. The input ends only once the client has
    /// closed its side *and* the keeper is dropped, and since both ends are
    /// open from Start on, what the client wrote is never lost, however its
    /// CloseIO races the process's start. `None` without stdin.
    pub fn stdin(&self) -> Result<Option<(File, Box<dyn Read + Send>)>> {
        if self.stdin.is_empty() {
            return Ok(None);
        }
        let what = || format!("opening the stdin FIFO {}", self.stdin);
        // Read-write and non-blocking: neither open waits for the client.
        let keeper = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.stdin)
            .map_err(ShimError::io(what()))?;
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.stdin)
            .map_err(ShimError::io(what()))?;
        // Reads wait for input from now on.
        set_blocking(&reader).map_err(ShimError::io(what()))?;
        let input = CountedInput { path: PathBuf::from(&self.stdin), file: reader, bytes: 0 };
        Ok(Some((keeper, Box::new(input))))
    }
}

/// Clears O_NONBLOCK on `file`.
fn set_blocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor `file` owns; no pointers.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How long an output FIFO may wait for its reader. containerd's clients
/// open (or are blocked opening, which counts) their read ends before
/// Create, so this only covers a slower client; a detached one never opens
/// it: past the wait the stream's output is dropped rather than holding up
/// the process.
const READER_WAIT: Duration = Duration::from_secs(2);

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
            if let Err(e) = set_blocking(&file) {
                self.failed = true;
                return Err(e);
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

/// The stdin FIFO's read end, counting what passes (logged at its end).
struct CountedInput {
    path: PathBuf,
    file: File,
    bytes: u64,
}

impl Read for CountedInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.bytes += n as u64;
        if n == 0 {
            tracing::debug!("stdin {}: {} bytes, then its end", self.path.display(), self.bytes);
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
    }

    #[test]
    fn input_ends_only_once_the_client_closed_and_close_io_dropped_the_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path(), "in");
        let stdio = Stdio { stdin: p.to_str().unwrap().into(), ..Stdio::default() };
        let (keeper, mut input) = stdio.stdin().unwrap().expect("a stdin path has both ends");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            input.read_to_end(&mut got).unwrap();
            done_tx.send(got).unwrap();
        });
        // The client writes and closes its side, as ctr does around CloseIO.
        std::fs::write(&p, b"typed").unwrap();
        assert!(
            done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the input does not end while the keeper holds the FIFO"
        );
        drop(keeper); // CloseIO
        let got = done_rx.recv_timeout(Duration::from_secs(10)).expect("the input ends after CloseIO");
        assert_eq!(got, b"typed");
        assert!(Stdio::default().stdin().unwrap().is_none());
    }

    /// What a restored container met: the client wrote, closed and sent
    /// CloseIO before the process's input was first read.
    #[test]
    fn input_written_and_closed_before_the_first_read_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path(), "in");
        let stdio = Stdio { stdin: p.to_str().unwrap().into(), ..Stdio::default() };
        let (keeper, mut input) = stdio.stdin().unwrap().unwrap();
        std::fs::write(&p, b"early").unwrap();
        drop(keeper);
        let mut got = Vec::new();
        input.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"early");
    }
}
