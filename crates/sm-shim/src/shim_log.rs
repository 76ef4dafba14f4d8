//! The shim's log, to containerd. containerd reads each task bundle's `log`
//! FIFO while that task lives and copies it into its own log. A shim
//! serving several containers (a warm pool) outlives the bundle it was
//! started in, so this logger writes to the newest bundle's FIFO that still
//! has a reader, and falls back to older ones as their readers go.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// FIFOs kept at most (the oldest is let go first).
const MAX_SINKS: usize = 64;
/// A line is cut to this many bytes: a pipe write of at most PIPE_BUF
/// (4096) bytes is whole or not at all, never half a line.
const MAX_LINE: usize = 4000;

/// A `log` logger writing containerd's shim log format to bundle FIFOs.
pub struct ShimLog {
    /// Open FIFOs, newest last.
    sinks: Mutex<Vec<File>>,
}

static LOGGER: ShimLog = ShimLog { sinks: Mutex::new(Vec::new()) };

impl ShimLog {
    /// Installs the logger with the FIFO of the shim's first bundle (the
    /// working directory's `log`); `debug` lowers the level to debug.
    pub fn install(debug: bool) {
        LOGGER.add(Path::new("log"));
        let level = if debug { log::LevelFilter::Debug } else { log::LevelFilter::Info };
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(level);
        }
    }

    /// Adds `bundle`'s FIFO as the newest sink (a bundle whose FIFO has no
    /// reader is skipped).
    pub fn add_bundle(bundle: &Path) {
        LOGGER.add(&bundle.join("log"));
    }

    fn add(&self, fifo: &Path) {
        // Non-blocking: opening a FIFO with no reader fails (ENXIO) instead
        // of waiting, and a full FIFO drops a line instead of stalling.
        let opened = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(fifo);
        if let Ok(file) = opened {
            let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
            if sinks.len() == MAX_SINKS {
                sinks.remove(0);
            }
            sinks.push(file);
        }
    }
}

impl log::Log for ShimLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let at = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let message = record.args().to_string().replace('\\', "\\\\").replace('"', "\\\"");
        let mut line = format!("time=\"{at}\" level={} msg=\"{message}", record.level().as_str().to_lowercase());
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str("...");
        }
        line.push_str("\"\n");
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(sink) = sinks.last_mut() {
            match sink.write(line.as_bytes()) {
                // EPIPE: containerd closed this bundle's reader (its task is deleted).
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    sinks.pop();
                }
                // Written, or a full FIFO (the line is dropped).
                _ => return,
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn fifo(dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo only reads it.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        path
    }

    fn open_reader(path: &Path) -> File {
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).unwrap()
    }

    fn drain(reader: &mut File) -> String {
        let mut buf = vec![0; 4096];
        match reader.read(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(_) => String::new(),
        }
    }

    #[test]
    fn lines_go_to_the_newest_fifo_with_a_reader_and_fall_back_when_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second, unread) = (fifo(dir.path(), "a"), fifo(dir.path(), "b"), fifo(dir.path(), "c"));
        let mut first_reader = open_reader(&first);
        let second_reader = open_reader(&second);
        let logger = ShimLog { sinks: Mutex::new(Vec::new()) };
        log::set_max_level(log::LevelFilter::Info);
        logger.add(&first);
        logger.add(&second);
        logger.add(&unread);
        assert_eq!(logger.sinks.lock().unwrap().len(), 2, "a FIFO nobody reads is skipped, not waited for");

        let record = |text: &str| {
            log::Log::log(
                &logger,
                &log::Record::builder().level(log::Level::Error).args(format_args!("{}", text)).build(),
            )
        };
        // The second reader is gone (its task deleted): the line falls back to the first.
        drop(second_reader);
        record("said \"hi\"");
        let got = drain(&mut first_reader);
        assert!(got.contains(r#"level=error msg="said \"hi\"""#), "{got:?}");
        assert_eq!(logger.sinks.lock().unwrap().len(), 1, "the closed FIFO is let go");
    }
}
