//! The in-memory state machine of the metadata group: applies [`Command`]s to [`Metadata`].
//!
//! Every snapshot built or installed is written to `<raft dir>/snapshot` before it counts
//! (so before openraft purges the log entries it covers), and a node starts from it: openraft
//! then re-applies the log from there up to the durable committed id (see
//! [`super::LogStore`]). A state machine without a snapshot file (`StateMachine::new`, the
//! tests') keeps its snapshots in memory only.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
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
use crate::NodeDisk;
use walrus::{Disk, DiskFile};

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
    /// Where snapshots are kept (none: in memory only).
    file: Option<SnapshotFile>,
    /// The last index of the last snapshot kept (durably, with a file).
    kept_tx: watch::Sender<Option<u64>>,
}

/// The file the last snapshot is kept in: a CRC-32C of the snapshot (4 bytes, little endian),
/// then the snapshot; always replaced whole (a new file renamed over it).
struct SnapshotFile {
    disk: Arc<NodeDisk>,
    dir: PathBuf,
}

const SNAPSHOT_FILE: &str = "snapshot";

impl SnapshotFile {
    fn load(&self) -> io::Result<Option<Vec<u8>>> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let file = match self.disk.open(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
        let len = file.len()?;
        if !(4..=SNAPSHOT_DECODE_MAX_BYTES + 4).contains(&len) {
            return Err(invalid(format!(
                "{} has {len} bytes: not a snapshot",
                path.display()
            )));
        }
        let mut bytes = file.read_all()?;
        let data = bytes.split_off(4);
        let sum = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if crc32c::crc32c(&data) != sum {
            return Err(invalid(format!("{} fails its checksum", path.display())));
        }
        Ok(Some(data))
    }

    fn save(&self, data: &[u8]) -> io::Result<()> {
        let sum = crc32c::crc32c(data).to_le_bytes();
        crate::replace_file(&*self.disk, &self.dir, SNAPSHOT_FILE, &[&sum, data])
    }
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
    /// An empty state machine whose segments get `replication_factor` replicas, with its
    /// snapshots in memory only.
    pub fn new(replication_factor: usize) -> StateMachine {
        Self::with_file(replication_factor, None)
    }

    /// The state machine kept in `dir` of `disk`: as of its last snapshot there, if any
    /// (openraft re-applies the log after it).
    pub fn open(
        replication_factor: usize,
        disk: Arc<NodeDisk>,
        dir: &Path,
    ) -> io::Result<StateMachine> {
        let file = SnapshotFile {
            disk,
            dir: dir.to_path_buf(),
        };
        let data = file.load()?;
        let sm = Self::with_file(replication_factor, Some(file));
        if let Some(data) = data {
            let ((last_applied, membership, _), metadata) = decode_snapshot(&data)?;
            let meta = sm.snapshot_meta(last_applied, membership.clone());
            let mut s = sm.write_state();
            s.metadata = metadata;
            s.last_applied = last_applied;
            s.last_membership = membership;
            drop(s);
            *sm.stored_snapshot() = Some(StoredSnapshot { meta, data });
            sm.notify(last_applied);
            sm.inner.kept_tx.send_replace(last_applied.map(|l| l.index));
        }
        Ok(sm)
    }

    /// A receiver of the last index of the last snapshot kept (on disk, with a snapshot file):
    /// the log may be purged up to it, not past it (see `LogStore::purge_behind`).
    pub fn kept_snapshots(&self) -> watch::Receiver<Option<u64>> {
        self.inner.kept_tx.subscribe()
    }

    fn with_file(replication_factor: usize, file: Option<SnapshotFile>) -> StateMachine {
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
                file,
                kept_tx: watch::channel(None).0,
            }),
        }
    }

    /// The meta of a snapshot at `last_applied`, with an id unique in this process.
    fn snapshot_meta(
        &self,
        last_applied: Option<LogId<u64>>,
        membership: Membership,
    ) -> SnapshotMeta<u64, BasicNode> {
        let seq = self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(id) => format!(
                "{}-{}-{}-{seq}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => format!("none-{seq}"),
        };
        SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        }
    }

    /// Keeps `data`, the snapshot at `last`, as the last snapshot, durably when there is a
    /// snapshot file.
    fn keep_snapshot(&self, data: &[u8], last: Option<LogId<u64>>) -> io::Result<()> {
        if let Some(f) = &self.inner.file {
            f.save(data)?;
        }
        let index = last.map(|l| l.index);
        self.inner
            .kept_tx
            .send_if_modified(|kept| (*kept < index).then(|| *kept = index).is_some());
        Ok(())
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
        let meta = self.snapshot_meta(last_applied, membership);
        // Durable before openraft may purge the entries it covers.
        self.keep_snapshot(&data, meta.last_log_id)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
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
        // Durable before openraft purges the log it replaces.
        self.keep_snapshot(&data, meta.last_log_id)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
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
