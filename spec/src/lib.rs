//! The `walrus-spec` crate: `DistributedWalrus.tla` and stateright models that check the same
//! invariants by driving the real `walrus-core` cluster state machines. It owns environments
//! (networks, disks, clocks, crashes, Raft ordering) and must not re-implement core rules.
//!
//! Run `cargo test -p walrus-spec -- --nocapture` for state counts; `WALRUS_SPEC_BIG=1` widens
//! the bounds.

pub mod meta_model;
pub mod replication_model;

use std::time::{Duration, Instant};

use stateright::{Checker, Model};

/// Whether the larger bounds were asked for (`WALRUS_SPEC_BIG=1`).
pub fn big() -> bool {
    std::env::var("WALRUS_SPEC_BIG").is_ok_and(|v| v == "1")
}

/// What one exhaustive run found.
#[derive(Debug)]
pub struct RunReport {
    /// States generated (with repeats).
    pub states: usize,
    /// Distinct states.
    pub unique: usize,
    /// Longest path explored.
    pub depth: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Names of properties with a discovery (counterexample for `always`, example for
    /// `sometimes`).
    pub discoveries: Vec<&'static str>,
}

/// Runs a breadth-first check to completion (or until `stop_at` is discovered) and prints a one
/// line summary under `label`.
pub fn check<M>(label: &str, model: M, stop_at: Option<&'static str>) -> RunReport
where
    M: Model + Send + Sync + 'static,
    M::State: std::fmt::Debug + std::hash::Hash + Send + Sync + 'static,
    M::Action: std::fmt::Debug,
{
    let start = Instant::now();
    let mut builder = model.checker();
    if let Some(name) = stop_at {
        builder = builder.finish_when(stateright::HasDiscoveries::AnyOf([name].into()));
    }
    let checker = builder.spawn_bfs().join();
    let mut discoveries: Vec<&'static str> = checker.discoveries().into_keys().collect();
    discoveries.sort_unstable();
    let report = RunReport {
        states: checker.state_count(),
        unique: checker.unique_state_count(),
        depth: checker.max_depth(),
        elapsed: start.elapsed(),
        discoveries,
    };
    println!(
        "[{label}] states={} unique={} depth={} time={:.2?} discoveries={:?}",
        report.states, report.unique, report.depth, report.elapsed, report.discoveries
    );
    report
}
