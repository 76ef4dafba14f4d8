//! Bad frames against the real agent: each is rejected cleanly (an `Error`
//! reply or a closed connection) and the agent keeps serving.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use common::Agent;
use sm_agent::protocol::{
    encode_frame, read_message, write_message, ExecRequest, Message, MessageType, ProtocolError, MAX_FRAME,
    PROTOCOL_VERSION,
};
use sm_agent::ErrorKind;

/// A raw connection after a correct handshake.
fn handshaken(agent: &Agent) -> UnixStream {
    let mut s = agent.raw();
    write_message(&mut s, &Message::Hello { version: PROTOCOL_VERSION }).expect("send hello");
    assert_eq!(read_message(&mut s).expect("agent hello"), Message::Hello { version: PROTOCOL_VERSION });
    s
}

fn expect_error(s: &mut UnixStream, kind: ErrorKind) -> String {
    match read_message(s).expect("a reply") {
        Message::Error { kind: k, message } => {
            assert_eq!(k, kind, "{message}");
            message
        }
        other => panic!("expected Error({kind}), got {other:?}"),
    }
}

fn expect_closed(s: &mut UnixStream) {
    match read_message(s) {
        Err(ProtocolError::Closed) => {}
        Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the agent to close, got {other:?}"),
    }
}

fn ping(s: &mut UnixStream) {
    write_message(s, &Message::Ping).expect("send ping");
    assert_eq!(read_message(s).expect("pong"), Message::Pong);
}

/// The agent is alive and serving new connections.
fn assert_agent_serves(agent: &mut Agent) {
    assert!(agent.is_alive(), "agent process died");
    agent.client().ping().expect("a fresh connection works");
}

#[test]
fn unknown_types_and_malformed_payloads_get_an_error_and_the_connection_goes_on() {
    let mut agent = Agent::start();
    let mut s = handshaken(&agent);
    // Unknown type with a payload.
    s.write_all(&[3, 0, 0, 0, 0xee, 1, 2, 3]).expect("write");
    let text = expect_error(&mut s, ErrorKind::InvalidRequest);
    assert!(text.contains("unknown message type 0xee"), "{text}");
    ping(&mut s);
    // A Signal with 2 of its 4 bytes.
    s.write_all(&[2, 0, 0, 0, MessageType::Signal as u8, 9, 0]).expect("write");
    let text = expect_error(&mut s, ErrorKind::InvalidRequest);
    assert!(text.contains("malformed Signal"), "{text}");
    // A Ping with trailing bytes.
    s.write_all(&[1, 0, 0, 0, MessageType::Ping as u8, 0]).expect("write");
    expect_error(&mut s, ErrorKind::InvalidRequest);
    // An Exec whose argv count exceeds the payload.
    s.write_all(&[4, 0, 0, 0, MessageType::Exec as u8, 0xff, 0xff, 0xff, 0xff]).expect("write");
    expect_error(&mut s, ErrorKind::InvalidRequest);
    // Messages that only the agent sends, and stray file data.
    write_message(&mut s, &Message::Pong).expect("write");
    expect_error(&mut s, ErrorKind::InvalidRequest);
    write_message(&mut s, &Message::FileEnd).expect("write");
    expect_error(&mut s, ErrorKind::InvalidRequest);
    ping(&mut s);
    assert_agent_serves(&mut agent);
}

#[test]
fn an_oversized_frame_is_refused_and_the_connection_closed() {
    let mut agent = Agent::start();
    let mut s = handshaken(&agent);
    let mut header = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    header.push(MessageType::Stdin as u8);
    s.write_all(&header).expect("write");
    let text = expect_error(&mut s, ErrorKind::InvalidRequest);
    assert!(text.contains("exceeds"), "{text}");
    expect_closed(&mut s);

    let mut huge = agent.raw();
    huge.write_all(&[0xff, 0xff, 0xff, 0xff, MessageType::Hello as u8]).expect("write");
    assert!(matches!(read_message(&mut huge).expect("agent hello"), Message::Hello { .. }));
    expect_error(&mut huge, ErrorKind::InvalidRequest);
    expect_closed(&mut huge);
    assert_agent_serves(&mut agent);
}

#[test]
fn a_truncated_frame_closes_the_connection_quietly() {
    let mut agent = Agent::start();
    for cut in [2, 5, 9] {
        let mut s = handshaken(&agent);
        let frame = encode_frame(&Message::Exec(ExecRequest::new(["true"]))).expect("encode");
        s.write_all(&frame[..cut]).expect("write");
        s.shutdown(Shutdown::Write).expect("half close");
        expect_closed(&mut s);
    }
    assert_agent_serves(&mut agent);
}

#[test]
fn handshake_failures_are_reported() {
    let mut agent = Agent::start();
    // Wrong version.
    let mut s = agent.raw();
    write_message(&mut s, &Message::Hello { version: 999 }).expect("write");
    assert!(matches!(read_message(&mut s).expect("hello"), Message::Hello { .. }));
    let text = expect_error(&mut s, ErrorKind::VersionMismatch);
    assert!(text.contains("999"), "{text}");
    expect_closed(&mut s);
    // A request before Hello.
    let mut s = agent.raw();
    write_message(&mut s, &Message::Ping).expect("write");
    assert!(matches!(read_message(&mut s).expect("hello"), Message::Hello { .. }));
    expect_error(&mut s, ErrorKind::InvalidRequest);
    expect_closed(&mut s);
    // Garbage before Hello.
    let mut s = agent.raw();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    assert!(matches!(read_message(&mut s).expect("hello"), Message::Hello { .. }));
    expect_error(&mut s, ErrorKind::InvalidRequest);
    expect_closed(&mut s);
    // A connection that closes at once.
    drop(agent.raw());
    assert_agent_serves(&mut agent);
}

#[test]
fn requests_during_an_exec_are_refused_as_busy() {
    let mut agent = Agent::start();
    let mut s = handshaken(&agent);
    let req = ExecRequest::new(["sh", "-c", "read line; echo got $line"]);
    let req = ExecRequest { stdin: true, ..req };
    write_message(&mut s, &Message::Exec(req)).expect("exec");
    assert!(matches!(read_message(&mut s).expect("started"), Message::Started { .. }));
    write_message(&mut s, &Message::Ping).expect("ping");
    expect_error(&mut s, ErrorKind::Busy);
    write_message(&mut s, &Message::Stdin { data: b"x\n".to_vec() }).expect("stdin");
    write_message(&mut s, &Message::StdinClose).expect("close");
    let mut stdout = Vec::new();
    loop {
        match read_message(&mut s).expect("event") {
            Message::Stdout { data } => stdout.extend(data),
            Message::StdinAck { bytes } => assert_eq!(bytes, 2),
            Message::Exited(r) => {
                assert!(r.status.success());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stdout, b"got x\n");
    // Stale control messages after the exit are ignored.
    write_message(&mut s, &Message::Signal { signo: 9 }).expect("late signal");
    ping(&mut s);
    assert_agent_serves(&mut agent);
}

#[test]
fn closing_the_connection_kills_the_running_exec() {
    let agent = Agent::start();
    let mut s = handshaken(&agent);
    let req = ExecRequest::new(["sleep", "60"]);
    write_message(&mut s, &Message::Exec(req)).expect("exec");
    let pid = match read_message(&mut s).expect("started") {
        Message::Started { pid, .. } => pid,
        other => panic!("{other:?}"),
    };
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(s);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(std::time::Instant::now() < deadline, "pid {pid} survived its connection");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
