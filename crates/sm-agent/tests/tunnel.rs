//! `Connect`: a connection to a TCP port on the agent's loopback, against the
//! real agent binary (the "guest" here is this host).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::time::Duration;

use common::{pattern, Agent};
use sm_agent::ErrorKind;

#[test]
fn a_tunnel_carries_bytes_both_ways_early_ones_included_and_closes_with_the_server() {
    let agent = Agent::start();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let upload = pattern(3 << 20, 7);
    let expected = upload.clone();
    let guest = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        // Sent at once: it can sit behind the agent's Ok in the client's buffer.
        conn.write_all(b"BANNER\n").unwrap();
        let mut got = vec![0u8; expected.len()];
        conn.read_exact(&mut got).unwrap();
        assert!(got == expected, "the upload arrived altered");
        conn.write_all(&pattern(2 << 20, 9)).unwrap();
        // Closing here must reach the host as end of file.
    });
    let mut tunnel = agent.client().connect_tcp(port).expect("connect");
    let mut banner = [0u8; 7];
    tunnel.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"BANNER\n");
    tunnel.write_all(&upload).unwrap();
    let mut download = Vec::new();
    let (_, stream) = {
        let mut t = tunnel;
        t.read_to_end(&mut download).unwrap();
        t.into_parts()
    };
    assert!(download == pattern(2 << 20, 9), "the download arrived altered ({} bytes)", download.len());
    guest.join().unwrap();
    let _ = stream.shutdown(Shutdown::Both);

    // The agent serves new connections after a tunnel.
    agent.client().ping().expect("ping after a tunnel");
}

#[test]
fn a_port_nobody_listens_on_is_not_found_and_the_connection_stays_usable() {
    let agent = Agent::start();
    let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut client = agent.client();
    client.get_ref().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    client.ping().unwrap();
    let err = agent.client().connect_tcp(free).err().expect("refused");
    assert_eq!(err.agent_kind(), Some(ErrorKind::NotFound), "{err}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{free}")), "{err}");
    client.ping().expect("other connections unaffected");
}
