//! The `sim-tests` crate: deterministic fault-injection runs of the whole cluster (Tier A).
//!
//! A single-threaded discrete-event [`world::World`] drives the real `walrus_core::cluster`
//! machines (metadata, leases, rollover gate, shared cursor, segment leader / follower /
//! recovery) over a simulated network, simulated disks and skewed clocks. One `u64` seed derives
//! everything ([`config::SimConfig::from_seed`]); [`checkers`] hold one safety property each.
//! Replay a seed with `SIM_SEED=<n> cargo test -p sim-tests -- --nocapture`.

pub mod checkers;
#[cfg(madsim)]
pub mod cluster;
pub mod config;
pub mod rng;
pub mod world;

pub use config::SimConfig;
pub use world::{run_seed, Bug, FaultKind, RunReport};

/// Runs `f` on every seed of `seeds`, spread over `threads` threads (seed `x` on thread
/// `x % threads`); the results come back in seed order.
pub fn run_seeds<R: Send>(
    seeds: std::ops::Range<u64>,
    threads: u64,
    f: impl Fn(u64) -> R + Sync,
) -> Vec<R> {
    let threads = threads.max(1);
    let f = &f;
    let mut out: Vec<(u64, R)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let seeds = seeds.clone();
                s.spawn(move || {
                    seeds
                        .filter(|x| x % threads == t)
                        .map(|x| (x, f(x)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    out.sort_by_key(|(x, _)| *x);
    out.into_iter().map(|(_, r)| r).collect()
}
