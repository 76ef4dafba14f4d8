//! Fuzz targets for everything a guest, an image or a file hands supermachine,
//! run by [proptest] on stable Rust (no nightly toolchain or sanitizer needed).
//!
//! Each [`Target`] takes arbitrary bytes and must neither panic, hang nor
//! allocate without bound, whatever they are; errors are fine. Inputs are
//! random bytes or mutations (byte edits, truncation, splices) of the target's
//! valid seeds, so the parsers are driven past their first checks; checksums
//! are fixed up where a format has them. A failing input is shrunk by
//! proptest and printed.
//!
//! `cargo xtask fuzz [TARGET] [--runs N]` runs them at length (release
//! build); `cargo test -p sm-fuzz` runs a short smoke of every target.

mod targets;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

pub use targets::all;

/// One fuzz target.
pub struct Target {
    /// Its name on the command line.
    pub name: &'static str,
    /// What it feeds the bytes to.
    pub what: &'static str,
    /// Runs one input; a panic is a finding.
    pub run: fn(&[u8]),
    /// Valid inputs to mutate.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Longest random input.
    pub max_len: usize,
    /// Relative cost of one case (1: cheap parsing; more: files, threads):
    /// the smoke test runs fewer cases of costly targets.
    pub cost: u32,
}

/// The target called `name`.
pub fn find(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

/// Random bytes or a mutated seed.
fn inputs(seeds: Vec<Vec<u8>>, max_len: usize) -> BoxedStrategy<Vec<u8>> {
    let random = proptest::collection::vec(any::<u8>(), 0..max_len);
    if seeds.is_empty() {
        return random.boxed();
    }
    let edits = proptest::collection::vec((any::<Index>(), any::<u8>()), 0..12);
    let donors = seeds.clone();
    let mutated = (proptest::sample::select(seeds), edits, any::<Index>(), 0u8..4, any::<Index>()).prop_map(
        move |(mut input, edits, at, how, other)| {
            for (i, b) in edits {
                if !input.is_empty() {
                    let k = i.index(input.len());
                    input[k] = b;
                }
            }
            match how {
                // Cut short.
                0 if !input.is_empty() => input.truncate(at.index(input.len())),
                // A chunk of another seed spliced in.
                1 => {
                    let donor = &donors[other.index(donors.len())];
                    if !donor.is_empty() {
                        let from = other.index(donor.len());
                        let k = if input.is_empty() { 0 } else { at.index(input.len()) };
                        input.splice(k..k, donor[from..].iter().copied().take(64));
                    }
                }
                // A run of bytes duplicated.
                2 if !input.is_empty() => {
                    let k = at.index(input.len());
                    let run: Vec<u8> = input[k..].iter().copied().take(32).collect();
                    input.splice(k..k, run);
                }
                _ => {}
            }
            input
        },
    );
    prop_oneof![1 => random, 3 => mutated].boxed()
}

/// Why a run failed.
#[derive(Debug)]
pub struct Finding {
    /// The target.
    pub target: &'static str,
    /// The (shrunk) input.
    pub input: Vec<u8>,
    /// What went wrong (the panic message).
    pub reason: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} on input {:02x?}", self.target, self.reason, self.input)
    }
}

/// A panic on any thread since the flag was last cleared (device workers
/// run on threads of their own: their panics count too).
static PANICKED: AtomicBool = AtomicBool::new(false);

fn watch_all_threads() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Runs `cases` inputs through `target`; `deterministic` fixes the random
/// seed (the smoke test), otherwise each run explores new inputs. A panic on
/// any thread during a case is a finding.
pub fn fuzz(target: &Target, cases: u32, deterministic: bool) -> Result<(), Finding> {
    watch_all_threads();
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 4096, ..Config::default() };
    let mut runner = if deterministic {
        TestRunner::new_with_rng(config, proptest::test_runner::TestRng::deterministic_rng(config_rng()))
    } else {
        TestRunner::new(config)
    };
    let strategy = inputs((target.seeds)(), target.max_len);
    let run = target.run;
    let result = runner.run(&strategy, |input| {
        PANICKED.store(false, Ordering::SeqCst);
        run(&input);
        if PANICKED.swap(false, Ordering::SeqCst) {
            return Err(TestCaseError::fail("a thread the input reached (a device worker) panicked"));
        }
        Ok::<(), TestCaseError>(())
    });
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, input)) => Err(Finding { target: target.name, input, reason: reason.to_string() }),
        Err(TestError::Abort(reason)) => {
            Err(Finding { target: target.name, input: Vec::new(), reason: reason.to_string() })
        }
    }
}

fn config_rng() -> proptest::test_runner::RngAlgorithm {
    proptest::test_runner::RngAlgorithm::ChaCha
}
