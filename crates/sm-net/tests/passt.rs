//! The passt back end against the real passt (Debian's `passt`): the test
//! plays the guest, writing Ethernet frames into the stream as the virtio-net
//! device would. Needs /usr/bin/passt (`apt-get install passt`; `cargo xtask
//! test` installs it); under CI=true a missing passt fails the test.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use sm_net::addressing::{GATEWAY, GUEST_IP, GUEST_MAC};
use sm_net::{NetError, Passt, PasstOptions};
use sm_virtio::net::{NetBackend, MAX_FRAME};

fn passt_or_skip(test: &str) -> Option<PasstOptions> {
    let options = PasstOptions::default();
    if options.program.is_file() {
        return Some(options);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("SM_REQUIRE_KVM").is_ok_and(|v| v == "1");
    assert!(!ci, "{test}: {} is missing: apt-get install passt", options.program.display());
    eprintln!("SKIPPED {test}: {} is missing", options.program.display());
    None
}

/// Waits up to `timeout` for `fd` to be readable.
fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) > 0 }
}

/// Frames from the back end until `want` accepts one or 10 s pass.
fn receive_until(backend: &mut impl NetBackend, what: &str, mut want: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        while let Some(n) = backend.recv(&mut buf).expect("receiving from passt") {
            if want(&buf[..n]) {
                return buf[..n].to_vec();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} from passt within 10 s");
        wait_readable(backend.ready_fd(), left.min(Duration::from_millis(200)));
    }
}

fn ethernet(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    ethernet([0xff; 6], 0x0806, &arp)
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP datagram from the guest (UDP checksum 0: none).
fn udp(dst_mac: [u8; 6], dst: Ipv4Addr, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&GUEST_IP.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&src_port.to_be_bytes());
    ip.extend_from_slice(&dst_port.to_be_bytes());
    ip.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(payload);
    ethernet(dst_mac, 0x0800, &ip)
}

#[test]
fn the_guest_resolves_the_gateway_and_reaches_a_host_loopback_udp_socket_and_back() {
    let Some(mut options) = passt_or_skip("passt udp") else { return };
    options.map_host_loopback = true;
    let (mut passt, mut stream) = Passt::spawn(&options).expect("starting passt");

    // ARP for the gateway: passt answers with its MAC.
    stream.send(&arp_request(GATEWAY)).unwrap();
    let reply = receive_until(&mut stream, "ARP reply", |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == GATEWAY.octets()
    });
    let gateway_mac: [u8; 6] = reply[22..28].try_into().unwrap();
    assert_eq!(&reply[38..42], &GUEST_IP.octets(), "the reply is for the guest");

    // UDP to the gateway reaches the host's loopback; the host's answer comes back.
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let port = host.local_addr().unwrap().port();
    stream.send(&udp(gateway_mac, GATEWAY, 40000, port, b"hello from the guest")).unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = host.recv_from(&mut buf).expect("the datagram reached host loopback");
    assert_eq!(&buf[..n], b"hello from the guest");
    host.send_to(b"hello from the host", from).unwrap();
    let back = receive_until(&mut stream, "UDP answer", |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 && f[36..38] == 40000u16.to_be_bytes()
    });
    assert_eq!(&back[0..6], &GUEST_MAC, "to the guest's MAC");
    assert_eq!(&back[30..34], &GUEST_IP.octets());
    assert_eq!(&back[42..], b"hello from the host");
    assert!(passt.exited().is_none(), "passt still runs: {}", passt.stderr_tail());
}

#[test]
fn passt_exits_when_its_vmm_end_closes_and_is_reaped_when_dropped() {
    let Some(options) = passt_or_skip("passt lifetime") else { return };
    // Our end closing (a VMM killed with -9 closes it too): passt exits by itself.
    let (mut passt, stream) = Passt::spawn(&options).expect("starting passt");
    drop(stream);
    let t = Instant::now();
    while passt.exited().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "passt outlived its socket: {}", passt.stderr_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Dropping the handle of a running passt kills and reaps it.
    let (passt, _stream) = Passt::spawn(&options).expect("starting passt");
    let pid = passt.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(passt);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "passt {pid} left behind");
}

#[test]
fn a_missing_passt_names_the_package() {
    let options = PasstOptions { program: "/nonexistent/passt".into(), ..PasstOptions::default() };
    let e = Passt::spawn(&options).err().expect("refused");
    assert!(matches!(e, NetError::PasstMissing { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("apt-get install passt") && msg.contains("/nonexistent/passt"), "{msg}");
}
