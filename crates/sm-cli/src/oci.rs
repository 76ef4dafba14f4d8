//! The image side shared by `run` and `pull`: the store, and resolving what
//! the user typed to an image in it (pulling or importing when needed).

use std::sync::Arc;

use anyhow::{Context, Result};
use sm_api::oci::{ImageInfo, ImageSource, IndicatifProgress, PullOptions, Store};

/// Opens the default store (`$SUPERMACHINE_HOME/oci`, ...).
pub fn open_store() -> Result<Store> {
    let root = Store::default_root();
    Store::open(&root).with_context(|| format!("opening the image store at {}", root.display()))
}

/// Parses an image argument, naming it and the accepted forms on failure.
pub fn parse_source(input: &str) -> Result<ImageSource> {
    ImageSource::parse(input).with_context(|| {
        format!(
            "{input:?} is not an image reference: use NAME[:TAG][@DIGEST] (e.g. busybox, \
             127.0.0.1:5000/app:v1) or oci-layout:DIR[:TAG], oci-archive:FILE, docker-archive:FILE"
        )
    })
}

/// Pull options from the command line.
pub fn pull_options(insecure_registries: &[String]) -> PullOptions {
    PullOptions { insecure_registries: insecure_registries.to_vec(), ..PullOptions::default() }
}

/// Fetches `source` into `store` (registry pull or local import), with
/// progress bars on a terminal.
pub fn fetch(store: &Store, source: &ImageSource, opts: &PullOptions) -> Result<ImageInfo> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let progress = Arc::new(IndicatifProgress::new());
    let rec = rt.block_on(sm_api::oci::fetch(store, source, opts, progress)).with_context(|| match source {
        ImageSource::Registry(r) => format!(
            "pulling {r} failed (check the name and tag, that the registry is reachable, and \
             pass --insecure-registry {} if it speaks plain HTTP)",
            r.registry()
        ),
        local => format!("importing {local} failed"),
    })?;
    store.info_for(&rec).with_context(|| format!("reading {} from the store", rec.name))
}

/// The image for `source`: from the store if present (unless `always_pull`),
/// else fetched now. Returns whether it was fetched.
pub fn resolve(
    store: &Store,
    source: &ImageSource,
    opts: &PullOptions,
    always_pull: bool,
) -> Result<(ImageInfo, bool)> {
    let name = source.store_name();
    if !always_pull && store.image(&name)?.is_some() {
        match store.image_info(&name) {
            Ok(info) => return Ok((info, false)),
            Err(e) => eprintln!("supermachine: stored image {name} is damaged ({e}); fetching it again"),
        }
    } else if !always_pull {
        eprintln!("Unable to find image '{name}' locally");
    }
    Ok((fetch(store, source, opts)?, true))
}
