//! Tier B: the real `walrus-node` on the madsim simulator, one seed at a time.
//!
//! Built and run only with `RUSTFLAGS="--cfg madsim"` in its own target directory:
//!
//! * `make sim` runs the seed sweep (`SIMB_SEEDS=<n>`, default 500; `SIMB_FIRST=<n>` first seed).
//! * `SIMB_SEED=<n> make sim` replays one seed and prints its event trace.
#![cfg(madsim)]

use std::collections::BTreeMap;
use std::time::Instant;

use sim_tests::cluster::{
    replay_command, run_cluster_seed, ClusterConfig, ClusterFault, ClusterReport, Planted,
};

/// Each seed must acknowledge at least this many PUTs ("nothing happened" cannot pass).
const MIN_ACKED: u64 = 20;
/// The planted bug must be caught within this many seeds.
const BUG_SEEDS: u64 = 40;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn judge(r: &ClusterReport) -> Option<String> {
    let cfg = ClusterConfig::from_seed(r.seed, Planted::None);
    if let Some(v) = &r.violation {
        return Some(format!(
            "seed {} broke \"{}\": {}\n  {cfg}\n  replay: {}",
            r.seed,
            v.checker,
            v.detail,
            replay_command(r.seed)
        ));
    }
    if r.acked < MIN_ACKED || r.total_faults() == 0 {
        return Some(format!(
            "seed {}: coverage too low (acked {}, faults {})\n  {cfg}\n  replay: {}",
            r.seed,
            r.acked,
            r.total_faults(),
            replay_command(r.seed)
        ));
    }
    None
}

/// Runs `seeds` on two threads (one simulator each); reports in seed order.
fn run_many(seeds: std::ops::Range<u64>, planted: Planted) -> Vec<ClusterReport> {
    let threads = 2u64;
    let (lo, hi) = (seeds.start, seeds.end);
    let mut out: Vec<ClusterReport> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (lo..hi)
                        .filter(|x| x % threads == t)
                        .map(|x| run_cluster_seed(x, planted))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    out.sort_by_key(|r| r.seed);
    out
}

#[test]
fn cluster_swarm() {
    if let Some(seed) = env_u64("SIMB_SEED") {
        let cfg = ClusterConfig::from_seed(seed, Planted::None);
        println!("{cfg}");
        let r = run_cluster_seed(seed, Planted::None);
        println!("{r:#?}");
        if let Some(problem) = judge(&r) {
            panic!("{problem}");
        }
        return;
    }
    let first = env_u64("SIMB_FIRST").unwrap_or(0);
    let n = env_u64("SIMB_SEEDS").unwrap_or(500);
    let started = Instant::now();
    let reports = run_many(first..first + n, Planted::None);
    let secs = started.elapsed().as_secs_f64();
    let mut faults: BTreeMap<ClusterFault, u64> = BTreeMap::new();
    let (mut acked, mut delivered, mut failures, mut leaders, mut seals, mut lost, mut syncs) =
        (0, 0, 0, 0, 0, 0, 0);
    let mut sim_ms = 0;
    for r in &reports {
        for (k, v) in &r.faults {
            *faults.entry(*k).or_default() += v;
        }
        acked += r.acked;
        delivered += r.delivered;
        failures += r.put_failures;
        leaders += r.raft_leaders;
        seals += r.seals;
        lost += r.writes_lost;
        syncs += r.sync_errors;
        sim_ms += r.sim_ms;
    }
    println!(
        "Tier B: {n} seeds ({first}..{}) in {secs:.1} s ({:.2} seeds/s, {:.0} simulated s); \
         {acked} PUTs acknowledged, {failures} failed, {delivered} entries delivered; \
         {leaders} metadata leaders (elections), {seals} segments sealed; crashes lost or tore \
         {lost} unsynced writes; {syncs} fsyncs failed; faults {faults:?}",
        first + n,
        n as f64 / secs,
        sim_ms as f64 / 1000.0
    );
    let problems: Vec<String> = reports.iter().filter_map(judge).collect();
    assert!(
        problems.is_empty(),
        "{} of {n} seeds failed:\n{}",
        problems.len(),
        problems.join("\n")
    );
    if n >= 100 {
        for kind in ClusterFault::ALL {
            assert!(
                faults.get(&kind).copied().unwrap_or(0) > 0,
                "over {n} seeds the fault {kind:?} never fired"
            );
        }
    }
}

#[test]
fn cluster_runs_are_deterministic() {
    let seed = env_u64("SIMB_DET_SEED").unwrap_or(7);
    let a = run_cluster_seed(seed, Planted::None);
    let b = run_cluster_seed(seed, Planted::None);
    assert_eq!(
        (a.trace_hash, a.acked, a.delivered, &a.faults),
        (b.trace_hash, b.acked, b.delivered, &b.faults),
        "seed {seed} ran differently twice; replay: {}",
        replay_command(seed)
    );
    assert!(a.acked > 0, "seed {seed} acknowledged nothing");
}

#[test]
fn planted_ack_before_fsync_is_caught() {
    for seed in 0..BUG_SEEDS {
        let r = run_cluster_seed(seed, Planted::AckBeforeFsync);
        if let Some(v) = r.violation {
            println!(
                "planted ack-before-fsync caught at seed {seed}: {}: {}",
                v.checker, v.detail
            );
            return;
        }
    }
    panic!("acknowledging before fsync went unnoticed for {BUG_SEEDS} seeds");
}
