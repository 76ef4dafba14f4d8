//! What a registry or an image archive hands over: manifests and indexes,
//! image configs, names and digests, and layer tarballs.

use std::io::Cursor;

use sm_oci::image::{check_manifest, parse_manifest_or_index, Parsed};
use sm_oci::source::ImageSource;
use sm_oci::unpack::Unpacker;
use sm_oci::{Digest, ImageConfig, Reference, RunOverrides};

use crate::Target;

pub fn manifest() -> Target {
    Target {
        name: "oci-manifest",
        what: "sm-oci: parse_manifest_or_index + check_manifest on arbitrary JSON",
        run: run_manifest,
        seeds: manifest_seeds,
        max_len: 1024,
        cost: 1,
    }
}

pub fn config() -> Target {
    Target {
        name: "oci-config",
        what: "sm-oci: ImageConfig::from_json + resolve (entrypoint, env, user, workdir)",
        run: run_config,
        seeds: config_seeds,
        max_len: 1024,
        cost: 1,
    }
}

pub fn names() -> Target {
    Target {
        name: "oci-names",
        what: "sm-oci: Reference, Digest and ImageSource parsing",
        run: run_names,
        seeds: name_seeds,
        max_len: 300,
        cost: 1,
    }
}

pub fn layer() -> Target {
    Target {
        name: "oci-layer",
        what: "sm-oci: Unpacker::apply_layer on an arbitrary (tar, gzip or zstd) blob into a temp dir",
        run: run_layer,
        seeds: layer_seeds,
        max_len: 4096,
        cost: 40,
    }
}

fn run_manifest(data: &[u8]) {
    if let Ok(Parsed::Manifest(m)) = parse_manifest_or_index(data, "fuzz") {
        let _ = check_manifest(&m, "fuzz");
    }
}

fn manifest_seeds() -> Vec<Vec<u8>> {
    let digest = format!("sha256:{}", "ab".repeat(32));
    vec![
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{digest}","size":7}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":9}}]}}"#
        )
        .into_bytes(),
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
            "manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":5,
            "platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        )
        .into_bytes(),
    ]
}

fn run_config(data: &[u8]) {
    if let Ok(config) = ImageConfig::from_json(data) {
        let _ = config.resolve(&RunOverrides::default());
    }
}

fn config_seeds() -> Vec<Vec<u8>> {
    vec![br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","A=b"],"Entrypoint":["/bin/sh","-c"],
        "Cmd":["echo hi"],"WorkingDir":"/work","User":"1000:1000"},"rootfs":{"type":"layers","diff_ids":[]}}"#
        .to_vec()]
}

fn run_names(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(r) = Reference::parse(&text) {
        let _ = r.to_string();
    }
    let _ = Digest::parse(&text);
    let _ = ImageSource::parse(&text);
}

fn name_seeds() -> Vec<Vec<u8>> {
    [
        "docker.io/library/busybox:latest",
        "localhost:5000/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "[::1]:5000/x:y",
        "oci-layout:/tmp/layout:tag",
        "docker-archive:/tmp/x.tar",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn run_layer(data: &[u8]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let Ok(mut unpacker) = Unpacker::new(&dir.path().join("root")) else { return };
    if unpacker.apply_layer(Cursor::new(data), "fuzz layer", None, None).is_ok() {
        let _ = unpacker.finish();
    }
}

fn layer_seeds() -> Vec<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        if let Some(l) = link {
            h.set_link_name(l).expect("link name");
        }
        builder.append_data(&mut h, path, data).expect("append");
    };
    add("dir/", tar::EntryType::Directory, b"", None);
    add("dir/file", tar::EntryType::Regular, b"contents\n", None);
    add("dir/link", tar::EntryType::Symlink, b"", Some("file"));
    add("dir/hard", tar::EntryType::Link, b"", Some("dir/file"));
    add("dir/.wh.gone", tar::EntryType::Regular, b"", None);
    add("other/.wh..wh..opq", tar::EntryType::Regular, b"", None);
    vec![builder.into_inner().expect("tar")]
}
