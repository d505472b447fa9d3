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
