//! oci-layout, oci-archive and docker-archive sources give the same tree and
//! root disk as a registry pull.

mod common;

use std::sync::Arc;

use common::layout::{self, check_whiteout_tree, ImageSpec, Layout};
use common::{runtime, sha256_file, skopeo, tree_digest, Registry, TempDir};
use sm_oci::{ImageSource, NoProgress, PullOptions, RootfsFormat, Store};

fn fetch(store: &Store, source: &str) -> sm_oci::Result<sm_oci::ImageRecord> {
    let src = ImageSource::parse(source)?;
    runtime().block_on(sm_oci::fetch(store, &src, &PullOptions::default(), Arc::new(NoProgress)))
}

/// Unpack into a fresh dir and build the default root disk; (tree digest, disk digest).
fn tree_and_disk(store: &Store, name: &str, dir: &std::path::Path) -> (String, String) {
    let info = store.image_info(name).unwrap();
    sm_oci::unpack_image(store, &info, dir).unwrap();
    let fs = sm_oci::build_rootfs(store, &info, RootfsFormat::default()).unwrap();
    (tree_digest(dir), sha256_file(&fs.path))
}

#[test]
fn local_sources_match_registry_pull() {
    let reg = Registry::start();
    let tmp = TempDir::new("sources");
    let lay = tmp.join("layout");
    let l = Layout::create(&lay);
    let mut layers = vec![layout::busybox_layer()];
    layers.extend(layout::whiteout_layers());
    let d = l.image(&ImageSpec::new(layers));
    l.tag(&d, "v1");
    reg.push(&lay, "v1", "src/img:v1", false);

    let oci_tar = tmp.join("img-oci.tar");
    skopeo(&[
        "--insecure-policy".into(),
        "copy".into(),
        "-q".into(),
        format!("oci:{}:v1", lay.display()),
        format!("oci-archive:{}:v1", oci_tar.display()),
    ]);
    let docker_tar = tmp.join("img-docker.tar");
    skopeo(&[
        "--insecure-policy".into(),
        "copy".into(),
        "-q".into(),
        format!("oci:{}:v1", lay.display()),
        format!("docker-archive:{}:src/img:v1", docker_tar.display()),
    ]);

    let store = Store::open(tmp.join("store")).unwrap();
    let reg_name = format!("{}/src/img:v1", reg.host());
    let rec = fetch(&store, &reg_name).unwrap();
    assert_eq!(rec.name, reg_name);
    let (tree, disk) = tree_and_disk(&store, &reg_name, &tmp.join("t-registry"));
    check_whiteout_tree(&tmp.join("t-registry"));

    let sources = [
        format!("oci-layout:{}:v1", lay.display()),
        format!("oci-layout:{}", lay.display()),
        format!("oci-archive:{}:v1", oci_tar.display()),
        format!("docker-archive:{}", docker_tar.display()),
        format!("docker-archive:{}:src/img:v1", docker_tar.display()),
    ];
    for (i, s) in sources.iter().enumerate() {
        let rec = fetch(&store, s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(rec.name, ImageSource::parse(s).unwrap().store_name());
        if s.starts_with("oci") {
            assert_eq!(rec.manifest.as_str(), d.digest, "{s}");
        } else {
            // docker archives carry uncompressed layers: another manifest, same content.
            assert_ne!(rec.manifest.as_str(), d.digest, "{s}");
        }
        let (t, k) = tree_and_disk(&store, &rec.name, &tmp.join(format!("t-{i}")));
        assert_eq!(t, tree, "unpacked tree of {s} differs from the registry pull");
        assert_eq!(k, disk, "root disk of {s} differs from the registry pull");
    }

    // Everything recorded; removing images and pruning frees blobs.
    assert_eq!(store.images().unwrap().len(), 1 + 5);
    for r in store.images().unwrap() {
        assert!(store.remove_image(&r.name).unwrap());
    }
    let pr = store.prune().unwrap();
    assert!(pr.blobs_removed > 0 && pr.rootfs_removed >= 2, "{pr:?}");
    assert_eq!(std::fs::read_dir(store.root().join("blobs/sha256")).unwrap().count(), 0);
}

#[test]
fn layout_errors_are_clear() {
    let tmp = TempDir::new("layout-errors");
    let lay = tmp.join("layout");
    let l = Layout::create(&lay);
    let a = l.image(&ImageSpec::new(vec![vec![layout::file("a", b"a")]]));
    let b = l.image(&ImageSpec::new(vec![vec![layout::file("b", b"b")]]));
    l.tag(&a, "a");
    l.tag(&b, "b");
    let store = Store::open(tmp.join("store")).unwrap();
    let e = fetch(&store, &format!("oci-layout:{}", lay.display())).unwrap_err().to_string();
    assert!(e.contains("several images") && e.contains("a, b"), "{e}");
    let e = fetch(&store, &format!("oci-layout:{}:c", lay.display())).unwrap_err().to_string();
    assert!(e.contains("tag \"c\""), "{e}");
    fetch(&store, &format!("oci-layout:{}:b", lay.display())).unwrap();

    // A tampered blob in the layout is refused.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lay.join("blobs/sha256").join(&a.digest[7..])).unwrap()).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let p = lay.join("blobs/sha256").join(&layer[7..]);
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let e = fetch(&store, &format!("oci-layout:{}:a", lay.display())).unwrap_err();
    assert!(e.is_integrity(), "{e}");
    assert!(fetch(&store, "oci-archive:/nonexistent.tar").is_err());
}
