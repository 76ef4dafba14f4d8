//! Guest networking end to end: a real guest on KVM with virtio-net to a real
//! passt (Debian's `passt`), fetching from an HTTP server this test runs on the
//! host's loopback, through the gateway and by the name
//! `host.supermachine.internal`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use sm_api::{ExecRequest, ExitStatus, Network, PasstNetwork, Vm, VmConfig};
use sm_tests::{agent_image, hypervisor, sha256_hex, tools};

/// Serves `body` to every GET on 127.0.0.1:<free port>, counting requests.
fn http_server(body: Vec<u8>) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            // The request line and headers, up to the blank line.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(&body));
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (port, served)
}

#[test]
fn the_guest_fetches_from_the_host_through_passt_by_address_and_by_name() {
    let test = "network";
    let Some(hv) = hypervisor(test) else { return };
    let Some(image) = agent_image(test) else { return };
    if !tools(test, &[("/usr/bin/passt", "passt")]) {
        return;
    }
    let body = sm_tests::random_bytes(300 << 10);
    let (port, served) = http_server(body.clone());
    let mut config = VmConfig::new(image);
    config.network = Network::Passt(PasstNetwork { host_loopback: true });
    let mut vm = Vm::boot(&*hv, config).expect("boot with a network");

    let exec = |argv: &[&str]| {
        // Bounded: a stuck transfer fails the test instead of hanging it.
        let request = ExecRequest::new(argv.iter().copied()).timeout(Duration::from_secs(120));
        let out = vm.exec(&request, None).unwrap();
        assert_eq!(
            out.status,
            ExitStatus::Code(0),
            "{argv:?}: stdout {}\nstderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    // The agent set the network up before any command: address, resolver, hosts.
    assert_eq!(exec(&["/bin/cat", "/etc/resolv.conf"]), b"nameserver 10.0.2.3\n");
    let hosts = String::from_utf8(exec(&["/bin/cat", "/etc/hosts"])).unwrap();
    assert!(hosts.contains("10.0.2.2 host.supermachine.internal"), "{hosts}");

    // 300 KiB through the gateway, then by name: exact bytes both times.
    for host in ["10.0.2.2", "host.supermachine.internal"] {
        let url = format!("http://{host}:{port}/data");
        // No `-T`: Debian's busybox 1.35 wget segfaults with it, network or not.
        let got = exec(&["/bin/busybox", "wget", "-q", "-O", "-", &url]);
        assert_eq!(got.len(), body.len(), "{url}");
        assert_eq!(sha256_hex(&got), sha256_hex(&body), "{url}: bytes differ");
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Not snapshottable yet: said plainly.
    let e = vm.snapshot(&std::env::temp_dir().join("sm-network-snapshot")).unwrap_err();
    assert!(matches!(e, sm_api::Error::Unsupported(_)), "{e}");
}
