//! The simulated world: nodes running the real core machines, a metadata sequencer that stands
//! in for Raft, the recovery coordinator with its lease table, a faulty network, per-node disks
//! and clients, all driven by one event queue in simulated milliseconds.
//!
//! Simplifications (stated, deliberate):
//! * Metadata Raft is one linearizable sequencer (`World::meta`): commands apply in one order to
//!   one `Metadata`; the applied log reaches each node's own `Metadata` replica after a network
//!   delay (and not across a partition). The sequencer is also the metadata leader: it grants
//!   leases (`LeaseTable`), runs the failure detector and coordinates `Recovery`. It never
//!   crashes (Raft masks that); proposals and lease requests reach it over the faulty network.
//! * Disks are modelled here, not with `SimDisk`: per node and segment a durable log, a visible
//!   log (durable plus issued writes, what reads see) and a durable fence epoch. Operations
//!   complete in issue order after a random latency; a crash drops everything not completed; an
//!   fsync error makes the node fail-stop (crash, restart later), as a node must not keep
//!   running on a log it cannot trust.
//! * A restarted node rebuilds its metadata by replaying the sequencer's log and restores every
//!   replica it holds as a `SegmentFollower` (`restore`); it never resumes leading an open
//!   segment: its lease is gone and the failure detector replaces it.
//! * Clients route PUTs with the sequencer's metadata (a fresh metadata read); the node checks
//!   its own view and the leader machine checks its lease. GETs go to any node, which plans with
//!   `next_shared_read`, reads from a replica and claims with the `AdvanceCursor` CAS.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::{Hash, Hasher};

use walrus_core::cluster::cursor::next_shared_read;
use walrus_core::cluster::follower::{FollowerInput, SegmentFollower};
use walrus_core::cluster::lease::{Lease, LeaseTable};
use walrus_core::cluster::metadata::{Command, Metadata, Outcome};
use walrus_core::cluster::recovery::{Phase, Recovery, RecoveryInput};
use walrus_core::cluster::replication::{LeaderInput, SegmentLeader};
use walrus_core::cluster::rollover::RolloverPolicy;
use walrus_core::cluster::{
    ClientReply, Effect, Entry, Epoch, IoId, NodeId, PeerMsg, RequestId, SegmentRef,
};

use crate::checkers::{self, Violation};
use crate::config::SimConfig;
use crate::rng::Rng;

/// A network endpoint: 0 is the metadata sequencer / coordinator, `1..=n` the nodes, 100+ the
/// clients.
pub type Ep = u64;
/// The coordinator's endpoint.
pub const COORD: Ep = 0;
const CLIENT_BASE: Ep = 100;
/// Simulated time starts here so that negative clock skew stays positive.
pub const T0: u64 = 10_000;

/// Planted bugs: the adapter perturbs the real machines to show that the checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bug {
    /// The real thing.
    None,
    /// Every write is reported done to its machine when issued, not when durable.
    AckBeforeFsync,
    /// A fenced follower receiving an append of an older epoch forgets its fence and accepts.
    FollowerAcceptsStaleEpoch,
    /// The sequencer applies every `Seal` to the topic's current open segment and epoch.
    UnconditionalSeal,
}

/// Fault kinds counted for coverage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// A message dropped.
    Loss,
    /// A message delivered twice.
    Duplicate,
    /// A message held back for long.
    Delay,
    /// A message delivered after one sent later on the same link.
    Reorder,
    /// A two-sided split.
    PartitionSymmetric,
    /// A one-way cut.
    PartitionAsymmetric,
    /// One node cut from everyone.
    PartitionIsolate,
    /// A node crash (unsynced writes lost).
    Crash,
    /// A failed fsync (the node fail-stops).
    FsyncError,
    /// A clock jumped (within the drift bound).
    ClockSkew,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Loss,
        FaultKind::Duplicate,
        FaultKind::Delay,
        FaultKind::Reorder,
        FaultKind::PartitionSymmetric,
        FaultKind::PartitionAsymmetric,
        FaultKind::PartitionIsolate,
        FaultKind::Crash,
        FaultKind::FsyncError,
        FaultKind::ClockSkew,
    ];
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Hash of the whole event trace.
    pub trace_hash: u64,
    /// Events processed.
    pub events: u64,
    /// PUT entries acknowledged to clients.
    pub acked: u64,
    /// Entries handed out by successful shared-cursor GETs.
    pub read: u64,
    /// Segments sealed by their leader.
    pub seals: u64,
    /// Segments sealed by recovery (failovers).
    pub failovers: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<FaultKind, u64>,
    /// The first property broken, if any.
    pub violation: Option<Violation>,
}

impl RunReport {
    /// Faults of any kind.
    pub fn total_faults(&self) -> u64 {
        self.faults.values().sum()
    }
}

/// A segment replica's machine.
#[derive(Debug, Clone)]
pub enum Role {
    /// Leads (or led) the segment.
    Leader(SegmentLeader),
    /// Follows it, or stepped down.
    Follower(SegmentFollower),
}

/// One segment's local storage on one node.
#[derive(Debug, Clone, Default)]
pub struct SegDisk {
    /// What survives a crash.
    pub durable: Vec<Entry>,
    /// Durable plus issued writes (what reads see until a crash).
    pub visible: Vec<Entry>,
    /// The durably recorded fence epoch.
    pub fenced: Option<Epoch>,
    busy_until: u64,
}

#[derive(Debug, Clone, Hash)]
enum DiskOp {
    Write { pos: u64, entries: Vec<Entry> },
    Truncate { len: u64 },
    Epoch(Epoch),
}

#[derive(Debug, Clone)]
struct PendingGet {
    client: Ep,
    req: u64,
    cmd: Command,
    topic: String,
    first: u64,
    entries: Vec<Entry>,
}

/// One cluster node.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its id.
    pub id: NodeId,
    /// Running.
    pub up: bool,
    inc: u64,
    /// Clock offset from simulated time (|a - b| <= max drift for any two clocks).
    pub skew: i64,
    /// Its replica of the metadata.
    pub view: Metadata,
    applied: usize,
    sync_pending: bool,
    /// Segment machines.
    pub roles: BTreeMap<SegmentRef, Role>,
    /// Segments with a leader machine that may still append.
    pub leading: BTreeSet<SegmentRef>,
    /// Local segment logs.
    pub disks: BTreeMap<SegmentRef, SegDisk>,
    puts: BTreeMap<u64, (Ep, u64, SegmentRef)>,
    gets: BTreeMap<u64, PendingGet>,
    next_get: u64,
}

#[derive(Debug, Clone, Hash)]
enum Msg {
    Peer(PeerMsg),
    LeaseReq {
        seg: SegmentRef,
        epoch: Epoch,
        requested_at: u64,
    },
    LeaseGrant {
        seg: SegmentRef,
        epoch: Epoch,
        requested_at: u64,
    },
    Propose(Command),
    Put {
        req: u64,
        topic: String,
        entries: Vec<Entry>,
    },
    PutReply {
        req: u64,
        reply: ClientReply,
    },
    Get {
        req: u64,
        topic: String,
    },
    GetReply {
        req: u64,
        got: Option<(String, u64, Vec<Entry>)>,
    },
    ReadReq {
        get: u64,
        seg: SegmentRef,
        pos: u64,
        count: u64,
    },
    ReadResp {
        get: u64,
        entries: Option<Vec<Entry>>,
    },
    Cas {
        get: u64,
        cmd: Command,
        topic: String,
        first: u64,
        entries: Vec<Entry>,
    },
    CasResult {
        get: u64,
        ok: bool,
    },
}

#[derive(Debug, Clone, Hash)]
enum Fault {
    Crash(usize),
    Restart(usize),
    Partition,
    Heal(u64),
    Skew,
}

#[derive(Debug, Clone, Hash)]
enum Ev {
    Deliver {
        from: Ep,
        to: Ep,
        link_seq: u64,
        msg: Msg,
    },
    DiskDone {
        node: usize,
        inc: u64,
        seg: SegmentRef,
        io: IoId,
        op: DiskOp,
        reported: bool,
    },
    Tick {
        node: usize,
        inc: u64,
    },
    CoordTick,
    MetaSync {
        node: usize,
        inc: u64,
    },
    Client(usize),
    ClientTimeout(usize, u64),
    Fault(Fault),
    Heal,
    StopWrites,
}

struct Sched {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, insertion order).
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone)]
enum Partition {
    Pairs(BTreeSet<(Ep, Ep)>),
    Isolate(Ep),
}

#[derive(Debug, Clone)]
struct Client {
    ep: Ep,
    producer: bool,
    seq: u64,
    next_req: u64,
    /// (request id, topic, batch) of the PUT or GET in flight.
    outstanding: Option<(u64, String, Vec<Entry>)>,
    acks_after_heal: u64,
    reads_after_heal: u64,
}

/// The oracle: what clients were told.
#[derive(Debug, Clone, Default)]
pub struct Oracle {
    /// Every acknowledged entry by (topic, offset).
    pub acked: BTreeMap<(String, u64), Entry>,
    /// Every entry a client received from a GET, by (topic, offset).
    pub read: BTreeMap<(String, u64), Entry>,
    /// Per topic, the end of the last range claimed by a successful cursor CAS.
    pub claimed_end: BTreeMap<String, u64>,
}

/// FNV-1a, for the trace hash (stable across runs and platforms).
struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The whole simulated cluster.
pub struct World {
    /// The run's parameters.
    pub cfg: SimConfig,
    /// The planted bug, if any.
    pub bug: Bug,
    rng: Rng,
    /// Simulated (true) time, ms.
    pub now: u64,
    seq: u64,
    queue: BinaryHeap<Sched>,
    /// The nodes; `nodes[i]` has id `i + 1`.
    pub nodes: Vec<Node>,
    /// The sequencer's metadata (the linearizable truth).
    pub meta: Metadata,
    log: Vec<Command>,
    leases: LeaseTable,
    recoveries: BTreeMap<SegmentRef, Recovery>,
    coord_skew: i64,
    partitions: Vec<(u64, Partition)>,
    next_partition: u64,
    links: BTreeMap<(Ep, Ep), (u64, u64)>,
    clients: Vec<Client>,
    next_request: u64,
    /// What clients were told.
    pub oracle: Oracle,
    /// Ghost: per segment, the entries its leader assigned, by position.
    pub ghost: BTreeMap<SegmentRef, Vec<Entry>>,
    /// Ghost: per segment, the first sealed count seen.
    pub sealed_seen: BTreeMap<SegmentRef, u64>,
    faults_on: bool,
    /// The shell re-reports committed lengths every tick (off: `SIM_CORE_REPORT_ONLY=1`).
    shell_reports: bool,
    writes_on: bool,
    healed: bool,
    trace: Fnv,
    report: RunReport,
}

fn write_at(log: &mut Vec<Entry>, pos: u64, entries: &[Entry]) {
    let pos = pos as usize;
    if pos > log.len() {
        log.resize(pos, Vec::new());
    }
    for (j, e) in entries.iter().enumerate() {
        if pos + j < log.len() {
            log[pos + j] = e.clone();
        } else {
            log.push(e.clone());
        }
    }
}

/// Runs one seed to completion and reports what happened.
pub fn run_seed(seed: u64, bug: Bug) -> RunReport {
    let mut w = World::new(SimConfig::from_seed(seed), bug);
    w.run();
    w.finish()
}

impl World {
    /// A fresh world for `cfg`, with topics created and every timer scheduled.
    pub fn new(cfg: SimConfig, bug: Bug) -> World {
        let mut rng = Rng::new(cfg.seed);
        let half = (cfg.lease.max_clock_drift_ms / 2) as i64;
        let skew = |r: &mut Rng| r.range(0, 2 * half as u64) as i64 - half;
        let coord_skew = skew(&mut rng);
        let nodes = (0..cfg.nodes)
            .map(|i| Node {
                id: NodeId(i as u64 + 1),
                up: true,
                inc: 0,
                skew: skew(&mut rng),
                view: Metadata::default(),
                applied: 0,
                sync_pending: false,
                roles: BTreeMap::new(),
                leading: BTreeSet::new(),
                disks: BTreeMap::new(),
                puts: BTreeMap::new(),
                gets: BTreeMap::new(),
                next_get: 0,
            })
            .collect();
        let clients = (0..cfg.producers + cfg.consumers)
            .map(|c| Client {
                ep: CLIENT_BASE + c as u64,
                producer: c < cfg.producers,
                seq: 0,
                next_req: 0,
                outstanding: None,
                acks_after_heal: 0,
                reads_after_heal: 0,
            })
            .collect();
        let mut w = World {
            bug,
            rng,
            now: T0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            meta: Metadata::default(),
            log: Vec::new(),
            leases: LeaseTable::new(),
            recoveries: BTreeMap::new(),
            coord_skew,
            partitions: Vec::new(),
            next_partition: 0,
            links: BTreeMap::new(),
            clients,
            next_request: 0,
            oracle: Oracle::default(),
            ghost: BTreeMap::new(),
            sealed_seen: BTreeMap::new(),
            faults_on: true,
            shell_reports: std::env::var("SIM_CORE_REPORT_ONLY").is_err(),
            writes_on: true,
            healed: false,
            trace: Fnv(0xcbf2_9ce4_8422_2325),
            report: RunReport {
                seed: cfg.seed,
                ..RunReport::default()
            },
            cfg,
        };
        for i in 0..w.cfg.nodes {
            w.apply_cmd(Command::RegisterNode {
                node: NodeId(i as u64 + 1),
                addr: format!("n{}", i + 1),
            });
        }
        for t in 0..w.cfg.topics {
            w.apply_cmd(Command::CreateTopic {
                name: format!("t{t}"),
            });
        }
        for i in 0..w.cfg.nodes {
            let at = T0 + w.rng.range(0, w.cfg.tick_ms);
            w.schedule_at(at, Ev::Tick { node: i, inc: 0 });
        }
        w.schedule_at(T0 + 1, Ev::CoordTick);
        for c in 0..w.clients.len() {
            let at = T0 + w.rng.range(20, 100);
            w.schedule_at(at, Ev::Client(c));
        }
        let end_safety = T0 + w.cfg.safety_ms;
        for (every, kind) in [
            (w.cfg.crash_every_ms, 0u8),
            (w.cfg.partition_every_ms, 1),
            (w.cfg.skew_every_ms, 2),
        ] {
            if every == 0 {
                continue;
            }
            let mut t = T0 + w.rng.range(50, every);
            while t < end_safety {
                let f = match kind {
                    0 => Fault::Crash(w.rng.below(w.cfg.nodes)),
                    1 => Fault::Partition,
                    _ => Fault::Skew,
                };
                w.schedule_at(t, Ev::Fault(f));
                t += w.rng.range(every / 2, every * 3 / 2).max(1);
            }
        }
        // Every seed sees at least one fault.
        if w.cfg.crash_every_ms == 0 && w.cfg.partition_every_ms == 0 {
            let t = T0 + w.rng.range(300, w.cfg.safety_ms / 2);
            let n = w.rng.below(w.cfg.nodes);
            w.schedule_at(t, Ev::Fault(Fault::Crash(n)));
        }
        w.schedule_at(end_safety, Ev::Heal);
        w.schedule_at(end_safety + w.cfg.liveness_ms / 3, Ev::StopWrites);
        w
    }

    fn schedule_at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Sched {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn after(&mut self, delay: u64, ev: Ev) {
        self.schedule_at(self.now + delay, ev);
    }

    fn fault(&mut self, k: FaultKind) {
        *self.report.faults.entry(k).or_insert(0) += 1;
    }

    fn violate(&mut self, v: Option<Violation>) {
        if self.report.violation.is_none() {
            if let Some(v) = v {
                self.report.violation = Some(Violation {
                    detail: format!("t={}ms: {}", self.now - T0, v.detail),
                    ..v
                });
            }
        }
    }

    /// A node's local clock.
    pub fn local(&self, i: usize) -> u64 {
        (self.now as i64 + self.nodes[i].skew) as u64
    }

    fn coord_now(&self) -> u64 {
        (self.now as i64 + self.coord_skew) as u64
    }

    /// Runs until the end of the liveness phase or the first violation.
    pub fn run(&mut self) {
        let end = T0 + self.cfg.safety_ms + self.cfg.liveness_ms;
        while let Some(s) = self.queue.pop() {
            if s.at > end || self.report.violation.is_some() {
                break;
            }
            self.now = s.at;
            self.report.events += 1;
            s.at.hash(&mut self.trace);
            s.ev.hash(&mut self.trace);
            self.step(s.ev);
            let v = checkers::at_most_one_writer::check(self);
            self.violate(v);
        }
        self.now = self.now.max(end);
    }

    /// Final checks (convergence, liveness, end-state safety) and the report.
    pub fn finish(mut self) -> RunReport {
        if self.report.violation.is_none() {
            let v = checkers::sweep(&self).or_else(|| checkers::final_checks(&self));
            self.violate(v);
        }
        if self.report.violation.is_none() {
            let v = self.liveness();
            self.violate(v);
        }
        self.report.trace_hash = self.trace.finish();
        self.report
    }

    fn liveness(&self) -> Option<Violation> {
        let name = "liveness: writes and reads resume after healing";
        for c in &self.clients {
            if c.producer && c.acks_after_heal == 0 {
                return Some(Violation::new(
                    name,
                    format!("producer {} got no ack after healing", c.ep),
                ));
            }
        }
        if !self.recoveries.is_empty() {
            let segs: Vec<_> = self.recoveries.keys().collect();
            return Some(Violation::new(
                name,
                format!("recoveries still running at the end: {segs:?}"),
            ));
        }
        for (name_t, t) in self.meta.topics() {
            if t.cursor != t.readable_end() {
                return Some(Violation::new(
                    name,
                    format!(
                        "topic {name_t}: cursor {} never reached the committed end {}",
                        t.cursor,
                        t.readable_end()
                    ),
                ));
            }
        }
        if self
            .clients
            .iter()
            .any(|c| !c.producer && c.reads_after_heal > 0)
            || self.meta.topics().values().all(|t| t.readable_end() == 0)
        {
            return None;
        }
        Some(Violation::new(
            name,
            "no consumer read anything after healing".into(),
        ))
    }

    // ---------------------------------------------------------------- events

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver {
                from,
                to,
                link_seq,
                msg,
            } => self.deliver(from, to, link_seq, msg),
            Ev::DiskDone {
                node,
                inc,
                seg,
                io,
                op,
                reported,
            } => self.disk_done(node, inc, seg, io, op, reported),
            Ev::Tick { node, inc } => self.tick(node, inc),
            Ev::CoordTick => self.coord_tick(),
            Ev::MetaSync { node, inc } => self.meta_sync(node, inc),
            Ev::Client(c) => self.client_act(c),
            Ev::ClientTimeout(c, req) => {
                if self.clients[c]
                    .outstanding
                    .as_ref()
                    .is_some_and(|o| o.0 == req)
                {
                    if self.clients[c].producer {
                        self.send_put(c);
                    } else {
                        self.clients[c].outstanding = None;
                        self.client_act(c);
                    }
                }
            }
            Ev::Fault(f) => self.inject(f),
            Ev::Heal => {
                self.faults_on = false;
                self.healed = true;
                self.partitions.clear();
                for i in 0..self.nodes.len() {
                    if !self.nodes[i].up {
                        self.restart(i);
                    }
                }
            }
            Ev::StopWrites => self.writes_on = false,
        }
    }

    fn inject(&mut self, f: Fault) {
        if !self.faults_on && !matches!(f, Fault::Restart(_) | Fault::Heal(_)) {
            return;
        }
        match f {
            Fault::Crash(i) => {
                if self.nodes[i].up {
                    self.fault(FaultKind::Crash);
                    self.crash(i);
                }
            }
            Fault::Restart(i) => {
                if !self.nodes[i].up {
                    self.restart(i);
                }
            }
            Fault::Partition => {
                let n = self.cfg.nodes as u64;
                let id = self.next_partition;
                self.next_partition += 1;
                let p = match self.rng.below(3) {
                    0 => {
                        self.fault(FaultKind::PartitionSymmetric);
                        // A random proper, non-empty subset of nodes + coordinator.
                        let mask = self.rng.range(1, (1u64 << (n + 1)) - 2);
                        let mut pairs = BTreeSet::new();
                        for a in 0..=n {
                            for b in 0..=n {
                                if (mask >> a) & 1 == 1 && (mask >> b) & 1 == 0 {
                                    pairs.insert((a, b));
                                    pairs.insert((b, a));
                                }
                            }
                        }
                        Partition::Pairs(pairs)
                    }
                    1 => {
                        self.fault(FaultKind::PartitionAsymmetric);
                        let mut pairs = BTreeSet::new();
                        let a = self.rng.range(0, n);
                        for _ in 0..self.rng.range(1, n) {
                            let b = self.rng.range(0, n);
                            if a != b {
                                pairs.insert((a, b));
                            }
                        }
                        Partition::Pairs(pairs)
                    }
                    _ => {
                        self.fault(FaultKind::PartitionIsolate);
                        Partition::Isolate(self.rng.range(1, n))
                    }
                };
                self.partitions.push((id, p));
                let d = self.rng.range(100, 1_500);
                self.after(d, Ev::Fault(Fault::Heal(id)));
            }
            Fault::Heal(id) => self.partitions.retain(|p| p.0 != id),
            Fault::Skew => {
                self.fault(FaultKind::ClockSkew);
                let half = self.cfg.lease.max_clock_drift_ms / 2;
                let s = self.rng.range(0, 2 * half) as i64 - half as i64;
                let who = self.rng.below(self.cfg.nodes + 1);
                if who == self.cfg.nodes {
                    self.coord_skew = s;
                } else {
                    self.nodes[who].skew = s;
                }
            }
        }
    }

    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.up = false;
        n.inc += 1;
        n.roles.clear();
        n.leading.clear();
        n.view = Metadata::default();
        n.applied = 0;
        n.sync_pending = false;
        n.puts.clear();
        n.gets.clear();
        for d in n.disks.values_mut() {
            d.visible = d.durable.clone();
            d.busy_until = 0;
        }
        if self.faults_on {
            let d = self.rng.range(100, 1_500);
            self.after(d, Ev::Fault(Fault::Restart(i)));
        }
    }

    fn restart(&mut self, i: usize) {
        let inc = {
            let n = &mut self.nodes[i];
            n.up = true;
            n.inc += 1;
            n.inc
        };
        self.meta_sync(i, inc);
        let t = self.rng.range(1, self.cfg.tick_ms);
        self.after(t, Ev::Tick { node: i, inc });
    }

    // ---------------------------------------------------------------- network

    fn blocked(&self, a: Ep, b: Ep) -> bool {
        self.partitions.iter().any(|(_, p)| match p {
            Partition::Pairs(s) => s.contains(&(a, b)),
            Partition::Isolate(n) => (a == *n) != (b == *n),
        })
    }

    fn send(&mut self, from: Ep, to: Ep, msg: Msg) {
        if self.blocked(from, to) {
            return;
        }
        if self.faults_on && self.rng.chance_ppm(self.cfg.loss_ppm) {
            self.fault(FaultKind::Loss);
            return;
        }
        let copies = if self.faults_on && self.rng.chance_ppm(self.cfg.dup_ppm) {
            self.fault(FaultKind::Duplicate);
            2
        } else {
            1
        };
        for k in 0..copies {
            let mut d = self.rng.range(1, self.cfg.max_delay_ms);
            if self.faults_on && self.rng.chance_ppm(self.cfg.long_delay_ppm) {
                self.fault(FaultKind::Delay);
                d += self.rng.range(50, 600);
            }
            let link = self.links.entry((from, to)).or_insert((0, 0));
            link.0 += 1;
            let link_seq = link.0;
            let _ = k;
            let msg = msg.clone();
            self.after(
                d,
                Ev::Deliver {
                    from,
                    to,
                    link_seq,
                    msg,
                },
            );
        }
    }

    fn deliver(&mut self, from: Ep, to: Ep, link_seq: u64, msg: Msg) {
        if self.blocked(from, to) {
            return;
        }
        let link = self.links.entry((from, to)).or_insert((0, 0));
        if link_seq < link.1 {
            self.fault(FaultKind::Reorder);
        } else {
            link.1 = link_seq;
        }
        if to == COORD {
            self.coord_recv(from, msg);
        } else if to >= CLIENT_BASE {
            self.client_recv((to - CLIENT_BASE) as usize, msg);
        } else {
            let i = (to - 1) as usize;
            if self.nodes[i].up {
                self.node_recv(i, from, msg);
            }
        }
    }

    // ---------------------------------------------------------------- sequencer / coordinator

    /// Applies a command at the sequencer; the outcome (or rejection) is returned.
    fn apply_cmd(&mut self, mut cmd: Command) -> bool {
        if self.bug == Bug::UnconditionalSeal {
            if let Command::Seal {
                topic,
                segment,
                epoch,
                ..
            } = &mut cmd
            {
                if let Some(open) = self.meta.topic(topic).and_then(|t| t.open_segment()) {
                    *segment = open.id;
                    *epoch = open.epoch;
                }
            }
        }
        let res = self.meta.apply(&cmd);
        let Ok(outcome) = res else { return false };
        if outcome == Outcome::Unchanged {
            return true;
        }
        let structural = matches!(
            outcome,
            Outcome::TopicCreated { .. } | Outcome::Sealed { .. } | Outcome::Recovered { .. }
        );
        match &outcome {
            Outcome::Sealed { .. } => self.report.seals += 1,
            Outcome::Recovered { .. } => self.report.failovers += 1,
            _ => {}
        }
        self.log.push(cmd);
        if structural {
            let now = self.coord_now();
            let opens: Vec<(SegmentRef, NodeId, Epoch)> = self
                .meta
                .topics()
                .iter()
                .filter_map(|(name, t)| {
                    let o = t.open_segment()?;
                    Some((
                        SegmentRef {
                            topic: name.clone(),
                            segment: o.id,
                        },
                        o.leader()?,
                        o.epoch,
                    ))
                })
                .collect();
            for (seg, leader, epoch) in opens {
                if self.leases.may_choose_successor(&seg, now, &self.cfg.lease)
                    && !self.recoveries.contains_key(&seg)
                {
                    // A freshly opened segment: its leader gets a full detection timeout.
                    self.leases.assume_granted(&seg, leader, epoch, now);
                }
            }
            let v = checkers::sealed_never_change::on_meta_change(self);
            self.violate(v);
        }
        let v = checkers::offsets_gapless::on_meta_change(self);
        self.violate(v);
        for i in 0..self.nodes.len() {
            if self.nodes[i].up && !self.nodes[i].sync_pending {
                self.nodes[i].sync_pending = true;
                let d = self.rng.range(1, self.cfg.max_delay_ms);
                let inc = self.nodes[i].inc;
                self.after(d, Ev::MetaSync { node: i, inc });
            }
        }
        true
    }

    fn coord_recv(&mut self, from: Ep, msg: Msg) {
        match msg {
            Msg::Peer(p) => {
                let seg = p.seg().clone();
                let mut out = Vec::new();
                if let Some(r) = self.recoveries.get_mut(&seg) {
                    r.handle(RecoveryInput::Peer(p), &mut out);
                }
                self.coord_effects(out);
            }
            Msg::LeaseReq {
                seg,
                epoch,
                requested_at,
            } => {
                if self.recoveries.contains_key(&seg) {
                    return;
                }
                let now = self.coord_now();
                if self
                    .leases
                    .grant(&self.meta, NodeId(from), &seg, epoch, now)
                    .is_ok()
                {
                    self.send(
                        COORD,
                        from,
                        Msg::LeaseGrant {
                            seg,
                            epoch,
                            requested_at,
                        },
                    );
                }
            }
            Msg::Propose(cmd) => {
                self.apply_cmd(cmd);
            }
            Msg::Cas {
                get,
                cmd,
                topic,
                first,
                entries,
            } => {
                let ok = self.apply_cmd(cmd.clone())
                    && matches!(cmd, Command::AdvanceCursor { from, to, .. } if to > from);
                if ok {
                    let v =
                        checkers::cursors_at_least_once::on_claim(self, &topic, first, &entries);
                    self.violate(v);
                    self.report.read += entries.len() as u64;
                }
                self.send(COORD, from, Msg::CasResult { get, ok });
            }
            _ => {}
        }
    }

    fn coord_effects(&mut self, out: Vec<Effect>) {
        for e in out {
            match e {
                Effect::Send { to, msg } => self.send(COORD, to.0, Msg::Peer(msg)),
                Effect::Propose(cmd) => {
                    self.apply_cmd(cmd);
                }
                _ => {}
            }
        }
    }

    fn coord_tick(&mut self) {
        self.after(100, Ev::CoordTick);
        let now = self.coord_now();
        let opens: Vec<(SegmentRef, Epoch, Vec<NodeId>)> = self
            .meta
            .topics()
            .iter()
            .filter_map(|(name, t)| {
                let o = t.open_segment()?;
                Some((
                    SegmentRef {
                        topic: name.clone(),
                        segment: o.id,
                    },
                    o.epoch,
                    o.replicas.clone(),
                ))
            })
            .collect();
        for (seg, epoch, replicas) in opens {
            if !self.recoveries.contains_key(&seg)
                && self.leases.may_choose_successor(&seg, now, &self.cfg.lease)
            {
                let mut out = Vec::new();
                if let Some(r) = Recovery::start(NodeId(0), seg.clone(), epoch, &replicas, &mut out)
                {
                    self.recoveries.insert(seg, r);
                }
                self.coord_effects(out);
            }
        }
        let segs: Vec<SegmentRef> = self.recoveries.keys().cloned().collect();
        for seg in segs {
            let sealed = self.meta.topic(&seg.topic).and_then(|t| {
                t.segments
                    .iter()
                    .find(|s| s.id == seg.segment)
                    .and_then(|s| s.sealed_entries())
            });
            let mut out = Vec::new();
            let Some(r) = self.recoveries.get_mut(&seg) else {
                continue;
            };
            if let (Some(entries), Phase::Proposed { .. }) = (sealed, r.phase()) {
                r.handle(RecoveryInput::SegmentSealed { entries }, &mut out);
            }
            r.handle(RecoveryInput::Tick, &mut out);
            if matches!(r.phase(), Phase::Done { .. }) {
                self.recoveries.remove(&seg);
                self.leases.forget(&seg);
            }
            self.coord_effects(out);
        }
        if (self.now - T0) % 500 < 100 {
            let v = checkers::sweep(self);
            self.violate(v);
        }
    }

    // ---------------------------------------------------------------- nodes

    fn meta_sync(&mut self, i: usize, inc: u64) {
        if !self.nodes[i].up || self.nodes[i].inc != inc {
            return;
        }
        self.nodes[i].sync_pending = false;
        if self.blocked(COORD, i as u64 + 1) {
            return;
        }
        let n = &mut self.nodes[i];
        let mut structural = n.applied == 0;
        while n.applied < self.log.len() {
            let cmd = &self.log[n.applied];
            n.applied += 1;
            structural |= matches!(
                cmd,
                Command::CreateTopic { .. } | Command::Seal { .. } | Command::Recover { .. }
            );
            // The same commands in the same order: the view reaches the same state.
            let _ = n.view.apply(cmd);
        }
        if structural {
            self.reconcile(i);
        }
    }

    /// Creates machines for segments this node replicates but has none for.
    fn reconcile(&mut self, i: usize) {
        let me = self.nodes[i].id;
        let policy = RolloverPolicy {
            max_entries: self.cfg.segment_entries,
            max_bytes: None,
        };
        let n = &mut self.nodes[i];
        for (topic, t) in n.view.topics() {
            for s in &t.segments {
                if !s.replicas.contains(&me) {
                    continue;
                }
                let seg = SegmentRef {
                    topic: topic.clone(),
                    segment: s.id,
                };
                if n.roles.contains_key(&seg) {
                    continue;
                }
                let leader = s.leader().unwrap_or(me);
                let role = if !n.disks.contains_key(&seg) && s.is_open() && leader == me {
                    n.leading.insert(seg.clone());
                    Role::Leader(SegmentLeader::new(
                        me,
                        seg.clone(),
                        s.epoch,
                        s.base_offset,
                        &s.replicas,
                        policy,
                    ))
                } else {
                    let d = n.disks.entry(seg.clone()).or_default();
                    Role::Follower(SegmentFollower::restore(
                        me,
                        seg.clone(),
                        leader,
                        s.epoch,
                        d.fenced,
                        d.durable.len() as u64,
                    ))
                };
                n.disks.entry(seg.clone()).or_default();
                n.roles.insert(seg, role);
            }
        }
    }

    fn tick(&mut self, i: usize, inc: u64) {
        if !self.nodes[i].up || self.nodes[i].inc != inc {
            return;
        }
        let t = self.cfg.tick_ms;
        self.after(t, Ev::Tick { node: i, inc });
        if self.nodes[i].applied < self.log.len() && !self.nodes[i].sync_pending {
            self.nodes[i].sync_pending = true;
            let d = self.rng.range(1, self.cfg.max_delay_ms);
            self.after(d, Ev::MetaSync { node: i, inc });
        }
        let now = self.local(i);
        let me = self.nodes[i].id;
        let segs: Vec<SegmentRef> = self.nodes[i].roles.keys().cloned().collect();
        for seg in segs {
            let mut out = Vec::new();
            let mut lease_req = None;
            let open_leader = self.nodes[i]
                .view
                .topic(&seg.topic)
                .and_then(|t| t.open_segment())
                .is_some_and(|o| o.id == seg.segment && o.leader() == Some(me));
            match self.nodes[i].roles.get_mut(&seg) {
                Some(Role::Leader(l)) => {
                    l.handle(now, LeaderInput::Tick, &mut out);
                    if open_leader {
                        lease_req = Some(l.epoch());
                        if self.shell_reports && l.committed() > 0 {
                            // As `node.rs` does: re-report the committed length every tick, since
                            // the core leader reports each increase only once (see README).
                            out.push(Effect::Propose(Command::ReportCommitted {
                                topic: seg.topic.clone(),
                                segment: seg.segment,
                                epoch: l.epoch(),
                                committed: l.committed(),
                            }));
                        }
                    }
                }
                Some(Role::Follower(f)) if f.seal_target().is_some() && !f.is_sealed_done() => {
                    f.handle(FollowerInput::Tick, &mut out);
                }
                Some(Role::Follower(_)) => {}
                None => {}
            }
            if let Some(epoch) = lease_req {
                self.send(
                    i as u64 + 1,
                    COORD,
                    Msg::LeaseReq {
                        seg: seg.clone(),
                        epoch,
                        requested_at: now,
                    },
                );
            }
            self.effects(i, out);
        }
    }

    fn node_recv(&mut self, i: usize, from: Ep, msg: Msg) {
        let me = i as u64 + 1;
        let now = self.local(i);
        match msg {
            Msg::Peer(p) => self.peer(i, p),
            Msg::LeaseGrant {
                seg,
                epoch,
                requested_at,
            } => {
                let lease = Lease::granted(epoch, requested_at, &self.cfg.lease);
                let n = &mut self.nodes[i];
                if let Some(Role::Leader(l)) = n.roles.get_mut(&seg) {
                    let mut out = Vec::new();
                    l.handle(now, LeaderInput::LeaseGranted(lease), &mut out);
                    n.leading.insert(seg);
                    self.effects(i, out);
                }
            }
            Msg::Put {
                req,
                topic,
                entries,
            } => {
                let seg = self.nodes[i]
                    .view
                    .topic(&topic)
                    .and_then(|t| t.open_segment())
                    .map(|o| SegmentRef {
                        topic: topic.clone(),
                        segment: o.id,
                    });
                let rid = self.next_request;
                self.next_request += 1;
                let n = &mut self.nodes[i];
                let role = seg.clone().and_then(|s| n.roles.get_mut(&s));
                match (role, seg) {
                    (Some(Role::Leader(l)), Some(seg)) => {
                        n.puts.insert(rid, (from, req, seg));
                        let mut out = Vec::new();
                        l.handle(
                            now,
                            LeaderInput::Append {
                                request: RequestId(rid),
                                entries,
                            },
                            &mut out,
                        );
                        self.effects(i, out);
                    }
                    _ => self.send(
                        me,
                        from,
                        Msg::PutReply {
                            req,
                            reply: ClientReply::NotLeader,
                        },
                    ),
                }
            }
            Msg::Get { req, topic } => {
                let plan = self.nodes[i]
                    .view
                    .topic(&topic)
                    .and_then(|t| next_shared_read(&topic, t, 16));
                let Some((plan, cmd)) = plan else {
                    self.send(me, from, Msg::GetReply { req, got: None });
                    return;
                };
                let n = &mut self.nodes[i];
                let get = n.next_get;
                n.next_get += 1;
                n.gets.insert(
                    get,
                    PendingGet {
                        client: from,
                        req,
                        cmd,
                        topic: topic.clone(),
                        first: plan.first_offset,
                        entries: Vec::new(),
                    },
                );
                let holder = if plan.replicas.contains(&NodeId(me)) {
                    me
                } else {
                    plan.replicas[self.rng.below(plan.replicas.len())].0
                };
                self.send(
                    me,
                    holder,
                    Msg::ReadReq {
                        get,
                        seg: SegmentRef {
                            topic,
                            segment: plan.segment,
                        },
                        pos: plan.position,
                        count: plan.count,
                    },
                );
            }
            Msg::ReadReq {
                get,
                seg,
                pos,
                count,
            } => {
                let entries = self.nodes[i].disks.get(&seg).and_then(|d| {
                    d.visible
                        .get(pos as usize..(pos + count) as usize)
                        .map(|s| s.to_vec())
                });
                self.send(me, from, Msg::ReadResp { get, entries });
            }
            Msg::ReadResp { get, entries } => {
                let Some(g) = self.nodes[i].gets.get_mut(&get) else {
                    return;
                };
                match entries {
                    Some(e) => {
                        g.entries = e;
                        let (cmd, topic, first, entries) =
                            (g.cmd.clone(), g.topic.clone(), g.first, g.entries.clone());
                        self.send(
                            me,
                            COORD,
                            Msg::Cas {
                                get,
                                cmd,
                                topic,
                                first,
                                entries,
                            },
                        );
                    }
                    None => {
                        if let Some(g) = self.nodes[i].gets.remove(&get) {
                            self.send(
                                me,
                                g.client,
                                Msg::GetReply {
                                    req: g.req,
                                    got: None,
                                },
                            );
                        }
                    }
                }
            }
            Msg::CasResult { get, ok } => {
                if let Some(g) = self.nodes[i].gets.remove(&get) {
                    let got = ok.then_some((g.topic, g.first, g.entries));
                    self.send(me, g.client, Msg::GetReply { req: g.req, got });
                }
            }
            _ => {}
        }
    }

    fn peer(&mut self, i: usize, msg: PeerMsg) {
        let seg = msg.seg().clone();
        let now = self.local(i);
        let mut out = Vec::new();
        let n = &mut self.nodes[i];
        let Some(role) = n.roles.remove(&seg) else {
            // Not known yet (metadata view behind): the sender retransmits.
            return;
        };
        let role = match role {
            Role::Leader(l) if matches!(msg, PeerMsg::Fence { .. } | PeerMsg::SealAt { .. }) => {
                // Recovery reached the old leader: it steps down and answers as a replica.
                n.leading.remove(&seg);
                let mut f = l.step_down(&mut out);
                f.handle(FollowerInput::Peer(msg), &mut out);
                Role::Follower(f)
            }
            Role::Leader(mut l) => {
                l.handle(now, LeaderInput::Peer(msg), &mut out);
                Role::Leader(l)
            }
            Role::Follower(mut f) => {
                if self.bug == Bug::FollowerAcceptsStaleEpoch {
                    if let PeerMsg::Append { epoch, .. } = &msg {
                        if f.is_fenced() && *epoch < f.epoch() {
                            let leader = n
                                .view
                                .topic(&seg.topic)
                                .and_then(|t| t.segments.iter().find(|s| s.id == seg.segment))
                                .and_then(|s| s.leader())
                                .unwrap_or(n.id);
                            f = SegmentFollower::restore(
                                n.id,
                                seg.clone(),
                                leader,
                                *epoch,
                                None,
                                f.received(),
                            );
                        }
                    }
                }
                f.handle(FollowerInput::Peer(msg), &mut out);
                Role::Follower(f)
            }
        };
        n.roles.insert(seg, role);
        self.effects(i, out);
    }

    fn role_input(&mut self, i: usize, seg: &SegmentRef, io: IoId, read: Option<Vec<Entry>>) {
        let now = self.local(i);
        let mut out = Vec::new();
        match (self.nodes[i].roles.get_mut(seg), read) {
            (Some(Role::Leader(l)), None) => l.handle(now, LeaderInput::IoDone { io }, &mut out),
            (Some(Role::Follower(f)), None) => f.handle(FollowerInput::IoDone { io }, &mut out),
            (Some(Role::Follower(f)), Some(entries)) => {
                f.handle(FollowerInput::ReadDone { io, entries }, &mut out)
            }
            _ => {}
        }
        self.effects(i, out);
    }

    fn schedule_disk(&mut self, i: usize, seg: SegmentRef, io: IoId, op: DiskOp, reported: bool) {
        let lat = self.rng.range(1, self.cfg.max_disk_ms);
        let now = self.now;
        let inc = self.nodes[i].inc;
        let d = self.nodes[i].disks.entry(seg.clone()).or_default();
        let at = d.busy_until.max(now) + lat;
        d.busy_until = at;
        self.schedule_at(
            at,
            Ev::DiskDone {
                node: i,
                inc,
                seg,
                io,
                op,
                reported,
            },
        );
    }

    /// Executes a node's effects.
    fn effects(&mut self, i: usize, out: Vec<Effect>) {
        let me = i as u64 + 1;
        for e in out {
            match e {
                Effect::Send { to, msg } => self.send(me, to.0, Msg::Peer(msg)),
                Effect::Propose(cmd) => self.send(me, COORD, Msg::Propose(cmd)),
                Effect::Reply { request, reply } => {
                    let Some((client, req, seg)) = self.nodes[i].puts.remove(&request.0) else {
                        continue;
                    };
                    if let ClientReply::Appended { first, count } = &reply {
                        let v = checkers::no_acked_entry_lost::on_leader_ack(
                            self, i, &seg, *first, *count,
                        );
                        self.violate(v);
                    }
                    self.send(me, client, Msg::PutReply { req, reply });
                }
                Effect::Persist {
                    io,
                    seg,
                    pos,
                    entries,
                } => {
                    let is_leader = matches!(self.nodes[i].roles.get(&seg), Some(Role::Leader(_)));
                    if is_leader {
                        let v =
                            checkers::offsets_gapless::on_leader_persist(self, &seg, pos, &entries);
                        self.violate(v);
                    }
                    let v = checkers::sealed_never_change::on_persist(
                        self,
                        i,
                        &seg,
                        pos,
                        entries.len(),
                    );
                    self.violate(v);
                    let d = self.nodes[i].disks.entry(seg.clone()).or_default();
                    write_at(&mut d.visible, pos, &entries);
                    let early = self.bug == Bug::AckBeforeFsync;
                    self.schedule_disk(i, seg.clone(), io, DiskOp::Write { pos, entries }, early);
                    if early {
                        self.role_input(i, &seg, io, None);
                    }
                }
                Effect::Truncate { io, seg, len } => {
                    let d = self.nodes[i].disks.entry(seg.clone()).or_default();
                    d.visible.truncate(len as usize);
                    self.schedule_disk(i, seg, io, DiskOp::Truncate { len }, false);
                }
                Effect::PersistEpoch { io, seg, epoch } => {
                    self.schedule_disk(i, seg, io, DiskOp::Epoch(epoch), false);
                }
                Effect::ReadLog {
                    io,
                    seg,
                    pos,
                    count,
                } => {
                    let entries = self.nodes[i]
                        .disks
                        .get(&seg)
                        .map(|d| {
                            let end = ((pos + count) as usize).min(d.durable.len());
                            d.durable
                                .get(pos as usize..end)
                                .unwrap_or_default()
                                .to_vec()
                        })
                        .unwrap_or_default();
                    self.role_input(i, &seg, io, Some(entries));
                }
            }
        }
    }

    fn disk_done(
        &mut self,
        i: usize,
        inc: u64,
        seg: SegmentRef,
        io: IoId,
        op: DiskOp,
        reported: bool,
    ) {
        if !self.nodes[i].up || self.nodes[i].inc != inc {
            return;
        }
        if self.faults_on && self.rng.chance_ppm(self.cfg.fsync_ppm) {
            // fsync failed: the node cannot trust its page cache any more and fail-stops.
            self.fault(FaultKind::FsyncError);
            self.crash(i);
            return;
        }
        let d = self.nodes[i].disks.entry(seg.clone()).or_default();
        match op {
            DiskOp::Write { pos, entries } => write_at(&mut d.durable, pos, &entries),
            DiskOp::Truncate { len } => d.durable.truncate(len as usize),
            DiskOp::Epoch(e) => d.fenced = Some(e),
        }
        if !reported {
            self.role_input(i, &seg, io, None);
        }
    }

    // ---------------------------------------------------------------- clients

    fn client_act(&mut self, c: usize) {
        if self.clients[c].outstanding.is_some() {
            return;
        }
        let topic = format!("t{}", self.rng.below(self.cfg.topics));
        if self.clients[c].producer {
            if !self.writes_on {
                return;
            }
            let cl = &mut self.clients[c];
            cl.seq += 1;
            let (ep, seq) = (cl.ep, cl.seq);
            let k = self.rng.range(1, self.cfg.batch_max as u64);
            let size = self
                .rng
                .range(self.cfg.payload_min as u64, self.cfg.payload_max as u64)
                as usize;
            let entries: Vec<Entry> = (0..k)
                .map(|j| {
                    let mut e = format!("{ep}:{seq}:{j}:").into_bytes();
                    e.resize(e.len().max(size), b'x');
                    e
                })
                .collect();
            self.clients[c].outstanding = Some((0, topic, entries));
            self.send_put(c);
        } else {
            let cl = &mut self.clients[c];
            cl.next_req += 1;
            let (ep, req) = (cl.ep, cl.next_req);
            cl.outstanding = Some((req, topic.clone(), Vec::new()));
            let to = self.rng.range(1, self.cfg.nodes as u64);
            self.send(ep, to, Msg::Get { req, topic });
            self.after(400, Ev::ClientTimeout(c, req));
        }
    }

    fn send_put(&mut self, c: usize) {
        let cl = &mut self.clients[c];
        cl.next_req += 1;
        let req = cl.next_req;
        let ep = cl.ep;
        let Some(o) = cl.outstanding.as_mut() else {
            return;
        };
        o.0 = req;
        let (topic, entries) = (o.1.clone(), o.2.clone());
        let leader = self
            .meta
            .topic(&topic)
            .and_then(|t| t.open_segment())
            .and_then(|s| s.leader())
            .map(|n| n.0)
            .unwrap_or(1);
        self.send(
            ep,
            leader,
            Msg::Put {
                req,
                topic,
                entries,
            },
        );
        self.after(400, Ev::ClientTimeout(c, req));
    }

    fn client_recv(&mut self, c: usize, msg: Msg) {
        match msg {
            Msg::PutReply { req, reply } => {
                let Some((r, topic, entries)) = self.clients[c].outstanding.clone() else {
                    return;
                };
                if r != req {
                    return;
                }
                if let ClientReply::Appended { first, count } = reply {
                    let v = checkers::no_acked_entry_lost::on_client_ack(
                        self, &topic, first, count, &entries,
                    );
                    self.violate(v);
                    self.report.acked += count;
                    if self.healed {
                        self.clients[c].acks_after_heal += 1;
                    }
                    self.clients[c].outstanding = None;
                    let d = self.rng.range(2, 30);
                    self.after(d, Ev::Client(c));
                } else {
                    // Unknown outcome or not the leader: retry the same batch (at-least-once).
                    let d = self.rng.range(20, 80);
                    if let Some(o) = self.clients[c].outstanding.as_mut() {
                        o.0 = u64::MAX;
                    }
                    self.after(d, Ev::ClientTimeout(c, u64::MAX));
                }
            }
            Msg::GetReply { req, got } => {
                if self.clients[c].outstanding.as_ref().map(|o| o.0) != Some(req) {
                    return;
                }
                self.clients[c].outstanding = None;
                let d = match got {
                    Some((topic, first, entries)) => {
                        let v = checkers::no_acked_entry_lost::on_client_read(
                            self, &topic, first, &entries,
                        );
                        self.violate(v);
                        if self.healed {
                            self.clients[c].reads_after_heal += 1;
                        }
                        self.rng.range(1, 5)
                    }
                    None => self.rng.range(10, 40),
                };
                self.after(d, Ev::Client(c));
            }
            _ => {}
        }
    }

    /// The entries a segment's leader assigned (ghost).
    pub fn ghost_of(&self, seg: &SegmentRef) -> &[Entry] {
        self.ghost.get(seg).map(|v| &v[..]).unwrap_or(&[])
    }

    /// Which segment of `topic` (in the sequencer's metadata) holds topic-wide `offset`.
    pub fn seg_at(&self, topic: &str, offset: u64) -> Option<(SegmentRef, u64)> {
        let t = self.meta.topic(topic)?;
        let s = t.segments.iter().rev().find(|s| s.base_offset <= offset)?;
        Some((
            SegmentRef {
                topic: topic.to_string(),
                segment: s.id,
            },
            offset - s.base_offset,
        ))
    }

    /// Mutable access to the oracle and ghosts for checkers.
    pub fn oracle_mut(&mut self) -> &mut Oracle {
        &mut self.oracle
    }
}
