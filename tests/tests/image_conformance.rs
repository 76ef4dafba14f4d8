//! Real-world image layers end to end: images built with the real tools here,
//! pushed to a real local registry and run with `supermachine run`, checked
//! from inside the guest.
//!
//! - The entry kinds real layers carry, written by **umoci** (unpack of a
//!   busybox image, a tree of odd kinds made with coreutils and `setcap`,
//!   repack): character and block devices, a fifo, setuid/setgid/sticky modes,
//!   foreign owners, old mtimes, absolute/relative/dangling symlinks, hard
//!   links, a PAX long name, a large sparse file and a file capability — then a
//!   **hand-made** tar layer added with `umoci raw add-layer`: absolute and
//!   `./` names, a GNU long name, a PAX `path` record, a hard link to a lower
//!   layer's file, a whiteout and an opaque directory.
//! - The same image converted by **skopeo** to a docker-archive and pushed from
//!   there must look the same inside the guest.
//! - A **Debian root built with umoci** (one layer holding `/` and device
//!   nodes, as umoci writes it) runs `cat /etc/debian_version`.
//!
//! Needs `cargo build -p sm-cli`, root (device nodes, owners, capabilities),
//! umoci, skopeo, docker-registry, setcap; the Debian case also debootstrap
//! (its image is cached under `target/test-images/`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sm_tests::{cli, sha256_hex, temp_dir, Registry, RUN_TIMEOUT};

const UMOCI: (&str, &str) = ("/usr/bin/umoci", "umoci");
const SETCAP: (&str, &str) = ("/usr/sbin/setcap", "libcap2-bin");

fn run_tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX) == 0
}

/// Pushes `src` (any skopeo transport) to the registry as `name`.
fn push(registry: &Registry, src: &str, name: &str) -> String {
    let dest = format!("127.0.0.1:{}/{name}", registry.port);
    run_tool(
        "/usr/bin/skopeo",
        &["--insecure-policy", "copy", "-q", "--dest-tls-verify=false", src, &format!("docker://{dest}")],
    );
    dest
}

fn p(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// 150 characters: more than a ustar name holds.
fn long_component(c: char) -> String {
    std::iter::repeat_n(c, 150).collect()
}

/// The odd kinds, made on the host the way an image build makes them.
const ODD_TREE: &str = r#"set -eu
cd "$1"
mkdir -p odd/dev odd/cap odd/opaque
mknod -m 0666 odd/dev/null c 1 3
mknod -m 0660 odd/dev/loop7 b 7 7
mkfifo -m 0640 odd/fifo
printf suid > odd/suid && chmod 4755 odd/suid
printf sgid > odd/sgid && chmod 2711 odd/sgid
mkdir odd/sticky && chmod 1777 odd/sticky
printf owned > odd/owned && chown 1234:5678 odd/owned && chmod 0640 odd/owned
printf old > odd/old && touch -h -d @1000000000 odd/old
printf secret > odd/secret && chmod 0600 odd/secret
ln -s /odd/owned odd/abs-link
ln -s owned odd/rel-link
ln -s /nowhere/at/all odd/dangling
printf hard > odd/hard1 && ln odd/hard1 odd/hard2
printf long > "odd/$2"
truncate -s 20M odd/large && printf end >> odd/large
printf lower > odd/opaque/lower
cp bin/busybox odd/cap/cat
setcap cap_dac_read_search+ep odd/cap/cat
"#;

/// The hand-made top layer: names and kinds the tools above do not write.
fn hand_made_layer(gnu_long: &str, pax_long: &str) -> Vec<u8> {
    fn file(b: &mut tar::Builder<Vec<u8>>, header: &mut tar::Header, name: &[u8], data: &[u8]) {
        header.set_size(data.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        // Written raw: set_path would normalize the names under test.
        let raw = &mut header.as_old_mut().name;
        raw.fill(0);
        raw[..name.len()].copy_from_slice(name);
        header.set_cksum();
        b.append(header, data).unwrap();
    }
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, &mut tar::Header::new_ustar(), b"/abs/file", b"abs");
    file(&mut b, &mut tar::Header::new_ustar(), b"./dot/file", b"dot");
    // GNU long name: the tar crate writes a `././@LongLink` entry first.
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, format!("odd/{gnu_long}"), &b"gnu"[..]).unwrap();
    // A PAX `path` record overriding a short ustar name.
    let path = format!("odd/{pax_long}");
    b.append_pax_extensions([("path", path.as_bytes())]).unwrap();
    file(&mut b, &mut tar::Header::new_ustar(), b"odd/short", b"pax");
    // A hard link to a file of the layer below.
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_link_name("odd/hard1").unwrap();
    h.set_path("odd/hard3").unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    // A whiteout, and an opaque directory with new content.
    file(&mut b, &mut tar::Header::new_ustar(), b"odd/.wh.old", b"");
    file(&mut b, &mut tar::Header::new_ustar(), b"odd/opaque/.wh..wh..opq", b"");
    file(&mut b, &mut tar::Header::new_ustar(), b"odd/opaque/new", b"new");
    b.into_inner().unwrap()
}

/// The checks run in the guest, one line each, and the lines they must print.
fn guest_checks(long_names: &[(&str, &str)], large_sha: &str) -> (String, String) {
    let mut script = String::from("cd /odd\n");
    let mut expect = String::new();
    let mut check = |cmd: String, want: String| {
        script.push_str(&cmd);
        script.push('\n');
        expect.push_str(&want);
        expect.push('\n');
    };
    let stat = |path: &str, fmt: &str| format!("stat -c '{fmt}' {path}");
    check(stat("dev/null", "%F %t:%T %a"), "character special file 1:3 666".into());
    check(stat("dev/loop7", "%F %t:%T %a"), "block special file 7:7 660".into());
    check(stat("fifo", "%F %a"), "fifo 640".into());
    check(stat("suid", "%a"), "4755".into());
    check(stat("sgid", "%a"), "2711".into());
    check(stat("sticky", "%F %a"), "directory 1777".into());
    check(stat("owned", "%u:%g %a"), "1234:5678 640".into());
    check(
        "for l in abs-link rel-link dangling; do readlink $l; done | tr '\\n' ' '; echo".into(),
        "/odd/owned owned /nowhere/at/all ".into(),
    );
    check("cat abs-link; echo; cat rel-link; echo".into(), "owned\nowned".into());
    check("test -e dangling || echo dangling-dangles".into(), "dangling-dangles".into());
    check(
        "[ $(stat -c %i hard1) = $(stat -c %i hard2) ] && [ $(stat -c %i hard1) = $(stat -c %i hard3) ] && stat -c %h hard1"
            .into(),
        "3".into(),
    );
    for (name, content) in long_names {
        check(format!("cat {name}; echo"), content.to_string());
    }
    check("cat /abs/file /dot/file; echo".into(), "absdot".into());
    check(stat("large", "%s"), (20 * 1024 * 1024 + 3).to_string());
    check("sha256sum large | cut -d' ' -f1".into(), large_sha.to_string());
    check("test -e old || echo old-whited-out".into(), "old-whited-out".into());
    check("ls opaque | tr '\\n' ' '; echo".into(), "new ".into());
    (script, expect)
}

#[test]
fn odd_entry_kinds_from_umoci_and_a_hand_made_layer_arrive_in_the_guest() {
    let test = "image conformance";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, &[UMOCI, SETCAP, ("/bin/busybox", "busybox-static")]) else {
        return;
    };
    if !is_root() {
        sm_tests::skip_or_fail::<()>(test, "device nodes, owners and capabilities need root".into());
        return;
    }
    let tmp = temp_dir("conformance");
    let layout = tmp.path().join("layout");
    sm_tests::busybox_layout(&layout);

    // Layer 2, by umoci, from a tree made with the host's tools.
    let bundle = tmp.path().join("bundle");
    run_tool(UMOCI.0, &["unpack", "--image", &format!("{}:latest", p(&layout)), p(&bundle)]);
    let (pax_umoci, gnu_hand, pax_hand) = (long_component('u'), long_component('g'), long_component('p'));
    let rootfs = bundle.join("rootfs");
    run_tool("/bin/sh", &["-c", ODD_TREE, "odd-tree", p(&rootfs), &pax_umoci]);
    let large_sha = sha256_hex(&std::fs::read(rootfs.join("odd/large")).unwrap());
    run_tool(UMOCI.0, &["repack", "--image", &format!("{}:odd", p(&layout)), p(&bundle)]);

    // Layer 3, by hand.
    let layer = tmp.path().join("layer3.tar");
    std::fs::write(&layer, hand_made_layer(&gnu_hand, &pax_hand)).unwrap();
    run_tool(UMOCI.0, &["raw", "add-layer", "--image", &format!("{}:odd", p(&layout)), "--tag", "final", p(&layer)]);

    let registry = Registry::start();
    let oci_image = push(&registry, &format!("oci:{}:final", p(&layout)), "conformance/odd:oci");
    let archive = tmp.path().join("odd-docker.tar");
    run_tool(
        "/usr/bin/skopeo",
        &[
            "--insecure-policy",
            "copy",
            "-q",
            &format!("oci:{}:final", p(&layout)),
            &format!("docker-archive:{}:conformance/odd:docker", p(&archive)),
        ],
    );
    let docker_image = push(&registry, &format!("docker-archive:{}", p(&archive)), "conformance/odd:docker");

    let long_names = [(pax_umoci.as_str(), "long"), (gnu_hand.as_str(), "gnu"), (pax_hand.as_str(), "pax")];
    let (script, expect) = guest_checks(&long_names, &large_sha);
    let home = tmp.path().join("home");
    for (image, extra) in [(&oci_image, None), (&docker_image, Some("--no-snapshot"))] {
        let mut args = vec!["run"];
        args.extend(extra);
        args.extend([image.as_str(), "sh", "-c", script.as_str()]);
        let o = cli(&bin, &home, &args, None, RUN_TIMEOUT);
        assert_eq!(o.code, Some(0), "{image}: stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
        assert_eq!(o.stdout, expect, "{image}: stderr:\n{}", o.stderr);
    }

    // The capability works: an unprivileged user reads a root-only file with
    // the cat that carries cap_dac_read_search, and not with the plain one.
    let args = [
        "run",
        "--user",
        "1000:1000",
        &oci_image,
        "sh",
        "-c",
        "cat /odd/secret; echo \" rc=$?\"; /odd/cap/cat /odd/secret",
    ];
    let o = cli(&bin, &home, &args, None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert_eq!(o.stdout, " rc=1\nsecret", "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("Permission denied"), "{}", o.stderr);
}

#[test]
fn a_debian_root_built_with_umoci_runs() {
    let test = "umoci debian";
    let Some(bin) = sm_tests::cli_vm_prerequisites(test, &[UMOCI]) else { return };
    if !is_root() {
        sm_tests::skip_or_fail::<()>(test, "device nodes and owners need root".into());
        return;
    }
    let Some(debian) = sm_tests::debian_python_layout(test) else { return };
    let tmp = temp_dir("umoci-debian");
    let layout = tmp.path().join("layout");
    let bundle = tmp.path().join("bundle");
    let image = format!("{}:bookworm", p(&layout));
    run_tool(UMOCI.0, &["init", "--layout", p(&layout)]);
    run_tool(UMOCI.0, &["new", "--image", &image]);
    run_tool(UMOCI.0, &["unpack", "--image", &image, p(&bundle)]);
    // The Debian tree, with the device nodes debootstrap makes, repacked by
    // umoci as one layer (which names the root `/`).
    let rootfs = bundle.join("rootfs");
    let layer = debian_layer(&debian);
    run_tool("/bin/tar", &["-xzf", p(&layer), "-C", p(&rootfs)]);
    run_tool(
        "/bin/sh",
        &[
            "-c",
            "cd \"$1\" && mkdir -p dev && mknod -m 666 dev/null c 1 3 && mknod -m 666 dev/zero c 1 5",
            "-",
            p(&rootfs),
        ],
    );
    let version = std::fs::read_to_string(rootfs.join("etc/debian_version")).unwrap();
    run_tool(UMOCI.0, &["repack", "--image", &image, p(&bundle)]);
    let path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    run_tool(UMOCI.0, &["config", "--image", &image, "--config.env", path, "--config.cmd", "sh"]);

    let registry = Registry::start();
    let pushed = push(&registry, &format!("oci:{image}"), "umoci/debian:bookworm");
    let home = tmp.path().join("home");
    let o = cli(&bin, &home, &["run", "--no-snapshot", &pushed, "cat", "/etc/debian_version"], None, RUN_TIMEOUT);
    assert_eq!(o.code, Some(0), "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert_eq!(o.stdout, version, "stderr:\n{}", o.stderr);
}

/// The one layer blob of the cached Debian test layout.
fn debian_layer(layout: &Path) -> PathBuf {
    let blob = |digest: &str| layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(manifest)).unwrap()).unwrap();
    blob(manifest["layers"][0]["digest"].as_str().unwrap())
}
