//! The public `Walrus` handle, its constructors (the upstream ones and a builder) and the
//! background sync thread of `FsyncSchedule::Milliseconds`.

use std::io;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use walrus_core::disk::Disk;
use walrus_core::limits::SEGMENT_BYTES_DEFAULT;
use walrus_core::topic::sanitize_namespace;

use crate::disk::{Backend, LinuxDisk};
use crate::engine::{Config, Engine};
use crate::{Entry, FsyncSchedule, ReadConsistency};

/// Default read consistency of the upstream constructors.
const DEFAULT_CONSISTENCY: ReadConsistency = ReadConsistency::StrictlyAtOnce;
/// Default fsync schedule of the upstream constructors (200 ms, as upstream).
const DEFAULT_FSYNC: FsyncSchedule = FsyncSchedule::Milliseconds(200);

/// An open walrus storage engine. Cheap to share between threads (`&Walrus` is enough: every
/// method takes `&self`).
pub struct Walrus<D: Disk = LinuxDisk> {
    engine: ManuallyDrop<Arc<Engine<D>>>,
    wal_thread: Option<JoinHandle<()>>,
    sync_thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// Builds a [`Walrus`] with explicit settings; anything not set comes from the environment
/// (`WALRUS_DATA_DIR`, `WALRUS_INSTANCE_KEY`, `WALRUS_DISABLE_IO_URING`) or the defaults.
#[derive(Debug, Clone)]
pub struct WalrusBuilder {
    data_dir: Option<PathBuf>,
    key: Option<String>,
    consistency: ReadConsistency,
    fsync: FsyncSchedule,
    backend: Backend,
    segment_bytes: u64,
    reclaim_consumed: bool,
    inline_commit: bool,
}

impl Default for WalrusBuilder {
    fn default() -> Self {
        WalrusBuilder {
            data_dir: None,
            key: None,
            consistency: DEFAULT_CONSISTENCY,
            fsync: DEFAULT_FSYNC,
            backend: Backend::IoUring,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            reclaim_consumed: true,
            inline_commit: false,
        }
    }
}

impl WalrusBuilder {
    /// Root directory (default: `WALRUS_DATA_DIR`, else `./wal_files`).
    pub fn data_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.data_dir = Some(dir.as_ref().to_path_buf());
        self
    }
    /// Namespace: data lives in `<data_dir>/<sanitized key>` (default: `WALRUS_INSTANCE_KEY`,
    /// else directly in `<data_dir>`).
    pub fn key(mut self, key: &str) -> Self {
        self.key = Some(key.to_string());
        self
    }
    /// When checkpointed read positions are persisted.
    pub fn consistency(mut self, c: ReadConsistency) -> Self {
        self.consistency = c;
        self
    }
    /// When appends are made durable.
    pub fn fsync_schedule(mut self, f: FsyncSchedule) -> Self {
        self.fsync = f;
        self
    }
    /// The write path (io_uring by default, falling back to pwrite when unavailable).
    pub fn backend(mut self, b: Backend) -> Self {
        self.backend = b;
        self
    }
    /// Size a segment file may reach before appends roll to a new one (default 64 MiB; at
    /// least 4 KiB). A single batch larger than this gets a segment of its own.
    pub fn segment_bytes(mut self, n: u64) -> Self {
        self.segment_bytes = n.max(4096);
        self
    }
    /// Whether segment files whose entries all lie below a topic's persisted cursor are deleted
    /// (default true, as upstream). Reads by offset below the first retained offset then fail.
    pub fn reclaim_consumed(mut self, yes: bool) -> Self {
        self.reclaim_consumed = yes;
        self
    }
    /// Under `SyncEach`, run each group commit on the appending thread instead of a background
    /// thread (default false). Concurrent appenders still share commits. Meant for
    /// deterministic simulation, where no thread may be spawned; the schedule
    /// `Milliseconds` still starts its sync thread.
    pub fn inline_commit(mut self, yes: bool) -> Self {
        self.inline_commit = yes;
        self
    }

    /// Opens the engine on real files.
    pub fn build(self) -> io::Result<Walrus<LinuxDisk>> {
        let disk = Arc::new(LinuxDisk::new(self.backend));
        self.build_on(disk)
    }

    /// Opens the engine on any [`Disk`] (the simulated one in tests).
    pub fn build_on<D: Disk>(self, disk: Arc<D>) -> io::Result<Walrus<D>> {
        let mut root = match self.data_dir {
            Some(d) => d,
            None => std::env::var_os("WALRUS_DATA_DIR")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from("wal_files"), PathBuf::from),
        };
        let key = self.key.or_else(|| {
            std::env::var("WALRUS_INSTANCE_KEY")
                .ok()
                .filter(|k| !k.is_empty())
        });
        if let Some(k) = key {
            root.push(sanitize_namespace(&k));
        }
        let cfg = Config {
            root,
            consistency: self.consistency,
            fsync: self.fsync,
            segment_bytes: self.segment_bytes,
            reclaim_consumed: self.reclaim_consumed,
            inline_commit: self.inline_commit,
        };
        let (engine, worker) = Engine::open(disk, cfg)?;
        let engine = Arc::new(engine);
        let stop = Arc::new(AtomicBool::new(false));
        let wal_thread = match worker {
            Some(worker) => Some(
                std::thread::Builder::new()
                    .name("walrus-wal".into())
                    .spawn(move || worker.run())?,
            ),
            None => None,
        };
        let sync_thread = match engine.fsync_schedule() {
            FsyncSchedule::Milliseconds(ms) => {
                let weak = Arc::downgrade(&engine);
                let stop = stop.clone();
                Some(
                    std::thread::Builder::new()
                        .name("walrus-sync".into())
                        .spawn(move || sync_loop(weak, stop, Duration::from_millis(ms.max(1))))?,
                )
            }
            _ => None,
        };
        Ok(Walrus {
            engine: ManuallyDrop::new(engine),
            wal_thread,
            sync_thread,
            stop,
        })
    }
}

fn sync_loop<D: Disk>(engine: Weak<Engine<D>>, stop: Arc<AtomicBool>, every: Duration) {
    while !stop.load(Ordering::Acquire) {
        std::thread::park_timeout(every);
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Some(engine) = engine.upgrade() else {
            break;
        };
        if let Err(e) = engine.sync(None) {
            tracing::warn!(error = %e, "background sync failed; will retry");
        }
    }
}

impl Walrus<LinuxDisk> {
    /// Opens with `StrictlyAtOnce` reads and a 200 ms fsync schedule (upstream defaults).
    pub fn new() -> io::Result<Self> {
        Self::builder().build()
    }
    /// Opens with the given read consistency.
    pub fn with_consistency(mode: ReadConsistency) -> io::Result<Self> {
        Self::builder().consistency(mode).build()
    }
    /// Opens with the given read consistency and fsync schedule.
    pub fn with_consistency_and_schedule(
        mode: ReadConsistency,
        fsync: FsyncSchedule,
    ) -> io::Result<Self> {
        Self::builder()
            .consistency(mode)
            .fsync_schedule(fsync)
            .build()
    }
    /// Opens the namespace `key` (stored in `<data_dir>/<sanitized key>`).
    pub fn new_for_key(key: &str) -> io::Result<Self> {
        Self::builder().key(key).build()
    }
    /// Opens the namespace `key` with the given read consistency.
    pub fn with_consistency_for_key(key: &str, mode: ReadConsistency) -> io::Result<Self> {
        Self::builder().key(key).consistency(mode).build()
    }
    /// Opens the namespace `key` with the given read consistency and fsync schedule.
    pub fn with_consistency_and_schedule_for_key(
        key: &str,
        mode: ReadConsistency,
        fsync: FsyncSchedule,
    ) -> io::Result<Self> {
        Self::builder()
            .key(key)
            .consistency(mode)
            .fsync_schedule(fsync)
            .build()
    }
    /// A builder with the defaults.
    pub fn builder() -> WalrusBuilder {
        WalrusBuilder::default()
    }
}

impl<D: Disk> Walrus<D> {
    /// Appends one entry to `topic` (created on first use). Returns once the entry is readable
    /// and, under `SyncEach`, durable.
    pub fn append_for_topic(&self, topic: &str, data: &[u8]) -> io::Result<()> {
        self.engine.append(topic, &[data]).map(|_| ())
    }

    /// Appends one entry and returns its offset.
    pub fn append(&self, topic: &str, data: &[u8]) -> io::Result<u64> {
        self.engine.append(topic, &[data])
    }

    /// Appends up to 2,000 entries atomically: after a crash, all or none are present.
    pub fn batch_append_for_topic(&self, topic: &str, batch: &[&[u8]]) -> io::Result<()> {
        self.engine.append(topic, batch).map(|_| ())
    }

    /// Appends a batch atomically and returns the offset of its first entry.
    pub fn batch_append(&self, topic: &str, batch: &[&[u8]]) -> io::Result<u64> {
        self.engine.append(topic, batch)
    }

    /// Starts an atomic batch append: the offsets are assigned now, in call order; the batch
    /// becomes readable (and durable under `SyncEach`) when [`crate::PendingAppend::wait`] returns.
    pub fn batch_append_begin(
        &self,
        topic: &str,
        batch: &[&[u8]],
    ) -> io::Result<crate::engine::PendingAppend<'_, D>> {
        self.engine.append_begin(topic, batch)
    }

    /// [`Walrus::batch_append_begin`] at a known place: refused, with nothing written, unless
    /// the batch would start at offset `first`. The error then holds a
    /// [`crate::NotAtOffset`] (see [`std::io::Error::get_ref`]) with the actual next offset.
    /// Appenders that decide positions themselves (a replica copying its leader) use it.
    pub fn batch_append_begin_at(
        &self,
        topic: &str,
        first: u64,
        batch: &[&[u8]],
    ) -> io::Result<crate::engine::PendingAppend<'_, D>> {
        self.engine.append_begin_at(topic, Some(first), batch)
    }

    /// The offset the next append to `topic` gets, counting appends still in their group
    /// commit (which [`Walrus::entry_count`] does not).
    pub fn next_offset(&self, topic: &str) -> u64 {
        self.engine.next_offset(topic)
    }

    /// Reads the entry at the topic's cursor. With `checkpoint` the cursor moves past it
    /// (persisted per the read consistency); without, this is a peek.
    pub fn read_next(&self, topic: &str, checkpoint: bool) -> io::Result<Option<Entry>> {
        Ok(self
            .engine
            .read_next(topic, 1, usize::MAX, checkpoint)?
            .pop())
    }

    /// Reads entries from the topic's cursor while their payloads total at most `max_bytes`
    /// (always at least one entry if any is available).
    pub fn batch_read_for_topic(
        &self,
        topic: &str,
        max_bytes: usize,
        checkpoint: bool,
    ) -> io::Result<Vec<Entry>> {
        self.engine
            .read_next(topic, usize::MAX, max_bytes, checkpoint)
    }

    /// Stateless read: up to `max_entries` entries starting at entry `offset`, their payloads
    /// totalling at most `max_bytes` (at least one entry if `offset` exists). The i-th entry
    /// returned has offset `offset + i`. The cursor does not move.
    pub fn read_from(
        &self,
        topic: &str,
        offset: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> io::Result<Vec<Entry>> {
        self.engine.read_from(topic, offset, max_entries, max_bytes)
    }

    /// Number of entries ever appended to `topic` (its end offset), or 0 for an unknown topic.
    pub fn entry_count(&self, topic: &str) -> u64 {
        self.engine.bounds(topic).map_or(0, |(_, end)| end)
    }

    /// The first offset still stored for `topic` (above 0 once consumed segments are reclaimed).
    pub fn first_offset(&self, topic: &str) -> u64 {
        self.engine.bounds(topic).map_or(0, |(first, _)| first)
    }

    /// The topic's cursor: offset of the next entry `read_next` returns.
    pub fn cursor(&self, topic: &str) -> u64 {
        self.engine.cursor_of(topic).unwrap_or(0)
    }

    /// Names of all topics, sorted.
    pub fn topics(&self) -> Vec<String> {
        self.engine.topic_names()
    }

    /// Makes every append so far durable now, whatever the schedule (a no-op under `NoFsync`).
    pub fn sync(&self) -> io::Result<()> {
        self.engine.sync(None)
    }
}

impl<D: Disk> Drop for Walrus<D> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.sync_thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        if let FsyncSchedule::Milliseconds(_) = self.engine.fsync_schedule() {
            if let Err(e) = self.engine.sync(None) {
                tracing::warn!(error = %e, "final sync on close failed");
            }
        }
        // SAFETY: `engine` is never touched again: this is the end of `drop`, apart from
        // joining the group-commit thread, which only exits once the engine (the owner of its
        // queue's sender) is gone.
        unsafe { ManuallyDrop::drop(&mut self.engine) };
        if let Some(t) = self.wal_thread.take() {
            let _ = t.join();
        }
    }
}
