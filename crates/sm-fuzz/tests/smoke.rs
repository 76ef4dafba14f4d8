//! A short run of every fuzz target with a fixed seed (the long runs are
//! `cargo xtask fuzz`): no input may panic.

#[test]
fn every_target_survives_a_short_deterministic_run() {
    const BUDGET: u32 = 3000;
    let targets = sm_fuzz::all();
    assert!(targets.len() >= 10, "every component has its target");
    let mut failures = Vec::new();
    for t in &targets {
        let cases = (BUDGET / t.cost).max(50);
        if let Err(finding) = sm_fuzz::fuzz(t, cases, true) {
            failures.push(finding.to_string());
        }
    }
    assert!(failures.is_empty(), "fuzz findings:\n{}", failures.join("\n"));
}
