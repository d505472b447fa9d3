//! The Raft log store of the metadata group, durable on our own WAL.
//!
//! Layout: one [`Walrus`] instance (fsync before every append returns) in `<dir>/raft`, with
//! three append-only topics:
//! - `log`: bincode [`LogRecord`]s (an entry, a truncation or a purge), replayed in order at
//!   open to rebuild the in-memory log;
//! - `vote`: bincode `Vote`s, the last one wins;
//! - `committed`: bincode `Option<LogId>`s, the last one wins.
//!
//! Every write goes to disk (and is fsynced) on a blocking thread before the in-memory state is
//! updated, and writers are serialized by the WAL mutex, so the memory is always the replay of
//! what is durable. Reads are served from memory.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bincode::Options;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};
use walrus::{Disk, FsyncSchedule, ReadConsistency, Walrus};

use crate::NodeDisk;

use super::{codec, TypeConfig, RECORD_LEN_MAX_BYTES};

/// WAL topic of the log records.
const TOPIC_LOG: &str = "log";
/// WAL topic of the votes.
const TOPIC_VOTE: &str = "vote";
/// WAL topic of the committed log ids.
const TOPIC_COMMITTED: &str = "committed";
/// Namespace (subdirectory) of the WAL inside the store directory.
const WAL_KEY: &str = "raft";
/// Most records written in one atomic `batch_append` (the engine's batch limit).
const BATCH_ENTRIES_MAX: usize = walrus_core::limits::BATCH_ENTRIES_MAX;
/// Most bytes written in one `batch_append`.
const BATCH_BYTES_MAX: usize = 512 << 20;
/// Records read per call while replaying.
const REPLAY_ENTRIES_PER_READ: usize = 1024;

/// Store directories open in this process: a second `open` of the same directory would have
/// two engines writing the same files.
static OPEN_DIRS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// One record of the `log` topic (decoding side).
#[derive(Debug, Deserialize)]
enum LogRecord {
    /// An appended entry (replaces any entry at its index).
    Entry(Entry<TypeConfig>),
    /// Every entry at or above `since` was deleted.
    Truncate { since: u64 },
    /// Every entry at or below this id was deleted; it is the new last purged id.
    Purge(LogId<u64>),
}

/// The encoding side of [`LogRecord`]: same variants in the same order, so the same bytes.
#[derive(Debug, Serialize)]
enum LogRecordRef<'a> {
    Entry(&'a Entry<TypeConfig>),
    Truncate { since: u64 },
    Purge(LogId<u64>),
}

/// The Raft log and vote of the metadata group. Cheap to clone (all clones share one store);
/// its `LogReader` is a clone.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.shared.guard.as_ref().map(|g| &g.0))
            .finish_non_exhaustive()
    }
}

/// Fields drop in declaration order: the engine is closed before the directory is released.
struct Shared {
    /// The engine; its mutex serializes writers (held across the disk write, on a blocking
    /// thread only).
    wal: Mutex<Walrus<NodeDisk>>,
    /// The replay of everything durable.
    mem: Mutex<Mem>,
    /// Releases the directory on drop (none on a simulated disk, private to its node).
    guard: Option<DirGuard>,
}

#[derive(Default)]
struct Mem {
    log: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<u64>>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
}

/// Membership of a directory in [`OPEN_DIRS`].
struct DirGuard(PathBuf);

impl DirGuard {
    #[cfg_attr(madsim, allow(dead_code))]
    fn acquire(dir: PathBuf) -> io::Result<DirGuard> {
        let mut open = OPEN_DIRS.lock().unwrap_or_else(|p| p.into_inner());
        if !open.get_or_insert_with(HashSet::new).insert(dir.clone()) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("raft log store {} is already open", dir.display()),
            ));
        }
        Ok(DirGuard(dir))
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        // A poisoned set is still a valid set (insert/remove cannot be torn).
        let mut open = OPEN_DIRS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = open.as_mut() {
            set.remove(&self.0);
        }
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    codec(RECORD_LEN_MAX_BYTES)
        .serialize(value)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> io::Result<T> {
    if bytes.len() as u64 > RECORD_LEN_MAX_BYTES {
        return Err(invalid(format!(
            "{what} record of {} bytes is too long",
            bytes.len()
        )));
    }
    codec(RECORD_LEN_MAX_BYTES)
        .deserialize(bytes)
        .map_err(|e| invalid(format!("corrupt {what} record: {e}")))
}

/// Every record of `topic`, in order.
fn read_all(wal: &Walrus<NodeDisk>, topic: &str) -> io::Result<Vec<Vec<u8>>> {
    let end = wal.entry_count(topic);
    let mut out = Vec::new();
    let mut at = wal.first_offset(topic);
    if at != 0 {
        return Err(invalid(format!(
            "topic {topic} starts at {at}: records were reclaimed"
        )));
    }
    while at < end {
        let got = wal.read_from(
            topic,
            at,
            REPLAY_ENTRIES_PER_READ,
            RECORD_LEN_MAX_BYTES as usize,
        )?;
        if got.is_empty() {
            return Err(invalid(format!("topic {topic}: record {at} is unreadable")));
        }
        at += got.len() as u64;
        out.extend(got.into_iter().map(|e| e.data));
    }
    Ok(out)
}

/// The last record of `topic`, if any.
fn read_last(wal: &Walrus<NodeDisk>, topic: &str) -> io::Result<Option<Vec<u8>>> {
    let end = wal.entry_count(topic);
    if end == 0 {
        return Ok(None);
    }
    let mut got = wal.read_from(topic, end - 1, 1, usize::MAX)?;
    match got.pop() {
        Some(e) => Ok(Some(e.data)),
        None => Err(invalid(format!(
            "topic {topic}: last record {} is unreadable",
            end - 1
        ))),
    }
}

impl Mem {
    fn apply(&mut self, rec: LogRecord) {
        match rec {
            LogRecord::Entry(e) => {
                self.log.insert(e.log_id.index, e);
            }
            LogRecord::Truncate { since } => self.truncate(since),
            LogRecord::Purge(id) => self.purge(id),
        }
    }

    fn truncate(&mut self, since: u64) {
        drop(self.log.split_off(&since));
    }

    fn purge(&mut self, id: LogId<u64>) {
        self.log = match id.index.checked_add(1) {
            Some(keep_from) => self.log.split_off(&keep_from),
            None => BTreeMap::new(),
        };
        self.last_purged = Some(id);
    }

    fn last_log_id(&self) -> Option<LogId<u64>> {
        self.log
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(self.last_purged)
    }
}

impl Shared {
    fn mem(&self) -> io::Result<MutexGuard<'_, Mem>> {
        self.mem
            .lock()
            .map_err(|_| io::Error::other("raft log store state poisoned by a panic"))
    }

    fn wal(&self) -> io::Result<MutexGuard<'_, Walrus<NodeDisk>>> {
        self.wal
            .lock()
            .map_err(|_| io::Error::other("raft log store engine poisoned by a panic"))
    }

    /// Writes `entries` (in batches of at most [`BATCH_ENTRIES_MAX`] records and
    /// [`BATCH_BYTES_MAX`] bytes; each batch is atomic and fsynced), then makes them visible.
    fn append(&self, entries: Vec<Entry<TypeConfig>>) -> io::Result<()> {
        let wal = self.wal()?;
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            encoded.push(encode(&LogRecordRef::Entry(e))?);
        }
        let mut entries = entries.into_iter();
        let mut records = encoded.iter().peekable();
        while records.peek().is_some() {
            let mut batch: Vec<&[u8]> = Vec::new();
            let mut bytes = 0usize;
            while let Some(r) = records.peek() {
                if !batch.is_empty()
                    && (batch.len() >= BATCH_ENTRIES_MAX || bytes + r.len() > BATCH_BYTES_MAX)
                {
                    break;
                }
                bytes += r.len();
                batch.push(r.as_slice());
                records.next();
            }
            wal.batch_append(TOPIC_LOG, &batch)?;
            let mut mem = self.mem()?;
            for e in entries.by_ref().take(batch.len()) {
                mem.log.insert(e.log_id.index, e);
            }
        }
        Ok(())
    }

    fn write_log_record(&self, rec: LogRecordRef<'_>) -> io::Result<()> {
        let wal = self.wal()?;
        wal.append(TOPIC_LOG, &encode(&rec)?)?;
        let mut mem = self.mem()?;
        match rec {
            LogRecordRef::Truncate { since } => mem.truncate(since),
            LogRecordRef::Purge(id) => mem.purge(id),
            LogRecordRef::Entry(e) => {
                mem.log.insert(e.log_id.index, e.clone());
            }
        }
        Ok(())
    }

    fn save_vote(&self, vote: Vote<u64>) -> io::Result<()> {
        let wal = self.wal()?;
        wal.append(TOPIC_VOTE, &encode(&vote)?)?;
        self.mem()?.vote = Some(vote);
        Ok(())
    }

    fn save_committed(&self, committed: Option<LogId<u64>>) -> io::Result<()> {
        let wal = self.wal()?;
        wal.append(TOPIC_COMMITTED, &encode(&committed)?)?;
        self.mem()?.committed = committed;
        Ok(())
    }
}

impl LogStore {
    /// Opens (creating if needed) the store in `dir` and replays it. Fails with
    /// `AlreadyExists` if the directory is open in this process already, and with
    /// `InvalidData` if a record is corrupt.
    #[cfg(not(madsim))]
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let guard = DirGuard::acquire(dir.canonicalize()?)?;
        let disk = Arc::new(walrus::LinuxDisk::new(walrus::Backend::IoUring));
        Self::open_with(disk, dir, Some(guard))
    }

    /// Opens the store in `dir` of a disk private to this node (the simulation's).
    pub fn open_on(disk: Arc<NodeDisk>, dir: &Path) -> io::Result<LogStore> {
        Self::open_with(disk, dir, None)
    }

    fn open_with(disk: Arc<NodeDisk>, dir: &Path, guard: Option<DirGuard>) -> io::Result<LogStore> {
        disk.create_dir_all(dir)?;
        let wal = Walrus::builder()
            .data_dir(dir)
            .key(WAL_KEY)
            .fsync_schedule(FsyncSchedule::SyncEach)
            .consistency(ReadConsistency::StrictlyAtOnce)
            .reclaim_consumed(false)
            .inline_commit(crate::INLINE_COMMIT)
            .build_on(disk)?;

        let mut mem = Mem::default();
        for bytes in read_all(&wal, TOPIC_LOG)? {
            mem.apply(decode::<LogRecord>(&bytes, "log")?);
        }
        if let Some(bytes) = read_last(&wal, TOPIC_VOTE)? {
            mem.vote = Some(decode(&bytes, "vote")?);
        }
        if let Some(bytes) = read_last(&wal, TOPIC_COMMITTED)? {
            mem.committed = decode(&bytes, "committed")?;
        }
        check_contiguous(&mem)?;
        tracing::info!(
            dir = %dir.display(),
            entries = mem.log.len(),
            last_purged = ?mem.last_purged,
            last_log = ?mem.last_log_id(),
            vote = ?mem.vote,
            committed = ?mem.committed,
            "raft log store opened"
        );
        Ok(LogStore {
            shared: Arc::new(Shared {
                wal: Mutex::new(wal),
                mem: Mutex::new(mem),
                guard,
            }),
        })
    }

    /// Runs a write on a blocking thread (the engine blocks until fsync). The write completes
    /// even if the caller's future is dropped, and writers stay serialized by the WAL mutex.
    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> io::Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        // Under the simulator this runs as an ordinary task (no threads there).
        #[cfg_attr(madsim, allow(deprecated))]
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(io::Error::other)?
    }

    fn mem(&self) -> io::Result<MutexGuard<'_, Mem>> {
        self.shared.mem()
    }
}

fn read_err(e: io::Error) -> StorageError<u64> {
    StorageIOError::read_logs(&e).into()
}

/// The replayed log must have no holes (openraft never writes one).
fn check_contiguous(mem: &Mem) -> io::Result<()> {
    let mut prev = mem.last_purged.map(|id| id.index);
    for &index in mem.log.keys() {
        if let Some(p) = prev {
            if Some(index) != p.checked_add(1) {
                return Err(invalid(format!(
                    "log has a hole: entry {index} follows {p}"
                )));
            }
        }
        prev = Some(index);
    }
    Ok(())
}

/// `[start, end)` of a range of indexes, `end == None` meaning unbounded; `None` if empty.
fn index_range<RB: RangeBounds<u64>>(range: &RB) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if start >= end => None,
        _ => Some((start, end)),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let Some((start, end)) = index_range(&range) else {
            return Ok(Vec::new());
        };
        let mem = self.mem().map_err(read_err)?;
        let found = match end {
            Some(end) => mem.log.range(start..end).map(|(_, e)| e.clone()).collect(),
            None => mem.log.range(start..).map(|(_, e)| e.clone()).collect(),
        };
        Ok(found)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let mem = self.mem().map_err(read_err)?;
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: mem.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let vote = *vote;
        self.blocking(move |s| s.save_vote(vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.mem().map_err(read_err)?.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        self.blocking(move |s| s.save_committed(committed))
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.mem().map_err(read_err)?.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        match self.blocking(move |s| s.append(entries)).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e).into();
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let since = log_id.index;
        self.blocking(move |s| s.write_log_record(LogRecordRef::Truncate { since }))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.blocking(move |s| s.write_log_record(LogRecordRef::Purge(log_id)))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};
    use walrus_core::cluster::metadata::Command;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Command::CreateTopic {
                name: format!("t{index}"),
            }),
        }
    }

    #[test]
    fn record_ref_encodes_like_record() {
        let e = entry(3, 7);
        let bytes = encode(&LogRecordRef::Entry(&e)).unwrap();
        match decode::<LogRecord>(&bytes, "log").unwrap() {
            LogRecord::Entry(d) => assert_eq!(d, e),
            other => panic!("decoded {other:?}"),
        }
        let bytes = encode(&LogRecordRef::Truncate { since: 9 }).unwrap();
        assert!(matches!(
            decode::<LogRecord>(&bytes, "log").unwrap(),
            LogRecord::Truncate { since: 9 }
        ));
        let id = LogId::new(CommittedLeaderId::new(2, 1), 4);
        let bytes = encode(&LogRecordRef::Purge(id)).unwrap();
        assert!(matches!(
            decode::<LogRecord>(&bytes, "log").unwrap(),
            LogRecord::Purge(d) if d == id
        ));
    }

    #[test]
    fn corrupt_records_are_errors() {
        let e = entry(3, 7);
        let bytes = encode(&LogRecordRef::Entry(&e)).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode::<LogRecord>(&bytes[..cut], "log").is_err());
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode::<LogRecord>(&trailing, "log").is_err());
        // A huge length prefix is refused by the limit, not allocated.
        let mut huge = vec![0u8; 4];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<LogRecord>(&huge, "log").is_err());
        assert!(decode::<LogRecord>(&[9, 0, 0, 0], "log").is_err());
    }

    #[test]
    #[allow(clippy::reversed_empty_ranges)] // empty ranges are what is tested
    fn index_ranges() {
        assert_eq!(index_range(&(3..3)), None);
        assert_eq!(index_range(&(4..3)), None);
        assert_eq!(index_range(&(3..=3)), Some((3, Some(4))));
        assert_eq!(index_range(&(..)), Some((0, None)));
        assert_eq!(index_range(&(5..)), Some((5, None)));
        assert_eq!(index_range(&(0..=u64::MAX)), Some((0, None)));
        assert_eq!(
            index_range(&(Bound::Excluded(u64::MAX), Bound::Unbounded)),
            None
        );
        assert_eq!(index_range(&(Bound::Excluded(5), Bound::Excluded(5))), None);
    }

    #[test]
    fn open_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        let err = LogStore::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        drop(store);
        LogStore::open(dir.path()).unwrap();
    }

    #[test]
    fn large_append_is_chunked_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let n = 2 * BATCH_ENTRIES_MAX as u64 + 17;
        {
            let store = LogStore::open(dir.path()).unwrap();
            store
                .shared
                .append((0..n).map(|i| entry(1, i)).collect())
                .unwrap();
            assert_eq!(store.shared.mem().unwrap().log.len() as u64, n);
        }
        let store = LogStore::open(dir.path()).unwrap();
        let mem = store.shared.mem().unwrap();
        assert_eq!(mem.log.len() as u64, n);
        assert_eq!(mem.last_log_id(), Some(entry(1, n - 1).log_id));
        assert_eq!(mem.log.get(&1234), Some(&entry(1, 1234)));
    }

    #[test]
    fn corrupt_record_on_disk_fails_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LogStore::open(dir.path()).unwrap();
            store.shared.append(vec![entry(1, 0)]).unwrap();
            store
                .shared
                .wal()
                .unwrap()
                .append(TOPIC_LOG, b"junk")
                .unwrap();
        }
        let err = LogStore::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
