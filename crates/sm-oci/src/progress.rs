//! Progress reporting for pulls and imports.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::digest::Digest;

/// What kind of blob is being fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    /// Image index / manifest list.
    Index,
    /// Image manifest.
    Manifest,
    /// Image config.
    Config,
    /// A layer.
    Layer,
}

/// Callbacks from a pull or import. All methods have empty defaults; they are
/// called from several tasks at once.
pub trait Progress: Send + Sync {
    /// The manifest is known: `layers` layers, `total_bytes` to fetch at most.
    fn resolved(&self, _image: &str, _manifest: &Digest, _layers: usize, _total_bytes: u64) {}
    /// A blob download starts (`size` from its descriptor, 0 if unknown).
    fn blob_started(&self, _digest: &Digest, _kind: BlobKind, _size: u64) {}
    /// `bytes` more bytes of the blob arrived.
    fn blob_advanced(&self, _digest: &Digest, _bytes: u64) {}
    /// A transient failure; the blob is fetched again from the start.
    fn blob_retrying(&self, _digest: &Digest, _attempt: u32, _error: &str) {}
    /// The blob is verified and stored (`cached`: it was already in the store).
    fn blob_finished(&self, _digest: &Digest, _kind: BlobKind, _cached: bool) {}
    /// The whole operation ended (successfully or not).
    fn finished(&self) {}
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// indicatif bars on stderr, one per layer; draws nothing when stderr is not a
/// terminal.
pub struct IndicatifProgress {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Default for IndicatifProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl IndicatifProgress {
    /// Bars on stderr if it is a TTY, hidden otherwise.
    pub fn new() -> Self {
        let target =
            if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        IndicatifProgress { multi: MultiProgress::with_draw_target(target), bars: Mutex::new(HashMap::new()) }
    }

    /// Whether anything will be drawn.
    pub fn is_hidden(&self) -> bool {
        self.multi.is_hidden()
    }

    fn style() -> ProgressStyle {
        ProgressStyle::with_template(
            "{prefix:.bold} {msg:10} [{bar:30}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
    }
}

impl Progress for IndicatifProgress {
    fn blob_started(&self, digest: &Digest, kind: BlobKind, size: u64) {
        if kind != BlobKind::Layer {
            return;
        }
        let pb = self.multi.add(ProgressBar::new(size));
        pb.set_style(Self::style());
        pb.set_prefix(digest.short().to_string());
        pb.set_message("pulling");
        pb.enable_steady_tick(Duration::from_millis(200));
        if let Ok(mut b) = self.bars.lock() {
            b.insert(digest.clone(), pb);
        }
    }

    fn blob_advanced(&self, digest: &Digest, bytes: u64) {
        if let Some(pb) = self.bars.lock().ok().and_then(|b| b.get(digest).cloned()) {
            pb.inc(bytes);
        }
    }

    fn blob_retrying(&self, digest: &Digest, attempt: u32, _error: &str) {
        if let Some(pb) = self.bars.lock().ok().and_then(|b| b.get(digest).cloned()) {
            pb.set_position(0);
            pb.set_message(format!("retry {attempt}"));
        }
    }

    fn blob_finished(&self, digest: &Digest, kind: BlobKind, cached: bool) {
        if kind != BlobKind::Layer {
            return;
        }
        let pb = self.bars.lock().ok().and_then(|b| b.get(digest).cloned());
        match pb {
            Some(pb) => pb.finish_with_message("done"),
            None if cached => {
                let pb = self.multi.add(ProgressBar::new(0));
                pb.set_style(
                    ProgressStyle::with_template("{prefix:.bold} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                pb.set_prefix(digest.short().to_string());
                pb.finish_with_message("already present");
            }
            None => {}
        }
    }

    fn finished(&self) {
        if let Ok(b) = self.bars.lock() {
            for pb in b.values() {
                if !pb.is_finished() {
                    pb.abandon();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indicatif_progress_runs_hidden() {
        let p = IndicatifProgress::new();
        let d = Digest::of(b"x");
        p.resolved("img", &d, 1, 10);
        p.blob_started(&d, BlobKind::Layer, 10);
        p.blob_advanced(&d, 5);
        p.blob_retrying(&d, 1, "boom");
        p.blob_advanced(&d, 10);
        p.blob_finished(&d, BlobKind::Layer, false);
        p.blob_finished(&Digest::of(b"y"), BlobKind::Layer, true);
        p.finished();
        NoProgress.blob_started(&d, BlobKind::Config, 1);
    }
}
