//! The async facade (`sm_api::nonblocking`) on real guests: two VMs restored
//! concurrently inside a tokio runtime, concurrent execs, files, a guest
//! port published through the agent, a pool.

use std::sync::Arc;
use std::time::Instant;

use sm_api::nonblocking::{AsyncPool, AsyncVm};
use sm_api::ConsoleOutput;
use sm_api::Hypervisor;
use sm_api::{ExecRequest, ExitStatus, PoolConfig};
use sm_tests::{agent_snapshot, hypervisor};

fn echo(word: &str) -> ExecRequest {
    ExecRequest::new(["/bin/echo", word])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_concurrently_then_a_pool() {
    const TEST: &str = "async api";
    // The first call boots the agent guest (~30 s): not on an async worker.
    let Some(snap) = tokio::task::spawn_blocking(|| agent_snapshot(TEST)).await.unwrap() else { return };
    let Some(hv) = hypervisor(TEST) else { return };
    let hv: Arc<dyn Hypervisor> = Arc::from(hv);

    let t0 = Instant::now();
    let (a, b) = tokio::join!(
        AsyncVm::restore(hv.clone(), snap, ConsoleOutput::Null, &[]),
        AsyncVm::restore(hv.clone(), snap, ConsoleOutput::Null, &[]),
    );
    let (a, b) = (a.expect("restore a"), b.expect("restore b"));
    eprintln!("two concurrent restores in {:?}", t0.elapsed());

    let t0 = Instant::now();
    let (out_a, out_b) = tokio::join!(a.exec(echo("hi"), None), b.exec(echo("hi"), None));
    let (out_a, out_b) = (out_a.expect("exec in a"), out_b.expect("exec in b"));
    eprintln!("two concurrent execs in {:?}", t0.elapsed());
    for out in [&out_a, &out_b] {
        assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
        assert_eq!(out.stdout, b"hi\n", "{out:?}");
    }

    // Files, and isolation between the two VMs.
    a.write_file("/tmp/async-marker", 0o644, b"written in a".to_vec()).await.unwrap();
    assert_eq!(a.read_file("/tmp/async-marker").await.unwrap(), b"written in a");
    assert!(b.read_file("/tmp/async-marker").await.is_err(), "b must not see a's file");
    // stdin through an async exec.
    let out = b.exec(ExecRequest::new(["/bin/cat"]), Some(b"through stdin".to_vec())).await.unwrap();
    assert_eq!(out.stdout, b"through stdin");

    // A guest TCP port through the agent, published on the host (no network device).
    let mkdir = a.exec(ExecRequest::new(["/bin/busybox", "mkdir", "-p", "/tmp/www"]), None).await.unwrap();
    assert_eq!(mkdir.status, ExitStatus::Code(0));
    a.write_file("/tmp/www/index.html", 0o644, b"async page\n".to_vec()).await.unwrap();
    let httpd = ExecRequest::new(["/bin/busybox", "httpd", "-p", "127.0.0.1:7000", "-h", "/tmp/www"]);
    assert_eq!(a.exec(httpd, None).await.unwrap().status, ExitStatus::Code(0));
    let forward = a.forward_port(sm_api::PublishedPort::parse("0:7000").unwrap()).await.unwrap();
    let addr = (forward.port().host_ip, forward.port().host_port);
    let page = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let got = std::net::TcpStream::connect(addr).and_then(|mut c| {
                c.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
                c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                let mut page = String::new();
                c.read_to_string(&mut page)?;
                Ok(page)
            });
            match got {
                Ok(page) if page.contains(" 200 ") => break page,
                other if Instant::now() > deadline => panic!("published port: {other:?}"),
                _ => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
    })
    .await
    .unwrap();
    assert!(page.ends_with("async page\n"), "{page}");
    assert!(b.connect_tcp(7000).await.is_err(), "b has no server on 7000");
    drop(forward);

    let (stop_a, stop_b) = tokio::join!(a.stop(), b.stop());
    eprintln!("stopped: {:?}, {:?}", stop_a.unwrap(), stop_b.unwrap());

    // A pool: acquire, use, release (reset in place), acquire the same VM again clean.
    let mut config = PoolConfig::new(snap.clone());
    config.min_idle = 1;
    config.max = 1;
    let pool = AsyncPool::new(hv, config).await.expect("pool");
    let vm = pool.acquire().await.expect("acquire");
    let out = vm.exec(echo("pooled"), None).await.unwrap();
    assert_eq!(out.stdout, b"pooled\n", "{out:?}");
    vm.write_file("/tmp/dirty", 0o644, b"x".to_vec()).await.unwrap();
    vm.release().await.unwrap();
    // The pool resets and refreshes the released VM in the background; with
    // max 1 the next acquire waits for it.
    let vm = pool.acquire().await.expect("second acquire");
    assert!(vm.read_file("/tmp/dirty").await.is_err(), "a released VM comes back clean");
    vm.release().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while pool.stats().resets < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let s = pool.stats();
    assert_eq!((s.hits, s.misses, s.resets, s.alive), (2, 0, 2, 1), "{s:?}");
    eprintln!("pool stats: {s:?}, mean acquire {:?}", s.acquire_mean());
}
