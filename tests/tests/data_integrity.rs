//! Bytes come back exactly as sent: random payloads of random sizes, checksummed
//! (SHA-256), through `cat` (stdin -> stdout), through `Vm::write_file` /
//! `Vm::read_file` (with the guest's own `sha256sum` of what landed), and through
//! eight concurrent `cat` execs. Zero mismatches allowed.
//!
//! Short form (50 payloads of 1 B .. 256 KiB, sizes log-uniform plus the page
//! edges) in `cargo xtask test`; `cargo xtask soak` sets `SM_SOAK=1` for the long
//! form (1000 payloads plus 10 of 4 MiB). `SM_STRESS_SEED=N` replays a run.

use sm_api::ConsoleOutput;
use sm_api::{ExecRequest, ExitStatus, Vm};
use sm_tests::{agent_snapshot, hypervisor, sha256_hex, SplitMix64};

const MAX_SMALL: usize = 256 << 10;
const BIG: usize = 4 << 20;

/// 1 ..= MAX_SMALL, log-uniform (as many tiny as huge payloads).
fn random_size(rng: &mut SplitMix64) -> usize {
    let bits = (rng.next_u64() % 19) as u32; // 2^0 .. 2^18 = 256 KiB
    let base = 1usize << bits;
    (base + (rng.next_u64() as usize % base)).min(MAX_SMALL)
}

fn seed() -> u64 {
    std::env::var("SM_STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    })
}

fn soak() -> bool {
    std::env::var("SM_SOAK").is_ok_and(|v| v == "1")
}

/// The payloads of one run: page-edge sizes first, then random sizes.
fn payloads(rng: &mut SplitMix64) -> Vec<Vec<u8>> {
    let (count, big) = if soak() { (1000, 10) } else { (50, 0) };
    let edges = [1, 15, 16, 17, 4095, 4096, 4097, 65536, MAX_SMALL];
    let mut sizes: Vec<usize> = edges.to_vec();
    while sizes.len() < count {
        sizes.push(random_size(rng));
    }
    sizes.extend(std::iter::repeat_n(BIG, big));
    sizes.into_iter().map(|n| rng.bytes(n)).collect()
}

/// Where `got` differs from `want`: the differing byte ranges (at most 8 listed).
fn damage(want: &[u8], got: &[u8]) -> String {
    if want.len() != got.len() {
        return format!("length {} instead of {}", got.len(), want.len());
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        if a != b {
            match runs.last_mut() {
                Some((_, end)) if *end == i => *end = i + 1,
                _ => runs.push((i, i + 1)),
            }
        }
    }
    let bytes: usize = runs.iter().map(|(s, e)| e - s).sum();
    let zeros = runs.iter().all(|&(s, e)| got[s..e].iter().all(|&b| b == 0));
    let list: Vec<String> = runs.iter().take(8).map(|(s, e)| format!("{s}..{e}")).collect();
    format!("{bytes} bytes in {} runs{}: {}", runs.len(), if zeros { " (all zeros)" } else { "" }, list.join(", "))
}

fn check(what: &str, seed: u64, index: usize, want: &[u8], got: &[u8]) -> Option<String> {
    if soak() && index.is_multiple_of(100) {
        eprintln!("{what}: payload {index} ...");
    }
    (sha256_hex(want) != sha256_hex(got))
        .then(|| format!("{what}: payload {index} ({} bytes, seed {seed}): {}", want.len(), damage(want, got)))
}

fn vm(test: &str) -> Option<Vm> {
    let snap = agent_snapshot(test)?;
    let hv = hypervisor(test)?;
    Some(Vm::restore(&*hv, snap, ConsoleOutput::Null, &[]).expect("restore the agent guest"))
}

fn cat(vm: &Vm, data: &[u8]) -> Vec<u8> {
    let out = vm.exec(&ExecRequest::new(["/bin/cat"]), Some(data)).expect("exec cat");
    assert_eq!(out.status, ExitStatus::Code(0), "cat failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn assert_clean(what: &str, seed: u64, total: usize, bad: &[String]) {
    eprintln!("{what}: {total} payloads, {} mismatches (seed {seed})", bad.len());
    assert!(bad.is_empty(), "{what}: {} of {total} payloads came back altered:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn stdin_to_stdout_round_trips_are_exact() {
    let Some(vm) = vm("integrity stdin") else { return };
    let seed = seed();
    let payloads = payloads(&mut SplitMix64(seed));
    let bad: Vec<String> =
        payloads.iter().enumerate().filter_map(|(i, p)| check("cat", seed, i, p, &cat(&vm, p))).collect();
    assert_clean("stdin -> stdout", seed, payloads.len(), &bad);
}

#[test]
fn file_write_read_round_trips_are_exact() {
    let Some(vm) = vm("integrity files") else { return };
    let seed = seed() ^ 0x5eed_f11e;
    let payloads = payloads(&mut SplitMix64(seed));
    let mut bad = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let path = format!("/tmp/payload-{}", i % 4);
        vm.write_file(&path, 0o600, p).expect("write_file");
        // What landed in the guest, by the guest's own checksum.
        let out = vm.exec(&ExecRequest::new(["/usr/bin/sha256sum", path.as_str()]), None).expect("exec sha256sum");
        let guest_sum = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string();
        if guest_sum != sha256_hex(p) {
            bad.push(format!("write_file: payload {i} ({} bytes, seed {seed}): guest sha256 {guest_sum:?}", p.len()));
        }
        bad.extend(check("read_file", seed, i, p, &vm.read_file(&path).expect("read_file")));
    }
    assert_clean("file write/read", seed, payloads.len(), &bad);
}

#[test]
fn eight_concurrent_round_trips_are_exact() {
    let Some(vm) = vm("integrity concurrent") else { return };
    let seed = seed() ^ 0xc0c0_8888;
    let payloads = payloads(&mut SplitMix64(seed));
    let bad: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (vm, payloads) = (&vm, &payloads);
                s.spawn(move || {
                    (w..payloads.len())
                        .step_by(8)
                        .filter_map(|i| check("concurrent cat", seed, i, &payloads[i], &cat(vm, &payloads[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|h| h.join().expect("worker")).collect()
    });
    assert_clean("8 concurrent execs", seed, payloads.len(), &bad);
}
