//! `walrus-bench`: runs the BENCHMARKS.md workloads P1–P4 against a walrus node or a 3-node
//! cluster that it starts itself on loopback, measures the loopback TCP ceiling in the same run,
//! and prints a markdown report.
//!
//! Every repeat starts fresh node processes on a fresh data directory, runs the produce phases
//! (P1, P2, P3 for each payload size) against one topic, then reads everything back (P4). The
//! processes it started are killed by their `Child` handles when a repeat ends, on error too.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use walrus_core::wire::{parse_reply, put_frame, take_frame, Reply};

/// Topic every phase writes to and P4 reads back.
const TOPIC: &str = "bench";
/// Largest reply frame accepted (METRICS and STATE can be large).
const REPLY_LEN_MAX: usize = 16 << 20;
/// Socket read/write timeout: no wait on a node is unbounded.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a node to serve (or a cluster to form).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of the loopback ceiling's request and reply bodies.
const CEILING_BODY: usize = 100;
/// Lines of warnings/errors from the node logs kept for the report.
const LOG_SAMPLES_MAX: usize = 8;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "walrus-bench",
    about = "Runs workloads P1-P4 against walrus nodes it starts on loopback"
)]
struct Args {
    /// Nodes to start: 1 (single node) or 3 (cluster).
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Seconds each produce phase (and the loopback ceiling) runs.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    secs: u64,
    /// Repeats, each on fresh node processes and a fresh data directory.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    repeats: u64,
    /// Payload sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![100usize, 1024])]
    sizes: Vec<usize>,
    /// Requests in flight in P2.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    inflight: u64,
    /// Workloads to run, comma-separated (the others are skipped and left out of the report).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["P1".to_string(), "P2".into(), "P3".into(), "P4".into()])]
    phases: Vec<String>,
    /// Producers in P3.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    producers: u64,
    /// Time budget of P4 in seconds (default: 2 x --secs).
    #[arg(long)]
    get_budget_secs: Option<u64>,
    /// With --nodes 3: P3 producer i connects to node i mod 3 (PUTs to non-leaders are
    /// forwarded) instead of every client connecting to the topic's segment leader.
    #[arg(long)]
    spread: bool,
    /// The walrus-node binary (default: next to this executable).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Parent of the temporary data directory (default: <target>/tmp next to this executable).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Keep the data directories and node logs (for inspection) instead of deleting them.
    #[arg(long)]
    keep_dir: bool,
    /// Durability level the nodes run at (`--durability` of walrus-node; default: the
    /// WALRUS_DURABILITY of this process, else the node default, quorum-fsync).
    #[arg(long)]
    durability: Option<String>,
    /// P1-P4 twice per repeat, in turns: 1 node at leader-fsync (the baseline), then `--nodes`
    /// (3 if 1) at quorum-fsync; prints both and the replicated/baseline ratios.
    #[arg(long)]
    compare: bool,
    /// Instead of P1-P4: measure failover on 3 nodes. SIGKILL the leader of a topic's open
    /// segment this many times (restarting it in between) and time each kill to the first
    /// acknowledged write on that topic.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    failover: Option<u64>,
}

impl Args {
    /// Whether workload `p` ("P1".."P4") was asked for.
    fn runs(&self, p: &str) -> bool {
        self.phases.iter().any(|x| x.eq_ignore_ascii_case(p))
    }
}

// ---------------------------------------------------------------------- client

/// A blocking connection speaking the walrus frame protocol, able to pipeline.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

impl Conn {
    fn connect(addr: &str) -> io::Result<Conn> {
        let sa = addr
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
        let stream = TcpStream::connect_timeout(&sa, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(64 << 10),
            start: 0,
        })
    }

    /// A whole reply already buffered, if any.
    fn try_take(&mut self) -> io::Result<Option<Reply>> {
        match take_frame(&self.buf[self.start..], REPLY_LEN_MAX) {
            Ok(Some((body, used))) => {
                let r = parse_reply(body);
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(r))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }

    /// Reads once from the socket (blocking, bounded by the read timeout).
    fn fill(&mut self) -> io::Result<()> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let mut chunk = [0u8; 64 << 10];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn recv(&mut self) -> io::Result<Reply> {
        loop {
            if let Some(r) = self.try_take()? {
                return Ok(r);
            }
            self.fill()?;
        }
    }

    /// Sends one pre-framed request and waits for its reply.
    fn call_framed(&mut self, frame: &[u8]) -> io::Result<Reply> {
        self.stream.write_all(frame)?;
        self.recv()
    }

    fn call(&mut self, body: &[u8]) -> io::Result<Reply> {
        let mut frame = Vec::with_capacity(body.len() + 4);
        put_frame(&mut frame, body);
        self.call_framed(&frame)
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(body.len() + 4);
    put_frame(&mut f, body);
    f
}

fn put_frame_for(size: usize) -> Vec<u8> {
    let mut body = format!("PUT {TOPIC} ").into_bytes();
    body.extend((0..size).map(|i| b'a' + (i % 26) as u8));
    framed(&body)
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

// ---------------------------------------------------------------------- results

/// What one phase of one repeat measured.
struct Phase {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    hist: Histogram<u64>,
    /// Largest VmHWM of the node processes after the phase, in KiB.
    rss_kib: u64,
    /// Bytes written to the data directory's block device during the phase
    /// (`/proc/diskstats`; everything on the machine, which the nodes dominate here).
    disk_bytes: u64,
}

impl Phase {
    fn new() -> Phase {
        Phase {
            ok: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
            hist: new_hist(),
            rss_kib: 0,
            disk_bytes: 0,
        }
    }

    fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ok as f64 / s
        } else {
            0.0
        }
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn absorb(&mut self, other: Phase) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.elapsed = self.elapsed.max(other.elapsed);
        let _ = self.hist.add(&other.hist);
    }
}

fn classify_put(p: &mut Phase, r: Reply, latency: Duration) {
    match r {
        Reply::Ok(Some(_)) => {
            p.ok += 1;
            p.hist.saturating_record(micros(latency));
        }
        Reply::Ok(None) => p.error("PUT answered OK without an offset".into()),
        Reply::Empty => p.error("PUT answered EMPTY".into()),
        Reply::Err(e) => p.error(format!("ERR {e}")),
    }
}

// ---------------------------------------------------------------------- workloads

/// P1 (and one P3 producer): one PUT at a time on one connection until `deadline`.
fn run_serial(addr: &str, frame: &[u8], start: &Barrier, secs: u64) -> Result<Phase, String> {
    let mut conn = Conn::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut p = Phase::new();
    start.wait();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let t = Instant::now();
        match conn.call_framed(frame) {
            Ok(r) => classify_put(&mut p, r, t.elapsed()),
            Err(e) => {
                p.error(format!("io: {e}"));
                break;
            }
        }
    }
    p.elapsed = t0.elapsed();
    Ok(p)
}

/// P2: one connection, `inflight` PUTs outstanding until `deadline`, then drain.
fn run_pipelined(addr: &str, frame: &[u8], inflight: usize, secs: u64) -> Result<Phase, String> {
    let mut conn = Conn::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut p = Phase::new();
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(inflight);
    let mut out: Vec<u8> = Vec::with_capacity(frame.len() * inflight);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    for _ in 0..inflight {
        out.extend_from_slice(frame);
    }
    let now = Instant::now();
    conn.stream
        .write_all(&out)
        .map_err(|e| format!("write: {e}"))?;
    sent.extend(std::iter::repeat_n(now, inflight));
    while !sent.is_empty() {
        if let Err(e) = conn.fill() {
            p.error(format!("io: {e} ({} replies outstanding)", sent.len()));
            break;
        }
        out.clear();
        let mut more = 0usize;
        let before_deadline = Instant::now() < deadline;
        loop {
            match conn.try_take() {
                Ok(Some(r)) => {
                    let t = sent.pop_front().unwrap_or(t0);
                    classify_put(&mut p, r, t.elapsed());
                    if before_deadline {
                        out.extend_from_slice(frame);
                        more += 1;
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(format!("bad reply frame: {e}")),
            }
        }
        if more > 0 {
            let now = Instant::now();
            if let Err(e) = conn.stream.write_all(&out) {
                p.error(format!("io: {e}"));
                break;
            }
            sent.extend(std::iter::repeat_n(now, more));
        }
    }
    p.elapsed = t0.elapsed();
    Ok(p)
}

/// P3: `addrs.len()` producers, one connection each, one PUT at a time.
fn run_producers(addrs: &[String], frame: &[u8], secs: u64) -> Result<Phase, String> {
    let barrier = Arc::new(Barrier::new(addrs.len()));
    let frame = Arc::new(frame.to_vec());
    let handles: Vec<_> = addrs
        .iter()
        .map(|addr| {
            let (addr, barrier, frame) = (addr.clone(), barrier.clone(), frame.clone());
            thread::spawn(move || {
                let r = run_serial(&addr, &frame, &barrier, secs);
                if r.is_err() {
                    // Others wait at the barrier: never leave them hanging.
                    barrier.wait();
                }
                r
            })
        })
        .collect();
    let mut total = Phase::new();
    let mut failure = None;
    for h in handles {
        match h.join() {
            Ok(Ok(p)) => total.absorb(p),
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a producer thread panicked".into()),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// P4: one consumer GETs from the start until it has `expected` entries, the topic is empty
/// or the budget is spent. Returns the phase and how many payloads had an unexpected size.
fn run_consumer(
    addr: &str,
    expected: u64,
    sizes: &[usize],
    budget: Duration,
) -> Result<(Phase, u64), String> {
    let mut conn = Conn::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let frame = framed(format!("GET {TOPIC}").as_bytes());
    let mut p = Phase::new();
    let mut bad_size = 0u64;
    let mut empties_in_row = 0u32;
    let t0 = Instant::now();
    while p.ok < expected && t0.elapsed() < budget {
        let t = Instant::now();
        match conn.call_framed(&frame) {
            Ok(Reply::Ok(Some(data))) => {
                p.ok += 1;
                p.hist.saturating_record(micros(t.elapsed()));
                empties_in_row = 0;
                if !sizes.contains(&data.len()) && data != b"warm-up" {
                    bad_size += 1;
                }
            }
            Ok(Reply::Empty) => {
                // The committed length reaches the metadata every 50 ms: give it a little time.
                empties_in_row += 1;
                if empties_in_row > 20 {
                    break;
                }
                thread::sleep(Duration::from_millis(25));
            }
            Ok(Reply::Ok(None)) => p.error("GET answered OK without a payload".into()),
            Ok(Reply::Err(e)) => {
                p.error(format!("ERR {e}"));
                if p.errors > 1000 {
                    break;
                }
            }
            Err(e) => {
                p.error(format!("io: {e}"));
                break;
            }
        }
    }
    p.elapsed = t0.elapsed();
    Ok((p, bad_size))
}

/// Bytes written so far to the block device holding `dir` (`/proc/diskstats`), if it can be
/// found there.
fn device_bytes_written(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    // glibc's `major`/`minor` encoding of `dev_t`.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (ma, mi) = (
            f.first()?.parse::<u64>().ok()?,
            f.get(1)?.parse::<u64>().ok()?,
        );
        // Field 10: sectors written, in 512-byte units whatever the device's sector size.
        (ma == major && mi == minor).then(|| f.get(9)?.parse::<u64>().ok().map(|s| s * 512))?
    })
}

/// The disk ceilings of BENCHMARKS.md, measured in the file system of the data directory.
struct DiskCeiling {
    /// `fdatasync`s per second of one thread appending 4 KiB blocks to a preallocated file.
    fsyncs: f64,
    /// Sequential write MB/s: 1 MiB writes, one `fdatasync` at the end.
    seq_mb_s: f64,
}

/// Size of the sequential-write ceiling's file.
const DISK_CEILING_BYTES: usize = 256 << 20;

fn disk_ceiling(dir: &Path) -> Result<DiskCeiling, String> {
    use std::os::unix::fs::FileExt;
    let fail = |what: &str, e: io::Error| format!("disk ceiling: {what}: {e}");
    std::fs::create_dir_all(dir).map_err(|e| fail("create the data directory", e))?;
    let path = dir.join("disk-ceiling.tmp");
    let chunk = vec![0x5a_u8; 1 << 20];
    let t = Instant::now();
    let file = File::create(&path).map_err(|e| fail("create", e))?;
    for _ in 0..DISK_CEILING_BYTES / chunk.len() {
        (&file)
            .write_all(&chunk)
            .map_err(|e| fail("sequential write", e))?;
    }
    file.sync_data().map_err(|e| fail("fdatasync", e))?;
    let seq_mb_s = DISK_CEILING_BYTES as f64 / 1e6 / t.elapsed().as_secs_f64();
    // The file is now written through: appends over it only flush data, as the journal's do.
    let block = [0xa5_u8; 4096];
    let (t, mut n, mut pos) = (Instant::now(), 0u64, 0u64);
    while t.elapsed() < Duration::from_secs(1) {
        file.write_all_at(&block, pos)
            .map_err(|e| fail("append", e))?;
        file.sync_data().map_err(|e| fail("fdatasync", e))?;
        n += 1;
        pos = (pos + block.len() as u64) % DISK_CEILING_BYTES as u64;
    }
    let fsyncs = n as f64 / t.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).map_err(|e| fail("remove", e))?;
    Ok(DiskCeiling { fsyncs, seq_mb_s })
}

/// The ceiling: loopback round trips of a 100-byte request and reply through an echo thread.
fn loopback_ceiling(secs: u64) -> Result<Phase, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local addr: {e}"))?;
    let server = thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let reply = framed(&[b'r'; CEILING_BODY]);
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut used_total = 0;
            while let Ok(Some((_, used))) = take_frame(&buf[used_total..], REPLY_LEN_MAX) {
                used_total += used;
                s.write_all(&reply)?;
            }
            buf.drain(..used_total);
        }
    });
    let mut conn = Conn::connect(&addr.to_string()).map_err(|e| format!("connect echo: {e}"))?;
    let frame = framed(&[b'q'; CEILING_BODY]);
    let mut p = Phase::new();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let t = Instant::now();
        match conn.call_framed(&frame) {
            Ok(_) => {
                p.ok += 1;
                p.hist.saturating_record(micros(t.elapsed()));
            }
            Err(e) => return Err(format!("echo: {e}")),
        }
    }
    p.elapsed = t0.elapsed();
    drop(conn);
    match server.join() {
        Ok(Ok(())) => Ok(p),
        Ok(Err(e)) => Err(format!("echo server: {e}")),
        Err(_) => Err("echo server panicked".into()),
    }
}

// ---------------------------------------------------------------------- processes

/// Removes the bench's temporary directory when dropped.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

struct NodeProc {
    id: u64,
    child: Child,
    client: String,
    log: PathBuf,
    /// How it was started (to start it again after a kill).
    spawn: Spawn,
}

/// Everything needed to start one node process.
#[derive(Clone)]
struct Spawn {
    bin: PathBuf,
    dir: PathBuf,
    id: u64,
    raft: u16,
    client: u16,
    join: Option<u16>,
    durability: Option<String>,
}

impl Spawn {
    fn start(&self) -> Result<NodeProc, String> {
        let log = self.dir.join(format!("node{}.log", self.id));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--node-id")
            .arg(self.id.to_string())
            .arg("--data-dir")
            .arg(self.dir.join(format!("node{}", self.id)))
            .arg("--raft-port")
            .arg(self.raft.to_string())
            .arg("--client-port")
            .arg(self.client.to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(j) = self.join {
            cmd.arg("--join").arg(format!("127.0.0.1:{j}"));
        }
        if let Some(d) = &self.durability {
            cmd.env("WALRUS_DURABILITY", d);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let mut node = NodeProc {
            id: self.id,
            child,
            client: format!("127.0.0.1:{}", self.client),
            log,
            spawn: self.clone(),
        };
        wait_until(&mut node, "serving", |addr| {
            metrics(addr)
                .map(|m| m["raft"]["current_leader"].is_u64())
                .unwrap_or(false)
        })?;
        Ok(node)
    }
}

/// The node processes one repeat started; killed (by handle) and reaped when dropped.
struct Cluster {
    nodes: Vec<NodeProc>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    // Hold every listener until all are picked so no port is handed out twice.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}")))
        .collect::<Result<_, _>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| format!("local addr: {e}"))
        })
        .collect()
}

fn metrics(addr: &str) -> Result<serde_json::Value, String> {
    let mut c = Conn::connect(addr).map_err(|e| e.to_string())?;
    match c.call(b"METRICS").map_err(|e| e.to_string())? {
        Reply::Ok(Some(j)) => serde_json::from_slice(&j).map_err(|e| e.to_string()),
        other => Err(format!("METRICS answered {other:?}")),
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Polls `check` until it holds, the node exits or `READY_TIMEOUT` passes.
fn wait_until(
    node: &mut NodeProc,
    what: &str,
    mut check: impl FnMut(&str) -> bool,
) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < READY_TIMEOUT {
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(format!(
                "node {} exited ({status}) before {what}; log tail:\n{}",
                node.id,
                log_tail(&node.log)
            ));
        }
        if check(&node.client) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "node {} not {what} after {:?}; log tail:\n{}",
        node.id,
        READY_TIMEOUT,
        log_tail(&node.log)
    ))
}

fn start_cluster(
    bin: &Path,
    dir: &Path,
    count: usize,
    durability: Option<&str>,
) -> Result<Cluster, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let ports = free_ports(count * 2)?;
    let mut cluster = Cluster { nodes: Vec::new() };
    for i in 0..count {
        let spawn = Spawn {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            id: i as u64 + 1,
            raft: ports[2 * i],
            client: ports[2 * i + 1],
            join: (i > 0).then_some(ports[0]),
            durability: durability.map(str::to_string),
        };
        cluster.nodes.push(spawn.start()?);
    }
    wait_whole(&mut cluster.nodes[0], count)?;
    Ok(cluster)
}

/// Waits until `node` sees `want` voters, all registered live in the metadata.
fn wait_whole(node: &mut NodeProc, want: usize) -> Result<(), String> {
    wait_until(node, "seeing the whole cluster", |addr| {
        metrics(addr)
            .map(|m| {
                let voters = m["raft"]["voters"].as_array().map_or(0, |v| v.len());
                let live = m["nodes"]
                    .as_object()
                    .map_or(0, |n| n.values().filter(|v| v["live"] == true).count());
                voters == want && live == want
            })
            .unwrap_or(false)
    })
}

impl Cluster {
    /// Largest VmHWM (peak RSS) among the node processes, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        self.nodes
            .iter()
            .filter_map(|n| {
                let s = std::fs::read_to_string(format!("/proc/{}/status", n.child.id())).ok()?;
                let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0)
    }

    fn client_of(&self, id: u64) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.client.as_str())
    }

    /// Warnings and errors the nodes logged: (count, a few distinct samples).
    fn log_findings(&self) -> (u64, Vec<String>) {
        let mut count = 0;
        let mut samples: Vec<String> = Vec::new();
        for n in &self.nodes {
            let s = std::fs::read_to_string(&n.log).unwrap_or_default();
            for line in s.lines() {
                if line.contains(" WARN ") || line.contains(" ERROR ") || line.contains("panicked")
                {
                    count += 1;
                    // Drop the timestamp so repeats of one message look alike.
                    let msg = line.split_once(' ').map_or(line, |(_, m)| m).trim();
                    let sample = format!("node {}: {}", n.id, truncate(msg, 200));
                    if samples.len() < LOG_SAMPLES_MAX && !samples.iter().any(|s| s == &sample) {
                        samples.push(sample);
                    }
                }
            }
        }
        (count, samples)
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

// ---------------------------------------------------------------------- one repeat

/// Names of the workloads in report order.
fn workload_names(sizes: &[usize]) -> Vec<String> {
    let mut names = Vec::new();
    for p in ["P1", "P2", "P3"] {
        for s in sizes {
            names.push(format!("{p} {}", size_label(*s)));
        }
    }
    names.push("P4 GET".into());
    names
}

fn size_label(s: usize) -> String {
    if s >= 1024 && s & 1023 == 0 {
        format!("{} KiB", s / 1024)
    } else {
        format!("{s} B")
    }
}

struct RepeatResult {
    ceiling: Phase,
    disk: DiskCeiling,
    /// Indexed like `workload_names`.
    phases: Vec<Phase>,
    written: u64,
    bad_size: u64,
    segment_leader: u64,
    forwarded: u64,
    log_count: u64,
    log_samples: Vec<String>,
}

fn run_repeat(args: &Args, bin: &Path, dir: &Path, rep: u64) -> Result<RepeatResult, String> {
    let secs = args.secs;
    eprintln!("repeat {rep}: loopback ceiling ({secs} s)");
    let ceiling = loopback_ceiling(secs)?;
    eprintln!("repeat {rep}: disk ceilings");
    let disk = disk_ceiling(dir)?;
    let cluster = start_cluster(bin, dir, args.nodes as usize, args.durability.as_deref())?;
    let first = cluster.nodes[0].client.clone();
    let mut c = Conn::connect(&first).map_err(|e| format!("connect {first}: {e}"))?;
    match c
        .call(format!("REGISTER {TOPIC}").as_bytes())
        .map_err(|e| e.to_string())?
    {
        Reply::Ok(_) => {}
        other => return Err(format!("REGISTER answered {other:?}")),
    }
    let segment_leader = match c
        .call(format!("STATE {TOPIC}").as_bytes())
        .map_err(|e| e.to_string())?
    {
        Reply::Ok(Some(j)) => {
            let v: serde_json::Value = serde_json::from_slice(&j).map_err(|e| e.to_string())?;
            v["segments"][0]["leader"]
                .as_u64()
                .ok_or("STATE names no segment leader")?
        }
        other => return Err(format!("STATE answered {other:?}")),
    };
    let leader_addr = cluster
        .client_of(segment_leader)
        .ok_or_else(|| format!("segment leader {segment_leader} is not a node started here"))?
        .to_string();
    // Warm-up: the first append waits for the segment lease (renewed every 100 ms).
    let mut warm = Conn::connect(&leader_addr).map_err(|e| e.to_string())?;
    let mut written = 0u64;
    match warm
        .call(format!("PUT {TOPIC} warm-up").as_bytes())
        .map_err(|e| e.to_string())?
    {
        Reply::Ok(Some(_)) => written += 1,
        other => return Err(format!("warm-up PUT answered {other:?}")),
    }

    // Like a Kafka producer refreshing its metadata, each phase starts on the current leader
    // of the topic's open segment: segments roll over (every `--max-segment-entries` of the
    // nodes) and their leadership rotates, and a node that does not lead forwards each PUT.
    let leader_now = || -> Result<String, String> {
        let id = open_segment_leader(&first, TOPIC)?;
        cluster
            .client_of(id)
            .map(str::to_string)
            .ok_or_else(|| format!("segment leader {id} is not a node started here"))
    };
    let mut phases = Vec::new();
    for &size in &args.sizes {
        if !args.runs("P1") {
            phases.push(Phase::new());
            continue;
        }
        eprintln!("repeat {rep}: P1 {} ({secs} s)", size_label(size));
        let frame = put_frame_for(size);
        let before = device_bytes_written(dir);
        let mut p = run_serial(&leader_now()?, &frame, &Barrier::new(1), secs)?;
        p.disk_bytes = device_bytes_written(dir)
            .zip(before)
            .map_or(0, |(after, before)| after.saturating_sub(before));
        p.rss_kib = cluster.peak_rss_kib();
        written += p.ok;
        phases.push(p);
    }
    for &size in &args.sizes {
        if !args.runs("P2") {
            phases.push(Phase::new());
            continue;
        }
        eprintln!("repeat {rep}: P2 {} ({secs} s)", size_label(size));
        let frame = put_frame_for(size);
        let before = device_bytes_written(dir);
        let mut p = run_pipelined(&leader_now()?, &frame, args.inflight as usize, secs)?;
        p.disk_bytes = device_bytes_written(dir)
            .zip(before)
            .map_or(0, |(after, before)| after.saturating_sub(before));
        p.rss_kib = cluster.peak_rss_kib();
        written += p.ok;
        phases.push(p);
    }
    for &size in &args.sizes {
        if !args.runs("P3") {
            phases.push(Phase::new());
            continue;
        }
        eprintln!("repeat {rep}: P3 {} ({secs} s)", size_label(size));
        let frame = put_frame_for(size);
        let leader_addr = leader_now()?;
        let producer_addrs: Vec<String> = (0..args.producers as usize)
            .map(|i| {
                if args.spread {
                    cluster.nodes[i % cluster.nodes.len()].client.clone()
                } else {
                    leader_addr.clone()
                }
            })
            .collect();
        let before = device_bytes_written(dir);
        let mut p = run_producers(&producer_addrs, &frame, secs)?;
        p.disk_bytes = device_bytes_written(dir)
            .zip(before)
            .map_or(0, |(after, before)| after.saturating_sub(before));
        p.rss_kib = cluster.peak_rss_kib();
        written += p.ok;
        phases.push(p);
    }
    let budget = Duration::from_secs(args.get_budget_secs.unwrap_or(2 * secs));
    if args.runs("P4") {
        eprintln!("repeat {rep}: P4 reading back {written} entries (budget {budget:?})");
    }
    let (mut p4, bad_size) = if args.runs("P4") {
        run_consumer(&leader_addr, written, &args.sizes, budget)?
    } else {
        (Phase::new(), 0)
    };
    p4.rss_kib = cluster.peak_rss_kib();
    phases.push(p4);
    let forwarded = cluster
        .nodes
        .iter()
        .filter_map(|n| metrics(&n.client).ok())
        .filter_map(|m| m["counters"]["puts_forwarded"].as_u64())
        .sum();
    let (log_count, log_samples) = cluster.log_findings();
    drop(cluster);
    if !args.keep_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(RepeatResult {
        ceiling,
        disk,
        phases,
        written,
        bad_size,
        segment_leader,
        forwarded,
        log_count,
        log_samples,
    })
}

// ---------------------------------------------------------------------- report

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

fn fmt_rate(x: f64) -> String {
    let r = x.round() as u64;
    let digits: Vec<char> = r.to_string().chars().rev().collect();
    let groups: Vec<String> = digits
        .chunks(3)
        .map(|c| c.iter().rev().collect())
        .rev()
        .collect();
    groups.join(",")
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn met(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**not met**"
    }
}

fn report(args: &Args, results: &[RepeatResult], data_root: &Path) {
    let names = workload_names(&args.sizes);
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let mode = if args.nodes == 1 {
        "single node (`--nodes 1`)".to_string()
    } else {
        format!(
            "{}-node cluster (`--nodes {}`), clients on the leader of the topic's open segment, \
             looked up before each phase{}",
            args.nodes,
            args.nodes,
            if args.spread {
                "; P3 producers spread over all nodes (`--spread`)"
            } else {
                ""
            }
        )
    };
    let ceil_rates: Vec<f64> = results.iter().map(|r| r.ceiling.rate()).collect();
    let mut ceil_hist = new_hist();
    for r in results {
        let _ = ceil_hist.add(&r.ceiling.hist);
    }
    let ceil_med = median(&ceil_rates);
    let (clo, chi) = min_max(&ceil_rates);

    println!("## walrus-bench\n");
    println!("- machine: {nproc} CPUs, {}", cpu_model());
    println!("- mode: {mode}");
    // The nodes inherit WALRUS_DURABILITY and WALRUS_REPLICATION_FACTOR from this process
    // (the node defaults: quorum-fsync, factor 3).
    let durability = args
        .durability
        .clone()
        .or_else(|| std::env::var("WALRUS_DURABILITY").ok())
        .unwrap_or_else(|| "quorum-fsync".into());
    let factor: u64 = std::env::var("WALRUS_REPLICATION_FACTOR")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .min(args.nodes as u64)
        .max(1);
    let meaning = match durability.as_str() {
        "none" => "acknowledged once in the leader's page cache (no fsync)",
        "leader-fsync" => "acknowledged once the segment leader has fsynced (group commit)",
        _ => "acknowledged once a majority of the segment's replicas have fsynced",
    };
    println!(
        "- durability: **{durability}** — {meaning}; {factor} replica(s) per segment; topic \
         metadata and the GET cursor go through Raft (fsynced log, majority of {})",
        args.nodes
    );
    println!(
        "- runs: {} repeats x {} s per produce phase, fresh node processes and data dir per repeat \
         (under {}); P2 keeps {} PUTs in flight; P3 runs {} producers; P4 budget {} s",
        args.repeats,
        args.secs,
        data_root.display(),
        args.inflight,
        args.producers,
        args.get_budget_secs.unwrap_or(2 * args.secs)
    );
    println!(
        "- first segment leader of `{TOPIC}` per repeat: {:?}; PUTs forwarded between nodes per repeat: {:?}",
        results.iter().map(|r| r.segment_leader).collect::<Vec<_>>(),
        results.iter().map(|r| r.forwarded).collect::<Vec<_>>()
    );
    println!(
        "- loopback ceiling ({CEILING_BODY} B request/reply, 1 connection): {} round trips/s \
         (min–max {}–{}), p50 {}, p99 {}",
        fmt_rate(ceil_med),
        fmt_rate(clo),
        fmt_rate(chi),
        fmt_us(ceil_hist.value_at_quantile(0.5)),
        fmt_us(ceil_hist.value_at_quantile(0.99))
    );
    let fsyncs: Vec<f64> = results.iter().map(|r| r.disk.fsyncs).collect();
    let seq: Vec<f64> = results.iter().map(|r| r.disk.seq_mb_s).collect();
    let ((flo, fhi), (slo, shi)) = (min_max(&fsyncs), min_max(&seq));
    println!(
        "- disk ceilings (the data directory's file system, one thread, before the nodes start): \
         {} fdatasync/s appending 4 KiB to a preallocated file (min–max {}–{}); {:.0} MB/s \
         sequential, 1 MiB writes and one fdatasync (min–max {:.0}–{:.0}). Under SyncEach every \
         node writes each entry twice (journal, then segment file)\n",
        fmt_rate(median(&fsyncs)),
        fmt_rate(flo),
        fmt_rate(fhi),
        median(&seq),
        slo,
        shi
    );

    println!("| workload | msgs/s median (min–max) | MB/s | p50 | p99 | errors | peak RSS (max node) | vs loopback |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let rates: Vec<f64> = results.iter().map(|r| r.phases[i].rate()).collect();
        let med = median(&rates);
        let (lo, hi) = min_max(&rates);
        medians.push(med);
        if !args.runs(&name[..2]) {
            continue;
        }
        let mut hist = new_hist();
        let mut errors = 0;
        let mut rss = 0;
        for r in results {
            let _ = hist.add(&r.phases[i].hist);
            errors += r.phases[i].errors;
            rss = rss.max(r.phases[i].rss_kib);
        }
        let size = if i + 1 == names.len() {
            None
        } else {
            Some(args.sizes[i % args.sizes.len()])
        };
        let mbs = size.map_or("—".to_string(), |s| {
            format!("{:.2}", med * s as f64 / 1e6)
        });
        let ratio = if name.starts_with("P1") && ceil_med > 0.0 {
            format!("{:.1}%", 100.0 * med / ceil_med)
        } else {
            "—".into()
        };
        let (p50, p99) = if hist.is_empty() {
            ("—".into(), "—".into())
        } else {
            (
                fmt_us(hist.value_at_quantile(0.5)),
                fmt_us(hist.value_at_quantile(0.99)),
            )
        };
        println!(
            "| {name} | {} ({}–{}) | {mbs} | {p50} | {p99} | {errors} | {:.1} MiB | {ratio} |",
            fmt_rate(med),
            fmt_rate(lo),
            fmt_rate(hi),
            rss as f64 / 1024.0
        );
    }
    println!();
    let amplification: Vec<String> = names
        .iter()
        .enumerate()
        .filter(|(i, name)| *i + 1 < names.len() && args.runs(&name[..2]))
        .map(|(i, name)| {
            let size = args.sizes[i % args.sizes.len()] as f64;
            let per_byte: Vec<f64> = results
                .iter()
                .map(|r| r.phases[i].disk_bytes as f64 / (r.phases[i].ok as f64 * size).max(1.0))
                .collect();
            let rate: Vec<f64> = results
                .iter()
                .map(|r| {
                    r.phases[i].disk_bytes as f64
                        / 1e6
                        / r.phases[i].elapsed.as_secs_f64().max(1e-9)
                })
                .collect();
            format!(
                "{name} {:.1} ({:.0} MB/s)",
                median(&per_byte),
                median(&rate)
            )
        })
        .collect();
    if !amplification.is_empty() {
        println!(
            "- bytes written to the data directory's disk per payload byte, and per second \
             (medians; /proc/diskstats of its device, so all of the machine's writes): {}\n",
            amplification.join(", ")
        );
    }

    let p4 = names.len() - 1;
    for (k, r) in results.iter().enumerate().filter(|_| args.runs("P4")) {
        let g = &r.phases[p4];
        println!(
            "- repeat {}: P4 read {} of {} entries written in {:.1} s{}{}",
            k + 1,
            g.ok,
            r.written,
            g.elapsed.as_secs_f64(),
            if g.ok < r.written {
                " (stopped: budget spent or topic empty)"
            } else {
                ""
            },
            if r.bad_size > 0 {
                format!("; {} payloads of an unexpected size", r.bad_size)
            } else {
                String::new()
            }
        );
    }
    for (i, name) in names.iter().enumerate() {
        for (k, r) in results.iter().enumerate() {
            if let Some(e) = &r.phases[i].first_error {
                println!(
                    "- repeat {} {name}: {} errors, first: {}",
                    k + 1,
                    r.phases[i].errors,
                    truncate(e, 200)
                );
            }
        }
    }
    let log_total: u64 = results.iter().map(|r| r.log_count).sum();
    if log_total > 0 {
        println!("- node logs: {log_total} WARN/ERROR lines; samples:");
        let mut seen: Vec<&String> = Vec::new();
        for s in results.iter().flat_map(|r| &r.log_samples) {
            if !seen.contains(&s) && seen.len() < LOG_SAMPLES_MAX {
                seen.push(s);
                println!("  - `{s}`");
            }
        }
    } else {
        println!("- node logs: no WARN/ERROR lines");
    }
    println!();

    println!("| target | measured (median) | result |");
    println!("|---|---|---|");
    let first_of = |p: &str| {
        names
            .iter()
            .position(|n| n.starts_with(p))
            .filter(|_| args.runs(p))
    };
    if let Some(i) = first_of("P1") {
        let ratio = if ceil_med > 0.0 {
            medians[i] / ceil_med
        } else {
            0.0
        };
        if args.nodes == 1 {
            println!(
                "| single node {} ≥ 40% of loopback round trips/s | {:.1}% ({} of {}) | {} |",
                names[i],
                100.0 * ratio,
                fmt_rate(medians[i]),
                fmt_rate(ceil_med),
                met(ratio >= 0.40)
            );
        } else {
            println!(
                "| single node P1 ≥ 40% of loopback | n/a in this mode (run `--nodes 1`) ({:.1}% here) | — |",
                100.0 * ratio
            );
        }
    }
    if let Some(i) = first_of("P3") {
        if args.nodes == 3 {
            println!(
                "| 3-node {} on one topic ≥ 12,000 PUT/s | {} PUT/s | {} |",
                names[i],
                fmt_rate(medians[i]),
                met(medians[i] >= 12_000.0)
            );
        } else {
            println!(
                "| 3-node P3 on one topic ≥ 12,000 PUT/s | n/a in this mode (run `--nodes 3`) ({} PUT/s here) | — |",
                fmt_rate(medians[i])
            );
        }
    }
    if args.runs("P4") {
        println!(
            "| P4 ≥ 20,000 GET/s | {} GET/s | {} |",
            fmt_rate(medians[p4]),
            met(medians[p4] >= 20_000.0)
        );
    }
}

// ---------------------------------------------------------------------- main

fn run(args: Args) -> Result<(), String> {
    if args.nodes != 1 && args.nodes != 3 {
        return Err("--nodes must be 1 or 3".into());
    }
    if args.sizes.is_empty() || args.sizes.iter().any(|&s| s == 0 || s > 512 << 10) {
        return Err("--sizes must be between 1 and 524288 bytes".into());
    }
    if let Some(p) = args.phases.iter().find(|p| {
        !["P1", "P2", "P3", "P4"]
            .iter()
            .any(|k| p.eq_ignore_ascii_case(k))
    }) {
        return Err(format!(
            "--phases: unknown workload {p:?} (P1, P2, P3 or P4)"
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let bin = args
        .node_bin
        .clone()
        .unwrap_or_else(|| exe.with_file_name("walrus-node"));
    if !bin.is_file() {
        return Err(format!(
            "no walrus-node binary at {} (build it, or pass --node-bin)",
            bin.display()
        ));
    }
    let parent = match &args.tmp_dir {
        Some(d) => d.clone(),
        None => exe
            .parent()
            .and_then(Path::parent)
            .map(|target| target.join("tmp"))
            .ok_or("cannot place the temporary directory; pass --tmp-dir")?,
    };
    let root = TempDir {
        path: parent.join(format!("walrus-bench-{}", std::process::id())),
        keep: args.keep_dir,
    };
    std::fs::create_dir_all(&root.path)
        .map_err(|e| format!("mkdir {}: {e}", root.path.display()))?;
    if let Some(kills) = args.failover {
        return run_failover(&bin, &root.path.join("failover"), kills);
    }
    if args.compare {
        return run_compare(&args, &bin, &root.path);
    }
    let mut results = Vec::new();
    for rep in 1..=args.repeats {
        let dir = root.path.join(format!("repeat{rep}"));
        results.push(run_repeat(&args, &bin, &dir, rep)?);
    }
    report(&args, &results, &root.path);
    Ok(())
}

/// `--compare`: the single-node leader-fsync baseline and the replicated quorum-fsync cluster,
/// alternating per repeat so that drifting load on a shared machine hits both alike.
fn run_compare(args: &Args, bin: &Path, root: &Path) -> Result<(), String> {
    let base = Args {
        nodes: 1,
        durability: Some("leader-fsync".into()),
        ..args.clone()
    };
    let repl = Args {
        nodes: if args.nodes == 1 { 3 } else { args.nodes },
        durability: Some("quorum-fsync".into()),
        ..args.clone()
    };
    let (mut rb, mut rr) = (Vec::new(), Vec::new());
    for rep in 1..=args.repeats {
        rb.push(run_repeat(
            &base,
            bin,
            &root.join(format!("base{rep}")),
            rep,
        )?);
        rr.push(run_repeat(
            &repl,
            bin,
            &root.join(format!("repl{rep}")),
            rep,
        )?);
    }
    report(&base, &rb, root);
    println!();
    report(&repl, &rr, root);
    let names = workload_names(&args.sizes);
    println!(
        "\n## {} nodes at quorum-fsync against 1 node at leader-fsync, same run\n",
        repl.nodes
    );
    println!(
        "| workload | 1 node, leader-fsync (median msgs/s) | {} nodes, quorum-fsync | ratio |",
        repl.nodes
    );
    println!("|---|---:|---:|---:|");
    let mut p2 = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if !args.runs(&name[..2]) {
            continue;
        }
        let b = median(&rb.iter().map(|r| r.phases[i].rate()).collect::<Vec<_>>());
        let r = median(&rr.iter().map(|r| r.phases[i].rate()).collect::<Vec<_>>());
        let ratio = if b > 0.0 { r / b } else { 0.0 };
        if name.starts_with("P2") {
            p2.push((name.clone(), ratio));
        }
        println!(
            "| {name} | {} | {} | {:.0}% |",
            fmt_rate(b),
            fmt_rate(r),
            ratio * 100.0
        );
    }
    println!();
    for (name, ratio) in p2 {
        println!(
            "- target: {name} at quorum-fsync at least half of single-node leader-fsync: {:.0}% — {}",
            ratio * 100.0,
            met(ratio >= 0.5)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------- failover

/// The leader of `topic`'s open segment (the last one), from `STATE`.
fn open_segment_leader(addr: &str, topic: &str) -> Result<u64, String> {
    let mut c = Conn::connect(addr).map_err(|e| e.to_string())?;
    match c
        .call(format!("STATE {topic}").as_bytes())
        .map_err(|e| e.to_string())?
    {
        Reply::Ok(Some(j)) => {
            let v: serde_json::Value = serde_json::from_slice(&j).map_err(|e| e.to_string())?;
            v["segments"]
                .as_array()
                .and_then(|s| s.last())
                .and_then(|s| s["leader"].as_u64())
                .ok_or_else(|| format!("no open segment leader in {v}"))
        }
        other => Err(format!("STATE answered {other:?}")),
    }
}

/// PUTs to `topic` through `addrs` in turn until one is acknowledged; returns when, or an
/// error after `READY_TIMEOUT`.
fn put_until_ok(addrs: &[String], topic: &str) -> Result<Instant, String> {
    let t0 = Instant::now();
    let body = [format!("PUT {topic} ").as_bytes(), b"x".as_slice()].concat();
    let mut last = String::new();
    for i in 0.. {
        if t0.elapsed() > READY_TIMEOUT {
            break;
        }
        let addr = &addrs[i % addrs.len()];
        match Conn::connect(addr).and_then(|mut c| c.call(&body)) {
            Ok(Reply::Ok(_)) => return Ok(Instant::now()),
            Ok(other) => last = format!("{other:?}"),
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(5));
    }
    Err(format!(
        "no PUT acknowledged within {READY_TIMEOUT:?}: {last}"
    ))
}

/// The failover measurement: see `Args::failover`.
fn run_failover(bin: &Path, dir: &Path, kills: u64) -> Result<(), String> {
    let mut cluster = start_cluster(bin, dir, 3, None)?;
    let topic = "failover";
    let all: Vec<String> = cluster.nodes.iter().map(|n| n.client.clone()).collect();
    let mut c = Conn::connect(&all[0]).map_err(|e| e.to_string())?;
    c.call(format!("REGISTER {topic}").as_bytes())
        .map_err(|e| e.to_string())?;
    // (time to first acknowledged write, whether the killed node also led the metadata)
    let mut samples: Vec<(Duration, bool)> = Vec::new();
    for k in 1..=kills {
        put_until_ok(&all, topic)?;
        let leader =
            open_segment_leader(&all[0], topic).or_else(|_| open_segment_leader(&all[1], topic))?;
        let idx = cluster
            .nodes
            .iter()
            .position(|n| n.id == leader)
            .ok_or("unknown leader")?;
        let survivors: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|n| n.id != leader)
            .map(|n| n.client.clone())
            .collect();
        let meta_leader = metrics(&survivors[0])
            .map(|m| m["raft"]["current_leader"].as_u64() == Some(leader))
            .unwrap_or(false);
        // Make sure the leader holds a fresh lease (a write just went through), then kill it.
        put_until_ok(&survivors, topic)?;
        let _ = cluster.nodes[idx].child.kill();
        let killed = Instant::now();
        let _ = cluster.nodes[idx].child.wait();
        let acked = put_until_ok(&survivors, topic)?;
        let took = acked.duration_since(killed);
        eprintln!(
            "kill {k}/{kills}: node {leader}{} -> first acknowledged write after {:.0} ms",
            if meta_leader {
                " (also the metadata leader)"
            } else {
                ""
            },
            took.as_secs_f64() * 1000.0
        );
        samples.push((took, meta_leader));
        // Bring it back and wait until the cluster counts it live again.
        let spawn = cluster.nodes[idx].spawn.clone();
        cluster.nodes[idx] = spawn.start()?;
        let other = cluster
            .nodes
            .iter()
            .position(|n| n.id != leader)
            .ok_or("no survivor")?;
        wait_whole(&mut cluster.nodes[other], 3)?;
        // Each kill starts from a whole cluster: the restarted node has applied the metadata
        // log (otherwise it stands in the next election with a stale log and splits the vote).
        let log_end = metrics(&cluster.nodes[other].client)
            .map(|m| m["raft"]["last_log_index"].as_u64().unwrap_or(0))?;
        wait_until(
            &mut cluster.nodes[idx],
            "applying the metadata log",
            |addr| {
                metrics(addr)
                    .map(|m| m["raft"]["last_applied"].as_u64().unwrap_or(0) >= log_end)
                    .unwrap_or(false)
            },
        )?;
    }
    let report = |label: &str, v: Vec<Duration>| {
        if v.is_empty() {
            println!("| {label} | 0 | - | - | - | - |");
            return;
        }
        let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
        println!(
            "| {label} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            ms.len(),
            ms[0],
            pct(0.50),
            pct(0.99),
            ms[ms.len() - 1]
        );
    };
    println!("# walrus failover: SIGKILL of a topic's open-segment leader to the first acknowledged write");
    println!();
    println!(
        "3 nodes on loopback, walrus-node defaults (lease 1000 ms, quorum-fsync, replication \
         factor 3); the writer retries every 5 ms through the surviving nodes."
    );
    println!();
    println!("| kills | n | min ms | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    report("all", samples.iter().map(|s| s.0).collect());
    report(
        "segment leader only",
        samples.iter().filter(|s| !s.1).map(|s| s.0).collect(),
    );
    report(
        "segment and metadata leader",
        samples.iter().filter(|s| s.1).map(|s| s.0).collect(),
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walrus-bench: {e}");
            ExitCode::from(1)
        }
    }
}
