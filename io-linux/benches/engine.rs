//! Storage-engine benchmark: workloads E1–E4 of BENCHMARKS.md, run through the same workload
//! code against our embedded engine (`walrus`), upstream `walrus-rust` 0.2 and, when built with
//! `--features bench-rocksdb`, RocksDB's WAL; the disk's ceilings are measured in the same run.
//!
//! ```text
//! cargo bench -p walrus --bench engine -- [--quick] [--secs N] [--phase-secs N]
//!     [--only e1,e2,e3,e4] [--engines walrus,walrus-rust,rocksdb] [--dir PATH]
//!     [--max-gib N] [--seed N] [--backend io_uring|pwrite] [--round-secs N]
//! ```
//!
//! Every write phase opens all engines at once, each on a fresh directory, and lets them take
//! turns in rounds of about a second (A B, B A, …), so that load drifting on a shared machine
//! hits every engine alike; durable phases also probe the disk's fdatasync rate before each
//! round. A failing or panicking engine is reported as "failed: …" and the run goes on.
//!
//! Prints markdown: the machine, the ceilings (at the start and at the end), one table per
//! workload (a column per engine and the ratio of each engine to walrus-rust), the targets, and
//! the process's peak RSS.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// `batch_read_for_topic` budget of E3 and of E4's read-back.
const READ_BATCH_BYTES: usize = 1 << 20;
/// Cursor persistence of the write phases (as BENCHMARKS.md configures both engines).
const PERSIST_EVERY: u32 = 1_000_000;

// ------------------------------------------------------------------------------------- options

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Walrus,
    WalrusRust,
    RocksDb,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Walrus => "walrus",
            Kind::WalrusRust => "walrus-rust",
            Kind::RocksDb => "rocksdb",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        match s {
            "walrus" | "ours" => Some(Kind::Walrus),
            "walrus-rust" | "walrus_rust" | "upstream" => Some(Kind::WalrusRust),
            "rocksdb" | "rocks" => Some(Kind::RocksDb),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Opts {
    /// E1/E2 duration per phase.
    secs: f64,
    /// E4 duration per phase.
    phase_secs: f64,
    /// Duration of the fdatasync ceiling.
    ceiling_secs: f64,
    /// Bytes written by the sequential-write ceiling.
    seq_bytes: u64,
    /// A write phase stops early once it has written this many payload bytes (disk space: walrus-rust
    /// keeps every file it opened open until the process exits, so deleting its data frees nothing).
    max_bytes: u64,
    workloads: [bool; 4],
    engines: Vec<Kind>,
    dir: PathBuf,
    seed: u64,
    quick: bool,
    /// Write path of our engine.
    backend: walrus::Backend,
    /// Length of one engine's turn in a phase.
    round_secs: f64,
}

const USAGE: &str = "\
usage: cargo bench -p walrus --bench engine -- [options]
  --secs N              E1/E2 seconds per phase (default 15)
  --phase-secs N        E4 seconds per phase (default 5)
  --quick               2 s everything, smaller ceilings and caps
  --only e1,e2,e3,e4    workloads to run (default all)
  --engines LIST        walrus,walrus-rust[,rocksdb] (rocksdb needs --features bench-rocksdb)
  --dir PATH            scratch directory on the disk under test (deleted afterwards)
  --max-gib N           stop a write phase after N GiB of payload (default 6)
  --seed N              PRNG seed (default 42)
  --backend B           walrus write path: io_uring (default) or pwrite
  --round-secs N        engines of a phase take turns in rounds of about N s (default 1)";

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        secs: 15.0,
        phase_secs: 5.0,
        ceiling_secs: 3.0,
        seq_bytes: GIB,
        max_bytes: 6 * GIB,
        workloads: [true; 4],
        engines: vec![Kind::Walrus, Kind::WalrusRust],
        dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("engine-bench-{}", std::process::id())),
        seed: 42,
        quick: false,
        backend: walrus::Backend::IoUring,
        round_secs: 1.0,
    };
    if cfg!(feature = "bench-rocksdb") {
        o.engines.push(Kind::RocksDb);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `--quick` first so explicit durations win whatever the order.
    if args.iter().any(|a| a == "--quick") {
        o.quick = true;
        o.secs = 2.0;
        o.phase_secs = 2.0;
        o.ceiling_secs = 1.0;
        o.seq_bytes = 256 * MIB;
        o.max_bytes = 2 * GIB;
    }
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let secs = |v: String, name: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && s.is_finite())
                .ok_or_else(|| format!("{name}: not a positive number of seconds: {v}"))
        };
        match flag.as_str() {
            // cargo bench passes `--bench` to harness-less benches.
            "--bench" | "--quick" => {}
            "--secs" => o.secs = secs(value("--secs")?, "--secs")?,
            "--phase-secs" => o.phase_secs = secs(value("--phase-secs")?, "--phase-secs")?,
            "--round-secs" => o.round_secs = secs(value("--round-secs")?, "--round-secs")?,
            "--max-gib" => {
                let v = value("--max-gib")?;
                let g: f64 = v
                    .parse()
                    .ok()
                    .filter(|g: &f64| *g > 0.0)
                    .ok_or(format!("--max-gib: bad value {v}"))?;
                o.max_bytes = (g * GIB as f64) as u64;
            }
            "--seed" => {
                let v = value("--seed")?;
                o.seed = v.parse().map_err(|_| format!("--seed: bad value {v}"))?;
            }
            "--dir" => o.dir = PathBuf::from(value("--dir")?),
            "--backend" => {
                o.backend = match value("--backend")?.as_str() {
                    "io_uring" | "io-uring" | "uring" => walrus::Backend::IoUring,
                    "pwrite" => walrus::Backend::Pwrite,
                    other => return Err(format!("--backend: unknown backend {other}")),
                }
            }
            "--only" => {
                o.workloads = [false; 4];
                for w in value("--only")?.split(',').filter(|w| !w.is_empty()) {
                    match w.trim().to_ascii_lowercase().as_str() {
                        "e1" => o.workloads[0] = true,
                        "e2" => o.workloads[1] = true,
                        "e3" => o.workloads[2] = true,
                        "e4" => o.workloads[3] = true,
                        other => return Err(format!("--only: unknown workload {other}")),
                    }
                }
            }
            "--engines" => {
                o.engines.clear();
                for e in value("--engines")?.split(',').filter(|e| !e.is_empty()) {
                    let k = Kind::parse(e.trim())
                        .ok_or_else(|| format!("--engines: unknown engine {e}"))?;
                    if !o.engines.contains(&k) {
                        o.engines.push(k);
                    }
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.engines.is_empty() {
        return Err("--engines: no engine".into());
    }
    Ok(o)
}

// ------------------------------------------------------------------------------------- engines

/// What every engine offers the workloads. Reads consume from the topic's cursor to the end and
/// return what they saw; every entry is copied out, as the walrus APIs do.
trait Engine: Send + Sync {
    fn append(&self, topic: &str, data: &[u8]) -> io::Result<()>;
    fn batch_append(&self, topic: &str, batch: &[&[u8]]) -> io::Result<()>;
    /// Reads to the end with batch reads of at most `max_bytes` of payload each.
    fn read_all_batch(&self, topic: &str, max_bytes: usize) -> io::Result<Counts>;
    /// Reads to the end one entry per call.
    fn read_all_next(&self, topic: &str) -> io::Result<Counts>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    entries: u64,
    bytes: u64,
}

impl Counts {
    fn add(&mut self, len: usize) {
        self.entries += 1;
        self.bytes += len as u64;
    }
}

#[derive(Clone, Copy)]
struct OpenAs {
    backend: walrus::Backend,
    durable: bool,
    /// Read-only reopen of E3: cursors are never persisted (so a second pass starts at 0 again)
    /// and nothing is reclaimed.
    reading: bool,
}

struct Ours(walrus::Walrus);
struct Upstream(walrus_rust::Walrus);

/// Both walrus flavours have the same method names; only their types differ.
macro_rules! walrus_api_engine {
    ($t:ty) => {
        impl Engine for $t {
            fn append(&self, topic: &str, data: &[u8]) -> io::Result<()> {
                self.0.append_for_topic(topic, data)
            }
            fn batch_append(&self, topic: &str, batch: &[&[u8]]) -> io::Result<()> {
                self.0.batch_append_for_topic(topic, batch)
            }
            fn read_all_batch(&self, topic: &str, max_bytes: usize) -> io::Result<Counts> {
                let mut c = Counts::default();
                loop {
                    let got = self.0.batch_read_for_topic(topic, max_bytes, true)?;
                    if got.is_empty() {
                        return Ok(c);
                    }
                    for e in &got {
                        c.add(e.data.len());
                    }
                }
            }
            fn read_all_next(&self, topic: &str) -> io::Result<Counts> {
                let mut c = Counts::default();
                while let Some(e) = self.0.read_next(topic, true)? {
                    c.add(e.data.len());
                }
                Ok(c)
            }
        }
    };
}
walrus_api_engine!(Ours);
walrus_api_engine!(Upstream);

/// Opens `kind` on `base/key`, a directory of its own.
fn open_engine(kind: Kind, base: &Path, key: &str, how: OpenAs) -> io::Result<Box<dyn Engine>> {
    let persist_every = if how.reading { u32::MAX } else { PERSIST_EVERY };
    match kind {
        Kind::Walrus => {
            use walrus::{FsyncSchedule, ReadConsistency};
            let wal = walrus::Walrus::builder()
                .data_dir(base.join(key))
                .consistency(ReadConsistency::AtLeastOnce { persist_every })
                .fsync_schedule(if how.durable {
                    FsyncSchedule::SyncEach
                } else {
                    FsyncSchedule::NoFsync
                })
                .backend(how.backend)
                .reclaim_consumed(!how.reading)
                .build()?;
            Ok(Box::new(Ours(wal)))
        }
        Kind::WalrusRust => {
            use walrus_rust::{FsyncSchedule, ReadConsistency};
            // Its root is `$WALRUS_DATA_DIR/<key>`; main points WALRUS_DATA_DIR at `base`.
            let wal = walrus_rust::Walrus::with_consistency_and_schedule_for_key(
                key,
                ReadConsistency::AtLeastOnce { persist_every },
                if how.durable {
                    FsyncSchedule::SyncEach
                } else {
                    FsyncSchedule::NoFsync
                },
            )?;
            Ok(Box::new(Upstream(wal)))
        }
        Kind::RocksDb => rocks::open(&base.join(key), how.durable),
    }
}

#[cfg(feature = "bench-rocksdb")]
mod rocks {
    //! RocksDB as a log: key = topic, 0x00, big-endian sequence number; the WAL is on, synced per
    //! write group under `durable` (`WriteOptions::set_sync`). No compression is built in.
    use super::{Counts, Engine};
    use rocksdb::{DBCompressionType, Options, WriteBatch, WriteOptions, DB};
    use std::collections::HashMap;
    use std::io;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, RwLock};

    pub(super) struct Rocks {
        db: DB,
        wo: WriteOptions,
        seqs: RwLock<HashMap<String, Arc<AtomicU64>>>,
    }

    fn err(e: rocksdb::Error) -> io::Error {
        io::Error::other(e.to_string())
    }

    fn prefix(topic: &str) -> Vec<u8> {
        let mut p = Vec::with_capacity(topic.len() + 9);
        p.extend_from_slice(topic.as_bytes());
        p.push(0);
        p
    }

    pub(super) fn open(dir: &Path, durable: bool) -> io::Result<Box<dyn Engine>> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(DBCompressionType::None);
        opts.increase_parallelism(2);
        let db = DB::open(&opts, dir).map_err(err)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(durable);
        wo.disable_wal(false);
        Ok(Box::new(Rocks {
            db,
            wo,
            seqs: RwLock::new(HashMap::new()),
        }))
    }

    impl Rocks {
        /// Reserves `n` sequence numbers of `topic`; returns the first.
        fn reserve(&self, topic: &str, n: u64) -> u64 {
            if let Some(c) = self
                .seqs
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(topic)
            {
                return c.fetch_add(n, Ordering::Relaxed);
            }
            let mut map = self.seqs.write().unwrap_or_else(|p| p.into_inner());
            map.entry(topic.to_string())
                .or_insert_with(|| Arc::new(AtomicU64::new(0)))
                .fetch_add(n, Ordering::Relaxed)
        }

        fn key(topic: &str, seq: u64) -> Vec<u8> {
            let mut k = prefix(topic);
            k.extend_from_slice(&seq.to_be_bytes());
            k
        }

        /// Iterates the topic from the start; `visit` gets each value.
        fn scan(&self, topic: &str, mut visit: impl FnMut(&[u8])) -> io::Result<()> {
            let p = prefix(topic);
            let mut it = self.db.raw_iterator();
            it.seek(&p);
            while it.valid() {
                match (it.key(), it.value()) {
                    (Some(k), Some(v)) if k.starts_with(&p) => visit(v),
                    _ => break,
                }
                it.next();
            }
            it.status().map_err(err)
        }
    }

    impl Engine for Rocks {
        fn append(&self, topic: &str, data: &[u8]) -> io::Result<()> {
            let seq = self.reserve(topic, 1);
            self.db
                .put_opt(Self::key(topic, seq), data, &self.wo)
                .map_err(err)
        }

        fn batch_append(&self, topic: &str, batch: &[&[u8]]) -> io::Result<()> {
            let first = self.reserve(topic, batch.len() as u64);
            let mut wb = WriteBatch::default();
            for (i, d) in batch.iter().enumerate() {
                wb.put(Self::key(topic, first + i as u64), d);
            }
            self.db.write_opt(wb, &self.wo).map_err(err)
        }

        fn read_all_batch(&self, topic: &str, max_bytes: usize) -> io::Result<Counts> {
            // Copies values into batches of at most `max_bytes`, like `batch_read_for_topic`.
            let mut c = Counts::default();
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut in_batch = 0usize;
            self.scan(topic, |v| {
                if !batch.is_empty() && in_batch + v.len() > max_bytes {
                    batch = Vec::new();
                    in_batch = 0;
                }
                in_batch += v.len();
                c.add(v.len());
                batch.push(v.to_vec());
            })?;
            drop(batch);
            Ok(c)
        }

        fn read_all_next(&self, topic: &str) -> io::Result<Counts> {
            let mut c = Counts::default();
            self.scan(topic, |v| {
                let entry = v.to_vec();
                c.add(entry.len());
            })?;
            Ok(c)
        }
    }
}

#[cfg(not(feature = "bench-rocksdb"))]
mod rocks {
    use super::Engine;
    use std::io;
    use std::path::Path;

    pub(super) fn open(_dir: &Path, _durable: bool) -> io::Result<Box<dyn Engine>> {
        Err(io::Error::other("built without --features bench-rocksdb"))
    }
}

// ------------------------------------------------------------------------------------- workloads

#[derive(Clone, Copy, Debug)]
enum Sizes {
    Uniform(usize, usize),
    Fixed(usize),
}

#[derive(Clone, Debug)]
struct WriteSpec {
    topic: &'static str,
    threads: usize,
    /// All threads append to one topic (E4's concurrent appenders) instead of one topic each.
    shared_topic: bool,
    /// Entries per call; 1 means `append`, more means `batch_append`.
    batch: usize,
    sizes: Sizes,
    secs: f64,
    max_bytes: u64,
    seed: u64,
}

struct WriteOut {
    entries: u64,
    bytes: u64,
    calls: u64,
    secs: f64,
    /// Latency of each append / batch-append call, in nanoseconds.
    hist: Histogram<u64>,
    /// Per topic: what was written.
    topics: Vec<(String, Counts)>,
    /// The phase stopped at the byte cap before its duration.
    capped: bool,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Random bytes the payloads are sliced from.
fn payload_pool(seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_da7a);
    let mut pool = vec![0u8; 4 * MIB as usize];
    rng.fill(&mut pool[..]);
    pool
}

fn run_writes(engine: &dyn Engine, spec: &WriteSpec, pool: &[u8]) -> io::Result<WriteOut> {
    struct ThreadOut {
        topic: String,
        counts: Counts,
        calls: u64,
        hist: Histogram<u64>,
        capped: bool,
    }
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(spec.threads + 1);
    let cap_per_thread = (spec.max_bytes / spec.threads as u64).max(1);
    let duration = Duration::from_secs_f64(spec.secs);
    let (outs, secs) = thread::scope(|s| {
        let handles: Vec<_> = (0..spec.threads)
            .map(|t| {
                let (stop, barrier) = (&stop, &barrier);
                s.spawn(move || -> io::Result<ThreadOut> {
                    let topic = if spec.shared_topic {
                        spec.topic.to_string()
                    } else {
                        format!("{}-{t}", spec.topic)
                    };
                    let mut rng = ChaCha8Rng::seed_from_u64(
                        spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ t as u64,
                    );
                    let mut hist = new_hist();
                    let mut batch: Vec<&[u8]> = Vec::with_capacity(spec.batch);
                    let (mut counts, mut calls, mut capped) = (Counts::default(), 0u64, false);
                    barrier.wait();
                    let deadline = Instant::now() + duration;
                    loop {
                        batch.clear();
                        let mut bytes = 0usize;
                        for _ in 0..spec.batch {
                            let n = match spec.sizes {
                                Sizes::Uniform(lo, hi) => rng.gen_range(lo..=hi),
                                Sizes::Fixed(n) => n,
                            };
                            let at = rng.gen_range(0..=pool.len() - n);
                            batch.push(&pool[at..at + n]);
                            bytes += n;
                        }
                        let t0 = Instant::now();
                        let res = if spec.batch == 1 {
                            engine.append(&topic, batch[0])
                        } else {
                            engine.batch_append(&topic, &batch)
                        };
                        let t1 = Instant::now();
                        if let Err(e) = res {
                            stop.store(true, Ordering::Relaxed);
                            return Err(io::Error::new(
                                e.kind(),
                                format!("append to {topic}: {e}"),
                            ));
                        }
                        hist.saturating_record((t1 - t0).as_nanos() as u64);
                        counts.entries += batch.len() as u64;
                        counts.bytes += bytes as u64;
                        calls += 1;
                        if counts.bytes >= cap_per_thread {
                            capped = true;
                            break;
                        }
                        if t1 >= deadline || stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    Ok(ThreadOut {
                        topic,
                        counts,
                        calls,
                        hist,
                        capped,
                    })
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let outs: Vec<io::Result<ThreadOut>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| panic::resume_unwind(p)))
            .collect();
        (outs, start.elapsed().as_secs_f64())
    });
    let mut out = WriteOut {
        entries: 0,
        bytes: 0,
        calls: 0,
        secs,
        hist: new_hist(),
        topics: Vec::new(),
        capped: false,
    };
    let mut by_topic: HashMap<String, Counts> = HashMap::new();
    for o in outs {
        let o = o?;
        out.entries += o.counts.entries;
        out.bytes += o.counts.bytes;
        out.calls += o.calls;
        out.capped |= o.capped;
        out.hist.add(&o.hist).expect("same histogram bounds");
        let c = by_topic.entry(o.topic).or_default();
        c.entries += o.counts.entries;
        c.bytes += o.counts.bytes;
    }
    out.topics = by_topic.into_iter().collect();
    out.topics.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadHow {
    Batch,
    Next,
}

struct ReadOut {
    got: Counts,
    want: Counts,
    secs: f64,
}

/// Reads every topic to its end, one topic after the other, on this thread.
fn run_reads(
    engine: &dyn Engine,
    topics: &[(String, Counts)],
    how: ReadHow,
) -> io::Result<ReadOut> {
    let start = Instant::now();
    let mut got = Counts::default();
    let mut want = Counts::default();
    for (topic, w) in topics {
        let c = match how {
            ReadHow::Batch => engine.read_all_batch(topic, READ_BATCH_BYTES)?,
            ReadHow::Next => engine.read_all_next(topic)?,
        };
        got.entries += c.entries;
        got.bytes += c.bytes;
        want.entries += w.entries;
        want.bytes += w.bytes;
    }
    Ok(ReadOut {
        got,
        want,
        secs: start.elapsed().as_secs_f64(),
    })
}

// ------------------------------------------------------------------------------------- report

#[derive(Clone, Copy)]
enum Fmt {
    /// Thousands separators, no decimals.
    Int,
    /// One decimal.
    F1,
    /// Two decimals.
    F2,
}

#[derive(Clone)]
enum Value {
    Num(f64, Fmt),
    Text(String),
    Failed(String),
}

struct Row {
    table: &'static str,
    phase: String,
    metric: &'static str,
    engine: Kind,
    value: Value,
    /// Whether a ratio to walrus-rust means anything for this metric.
    ratio: bool,
}

#[derive(Default)]
struct Report {
    header: String,
    /// (ceiling, [value at the start of the run, value at the end]).
    ceilings: Vec<(String, [String; 2])>,
    rows: Vec<Row>,
    notes: Vec<String>,
    engines: Vec<Kind>,
}

const TABLES: [(&str, &str); 4] = [
    (
        "E1",
        "E1: 10 writers, one topic each, `append_for_topic`, payloads uniform 500–1024 B",
    ),
    ("E2", "E2: as E1 with `batch_append_for_topic`, 256 entries per batch"),
    (
        "E3",
        "E3: read back E1's NoFsync data, topic by topic, on a fresh instance (reopen)",
    ),
    (
        "E4",
        "E4: in-process appenders; \"4 appenders\" = 4 threads appending to ONE shared topic; read-back = `batch_read_for_topic` 1 MiB",
    ),
];

fn report() -> &'static Mutex<Report> {
    static R: OnceLock<Mutex<Report>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Report::default()))
}

fn with_report<T>(f: impl FnOnce(&mut Report) -> T) -> T {
    f(&mut report().lock().unwrap_or_else(|p| p.into_inner()))
}

fn push_row(
    table: &'static str,
    phase: &str,
    metric: &'static str,
    engine: Kind,
    value: Value,
    ratio: bool,
) {
    with_report(|r| {
        r.rows.push(Row {
            table,
            phase: phase.to_string(),
            metric,
            engine,
            value,
            ratio,
        })
    });
}

fn num(v: f64, f: Fmt) -> Value {
    Value::Num(v, f)
}

fn group_thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).expect("ASCII digits"))
        .collect();
    let sign = if n < 0 { "-" } else { "" };
    format!("{sign}{}", groups.join(","))
}

fn show(v: &Value) -> String {
    match v {
        Value::Num(x, Fmt::Int) => group_thousands(*x),
        Value::Num(x, Fmt::F1) => format!("{x:.1}"),
        Value::Num(x, Fmt::F2) => format!("{x:.2}"),
        Value::Text(t) => t.clone(),
        Value::Failed(why) => format!("failed: {}", why.replace('|', "/").replace('\n', " ")),
    }
}

impl Report {
    fn value(&self, table: &str, phase: &str, metric: &str, engine: Kind) -> Option<&Value> {
        self.rows
            .iter()
            .find(|r| {
                r.table == table && r.phase == phase && r.metric == metric && r.engine == engine
            })
            .map(|r| &r.value)
    }

    fn number(&self, table: &str, phase: &str, metric: &str, engine: Kind) -> Option<f64> {
        match self.value(table, phase, metric, engine) {
            Some(Value::Num(x, _)) => Some(*x),
            _ => None,
        }
    }

    fn render(&self) -> String {
        let mut s = self.header.clone();
        if !self.ceilings.is_empty() {
            s.push_str(
                "\n## Ceilings (same run, same data directory)\n\n| ceiling | at start | at end |\n|---|---|---|\n",
            );
            for (k, [start, end]) in &self.ceilings {
                let end = if end.is_empty() { "—" } else { end };
                let _ = writeln!(s, "| {k} | {start} | {end} |");
            }
        }
        let has_base = self.engines.contains(&Kind::WalrusRust);
        let others: Vec<Kind> = self
            .engines
            .iter()
            .copied()
            .filter(|k| *k != Kind::WalrusRust)
            .collect();
        for (table, title) in TABLES {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.table == table).collect();
            if rows.is_empty() {
                continue;
            }
            let _ = write!(s, "\n## {title}\n\n| phase | metric |");
            for k in &self.engines {
                let _ = write!(s, " {} |", k.name());
            }
            if has_base {
                for k in &others {
                    let _ = write!(s, " {} ÷ walrus-rust |", k.name());
                }
            }
            s.push_str("\n|---|---|");
            for _ in &self.engines {
                s.push_str("---:|");
            }
            if has_base {
                for _ in &others {
                    s.push_str("---:|");
                }
            }
            s.push('\n');
            // (phase, metric) pairs in first-seen order.
            let mut keys: Vec<(&str, &str, bool)> = Vec::new();
            for r in &rows {
                if !keys.iter().any(|(p, m, _)| *p == r.phase && *m == r.metric) {
                    keys.push((&r.phase, r.metric, r.ratio));
                }
            }
            for (phase, metric, ratio) in keys {
                let _ = write!(s, "| {phase} | {metric} |");
                for k in &self.engines {
                    let v = self
                        .value(table, phase, metric, *k)
                        .map_or_else(|| "—".to_string(), show);
                    let _ = write!(s, " {v} |");
                }
                if has_base {
                    let base = self.number(table, phase, metric, Kind::WalrusRust);
                    for k in &others {
                        let cell = match (ratio, self.number(table, phase, metric, *k), base) {
                            (true, Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
                            _ => "—".to_string(),
                        };
                        let _ = write!(s, " {cell} |");
                    }
                }
                s.push('\n');
            }
        }
        let targets = self.targets();
        if !targets.is_empty() {
            s.push_str("\n## Targets (reported, not asserted)\n\n| target | measured | met |\n|---|---|---|\n");
            for (t, m, ok) in targets {
                let _ = writeln!(s, "| {t} | {m} | {ok} |");
            }
        }
        if !self.notes.is_empty() {
            s.push_str("\n## Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    fn targets(&self) -> Vec<(String, String, &'static str)> {
        let mut out = Vec::new();
        let mark = |ok: Option<bool>| match ok {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "n/a",
        };
        for (phase, want) in [(E1_PHASES[0], 2.0), (E1_PHASES[1], 3.0)] {
            let ours = self.number("E1", phase, "writes/s", Kind::Walrus);
            let base = self.number("E1", phase, "writes/s", Kind::WalrusRust);
            if ours.is_none() && base.is_none() {
                continue;
            }
            let ratio = match (ours, base) {
                (Some(o), Some(b)) if b > 0.0 => Some(o / b),
                _ => None,
            };
            out.push((
                format!("E1 {phase}: walrus ≥ {want}x walrus-rust writes/s"),
                ratio.map_or("—".to_string(), |r| format!("{r:.2}x")),
                mark(ratio.map(|r| r >= want)),
            ));
        }
        for size in E4_SIZES {
            let checks = [
                (
                    e4_phase(size, true, E4_MODES[2]),
                    "append entries/s",
                    13_900.0,
                    "E4 4 durable appenders (one shared topic)",
                ),
                (
                    e4_phase(size, true, E4_MODES[1]),
                    "append entries/s",
                    319_000.0,
                    "E4 durable batch-64",
                ),
            ];
            for (phase, metric, want, what) in checks {
                if let Some(v) = self.number("E4", &phase, metric, Kind::Walrus) {
                    let disk = self
                        .number("E4", &phase, PROBE_METRIC, Kind::Walrus)
                        .map(|d| {
                            format!(
                                " (disk: {} fdatasync/s next to these rounds)",
                                group_thousands(d)
                            )
                        })
                        .unwrap_or_default();
                    out.push((
                        format!("{what}, {size} B: ≥ {} entries/s", group_thousands(want)),
                        format!("{}{disk}", group_thousands(v)),
                        mark(Some(v >= want)),
                    ));
                }
            }
        }
        for durable in [false, true] {
            let mut best: Option<f64> = None;
            for mode in E4_MODES {
                if let Some(v) = self.number(
                    "E4",
                    &e4_phase(100, durable, mode),
                    "read-back entries/s",
                    Kind::Walrus,
                ) {
                    best = Some(best.map_or(v, |b: f64| b.min(v)));
                }
            }
            if let Some(v) = best {
                out.push((
                    format!("E4 read-back at 100 B ({}): ≥ 6,000,000 entries/s (slowest of the 3 read-backs)", mode_name(durable)),
                    group_thousands(v),
                    mark(Some(v >= 6_000_000.0)),
                ));
            }
        }
        out
    }
}

// ------------------------------------------------------------------------------------- phases, panics, watchdog

fn last_panic() -> &'static Mutex<Option<String>> {
    static P: OnceLock<Mutex<Option<String>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(None))
}

fn install_panic_hook() {
    panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = thread::current().name().unwrap_or("unnamed").to_string();
        eprintln!("[engine bench] panic in thread {thread}: {msg}{at}");
        let mut slot = last_panic().lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(format!("panic: {msg}{at}"));
        }
    }));
}

/// When the running phase must be over (the watchdog ends the run after that).
fn phase_deadline() -> &'static Mutex<Option<(Instant, String)>> {
    static D: OnceLock<Mutex<Option<(Instant, String)>>> = OnceLock::new();
    D.get_or_init(|| Mutex::new(None))
}

fn start_watchdog() {
    thread::Builder::new()
        .name("bench-watchdog".into())
        .spawn(|| loop {
            thread::sleep(Duration::from_secs(1));
            let overdue = phase_deadline()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|(at, _)| Instant::now() > *at)
                .map(|(_, name)| name.clone());
            if let Some(name) = overdue {
                let text = match report().try_lock() {
                    Ok(mut r) => {
                        r.notes.push(format!(
                            "**run aborted: phase `{name}` hung past its time budget**"
                        ));
                        r.render()
                    }
                    Err(_) => String::new(),
                };
                println!("{text}");
                eprintln!("[engine bench] phase {name} hung; exiting");
                std::process::exit(3);
            }
        })
        .expect("spawn watchdog");
}

/// Runs one phase: a panic or an error becomes `Err(reason)` instead of ending the run.
fn phase<T>(name: &str, budget_secs: f64, f: impl FnOnce() -> io::Result<T>) -> Result<T, String> {
    eprintln!("[engine bench] {name}");
    *last_panic().lock().unwrap_or_else(|p| p.into_inner()) = None;
    *phase_deadline().lock().unwrap_or_else(|p| p.into_inner()) = Some((
        Instant::now() + Duration::from_secs_f64(budget_secs * 4.0 + 300.0),
        name.to_string(),
    ));
    let res = panic::catch_unwind(AssertUnwindSafe(f));
    *phase_deadline().lock().unwrap_or_else(|p| p.into_inner()) = None;
    match res {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            eprintln!("[engine bench] {name}: error: {e}");
            Err(e.to_string())
        }
        Err(payload) => {
            let why = last_panic()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| {
                    payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".to_string())
                });
            Err(why)
        }
    }
}

/// Removes a phase's data and flushes whatever is still dirty, so the next phase starts on a
/// quiet disk.
fn cleanup(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!("[engine bench] removing {}: {e}", dir.display());
        }
    }
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

// ------------------------------------------------------------------------------------- machine

fn proc_status_kib(field: &str) -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// (anonymous, file-backed) resident MiB.
fn rss_split_mib() -> (f64, f64) {
    let kib = |f| proc_status_kib(f).unwrap_or(0) as f64 / 1024.0;
    (kib("RssAnon"), kib("RssFile") + kib("RssShmem"))
}

fn rss_mib() -> f64 {
    proc_status_kib("VmRSS").unwrap_or(0) as f64 / 1024.0
}

/// Highest VmHWM seen by any phase (each phase resets VmHWM).
static PEAK_RSS_KIB: AtomicU64 = AtomicU64::new(0);

/// Peak RSS of one phase: VmHWM is reset at the start (`/proc/self/clear_refs` "5").
struct PeakRss {
    reset: bool,
}

impl PeakRss {
    fn start() -> PeakRss {
        if let Some(v) = proc_status_kib("VmHWM") {
            PEAK_RSS_KIB.fetch_max(v, Ordering::Relaxed);
        }
        PeakRss {
            reset: fs::write("/proc/self/clear_refs", "5").is_ok(),
        }
    }

    /// Peak RSS in MiB since `start`, if VmHWM could be reset.
    fn finish(self) -> Option<f64> {
        let v = proc_status_kib("VmHWM")?;
        PEAK_RSS_KIB.fetch_max(v, Ordering::Relaxed);
        self.reset.then_some(v as f64 / 1024.0)
    }
}

fn peak_value(p: Option<f64>) -> Value {
    p.map_or_else(|| Value::Text("n/a".into()), |v| num(v, Fmt::Int))
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn first_line(path: &str) -> String {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// (device, fs type, mount point) of the mount holding `dir`.
fn mount_of(dir: &Path) -> (String, String, String) {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut best = ("?".to_string(), "?".to_string(), String::new());
    if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
        for l in mounts.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 3 && dir.starts_with(f[1]) && f[1].len() >= best.2.len() {
                best = (f[0].to_string(), f[2].to_string(), f[1].to_string());
            }
        }
    }
    best
}

fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

fn machine_header(o: &Opts) -> String {
    let (dev, fstype, mnt) = mount_of(&o.dir);
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or("?".to_string(), |kib| {
            format!("{:.1} GiB", kib / (1024.0 * 1024.0))
        });
    let mut s =
        String::from("# walrus storage-engine benchmark (E1–E4)\n\n| machine | |\n|---|---|\n");
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(s, "| nproc | {nproc} |");
    let _ = writeln!(s, "| CPU | {} |", cpu_model());
    let _ = writeln!(
        s,
        "| kernel | {} |",
        first_line("/proc/sys/kernel/osrelease")
    );
    let _ = writeln!(s, "| memory | {mem_gib} |");
    let _ = writeln!(
        s,
        "| data dir | `{}` on {dev} ({fstype}, mounted at {mnt}), {:.1} GiB free |",
        o.dir.display(),
        free_bytes(&o.dir).unwrap_or(0) as f64 / GIB as f64
    );
    let _ = writeln!(
        s,
        "| load average at start | {} |",
        first_line("/proc/loadavg")
    );
    let _ = writeln!(
        s,
        "| options | E1/E2 {} s, E4 {} s per phase and engine, rounds of ~{} s, cap {:.1} GiB per write phase, seed {}{} |",
        o.secs,
        o.phase_secs,
        o.round_secs,
        o.max_bytes as f64 / GIB as f64,
        o.seed,
        if o.quick { ", --quick" } else { "" }
    );
    let _ = writeln!(
        s,
        "| engines | {} |",
        o.engines
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if fstype == "tmpfs" || fstype == "ramfs" {
        s.push_str("\n**Warning: the data dir is on a memory file system; fsync numbers mean nothing. Use --dir.**\n");
    }
    s
}

// ------------------------------------------------------------------------------------- ceilings

/// Short fdatasync probes taken next to the rounds of a durable phase: 4 KiB pwrite + fdatasync
/// on a small preallocated file, as the ceiling but for a fraction of a second.
struct FsyncProbe {
    path: PathBuf,
    file: fs::File,
    next: u64,
}

impl FsyncProbe {
    const BLOCKS: u64 = 256;

    fn new(dir: &Path, name: &str) -> io::Result<FsyncProbe> {
        let path = dir.join(format!("probe-{name}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.write_all_at(&vec![0u8; (Self::BLOCKS * 4 * KIB) as usize], 0)?;
        file.sync_all()?;
        Ok(FsyncProbe {
            path,
            file,
            next: 0,
        })
    }

    /// Returns (calls, seconds).
    fn run(&mut self, secs: f64) -> io::Result<(u64, f64)> {
        let block = [0x5au8; 4096];
        let start = Instant::now();
        let mut n = 0u64;
        while n == 0 || start.elapsed().as_secs_f64() < secs {
            self.file
                .write_all_at(&block, (self.next % Self::BLOCKS) * 4 * KIB)?;
            self.file.sync_data()?;
            self.next += 1;
            n += 1;
        }
        Ok((n, start.elapsed().as_secs_f64()))
    }
}

impl Drop for FsyncProbe {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Length of one probe.
const PROBE_SECS: f64 = 0.2;
const PROBE_METRIC: &str = "disk fdatasync/s (0.2 s probes before its rounds)";

/// fdatasync calls per second: one thread rewriting 4 KiB blocks of a preallocated (zero-written)
/// 16 MiB file, `fdatasync` after each. Returns (calls/s, p50 µs, p99 µs).
fn ceiling_fdatasync(dir: &Path, secs: f64) -> io::Result<(f64, f64, f64)> {
    let path = dir.join("ceiling-fdatasync");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let len = 16 * MIB;
    let zeros = vec![0u8; MIB as usize];
    for i in 0..len / MIB {
        f.write_all_at(&zeros, i * MIB)?;
    }
    f.sync_all()?;
    let block = vec![0xa5u8; 4 * KIB as usize];
    let mut hist = new_hist();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    loop {
        let t0 = Instant::now();
        f.write_all_at(&block, (n % (len / (4 * KIB))) * 4 * KIB)?;
        f.sync_data()?;
        let t1 = Instant::now();
        hist.saturating_record((t1 - t0).as_nanos() as u64);
        n += 1;
        if t1 >= deadline {
            break;
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(&path)?;
    Ok((
        rate,
        hist.value_at_quantile(0.5) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
    ))
}

/// Sequential 1 MiB writes of `bytes` to a new file, then one fdatasync. Returns (MB/s into the
/// page cache before the sync, MB/s including the sync).
fn ceiling_seq_write(dir: &Path, bytes: u64) -> io::Result<(f64, f64)> {
    let path = dir.join("ceiling-seq");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut buf = vec![0u8; MIB as usize];
    ChaCha8Rng::seed_from_u64(7).fill(&mut buf[..]);
    let start = Instant::now();
    let mut at = 0;
    while at < bytes {
        f.write_all_at(&buf, at)?;
        at += MIB;
    }
    let buffered = start.elapsed().as_secs_f64();
    f.sync_data()?;
    let total = start.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(&path)?;
    Ok((at as f64 / 1e6 / buffered, at as f64 / 1e6 / total))
}

// ------------------------------------------------------------------------------------- E1–E4

const E1_PHASES: [&str; 2] = ["NoFsync", "SyncEach"];
const E4_SIZES: [usize; 2] = [100, 1024];
const E4_MODES: [&str; 3] = [
    "1 appender",
    "1 appender, batches of 64",
    "4 appenders, 1 shared topic",
];

fn mode_name(durable: bool) -> &'static str {
    if durable {
        "SyncEach"
    } else {
        "NoFsync"
    }
}

fn e4_phase(size: usize, durable: bool, mode: &str) -> String {
    let size = if size == 1024 {
        "1 KiB".to_string()
    } else {
        format!("{size} B")
    };
    format!("{size}, {}, {mode}", mode_name(durable))
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

struct Bench {
    o: Opts,
    pool: Vec<u8>,
}

/// One engine's part in a phase whose engines take turns in rounds.
struct Slot {
    kind: Kind,
    key: String,
    engine: Option<Box<dyn Engine>>,
    out: Option<WriteOut>,
    failed: Option<String>,
    rounds: usize,
    /// Highest VmHWM (MiB) over its rounds (VmHWM is reset at each round's start).
    peak: Option<f64>,
    /// Sum over its rounds of (RSS after the round − RSS before it), MiB.
    growth: f64,
    /// Process RSS (MiB) before its first round and after its last.
    rss_first: Option<f64>,
    rss_last: f64,
    /// fdatasync probes before its rounds (durable phases): (calls, seconds).
    probe: (u64, f64),
}

impl Slot {
    /// Closes the engine; a panic while closing is reported, not propagated.
    fn close(&mut self) {
        if let Some(e) = self.engine.take() {
            if panic::catch_unwind(AssertUnwindSafe(move || drop(e))).is_err()
                && self.failed.is_none()
            {
                self.failed = Some("panicked while closing".into());
            }
        }
    }

    fn result(&self) -> Result<&WriteOut, String> {
        match (&self.failed, &self.out) {
            (Some(why), _) => Err(why.clone()),
            (None, Some(out)) => Ok(out),
            (None, None) => Err("no round ran".into()),
        }
    }
}

impl WriteOut {
    fn merge(&mut self, o: WriteOut) {
        self.entries += o.entries;
        self.bytes += o.bytes;
        self.calls += o.calls;
        self.secs += o.secs;
        self.capped |= o.capped;
        self.hist.add(&o.hist).expect("same histogram bounds");
        for (topic, c) in o.topics {
            match self.topics.iter_mut().find(|(t, _)| *t == topic) {
                Some((_, mine)) => {
                    mine.entries += c.entries;
                    mine.bytes += c.bytes;
                }
                None => self.topics.push((topic, c)),
            }
        }
    }
}

impl Bench {
    fn key(kind: Kind, phase: &str) -> String {
        format!("{}.{phase}", kind.name())
    }

    /// Opens every engine on a fresh directory of its own, then runs `spec` in rounds of about
    /// `--round-secs` that alternate between the engines (ABBA order), so that drifting load on
    /// a shared machine hits every engine alike. Each engine's results are summed over its rounds.
    fn write_rounds(
        &self,
        name: &str,
        phase_key: &str,
        spec: &WriteSpec,
        durable: bool,
    ) -> Vec<Slot> {
        let mut slots: Vec<Slot> = self
            .o
            .engines
            .iter()
            .map(|&kind| {
                let key = Self::key(kind, phase_key);
                let how = OpenAs {
                    backend: self.o.backend,
                    durable,
                    reading: false,
                };
                let opened = phase(&format!("{name} {}: open", kind.name()), 10.0, || {
                    open_engine(kind, &self.o.dir, &key, how)
                });
                let (engine, failed) = match opened {
                    Ok(e) => (Some(e), None),
                    Err(why) => (None, Some(format!("open: {why}"))),
                };
                Slot {
                    kind,
                    key,
                    engine,
                    out: None,
                    failed,
                    rounds: 0,
                    peak: None,
                    growth: 0.0,
                    rss_first: None,
                    rss_last: 0.0,
                    probe: (0, 0.0),
                }
            })
            .collect();
        let mut probe = if durable {
            FsyncProbe::new(&self.o.dir, phase_key)
                .map_err(|e| eprintln!("[engine bench] fdatasync probe: {e}"))
                .ok()
        } else {
            None
        };
        let rounds = ((spec.secs / self.o.round_secs).round() as usize).max(1);
        let round_secs = spec.secs / rounds as f64;
        for r in 0..rounds {
            let order: Vec<usize> = if r % 2 == 0 {
                (0..slots.len()).collect()
            } else {
                (0..slots.len()).rev().collect()
            };
            for i in order {
                let slot = &mut slots[i];
                let written = slot.out.as_ref().map_or(0, |o| o.bytes);
                let Some(engine) = slot.engine.as_deref() else {
                    continue;
                };
                if written >= spec.max_bytes {
                    continue;
                }
                let round_spec = WriteSpec {
                    secs: round_secs,
                    max_bytes: spec.max_bytes - written,
                    seed: spec.seed.wrapping_add(r as u64),
                    ..spec.clone()
                };
                if let Some(p) = probe.as_mut() {
                    match p.run(PROBE_SECS) {
                        Ok((n, t)) => {
                            slot.probe.0 += n;
                            slot.probe.1 += t;
                        }
                        Err(e) => eprintln!("[engine bench] fdatasync probe: {e}"),
                    }
                }
                let label = format!("{name} {} round {}/{rounds}", slot.kind.name(), r + 1);
                let res = phase(&label, round_secs, || {
                    let peak = PeakRss::start();
                    let before = rss_mib();
                    let out = run_writes(engine, &round_spec, &self.pool)?;
                    let after = rss_mib();
                    Ok((out, peak.finish(), before, after))
                });
                match res {
                    Ok((out, peak, before, after)) => {
                        match &mut slot.out {
                            Some(acc) => acc.merge(out),
                            None => slot.out = Some(out),
                        }
                        slot.rounds += 1;
                        slot.peak = match (slot.peak, peak) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            (a, b) => a.or(b),
                        };
                        slot.growth += after - before;
                        slot.rss_first.get_or_insert(before);
                        slot.rss_last = after;
                    }
                    Err(why) => {
                        slot.failed = Some(why);
                        slot.close();
                    }
                }
                // Every round starts with nothing left dirty by the one before it.
                // SAFETY: sync(2) has no preconditions.
                unsafe { libc::sync() };
            }
        }
        slots
    }

    /// E1 (and, on its NoFsync data, E3) or E2.
    fn e1_e2(&self, table: &'static str, batch: usize) {
        let run_e3 = table == "E1" && self.o.workloads[2];
        let report_writes =
            (table == "E1" && self.o.workloads[0]) || (table == "E2" && self.o.workloads[1]);
        for durable in [false, true] {
            if !report_writes && durable {
                continue;
            }
            let mode = mode_name(durable);
            let spec = WriteSpec {
                topic: "writer",
                threads: 10,
                shared_topic: false,
                batch,
                sizes: Sizes::Uniform(500, 1024),
                secs: self.o.secs,
                max_bytes: self.o.max_bytes,
                seed: self.o.seed,
            };
            let phase_key = format!("{}-{}", table.to_lowercase(), mode.to_lowercase());
            let rss_before = rss_mib();
            let mut slots =
                self.write_rounds(&format!("{table} {mode}"), &phase_key, &spec, durable);
            for s in &mut slots {
                s.close();
            }
            let rss_closed = rss_mib();
            if report_writes {
                for s in &slots {
                    self.write_rows(table, mode, batch, s);
                }
                if table == "E1" {
                    with_report(|r| {
                        r.notes.push(format!(
                            "E1 {mode}: process RSS {rss_before:.0} MiB before the phase, {rss_closed:.0} MiB after \
                             closing its engines"
                        ))
                    });
                }
            }
            if run_e3 && !durable {
                self.e3(&slots);
            }
            for s in &slots {
                cleanup(&self.o.dir.join(&s.key));
            }
        }
    }

    /// The disk's fdatasync rate measured next to this engine's rounds, if it was probed.
    fn probe_row(table: &'static str, phase: &str, s: &Slot) {
        if s.probe.1 > 0.0 {
            let rate = num(s.probe.0 as f64 / s.probe.1, Fmt::Int);
            push_row(table, phase, PROBE_METRIC, s.kind, rate, false);
        }
    }

    fn write_rows(&self, table: &'static str, mode: &str, batch: usize, s: &Slot) {
        let rate_metric = if batch == 1 { "writes/s" } else { "entries/s" };
        let out = match s.result() {
            Ok(out) => out,
            Err(why) => {
                push_row(table, mode, rate_metric, s.kind, Value::Failed(why), true);
                return;
            }
        };
        let rate = out.entries as f64 / out.secs;
        push_row(table, mode, rate_metric, s.kind, num(rate, Fmt::Int), true);
        let mbs = out.bytes as f64 / 1e6 / out.secs;
        push_row(
            table,
            mode,
            "MB/s (payload)",
            s.kind,
            num(mbs, Fmt::F1),
            true,
        );
        if batch > 1 {
            let bps = out.calls as f64 / out.secs;
            push_row(table, mode, "batches/s", s.kind, num(bps, Fmt::Int), true);
        }
        let (p50, p99) = if batch == 1 {
            ("p50 append µs", "p99 append µs")
        } else {
            ("p50 batch µs", "p99 batch µs")
        };
        let q = |x| num(us(out.hist.value_at_quantile(x)), Fmt::F1);
        push_row(table, mode, p50, s.kind, q(0.5), true);
        push_row(table, mode, p99, s.kind, q(0.99), true);
        Self::probe_row(table, mode, s);
        let run = format!(
            "{:.1} s in {} rounds{}, {}",
            out.secs,
            s.rounds,
            if out.capped { " (byte cap)" } else { "" },
            group_thousands(out.entries as f64)
        );
        push_row(
            table,
            mode,
            "time, entries",
            s.kind,
            Value::Text(run),
            false,
        );
        push_row(
            table,
            mode,
            "peak RSS MiB (its rounds)",
            s.kind,
            peak_value(s.peak),
            true,
        );
        if table == "E1" {
            let rss = format!(
                "{:.0} → {:.0} (growth over its rounds {:+.1})",
                s.rss_first.unwrap_or(0.0),
                s.rss_last,
                s.growth
            );
            push_row(
                table,
                mode,
                "process RSS MiB, first → last round",
                s.kind,
                Value::Text(rss),
                false,
            );
        }
    }

    /// E3: each engine reopens E1's NoFsync data and reads it all, once with batch reads and
    /// once with `read_next` (a fresh instance for each pass).
    fn e3(&self, slots: &[Slot]) {
        for (how, label) in [
            (ReadHow::Batch, "batch_read_for_topic (1 MiB)"),
            (ReadHow::Next, "read_next"),
        ] {
            for s in slots {
                let topics = match s.result() {
                    Ok(out) => &out.topics,
                    Err(why) => {
                        let why = Value::Failed(format!("E1 failed: {why}"));
                        push_row("E3", label, "entries/s", s.kind, why, true);
                        continue;
                    }
                };
                let how_open = OpenAs {
                    backend: self.o.backend,
                    durable: false,
                    reading: true,
                };
                let res = phase(
                    &format!("E3 {label} {}", s.kind.name()),
                    self.o.secs,
                    || {
                        let peak = PeakRss::start();
                        let t0 = Instant::now();
                        let engine = open_engine(s.kind, &self.o.dir, &s.key, how_open)?;
                        let open_secs = t0.elapsed().as_secs_f64();
                        let out = run_reads(&*engine, topics, how)?;
                        let split = rss_split_mib();
                        drop(engine);
                        Ok((open_secs, out, peak.finish(), split))
                    },
                );
                let (open_secs, out, peak, (anon, file)) = match res {
                    Ok(v) => v,
                    Err(why) => {
                        push_row("E3", label, "entries/s", s.kind, Value::Failed(why), true);
                        continue;
                    }
                };
                let eps = out.got.entries as f64 / out.secs;
                push_row("E3", label, "entries/s", s.kind, num(eps, Fmt::Int), true);
                let mbs = out.got.bytes as f64 / 1e6 / out.secs;
                push_row(
                    "E3",
                    label,
                    "MB/s (payload)",
                    s.kind,
                    num(mbs, Fmt::F1),
                    true,
                );
                let check = if out.got == out.want {
                    format!("all {}", group_thousands(out.got.entries as f64))
                } else {
                    format!(
                        "MISMATCH: {} of {} entries, {} of {} bytes",
                        group_thousands(out.got.entries as f64),
                        group_thousands(out.want.entries as f64),
                        group_thousands(out.got.bytes as f64),
                        group_thousands(out.want.bytes as f64)
                    )
                };
                push_row(
                    "E3",
                    label,
                    "entries read back",
                    s.kind,
                    Value::Text(check),
                    false,
                );
                let open = num(open_secs, Fmt::F2);
                push_row(
                    "E3",
                    label,
                    "open (recovery) s, untimed",
                    s.kind,
                    open,
                    true,
                );
                push_row(
                    "E3",
                    label,
                    "peak RSS MiB (open + read)",
                    s.kind,
                    peak_value(peak),
                    true,
                );
                let split = Value::Text(format!("{anon:.0} / {file:.0}"));
                let metric = "RSS MiB after reading: anon / file-backed";
                push_row("E3", label, metric, s.kind, split, false);
            }
        }
    }

    fn e4(&self) {
        let mut peaks: HashMap<&'static str, f64> = HashMap::new();
        for size in E4_SIZES {
            for durable in [false, true] {
                for (m, mode) in E4_MODES.iter().enumerate() {
                    let label = e4_phase(size, durable, mode);
                    let spec = WriteSpec {
                        topic: "e4",
                        threads: if m == 2 { 4 } else { 1 },
                        shared_topic: true,
                        batch: if m == 1 { 64 } else { 1 },
                        sizes: Sizes::Fixed(size),
                        secs: self.o.phase_secs,
                        max_bytes: self.o.max_bytes,
                        seed: self.o.seed,
                    };
                    let phase_key = format!("e4-{size}-{}-{m}", mode_name(durable).to_lowercase());
                    let mut slots =
                        self.write_rounds(&format!("E4 {label}"), &phase_key, &spec, durable);
                    for s in &mut slots {
                        self.e4_rows(&label, m, s, &mut peaks);
                        s.close();
                        cleanup(&self.o.dir.join(&s.key));
                    }
                }
            }
        }
        for &kind in &self.o.engines {
            if let Some(p) = peaks.get(kind.name()) {
                let v = num(*p, Fmt::Int);
                push_row(
                    "E4",
                    "all E4 phases",
                    "peak RSS MiB (highest round)",
                    kind,
                    v,
                    true,
                );
            }
        }
    }

    /// E4's rows for one engine, after reading everything it wrote back.
    fn e4_rows(&self, label: &str, mode: usize, s: &Slot, peaks: &mut HashMap<&'static str, f64>) {
        let w = match s.result() {
            Ok(w) => w,
            Err(why) => {
                push_row(
                    "E4",
                    label,
                    "append entries/s",
                    s.kind,
                    Value::Failed(why),
                    true,
                );
                return;
            }
        };
        if let Some(p) = s.peak {
            let e = peaks.entry(s.kind.name()).or_insert(0.0);
            *e = e.max(p);
        }
        let rate = num(w.entries as f64 / w.secs, Fmt::Int);
        push_row("E4", label, "append entries/s", s.kind, rate, true);
        let p99 = num(us(w.hist.value_at_quantile(0.99)), Fmt::F1);
        let p99_metric = if mode == 1 {
            "p99 call µs (batch)"
        } else {
            "p99 call µs"
        };
        push_row("E4", label, p99_metric, s.kind, p99, true);
        Self::probe_row("E4", label, s);
        let Some(engine) = s.engine.as_deref() else {
            return;
        };
        let res = phase(
            &format!("E4 {label} {}: read back", s.kind.name()),
            60.0,
            || run_reads(engine, &w.topics, ReadHow::Batch),
        );
        match res {
            Ok(r) => {
                let rate = num(r.got.entries as f64 / r.secs, Fmt::Int);
                push_row("E4", label, "read-back entries/s", s.kind, rate, true);
                if r.got != r.want {
                    let check = Value::Text(format!(
                        "MISMATCH: {} of {} entries",
                        group_thousands(r.got.entries as f64),
                        group_thousands(r.want.entries as f64)
                    ));
                    push_row("E4", label, "read-back check", s.kind, check, false);
                }
            }
            Err(why) => push_row(
                "E4",
                label,
                "read-back entries/s",
                s.kind,
                Value::Failed(why),
                true,
            ),
        }
    }
}

/// Measures both ceilings into column `col` (0 = start of the run, 1 = end).
fn measure_ceilings(o: &Opts, col: usize) {
    let when = if col == 0 { "start" } else { "end" };
    let fsync = phase(
        &format!("ceiling: fdatasync ({when})"),
        o.ceiling_secs,
        || ceiling_fdatasync(&o.dir, o.ceiling_secs),
    )
    .map_or_else(
        |why| format!("failed: {why}"),
        |(rate, p50, p99)| {
            format!(
                "{} /s (p50 {p50:.0} µs, p99 {p99:.0} µs)",
                group_thousands(rate)
            )
        },
    );
    let seq = phase(&format!("ceiling: sequential write ({when})"), 60.0, || {
        ceiling_seq_write(&o.dir, o.seq_bytes)
    })
    .map_or_else(
        |why| format!("failed: {why}"),
        |(buffered, durable)| format!("{durable:.0} MB/s (page cache alone: {buffered:.0} MB/s)"),
    );
    let rows = [
        (
            format!(
                "fdatasync calls/s (1 thread, 4 KiB pwrite + fdatasync, preallocated file, {} s)",
                o.ceiling_secs
            ),
            fsync,
        ),
        (
            format!(
                "sequential write MB/s ({} MiB in 1 MiB writes + one fdatasync)",
                o.seq_bytes / MIB
            ),
            seq,
        ),
    ];
    with_report(|r| {
        for (i, (name, value)) in rows.into_iter().enumerate() {
            if r.ceilings.len() <= i {
                r.ceilings.push((name, [String::new(), String::new()]));
            }
            r.ceilings[i].1[col] = value;
        }
    });
}

fn main() {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(if e.is_empty() { 0 } else { 2 });
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(io::stderr)
        .try_init();
    install_panic_hook();
    if o.dir.exists() {
        fs::remove_dir_all(&o.dir).unwrap_or_else(|e| panic!("clearing {}: {e}", o.dir.display()));
    }
    fs::create_dir_all(&o.dir).unwrap_or_else(|e| panic!("creating {}: {e}", o.dir.display()));
    // walrus-rust reads these at every construction (and WALRUS_QUIET at every debug print); set
    // them while this process has no other thread.
    std::env::set_var("WALRUS_DATA_DIR", &o.dir);
    std::env::set_var("WALRUS_QUIET", "1");
    start_watchdog();

    with_report(|r| {
        r.header = machine_header(&o);
        r.engines = o.engines.clone();
    });
    if let Some(free) = free_bytes(&o.dir) {
        let need = 4 * o.max_bytes + 4 * GIB;
        if free < need {
            with_report(|r| {
                r.notes.push(format!(
                    "only {:.1} GiB free for a cap of {:.1} GiB per phase; consider --max-gib",
                    free as f64 / GIB as f64,
                    o.max_bytes as f64 / GIB as f64
                ))
            });
        }
    }

    measure_ceilings(&o, 0);
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };

    if o.engines.contains(&Kind::WalrusRust) {
        // walrus-rust opens its files with O_SYNC iff the first instance of the process was
        // SyncEach (a process-global OnceLock). Pin it to NoFsync, so its NoFsync phases do not
        // sync; its SyncEach appends still fsync the file after every append or batch.
        let key = "walrus-rust.pin-schedule";
        let res = phase(
            "walrus-rust: pin the process-global fsync schedule",
            10.0,
            || {
                open_engine(
                    Kind::WalrusRust,
                    &o.dir,
                    key,
                    OpenAs {
                        backend: o.backend,
                        durable: false,
                        reading: false,
                    },
                )
                .map(drop)
            },
        );
        if let Err(why) = res {
            with_report(|r| {
                r.notes
                    .push(format!("walrus-rust could not be opened: {why}"))
            });
        }
        cleanup(&o.dir.join(key));
    }

    let bench = Bench {
        pool: payload_pool(o.seed),
        o: o.clone(),
    };
    if o.workloads[0] || o.workloads[2] {
        bench.e1_e2("E1", 1);
    }
    if o.workloads[1] {
        bench.e1_e2("E2", 256);
    }
    if o.workloads[3] {
        bench.e4();
    }

    measure_ceilings(&o, 1);
    let hwm = proc_status_kib("VmHWM")
        .unwrap_or(0)
        .max(PEAK_RSS_KIB.load(Ordering::Relaxed)) as f64
        / 1024.0;
    with_report(|r| {
        r.notes.push(format!(
            "peak RSS of the whole process (VmHWM, all engines and phases): {hwm:.0} MiB; walrus-rust keeps \
             every file it ever opened open (and its background threads running) until the process exits"
        ));
        r.notes.push(format!(
            "load average at the end: {}",
            first_line("/proc/loadavg")
        ));
        r.notes.push(
            "MB = 10^6 payload bytes; latencies are per call (one append or one batch), measured by the calling thread; \
             a ratio is engine ÷ walrus-rust, so for latencies and open times lower is better"
                .into(),
        );
        r.notes.push(
            format!(
                "each write phase opens every engine on a fresh data directory of its own; the engines then take turns \
                 in rounds of about {} s (order A B, B A, A B, …; sync(2) after every round, untimed) and each engine's \
                 rates are over the sum of its rounds, so that load drifting on this shared machine hits all engines \
                 alike; afterwards the directories are deleted; reads are served from the page cache (data just \
                 written)",
                o.round_secs
            ),
        );
        r.notes.push(format!(
            "engine settings: walrus = {:?} backend, AtLeastOnce{{persist_every: {PERSIST_EVERY}}}; walrus-rust = \
             AtLeastOnce{{persist_every: {PERSIST_EVERY}}}, FD backend (its default); walrus-rust decides once per process, \
             at its first instance, whether its files get O_SYNC (SyncEach) or not, so the bench opens a NoFsync \
             instance first: its NoFsync phases then really skip syncing, and its SyncEach appends still fsync after \
             every append or batch; E3 reopens both with persist_every = u32::MAX (and no reclaiming) so that the \
             read_next pass starts at offset 0 again",
            o.backend
        ));
        if o.engines.contains(&Kind::RocksDb) {
            r.notes.push(
                "rocksdb: one key prefix per topic (topic, 0x00, big-endian sequence), WAL on, WriteOptions::set_sync \
                 = durable, no compression, raw iterator for reads (values copied out)"
                    .into(),
            );
        }
    });
    with_report(|r| {
        let short_reads: Vec<String> = r
            .rows
            .iter()
            .filter(|row| row.metric == "read-back check")
            .map(|row| format!("{} ({})", row.phase, row.engine.name()))
            .collect();
        if !short_reads.is_empty() {
            r.notes.push(format!(
                "read-back returned fewer entries than were written in: {}; the read-back rate counts only \
                 the entries returned. (walrus-rust 0.2's batch_read_for_topic on a live instance skips the \
                 rest of a block at block boundaries; reproduced outside this benchmark.)",
                short_reads.join("; ")
            ));
        }
    });
    let text = with_report(|r| r.render());
    println!("{text}");
    if let Err(e) = fs::remove_dir_all(&o.dir) {
        eprintln!("[engine bench] removing {}: {e}", o.dir.display());
    }
}
