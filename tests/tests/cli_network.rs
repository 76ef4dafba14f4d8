//! `supermachine run` with a network: the built-in default image fetches from
//! an HTTP server on the host's loopback as `host.supermachine.internal` when
//! `--egress` allows it, is refused elsewhere, and a second run restores the
//! baked snapshot (made with the network device) under another policy. A
//! detached VM serves through a published port (`ps` and `port` show it), from
//! a snapshot baked with the server started by `--warmup`, in plain TCP and
//! in TLS terminated on the host (`/tls`, checked by curl against the printed
//! self-signed certificate); killing it leaves no passt behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use sm_tests::{cli, http_server, temp_dir, RUN_TIMEOUT};

/// Beyond what every CLI VM test needs: the built-in image's busybox, and passt.
const NEEDS: &[(&str, &str)] =
    &[("/bin/busybox", "busybox-static"), ("/usr/bin/passt", "passt"), ("/usr/bin/curl", "curl")];

#[test]
fn run_with_egress_rules_cold_then_restored() {
    let test = "cli network";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, NEEDS) else { return };
    let tmp = temp_dir("clinet");
    let home = tmp.path().join("home");
    let (a, _) = http_server(b"from a\n".to_vec());
    let (b, _) = http_server(b"from b\n".to_vec());
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

/// The pids of the passt processes whose parent is `parent`.
fn passt_children(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...", comm "passt" or "passt.avx2" (Debian picks a build)
            let Some((comm, rest)) = stat.split_once(") ") else { return false };
            comm.contains(" (passt") && rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) == Some(parent)
        })
        .collect()
}

/// A detached run serving /index.html on guest port 8000, published on a
/// host port picked for it and, with TLS, on another; returns the VM id.
fn serve_detached(bin: &Path, home: &Path) -> String {
    let warmup = "mkdir -p /www && echo served from a restore > /www/index.html && httpd -p 8000 -h /www";
    let args = [
        "run",
        "-d",
        "-p",
        "0:8000",
        "-p",
        "0:8000/tls",
        "--warmup",
        warmup,
        "--wait-port",
        "8000",
        "builtin:default",
        "sleep",
        "600",
    ];
    let o = cli(bin, home, &args, None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    o.stdout.trim().to_string()
}

/// Waits until `port ID` names the host port, then fetches the page through it.
fn fetch_published(bin: &Path, home: &Path, id: &str) -> (String, String) {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let o = cli(bin, home, &["port", id], None, RUN_TIMEOUT);
        if let Some(line) = o.stdout.lines().next().filter(|_| o.code == Some(0)) {
            let host = line.split("->").next().unwrap().to_string();
            let mut conn = TcpStream::connect(&host).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
            let mut page = String::new();
            conn.read_to_string(&mut page).unwrap();
            return (line.to_string(), page);
        }
        assert!(Instant::now() < deadline, "VM {id} never published its port: {}", o.stderr);
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Fetches the page through the VM's `/tls` port with curl, trusting only
/// the self-signed certificate kept in `home`; `None` when curl fails.
fn fetch_tls(bin: &Path, home: &Path, id: &str, trust: bool) -> Option<String> {
    let o = cli(bin, home, &["port", id], None, RUN_TIMEOUT);
    let line = o
        .stdout
        .lines()
        .find(|l| l.ends_with("->8000/tls"))
        .unwrap_or_else(|| panic!("no /tls port: {} {}", o.stdout, o.stderr));
    let host = line.split("->").next().unwrap();
    let ca = home.join("tls").join("self-signed.crt");
    let mut curl = std::process::Command::new("/usr/bin/curl");
    curl.args(["-sS", "--max-time", "60", "--noproxy", "*"]);
    if trust {
        curl.arg("--cacert").arg(&ca);
    }
    let out = curl.arg(format!("https://{host}/index.html")).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_detached_vm_serves_through_a_published_port_from_a_baked_server() {
    let test = "cli network ports";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, NEEDS) else { return };
    let tmp = temp_dir("cliports");
    let home = tmp.path().join("home");
    // First: cold boot, warm-up starts httpd, bake; second: restored with httpd running.
    for round in ["baked", "restored"] {
        let id = serve_detached(&bin, &home);
        let (line, page) = fetch_published(&bin, &home, &id);
        assert!(line.starts_with("127.0.0.1:") && line.ends_with("->8000/tcp"), "{round}: {line}");
        assert!(page.starts_with("HTTP/1.") && page.ends_with("served from a restore\n"), "{round}: {page}");
        // The same server through TLS, with the certificate the run printed.
        let log = std::fs::read_to_string(home.join("vms").join(&id).join("log")).unwrap();
        assert!(log.contains("TLS certificate") && log.contains("SHA-256"), "{round}: {log}");
        let tls_page = fetch_tls(&bin, &home, &id, true);
        assert_eq!(tls_page.as_deref(), Some("served from a restore\n"), "{round}: {log}");
        assert_eq!(fetch_tls(&bin, &home, &id, false), None, "{round}: curl must not trust it by default");
        let ps = cli(&bin, &home, &["ps"], None, RUN_TIMEOUT).stdout;
        assert!(ps.lines().any(|l| l.starts_with(&id) && l.contains(&line)), "{round}: ps shows the port:\n{ps}");
        // The supervisor's passt goes with it, even on SIGKILL.
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(home.join("vms").join(&id).join("state.json")).unwrap())
                .unwrap();
        let supervisor = state["pid"].as_i64().unwrap() as i32;
        let passts = passt_children(supervisor);
        assert_eq!(passts.len(), 1, "{round}: one passt per VM");
        let o = cli(&bin, &home, &["kill", &id], None, RUN_TIMEOUT);
        assert_eq!(o.code, Some(0), "{round}: {}", o.stderr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", passts[0])).exists() {
            let zombie = std::fs::read_to_string(format!("/proc/{}/stat", passts[0]))
                .is_ok_and(|s| s.split_once(") ").is_some_and(|(_, r)| r.starts_with('Z')));
            if zombie {
                break;
            }
            assert!(Instant::now() < deadline, "{round}: passt {} outlived its VM", passts[0]);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
