//! Tests of [`super::RunningProcess`] against the real agent server (on
//! this host, over a socket pair).

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::*;
use crate::protocol::ExitStatus;

/// A writer whose bytes the test reads back.
#[derive(Clone, Default)]
pub(in crate::client) struct Shared(pub(in crate::client) Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A client of the real agent server (on this host, over a socket pair).
fn client() -> AgentClient<UnixStream> {
    let (host, agent) = UnixStream::pair().unwrap();
    std::thread::spawn(move || crate::Server::new().serve_connection(agent));
    AgentClient::connect(host).unwrap()
}

#[test]
fn a_background_process_is_signalled_from_another_thread() {
    let out = Shared::default();
    let req = ExecRequest::new(["sh", "-c", "echo up; exec sleep 30"]);
    let process = client().spawn(&req, None, ExecOutput::new(Box::new(out.clone()), Box::new(io::sink()))).unwrap();
    assert!(process.pid() > 0);
    assert!(process.wait_timeout(Duration::from_millis(200)).is_none(), "sleep 30 is still running");
    let process = Arc::new(process);
    let signaller = Arc::clone(&process);
    std::thread::spawn(move || signaller.signal(libc::SIGTERM).unwrap()).join().unwrap();
    let report = process.wait_timeout(Duration::from_secs(20)).expect("SIGTERM ends sleep").unwrap();
    assert_eq!(report.status, ExitStatus::Signal(libc::SIGTERM));
    assert_eq!(out.0.lock().unwrap().as_slice(), b"up\n", "the output is complete at exit");
    assert!(process.has_ended());
    assert!(process.signal(libc::SIGKILL).is_err(), "an ended process cannot be signalled");
    assert_eq!(process.wait().unwrap(), report, "every waiter sees the same exit");
}

#[test]
fn a_terminal_is_resized_while_its_process_runs() {
    let out = Shared::default();
    // Prints the size it starts with, then (after a line of input) the new one.
    let req = ExecRequest { tty: true, ..ExecRequest::new(["sh", "-c", "stty size; read line; stty size"]) };
    let (input, mut feed) = UnixStream::pair().unwrap();
    let output = ExecOutput::new(Box::new(out.clone()), Box::new(io::sink()));
    let process = client().spawn(&req, Some(Box::new(input)), output).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&out.0.lock().unwrap()).contains("24 80") {
        assert!(Instant::now() < deadline, "no first size: {:?}", String::from_utf8_lossy(&out.0.lock().unwrap()));
        std::thread::sleep(Duration::from_millis(20));
    }
    process.resize(50, 132).unwrap();
    feed.write_all(b"go\n").unwrap();
    let report = process.wait_timeout(Duration::from_secs(20)).expect("sh ends").unwrap();
    assert!(report.status.success(), "{report:?}");
    let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    assert!(text.contains("50 132"), "the new size reached the terminal: {text:?}");
    assert!(process.resize(1, 1).is_err(), "an ended process has no terminal to resize");
}

/// A sink that takes nothing, ever (a FIFO its reader keeps open
/// without reading).
struct Stuck;

impl Write for Stuck {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        loop {
            std::thread::park();
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stalled_output_sink_does_not_hide_the_exit_of_a_killed_process() {
    let req = ExecRequest::new(["sh", "-c", "while :; do echo flood; done"]);
    let process = client().spawn(&req, None, ExecOutput::new(Box::new(Stuck), Box::new(io::sink()))).unwrap();
    // Let the queue fill behind the stuck sink.
    std::thread::sleep(Duration::from_millis(500));
    assert!(process.wait_timeout(Duration::from_millis(10)).is_none());
    process.signal(libc::SIGKILL).unwrap();
    let report = process.wait_timeout(Duration::from_secs(60)).expect("the exit is reported").unwrap();
    assert_eq!(report.status, ExitStatus::Signal(libc::SIGKILL));
    assert!(process.dropped_output() > 0, "what the stuck sink could not take was dropped, and counted");
}

#[test]
fn closing_stdin_ends_a_reader_and_bad_signals_are_refused() {
    let out = Shared::default();
    let input: Box<dyn Read + Send> = Box::new(io::repeat(b'x').take(10));
    // cat gets 10 bytes of a never-closed input: it ends only when stdin is closed.
    let (never_rx, _keep_open) = UnixStream::pair().unwrap();
    let chained: Box<dyn Read + Send> = Box::new(input.chain(never_rx));
    let process = client()
        .spawn(&ExecRequest::new(["cat"]), Some(chained), ExecOutput::new(Box::new(out.clone()), Box::new(io::sink())))
        .unwrap();
    assert!(process.signal(0).is_err() && process.signal(65).is_err());
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.0.lock().unwrap().len() < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(process.wait_timeout(Duration::from_millis(100)).is_none(), "cat waits for more input");
    process.close_stdin();
    let report = process.wait_timeout(Duration::from_secs(20)).expect("cat ends at stdin close").unwrap();
    assert!(report.status.success(), "{report:?}");
    assert_eq!(out.0.lock().unwrap().as_slice(), b"xxxxxxxxxx");
}
