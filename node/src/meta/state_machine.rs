//! The in-memory state machine of the metadata group: applies [`Command`]s to [`Metadata`].
//!
//! It is not persisted: at startup openraft re-applies the log up to the durable committed id
//! (see [`super::LogStore`]). Snapshots are built and installed in memory only, which is enough
//! for snapshot transfer to a lagging follower and for a snapshot to round-trip.

use std::io::{self, Cursor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bincode::Options;
use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use tokio::sync::watch;
use walrus_core::cluster::metadata::{Command, Metadata, SNAPSHOT_LEN_MAX_BYTES};
use walrus_core::cluster::SegmentId;

use super::{codec, MetaResponse, TypeConfig};

/// Membership as openraft stores it.
type Membership = StoredMembership<u64, BasicNode>;

/// The metadata state machine. Cheap to clone: all clones share one state.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("last_applied", &self.last_applied())
            .finish_non_exhaustive()
    }
}

struct Inner {
    state: RwLock<Applied>,
    /// The last snapshot built or installed.
    snapshot: Mutex<Option<StoredSnapshot>>,
    /// Sends the last applied index after every apply or snapshot install.
    applied_tx: watch::Sender<u64>,
    /// Makes snapshot ids unique within the process.
    snapshot_seq: AtomicU64,
}

/// What has been applied.
struct Applied {
    metadata: Metadata,
    last_applied: Option<LogId<u64>>,
    last_membership: Membership,
    /// A watched index and, once everything up to it is applied, the next segment id as of
    /// exactly that index (see [`StateMachine::watch_index`]).
    watch: Option<(u64, Option<SegmentId>)>,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// Largest snapshot we decode: the metadata's own limit plus room for the header.
const SNAPSHOT_DECODE_MAX_BYTES: u64 = SNAPSHOT_LEN_MAX_BYTES + (1 << 20);

impl StateMachine {
    /// An empty state machine whose segments get `replication_factor` replicas.
    pub fn new(replication_factor: usize) -> StateMachine {
        let (applied_tx, _) = watch::channel(0);
        StateMachine {
            inner: Arc::new(Inner {
                state: RwLock::new(Applied {
                    metadata: Metadata::new(replication_factor),
                    last_applied: None,
                    last_membership: Membership::default(),
                    watch: None,
                }),
                snapshot: Mutex::new(None),
                applied_tx,
                snapshot_seq: AtomicU64::new(0),
            }),
        }
    }

    /// Runs `f` on the applied metadata (a synchronous read under a lock; keep `f` short).
    pub fn read<R>(&self, f: impl FnOnce(&Metadata) -> R) -> R {
        f(&self.read_state().metadata)
    }

    /// The id of the last applied log entry.
    pub fn last_applied(&self) -> Option<LogId<u64>> {
        self.read_state().last_applied
    }

    /// Reads the metadata together with the index of the last entry applied to it.
    pub fn read_applied<R>(&self, f: impl FnOnce(Option<u64>, &Metadata) -> R) -> R {
        let st = self.read_state();
        f(st.last_applied.map(|l| l.index), &st.metadata)
    }

    /// Watches `index` (the first call wins): [`StateMachine::watched_next_segment`] then
    /// gives the next segment id as the metadata stood at exactly that index, so every segment
    /// from it on was opened after it. If more than `index` is applied already, the id now
    /// (later segments count as before the index: the cautious side).
    pub fn watch_index(&self, index: u64) {
        let mut s = self.write_state();
        if s.watch.is_some() {
            return;
        }
        let reached = s.last_applied.is_some_and(|l| l.index >= index);
        let seen = reached.then(|| s.metadata.next_segment_id());
        s.watch = Some((index, seen));
    }

    /// The next segment id as of the watched index, once it is applied.
    pub fn watched_next_segment(&self) -> Option<SegmentId> {
        self.read_state().watch.and_then(|(_, seen)| seen)
    }

    /// A receiver of the last applied index, sent after every apply (and snapshot install), so
    /// callers can wait for changes. The value is 0 before anything is applied; use
    /// [`StateMachine::last_applied`] for the exact id.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.applied_tx.subscribe()
    }

    // Poisoning: `Applied` is only written by `apply_entry` and `install`, which finish every
    // update before they could panic (Metadata::apply is total and never panics), so a poisoned
    // lock still guards a consistent state.
    fn read_state(&self) -> RwLockReadGuard<'_, Applied> {
        self.inner.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, Applied> {
        self.inner.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn stored_snapshot(&self) -> std::sync::MutexGuard<'_, Option<StoredSnapshot>> {
        // An Option assignment cannot be torn by a panic.
        self.inner
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, last_applied: Option<LogId<u64>>) {
        self.inner
            .applied_tx
            .send_replace(last_applied.map_or(0, |id| id.index));
    }
}

fn apply_entry(state: &mut Applied, entry: Entry<TypeConfig>) -> MetaResponse {
    let index = entry.log_id.index;
    // The watched index lies before this entry: the metadata stands as of it now.
    if let Some((w, seen @ None)) = &mut state.watch {
        if index > *w {
            *seen = Some(state.metadata.next_segment_id());
        }
    }
    let response = apply_entry_payload(state, entry);
    if let Some((w, seen @ None)) = &mut state.watch {
        if index == *w {
            *seen = Some(state.metadata.next_segment_id());
        }
    }
    response
}

fn apply_entry_payload(state: &mut Applied, entry: Entry<TypeConfig>) -> MetaResponse {
    state.last_applied = Some(entry.log_id);
    match entry.payload {
        EntryPayload::Blank => MetaResponse { result: None },
        EntryPayload::Membership(m) => {
            state.last_membership = StoredMembership::new(Some(entry.log_id), m);
            MetaResponse { result: None }
        }
        EntryPayload::Normal(cmd) => MetaResponse {
            result: Some(apply_command(&mut state.metadata, &cmd)),
        },
    }
}

fn apply_command(
    metadata: &mut Metadata,
    cmd: &Command,
) -> Result<walrus_core::cluster::metadata::Outcome, String> {
    metadata.apply(cmd).map_err(|r| r.to_string())
}

/// Snapshot body: `(last_applied, membership, Metadata::encode_snapshot())`.
type SnapshotBody = (Option<LogId<u64>>, Membership, Vec<u8>);

fn decode_snapshot(bytes: &[u8]) -> io::Result<(SnapshotBody, Metadata)> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    if bytes.len() as u64 > SNAPSHOT_DECODE_MAX_BYTES {
        return Err(invalid(format!(
            "snapshot of {} bytes is too long",
            bytes.len()
        )));
    }
    let body: SnapshotBody = codec(SNAPSHOT_DECODE_MAX_BYTES)
        .deserialize(bytes)
        .map_err(|e| invalid(format!("corrupt snapshot: {e}")))?;
    let metadata = Metadata::decode_snapshot(&body.2)
        .map_err(|e| invalid(format!("corrupt snapshot: {e}")))?;
    Ok((body, metadata))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let (last_applied, membership, metadata) = {
            let s = self.read_state();
            (
                s.last_applied,
                s.last_membership.clone(),
                s.metadata.encode_snapshot(),
            )
        };
        let body: SnapshotBody = (last_applied, membership.clone(), metadata);
        let data = codec(SNAPSHOT_DECODE_MAX_BYTES)
            .serialize(&body)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let seq = self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(id) => format!(
                "{}-{}-{}-{seq}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        *self.stored_snapshot() = Some(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, Membership), StorageError<u64>> {
        let s = self.read_state();
        Ok((s.last_applied, s.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (responses, last_applied) = {
            let mut s = self.write_state();
            let responses: Vec<MetaResponse> = entries
                .into_iter()
                .map(|e| apply_entry(&mut s, e))
                .collect();
            (responses, s.last_applied)
        };
        if !responses.is_empty() {
            self.notify(last_applied);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let ((last_applied, _, _), metadata) = decode_snapshot(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        if last_applied != meta.last_log_id {
            let e = io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "snapshot body is at {last_applied:?} but its meta says {:?}",
                    meta.last_log_id
                ),
            );
            return Err(StorageIOError::read_snapshot(Some(meta.signature()), &e).into());
        }
        {
            let mut s = self.write_state();
            s.metadata = metadata;
            s.last_applied = meta.last_log_id;
            s.last_membership = meta.last_membership.clone();
            // A snapshot past the watched index: the id now (the cautious side).
            let next = s.metadata.next_segment_id();
            let at = meta.last_log_id.map_or(0, |l| l.index);
            if let Some((w, seen @ None)) = &mut s.watch {
                if at >= *w {
                    *seen = Some(next);
                }
            }
        }
        *self.stored_snapshot() = Some(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        self.notify(meta.last_log_id);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        Ok(self.stored_snapshot().clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
