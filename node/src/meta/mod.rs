//! Raft storage of the metadata group: the Raft log and vote, stored durably on our own WAL
//! ([`LogStore`]), and the in-memory state machine that applies
//! [`walrus_core::cluster::metadata::Command`]s to [`Metadata`] ([`StateMachine`]).
//!
//! The state machine is not persisted: [`LogStore`] keeps the committed log id durable
//! (`save_committed`), so openraft re-applies the log up to it at startup. This requires that the
//! log is never purged (run with `SnapshotPolicy::Never`), or that a snapshot is installed.
//!
//! [`Metadata`]: walrus_core::cluster::metadata::Metadata

use std::io::Cursor;

use serde::{Deserialize, Serialize};
use walrus_core::cluster::metadata::{Command, Outcome};

mod state_machine;
mod store;

pub use state_machine::StateMachine;
pub use store::LogStore;

/// A Raft node id of the metadata group.
pub type NodeId = u64;

/// What applying one log entry returned.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetaResponse {
    /// `None` for blank and membership entries; for a command, its outcome or the rejection
    /// rendered as a string (a rejection is a normal, replicated result, not an error of Raft).
    pub result: Option<Result<Outcome, String>>,
}

#[cfg(not(madsim))]
type Runtime = openraft::TokioRuntime;
#[cfg(madsim)]
type Runtime = crate::runtime::MadsimRuntime;

openraft::declare_raft_types!(
    /// The openraft type configuration of the metadata group.
    pub TypeConfig:
        D = Command,
        R = MetaResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = Runtime,
);

/// The Raft instance of the metadata group.
pub type Raft = openraft::Raft<TypeConfig>;

/// Largest record (log entry, vote, committed id, snapshot header) we encode or decode, in bytes.
pub(crate) const RECORD_LEN_MAX_BYTES: u64 = 64 << 20;

/// The bincode options of every on-disk record: fixed-size integers, bounded length, and no
/// trailing bytes (a record is exactly one value).
pub(crate) fn codec(limit: u64) -> impl bincode::Options + Copy {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(limit)
}

#[cfg(test)]
mod tests;
