//! `supermachine run` with a network: the built-in default image fetches from
//! an HTTP server on the host's loopback as `host.supermachine.internal` when
//! `--egress` allows it, is refused elsewhere, and a second run restores the
//! baked snapshot (made with the network device) under another policy.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use sm_tests::{cli, tools, TempDir, RUN_TIMEOUT};

/// Answers every request on 127.0.0.1:<free port> with `body`.
fn http_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(body.as_bytes()));
        }
    });
    port
}

#[test]
fn run_with_egress_rules_cold_then_restored() {
    let test = "cli network";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, &[("/bin/busybox", "busybox-static")]) else { return };
    if !tools(test, &[("/usr/bin/passt", "passt")]) {
        return;
    }
    let tmp = TempDir::new("clinet");
    let home = tmp.0.join("home");
    let a = http_server("from a\n");
    let b = http_server("from b\n");
    // Each fetch prints the body or "refused"; busybox wget without -T (see network.rs).
    let script = format!(
        "for p in {a} {b}; do wget -q -O - http://host.supermachine.internal:$p/ 2>/dev/null || echo refused $p; done"
    );
    let allow = |port: u16| format!("allow=host.supermachine.internal:{port}");

    let args = ["run", "--timings", "--egress", &allow(a), "builtin:default", "sh", "-c", &script];
    let o = cli(&bin, &home, &args, None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert_eq!(o.stdout, format!("from a\nrefused {b}\n"), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("snapshot baked"), "{}", o.stderr);

    // Restored from that snapshot, with the other port allowed.
    let o = cli(
        &bin,
        &home,
        &["run", "--timings", "--egress", &allow(b), "builtin:default", "sh", "-c", &script],
        None,
        RUN_TIMEOUT,
    );
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert_eq!(o.stdout, format!("refused {a}\nfrom b\n"), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("restored"), "{}", o.stderr);
}
