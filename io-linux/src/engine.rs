//! The storage engine behind `Walrus`: topics as chains of segment files, appends, group commit,
//! reads by offset, checkpointed cursors and recovery. Generic over the `Disk` so the same code
//! runs on real files and on the simulated disk of the crash tests.
//!
//! Invariants (each is what a reader or recovery relies on):
//! - Offsets of a topic are `first, first + 1, …` with no gaps; a batch lands in one segment.
//! - `visible` only moves forward and only past bytes that are completely written (and, under
//!   `SyncEach`, synced): readers never see a partial or, under `SyncEach`, a volatile entry.
//! - A persisted cursor never points past durable data (its data is synced first), so a crash
//!   can never make a cursor skip entries appended later at the same offsets.
//! - After a failed write the topic rewinds to its last good entry and zeroes everything written
//!   past it before appending again, so no stale record can line up behind a new one.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use walrus_core::disk::{clone_io_error, write_zeros, Disk, DiskFile, WriteOp};
use walrus_core::limits::{
    BATCH_BYTES_MAX, BATCH_ENTRIES_MAX, ENTRY_PAYLOAD_MAX, INDEX_INTERVAL_BYTES,
};
use walrus_core::topic::validate_topic_name;
use walrus_core::wal::cursor::{recover_cursor, CursorSlot, CURSOR_FILE_LEN};
use walrus_core::wal::record::{
    decode_record, encode_record, encode_record_parts, encoded_len, RecordError,
    FLAG_BATCH_CONTINUES,
};
use walrus_core::wal::segment::{
    decode_segment_header, encode_segment_header, parse_segment_file_name, scan_segment,
    segment_file_name, ScanStop, SegmentScan, SEGMENT_HEADER_LEN,
};

use crate::{Entry, FsyncSchedule, ReadConsistency};

/// First allocation of a new segment file; it doubles as it fills, up to the segment size.
const SEGMENT_INITIAL_BYTES: u64 = 4 << 10;
/// Requests one group commit takes at most.
const GROUP_COMMIT_REQUESTS_MAX: usize = 1024;
/// Bytes one group commit takes at most (it takes at least one request, whatever its size).
const GROUP_COMMIT_BYTES_MAX: usize = 64 << 20;
/// Capacity of the queue in front of the group-commit thread.
const WAL_QUEUE_DEPTH: usize = 4096;
/// Bytes read from a segment per step of a read.
const READ_CHUNK_BYTES: usize = 4 << 20;
/// Name of a topic's cursor file.
const CURSOR_FILE: &str = "cursor";
/// Directory of the `SyncEach` journal; `~` cannot start a topic name, so it never clashes.
const JOURNAL_DIR: &str = "~journal";
/// The journal file.
const JOURNAL_FILE: &str = "journal.wal";
/// First allocation of the journal file.
const JOURNAL_INITIAL_BYTES: u64 = 64 << 10;
/// Journal size that triggers a checkpoint.
const JOURNAL_BYTES_MAX: u64 = 64 << 20;

/// Settings of one engine instance. Nothing here is process-global.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub root: PathBuf,
    pub consistency: ReadConsistency,
    pub fsync: FsyncSchedule,
    pub segment_bytes: u64,
    pub reclaim_consumed: bool,
    /// `SyncEach` commits on the appending thread instead of a group-commit thread (for
    /// deterministic simulation, where no thread may be spawned).
    pub inline_commit: bool,
}

pub(crate) struct Engine<D: Disk> {
    disk: Arc<D>,
    cfg: Config,
    topics: RwLock<HashMap<String, Arc<Topic<D>>>>,
    wal_tx: Option<SyncSender<Request<D>>>,
    /// Segments written since the last journal checkpoint (`SyncEach`).
    dirty: Arc<Mutex<Vec<Arc<Segment<D>>>>>,
    /// The group-commit worker when commits run on the appending thread (`inline_commit`).
    inline: Option<Mutex<WalWorker<D>>>,
}

struct Segment<D: Disk> {
    base: u64,
    path: PathBuf,
    file: Arc<D::File>,
    /// Sparse `(offset, position)` points; may hold points past `visible_end` while a write is
    /// in flight, never past the topic's assigned offsets.
    index: Mutex<Vec<(u64, u64)>>,
    /// One past the last visible entry of this segment.
    visible_end: AtomicU64,
    /// Byte position just past the last visible entry.
    visible_pos: AtomicU64,
    /// Byte position up to which the file is known synced (`Milliseconds` only).
    synced_pos: AtomicU64,
    /// Whether the segment is in the journal's dirty list (`SyncEach` only).
    journal_dirty: AtomicBool,
    /// A sync of this file failed since its last checkpoint: the kernel may have dropped dirty
    /// pages, so the checkpoint rewrites the unsynced range before trusting a sync again.
    tainted: AtomicBool,
}

struct Topic<D: Disk> {
    name: String,
    dir: PathBuf,
    write: Mutex<WriteState<D>>,
    segments: RwLock<Vec<Arc<Segment<D>>>>,
    /// One past the last entry readers may see.
    visible: AtomicU64,
    /// One past the last entry known durable.
    durable: AtomicU64,
    /// Generations up to this one have failed; the next append rewinds before writing.
    poisoned_through: AtomicU64,
    committed: Mutex<Committed<D>>,
    cursor: Mutex<Cursor<D>>,
}

struct Committed<D: Disk> {
    segment: Arc<Segment<D>>,
    end_offset: u64,
    end_pos: u64,
}

impl<D: Disk> Clone for Committed<D> {
    fn clone(&self) -> Self {
        Committed {
            segment: self.segment.clone(),
            end_offset: self.end_offset,
            end_pos: self.end_pos,
        }
    }
}

struct WriteState<D: Disk> {
    active: Arc<Segment<D>>,
    next_offset: u64,
    pos: u64,
    /// Allocated (zero-filled) length of the active file.
    file_len: u64,
    /// Highest byte position ever written in the active segment: a rewind zeroes up to here.
    high_water: u64,
    last_index_pos: u64,
    generation: u64,
    /// Segments written since their last sync (for `Milliseconds` and cursor persistence).
    unsynced: Vec<Arc<Segment<D>>>,
}

struct Cursor<D: Disk> {
    next: u64,
    hint: Option<Hint<D>>,
    seq: u64,
    unpersisted: u64,
    file: Option<Arc<D::File>>,
}

/// Where a cursor's next entry starts: its segment and byte position.
type Hint<D> = (Arc<Segment<D>>, u64);

struct Request<D: Disk> {
    topic: Arc<Topic<D>>,
    segment: Arc<Segment<D>>,
    pos: u64,
    data: Vec<u8>,
    generation: u64,
    first_offset: u64,
    end_offset: u64,
    done: oneshot::Sender<io::Result<()>>,
}

/// Why a positioned append ([`crate::Walrus::batch_append_begin_at`]) was refused: the topic's
/// next offset is not the one asked for. The error's inner value (`io::Error::get_ref`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAtOffset {
    /// The offset the batch was to start at.
    pub wanted: u64,
    /// The offset it would have started at.
    pub next: u64,
}

impl std::fmt::Display for NotAtOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "append refused: it was to start at offset {}, the next offset is {}",
            self.wanted, self.next
        )
    }
}

impl std::error::Error for NotAtOffset {}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug that already failed loudly; the data
    // behind them stays consistent because every update is published last.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<D: Disk> Engine<D> {
    /// Opens (recovering) the engine rooted at `cfg.root`. Returns the engine and, under
    /// `SyncEach`, the receiver the group-commit thread must run on.
    pub fn open(disk: Arc<D>, cfg: Config) -> io::Result<(Engine<D>, Option<WalWorker<D>>)> {
        disk.create_dir_all(&cfg.root)?;
        let (wal_tx, rx) = if matches!(cfg.fsync, FsyncSchedule::SyncEach) {
            let (tx, rx) = mpsc::sync_channel(WAL_QUEUE_DEPTH);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let engine = Engine {
            disk,
            cfg,
            topics: RwLock::new(HashMap::new()),
            wal_tx,
            dirty: Arc::new(Mutex::new(Vec::new())),
            inline: None,
        };
        let mut names = engine.disk.list_dir(&engine.cfg.root)?;
        names.sort();
        for name in names {
            let dir = engine.cfg.root.join(&name);
            if validate_topic_name(&name).is_err() || !engine.disk.is_dir(&dir) {
                continue;
            }
            if let Some(topic) = engine.recover_topic(&name, dir)? {
                engine
                    .topics
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, Arc::new(topic));
            }
        }
        let journal = engine.recover_journal()?;
        engine.clamp_cursors();
        let worker = match (rx, journal) {
            (Some(rx), Some(journal)) => Some(WalWorker {
                disk: engine.disk.clone(),
                rx,
                journal,
                dirty: engine.dirty.clone(),
                degraded: false,
            }),
            (Some(_), None) => return Err(io::Error::other("SyncEach needs its journal")),
            _ => None,
        };
        if engine.cfg.inline_commit {
            let mut engine = engine;
            engine.inline = worker.map(Mutex::new);
            return Ok((engine, None));
        }
        Ok((engine, worker))
    }

    /// Keeps every recovered cursor within its topic's recovered entries (it can only be outside
    /// them if data it counted was lost, e.g. under `NoFsync`).
    fn clamp_cursors(&self) {
        for topic in self.all_topics() {
            let first = topic.first_offset();
            let end = topic.visible.load(Ordering::Acquire);
            let mut cur = lock(&topic.cursor);
            let clamped = cur.next.clamp(first, end);
            if clamped != cur.next {
                tracing::warn!(topic = %topic.name, stored = cur.next, clamped, "cursor outside the recovered entries");
                cur.next = clamped;
            }
        }
    }

    /// Replays the journal (if any) into the topics, makes the replayed segments durable and
    /// starts the journal afresh. Returns the open journal under `SyncEach`.
    fn recover_journal(&self) -> io::Result<Option<JournalFile<D>>> {
        let dir = self.cfg.root.join(JOURNAL_DIR);
        let path = dir.join(JOURNAL_FILE);
        let existing = match self.disk.open(&path, false) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let sync_each = matches!(self.cfg.fsync, FsyncSchedule::SyncEach);
        if existing.is_none() && !sync_each {
            return Ok(None);
        }
        let mut next_seq = 0u64;
        let file = match existing {
            Some(file) => {
                let bytes = file.read_all()?;
                file.release_cache();
                match decode_segment_header(&bytes) {
                    Ok(base) => {
                        let scan = scan_segment(&bytes, base);
                        tracing::debug!(base, entries = scan.entries, stop = ?scan.stop, "journal scanned");
                        let replayed = self.replay_journal(&bytes, &scan)?;
                        next_seq = fresh_journal_base(base, bytes.len() as u64);
                        // The replayed entries must be durable in their segments before the
                        // journal forgets them.
                        for seg in replayed {
                            seg.file.sync_data()?;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "journal header unreadable; clearing the journal");
                        write_zeros(&*file, 0, bytes.len() as u64)?;
                    }
                }
                file
            }
            None => {
                self.disk.create_dir_all(&dir)?;
                self.disk.sync_dir(&self.cfg.root)?;
                let f = self.disk.open(&path, true)?;
                write_zeros(&*f, 0, JOURNAL_INITIAL_BYTES)?;
                f
            }
        };
        file.write_all_at(&encode_segment_header(next_seq), 0)?;
        file.sync_data()?;
        self.disk.sync_dir(&dir)?;
        let len = file.len()?;
        Ok(Some(JournalFile {
            file,
            base: next_seq,
            next_seq,
            pos: SEGMENT_HEADER_LEN as u64,
            len,
        }))
    }

    /// Re-applies journal records the segments lack (their tails were not synced before a
    /// crash). Returns the segments written.
    fn replay_journal(&self, bytes: &[u8], scan: &SegmentScan) -> io::Result<Vec<Arc<Segment<D>>>> {
        let mut written: Vec<Arc<Segment<D>>> = Vec::new();
        let mut at = SEGMENT_HEADER_LEN;
        for _ in 0..scan.entries {
            let Ok(record) = decode_record(&bytes[at..]) else {
                break;
            };
            at += record.encoded_len();
            let Some((name, first, count, data)) = parse_journal_payload(record.payload) else {
                tracing::warn!("skipping a malformed journal record");
                continue;
            };
            if validate_topic_name(name).is_err() || !records_are_valid(data, first, count) {
                tracing::warn!(topic = name, "skipping an invalid journal record");
                continue;
            }
            let topic = self.topic_or_create(name)?;
            let mut st = lock(&topic.write);
            if first.saturating_add(count) <= st.next_offset {
                // Already in the segment as far as reads can tell, but perhaps only in the page
                // cache (after a failed sync, or an earlier attempt at this recovery): write the
                // same bytes again so that the sync below really covers them.
                if first >= topic.first_offset() {
                    let (seg, pos) = self.locate(&topic, first)?;
                    if seg.file.read_with(pos, data.len(), |b| b == data)? {
                        seg.file.write_all_at(data, pos)?;
                        if !written.iter().any(|s| Arc::ptr_eq(s, &seg)) {
                            written.push(seg);
                        }
                    }
                }
                continue;
            }
            if first != st.next_offset {
                tracing::warn!(
                    topic = name,
                    first,
                    next = st.next_offset,
                    "journal record does not follow the segment; skipped"
                );
                continue;
            }
            self.make_room(&topic, &mut st, data.len() as u64)?;
            let pos = st.pos;
            st.active.file.write_all_at(data, pos)?;
            if pos >= st.last_index_pos + INDEX_INTERVAL_BYTES || st.last_index_pos == 0 {
                lock(&st.active.index).push((first, pos));
                st.last_index_pos = pos;
            }
            st.pos += data.len() as u64;
            st.next_offset = first + count;
            st.high_water = st.high_water.max(st.pos);
            topic.publish(&st.active, st.next_offset, st.pos, true);
            if !written.iter().any(|s| Arc::ptr_eq(s, &st.active)) {
                written.push(st.active.clone());
            }
            tracing::debug!(topic = name, first, count, "replayed from the journal");
        }
        Ok(written)
    }

    pub fn fsync_schedule(&self) -> FsyncSchedule {
        self.cfg.fsync
    }

    // ---------------------------------------------------------------- writes

    pub fn append(&self, topic: &str, payloads: &[&[u8]]) -> io::Result<u64> {
        self.append_begin(topic, payloads)?.wait()
    }

    /// Assigns the batch its offsets and queues it; see [`PendingAppend`].
    pub fn append_begin(
        &self,
        topic: &str,
        payloads: &[&[u8]],
    ) -> io::Result<PendingAppend<'_, D>> {
        self.append_begin_at(topic, None, payloads)
    }

    /// [`Engine::append_begin`], refused with [`NotAtOffset`] (nothing written) unless the
    /// batch would start at offset `first`, when given.
    pub fn append_begin_at(
        &self,
        topic: &str,
        first: Option<u64>,
        payloads: &[&[u8]],
    ) -> io::Result<PendingAppend<'_, D>> {
        if payloads.is_empty() {
            return Err(invalid("a batch needs at least one entry".into()));
        }
        if payloads.len() > BATCH_ENTRIES_MAX {
            return Err(invalid(format!(
                "batch of {} entries is over the limit of {BATCH_ENTRIES_MAX}",
                payloads.len()
            )));
        }
        let mut total = 0usize;
        for p in payloads {
            if p.len() > ENTRY_PAYLOAD_MAX {
                return Err(invalid(format!(
                    "entry of {} bytes is over the limit of {ENTRY_PAYLOAD_MAX}",
                    p.len()
                )));
            }
            total += encoded_len(p.len());
        }
        if total > BATCH_BYTES_MAX + BATCH_ENTRIES_MAX * encoded_len(0) {
            return Err(invalid(format!(
                "batch of {total} bytes is over the limit of {BATCH_BYTES_MAX}"
            )));
        }
        let topic = self.topic_or_create(topic)?;
        let mut st = lock(&topic.write);
        if topic.poisoned_through.load(Ordering::Acquire) >= st.generation {
            self.rewind(&topic, &mut st)?;
        }
        if let Some(want) = first.filter(|&f| f != st.next_offset) {
            return Err(io::Error::other(NotAtOffset {
                wanted: want,
                next: st.next_offset,
            }));
        }
        self.make_room(&topic, &mut st, total as u64)?;

        let first = st.next_offset;
        let mut buf = Vec::with_capacity(total);
        let mut index_points = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let rec_pos = st.pos + buf.len() as u64;
            if rec_pos >= st.last_index_pos + INDEX_INTERVAL_BYTES || st.last_index_pos == 0 {
                index_points.push((first + i as u64, rec_pos));
                st.last_index_pos = rec_pos;
            }
            let flags = if i + 1 < payloads.len() {
                FLAG_BATCH_CONTINUES
            } else {
                0
            };
            encode_record(&mut buf, first + i as u64, flags, p);
        }
        if !index_points.is_empty() {
            lock(&st.active.index).extend_from_slice(&index_points);
        }
        let pos = st.pos;
        let end_offset = first + payloads.len() as u64;
        st.pos += buf.len() as u64;
        st.next_offset = end_offset;
        st.high_water = st.high_water.max(st.pos);
        let segment = st.active.clone();

        if let Some(tx) = &self.wal_tx {
            // The group-commit thread journals the records, and only once they are durable
            // writes them into the segment: a failed commit leaves nothing in any segment.
            let (done_tx, done_rx) = oneshot::channel();
            let req = Request {
                topic: topic.clone(),
                segment,
                pos,
                data: buf,
                generation: st.generation,
                first_offset: first,
                end_offset,
                done: done_tx,
            };
            if tx.send(req).is_err() {
                topic
                    .poisoned_through
                    .fetch_max(st.generation, Ordering::AcqRel);
                return Err(io::Error::other("group-commit thread has stopped"));
            }
            drop(st);
            return Ok(PendingAppend {
                engine: self,
                first,
                done: Some(done_rx),
            });
        }
        if let Err(e) = segment.file.write_all_at(&buf, pos) {
            topic
                .poisoned_through
                .fetch_max(st.generation, Ordering::AcqRel);
            if let Err(z) = self.rewind(&topic, &mut st) {
                tracing::warn!(topic = %topic.name, error = %z, "rewind after a failed write failed; retrying on the next append");
            }
            return Err(e);
        }
        if !st.unsynced.iter().any(|s| Arc::ptr_eq(s, &segment)) {
            st.unsynced.push(segment.clone());
        }
        topic.publish(&segment, end_offset, st.pos, false);
        Ok(PendingAppend {
            engine: self,
            first,
            done: None,
        })
    }

    /// Makes everything written to `topic` (or to every topic) durable now.
    pub fn sync(&self, topic: Option<&str>) -> io::Result<()> {
        let topics: Vec<Arc<Topic<D>>> = match topic {
            Some(name) => self.topic(name).into_iter().collect(),
            None => self.all_topics(),
        };
        let mut first_err = None;
        for t in topics {
            if let Err(e) = self.sync_topic(&t) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn sync_topic(&self, topic: &Topic<D>) -> io::Result<()> {
        if matches!(
            self.cfg.fsync,
            FsyncSchedule::SyncEach | FsyncSchedule::NoFsync
        ) {
            return Ok(());
        }
        let (dirty, target) = {
            let mut st = lock(&topic.write);
            let dirty: Vec<(Arc<Segment<D>>, u64)> = std::mem::take(&mut st.unsynced)
                .into_iter()
                .map(|s| {
                    let end = s.visible_pos.load(Ordering::Acquire);
                    (s, end)
                })
                .collect();
            (dirty, topic.visible.load(Ordering::Acquire))
        };
        for (i, (seg, end)) in dirty.iter().enumerate() {
            if let Err(e) = seg.file.sync_data() {
                // After a failed fsync the kernel may have dropped the dirty pages while still
                // serving them from cache: write the unsynced range again so that the next sync
                // really covers it, rather than trusting a retry of the sync alone.
                let from = seg.synced_pos.load(Ordering::Acquire);
                if let Err(w) = rewrite_range(&*seg.file, from, *end) {
                    tracing::warn!(topic = %topic.name, error = %w, "rewriting after a failed sync failed");
                }
                let mut st = lock(&topic.write);
                for (s, _) in &dirty[i..] {
                    if !st.unsynced.iter().any(|u| Arc::ptr_eq(u, s)) {
                        st.unsynced.push(s.clone());
                    }
                }
                return Err(e);
            }
            seg.synced_pos.fetch_max(*end, Ordering::AcqRel);
        }
        topic.durable.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    fn make_room(&self, topic: &Topic<D>, st: &mut WriteState<D>, need: u64) -> io::Result<()> {
        let header = SEGMENT_HEADER_LEN as u64;
        if st.pos > header && st.pos + need > self.cfg.segment_bytes {
            tracing::debug!(topic = %topic.name, base = st.next_offset, "rolling to a new segment");
            let seg = match self.create_segment(&topic.dir, st.next_offset) {
                Ok(seg) => seg,
                Err(e) => {
                    // Best effort: recovery sets such a leftover aside anyway.
                    let _ = self
                        .disk
                        .remove_file(&topic.dir.join(segment_file_name(st.next_offset)));
                    return Err(e);
                }
            };
            topic
                .segments
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .push(seg.clone());
            st.active = seg;
            st.pos = header;
            st.file_len = st.active.file.len()?;
            st.high_water = header;
            st.last_index_pos = 0;
        }
        if st.pos + need > st.file_len {
            let want = (st.file_len * 2)
                .max(SEGMENT_INITIAL_BYTES)
                .min(self.cfg.segment_bytes);
            let new_len = (st.pos + need).max(want).next_multiple_of(4096);
            st.active.file.allocate(st.file_len, new_len)?;
            if matches!(self.cfg.fsync, FsyncSchedule::SyncEach) {
                // Make the room durable now (once per doubling), so that replaying the journal
                // after a crash never needs free space.
                if let Err(e) = st.active.file.sync_data() {
                    self.taint(&st.active);
                    return Err(e);
                }
            }
            st.file_len = new_len;
        }
        Ok(())
    }

    /// Rewinds a topic whose writes failed to its last committed entry and zeroes what was
    /// written past it.
    fn rewind(&self, topic: &Topic<D>, st: &mut WriteState<D>) -> io::Result<()> {
        let c = lock(&topic.committed).clone();
        tracing::debug!(topic = %topic.name, to_offset = c.end_offset, segment = c.segment.base, pos = c.end_pos, from_offset = st.next_offset, active = st.active.base, "rewinding after a failed write");
        if !Arc::ptr_eq(&c.segment, &st.active) {
            // Segments opened after the committed one hold nothing acknowledged: remove them.
            let mut segs = topic.segments.write().unwrap_or_else(|p| p.into_inner());
            while let Some(last) = segs.last() {
                if Arc::ptr_eq(last, &c.segment) {
                    break;
                }
                let last = segs.pop().expect("loop checked the list is not empty");
                self.disk.remove_file(&last.path)?;
            }
            drop(segs);
            self.disk.sync_dir(&topic.dir)?;
            st.active = c.segment.clone();
            st.file_len = st.active.file.len()?;
            st.high_water = st.file_len;
        }
        if st.high_water > c.end_pos {
            // Durably: a stale record left behind the committed end (one that was written and
            // synced but refused because an earlier write of its generation failed) must not
            // survive a crash, or recovery would take it for the next entry.
            write_zeros(&*st.active.file, c.end_pos, st.high_water)?;
            if let Err(e) = st.active.file.sync_data() {
                self.taint(&st.active);
                return Err(e);
            }
        }
        st.pos = c.end_pos;
        st.next_offset = c.end_offset;
        st.high_water = c.end_pos;
        let mut index = lock(&st.active.index);
        index.retain(|&(o, _)| o < c.end_offset);
        st.last_index_pos = index.last().map_or(0, |&(_, p)| p);
        drop(index);
        st.generation = topic.poisoned_through.load(Ordering::Acquire) + 1;
        Ok(())
    }

    /// Records that a sync of `seg` failed (see `Segment::tainted`) and makes sure the next
    /// checkpoint visits it.
    ///
    /// Under `Milliseconds` the caller holds the topic's write lock (no concurrent writer), so
    /// the unsynced range is rewritten at once instead.
    fn taint(&self, seg: &Arc<Segment<D>>) {
        if matches!(self.cfg.fsync, FsyncSchedule::Milliseconds(_)) {
            let end = seg.visible_pos.load(Ordering::Acquire);
            let from = seg.synced_pos.load(Ordering::Acquire).min(end);
            if let Err(e) = rewrite_range(&*seg.file, from, end) {
                tracing::warn!(error = %e, "rewriting after a failed sync failed");
            }
            return;
        }
        seg.tainted.store(true, Ordering::Release);
        if !seg.journal_dirty.swap(true, Ordering::AcqRel) {
            lock(&self.dirty).push(seg.clone());
        }
    }

    fn create_segment(&self, dir: &Path, base: u64) -> io::Result<Arc<Segment<D>>> {
        let path = dir.join(segment_file_name(base));
        let file = self.disk.open(&path, true)?;
        file.set_len(0)?;
        file.allocate(0, SEGMENT_INITIAL_BYTES)?;
        file.write_all_at(&encode_segment_header(base), 0)?;
        // Even under `NoFsync`: a segment whose header or directory entry could vanish would
        // leave a gap in the chain. It costs two syncs per segment, not per append.
        file.sync_data()?;
        self.disk.sync_dir(dir)?;
        Ok(Arc::new(Segment {
            base,
            path,
            file,
            index: Mutex::new(Vec::new()),
            visible_end: AtomicU64::new(base),
            visible_pos: AtomicU64::new(SEGMENT_HEADER_LEN as u64),
            synced_pos: AtomicU64::new(SEGMENT_HEADER_LEN as u64),
            journal_dirty: AtomicBool::new(false),
            tainted: AtomicBool::new(false),
        }))
    }

    // ---------------------------------------------------------------- reads

    pub fn read_next(
        &self,
        name: &str,
        max_entries: usize,
        max_bytes: usize,
        checkpoint: bool,
    ) -> io::Result<Vec<Entry>> {
        let Some(topic) = self.topic(name) else {
            return Ok(Vec::new());
        };
        let mut cur = lock(&topic.cursor);
        let hint = cur.hint.take();
        let (entries, hint) = self.read_entries(&topic, cur.next, hint, max_entries, max_bytes)?;
        if entries.is_empty() {
            // Caught up: drop the mapping, so that a quiet reader holds no file pages in its
            // resident set (it is remapped on the next read that finds data).
            if let Some((seg, _)) = &hint {
                seg.file.release_cache();
            }
        }
        let old = (cur.next, cur.unpersisted);
        if checkpoint && !entries.is_empty() {
            cur.next += entries.len() as u64;
            cur.hint = hint;
            if let Err(e) = self.after_advance(&topic, &mut cur, entries.len() as u64) {
                (cur.next, cur.unpersisted) = old;
                cur.hint = None;
                return Err(e);
            }
        }
        Ok(entries)
    }

    pub fn read_from(
        &self,
        name: &str,
        offset: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> io::Result<Vec<Entry>> {
        match self.topic(name) {
            None => Ok(Vec::new()),
            Some(topic) => self
                .read_entries(&topic, offset, None, max_entries, max_bytes)
                .map(|(e, _)| e),
        }
    }

    fn after_advance(&self, topic: &Topic<D>, cur: &mut Cursor<D>, n: u64) -> io::Result<()> {
        let persist = match self.cfg.consistency {
            ReadConsistency::StrictlyAtOnce => true,
            ReadConsistency::AtLeastOnce { persist_every } => {
                cur.unpersisted += n;
                cur.unpersisted >= u64::from(persist_every.max(1))
            }
        };
        if persist {
            self.persist_cursor(topic, cur)?;
        }
        Ok(())
    }

    fn persist_cursor(&self, topic: &Topic<D>, cur: &mut Cursor<D>) -> io::Result<()> {
        let syncing = !matches!(self.cfg.fsync, FsyncSchedule::NoFsync);
        // Never let a durable cursor point past durable data.
        if syncing && topic.durable.load(Ordering::Acquire) < cur.next {
            self.sync_topic(topic)?;
        }
        let file = match &cur.file {
            Some(f) => f.clone(),
            None => {
                // Until this setup has fully succeeded once, it is redone on every persist: a
                // file whose directory entry was never synced could vanish in a crash.
                let f = self.disk.open(&topic.dir.join(CURSOR_FILE), true)?;
                if f.len()? < CURSOR_FILE_LEN as u64 {
                    f.set_len(CURSOR_FILE_LEN as u64)?;
                }
                if syncing {
                    f.sync_data()?;
                    self.disk.sync_dir(&topic.dir)?;
                }
                cur.file = Some(f.clone());
                f
            }
        };
        let slot = CursorSlot {
            seq: cur.seq + 1,
            next_offset: cur.next,
        };
        file.write_all_at(&slot.encode(), slot.file_pos())?;
        if syncing {
            file.sync_data()?;
        }
        cur.seq = slot.seq;
        cur.unpersisted = 0;
        if self.cfg.reclaim_consumed {
            self.reclaim(topic, cur.next, &*file)?;
        }
        Ok(())
    }

    /// Deletes segments every entry of which lies below the persisted cursor `upto`.
    fn reclaim(&self, topic: &Topic<D>, upto: u64, cursor_file: &D::File) -> io::Result<()> {
        let committed = lock(&topic.committed).segment.clone();
        let mut removed = false;
        loop {
            let mut segs = topic.segments.write().unwrap_or_else(|p| p.into_inner());
            if segs.len() < 2 || segs[1].base > upto || Arc::ptr_eq(&segs[0], &committed) {
                break;
            }
            if !removed && matches!(self.cfg.fsync, FsyncSchedule::NoFsync) {
                // The cursor must be durable before the data below it goes, or a crash could
                // leave a cursor pointing into a deleted segment.
                cursor_file.sync_data()?;
            }
            let old = segs.remove(0);
            drop(segs);
            old.file.release_cache();
            self.disk.remove_file(&old.path)?;
            self.disk.sync_dir(&topic.dir)?;
            removed = true;
        }
        if removed {
            tracing::debug!(topic = %topic.name, upto, "reclaimed consumed segments");
        }
        Ok(())
    }

    fn read_entries(
        &self,
        topic: &Topic<D>,
        from: u64,
        hint: Option<Hint<D>>,
        max_entries: usize,
        max_bytes: usize,
    ) -> io::Result<(Vec<Entry>, Option<Hint<D>>)> {
        let visible = topic.visible.load(Ordering::Acquire);
        let mut out = Vec::new();
        if from >= visible || max_entries == 0 {
            return Ok((out, hint));
        }
        let (mut seg, mut pos) = match hint {
            Some(h) => h,
            None => self.locate(topic, from)?,
        };
        let mut offset = from;
        let mut bytes = 0usize;
        let mut full = false;
        while !full
            && offset < visible
            && out.len() < max_entries
            && (out.is_empty() || bytes < max_bytes)
        {
            let seg_end = seg.visible_end.load(Ordering::Acquire);
            if offset >= seg_end {
                let next = {
                    let segs = topic.segments.read().unwrap_or_else(|p| p.into_inner());
                    segs.iter().find(|s| s.base == offset).cloned()
                };
                match next {
                    Some(n) => {
                        seg.file.release_cache();
                        seg = n;
                        pos = SEGMENT_HEADER_LEN as u64;
                        continue;
                    }
                    None => break,
                }
            }
            let seg_pos_end = seg.visible_pos.load(Ordering::Acquire);
            let Some(remaining) = seg_pos_end.checked_sub(pos) else {
                return Err(corrupt(format!(
                    "topic {}: entry {offset} of segment {} lies past the written data",
                    topic.name, seg.base
                )));
            };
            let span = (remaining as usize).min(READ_CHUNK_BYTES);
            let mut need_more: Option<usize> = None;
            let step = seg.file.read_with(pos, span, |buf| -> io::Result<()> {
                let mut at = 0usize;
                while offset < seg_end && out.len() < max_entries && (out.is_empty() || bytes < max_bytes) {
                    match decode_record(&buf[at..]) {
                        Ok(r) => {
                            if r.offset != offset {
                                return Err(corrupt(format!(
                                    "topic {}: record at byte {} of segment {} holds offset {}, expected {offset}",
                                    topic.name, pos + at as u64, seg.base, r.offset
                                )));
                            }
                            if !out.is_empty() && bytes + r.payload.len() > max_bytes {
                                full = true;
                                break;
                            }
                            bytes += r.payload.len();
                            out.push(Entry { data: r.payload.to_vec() });
                            at += r.encoded_len();
                            offset += 1;
                        }
                        Err(RecordError::Truncated { needed, .. }) if at == 0 || needed as usize > span => {
                            need_more = Some(needed as usize);
                            break;
                        }
                        Err(RecordError::Truncated { .. }) => break,
                        Err(e) => {
                            return Err(corrupt(format!(
                                "topic {}: entry {offset} in segment {} is unreadable: {e}",
                                topic.name, seg.base
                            )))
                        }
                    }
                }
                pos += at as u64;
                Ok(())
            })?;
            step?;
            if let Some(needed) = need_more {
                if pos + needed as u64 > seg_pos_end {
                    return Err(corrupt(format!(
                        "topic {}: entry {offset} in segment {} runs past the written data",
                        topic.name, seg.base
                    )));
                }
                let (entry, len) =
                    seg.file
                        .read_with(pos, needed, |buf| match decode_record(buf) {
                            Ok(r) if r.offset == offset => Ok((
                                Entry {
                                    data: r.payload.to_vec(),
                                },
                                r.encoded_len(),
                            )),
                            Ok(r) => Err(corrupt(format!(
                                "topic {}: expected offset {offset}, found {}",
                                topic.name, r.offset
                            ))),
                            Err(e) => Err(corrupt(format!(
                                "topic {}: entry {offset} is unreadable: {e}",
                                topic.name
                            ))),
                        })??;
                if !out.is_empty() && bytes + entry.data.len() > max_bytes {
                    break;
                }
                bytes += entry.data.len();
                out.push(entry);
                pos += len as u64;
                offset += 1;
            }
        }
        Ok((out, Some((seg, pos))))
    }

    /// Finds the segment and byte position of entry `offset` (which must be visible).
    fn locate(&self, topic: &Topic<D>, offset: u64) -> io::Result<(Arc<Segment<D>>, u64)> {
        let seg = {
            let segs = topic.segments.read().unwrap_or_else(|p| p.into_inner());
            let i = segs.partition_point(|s| s.base <= offset);
            if i == 0 {
                let first = segs.first().map_or(0, |s| s.base);
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("topic {}: offset {offset} was reclaimed; the first retained offset is {first}", topic.name),
                ));
            }
            segs[i - 1].clone()
        };
        let (mut at, mut pos) = {
            let index = lock(&seg.index);
            let i = index.partition_point(|&(o, _)| o <= offset);
            if i == 0 {
                (seg.base, SEGMENT_HEADER_LEN as u64)
            } else {
                index[i - 1]
            }
        };
        let written_end = seg.visible_pos.load(Ordering::Acquire);
        while at < offset {
            if pos + encoded_len(0) as u64 > written_end {
                return Err(corrupt(format!(
                    "topic {}: index walk ran past the written data at offset {at}",
                    topic.name
                )));
            }
            let len = seg.file.read_with(pos, encoded_len(0), |h| {
                let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let o = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
                (o == at && len <= ENTRY_PAYLOAD_MAX).then_some(encoded_len(len))
            })?;
            let Some(len) = len else {
                return Err(corrupt(format!(
                    "topic {}: index walk broke at offset {at}",
                    topic.name
                )));
            };
            pos += len as u64;
            at += 1;
        }
        Ok((seg, pos))
    }

    // ---------------------------------------------------------------- topics

    pub fn topic_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The offset the next append to `name` gets: past every entry appended, including those
    /// still in their group commit (0 for an unknown topic).
    pub fn next_offset(&self, name: &str) -> u64 {
        self.topic(name).map_or(0, |t| lock(&t.write).next_offset)
    }

    /// `(first retained offset, end offset)` of a topic.
    pub fn bounds(&self, name: &str) -> Option<(u64, u64)> {
        let t = self.topic(name)?;
        let first = t.first_offset();
        Some((first, t.visible.load(Ordering::Acquire)))
    }

    pub fn cursor_of(&self, name: &str) -> Option<u64> {
        self.topic(name).map(|t| lock(&t.cursor).next)
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic<D>>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every topic, in name order (so that syncs and checkpoints run in a reproducible order).
    fn all_topics(&self) -> Vec<Arc<Topic<D>>> {
        let mut all: Vec<(String, Arc<Topic<D>>)> = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().map(|(_, t)| t).collect()
    }

    fn topic_or_create(&self, name: &str) -> io::Result<Arc<Topic<D>>> {
        if let Some(t) = self.topic(name) {
            return Ok(t);
        }
        validate_topic_name(name).map_err(|e| invalid(e.to_string()))?;
        let mut map = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(name) {
            return Ok(t.clone());
        }
        let dir = self.cfg.root.join(name);
        self.disk.create_dir_all(&dir)?;
        self.disk.sync_dir(&self.cfg.root)?;
        // A cursor left by a topic whose segments did not survive would outrank the new one.
        match self.disk.remove_file(&dir.join(CURSOR_FILE)) {
            Ok(()) => self.disk.sync_dir(&dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let seg = self.create_segment(&dir, 0)?;
        let topic = Arc::new(Topic::new(
            name.to_string(),
            dir,
            vec![seg],
            0,
            SEGMENT_HEADER_LEN as u64,
            SEGMENT_INITIAL_BYTES,
            None,
        ));
        map.insert(name.to_string(), topic.clone());
        Ok(topic)
    }

    // ---------------------------------------------------------------- recovery

    /// Renames a segment that recovery cannot use to `<name>.discarded`, durably, so it is
    /// kept for inspection but never read again.
    fn set_aside(&self, dir: &Path, base: u64) -> io::Result<()> {
        let name = segment_file_name(base);
        self.disk
            .rename(&dir.join(&name), &dir.join(format!("{name}.discarded")))?;
        self.disk.sync_dir(dir)
    }

    fn recover_topic(&self, name: &str, dir: PathBuf) -> io::Result<Option<Topic<D>>> {
        let mut bases: Vec<u64> = self
            .disk
            .list_dir(&dir)?
            .iter()
            .filter_map(|n| parse_segment_file_name(n))
            .collect();
        bases.sort_unstable();
        let mut segments: Vec<Arc<Segment<D>>> = Vec::new();
        let mut last_scan = None;
        let mut expected: Option<u64> = None;
        let mut broken = false;
        for (i, &base) in bases.iter().enumerate() {
            let path = dir.join(segment_file_name(base));
            let is_last = i + 1 == bases.len();
            if !broken && expected.is_some_and(|e| base < e) {
                // Overlaps the segment before it: the leftover of a roll whose creation failed
                // (nothing is appended to a segment before its creation succeeded).
                tracing::info!(
                    topic = name,
                    segment = base,
                    "setting aside a segment left by a failed roll"
                );
                self.set_aside(&dir, base)?;
                continue;
            }
            if broken || expected.is_some_and(|e| e != base) {
                if !broken {
                    tracing::warn!(topic = name, segment = base, expected = ?expected, "gap in the segment chain; setting later segments aside");
                }
                broken = true;
                self.set_aside(&dir, base)?;
                continue;
            }
            let file = self.disk.open(&path, false)?;
            let bytes = file.read_all()?;
            let scan = scan_segment(&bytes, base);
            drop(bytes);
            if matches!(
                scan.stop,
                ScanStop::BadHeader(_) | ScanStop::BaseMismatch { .. }
            ) && is_last
                && scan.dirty_end as usize <= SEGMENT_HEADER_LEN
            {
                // A segment whose creation a crash interrupted: nothing was ever appended to it.
                self.disk.remove_file(&path)?;
                self.disk.sync_dir(&dir)?;
                expected = Some(base);
                continue;
            }
            if !scan.is_clean() {
                let level_warn = !is_last
                    || !matches!(
                        scan.stop,
                        ScanStop::BadRecord {
                            error: RecordError::Truncated { .. } | RecordError::BadChecksum,
                            ..
                        } | ScanStop::Clean
                            | ScanStop::OffsetMismatch { .. }
                    );
                if level_warn {
                    tracing::warn!(topic = name, segment = base, stop = ?scan.stop, kept = scan.entries, "segment damaged; keeping its valid prefix");
                } else {
                    tracing::info!(topic = name, segment = base, stop = ?scan.stop, kept = scan.entries, "truncating a torn tail");
                }
            }
            if matches!(
                scan.stop,
                ScanStop::BadHeader(_) | ScanStop::BaseMismatch { .. }
            ) {
                broken = true;
                self.set_aside(&dir, base)?;
                expected = Some(base);
                continue;
            }
            file.release_cache();
            let seg: Arc<Segment<D>> = Arc::new(Segment {
                base,
                path,
                file,
                index: Mutex::new(scan.index.clone()),
                visible_end: AtomicU64::new(base + scan.entries),
                visible_pos: AtomicU64::new(scan.valid_len),
                synced_pos: AtomicU64::new(scan.valid_len),
                journal_dirty: AtomicBool::new(false),
                tainted: AtomicBool::new(false),
            });
            expected = Some(base + scan.entries);
            // A damaged segment that is not the last keeps its valid prefix; whether later
            // segments follow on is decided by the gap check (a torn tail that the next segment
            // continues after exactly is harmless; a corruption leaves a gap).
            segments.push(seg);
            last_scan = Some(scan);
        }
        let next_offset = expected.unwrap_or(0);
        // Zero the stale tail of the segment appends continue in.
        let (pos, file_len) = match (segments.last(), &last_scan) {
            (Some(seg), Some(scan)) => {
                let len = seg.file.len()?;
                if scan.dirty_end > scan.valid_len {
                    write_zeros(&*seg.file, scan.valid_len, scan.dirty_end)?;
                }
                // The process that created this segment may have stopped after its sync
                // failed (its creation then failed, but the file stayed): a failed fsync may
                // drop dirty pages the cache still serves, and the directory entry was never
                // synced. Write the header again and sync it and the entry before anything is
                // appended here, or a power loss could take the file with every entry
                // acknowledged after this start (Tier B seed 1196: a node's Raft log).
                seg.file.write_all_at(&encode_segment_header(seg.base), 0)?;
                seg.file.sync_data()?;
                self.disk.sync_dir(&dir)?;
                (scan.valid_len, len)
            }
            _ => {
                // No segment survived: nothing was ever acknowledged here (a segment is durable
                // before its first append). The topic is created afresh on its next append, so
                // that opening never needs free space.
                return Ok(None);
            }
        };
        let cursor = match self.disk.open(&dir.join(CURSOR_FILE), false) {
            Ok(f) => {
                let mut bytes = vec![0u8; CURSOR_FILE_LEN];
                let n = f.len()?.min(CURSOR_FILE_LEN as u64) as usize;
                f.read_exact_at(&mut bytes[..n], 0)?;
                // Clamped by `clamp_cursors` once the journal has been replayed.
                recover_cursor(&bytes).map(|slot| (slot, f))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let topic = Topic::new(
            name.to_string(),
            dir,
            segments,
            next_offset,
            pos,
            file_len,
            cursor,
        );
        if let Some(seg) = topic
            .segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .last()
        {
            let mut st = lock(&topic.write);
            st.last_index_pos = lock(&seg.index).last().map_or(0, |&(_, p)| p);
        }
        Ok(Some(topic))
    }
}

impl<D: Disk> Topic<D> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        dir: PathBuf,
        segments: Vec<Arc<Segment<D>>>,
        next_offset: u64,
        pos: u64,
        file_len: u64,
        cursor: Option<(CursorSlot, Arc<D::File>)>,
    ) -> Topic<D> {
        let active = segments
            .last()
            .expect("a topic always has a segment")
            .clone();
        let first = segments[0].base;
        let (next, seq, file) = match cursor {
            Some((slot, f)) => (slot.next_offset, slot.seq, Some(f)),
            None => (first, 0, None),
        };
        Topic {
            name,
            dir,
            segments: RwLock::new(segments),
            visible: AtomicU64::new(next_offset),
            durable: AtomicU64::new(next_offset),
            poisoned_through: AtomicU64::new(0),
            committed: Mutex::new(Committed {
                segment: active.clone(),
                end_offset: next_offset,
                end_pos: pos,
            }),
            cursor: Mutex::new(Cursor {
                next,
                hint: None,
                seq,
                unpersisted: 0,
                file,
            }),
            write: Mutex::new(WriteState {
                active,
                next_offset,
                pos,
                file_len,
                high_water: pos,
                last_index_pos: 0,
                generation: 1,
                unsynced: Vec::new(),
            }),
        }
    }

    /// The first offset still stored (above 0 once consumed segments were reclaimed).
    fn first_offset(&self) -> u64 {
        self.segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .map_or(0, |s| s.base)
    }

    /// Makes entries up to `end_offset` (ending at byte `end_pos` of `segment`) visible.
    fn publish(&self, segment: &Arc<Segment<D>>, end_offset: u64, end_pos: u64, durable: bool) {
        *lock(&self.committed) = Committed {
            segment: segment.clone(),
            end_offset,
            end_pos,
        };
        segment.visible_pos.store(end_pos, Ordering::Release);
        segment.visible_end.store(end_offset, Ordering::Release);
        if durable {
            self.durable.fetch_max(end_offset, Ordering::AcqRel);
        }
        self.visible.fetch_max(end_offset, Ordering::AcqRel);
    }
}

/// Reads `from..to` of a file and writes the same bytes back (re-dirtying them).
fn rewrite_range<F: DiskFile>(file: &F, from: u64, to: u64) -> io::Result<()> {
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(READ_CHUNK_BYTES);
        let bytes = file.read_with(at, n, |b| b.to_vec())?;
        file.write_all_at(&bytes, at)?;
        at += n as u64;
    }
    Ok(())
}

/// An append whose offsets are assigned: under `SyncEach` it waits for its group commit
/// (readable and durable only after [`PendingAppend::wait`]); otherwise it is already written.
/// A caller may meanwhile do other work with the batch, such as sending it to replicas.
pub struct PendingAppend<'a, D: Disk> {
    engine: &'a Engine<D>,
    first: u64,
    done: Option<oneshot::Receiver<io::Result<()>>>,
}

impl<D: Disk> PendingAppend<'_, D> {
    /// The offset of the batch's first entry.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// Whether the batch still waits for its group commit.
    pub fn is_pending(&self) -> bool {
        self.done.is_some()
    }

    /// Blocks until the batch is readable (and, under `SyncEach`, durable); returns its first
    /// offset. An error means none of it was stored.
    pub fn wait(mut self) -> io::Result<u64> {
        let Some(done) = self.take_done() else {
            return Ok(self.first);
        };
        Self::finish(done.recv(), self.first)
    }

    /// [`PendingAppend::wait`] for async callers: awaits the group commit without blocking
    /// the calling thread (the commit runs on its own thread either way, and completes even if
    /// this future is dropped).
    pub async fn done(mut self) -> io::Result<u64> {
        let Some(done) = self.take_done() else {
            return Ok(self.first);
        };
        Self::finish(done.await, self.first)
    }

    /// The completion to wait on; with `inline_commit` the commit is run here first.
    fn take_done(&mut self) -> Option<oneshot::Receiver<io::Result<()>>> {
        let done = self.done.take()?;
        if let Some(worker) = &self.engine.inline {
            // Whoever holds the worker commits everything queued so far, ours included.
            lock(worker).drain();
        }
        Some(done)
    }

    fn finish(r: Result<io::Result<()>, oneshot::RecvError>, first: u64) -> io::Result<u64> {
        r.unwrap_or_else(|_| Err(io::Error::other("group-commit thread has stopped")))
            .map(|()| first)
    }
}

/// The journal of `SyncEach`: one file every durable append is recorded in, so that one
/// `fdatasync` makes a whole group commit durable however many topics (segment files) it spans.
/// Segment files are written at the same time but synced only at a checkpoint, after which the
/// journal starts over (a new header with a higher base sequence makes every older record
/// unreplayable, because records must carry consecutive sequence numbers).
pub(crate) struct JournalFile<D: Disk> {
    file: Arc<D::File>,
    base: u64,
    next_seq: u64,
    pos: u64,
    len: u64,
}

/// The group-commit thread of `SyncEach`: it takes every queued append (whose bytes the
/// appender already wrote to its segment), records them all in the journal with one write and
/// one linked `fdatasync`, and only then publishes and acknowledges them.
pub(crate) struct WalWorker<D: Disk> {
    disk: Arc<D>,
    rx: Receiver<Request<D>>,
    journal: JournalFile<D>,
    dirty: Arc<Mutex<Vec<Arc<Segment<D>>>>>,
    /// A journal write failed: checkpoint before journaling anything else.
    degraded: bool,
}

impl<D: Disk> WalWorker<D> {
    /// Runs until every sender is gone.
    pub fn run(mut self) {
        let mut batch: Vec<Request<D>> = Vec::new();
        while let Ok(first) = self.rx.recv() {
            batch.push(first);
            self.fill(&mut batch);
            self.commit(&mut batch);
        }
    }

    /// Commits whatever is queued, without waiting for more (`inline_commit`).
    fn drain(&mut self) {
        let mut batch: Vec<Request<D>> = Vec::new();
        loop {
            self.fill(&mut batch);
            if batch.is_empty() {
                return;
            }
            self.commit(&mut batch);
        }
    }

    /// Adds queued requests to `batch` up to the group-commit limits.
    fn fill(&mut self, batch: &mut Vec<Request<D>>) {
        let mut bytes: usize = batch.iter().map(|r| r.data.len()).sum();
        while batch.len() < GROUP_COMMIT_REQUESTS_MAX && bytes < GROUP_COMMIT_BYTES_MAX {
            match self.rx.try_recv() {
                Ok(r) => {
                    bytes += r.data.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<Request<D>>) {
        // Requests of a generation that already failed are refused: they sit behind a hole.
        let (live, dead): (Vec<Request<D>>, Vec<Request<D>>) = batch
            .drain(..)
            .partition(|r| r.generation > r.topic.poisoned_through.load(Ordering::Acquire));
        for r in dead {
            let _ = r.done.send(Err(io::Error::other(
                "an earlier write to this topic failed; retry",
            )));
        }
        if live.is_empty() {
            return;
        }
        let result = self.make_durable(&live);
        for r in live {
            let res = match &result {
                // Durable in the journal: now into the segment, in queue order (so offsets
                // become visible in order), and onto the list the next checkpoint syncs.
                // (A request too large for the journal was already written and synced.)
                Ok(()) => match if fits_journal(&r.topic.name, &r.data) {
                    r.segment.file.write_all_at(&r.data, r.pos)
                } else {
                    Ok(())
                } {
                    Ok(()) => {
                        if !r.segment.journal_dirty.swap(true, Ordering::AcqRel) {
                            lock(&self.dirty).push(r.segment.clone());
                        }
                        r.topic.publish(
                            &r.segment,
                            r.end_offset,
                            r.pos + r.data.len() as u64,
                            true,
                        );
                        Ok(())
                    }
                    Err(e) => {
                        r.topic
                            .poisoned_through
                            .fetch_max(r.generation, Ordering::AcqRel);
                        self.degraded = true;
                        Err(e)
                    }
                },
                Err(e) => {
                    r.topic
                        .poisoned_through
                        .fetch_max(r.generation, Ordering::AcqRel);
                    Err(clone_io_error(e))
                }
            };
            tracing::trace!(topic = %r.topic.name, end_offset = r.end_offset, ok = res.is_ok(), "group commit result");
            let _ = r.done.send(res);
        }
    }

    /// Records `live` in the journal and syncs it (checkpointing first when needed).
    fn make_durable(&mut self, live: &[Request<D>]) -> io::Result<()> {
        // Checkpoint first (it changes the sequence numbers records must carry).
        let estimate: u64 = live
            .iter()
            .map(|r| (r.data.len() + r.topic.name.len() + 64) as u64)
            .sum();
        if self.degraded
            || self.journal.pos + estimate
                > JOURNAL_BYTES_MAX.max(estimate + SEGMENT_HEADER_LEN as u64)
        {
            self.checkpoint()?;
        }
        let mut buf = Vec::with_capacity(estimate as usize);
        let mut direct: Vec<&Request<D>> = Vec::new();
        let mut seq = self.journal.next_seq;
        for r in live {
            let count = r.end_offset - r.first_offset;
            if !fits_journal(&r.topic.name, &r.data) {
                // Too large for one journal record: sync its segment instead.
                direct.push(r);
                continue;
            }
            encode_journal_record(&mut buf, seq, &r.topic.name, r.first_offset, count, &r.data);
            seq += 1;
        }
        let need = buf.len() as u64;
        for r in direct {
            r.segment
                .file
                .write_all_at(&r.data, r.pos)
                .inspect_err(|_| self.degraded = true)?;
            if let Err(e) = r.segment.file.sync_data() {
                r.segment.tainted.store(true, Ordering::Release);
                if !r.segment.journal_dirty.swap(true, Ordering::AcqRel) {
                    lock(&self.dirty).push(r.segment.clone());
                }
                self.degraded = true;
                return Err(e);
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        let j = &mut self.journal;
        if j.pos + need > j.len {
            let new_len = (j.pos + need).max(j.len * 2).next_multiple_of(4096);
            write_zeros(&*j.file, j.len, new_len).inspect_err(|_| self.degraded = true)?;
            j.len = new_len;
        }
        let op = WriteOp {
            file: &j.file,
            pos: j.pos,
            data: &buf,
        };
        let result = self.disk.write_batch(&[op], true).pop().unwrap_or(Ok(()));
        match result {
            Ok(()) => {
                j.pos += need;
                j.next_seq = seq;
                Ok(())
            }
            Err(e) => {
                // What reached the journal is unknown: stop trusting it until a checkpoint.
                self.degraded = true;
                Err(e)
            }
        }
    }

    /// Syncs every segment written since the last checkpoint, then starts the journal over.
    fn checkpoint(&mut self) -> io::Result<()> {
        let dirty: Vec<Arc<Segment<D>>> = std::mem::take(&mut *lock(&self.dirty));
        for seg in &dirty {
            seg.journal_dirty.store(false, Ordering::Release);
        }
        // This thread writes every segment byte under `SyncEach`, so `visible_pos` covers all
        // of them here.
        let ends: Vec<(u64, u64)> = dirty
            .iter()
            .map(|seg| {
                let end = seg.visible_pos.load(Ordering::Acquire);
                (seg.synced_pos.load(Ordering::Acquire).min(end), end)
            })
            .collect();
        let mut failure: Option<io::Error> = None;
        for (seg, &(from, end)) in dirty.iter().zip(&ends) {
            if seg.tainted.swap(false, Ordering::AcqRel) {
                // A failed fsync may have dropped dirty pages the cache still shows: write the
                // unsynced range again, or this "successful" sync would not cover it and the
                // journal reset would forget it.
                if let Err(e) = rewrite_range(&*seg.file, from, end) {
                    seg.tainted.store(true, Ordering::Release);
                    failure.get_or_insert(e);
                }
            }
        }
        // All syncs in one batch: on io_uring they run in parallel.
        let ops: Vec<WriteOp<'_, D::File>> = dirty
            .iter()
            .map(|seg| WriteOp {
                file: &seg.file,
                pos: 0,
                data: &[],
            })
            .collect();
        let results = if failure.is_none() {
            self.disk.write_batch(&ops, true)
        } else {
            Vec::new()
        };
        drop(ops);
        for (i, seg) in dirty.iter().enumerate() {
            match results.get(i) {
                Some(Ok(())) => {
                    seg.synced_pos.fetch_max(ends[i].1, Ordering::AcqRel);
                }
                other => {
                    if let Some(Err(e)) = other {
                        seg.tainted.store(true, Ordering::Release);
                        failure.get_or_insert(clone_io_error(e));
                    }
                    if !seg.journal_dirty.swap(true, Ordering::AcqRel) {
                        lock(&self.dirty).push(seg.clone());
                    }
                }
            }
        }
        if let Some(e) = failure {
            self.degraded = true;
            return Err(e);
        }
        let j = &mut self.journal;
        let base = fresh_journal_base(j.base, j.len);
        j.file.write_all_at(&encode_segment_header(base), 0)?;
        j.file.sync_data().inspect_err(|_| self.degraded = true)?;
        j.base = base;
        j.next_seq = base;
        j.pos = SEGMENT_HEADER_LEN as u64;
        self.degraded = false;
        tracing::debug!(base, segments = dirty.len(), "journal checkpoint");
        Ok(())
    }
}

/// The base sequence of a journal that starts over: past every sequence number the previous
/// life of the file (which began at `base` and is `len` bytes long) can hold, written or torn,
/// so that no stale record can ever be taken for a new one.
fn fresh_journal_base(base: u64, len: u64) -> u64 {
    base.saturating_add(len / walrus_core::wal::record::RECORD_HEADER_LEN as u64 + 1)
}

/// Appends the journal record `seq` for `count` entries of `topic` from `first`: their segment
/// `records` behind `[topic len u8][topic][first u64][count u64]` (the caller checked
/// [`fits_journal`]), encoded in place rather than assembled first.
fn encode_journal_record(
    buf: &mut Vec<u8>,
    seq: u64,
    topic: &str,
    first: u64,
    count: u64,
    records: &[u8],
) {
    let name = topic.as_bytes();
    let (first, count) = (first.to_le_bytes(), count.to_le_bytes());
    let parts: [&[u8]; 5] = [&[name.len() as u8], name, &first, &count, records];
    encode_record_parts(buf, seq, 0, &parts);
}

/// Whether one append's records fit in a single journal record (else its segment is synced
/// directly).
fn fits_journal(topic: &str, records: &[u8]) -> bool {
    1 + topic.len() + 16 + records.len() <= ENTRY_PAYLOAD_MAX && topic.len() <= u8::MAX as usize
}

fn parse_journal_payload(p: &[u8]) -> Option<(&str, u64, u64, &[u8])> {
    let (&n, rest) = p.split_first()?;
    let name = std::str::from_utf8(rest.get(..n as usize)?).ok()?;
    let rest = &rest[n as usize..];
    let first = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let count = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
    Some((name, first, count, &rest[16..]))
}

/// Whether `data` is exactly `count` whole records with offsets `first, first + 1, …`, the
/// last one closing its batch.
fn records_are_valid(data: &[u8], first: u64, count: u64) -> bool {
    let mut at = 0usize;
    for i in 0..count {
        match decode_record(&data[at..]) {
            Ok(r)
                if r.offset == first + i
                    && (i + 1 < count) == (r.flags & FLAG_BATCH_CONTINUES != 0) =>
            {
                at += r.encoded_len()
            }
            _ => return false,
        }
    }
    count > 0 && at == data.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn journal_records_parse_back_to_what_was_journaled(
            topic in "[a-z0-9_.-]{1,40}",
            first in any::<u64>(),
            count in any::<u64>(),
            records in prop::collection::vec(any::<u8>(), 0..512),
            seq in any::<u64>(),
        ) {
            prop_assume!(fits_journal(&topic, &records));
            let mut buf = Vec::new();
            encode_journal_record(&mut buf, seq, &topic, first, count, &records);
            let rec = decode_record(&buf).unwrap();
            prop_assert_eq!(rec.offset, seq);
            prop_assert_eq!(
                parse_journal_payload(rec.payload),
                Some((topic.as_str(), first, count, records.as_slice()))
            );
        }
    }
}
