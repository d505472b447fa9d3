//! `walrus-io-sim`: the simulated shell. Today it holds [`SimDisk`], a deterministic,
//! fault-injecting implementation of `walrus_core::disk::Disk` over memory. madsim's own file
//! system cannot simulate a crash (its fsync is a no-op), so this one models durability itself.
//!
//! Model: every file has durable bytes and a list of pending (unsynced) operations; reads see
//! both. `sync_data` makes a file's pending operations durable, or, when a sync fault fires,
//! fails with EIO and *drops* them (they stay visible until the next crash, then vanish, as with
//! Linux after a failed fsync). [`SimDisk::crash`] keeps, per file, either a random prefix of
//! the pending writes with the next one torn at a 512-byte boundary, or a random subset of
//! their 512-byte sectors; directory entries created or removed since the last `sync_dir` may
//! or may not survive. Every choice comes from the seed, so a run replays exactly.
#![forbid(unsafe_code)]

mod disk;

pub use disk::{SimDisk, SimFaults, SimFile};
