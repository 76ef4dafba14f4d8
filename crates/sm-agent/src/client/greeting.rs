//! Greeting the agent of a real VM with a bound: a guest that accepts the
//! connection and then never answers (hung, hostile, or an old agent that
//! waits for something else) costs the host at most the given time, never a
//! thread forever. Requests that always answer promptly (file reads and
//! writes) are bounded the same way ([`AgentClient::bounded`]).

use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::{AgentClient, ClientError};
use crate::protocol::ProtocolError;

/// How long the guest may stay silent during a file read or write (each
/// read or write on the socket, not the whole transfer; generous for the
/// same reason as the greeting's).
pub const FILE_REQUEST_SILENCE: Duration = Duration::from_secs(60);

/// How long the host waits for an agent's answer to the greeting (and to
/// the clock/entropy refresh sent with it). Generous: a guest kernel
/// emulated by kvm_pvm answers in milliseconds when idle, but a host busy
/// with many VMs may starve it for a while.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(60);

impl AgentClient<UnixStream> {
    /// [`AgentClient::connect`] answered within `timeout` (then the stream
    /// has no timeouts again): else [`ClientError::NoAnswer`].
    pub fn connect_within(stream: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        within(stream, timeout, "Hello", AgentClient::connect)
    }

    /// [`AgentClient::connect_refreshed`] answered within `timeout`.
    pub fn connect_refreshed_within(
        stream: UnixStream,
        entropy: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        within(stream, timeout, "Hello, SetTime and AddEntropy", |s| AgentClient::connect_refreshed(s, entropy))
    }

    /// Runs `request` with every socket read and write bounded by `silence`:
    /// a guest that stops answering fails it with [`ClientError::NoAnswer`]
    /// (the connection is then of no further use) instead of holding the
    /// thread. The socket has no timeouts again afterwards.
    pub fn bounded<T>(
        &mut self,
        silence: Duration,
        context: &'static str,
        request: impl FnOnce(&mut Self) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let silence = set_timeouts(self.get_ref(), silence)?;
        let out = request(self).map_err(|e| no_answer(e, context, silence))?;
        // The answer is in: a socket that then refuses its timeouts back
        // changes nothing about it.
        let _ = set_timeouts(self.get_ref(), Duration::ZERO);
        Ok(out)
    }
}

/// Bounds every read and write on `stream` by `timeout` (at least 1 ms: a
/// zero timeout means "none" to the socket), or lifts the bound for
/// `Duration::ZERO`; returns the bound set.
fn set_timeouts(stream: &UnixStream, timeout: Duration) -> std::io::Result<Duration> {
    let bound = (!timeout.is_zero()).then(|| timeout.max(Duration::from_millis(1)));
    stream.set_read_timeout(bound)?;
    stream.set_write_timeout(bound)?;
    Ok(bound.unwrap_or_default())
}

/// A socket timeout during `context` as [`ClientError::NoAnswer`].
fn no_answer(e: ClientError, context: &'static str, waited: Duration) -> ClientError {
    match e {
        ClientError::Protocol(ProtocolError::Io(io)) if is_timeout(&io) => ClientError::NoAnswer { context, waited },
        other => other,
    }
}

fn within(
    stream: UnixStream,
    timeout: Duration,
    context: &'static str,
    greet: impl FnOnce(UnixStream) -> Result<AgentClient<UnixStream>, ClientError>,
) -> Result<AgentClient<UnixStream>, ClientError> {
    let timeout = set_timeouts(&stream, timeout.max(Duration::from_millis(1)))?;
    let client = greet(stream).map_err(|e| no_answer(e, context, timeout))?;
    set_timeouts(client.get_ref(), Duration::ZERO)?;
    Ok(client)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use super::*;
    use crate::protocol::{read_message, write_message, Message, PROTOCOL_VERSION};

    #[test]
    fn a_file_request_to_a_silent_guest_fails_within_its_bound() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        // A guest that greets, then never answers a request.
        let greeter = std::thread::spawn(move || {
            let hello = read_message(&mut guest).unwrap();
            assert!(matches!(hello, Message::Hello { .. }), "{hello:?}");
            write_message(&mut guest, &Message::Hello { version: PROTOCOL_VERSION }).unwrap();
            let mut sink = [0u8; 4096];
            while guest.read(&mut sink).is_ok_and(|n| n > 0) {}
        });
        let mut client = AgentClient::connect(host).unwrap();
        let t = Instant::now();
        let err = client.bounded(Duration::from_millis(200), "ReadFile", |c| c.read_file("/etc/hostname")).unwrap_err();
        assert!(matches!(err, ClientError::NoAnswer { context: "ReadFile", .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10), "bounded: {:?}", t.elapsed());
        drop(client);
        greeter.join().unwrap();
    }

    #[test]
    fn a_guest_that_never_answers_costs_the_timeout_not_forever() {
        let (host, guest) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let err = AgentClient::connect_within(host, Duration::from_millis(200)).err().unwrap();
        assert!(matches!(err, ClientError::NoAnswer { context: "Hello", .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10), "bounded: {:?}", t.elapsed());
        assert!(err.to_string().contains("did not answer"), "{err}");
        drop(guest);

        let (host, _guest) = UnixStream::pair().unwrap();
        let err = AgentClient::connect_refreshed_within(host, Some(&[1; 8]), Duration::from_millis(100)).err().unwrap();
        assert!(matches!(err, ClientError::NoAnswer { .. }), "{err}");
    }

    #[test]
    fn a_guest_that_answers_gives_a_client_without_timeouts_left() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(guest.try_clone().unwrap());
            assert!(matches!(read_message(&mut reader).unwrap(), Message::Hello { .. }));
            write_message(&mut guest, &Message::Hello { version: PROTOCOL_VERSION }).unwrap();
            // Nothing more: the host's stream must not time out on its own now.
            let mut rest = Vec::new();
            let _ = guest.read_to_end(&mut rest);
        });
        let client = AgentClient::connect_within(host, Duration::from_secs(30)).unwrap();
        assert_eq!(client.get_ref().read_timeout().unwrap(), None);
        assert_eq!(client.get_ref().write_timeout().unwrap(), None);
        let mut host = client.into_inner();
        host.flush().unwrap();
        drop(host);
        agent.join().unwrap();
    }

    #[test]
    fn an_agent_of_another_protocol_version_is_an_error_at_once() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(guest.try_clone().unwrap());
            let _ = read_message(&mut reader);
            write_message(&mut guest, &Message::Hello { version: PROTOCOL_VERSION + 1 }).unwrap();
            guest
        });
        let err = AgentClient::connect_within(host, Duration::from_secs(30)).err().unwrap();
        assert!(err.is_version_mismatch(), "{err}");
        drop(agent.join().unwrap());
    }
}
