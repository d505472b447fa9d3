//! Tier B: the real `walrus-node` on the madsim simulator, one seed at a time.
//!
//! Built and run only with `RUSTFLAGS="--cfg madsim"` in its own target directory:
//!
//! * `make sim` runs the seed sweep (`SIMB_SEEDS=<n>`, default 500; `SIMB_FIRST=<n>` first seed).
//! * `SIMB_SEED=<n> make sim` replays one seed and prints its event trace.
#![cfg(madsim)]

use std::collections::BTreeMap;
use std::process::Command;
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

/// Set in a child process: the one seed it runs (`<seed>:<planted>`).
const CHILD_ENV: &str = "SIMB_CHILD";
/// The line a child prints its report on.
const REPORT_PREFIX: &str = "SIMB_REPORT ";

fn planted_name(p: Planted) -> &'static str {
    match p {
        Planted::None => "none",
        Planted::AckBeforeFsync => "ack-before-fsync",
    }
}

/// Runs one seed in a fresh process of this test binary. Every run then starts from the same
/// process state (tokio seeds its `select!` randomness from a process-wide counter), so a seed
/// replays exactly, whichever seeds ran before it.
fn run_isolated(seed: u64, planted: Planted) -> ClusterReport {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args(["child_seed", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{seed}:{}", planted_name(planted)))
        .env_remove("SIMB_SEED")
        .env_remove("SIMB_VERBOSE")
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot start a simulation process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The harness may print the test's name on the same line first.
    let report = stdout
        .lines()
        .find_map(|l| l.find(REPORT_PREFIX).map(|i| &l[i + REPORT_PREFIX.len()..]));
    if let Some(line) = report {
        if let Ok(r) = serde_json::from_str::<ClusterReport>(line) {
            return r;
        }
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
    ClusterReport {
        seed,
        violation: Some(sim_tests::cluster::Violation {
            checker: "the simulation completes".into(),
            detail: format!(
                "the run crashed ({}): {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        }),
        ..ClusterReport::default()
    }
}

/// The child side of [`run_isolated`]: does nothing unless `SIMB_CHILD` names a seed.
#[test]
fn child_seed() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (seed, planted) = spec
        .split_once(':')
        .expect("SIMB_CHILD is <seed>:<planted>");
    let planted = match planted {
        "ack-before-fsync" => Planted::AckBeforeFsync,
        _ => Planted::None,
    };
    let r = run_cluster_seed(seed.parse().expect("a numeric seed"), planted);
    println!(
        "\n{REPORT_PREFIX}{}",
        serde_json::to_string(&r).expect("a report serializes")
    );
}

/// Runs `seeds` two at a time (one process each); reports in seed order.
fn run_many(seeds: std::ops::Range<u64>, planted: Planted) -> Vec<ClusterReport> {
    sim_tests::run_seeds(seeds, 2, |x| run_isolated(x, planted))
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
    let (mut sim_ms, mut failovers, mut moves) = (0, 0, 0);
    for r in &reports {
        failovers += r.failovers;
        moves += r.replica_moves;
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
         {leaders} metadata leaders (elections), {seals} segments sealed ({failovers} by failover), {moves} sealed replicas moved; crashes lost or tore \
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

/// Seeds that found real bugs, each pinned as a regression test (seed numbers refer to the
/// simulator as of the fix; they keep running whatever the schedule has become).
const REGRESSIONS: &[(u64, &str)] = &[
    (
        1,
        "GET answered ERR after its cursor claim committed: an entry was skipped",
    ),
    (
        9,
        "a cancelled peer RPC left its answer on a pooled connection for the next call",
    ),
    (
        16,
        "a node whose Raft stopped on an fsync error kept serving as a zombie",
    ),
    (
        40,
        "a fresh metadata leader granted a lease on a segment its predecessor had sealed",
    ),
    (298, "the same lease-after-seal race, on another schedule"),
    (445, "the same lease-after-seal race, with partitions"),
    (
        1464,
        "a restarted leader appended past a seal its previous process had proposed",
    ),
    (
        82,
        "a replica restarted after a fence forgot it, and the old leader reached a quorum \
         past the seal the fence quorum had decided",
    ),
    (
        731,
        "a leader that lost its disk took its open segment up again, unchecked, on a boot \
         index from a deposed Raft leader's append",
    ),
    (
        1422,
        "a node that lost its disk took Raft appends from a deposed leader, which then \
         committed over entries a newer term had committed with the node's earlier help",
    ),
    (
        1196,
        "a segment file whose creation failed to sync was adopted by the next process: a \
         power loss then took a node's whole Raft log",
    ),
    (
        1948,
        "openraft purged the log behind an installed snapshot before the state machine had \
         kept it, and the install failed: the node could never start again",
    ),
    (
        5943,
        "a recovery sealed an unacknowledged tail only the old leader held, which then lost \
         its disk: readers stopped at the segment for good",
    ),
    (
        10917,
        "the same tail sealed on one replica, on another schedule",
    ),
    (
        14422,
        "openraft replicated log entries after a purged range head as if contiguous: the \
         follower panicked on the gap",
    ),
    (
        14944,
        "a 2-replica segment sealed on one copy after 1 s of the other being unreachable; \
         that copy's disk was then lost",
    ),
];

#[test]
fn cluster_regressions() {
    let mut failed = Vec::new();
    for &(seed, bug) in REGRESSIONS {
        let r = run_isolated(seed, Planted::None);
        if let Some(problem) = judge(&r) {
            failed.push(format!("regression of \"{bug}\":\n{problem}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn cluster_runs_are_deterministic() {
    let seed = env_u64("SIMB_DET_SEED").unwrap_or(7);
    let a = run_isolated(seed, Planted::None);
    let b = run_isolated(seed, Planted::None);
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
        let r = run_isolated(seed, Planted::AckBeforeFsync);
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
