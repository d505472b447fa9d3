//! Tier B: the real `walrus-node` (Raft metadata on openraft, the client and RPC servers, the
//! background loops, the storage engine) running on the madsim simulator: simulated TCP,
//! simulated time, one seeded random source, and one [`SimDisk`] per node. Built only with
//! `RUSTFLAGS="--cfg madsim"` (see `make sim`).
//!
//! One seed decides the cluster, the workload and the fault mix ([`ClusterConfig`]). A run has a
//! safety phase (clients produce and consume while faults fire), then a liveness phase (every
//! fault healed; the cluster must serve new writes and agree on its metadata within a bounded
//! simulated time), then a drain that reads every topic to its end. [`checkers`] hold the
//! properties; the client oracle is in [`oracle`].

pub mod checkers;
pub mod client;
pub mod config;
pub mod oracle;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle, Runtime};
use madsim::time::{sleep, Instant};
use walrus_io_sim::{SimDisk, SimFaults};
use walrus_node::start::{run_on, Args};

pub use checkers::Violation;
pub use config::{ClusterConfig, ClusterFault, Planted};

use crate::rng::Rng;
use oracle::Oracle;

/// Raft / RPC port of every node.
const RAFT_PORT: u16 = 6000;
/// Client port of every node.
const CLIENT_PORT: u16 = 8080;
/// Simulated time for the cluster to form before faults and clients start.
const WARMUP: Duration = Duration::from_secs(5);
/// Bound of each liveness step.
pub(crate) const LIVENESS_BOUND: Duration = Duration::from_secs(60);
/// How often the checkers sample every node.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// What one Tier B run did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ClusterReport {
    /// The seed.
    pub seed: u64,
    /// PUTs acknowledged `OK`.
    pub acked: u64,
    /// PUTs answered `ERR` or not answered in time.
    pub put_failures: u64,
    /// Entries handed out by GET (safety phase and drain).
    pub delivered: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<ClusterFault, u64>,
    /// Metadata leaders observed (the first one and every failover after it).
    pub raft_leaders: u64,
    /// Segments sealed (rollovers and failovers).
    pub seals: u64,
    /// Segments sealed by a failover (their leader's lease lapsed).
    pub failovers: u64,
    /// Sealed-segment replicas moved off a node that stayed dead.
    pub replica_moves: u64,
    /// Unsynced writes lost or torn by crashes, over all disks.
    pub writes_lost: u64,
    /// Fsyncs that failed, over all disks.
    pub sync_errors: u64,
    /// The first broken property, if any.
    pub violation: Option<Violation>,
    /// Hash of the full event trace (the determinism check compares it).
    pub trace_hash: u64,
    /// Simulated milliseconds the run took.
    pub sim_ms: u64,
}

impl ClusterReport {
    /// Faults of every kind.
    pub fn total_faults(&self) -> u64 {
        self.faults.values().sum()
    }
}

/// The command that replays `seed`.
pub fn replay_command(seed: u64) -> String {
    format!("SIMB_SEED={seed} make sim")
}

/// Runs one seed to completion, on a fresh thread: the std hash maps of a thread take their
/// keys once, from the first random source they meet, so only a thread whose first hash map is
/// made inside the simulator replays exactly (the simulator's `getrandom` is seeded).
pub fn run_cluster_seed(seed: u64, planted: Planted) -> ClusterReport {
    // std probes its random source once per process, on first use: do that here, outside any
    // simulation, so that no run draws more simulated randomness than another.
    let _ = std::collections::hash_map::RandomState::new();
    std::thread::Builder::new()
        .name(format!("sim-seed-{seed}"))
        .stack_size(64 << 20)
        .spawn(move || run_on_this_thread(seed, planted))
        .expect("cannot spawn a simulation thread")
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn run_on_this_thread(seed: u64, planted: Planted) -> ClusterReport {
    let cfg = ClusterConfig::from_seed(seed, planted);
    if std::env::var_os("RUST_LOG").is_some() {
        // Node logs (with simulated time and node names) when replaying a seed.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    walrus_node::sim::reset();
    let mut rt = Runtime::with_seed_and_config(seed, madsim::Config::default());
    // A run that hangs past every bound is a bug of the driver: stop it loudly.
    rt.set_time_limit(Duration::from_secs(cfg.safety_secs + 1_800));
    let report = rt.block_on(drive(cfg));
    walrus_node::sim::reset();
    report
}

/// Everything the tasks of one run share.
pub struct World {
    pub cfg: ClusterConfig,
    pub oracle: Mutex<Oracle>,
    pub trace: Mutex<Trace>,
    pub start: Instant,
    pub stop_clients: AtomicBool,
    pub violation: Mutex<Option<Violation>>,
    /// Nodes (indexes) currently killed.
    pub down: Mutex<BTreeSet<usize>>,
    /// Nodes (indexes) whose process exited and that wait for the supervisor.
    pub exited: Mutex<BTreeSet<usize>>,
    /// Nodes (ids) whose disk was wiped: they hold less than their replica sets say.
    pub wiped: Mutex<BTreeSet<u64>>,
    pub samples: Mutex<checkers::Samples>,
}

impl World {
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn fail(&self, checker: &str, detail: String) {
        let mut v = self.violation.lock().unwrap();
        if v.is_none() {
            self.trace(format!("VIOLATION {checker}: {detail}"));
            *v = Some(Violation {
                checker: checker.to_string(),
                detail,
            });
        }
    }

    pub fn failed(&self) -> bool {
        self.violation.lock().unwrap().is_some()
    }

    pub fn trace(&self, event: String) {
        let t = self.now_ms();
        self.trace.lock().unwrap().push(t, &event);
    }
}

/// A rolling hash of every event, in order.
#[derive(Default)]
pub struct Trace {
    hasher: std::collections::hash_map::DefaultHasher,
    events: u64,
    verbose: bool,
}

impl Trace {
    fn push(&mut self, t_ms: u64, event: &str) {
        t_ms.hash(&mut self.hasher);
        event.hash(&mut self.hasher);
        self.events += 1;
        if self.verbose {
            println!("[{t_ms:>7} ms] {event}");
        }
    }
}

fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + i as u8))
}

/// The client address of node `i`.
pub(crate) fn client_addr(i: usize) -> SocketAddr {
    SocketAddr::new(node_ip(i), CLIENT_PORT)
}

fn node_args(cfg: &ClusterConfig, i: usize) -> Args {
    let ip = node_ip(i).to_string();
    let mut argv = vec![
        "walrus-node".to_string(),
        format!("--node-id={}", i + 1),
        "--data-dir=/data".into(),
        format!("--raft-host={ip}"),
        format!("--raft-port={RAFT_PORT}"),
        format!("--client-host={ip}"),
        format!("--client-port={CLIENT_PORT}"),
        format!("--max-segment-entries={}", cfg.segment_entries),
        format!("--replication-factor={}", cfg.replication_factor),
        "--monitor-check-ms=200".into(),
        "--request-timeout-ms=3000".into(),
        // Short enough that nodes down for a while get their sealed segments moved.
        "--re-replicate-after-ms=4000".into(),
        format!("--raft-snapshot-every={}", cfg.raft_snapshot_every),
    ];
    if i > 0 {
        argv.push(format!("--join={}:{RAFT_PORT}", node_ip(0)));
    }
    if cfg.planted == Planted::AckBeforeFsync {
        argv.push("--durability=none".into());
    }
    Args::parse_from(argv)
}

async fn drive(cfg: ClusterConfig) -> ClusterReport {
    let verbose =
        std::env::var_os("SIMB_SEED").is_some() || std::env::var_os("SIMB_VERBOSE").is_some();
    let world = Arc::new(World {
        cfg: cfg.clone(),
        oracle: Mutex::new(Oracle::default()),
        trace: Mutex::new(Trace {
            verbose,
            ..Trace::default()
        }),
        start: Instant::now(),
        stop_clients: AtomicBool::new(false),
        violation: Mutex::new(None),
        down: Mutex::new(BTreeSet::new()),
        exited: Mutex::new(BTreeSet::new()),
        wiped: Mutex::new(BTreeSet::new()),
        samples: Mutex::new(checkers::Samples::default()),
    });
    world.trace(format!("config {cfg}"));
    let handle = Handle::current();
    let disks: Vec<Arc<SimDisk>> = (0..cfg.nodes)
        .map(|i| {
            Arc::new(SimDisk::new(
                cfg.seed.wrapping_mul(31).wrapping_add(i as u64),
                SimFaults::default(),
            ))
        })
        .collect();
    let nodes: Vec<NodeHandle> = (0..cfg.nodes)
        .map(|i| {
            let disk = disks[i].clone();
            let args = node_args(&cfg, i);
            let world = world.clone();
            handle
                .create_node()
                .name(format!("node-{}", i + 1))
                .ip(node_ip(i))
                .init(move || {
                    let disk = disk.clone();
                    let args = args.clone();
                    let world = world.clone();
                    async move {
                        let res = run_on(disk, args).await;
                        // The process exited: the supervisor kills what is left of it and starts
                        // it again, with its disk as it is (an exit is not a power failure).
                        tracing::info!(result = ?res, "walrus-node exited");
                        world.exited.lock().unwrap().insert(i);
                        std::future::pending::<()>().await;
                    }
                })
                .build()
        })
        .collect();
    let client_node = handle
        .create_node()
        .name("clients")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)))
        .build();

    let sampler = {
        let world = world.clone();
        madsim::task::spawn(async move { checkers::sample_loop(world).await })
    };
    let supervisor = {
        let world = world.clone();
        let handle = handle.clone();
        let ids: Vec<madsim::task::NodeId> = nodes.iter().map(NodeHandle::id).collect();
        madsim::task::spawn(async move { supervise(world, handle, ids).await })
    };
    sleep(WARMUP).await;

    // Safety phase: clients and faults.
    let mut clients = Vec::new();
    for p in 0..cfg.producers {
        let world = world.clone();
        clients.push(client_node.spawn(async move { client::producer(world, p).await }));
    }
    for c in 0..cfg.consumers {
        let world = world.clone();
        clients.push(client_node.spawn(async move { client::consumer(world, c).await }));
    }
    let mut faults = Faults {
        world: world.clone(),
        handle: handle.clone(),
        nodes: nodes.iter().map(NodeHandle::id).collect(),
        disks: disks.clone(),
        rng: Rng::new(cfg.seed ^ 0x6661_756c_7473), // "faults"
        clogged_links: BTreeSet::new(),
        isolated: BTreeSet::new(),
        sick_disks: BTreeSet::new(),
        skewed: BTreeSet::new(),
        counts: BTreeMap::new(),
        pending_restarts: Vec::new(),
        rekill_wiped: None,
        pending_kills: Vec::new(),
    };
    let safety_end = world.start.elapsed() + Duration::from_secs(cfg.safety_secs);
    while world.start.elapsed() < safety_end && !world.failed() {
        let every = cfg.fault_every_ms;
        let wait = faults.rng.range(every / 2, every * 3 / 2);
        faults.wait(wait).await;
        faults.heal_due();
        faults.inject();
    }
    world.stop_clients.store(true, Ordering::Release);
    for c in clients {
        let _ = c.await;
    }

    // Liveness phase: heal everything; the cluster must converge and serve again.
    faults.heal_all();
    world.trace("liveness phase: every fault healed".into());
    if !world.failed() {
        liveness(&world, &client_node, &nodes).await;
    }
    // Drain: read every topic to its end, then judge what the clients saw.
    if !world.failed() {
        let w = world.clone();
        let drained = client_node
            .spawn(async move { client::drain(w).await })
            .await
            .unwrap_or_else(|e| Err(format!("drain task failed: {e}")));
        if let Err(e) = drained {
            world.fail("liveness: the cluster serves reads after healing", e);
        }
    }
    if !world.failed() {
        let verdict = world.oracle.lock().unwrap().judge();
        if let Err(v) = verdict {
            world.fail(&v.checker, v.detail);
        }
    }
    sampler.abort();
    supervisor.abort();
    let (raft_leaders, seals, failovers, replica_moves) = checkers::final_counts(&world);

    let mut report = ClusterReport {
        seed: cfg.seed,
        faults: faults.counts.clone(),
        raft_leaders,
        seals,
        failovers,
        replica_moves,
        ..ClusterReport::default()
    };
    for d in &disks {
        let s = d.stats();
        report.writes_lost += s.writes_lost;
        report.sync_errors += s.sync_errors;
    }
    {
        let o = world.oracle.lock().unwrap();
        report.acked = o.acked_count();
        report.put_failures = o.put_failures;
        report.delivered = o.delivered_count();
    }
    report.sim_ms = world.now_ms();
    report.violation = world.violation.lock().unwrap().clone();
    let mut t = world.trace.lock().unwrap();
    report.acked.hash(&mut t.hasher);
    report.trace_hash = t.hasher.finish();
    drop(t);
    // Stop every node so nothing of this seed outlives the runtime.
    for n in &nodes {
        handle.kill(n.id());
    }
    report
}

/// Restarts node processes that exited, as systemd would: what is left of the process is
/// killed, and it starts again a second later.
async fn supervise(world: Arc<World>, handle: Handle, ids: Vec<madsim::task::NodeId>) {
    loop {
        sleep(Duration::from_millis(250)).await;
        let exited = std::mem::take(&mut *world.exited.lock().unwrap());
        for i in exited {
            handle.kill(ids[i]);
            sleep(Duration::from_secs(1)).await;
            // A node that a fault killed meanwhile is restarted by the fault injector.
            if !world.down.lock().unwrap().contains(&i) {
                handle.restart(ids[i]);
                world.trace(format!("supervisor restarted node {}", i + 1));
            }
        }
    }
}

/// The liveness steps; each is bounded in simulated time.
async fn liveness(world: &Arc<World>, client_node: &NodeHandle, nodes: &[NodeHandle]) {
    let w = world.clone();
    let res = client_node
        .spawn(async move { client::liveness_writes(w).await })
        .await
        .unwrap_or_else(|e| Err(format!("liveness task failed: {e}")));
    if let Err(e) = res {
        let mut pings = Vec::new();
        for (i, from) in nodes.iter().enumerate() {
            for j in 0..world.cfg.nodes {
                if i == j {
                    continue;
                }
                let addr = format!("{}:{RAFT_PORT}", node_ip(j));
                let ok = from
                    .spawn(async move {
                        let c = walrus_node::rpc::RpcClient::new(addr);
                        c.call(&walrus_node::rpc::RpcRequest::Ping, Duration::from_secs(2))
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                    .await;
                pings.push(format!("{}->{}: {:?}", i + 1, j + 1, ok));
            }
        }
        world.trace(format!("pings after the liveness failure: {pings:?}"));
        let views = checkers::raft_views(world);
        world.fail(
            "liveness: every topic accepts writes after healing",
            format!("{e}; raft: {views}"),
        );
        return;
    }
    if let Err(e) = checkers::converged(world, LIVENESS_BOUND).await {
        world.fail("liveness: metadata converges on every node", e);
    }
}

/// Whether node `id` is, in the applied metadata of any running node of `nodes`, the only
/// replica of some segment.
fn sole_replica(id: u64, nodes: usize) -> bool {
    (1..=nodes as u64)
        .filter_map(walrus_node::sim::node)
        .any(|n| {
            n.state_machine().read(|m| {
                m.topics().values().any(|t| {
                    t.segments
                        .iter()
                        .any(|s| s.replicas.len() == 1 && s.replicas[0].0 == id)
                })
            })
        })
}

/// The fault injector of one run and the faults it has yet to heal.
struct Faults {
    world: Arc<World>,
    handle: Handle,
    nodes: Vec<madsim::task::NodeId>,
    disks: Vec<Arc<SimDisk>>,
    rng: Rng,
    clogged_links: BTreeSet<(usize, usize)>,
    isolated: BTreeSet<usize>,
    sick_disks: BTreeSet<usize>,
    skewed: BTreeSet<usize>,
    counts: BTreeMap<ClusterFault, u64>,
    /// Killed nodes and when (simulated ms) they come back.
    pending_restarts: Vec<(u64, usize)>,
    /// The wiped node, when it is to be killed again soon after it comes back (before it can
    /// have caught up: its next start must be as cautious as the first).
    rekill_wiped: Option<usize>,
    /// Nodes to kill (if up) and when (simulated ms).
    pending_kills: Vec<(u64, usize)>,
}

impl Faults {
    fn inject(&mut self) {
        let cfg = &self.world.cfg;
        let mut kind = cfg.faults[self.rng.below(cfg.faults.len())];
        let n = cfg.nodes;
        let net = NetSim::current();
        let now = self.world.now_ms();
        match kind {
            ClusterFault::Kill | ClusterFault::Wipe => {
                // A wipe loses every copy a node held: once per run, and only where every
                // acknowledged entry is on two nodes or more. A wipe that may not happen is a
                // kill instead, so that a run always has faults (seeds 14385, 14914: with one
                // replica and few fault kinds, every draw was a refused wipe).
                let mut wipe = kind == ClusterFault::Wipe
                    && cfg.replication_factor >= 3
                    && self.world.wiped.lock().unwrap().is_empty();
                // Keep a majority up so that the run keeps making progress.
                let down = self.world.down.lock().unwrap().clone();
                if down.len() >= (n - 1) / 2 {
                    return;
                }
                // Node 1 founds the cluster (it has no `--join`): it is never wiped. Nor is a
                // node that is the only replica of a segment (one opened while it was the only
                // live node): that copy is all there is (seed 9628).
                let up: Vec<usize> = (0..n).filter(|i| !down.contains(i)).collect();
                let wipeable: Vec<usize> = up
                    .iter()
                    .copied()
                    .filter(|&i| wipe && i != 0 && !sole_replica(i as u64 + 1, n))
                    .collect();
                let up = if wipeable.is_empty() {
                    wipe = false;
                    up
                } else {
                    wipeable
                };
                if !wipe {
                    kind = ClusterFault::Kill;
                }
                if up.is_empty() {
                    return;
                }
                let i = up[self.rng.below(up.len())];
                let back = now + self.rng.range(500, 5_000);
                self.kill(i, wipe, back);
                if wipe && self.rng.range(0, 1) == 1 {
                    self.rekill_wiped = Some(i);
                }
            }
            ClusterFault::Partition | ClusterFault::AsymmetricPartition => {
                let size = self.rng.range(1, (n - 1) as u64) as usize;
                let mut side: Vec<usize> = (0..n).collect();
                for k in 0..size {
                    let j = k + self.rng.below(n - k);
                    side.swap(k, j);
                }
                let a: BTreeSet<usize> = side[..size].iter().copied().collect();
                let both = kind == ClusterFault::Partition;
                for &x in &a {
                    for y in (0..n).filter(|y| !a.contains(y)) {
                        net.clog_link(self.nodes[x], self.nodes[y]);
                        self.clogged_links.insert((x, y));
                        if both {
                            net.clog_link(self.nodes[y], self.nodes[x]);
                            self.clogged_links.insert((y, x));
                        }
                    }
                }
                self.world.trace(format!(
                    "fault: {} partition {:?} | rest",
                    if both { "symmetric" } else { "one-way" },
                    a.iter().map(|x| x + 1).collect::<Vec<_>>()
                ));
            }
            ClusterFault::Isolate => {
                let i = self.rng.below(n);
                net.clog_node(self.nodes[i]);
                self.isolated.insert(i);
                self.world.trace(format!("fault: isolate node {}", i + 1));
            }
            ClusterFault::PacketLoss => {
                let rate = self.rng.range(5, 30) as f64 / 100.0;
                net.update_config(|c| c.packet_loss_rate = rate);
                self.world.trace(format!("fault: packet loss {rate}"));
            }
            ClusterFault::SlowNetwork => {
                let hi = self.rng.range(20, 300);
                net.update_config(|c| {
                    c.send_latency = Duration::from_millis(5)..Duration::from_millis(hi)
                });
                self.world
                    .trace(format!("fault: network latency up to {hi} ms"));
            }
            ClusterFault::FsyncError => {
                let i = self.rng.below(n);
                let p = self.rng.range(5, 40) as f64 / 100.0;
                self.disks[i].set_faults(SimFaults {
                    sync_error: p,
                    ..SimFaults::default()
                });
                self.sick_disks.insert(i);
                self.world
                    .trace(format!("fault: node {} fsyncs fail with p={p}", i + 1));
            }
            ClusterFault::ClockSkew => {
                // Two clocks may drift apart by `max_clock_drift_ms` over one lease: each may
                // run off by half of that.
                let lease = walrus_core::cluster::lease::LeaseConfig::default();
                let max_ppm =
                    (lease.max_clock_drift_ms * 1_000_000 / lease.lease_duration_ms / 2) as i64;
                let i = self.rng.below(n);
                let ppm = self.rng.range(0, 2 * max_ppm as u64) as i64 - max_ppm;
                walrus_node::sim::set_clock_rate(i as u64 + 1, ppm);
                self.skewed.insert(i);
                self.world
                    .trace(format!("fault: node {} clock rate {ppm:+} ppm", i + 1));
            }
            ClusterFault::DiskFull => {
                let i = self.rng.below(n);
                let room = self.rng.range(0, 256 << 10);
                let cap = self.disks[i].used_bytes() + room;
                self.disks[i].set_faults(SimFaults {
                    capacity_bytes: Some(cap),
                    ..SimFaults::default()
                });
                self.sick_disks.insert(i);
                self.world
                    .trace(format!("fault: node {} disk full at {cap} B", i + 1));
            }
        }
        *self.counts.entry(kind).or_default() += 1;
    }

    /// Heals the network and disk faults that are older than a moment, and restarts the killed
    /// nodes that are due.
    /// Kills node `i` (wiping its disk if `wipe`) until simulated time `back`.
    fn kill(&mut self, i: usize, wipe: bool, back: u64) {
        // The disk loses power first, so the dying node cannot sync anything more.
        self.disks[i].crash();
        self.handle.kill(self.nodes[i]);
        if wipe {
            self.disks[i].wipe();
            self.world.wiped.lock().unwrap().insert(i as u64 + 1);
        }
        self.world.down.lock().unwrap().insert(i);
        self.pending_restarts.push((back, i));
        self.world.trace(format!(
            "fault: {} node {}",
            if wipe { "wipe" } else { "kill" },
            i + 1
        ));
    }

    /// Sleeps `ms` of simulated time, doing the kills that fall due meanwhile.
    async fn wait(&mut self, ms: u64) {
        let end = self.world.now_ms() + ms;
        loop {
            let now = self.world.now_ms();
            let next = self
                .pending_kills
                .iter()
                .map(|&(t, _)| t)
                .min()
                .map_or(end, |t| t.min(end));
            if next > now {
                sleep(Duration::from_millis(next - now)).await;
            }
            let now = self.world.now_ms();
            let due: Vec<usize> = self
                .pending_kills
                .iter()
                .filter(|&&(t, _)| t <= now)
                .map(|&(_, i)| i)
                .collect();
            self.pending_kills.retain(|&(t, _)| t > now);
            for i in due {
                let down = self.world.down.lock().unwrap().clone();
                // Still keeping a majority up.
                if !down.contains(&i) && down.len() < (self.world.cfg.nodes - 1) / 2 {
                    let back = now + self.rng.range(200, 3_000);
                    self.kill(i, false, back);
                    *self.counts.entry(ClusterFault::Kill).or_default() += 1;
                }
            }
            if next >= end {
                return;
            }
        }
    }

    fn heal_due(&mut self) {
        let now = self.world.now_ms();
        let due: Vec<usize> = self
            .pending_restarts
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|(_, i)| *i)
            .collect();
        self.pending_restarts.retain(|(t, _)| *t > now);
        for i in due {
            self.restart(i);
        }
        // Network and disk faults last one fault interval (or a few): heal each with p = 1/2.
        if self.rng.range(0, 1) == 1 {
            self.heal_network();
        }
        if self.rng.range(0, 1) == 1 {
            self.heal_disks();
        }
    }

    fn restart(&mut self, i: usize) {
        self.disks[i].restart();
        self.handle.restart(self.nodes[i]);
        self.world.down.lock().unwrap().remove(&i);
        self.world.trace(format!("restart node {}", i + 1));
        if self.rekill_wiped == Some(i) {
            self.rekill_wiped = None;
            let at = self.world.now_ms() + self.rng.range(20, 1_500);
            self.pending_kills.push((at, i));
        }
    }

    fn heal_network(&mut self) {
        let net = NetSim::current();
        for (x, y) in std::mem::take(&mut self.clogged_links) {
            net.unclog_link(self.nodes[x], self.nodes[y]);
        }
        for i in std::mem::take(&mut self.isolated) {
            net.unclog_node(self.nodes[i]);
        }
        let normal = madsim::net::Config::default();
        net.update_config(|c| *c = normal);
        for i in std::mem::take(&mut self.skewed) {
            walrus_node::sim::set_clock_rate(i as u64 + 1, 0);
        }
        self.world.trace("heal network".into());
    }

    fn heal_disks(&mut self) {
        for i in std::mem::take(&mut self.sick_disks) {
            self.disks[i].set_faults(SimFaults::default());
        }
        self.world.trace("heal disks".into());
    }

    fn heal_all(&mut self) {
        self.heal_network();
        self.heal_disks();
        for (_, i) in std::mem::take(&mut self.pending_restarts) {
            self.restart(i);
        }
    }
}
