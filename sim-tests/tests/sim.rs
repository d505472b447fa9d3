//! Tier A: seeded whole-cluster simulations of the real `core::cluster` machines.
//!
//! * `SIM_SEED=<n> cargo test -p sim-tests -- --nocapture` replays one seed verbosely.
//! * `SIM_SEEDS=<n>` changes how many seeds the swarm sweep runs (default 10,000).

use std::collections::BTreeMap;
use std::time::Instant;

use sim_tests::{run_seed, Bug, FaultKind, RunReport, SimConfig};

/// Each seed must acknowledge at least this many entries ("nothing happened" cannot pass).
const MIN_ACKED: u64 = 10;
/// A planted bug must be caught within this many seeds.
const BUG_SEEDS: u64 = 200;

fn replay(seed: u64) -> String {
    format!("replay: SIM_SEED={seed} cargo test -p sim-tests -- --nocapture")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// Problems of one run, as printable lines (empty = fine).
fn judge(r: &RunReport) -> Option<String> {
    if let Some(v) = &r.violation {
        return Some(format!(
            "seed {} broke \"{}\": {}\n  {}\n  {}",
            r.seed,
            v.checker,
            v.detail,
            SimConfig::from_seed(r.seed),
            replay(r.seed)
        ));
    }
    if r.acked < MIN_ACKED || r.total_faults() == 0 {
        return Some(format!(
            "seed {}: coverage too low (acked {}, faults {})\n  {}",
            r.seed,
            r.acked,
            r.total_faults(),
            replay(r.seed)
        ));
    }
    None
}

fn run_many(seeds: std::ops::Range<u64>) -> Vec<RunReport> {
    sim_tests::run_seeds(seeds, 2, |x| run_seed(x, Bug::None))
}

#[test]
fn swarm_seeds_hold_every_property() {
    if let Some(seed) = env_u64("SIM_SEED") {
        println!("{}", SimConfig::from_seed(seed));
        let r = run_seed(seed, Bug::None);
        println!("{r:#?}");
        assert!(judge(&r).is_none(), "{}", judge(&r).unwrap_or_default());
        return;
    }
    let n = env_u64("SIM_SEEDS").unwrap_or(10_000);
    let start = Instant::now();
    let reports = run_many(0..n);
    let secs = start.elapsed().as_secs_f64();
    let mut faults: BTreeMap<FaultKind, u64> = BTreeMap::new();
    let (mut acked, mut read, mut failovers, mut seals, mut events) = (0, 0, 0, 0, 0);
    for r in &reports {
        for (k, v) in &r.faults {
            *faults.entry(*k).or_insert(0) += v;
        }
        acked += r.acked;
        read += r.read;
        failovers += r.failovers;
        seals += r.seals;
        events += r.events;
    }
    println!(
        "sim summary: {n} seeds in {secs:.1}s ({:.0} seeds/s, {events} events), acked writes \
         {acked}, entries read {read}, seals {seals}, failovers {failovers}",
        n as f64 / secs
    );
    println!("sim faults by kind: {faults:?}");
    let failures: Vec<String> = reports.iter().filter_map(judge).collect();
    assert!(
        failures.is_empty(),
        "{} of {n} seeds failed; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Over every window of 100 seeds, every fault kind fires.
    for w in reports.chunks(100).filter(|w| w.len() == 100) {
        for k in FaultKind::ALL {
            assert!(
                w.iter().any(|r| r.faults.get(&k).is_some_and(|&c| c > 0)),
                "fault {k:?} never fired in seeds {}..={}",
                w[0].seed,
                w[99].seed
            );
        }
    }
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    for seed in [7, 1234, 987_654_321] {
        let a = run_seed(seed, Bug::None);
        let b = run_seed(seed, Bug::None);
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {seed} is not deterministic"
        );
        assert_eq!(a.events, b.events);
        assert_eq!(a.acked, b.acked);
    }
    assert_ne!(
        run_seed(1, Bug::None).trace_hash,
        run_seed(2, Bug::None).trace_hash
    );
}

fn caught(bug: Bug) -> (u64, &'static str, String) {
    for seed in 0..BUG_SEEDS {
        if let Some(v) = run_seed(seed, bug).violation {
            return (seed + 1, v.checker, v.detail);
        }
    }
    panic!("planted bug {bug:?} survived {BUG_SEEDS} seeds");
}

#[test]
fn planted_bugs_are_caught() {
    for bug in [
        Bug::AckBeforeFsync,
        Bug::FollowerAcceptsStaleEpoch,
        Bug::UnconditionalSeal,
    ] {
        let (seeds, checker, detail) = caught(bug);
        println!("planted {bug:?}: caught by \"{checker}\" after {seeds} seed(s): {detail}");
    }
}
