//! Pulling images from a registry into the [`Store`], with oci-client.
//!
//! - HTTPS by default; registries on this machine (`localhost`, 127.0.0.0/8,
//!   `::1`) use plain HTTP like docker; any other plain-HTTP registry must be
//!   listed in [`PullOptions::insecure_registries`].
//! - Auth: anonymous, HTTP basic, or bearer tokens (oci-client runs the token
//!   flow from the registry's `WWW-Authenticate` challenge, sending basic
//!   credentials to the token realm when given).
//! - Indexes / manifest lists: the entry for [`PullOptions::platform`]
//!   (linux/amd64) is chosen.
//! - Every blob (index, manifest, config, layers) is hashed while it is written
//!   and committed only if digest and size match its descriptor; layers already
//!   in the store are not fetched again.
//! - Layers download concurrently (bounded); transient failures (connect,
//!   timeouts, cut-off bodies, 408/429/5xx) are retried with exponential backoff.

use std::pin::Pin;
use std::sync::{Arc, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use tokio::io::AsyncWrite;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::{descriptor_digest, parse_manifest_or_index, select_platform, Parsed, Platform, MANIFEST_ACCEPT};
use crate::progress::{BlobKind, Progress};
use crate::reference::Reference;
use crate::store::{ImageRecord, Store};

/// Largest manifest or index accepted.
const MAX_MANIFEST: usize = 4 << 20;

/// Registry credentials.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials (anonymous bearer tokens are still fetched when offered).
    #[default]
    Anonymous,
    /// Username and password: HTTP basic, or sent to the token service.
    Basic {
        /// User name.
        username: String,
        /// Password or access token.
        password: String,
    },
    /// A ready bearer token.
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Basic { username, .. } => write!(f, "Basic({username}, ****)"),
            Auth::Bearer(_) => f.write_str("Bearer(****)"),
        }
    }
}

/// How to pull.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Credentials for the image's registry.
    pub auth: Auth,
    /// Registries (`host` or `host:port`) allowed over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Platform picked from an index.
    pub platform: Platform,
    /// Layers downloaded at once.
    pub max_concurrent_downloads: usize,
    /// Retries of a transient failure per request (0: try once).
    pub retries: u32,
    /// First retry delay; doubles each retry.
    pub retry_backoff: Duration,
    /// Extra PEM root certificates to trust (private registries).
    pub extra_root_certificates_pem: Vec<Vec<u8>>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout (between bytes).
    pub read_timeout: Duration,
    /// Speak plain HTTP to loopback registries, like docker (default true; false
    /// forces HTTPS for them too).
    pub loopback_plain_http: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            auth: Auth::Anonymous,
            insecure_registries: Vec::new(),
            platform: Platform::default(),
            max_concurrent_downloads: 3,
            retries: 3,
            retry_backoff: Duration::from_millis(250),
            extra_root_certificates_pem: Vec::new(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            loopback_plain_http: true,
        }
    }
}

/// Install rustls' ring crypto provider as the process default (once). Called
/// by [`pull`]; harmless if the application installed one already.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Whether `reference` is spoken to over plain HTTP under `opts`.
pub fn uses_plain_http(reference: &Reference, opts: &PullOptions) -> bool {
    (opts.loopback_plain_http && reference.is_loopback_registry())
        || opts.insecure_registries.iter().any(|r| r == reference.registry() || r == reference.registry_host())
}

struct Ctx {
    client: Client,
    store: Store,
    auth: RegistryAuth,
    oref: oci_client::Reference,
    registry: String,
    reference: String,
    plain_http: bool,
    retries: u32,
    backoff: Duration,
    progress: Arc<dyn Progress>,
}

/// Pull `reference` into `store` and record it under `reference.to_string()`.
pub async fn pull(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord> {
    let r = pull_inner(store, reference, opts, progress.clone()).await;
    progress.finished();
    r
}

/// [`pull`] on a private tokio runtime, for synchronous callers.
pub fn pull_blocking(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the tokio runtime", e))?;
    rt.block_on(pull(store, reference, opts, progress))
}

async fn pull_inner(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord> {
    install_crypto_provider();
    let _gc = store.gc_shared()?;
    let plain_http = uses_plain_http(reference, opts);
    let config = ClientConfig {
        protocol: if plain_http { ClientProtocol::Http } else { ClientProtocol::Https },
        extra_root_certificates: opts
            .extra_root_certificates_pem
            .iter()
            .map(|pem| Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() })
            .collect(),
        platform_resolver: None,
        connect_timeout: Some(opts.connect_timeout),
        read_timeout: Some(opts.read_timeout),
        ..Default::default()
    };
    let client = Client::try_from(config).map_err(|e| Error::Registry {
        registry: reference.registry().to_string(),
        detail: format!("cannot create HTTP client: {}", chain(&e)),
    })?;
    let oref = oci_client::Reference::from(reference);
    let auth = match &opts.auth {
        Auth::Anonymous => RegistryAuth::Anonymous,
        Auth::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
        Auth::Bearer(t) => RegistryAuth::Bearer(t.clone()),
    };
    let ctx = Arc::new(Ctx {
        client,
        store: store.clone(),
        auth,
        oref,
        registry: reference.registry().to_string(),
        reference: reference.to_string(),
        plain_http,
        retries: opts.retries,
        backoff: opts.retry_backoff,
        progress,
    });

    let c = &*ctx;
    c.retry("authenticating", None, move || async move {
        c.client.auth(&c.oref, &c.auth, RegistryOperation::Pull).await.map(|_| ())
    })
    .await?;

    // Manifest or index.
    let (bytes, digest) = fetch_manifest(&ctx, &ctx.oref, reference.digest(), None).await?;
    let (manifest_bytes, manifest_digest, index_digest) = match parse_manifest_or_index(&bytes, &ctx.reference)? {
        Parsed::Manifest(_) => (bytes, digest, None),
        Parsed::Index(idx) => {
            let entry = select_platform(&idx, &opts.platform, &ctx.reference)?;
            let md = descriptor_digest(entry)?;
            let r = ctx.oref.clone_with_digest(md.to_string());
            let (mb, got) = fetch_manifest(&ctx, &r, Some(&md), Some(entry.size())).await?;
            ctx.store.put_blob(&bytes, Some(&digest))?;
            ctx.progress.blob_finished(&digest, BlobKind::Index, false);
            (mb, got, Some(digest))
        }
    };
    let manifest = match parse_manifest_or_index(&manifest_bytes, &ctx.reference)? {
        Parsed::Manifest(m) => m,
        Parsed::Index(_) => return Err(Error::invalid(&ctx.reference, "index entry points at another index")),
    };
    let total: u64 = manifest.layers().iter().map(|l| l.size()).sum();
    ctx.progress.resolved(&ctx.reference, &manifest_digest, manifest.layers().len(), total);

    // Config first (small), then layers, bounded concurrency.
    let cfg = descriptor_digest(manifest.config())?;
    fetch_blob(ctx.clone(), cfg, manifest.config().size(), BlobKind::Config).await?;
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.max_concurrent_downloads.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for l in manifest.layers() {
        let d = descriptor_digest(l)?;
        let size = l.size();
        let ctx = ctx.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit =
                sem.acquire_owned().await.map_err(|e| Error::io("download slots", std::io::Error::other(e)))?;
            fetch_blob(ctx, d, size, BlobKind::Layer).await
        });
    }
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        let r = r.unwrap_or_else(|e| Err(Error::io("layer download task", std::io::Error::other(e))));
        if let Err(e) = r {
            if first_err.is_none() {
                first_err = Some(e);
                set.abort_all();
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    ctx.store.put_blob(&manifest_bytes, Some(&manifest_digest))?;
    ctx.progress.blob_finished(&manifest_digest, BlobKind::Manifest, false);
    let rec = ImageRecord { name: ctx.reference.clone(), manifest: manifest_digest, index: index_digest };
    ctx.store.set_image(&rec)?;
    Ok(rec)
}

async fn fetch_manifest(
    ctx: &Ctx,
    r: &oci_client::Reference,
    expected: Option<&Digest>,
    size: Option<u64>,
) -> Result<(Vec<u8>, Digest)> {
    // An index names its manifests' sizes: a huge one is refused before a
    // byte of it is fetched (a manifest a tag names is bounded only after).
    if size.is_some_and(|s| s > MAX_MANIFEST as u64) {
        return Err(Error::invalid(&ctx.reference, "manifest larger than 4 MiB (by its index's descriptor)"));
    }
    let (body, _) = ctx
        .retry("fetching manifest", None, move || async move {
            ctx.client.pull_manifest_raw(r, &ctx.auth, MANIFEST_ACCEPT).await
        })
        .await?;
    if body.len() > MAX_MANIFEST {
        return Err(Error::invalid(&ctx.reference, "manifest larger than 4 MiB"));
    }
    let actual = Digest::of(&body);
    if let Some(e) = expected {
        e.verify(&actual, format_args!("manifest of {}", ctx.reference))?;
    }
    if let Some(s) = size {
        if s != body.len() as u64 {
            return Err(Error::SizeMismatch {
                what: format!("manifest of {}", ctx.reference),
                expected: s,
                actual: body.len() as u64,
            });
        }
    }
    Ok((body.to_vec(), actual))
}

async fn fetch_blob(ctx: Arc<Ctx>, digest: Digest, size: u64, kind: BlobKind) -> Result<()> {
    if ctx.store.has_blob(&digest) {
        ctx.progress.blob_finished(&digest, kind, true);
        return Ok(());
    }
    ctx.progress.blob_started(&digest, kind, size);
    let what = format!("downloading {digest}");
    let (c, d) = (&*ctx, &digest);
    c.retry(&what, Some(d), move || async move {
        let mut sink = BlobSink {
            writer: Some(c.store.blob_writer().map_err(to_oci)?),
            limit: size,
            digest: d,
            progress: &*c.progress,
        };
        c.client.pull_blob(&c.oref, d.as_str(), &mut sink).await?;
        let w =
            sink.writer.take().ok_or_else(|| OciDistributionError::GenericError(Some("blob writer gone".into())))?;
        // Size and digest are checked again here; a mismatch is final (not retried).
        Ok(w.commit(d, Some(size)))
    })
    .await??;
    ctx.progress.blob_finished(&digest, kind, false);
    Ok(())
}

fn to_oci(e: Error) -> OciDistributionError {
    OciDistributionError::IoError(std::io::Error::other(e.to_string()))
}

/// AsyncWrite into a [`crate::store::BlobWriter`] (plain blocking writes: local
/// files, page cache), refusing more bytes than the descriptor announced.
struct BlobSink<'a> {
    writer: Option<crate::store::BlobWriter>,
    limit: u64,
    digest: &'a Digest,
    progress: &'a dyn Progress,
}

impl AsyncWrite for BlobSink<'_> {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        use std::io::Write;
        let limit = self.limit;
        let Some(w) = self.writer.as_mut() else {
            return Poll::Ready(Err(std::io::Error::other("blob writer gone")));
        };
        if w.written() + buf.len() as u64 > limit {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("blob is larger than the {limit} bytes its descriptor announces"),
            )));
        }
        if let Err(e) = w.write_all(buf) {
            return Poll::Ready(Err(e));
        }
        self.progress.blob_advanced(self.digest, buf.len() as u64);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Ctx {
    async fn retry<T, F, Fut>(&self, what: &str, blob: Option<&Digest>, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, OciDistributionError>>,
    {
        let mut attempt = 0u32;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let (err, transient) = self.classify(e, what);
                    if !transient || attempt >= self.retries {
                        return Err(err);
                    }
                    attempt += 1;
                    tracing::warn!("{what}: {err}; retry {attempt}/{}", self.retries);
                    if let Some(d) = blob {
                        self.progress.blob_retrying(d, attempt, &err.to_string());
                    }
                    tokio::time::sleep(self.backoff * 2u32.saturating_pow(attempt - 1)).await;
                }
            }
        }
    }

    /// Map an oci-client error to ours, and say whether it is worth retrying.
    fn classify(&self, e: OciDistributionError, what: &str) -> (Error, bool) {
        let registry = self.registry.clone();
        let unauthorized = |detail: String| Error::Unauthorized {
            registry: self.registry.clone(),
            reference: self.reference.clone(),
            detail,
        };
        let reg = |detail: String| Error::Registry { registry: registry.clone(), detail: format!("{what}: {detail}") };
        match e {
            OciDistributionError::UnauthorizedError { url } => {
                (unauthorized(format!("401 Unauthorized for {url}")), false)
            }
            OciDistributionError::AuthenticationFailure(s) => {
                (unauthorized(format!("token service refused: {s}")), false)
            }
            OciDistributionError::RegistryError { envelope, url } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let detail = format!("{envelope} ({url})");
                if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                    (unauthorized(detail), false)
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    (Error::NotFound(format!("{}: {detail}", self.reference)), false)
                } else {
                    let transient = codes.iter().any(|c| matches!(c, OciErrorCode::Toomanyrequests));
                    (reg(detail), transient)
                }
            }
            OciDistributionError::ServerError { code, url, message } => {
                let mut detail = format!("HTTP {code} from {url}: {}", message.trim());
                if self.plain_http && detail.contains("HTTPS server") {
                    detail.push_str(" (this registry speaks HTTPS: set loopback_plain_http = false)");
                }
                match code {
                    401 | 403 => (unauthorized(detail), false),
                    404 => (Error::NotFound(format!("{}: {detail}", self.reference)), false),
                    408 | 429 | 500..=599 => (reg(detail), true),
                    _ => (reg(detail), false),
                }
            }
            OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
                (Error::DigestMismatch { what: format!("{what} from {}", self.reference), expected, actual }, false)
            }
            OciDistributionError::RequestError(r) => {
                let mut detail = chain(&r);
                // Certificate problems do not go away by retrying.
                let transient = (r.is_timeout() || r.is_connect() || r.is_body() || r.is_request() || r.is_decode())
                    && !detail.contains("certificate");
                if detail.contains("certificate") {
                    detail.push_str(" (a private CA can be trusted with extra_root_certificates_pem)");
                } else if r.is_connect() && !self.plain_http {
                    detail.push_str(" (if this registry only speaks plain HTTP, add it to insecure_registries)");
                }
                (reg(detail), transient)
            }
            OciDistributionError::IoError(io) => {
                // Our sink refusing an oversized blob is an integrity failure.
                if io.kind() == std::io::ErrorKind::InvalidData {
                    (
                        Error::SizeMismatch { what: format!("{what} from {}", self.reference), expected: 0, actual: 0 },
                        false,
                    )
                } else {
                    (Error::io(what.to_string(), io), false)
                }
            }
            other => (reg(chain(&other)), false),
        }
    }
}

/// An error with its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_rules() {
        let o = PullOptions::default();
        assert!(uses_plain_http(&Reference::parse("localhost:5000/a").unwrap(), &o));
        assert!(uses_plain_http(&Reference::parse("127.0.0.1:5000/a").unwrap(), &o));
        assert!(uses_plain_http(&Reference::parse("127.8.9.1/a/b").unwrap(), &o));
        assert!(!uses_plain_http(&Reference::parse("10.1.1.1:5000/a").unwrap(), &o));
        assert!(!uses_plain_http(&Reference::parse("busybox").unwrap(), &o));
        let o = PullOptions { insecure_registries: vec!["myreg.lan:5000".into()], ..Default::default() };
        assert!(uses_plain_http(&Reference::parse("myreg.lan:5000/a").unwrap(), &o));
        assert!(!uses_plain_http(&Reference::parse("myreg.lan/a").unwrap(), &o));
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let a = Auth::Basic { username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
