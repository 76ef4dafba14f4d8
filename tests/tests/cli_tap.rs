//! `supermachine run --network tap:NAME`: the guest on a TAP interface the
//! test prepares (as root) in a network namespace of its own, with
//! 10.0.2.2/24 on the host side, a busybox httpd and a dnsmasq there. The
//! guest resolves `tap.test` through the VMM's DNS relay (its ARP for the
//! resolver answered by the filter, as nobody on a TAP would) and fetches
//! 200 KiB from it by that name when `--egress allow=tap.test:8080` (SHA-256
//! exact); a port the policy does not allow is refused at once; the second
//! run restores the baked snapshot onto the TAP. A missing interface fails
//! naming what to do.

use std::process::{Child, Command, Stdio};

use sm_tests::{cli_in_netns, sha256_hex, skip_or_fail, temp_dir, RUN_TIMEOUT};

const NEEDS: &[(&str, &str)] =
    &[("/bin/busybox", "busybox-static"), ("/usr/sbin/ip", "iproute2"), ("/usr/sbin/dnsmasq", "dnsmasq-base")];
const TAP: &str = "smtap0";

fn ip(args: &[&str]) {
    let out = Command::new("/usr/sbin/ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace with a TAP interface at 10.0.2.2/24; deleted (TAP
/// and all) on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("smtap-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        for args in [
            &["link", "set", "lo", "up"][..],
            &["tuntap", "add", "dev", TAP, "mode", "tap"],
            &["addr", "add", "10.0.2.2/24", "dev", TAP],
            &["link", "set", TAP, "up"],
        ] {
            let mut full = vec!["netns", "exec", &ns.0, "/usr/sbin/ip"];
            full.extend_from_slice(args);
            ip(&full);
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/ip").args(["netns", "del", &self.0]).status();
    }
}

/// A server inside the namespace; killed on drop.
struct Server(Child);

impl Server {
    fn start(ns: &Netns, argv: &[&str]) -> Server {
        let child = Command::new("/usr/sbin/ip")
            .args(["netns", "exec", &ns.0])
            .args(argv)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next()) == Some("0")
}

#[test]
fn a_guest_on_a_tap_reaches_what_the_policy_allows_cold_and_restored() {
    let test = "cli tap";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, NEEDS) else { return };
    if !is_root() {
        return skip_or_fail(test, "making a network namespace and a TAP interface needs root".into()).unwrap_or(());
    }
    let tmp = temp_dir("clitap");
    let home = tmp.path().join("home");
    let www = tmp.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let body = sm_tests::random_bytes(200 << 10);
    std::fs::write(www.join("data"), &body).unwrap();
    let ns = Netns::new();
    let _httpd =
        Server::start(&ns, &["/bin/busybox", "httpd", "-f", "-p", "10.0.2.2:8080", "-h", www.to_str().unwrap()]);
    let dnsmasq = [
        "/usr/sbin/dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--pid-file",
        "--user=root",
        "--listen-address=10.0.2.2",
        "--bind-interfaces",
        "--address=/tap.test/10.0.2.2",
    ];
    let _dns = Server::start(&ns, &dnsmasq);

    // A TAP that does not exist: refused before any boot, saying what to do.
    let o = cli_in_netns(
        &ns.0,
        &bin,
        &home,
        &["run", "--network", "tap:nosuch0", "builtin:default", "true"],
        None,
        RUN_TIMEOUT,
    );
    assert_eq!(o.code, Some(125), "{}", o.stderr);
    assert!(o.stderr.contains("nosuch0") && o.stderr.contains("ip tuntap add nosuch0 mode tap"), "{}", o.stderr);

    // busybox wget without -T (see network.rs); the second fetch is not allowed.
    let script = "wget -q -O - http://tap.test:8080/data | sha256sum; \
                  wget -q -O - http://10.0.2.2:8081/ 2>/dev/null || echo refused";
    let want = format!("{}  -\nrefused\n", sha256_hex(&body));
    let tap = format!("tap:{TAP}");
    let args = [
        "run",
        "--timings",
        "--network",
        &tap,
        "--egress",
        "allow=tap.test:8080",
        "--dns",
        "10.0.2.2",
        "builtin:default",
        "sh",
        "-c",
        script,
    ];
    for round in ["snapshot baked", "restored"] {
        let o = cli_in_netns(&ns.0, &bin, &home, &args, None, RUN_TIMEOUT);
        assert_eq!(o.code, Some(0), "{round}: stderr:\n{}", o.stderr);
        assert_eq!(o.stdout, want, "{round}: stderr:\n{}", o.stderr);
        assert!(o.stderr.contains(round), "{}", o.stderr);
    }
}
