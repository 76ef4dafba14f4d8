use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use super::connection::CONN_BUF_ALLOC;
use super::muxer::{connect_timeout, Muxer};
use super::packet::*;

const GUEST: u64 = 3;

fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("sm-vsock-{name}-")).tempdir().unwrap()
}

fn muxer(dir: &TempDir) -> (Muxer, PathBuf) {
    let path = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (Muxer::new(GUEST, path.clone(), listener).unwrap(), path)
}

fn from_guest(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Default::default()
    }
}

/// Accepts the client and runs its handshake through the muxer; returns the
/// REQUEST the guest would receive.
fn accept_and_request(m: &mut Muxer) -> Header {
    accept_and_handshake(m);
    m.next_control_packet().expect("REQUEST queued")
}

/// Accepts the client and runs its handshake through the muxer.
fn accept_and_handshake(m: &mut Muxer) {
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids = m.accept_clients();
        if !ids.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut key = None;
    for _ in 0..100 {
        key = m.progress_handshake(ids[0]);
        if key.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    key.expect("handshake completes");
}

#[test]
fn host_connect_handshake_and_data_both_ways() {
    let dir = temp_dir("host");
    let (mut m, path) = muxer(&dir);
    let client = std::thread::spawn(move || {
        let mut s = super::connect(&path, 1024).unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"world").unwrap();
        got
    });
    let req = accept_and_request(&mut m);
    assert_eq!((req.op, req.dst_port, req.dst_cid, req.src_cid), (OP_REQUEST, 1024, GUEST, HOST_CID));
    assert!(req.src_port >= 1 << 30);
    let local = req.src_port;
    m.handle_guest_packet(&from_guest(1024, local, OP_RESPONSE), &[]);
    let mut rw = from_guest(1024, local, OP_RW);
    rw.len = 5;
    m.handle_guest_packet(&rw, b"hello");
    assert_eq!(&client.join().unwrap(), b"hello");
    // The client's "world" reaches the guest as one RW packet.
    m.conns.get_mut(&(local, 1024)).unwrap().maybe_readable = true;
    let mut buf = [0u8; 4096];
    let mut pkt = None;
    for _ in 0..100 {
        pkt = m.next_data_packet(&mut buf);
        if pkt.is_some() {
            break;
        }
        m.conns.get_mut(&(local, 1024)).unwrap().maybe_readable = true;
        std::thread::sleep(Duration::from_millis(5));
    }
    let pkt = pkt.expect("data for the guest");
    assert_eq!((pkt.op, pkt.len, pkt.src_port, pkt.dst_port), (OP_RW, 5, local, 1024));
    assert_eq!(&buf[..5], b"world");
    assert_eq!(pkt.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(pkt.fwd_cnt, 5, "we forwarded the guest's 5 bytes");
}

#[test]
fn refused_guest_port_closes_the_client_without_ok() {
    let dir = temp_dir("refused");
    let (mut m, path) = muxer(&dir);
    let client = std::thread::spawn(move || super::connect(&path, 9999));
    let req = accept_and_request(&mut m);
    m.handle_guest_packet(&from_guest(9999, req.src_port, OP_RST), &[]);
    let err = client.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn guest_connect_reaches_a_host_port_socket_or_is_reset() {
    let dir = temp_dir("guestconn");
    let (mut m, path) = muxer(&dir);
    let port_listener = UnixListener::bind(format!("{}_7000", path.display())).unwrap();
    assert!(m.handle_guest_packet(&from_guest(5555, 7000, OP_REQUEST), &[]).is_some());
    let resp = m.next_control_packet().unwrap();
    assert_eq!((resp.op, resp.src_port, resp.dst_port), (OP_RESPONSE, 7000, 5555));
    let (mut accepted, _) = port_listener.accept().unwrap();
    let mut rw = from_guest(5555, 7000, OP_RW);
    rw.len = 3;
    m.handle_guest_packet(&rw, b"abc");
    let mut got = [0u8; 3];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"abc");
    // Nobody listens on port 7001: RST.
    assert!(m.handle_guest_packet(&from_guest(5556, 7001, OP_REQUEST), &[]).is_none());
    assert_eq!(m.next_control_packet().unwrap().op, OP_RST);
}

#[test]
fn data_to_the_guest_respects_its_credit() {
    let dir = temp_dir("credit");
    let (mut m, path) = muxer(&dir);
    let _port = UnixListener::bind(format!("{}_80", path.display())).unwrap();
    let mut req = from_guest(4000, 80, OP_REQUEST);
    req.buf_alloc = 4;
    m.handle_guest_packet(&req, &[]);
    m.next_control_packet();
    let (mut host_side, _) = _port.accept().unwrap();
    host_side.write_all(b"0123456789").unwrap();
    let conn = m.conns.get_mut(&(80, 4000)).unwrap();
    conn.maybe_readable = true;
    let mut buf = [0u8; 4096];
    let first = m.next_data_packet(&mut buf).unwrap();
    assert_eq!(first.len, 4, "only 4 bytes of credit");
    assert!(m.next_data_packet(&mut buf).is_none(), "credit exhausted");
    // The guest consumed them: 4 more.
    let mut upd = from_guest(4000, 80, OP_CREDIT_UPDATE);
    upd.buf_alloc = 4;
    upd.fwd_cnt = 4;
    m.handle_guest_packet(&upd, &[]);
    m.conns.get_mut(&(80, 4000)).unwrap().maybe_readable = true;
    assert_eq!(m.next_data_packet(&mut buf).unwrap().len, 4);
    assert_eq!(&buf[..4], b"4567");
}

#[test]
fn guest_overrunning_its_credit_is_reset_and_host_eof_becomes_shutdown() {
    let dir = temp_dir("overrun");
    let (mut m, path) = muxer(&dir);
    let port = UnixListener::bind(format!("{}_81", path.display())).unwrap();
    m.handle_guest_packet(&from_guest(4001, 81, OP_REQUEST), &[]);
    m.next_control_packet();
    let (host_side, _) = port.accept().unwrap();
    // The host never reads: the socket buffer fills, then our 256 KiB, then RST.
    let chunk = vec![7u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..256 {
        let mut rw = from_guest(4001, 81, OP_RW);
        rw.len = chunk.len() as u32;
        m.handle_guest_packet(&rw, &chunk);
        if m.connection_count() == 0 {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring credit must be reset");
    let mut saw_rst = false;
    while let Some(h) = m.next_control_packet() {
        saw_rst |= h.op == OP_RST;
    }
    assert!(saw_rst);
    drop(host_side);

    // Host EOF -> SHUTDOWN to the guest; its RST completes the close.
    let port2 = UnixListener::bind(format!("{}_82", path.display())).unwrap();
    m.handle_guest_packet(&from_guest(4002, 82, OP_REQUEST), &[]);
    m.next_control_packet();
    let (host2, _) = port2.accept().unwrap();
    drop(host2);
    m.conns.get_mut(&(82, 4002)).unwrap().maybe_readable = true;
    let mut buf = [0u8; 64];
    assert!(m.next_data_packet(&mut buf).is_none());
    let shut = m.next_control_packet().unwrap();
    assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
    m.handle_guest_packet(&from_guest(4002, 82, OP_RST), &[]);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn foreign_addresses_are_dropped_and_unknown_connections_reset() {
    let dir = temp_dir("foreign");
    let (mut m, _) = muxer(&dir);
    let mut h = from_guest(1, 2, OP_RW);
    h.src_cid = 42;
    m.handle_guest_packet(&h, b"x");
    assert!(m.next_control_packet().is_none());
    m.handle_guest_packet(&from_guest(1, 2, OP_RW), b"x");
    assert_eq!(m.next_control_packet().unwrap().op, OP_RST);
    // RST for an unknown connection is not answered (no RST ping-pong).
    m.handle_guest_packet(&from_guest(1, 2, OP_RST), &[]);
    assert!(m.next_control_packet().is_none());
    // A bad handshake line drops the client.
}

#[test]
fn bad_handshakes_drop_the_client() {
    let dir = temp_dir("badhs");
    let (mut m, path) = muxer(&dir);
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"HELLO 5\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let ids = m.accept_clients();
    assert!(m.progress_handshake(ids[0]).is_none());
    assert!(m.handshakes.is_empty());
    let mut c2 = UnixStream::connect(&path).unwrap();
    c2.write_all(&[b'A'; 100]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let ids = m.accept_clients();
    assert!(m.progress_handshake(ids[0]).is_none());
    assert!(m.handshakes.is_empty(), "an endless line is cut off");
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap(), 0, "dropped client sees EOF");
}

#[test]
fn device_refuses_a_path_that_is_not_a_stale_socket() {
    let dir = temp_dir("dev");
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let err = super::Vsock::new(GUEST, &file).err().unwrap().to_string();
    assert!(err.contains("not a socket"), "{err}");
    let sock = dir.path().join("vm.sock");
    let live = super::Vsock::new(GUEST, &sock).unwrap();
    let err = super::Vsock::new(GUEST, &sock).err().unwrap().to_string();
    assert!(err.contains("listening"), "{err}");
    drop(live);
    assert!(!sock.exists(), "the device removes its socket");
}

#[test]
fn a_guest_that_never_answers_a_connect_times_out_naming_the_port() {
    let dir = temp_dir("silent");
    let path = dir.path().join("vm.sock");
    // A VMM socket whose guest never answers: accepted, then silence.
    let listener = UnixListener::bind(&path).unwrap();
    let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let started = std::time::Instant::now();
    let err = connect_timeout(&path, 52, Duration::from_millis(200)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(err.to_string().contains("vsock port 52"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(held.join());
}

#[test]
fn guest_connections_are_capped_and_the_one_past_the_cap_is_reset() {
    let dir = temp_dir("cap");
    let (mut m, path) = muxer(&dir);
    let limit = 16;
    m.set_connection_limit(limit);
    let port = UnixListener::bind(format!("{}_90", path.display())).unwrap();
    let mut accepted = Vec::new();
    for i in 0..limit as u32 {
        m.handle_guest_packet(&from_guest(10_000 + i, 90, OP_REQUEST), &[]);
        assert_eq!(m.next_control_packet().map(|h| h.op), Some(OP_RESPONSE), "connection {i}");
        accepted.push(port.accept().unwrap().0);
    }
    m.handle_guest_packet(&from_guest(9_999, 90, OP_REQUEST), &[]);
    let refused = m.next_control_packet().unwrap();
    assert_eq!((refused.op, refused.dst_port), (OP_RST, 9_999));
    assert_eq!(m.connection_count(), limit);

    // Connections host clients open do not count against the guest's cap.
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let request = accept_and_request(&mut m);
    assert_eq!(request.op, OP_REQUEST);
    assert_eq!(m.connection_count(), limit + 1);
}

#[test]
fn replies_to_a_guest_that_does_not_receive_are_bounded_but_host_requests_are_not_dropped() {
    let dir = temp_dir("replies");
    let (mut m, path) = muxer(&dir);
    m.set_control_limit(4);
    for i in 0..100 {
        m.handle_guest_packet(&from_guest(6000 + i, 7000, OP_RW), &[]);
    }
    assert_eq!(m.replies_dropped(), 96);
    // A host client's connect still reaches the guest.
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    accept_and_handshake(&mut m);
    let mut ops = Vec::new();
    while let Some(h) = m.next_control_packet() {
        ops.push(h.op);
    }
    assert_eq!(ops, [OP_RST, OP_RST, OP_RST, OP_RST, OP_REQUEST]);
}
