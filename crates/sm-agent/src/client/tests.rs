//! Client behaviour against a scripted fake agent on a socket pair.

use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};

use super::*;
use crate::protocol::{read_message, write_message, ExitReport, GuestCost};

/// A client connected to a thread running `script` as the agent.
fn with_fake_agent(script: impl FnOnce(&mut UnixStream) + Send + 'static) -> (AgentClient<UnixStream>, JoinHandle<()>) {
    let (host, mut agent) = UnixStream::pair().expect("socketpair");
    let handle = thread::spawn(move || script(&mut agent));
    (AgentClient::new(host), handle)
}

fn recv(s: &mut UnixStream) -> Message {
    read_message(s).expect("fake agent reads a frame")
}

fn send(s: &mut UnixStream, m: &Message) {
    write_message(s, m).expect("fake agent writes a frame");
}

/// The agent's half of the handshake.
fn agent_hello(s: &mut UnixStream) {
    assert_eq!(recv(s), Message::Hello { version: PROTOCOL_VERSION });
    send(s, &Message::Hello { version: PROTOCOL_VERSION });
}

#[test]
fn a_version_mismatch_is_a_clear_error() {
    let (mut client, agent) = with_fake_agent(|s| {
        let _ = recv(s);
        send(s, &Message::Hello { version: PROTOCOL_VERSION + 1 });
    });
    let err = client.hello().expect_err("mismatch");
    match &err {
        ClientError::Protocol(ProtocolError::VersionMismatch { ours, peer }) => {
            assert_eq!((*ours, *peer), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1));
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("version mismatch"), "{text}");
    assert!(matches!(client.ping(), Err(ClientError::Desynchronized)));
    agent.join().expect("agent thread");
}

#[test]
fn stdin_respects_the_agent_window_and_output_is_collected() {
    const WINDOW: u32 = 10;
    let input: Vec<u8> = (0..25u8).collect();
    let expected = input.clone();
    let (mut client, agent) = with_fake_agent(move |s| {
        agent_hello(s);
        let Message::Exec(req) = recv(s) else { panic!("expected Exec") };
        assert!(req.stdin, "exec with data sets the stdin flag");
        send(s, &Message::Started { pid: 42, stdin_window: WINDOW });
        let mut received = Vec::new();
        loop {
            match recv(s) {
                Message::Stdin { data } => {
                    // Acks are sent right away, so each chunk must fit the window.
                    assert!(data.len() as u32 <= WINDOW, "{} bytes in flight", data.len());
                    received.extend_from_slice(&data);
                    send(s, &Message::Stdout { data: data.clone() });
                    send(s, &Message::StdinAck { bytes: data.len() as u32 });
                }
                Message::StdinClose => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(received, expected);
        send(s, &Message::Stderr { data: b"done".to_vec() });
        send(
            s,
            &Message::Exited(ExitReport {
                status: ExitStatus::Code(3),
                timed_out: false,
                duration_us: 1234,
                cost: GuestCost { spawn_us: 7, ..GuestCost::default() },
            }),
        );
    });
    client.hello().expect("hello");
    let outcome = client.exec(&ExecRequest::new(["cat"]), Some(&input)).expect("exec");
    assert_eq!(outcome.pid, 42);
    assert_eq!(outcome.stdout, input);
    assert_eq!(outcome.stderr, b"done");
    assert_eq!(outcome.status, ExitStatus::Code(3));
    assert!(!outcome.timed_out);
    assert_eq!(outcome.duration, Duration::from_micros(1234));
    assert_eq!(outcome.cost.spawn_us, 7);
    assert!(outcome.timeline.exited >= outcome.timeline.started);
    agent.join().expect("agent thread");
}

#[test]
fn agent_errors_keep_their_kind_and_the_connection_stays_usable() {
    let (mut client, agent) = with_fake_agent(|s| {
        agent_hello(s);
        assert!(matches!(recv(s), Message::Exec(_)));
        send(s, &Message::error(ErrorKind::CommandNotFound, "nope: command not found"));
        assert_eq!(recv(s), Message::Ping);
        send(s, &Message::Pong);
    });
    client.hello().expect("hello");
    let err = client.exec(&ExecRequest::new(["nope"]), None).expect_err("not found");
    assert_eq!(err.agent_kind(), Some(ErrorKind::CommandNotFound));
    assert_eq!(err.shell_exit_code(), Some(127));
    assert!(err.to_string().contains("command not found"), "{err}");
    client.ping().expect("still in sync");
    agent.join().expect("agent thread");
}

#[test]
fn an_abandoned_session_desynchronizes_the_client() {
    let (mut client, agent) = with_fake_agent(|s| {
        agent_hello(s);
        assert!(matches!(recv(s), Message::Exec(_)));
        send(s, &Message::Started { pid: 7, stdin_window: 0 });
        send(s, &Message::Stdout { data: b"partial".to_vec() });
    });
    client.hello().expect("hello");
    {
        let mut session = client.exec_streaming(&ExecRequest::new(["yes"])).expect("started");
        assert_eq!(session.pid(), 7);
        assert_eq!(session.next_event().expect("event"), Some(ExecEvent::Stdout(b"partial".to_vec())));
        assert!(session.send_stdin(b"x").is_err(), "stdin was not requested");
        assert!(session.signal(0).is_err(), "signal 0 is rejected locally");
    }
    assert!(matches!(client.ping(), Err(ClientError::Desynchronized)));
    agent.join().expect("agent thread");
}

#[test]
fn read_file_joins_chunks_and_enforces_the_cap() {
    let (mut client, agent) = with_fake_agent(|s| {
        agent_hello(s);
        assert_eq!(recv(s), Message::ReadFile { path: "/a".into(), max_len: 10 });
        for chunk in [&b"ab"[..], b"cd"] {
            send(s, &Message::FileData { data: chunk.to_vec() });
        }
        send(s, &Message::FileEnd);
        // A misbehaving agent sending more than asked for.
        assert!(matches!(recv(s), Message::ReadFile { max_len: 4, .. }));
        send(s, &Message::FileData { data: b"123456".to_vec() });
    });
    client.hello().expect("hello");
    assert_eq!(client.read_file_limited("/a", 10).expect("read"), b"abcd");
    let err = client.read_file_limited("/b", 4).expect_err("too large");
    assert_eq!(err.agent_kind(), Some(ErrorKind::TooLarge));
    agent.join().expect("agent thread");
}

#[test]
fn a_refreshed_connection_sends_hello_clock_and_entropy_before_any_answer() {
    let (host, mut agent) = UnixStream::pair().expect("socketpair");
    let fake = thread::spawn(move || {
        // All three requests arrive before the agent has answered anything.
        agent.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
        assert_eq!(recv(&mut agent), Message::Hello { version: PROTOCOL_VERSION });
        let Message::SetTime { unix_nanos } = recv(&mut agent) else { panic!("SetTime expected") };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos() as u64;
        assert!(now.abs_diff(unix_nanos) < 60_000_000_000, "host time sent: {unix_nanos} vs {now}");
        assert_eq!(recv(&mut agent), Message::AddEntropy { bytes: vec![9; 64] });
        send(&mut agent, &Message::Hello { version: PROTOCOL_VERSION });
        send(&mut agent, &Message::Ok);
        send(&mut agent, &Message::Ok);
        assert_eq!(recv(&mut agent), Message::Ping);
        send(&mut agent, &Message::Pong);
    });
    let mut client = AgentClient::connect_refreshed(host, Some(&[9; 64])).expect("refreshed");
    assert!(client.is_in_sync());
    client.ping().expect("the connection serves requests after");
    fake.join().expect("fake agent");

    // A refused clock is the agent's error, kind kept.
    let (host, mut agent) = UnixStream::pair().expect("socketpair");
    let fake = thread::spawn(move || {
        let _ = recv(&mut agent);
        let _ = recv(&mut agent);
        send(&mut agent, &Message::Hello { version: PROTOCOL_VERSION });
        send(&mut agent, &Message::error(ErrorKind::PermissionDenied, "settimeofday: EPERM"));
    });
    let err = AgentClient::connect_refreshed(host, None).err().expect("refused");
    assert_eq!(err.agent_kind(), Some(ErrorKind::PermissionDenied));
    fake.join().expect("fake agent");
}
