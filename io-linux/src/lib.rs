//! `walrus`: the walrus storage engine as an embedded library, on real Linux files.
//!
//! Source-compatible with the public API of `walrus-rust` 0.2 (`Walrus::new`,
//! `append_for_topic`, `batch_append_for_topic`, `read_next`, `batch_read_for_topic`, …) plus a
//! builder, reads by entry offset, entry counts and topic listing.
//!
//! ```no_run
//! use walrus::{FsyncSchedule, ReadConsistency, Walrus};
//! # fn main() -> std::io::Result<()> {
//! let wal = Walrus::builder()
//!     .data_dir("./my_wal")
//!     .consistency(ReadConsistency::StrictlyAtOnce)
//!     .fsync_schedule(FsyncSchedule::SyncEach)
//!     .build()?;
//! wal.append_for_topic("events", b"hello")?;
//! let entry = wal.read_next("events", true)?.expect("one entry");
//! assert_eq!(entry.data, b"hello");
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - `FsyncSchedule::SyncEach`: an append returns only once its entry is durable (written and
//!   `fdatasync`ed; concurrent appenders share one flush through the group commit). Readers only
//!   see durable entries.
//! - `FsyncSchedule::Milliseconds(n)`: a background thread syncs every `n` ms, so at most the
//!   appends of the last `n` ms (plus one sync's duration) can be lost on power failure. A crash
//!   of the process alone loses nothing that an append returned for.
//! - `FsyncSchedule::NoFsync`: nothing is ever synced; the OS decides.
//! - `batch_append_for_topic` is atomic across a crash: after recovery all of a batch is visible
//!   or none of it.
//! - `batch_append_begin` assigns a batch its offsets at once (in call order) and returns a
//!   [`PendingAppend`]: `wait()` blocks until it is stored (durable under `SyncEach`), and
//!   `done().await` is the same for async callers, without blocking their thread. The write
//!   completes whether or not anyone waits.
//! - `ReadConsistency::StrictlyAtOnce`: a checkpointed read (`checkpoint = true`) is persisted
//!   before the entry is returned, so it is never delivered twice, even across a crash.
//! - `ReadConsistency::AtLeastOnce { persist_every }`: the cursor is persisted every
//!   `persist_every` checkpointed entries; a crash may redeliver fewer than that many entries but
//!   never skips one.
//! - Cursors are stored as entry offsets, so they stay right when consumed segment files are
//!   reclaimed. A persisted cursor never points past durable data.
//! - Write and fsync errors are returned to the caller; after one, the topic rewinds to its last
//!   good entry, so a full disk loses nothing already acknowledged.
//!
//! Two instances with different settings in one process do not interfere: all configuration is
//! per instance (environment variables are read once, by the constructor).
#![warn(missing_docs)]

mod disk;
mod engine;
mod walrus;

pub use crate::disk::{Backend, LinuxDisk, LinuxFile};
pub use crate::engine::{NotAtOffset, PendingAppend};
pub use crate::walrus::{Walrus, WalrusBuilder};
pub use walrus_core::disk::{Disk, DiskFile};

/// One entry read back from a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The bytes appended, exactly.
    pub data: Vec<u8>,
}

/// When a reader's checkpointed position is persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Persist the cursor on every checkpointed read, before returning the entry.
    StrictlyAtOnce,
    /// Persist the cursor every `persist_every` checkpointed entries.
    AtLeastOnce {
        /// Checkpointed entries between two persisted cursors (0 is treated as 1).
        persist_every: u32,
    },
}

/// When appended data is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncSchedule {
    /// Sync in the background every this many milliseconds.
    Milliseconds(u64),
    /// Sync before every append returns (group commit).
    SyncEach,
    /// Never sync.
    NoFsync,
}
