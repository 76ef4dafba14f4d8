//! Guest networking end to end: a real guest on KVM with virtio-net to a real
//! passt (Debian's `passt`), under the egress policy enforced in the VMM:
//! fetching from HTTP servers this test runs on the host's loopback (through
//! the gateway and by the name `host.supermachine.internal`), refused
//! destinations failing at once, a name allowed by the addresses a real DNS
//! answer gave (a resolver this test runs on the host's loopback; the VMM
//! relays the guest's DNS to it), and
//! a guest server reached through a published port.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use sm_api::{
    ConsoleOutput, EgressPolicy, ExecRequest, ExitStatus, Network, PasstNetwork, Pool, PoolConfig, PublishedPort, Vm,
    VmConfig,
};
use sm_tests::{agent_image, http_server, hypervisor, sha256_hex, tools};

/// A resolver on the host's loopback answering `allowed.test` and
/// `other.test` with the gateway's address (A), nothing for AAAA, NXDOMAIN
/// for other names.
fn dns_server() -> SocketAddrV4 {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, sock.local_addr().unwrap().port());
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let Ok(query) = simple_dns::Packet::parse(&buf[..n]) else { continue };
            let mut reply = query.into_reply();
            let mut known = false;
            for q in reply.questions.clone() {
                let name = q.qname.to_string();
                if name == "allowed.test" || name == "other.test" {
                    known = true;
                    if q.qtype == simple_dns::QTYPE::TYPE(simple_dns::TYPE::A) {
                        let a = simple_dns::rdata::A { address: u32::from(Ipv4Addr::new(10, 0, 2, 2)) };
                        reply.answers.push(simple_dns::ResourceRecord::new(
                            q.qname.clone(),
                            simple_dns::CLASS::IN,
                            5,
                            simple_dns::rdata::RData::A(a),
                        ));
                    }
                }
            }
            if !known {
                *reply.rcode_mut() = simple_dns::RCODE::NameError;
            }
            if let Ok(bytes) = reply.build_bytes_vec() {
                let _ = sock.send_to(&bytes, peer);
            }
        }
    });
    addr
}

fn run(vm: &Vm, argv: &[&str]) -> sm_api::ExecOutcome {
    // Bounded: a stuck transfer fails the test instead of hanging it.
    let request = ExecRequest::new(argv.iter().copied()).timeout(Duration::from_secs(120));
    vm.exec(&request, None).unwrap()
}

fn exec(vm: &Vm, argv: &[&str]) -> Vec<u8> {
    let out = run(vm, argv);
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "{argv:?}: stdout {}\nstderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn denied(vm: &Vm) -> u64 {
    vm.egress_stats().unwrap().denied.load(std::sync::atomic::Ordering::Relaxed)
}

/// Refused: the command fails, and fast (a reset or ICMP error, not a
/// timeout), and the filter counts it.
fn refused(vm: &Vm, url: &str) {
    let denied_before = denied(vm);
    let t0 = Instant::now();
    let out = run(vm, &["/bin/busybox", "wget", "-q", "-O", "-", url]);
    assert_ne!(out.status, ExitStatus::Code(0), "{url} must be refused");
    assert!(t0.elapsed() < Duration::from_secs(20), "{url}: refused only after {:?}", t0.elapsed());
    assert!(denied(vm) > denied_before, "{url}: the filter counted no denial");
    eprintln!("{url}: refused in {:?}: {}", t0.elapsed(), String::from_utf8_lossy(&out.stderr).trim());
}

#[test]
fn the_guest_reaches_what_the_policy_allows_and_is_refused_at_once_elsewhere() {
    let test = "network";
    let Some(hv) = hypervisor(test) else { return };
    let Some(image) = agent_image(test) else { return };
    if !tools(test, &[("/usr/bin/passt", "passt")]) {
        return;
    }
    let body = sm_tests::random_bytes(300 << 10);
    let (port, served) = http_server(body.clone());
    let (by_name_port, by_name_served) = http_server(b"by name\n".to_vec());
    let dns = dns_server();
    let mut config = VmConfig::new(image);
    let policy = EgressPolicy::parse(&[
        format!("allow=host.supermachine.internal:{port}"),
        format!("allow=allowed.test:{by_name_port}"),
    ])
    .unwrap();
    config.network = Network::Passt(PasstNetwork {
        egress: policy,
        publish: vec![PublishedPort::parse("0:8000").unwrap()],
        dns: Some(dns),
        ..Default::default()
    });
    let mut vm = Vm::boot(&*hv, config).expect("boot with a network");
    let published = vm.published_ports().to_vec();
    assert_eq!(published.len(), 1);
    assert_ne!(published[0].host_port, 0, "port 0 is resolved to the one in use");

    // The agent set the network up before any command: address, resolver, hosts.
    assert_eq!(exec(&vm, &["/bin/cat", "/etc/resolv.conf"]), b"nameserver 10.0.2.3\n");
    let hosts = String::from_utf8(exec(&vm, &["/bin/cat", "/etc/hosts"])).unwrap();
    assert!(hosts.contains("10.0.2.2 host.supermachine.internal"), "{hosts}");

    // 300 KiB from the allowed port, by address and by name: exact bytes.
    // (No `-T`: Debian's busybox 1.35 wget segfaults with it.)
    for host in ["10.0.2.2", "host.supermachine.internal"] {
        let url = format!("http://{host}:{port}/data");
        let got = exec(&vm, &["/bin/busybox", "wget", "-q", "-O", "-", &url]);
        assert_eq!(got.len(), body.len(), "{url}");
        assert_eq!(sha256_hex(&got), sha256_hex(&body), "{url}: bytes differ");
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);
    // The host's other ports and the cloud metadata address are not reachable.
    refused(&vm, &format!("http://10.0.2.2:{by_name_port}/"));
    refused(&vm, "http://169.254.169.254/latest/meta-data/");

    {
        // A name the policy does not list teaches nothing, even with the same address...
        exec(&vm, &["/bin/busybox", "nslookup", "other.test"]);
        refused(&vm, &format!("http://10.0.2.2:{by_name_port}/"));
        // ...the listed one allows the address it resolved to, on the rule's port.
        let got =
            exec(&vm, &["/bin/busybox", "wget", "-q", "-O", "-", &format!("http://allowed.test:{by_name_port}/")]);
        assert_eq!(got, b"by name\n");
        assert_eq!(by_name_served.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(vm.egress_stats().unwrap().learned.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    }

    // A server in the guest, reached from the host through the published port.
    exec(&vm, &["/bin/sh", "-c", "mkdir -p /tmp/www && echo served from the guest > /tmp/www/index.html"]);
    exec(&vm, &["/bin/busybox", "httpd", "-p", "8000", "-h", "/tmp/www"]);
    let host_addr = (published[0].host_ip, published[0].host_port);
    let fetch_page = || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = TcpStream::connect(host_addr).and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(30)))?;
                c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                let mut page = String::new();
                c.read_to_string(&mut page)?;
                Ok(page)
            });
            match attempt {
                Ok(page) if page.contains("200") => break page,
                other if Instant::now() > deadline => panic!("published port {}: {other:?}", published[0]),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    };
    let page = fetch_page();
    assert!(page.ends_with("served from the guest\n"), "{page}");
    // A live snapshot (as a bake takes) leaves the network working.
    let dir = sm_tests::temp_dir("netsnap");
    vm.snapshot_live(&dir.path().join("live.snap")).unwrap();
    let page = fetch_page();
    assert!(page.ends_with("served from the guest\n"), "after a live snapshot: {page}");
    exec(&vm, &["/bin/busybox", "wget", "-q", "-O", "/dev/null", &format!("http://10.0.2.2:{port}/data")]);

    // A snapshot with the network, restored with a new back end under another
    // policy: what was allowed is refused now and the other way round.
    let snap = dir.path().join("net.snap");
    vm.snapshot(&snap).unwrap();
    vm.stop();
    let policy = EgressPolicy::parse(&[format!("allow=host.supermachine.internal:{by_name_port}")]).unwrap();
    let network = Network::Passt(PasstNetwork { egress: policy, ..Default::default() });
    let restored = Vm::restore_with_network(&*hv, &snap, ConsoleOutput::Null, &[], &network).unwrap();
    let got = exec(&restored, &["/bin/busybox", "wget", "-q", "-O", "-", &format!("http://10.0.2.2:{by_name_port}/")]);
    assert_eq!(got, b"by name\n");
    refused(&restored, &format!("http://host.supermachine.internal:{port}/data"));
    restored.stop();
    // A pool of networked VMs: each acquire gets a VM with a back end of its own.
    let mut pool_config = PoolConfig::new(snap.clone());
    pool_config.min_idle = 0;
    pool_config.max = 1;
    pool_config.network = network.clone();
    let pool = Pool::new(sm_api::default_hypervisor().unwrap(), pool_config).unwrap();
    let pooled = pool.acquire().unwrap();
    let got = exec(&pooled, &["/bin/busybox", "wget", "-q", "-O", "-", &format!("http://10.0.2.2:{by_name_port}/")]);
    assert_eq!(got, b"by name\n");
    drop(pooled);
    // Without its network device the snapshot does not restore: said plainly.
    let e = Vm::restore(&*hv, &snap, ConsoleOutput::Null, &[]).err().unwrap().to_string();
    assert!(e.contains("virtio devices"), "{e}");
}
