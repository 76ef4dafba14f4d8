//! The guest console: everything the guest writes to COM1, forwarded to a sink and
//! kept as a timestamped transcript for callers that wait for markers (tests,
//! benchmarks) and for guest-panic detection.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The line Linux prints when it panics.
pub const KERNEL_PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Transcript memory kept (each line's text plus its entry, so empty lines
/// count too); the oldest lines are dropped beyond this.
const TRANSCRIPT_LIMIT: usize = 4 << 20;
/// Longest unfinished line kept; the rest of it is dropped.
const PARTIAL_LINE_LIMIT: usize = 64 * 1024;

/// Where console output goes besides the transcript.
#[derive(Debug, Clone, Default)]
pub enum ConsoleOutput {
    /// The host's standard output.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere (transcript only).
    #[default]
    Null,
}

#[derive(Default)]
struct Transcript {
    lines: VecDeque<(Duration, String)>,
    partial: Vec<u8>,
    bytes: usize,
    first_byte: Option<Duration>,
    panic_line: Option<String>,
}

impl Transcript {
    /// What a line costs in memory: its text and its entry.
    fn cost(line: &str) -> usize {
        line.len() + std::mem::size_of::<(Duration, String)>()
    }

    /// Appends a line, dropping the oldest ones (O(1) each) past the limit.
    fn push_line(&mut self, at: Duration, line: String) {
        self.bytes += Self::cost(&line);
        self.lines.push_back((at, line));
        while self.bytes > TRANSCRIPT_LIMIT {
            let Some((_, old)) = self.lines.pop_front() else { break };
            self.bytes -= Self::cost(&old);
        }
    }
}

/// The console of one VM. Cheap to clone (shared).
#[derive(Clone)]
pub struct Console {
    inner: Arc<ConsoleInner>,
}

struct ConsoleInner {
    start: Instant,
    sink: Mutex<Option<Box<dyn Write + Send>>>,
    transcript: Mutex<Transcript>,
    changed: Condvar,
}

impl Console {
    /// Creates a console whose timestamps count from `start`.
    pub fn new(output: &ConsoleOutput, start: Instant) -> std::io::Result<Self> {
        let sink: Option<Box<dyn Write + Send>> = match output {
            ConsoleOutput::Stdout => Some(Box::new(std::io::stdout())),
            ConsoleOutput::File(path) => Some(Box::new(File::create(path)?)),
            ConsoleOutput::Null => None,
        };
        Ok(Console {
            inner: Arc::new(ConsoleInner {
                start,
                sink: Mutex::new(sink),
                transcript: Mutex::new(Transcript::default()),
                changed: Condvar::new(),
            }),
        })
    }

    fn transcript(&self) -> std::sync::MutexGuard<'_, Transcript> {
        self.inner.transcript.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time from VM start to the first console byte, if any arrived.
    pub fn first_byte_at(&self) -> Option<Duration> {
        self.transcript().first_byte
    }

    /// The kernel panic line, if the guest panicked.
    pub fn panic_line(&self) -> Option<String> {
        self.transcript().panic_line.clone()
    }

    /// All complete lines kept, with the time each one ended.
    pub fn lines(&self) -> Vec<(Duration, String)> {
        self.transcript().lines.iter().cloned().collect()
    }

    /// Complete lines joined by newlines.
    pub fn text(&self) -> String {
        let t = self.transcript();
        let mut s: String = t.lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        s.push_str(&String::from_utf8_lossy(&t.partial));
        s
    }

    /// When (since VM start) a line containing `marker` was printed, if it was.
    pub fn find(&self, marker: &str) -> Option<(Duration, String)> {
        self.transcript().lines.iter().find(|(_, l)| l.contains(marker)).cloned()
    }

    /// Waits up to `timeout` for a line containing `marker`; returns it and its time.
    pub fn wait_for(&self, marker: &str, timeout: Duration) -> Option<(Duration, String)> {
        let deadline = Instant::now() + timeout;
        let mut t = self.transcript();
        loop {
            if let Some(found) = t.lines.iter().find(|(_, l)| l.contains(marker)) {
                return Some(found.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            t = self.inner.changed.wait_timeout(t, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Starts over after the guest was reset to an earlier state: an unfinished
    /// line is closed as it is (the guest will not finish it) and a recorded
    /// kernel panic is forgotten, so it is not blamed on the next run.
    pub fn mark_reset(&self) {
        let now = self.inner.start.elapsed();
        let mut t = self.transcript();
        t.panic_line = None;
        if !t.partial.is_empty() {
            let raw = std::mem::take(&mut t.partial);
            let line = String::from_utf8_lossy(&raw).trim_end_matches('\r').to_string();
            t.push_line(now, line);
            drop(t);
            self.inner.changed.notify_all();
        }
    }

    fn record(&self, bytes: &[u8]) {
        let now = self.inner.start.elapsed();
        let mut t = self.transcript();
        t.first_byte.get_or_insert(now);
        let mut new_line = false;
        for &b in bytes {
            if b == b'\n' {
                let raw = std::mem::take(&mut t.partial);
                let line = String::from_utf8_lossy(&raw).trim_end_matches('\r').to_string();
                if t.panic_line.is_none() && line.contains(KERNEL_PANIC_MARKER) {
                    t.panic_line = Some(line.clone());
                }
                t.push_line(now, line);
                new_line = true;
            } else if t.partial.len() < PARTIAL_LINE_LIMIT {
                t.partial.push(b);
            }
        }
        drop(t);
        if new_line {
            self.inner.changed.notify_all();
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.record(buf);
        if let Some(sink) = self.inner.sink.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            // The guest must not stall because the host's output is gone.
            let _ = sink.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(sink) = self.inner.sink.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = sink.flush();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_closes_the_partial_line_and_forgets_a_panic() {
        let mut c = Console::new(&ConsoleOutput::Null, Instant::now()).unwrap();
        c.write_all(format!("{KERNEL_PANIC_MARKER}: Attempted to kill init\nTIC").as_bytes()).unwrap();
        assert!(c.panic_line().is_some());
        c.mark_reset();
        assert!(c.panic_line().is_none());
        c.write_all(b"TICK 3\n").unwrap();
        let lines: Vec<String> = c.lines().into_iter().map(|(_, l)| l).collect();
        assert_eq!(lines[1..], ["TIC".to_string(), "TICK 3".to_string()]);
    }

    #[test]
    fn lines_markers_and_panic_are_recorded() {
        let mut c = Console::new(&ConsoleOutput::Null, Instant::now()).unwrap();
        assert!(c.first_byte_at().is_none());
        c.write_all(b"hello\r\nSM_INIT_READY cpus=1\npart").unwrap();
        assert!(c.first_byte_at().is_some());
        assert_eq!(c.lines().len(), 2);
        assert_eq!(c.lines()[0].1, "hello");
        assert!(c.find("SM_INIT_READY").unwrap().1.contains("cpus=1"));
        assert!(c.wait_for("part", Duration::from_millis(10)).is_none());
        c.write_all(b"ial\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n").unwrap();
        assert_eq!(c.find("partial").unwrap().1, "partial");
        assert!(c.panic_line().unwrap().contains("Attempted to kill init"));
    }

    #[test]
    fn the_transcript_is_bounded_empty_lines_included() {
        let mut c = Console::new(&ConsoleOutput::Null, Instant::now()).unwrap();
        let entry = std::mem::size_of::<(Duration, String)>();
        // 8 MiB of newlines: millions of empty lines, far past what is kept.
        let newlines = vec![b'\n'; 1 << 20];
        for _ in 0..8 {
            c.write_all(&newlines).unwrap();
        }
        let kept = c.lines().len();
        assert!(kept > 0 && kept <= TRANSCRIPT_LIMIT / entry, "{kept} empty lines kept");
        // Long lines and an endless unfinished one stay bounded too; the
        // newest line is always kept.
        let long = vec![b'x'; 1 << 20];
        for _ in 0..16 {
            c.write_all(&long).unwrap();
            c.write_all(b"\n").unwrap();
        }
        c.write_all(b"LAST\n").unwrap();
        for _ in 0..8 {
            c.write_all(&long).unwrap();
        }
        let t = c.transcript();
        assert!(t.bytes <= TRANSCRIPT_LIMIT);
        assert_eq!(t.bytes, t.lines.iter().map(|(_, l)| Transcript::cost(l)).sum::<usize>());
        assert_eq!(t.lines.back().map(|(_, l)| l.as_str()), Some("LAST"));
        assert_eq!(t.partial.len(), PARTIAL_LINE_LIMIT);
    }

    #[test]
    fn wait_for_wakes_on_a_line_from_another_thread() {
        let c = Console::new(&ConsoleOutput::Null, Instant::now()).unwrap();
        let mut w = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w.write_all(b"MARK\n").unwrap();
        });
        assert!(c.wait_for("MARK", Duration::from_secs(5)).is_some());
        t.join().unwrap();
    }
}
