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
//!
//! Compaction: once openraft purges entries (they are in a persisted snapshot, see
//! [`super::StateMachine`]) and the topics hold far more records than are live, the live state
//! (the purge point, the entries left, the vote and the committed id) is written to a fresh
//! WAL under the other of two keys, `raft` and `raft-b`; the file `current` (replaced whole by
//! rename) then names it, and the old one is deleted. A crash before `current` is durable
//! leaves the old WAL in force, whole; the next open deletes the other.

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
use walrus::{Disk, DiskFile, FsyncSchedule, ReadConsistency, Walrus};

use crate::NodeDisk;

use super::{codec, TypeConfig, RECORD_LEN_MAX_BYTES};

/// WAL topic of the log records.
const TOPIC_LOG: &str = "log";
/// WAL topic of the votes.
const TOPIC_VOTE: &str = "vote";
/// WAL topic of the committed log ids.
const TOPIC_COMMITTED: &str = "committed";
/// Namespaces (subdirectories) the WAL takes turns in inside the store directory.
const WAL_KEYS: [&str; 2] = ["raft", "raft-b"];
/// The file naming the WAL key in force (absent: the first).
const CURRENT_FILE: &str = "current";
/// Longest a purge waits for the snapshot covering it to be kept.
const PURGE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Records the topics may hold before a purge rewrites them, unless set otherwise
/// ([`LogStore::set_rewrite_after`]); and always more than twice the live ones.
const REWRITE_RECORDS_MIN: u64 = 4096;
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
    wal: Mutex<Wal>,
    disk: Arc<NodeDisk>,
    dir: PathBuf,
    /// See [`LogStore::set_rewrite_after`].
    rewrite_after: std::sync::atomic::AtomicU64,
    /// See [`LogStore::purge_behind`].
    kept: Mutex<Option<tokio::sync::watch::Receiver<Option<u64>>>>,
    /// The replay of everything durable.
    mem: Mutex<Mem>,
    /// Releases the directory on drop (none on a simulated disk, private to its node).
    guard: Option<DirGuard>,
}

/// The WAL in force.
struct Wal {
    engine: Walrus<NodeDisk>,
    /// Its index in `WAL_KEYS`.
    key: usize,
    /// Records in its topics.
    records: u64,
    /// A rewrite failed after `current` may have changed: nothing more may be written.
    broken: bool,
}

impl std::ops::Deref for Wal {
    type Target = Walrus<NodeDisk>;
    fn deref(&self) -> &Walrus<NodeDisk> {
        &self.engine
    }
}

fn open_wal(disk: Arc<NodeDisk>, dir: &Path, key: usize) -> io::Result<Walrus<NodeDisk>> {
    Walrus::builder()
        .data_dir(dir)
        .key(WAL_KEYS[key])
        .fsync_schedule(FsyncSchedule::SyncEach)
        .consistency(ReadConsistency::StrictlyAtOnce)
        .reclaim_consumed(false)
        .inline_commit(crate::INLINE_COMMIT)
        .build_on(disk)
}

/// Which WAL key `current` names (the first if there is no such file).
fn read_current(disk: &NodeDisk, dir: &Path) -> io::Result<usize> {
    let path = dir.join(CURRENT_FILE);
    let file = match disk.open(&path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if file.len()? > 64 {
        return Err(invalid(format!("{} is too long", path.display())));
    }
    let text = file.read_all()?;
    WAL_KEYS
        .iter()
        .position(|k| text == format!("{k}\n").as_bytes())
        .ok_or_else(|| invalid(format!("{} names no WAL", path.display())))
}

fn write_current(disk: &NodeDisk, dir: &Path, key: usize) -> io::Result<()> {
    let text = format!("{}\n", WAL_KEYS[key]);
    crate::replace_file(disk, dir, CURRENT_FILE, &[text.as_bytes()])
}

/// Deletes every file under `path` (directories stay, empty).
fn remove_files(disk: &NodeDisk, path: &Path) -> io::Result<()> {
    if !disk.is_dir(path) {
        return Ok(());
    }
    for name in disk.list_dir(path)? {
        let p = path.join(name);
        if disk.is_dir(&p) {
            remove_files(disk, &p)?;
        } else {
            disk.remove_file(&p)?;
        }
    }
    disk.sync_dir(path)
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

    fn wal(&self) -> io::Result<MutexGuard<'_, Wal>> {
        let wal = self
            .wal
            .lock()
            .map_err(|_| io::Error::other("raft log store engine poisoned by a panic"))?;
        if wal.broken {
            return Err(io::Error::other(
                "raft log store stopped after a failed rewrite",
            ));
        }
        Ok(wal)
    }

    /// Writes the live state into a fresh WAL under `WAL_KEYS[key]`; returns it and its
    /// record count.
    fn write_fresh(&self, key: usize, mem: &Mem) -> io::Result<(Walrus<NodeDisk>, u64)> {
        // Leftovers of a rewrite that did not finish.
        remove_files(&self.disk, &self.dir.join(WAL_KEYS[key]))?;
        let fresh = open_wal(self.disk.clone(), &self.dir, key)?;
        let mut records = 0;
        if let Some(p) = mem.last_purged {
            fresh.append(TOPIC_LOG, &encode(&LogRecordRef::Purge(p))?)?;
            records += 1;
        }
        let entries: Vec<Vec<u8>> = mem
            .log
            .values()
            .map(|e| encode(&LogRecordRef::Entry(e)))
            .collect::<io::Result<_>>()?;
        records += append_batched(&fresh, &entries)?;
        if let Some(v) = &mem.vote {
            fresh.append(TOPIC_VOTE, &encode(v)?)?;
            records += 1;
        }
        fresh.append(TOPIC_COMMITTED, &encode(&mem.committed)?)?;
        records += 1;
        Ok((fresh, records))
    }

    /// After a purge: rewrites the live state into the other WAL once the topics hold many
    /// more records than that (see the module docs). Called with the WAL locked.
    fn compact(&self, wal: &mut Wal, mem: &Mem) -> io::Result<()> {
        let live = mem.log.len() as u64 + 3;
        let floor = self
            .rewrite_after
            .load(std::sync::atomic::Ordering::Relaxed);
        if wal.records < floor.max(live.saturating_mul(2)) {
            return Ok(());
        }
        let key = 1 - wal.key;
        let (fresh, records) = match self.write_fresh(key, mem) {
            Ok(f) => f,
            Err(e) => {
                // The old WAL stays in force, whole; the next purge tries again.
                tracing::warn!(error = %e, "could not rewrite the raft log store");
                return Ok(());
            }
        };
        if let Err(e) = write_current(&self.disk, &self.dir, key) {
            // `current` may name either WAL after a crash now: write neither any more.
            wal.broken = true;
            return Err(e);
        }
        let old = std::mem::replace(&mut wal.engine, fresh);
        let old_key = std::mem::replace(&mut wal.key, key);
        let before = std::mem::replace(&mut wal.records, records);
        drop(old);
        if let Err(e) = remove_files(&self.disk, &self.dir.join(WAL_KEYS[old_key])) {
            tracing::warn!(error = %e, "could not delete the old raft WAL; the next open retries");
        }
        tracing::info!(before, after = records, "raft log store rewritten");
        Ok(())
    }

    /// Writes `entries` (in batches of at most [`BATCH_ENTRIES_MAX`] records and
    /// [`BATCH_BYTES_MAX`] bytes; each batch is atomic and fsynced), then makes them visible.
    fn append(&self, entries: Vec<Entry<TypeConfig>>) -> io::Result<()> {
        let mut wal = self.wal()?;
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            encoded.push(encode(&LogRecordRef::Entry(e))?);
        }
        let mut entries = entries.into_iter();
        for batch in batches(&encoded) {
            wal.batch_append(TOPIC_LOG, &batch)?;
            wal.records += batch.len() as u64;
            let mut mem = self.mem()?;
            for e in entries.by_ref().take(batch.len()) {
                mem.log.insert(e.log_id.index, e);
            }
        }
        Ok(())
    }

    fn write_log_record(&self, rec: LogRecordRef<'_>) -> io::Result<()> {
        let mut wal = self.wal()?;
        wal.append(TOPIC_LOG, &encode(&rec)?)?;
        wal.records += 1;
        let mut mem = self.mem()?;
        match rec {
            LogRecordRef::Truncate { since } => mem.truncate(since),
            LogRecordRef::Purge(id) => {
                mem.purge(id);
                self.compact(&mut wal, &mem)?;
            }
            LogRecordRef::Entry(e) => {
                mem.log.insert(e.log_id.index, e.clone());
            }
        }
        Ok(())
    }

    fn save_vote(&self, vote: Vote<u64>) -> io::Result<()> {
        let mut wal = self.wal()?;
        wal.append(TOPIC_VOTE, &encode(&vote)?)?;
        wal.records += 1;
        self.mem()?.vote = Some(vote);
        Ok(())
    }

    fn save_committed(&self, committed: Option<LogId<u64>>) -> io::Result<()> {
        let mut wal = self.wal()?;
        wal.append(TOPIC_COMMITTED, &encode(&committed)?)?;
        wal.records += 1;
        self.mem()?.committed = committed;
        Ok(())
    }
}

/// `records` cut into the atomic batches of at most [`BATCH_ENTRIES_MAX`] records and
/// [`BATCH_BYTES_MAX`] bytes (a record over the byte limit goes alone).
fn batches(records: &[Vec<u8>]) -> Vec<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut records = records.iter().peekable();
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
        out.push(batch);
    }
    out
}

/// Appends `records` to the log topic of `wal` in batches; returns how many.
fn append_batched(wal: &Walrus<NodeDisk>, records: &[Vec<u8>]) -> io::Result<u64> {
    for batch in batches(records) {
        wal.batch_append(TOPIC_LOG, &batch)?;
    }
    Ok(records.len() as u64)
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
        let key = read_current(&disk, dir)?;
        // Leftovers of a rewrite that did not finish, or of the WAL it replaced.
        remove_files(&disk, &dir.join(WAL_KEYS[1 - key]))?;
        let wal = open_wal(disk.clone(), dir, key)?;
        let records = [TOPIC_LOG, TOPIC_VOTE, TOPIC_COMMITTED]
            .iter()
            .map(|t| wal.entry_count(t))
            .sum();

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
                wal: Mutex::new(Wal {
                    engine: wal,
                    key,
                    records,
                    broken: false,
                }),
                disk,
                dir: dir.to_path_buf(),
                rewrite_after: REWRITE_RECORDS_MIN.into(),
                kept: Mutex::new(None),
                mem: Mutex::new(mem),
                guard,
            }),
        })
    }

    /// A purge rewrites the topics once they hold at least `records` records (and more than
    /// twice the live ones).
    pub fn set_rewrite_after(&self, records: u64) {
        self.shared
            .rewrite_after
            .store(records, std::sync::atomic::Ordering::Relaxed);
    }

    /// Purges only entries a kept snapshot covers: `purge` waits (up to
    /// [`PURGE_WAIT`]) until `kept` (`StateMachine::kept_snapshots`) reaches the purge
    /// point. openraft purges the log the moment it hands an installed snapshot to the state
    /// machine, which keeps it on disk only afterwards; a crash in between would leave a node
    /// whose log and snapshot both lack the entries between them.
    pub fn purge_behind(&self, kept: tokio::sync::watch::Receiver<Option<u64>>) {
        if let Ok(mut k) = self.shared.kept.lock() {
            *k = Some(kept);
        }
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

    /// What openraft's replication sends as the entries right after `start - 1`: so only a
    /// gapless run that starts at `start`. If the head of the range was purged meanwhile (the
    /// purge can overtake a replication round), nothing: openraft then sends a heartbeat and,
    /// next round, the snapshot. Later entries would make the follower panic on the gap
    /// (Tier B seed 14422).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let mem = self.mem().map_err(read_err)?;
        Ok(mem
            .log
            .range(start..end.max(start))
            .zip(start..)
            .take_while(|((&index, _), want)| index == *want)
            .map(|((_, e), _)| e.clone())
            .collect())
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
        let kept = self.shared.kept.lock().ok().and_then(|k| k.clone());
        if let Some(mut kept) = kept {
            let covered = tokio::time::timeout(
                PURGE_WAIT,
                kept.wait_for(|k| k.is_some_and(|k| k >= log_id.index)),
            )
            .await;
            if !matches!(covered, Ok(Ok(_))) {
                let e = io::Error::other(format!(
                    "no snapshot kept up to {log_id}: the log is not purged past one"
                ));
                return Err(StorageIOError::write_logs(&e).into());
            }
        }
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

    /// Every file under `dir`, recursively.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    out.extend(files_under(&p));
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    /// openraft's replication sends what `limited_get_log_entries` returns as the entries right
    /// after the range's start: a range whose head was purged must come back empty, never as
    /// the later entries (a follower panics on the gap; Tier B seed 14422).
    #[cfg(not(madsim))]
    #[test]
    fn a_read_whose_start_was_purged_returns_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path()).unwrap();
        store
            .shared
            .append((0..20).map(|i| entry(1, i)).collect())
            .unwrap();
        store
            .shared
            .write_log_record(LogRecordRef::Purge(entry(1, 9).log_id))
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let read = |store: &mut LogStore, r: std::ops::Range<u64>| {
            rt.block_on(store.limited_get_log_entries(r.start, r.end))
                .unwrap()
                .iter()
                .map(|e| e.log_id.index)
                .collect::<Vec<_>>()
        };
        assert_eq!(read(&mut store, 5..15), Vec::<u64>::new());
        assert_eq!(read(&mut store, 10..13), vec![10, 11, 12]);
        assert_eq!(read(&mut store, 18..30), vec![18, 19]);
        assert_eq!(read(&mut store, 12..12), Vec::<u64>::new());
        // The plain reader still returns whatever of a range is there.
        let all = rt.block_on(store.try_get_log_entries(5..15)).unwrap();
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn a_purge_rewrites_the_topics_and_a_reopen_sees_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new_committed(2, 1);
        let committed = Some(entry(1, 4_990).log_id);
        {
            let store = LogStore::open(dir.path()).unwrap();
            let s = &store.shared;
            s.append((0..5_000).map(|i| entry(1, i)).collect()).unwrap();
            s.save_vote(vote).unwrap();
            s.save_committed(committed).unwrap();
            // Under the threshold: no rewrite.
            s.write_log_record(LogRecordRef::Purge(entry(1, 10).log_id))
                .unwrap();
            assert!(!dir.path().join(CURRENT_FILE).exists());
            s.append((5_000..5_100).map(|i| entry(1, i)).collect())
                .unwrap();
            s.write_log_record(LogRecordRef::Purge(entry(1, 4_000).log_id))
                .unwrap();
            let wal = s.wal().unwrap();
            assert_eq!(wal.key, 1);
            assert_eq!(wal.records, 1 + 1_099 + 2);
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CURRENT_FILE)).unwrap(),
            "raft-b\n"
        );
        assert_eq!(files_under(&dir.path().join("raft")), Vec::<PathBuf>::new());
        let store = LogStore::open(dir.path()).unwrap();
        let mem = store.shared.mem().unwrap();
        assert_eq!(mem.last_purged, Some(entry(1, 4_000).log_id));
        assert_eq!(mem.log.len(), 1_099);
        assert_eq!(mem.log.get(&4_001), Some(&entry(1, 4_001)));
        assert_eq!(mem.last_log_id(), Some(entry(1, 5_099).log_id));
        assert_eq!(mem.vote, Some(vote));
        assert_eq!(mem.committed, committed);
    }

    #[test]
    fn leftovers_of_an_unfinished_rewrite_are_deleted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LogStore::open(dir.path()).unwrap();
            store
                .shared
                .append((0..10).map(|i| entry(1, i)).collect())
                .unwrap();
        }
        // A rewrite that stopped before `current` named its WAL.
        let other = dir.path().join("raft-b").join("log");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("00000000000000000000.seg"), b"half").unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        assert_eq!(store.shared.mem().unwrap().log.len(), 10);
        assert_eq!(
            files_under(&dir.path().join("raft-b")),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn a_current_file_naming_no_wal_fails_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CURRENT_FILE), b"elsewhere\n").unwrap();
        let err = LogStore::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
