//! OCI images for supermachine.
//!
//! This crate owns everything between an image name and a root disk a guest
//! can boot from:
//!
//! - [`mod@reference`]: docker-style image references (`busybox` ->
//!   `docker.io/library/busybox:latest`), and local sources
//!   (`oci-layout:DIR[:tag]`, `oci-archive:FILE[:tag]`, `docker-archive:FILE[:ref]`)
//!   in [`source`];
//! - [`store`]: the content-addressed local store (`blobs/sha256/<hex>`, an
//!   image table, cached root disks), with verified writes and `prune`;
//! - [`mod@pull`]: registry pulls over HTTP(S) with oci-client (anonymous, basic and
//!   bearer auth, platform selection, digest checks on every blob, bounded
//!   concurrent downloads, retries, progress), and [`local`]: imports;
//! - [`unpack`]: applying layers into a directory, safely (nothing is ever
//!   written outside the target);
//! - [`config`]: the image's run config and docker's argv/env rules;
//! - [`rootfs`]: building a read-only root disk (squashfs + zstd by default;
//!   erofs and ext4 on request), cached per image;
//! - [`builtin`]: images built locally from a static busybox, among them the
//!   built-in default image (no registry needed).
//!
//! It knows nothing about VMs: callers get a file path and a [`config::RunSpec`].
//!
//! ```no_run
//! # async fn demo() -> sm_oci::Result<()> {
//! use std::sync::Arc;
//! use sm_oci::{ImageSource, IndicatifProgress, PullOptions, RootfsFormat, RunOverrides, Store};
//!
//! let store = Store::open(Store::default_root())?;
//! let source = ImageSource::parse("busybox")?; // or oci-layout:DIR, docker-archive:FILE ...
//! let rec = sm_oci::fetch(&store, &source, &PullOptions::default(), Arc::new(IndicatifProgress::new())).await?;
//! let image = store.info_for(&rec)?;
//! let disk = sm_oci::build_rootfs(&store, &image, RootfsFormat::default())?; // disk.path
//! let run = image.config.resolve(&RunOverrides { cmd: vec!["ls".into()], ..Default::default() })?;
//! # let _ = (disk, run); Ok(()) }
//! ```

pub mod builtin;
pub mod config;
pub mod digest;
mod error;
pub mod image;
pub mod local;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod rootfs;
pub mod source;
pub mod store;
pub mod unpack;

pub use config::{ImageConfig, RunOverrides, RunSpec};
pub use digest::Digest;
pub use error::{Error, Result};
pub use image::Platform;
pub use progress::{IndicatifProgress, NoProgress, Progress};
pub use pull::{pull, pull_blocking, Auth, PullOptions};
pub use reference::Reference;
pub use rootfs::{build_rootfs, build_rootfs_from_dir, Rootfs, RootfsFormat};
pub use source::{fetch, ImageSource};
pub use store::{ImageInfo, ImageRecord, Store};
pub use unpack::{unpack_image, UnpackReport, Unpacker};
