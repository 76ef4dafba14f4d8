//! A deadline on a request to the guest agent: when it passes, the agent
//! connection is shut down, so a host thread reading from a guest that never
//! answers gets an error instead of waiting forever.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// Armed until dropped.
pub(super) struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    /// Shuts `stream` down (both ways) after `after`, unless dropped first.
    pub(super) fn arm(stream: &UnixStream, after: Duration) -> std::io::Result<Watchdog> {
        let victim = stream.try_clone()?;
        let (cancel, cancelled) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&fired);
        let thread = std::thread::Builder::new().name("agent-deadline".into()).spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(after) {
                flag.store(true, Ordering::SeqCst);
                let _ = victim.shutdown(std::net::Shutdown::Both);
            }
        })?;
        Ok(Watchdog { cancel: Some(cancel), thread: Some(thread), fired })
    }

    /// Whether the deadline passed (the connection is then unusable).
    pub(super) fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.cancel.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_read_from_a_silent_peer_ends_at_the_deadline() {
        let (mut host, _guest) = UnixStream::pair().unwrap();
        let dog = Watchdog::arm(&host, Duration::from_millis(100)).unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 8];
        let n = host.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the shut-down connection reads as ended");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(dog.fired());
    }

    #[test]
    fn a_disarmed_watchdog_leaves_the_connection_alone() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let dog = Watchdog::arm(&host, Duration::from_secs(60)).unwrap();
        let t = Instant::now();
        drop(dog);
        assert!(t.elapsed() < Duration::from_secs(5), "dropping does not wait for the deadline");
        std::io::Write::write_all(&mut &host, b"hi").unwrap();
        let mut buf = [0u8; 2];
        guest.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }
}
