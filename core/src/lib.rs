//! `walrus-core`: the pure part of walrus.
//!
//! It owns formats and state machines and must never do I/O, read a clock, spawn a thread or
//! draw OS randomness: every input (bytes read from disk, time, seeds) is an argument. The shells
//! (`walrus` on Linux, `walrus-io-sim` in simulation) do the I/O and feed the results in.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod disk;
pub mod limits;
pub mod topic;
pub mod wal;
pub mod wire;
