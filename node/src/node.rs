//! The node: wires the metadata Raft group (`meta`), the local segment store (a `walrus`
//! engine), peers (`rpc`) and the client commands together. Decisions about metadata live in
//! `walrus_core::cluster`; this file only routes requests, waits (always with a deadline) and
//! runs the background loops (commit reports, rollover monitor, failure detector, failover of
//! segments whose leader's lease lapsed, repair of replicas that lack sealed entries).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt};
use openraft::{BasicNode, ChangeMembers};
use serde_json::json;
use walrus::{FsyncSchedule, ReadConsistency, Walrus};

use crate::NodeDisk;
use walrus_core::cluster::cursor::{next_shared_read, ReadPlan};
use walrus_core::cluster::lease::{may_append, Lease, LeaseConfig, LeaseTable, Takeover};
use walrus_core::cluster::metadata::{Command, Outcome, SegmentMeta, TopicMeta};
use walrus_core::cluster::recovery::{Phase, Recovery, RecoveryInput};
use walrus_core::cluster::{Effect, Epoch, NodeId, PeerMsg, SegmentId, SegmentRef};

use crate::meta::{MetaResponse, Raft, StateMachine};
use crate::rpc::{Entries, LeaseAsk, Peers, ReplicaHeld, RpcClient, RpcRequest, RpcResponse};
pub use walrus_core::wire::Durability;

/// How often the leader of an open segment reports its committed length to the metadata group.
const COMMIT_REPORT_INTERVAL: Duration = Duration::from_millis(50);
/// How often the metadata leader probes every node.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Consecutive failed probes after which a node is marked dead.
const PROBE_FAILURES_MAX: u32 = 4;
/// How often a segment leader renews its leases.
const LEASE_RENEW_INTERVAL: Duration = Duration::from_millis(100);
/// Attempts of one GET (each a read plus a compare-and-set of the shared cursor).
const GET_ATTEMPTS_MAX: u32 = 64;
/// Longest a lease grant waits to confirm leadership and apply what is committed.
const LEASE_GRANT_CONFIRM_MAX: Duration = Duration::from_millis(500);
/// Period of the failover loop on the metadata leader.
const FAILOVER_TICK: Duration = Duration::from_millis(50);
/// Failover ticks between retransmissions of what a recovery waits for.
const RECOVERY_RESEND_TICKS: u32 = 10;
/// Ticks a fresh metadata leader waits for a majority's takeover answers before it counts
/// unknown grants from its own start instead.
const TAKEOVER_TICKS_MAX: u32 = 20;
/// Raft terms whose last leader contact a node remembers separately.
const LEADER_CONTACT_TERMS_MAX: usize = 16;
/// Failover ticks after which a recovery that sealed its segment stops driving the replicas
/// that have not caught up; the repair loop finishes them when they return.
const RECOVERY_SEALING_TICKS_MAX: u32 = 400;
/// Longest one recovery message (fence or seal) may take.
const RECOVERY_RPC_TIMEOUT: Duration = Duration::from_millis(500);
/// Period of the repair loop (replicas fetching sealed entries they lack).
const REPAIR_INTERVAL: Duration = Duration::from_millis(500);
/// How long a replica's answer to a recovery's `CopyTo` waits for the copy to finish.
const COPY_WAIT: Duration = Duration::from_millis(300);
/// How often it looks meanwhile.
const COPY_POLL: Duration = Duration::from_millis(5);
/// Failover ticks between re-replication passes.
const RE_REPLICATION_EVERY_TICKS: u64 = 20;
/// Sealed segments a re-replication pass starts moving at most.
const RE_REPLICATION_BATCH: usize = 8;
/// The error a replica answers a write of an epoch a recovery has fenced.
pub const FENCED: &str = "segment fenced by a failover";
/// The error a replica that started empty answers a write or fence of a segment opened before
/// it started (see `NodeConfig::started_empty`).
pub const LOST: &str = "this node lost its data since the segment opened: it takes no writes \
                        or fences of it";

/// The error a replica that started empty answers a write or fence while its
/// `Command::Rejoin` is not applied yet (retried by the sender).
pub const REJOIN_PENDING: &str = "this node's rejoin is not recorded yet; retry";

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id.
    pub id: u64,
    /// Root of its data.
    pub data_dir: PathBuf,
    /// Address peers use for internal RPC.
    pub raft_advertise: String,
    /// Address clients use.
    pub client_advertise: String,
    /// Entries after which an open segment is sealed and the next one opened.
    pub max_segment_entries: u64,
    /// Period of the rollover monitor.
    pub monitor_check: Duration,
    /// Longest a client request may take before it gets `ERR`.
    pub request_timeout: Duration,
    /// The level a plain `PUT` is acknowledged at (`PUTD` names its own). It also decides
    /// whether the segment store fsyncs every write (`quorum-fsync`, `leader-fsync`) and what
    /// readers may see: with a quorum level, only what a majority holds (fsynced, for
    /// `quorum-fsync`).
    pub durability: Durability,
    /// Segment-leader lease length (the failover timing derives from it).
    pub lease_ms: u64,
    /// How long a node must stay dead before its sealed segments are copied to another node.
    pub re_replicate_after: Duration,
    /// The data directory was empty at start and the node joins an existing cluster: a new
    /// node, or one whose disk was lost. Under the same id it may have voted, held entries
    /// and recorded fences that are all gone. So until its Raft log has caught up it neither
    /// votes nor stands for election (a vote from an empty log could elect a leader missing
    /// committed metadata), and it never takes writes or fences of segments opened before it
    /// started (`LOST`): counted in a quorum, an empty copy could hide acknowledged entries,
    /// and a forgotten fence could let a deposed leader acknowledge again.
    pub started_empty: bool,
    /// Drawn at random when the node started empty (kept in its data directory until it has
    /// caught up, so a restart before then reuses it): it announces it in its
    /// `Command::Rejoin`, and reads its own bound back from the metadata by it.
    pub incarnation: u64,
    /// For a node that once started empty and has since caught up: the bound its `Rejoin`
    /// recorded. Every segment below it may predate that start, so the node still answers
    /// their writes and fences with `LOST` after any later restart.
    pub lost_before: Option<u64>,
}

/// Counters reported by `METRICS`.
#[derive(Default)]
pub struct Counters {
    puts: AtomicU64,
    puts_forwarded: AtomicU64,
    gets: AtomicU64,
    gets_empty: AtomicU64,
    errors: AtomicU64,
    seals: AtomicU64,
    /// Segments this node recovered (as metadata leader) after their leader's lease lapsed.
    failovers: AtomicU64,
    /// Sealed segments this node brought up to their sealed count from another replica.
    repairs: AtomicU64,
    /// Entries fetched for those repairs.
    repaired_entries: AtomicU64,
    /// Sealed-segment replicas this node (as metadata leader) moved off a dead node.
    replicas_moved: AtomicU64,
    /// Peer connections the RPC server holds open now.
    pub rpc_connections: AtomicU64,
    /// Peer requests being handled now.
    pub rpc_in_flight: AtomicU64,
}

/// A running node.
pub struct Node {
    cfg: NodeConfig,
    raft: Raft,
    sm: StateMachine,
    data: Arc<Walrus<NodeDisk>>,
    peers: Peers,
    /// Per segment: the gate appends pass (shared) and a seal, fence or repair closes
    /// (exclusive).
    gates: Mutex<HashMap<SegmentId, Arc<tokio::sync::RwLock<bool>>>>,
    /// Wakes `Replicate`s waiting for an earlier one (pipelined on another connection) to take
    /// its positions.
    tail_moved: tokio::sync::Notify,
    /// The fences recorded durably (the highest epoch per segment), held while one is being
    /// recorded: a second `Fence` of the same epoch (a recovery resends them) answers only once
    /// the first has made it durable, and one whose recording failed is recorded again.
    recorded_fences: tokio::sync::Mutex<HashMap<SegmentId, u64>>,
    counters: Counters,
    started: Instant,
    /// Leases this node holds, per segment it leads.
    leases: Mutex<HashMap<SegmentId, Lease>>,
    /// Grants this node handed out while it was the metadata leader.
    grants: Mutex<Grants>,
    lease_cfg: LeaseConfig,
    /// Segment leader side of replication.
    replication: ReplicaLengths,
    /// Per segment: the highest recovery epoch that fenced it here. Writes of older epochs are
    /// refused, and a leader fenced here stops renewing its lease.
    fences: Arc<Mutex<HashMap<SegmentId, u64>>>,
    /// Sealed segments with a repair (fetching missing entries) running.
    repairing: Mutex<BTreeSet<SegmentId>>,
    /// Sealed segments this node holds in full (the repair loop skips them).
    complete: Mutex<BTreeSet<SegmentId>>,
    /// Sealed segments whose replica is being moved off a dead node (on the metadata leader).
    moving: Mutex<BTreeSet<SegmentId>>,
    /// The recoveries this node drives as metadata leader, as `METRICS` shows them.
    recoveries: Mutex<Vec<serde_json::Value>>,
    /// Per Raft term: the lease-clock time this node last heard from that term's metadata
    /// leader (a Raft append or snapshot arrived) or, as its leader, last granted a lease.
    leader_contacts: Mutex<BTreeMap<u64, u64>>,
    /// Open segments (and epochs) led here that this process may append to: when it first
    /// took them up, no replica held entries past this node's store (see `lease_loop`).
    cleared: Mutex<BTreeSet<(SegmentId, u64)>>,
    /// Open segments led here whose replicas are being checked before the first lease.
    taking_up: Mutex<BTreeSet<SegmentId>>,
    /// Open segments led here whose local write failed after the batch may have gone to
    /// replicas: never appended to again in this process (a failover seals them).
    tainted: Mutex<BTreeSet<(SegmentId, u64)>>,
    /// Which segments may predate this process (see `Boot`).
    boot: Mutex<Boot>,
    /// For a node that started empty: the lowest Raft term it takes appends from, once
    /// learned (`Node::learn_raft_floor`).
    raft_floor: Mutex<Option<u64>>,
}

/// Segments opened after this process started cannot have been led by an earlier process of
/// this node, so they need no replica check before they are taken up. `index`: a Raft log
/// index no lower than any entry applied before the start (the local log's last index, or
/// for an empty log, as after a wiped directory, the leader's commit index in the first
/// append received whose commit is of the leader's own term; that one only decides when the
/// node may vote). `first_new` (a node with a log): once this node applied up to `index`, the
/// next segment id then; every segment from it on is new. A node that started empty takes
/// its bound from the metadata instead (`Command::Rejoin`).
#[derive(Default)]
struct Boot {
    index: Option<u64>,
    first_new: Option<SegmentId>,
}

/// The metadata leader's side of leases: grants, and the segments being recovered (which get
/// no more grants).
#[derive(Default)]
struct Grants {
    table: LeaseTable,
    recovering: BTreeSet<SegmentId>,
}

/// Segment leader side of replication: what each replica holds, how far they should get, and
/// which replicas have a push running.
#[derive(Default)]
struct Replication {
    state: Mutex<ReplicationState>,
    /// Woken whenever a replica reports a length.
    changed: tokio::sync::Notify,
    /// Replication rounds sent to replicas (`METRICS`).
    pushes: AtomicU64,
    /// Entries those rounds carried: new writes and catch-up (`METRICS`).
    entries_sent: AtomicU64,
    /// Segment -> position -> a batch this node is still writing (its group commit has not
    /// finished, so the store cannot serve it yet): pushes send it from here meanwhile.
    staged: Mutex<Staged>,
}

/// Segment -> position -> a batch written there.
type Staged = BTreeMap<SegmentId, BTreeMap<u64, Arc<Vec<Vec<u8>>>>>;

/// A batch staged for the pushes while the leader's own write runs; unstaged when dropped
/// (also when the PUT is abandoned midway).
struct Staging<'a> {
    replication: &'a Replication,
    seg: SegmentId,
    position: Option<u64>,
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if let Some(position) = self.position {
            self.replication.unstage(self.seg, position);
        }
    }
}

/// How long a `Replicate` waits for an earlier one (still on its way over another connection)
/// to take the positions before its own.
const GAP_WAIT: Duration = Duration::from_millis(100);

/// A pipelined PUT run's place in its connection's order. Runs of one connection proceed
/// concurrently, but each starts only once the run before it has its offsets (or has finished):
/// offsets follow request order. Dropping a turn lets the next run go.
#[derive(Default)]
pub struct Turn {
    after: Option<tokio::sync::oneshot::Receiver<()>>,
    begun: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Turn {
    /// The turn after the one whose signal `last` holds (none: first in line); `last` becomes
    /// this turn's signal.
    pub fn next(last: &mut Option<tokio::sync::oneshot::Receiver<()>>) -> Turn {
        let (tx, rx) = tokio::sync::oneshot::channel();
        Turn {
            after: last.replace(rx),
            begun: Some(tx),
        }
    }

    async fn wait(&mut self) {
        if let Some(before) = self.after.take() {
            // An error means the run before was dropped: it is done either way.
            let _ = before.await;
        }
    }

    fn begun(&mut self) {
        if let Some(tx) = self.begun.take() {
            let _ = tx.send(());
        }
    }
}

/// A leader's append whose batch may already be on its way to replicas: unless disarmed (the
/// local write succeeded), dropping it runs `on_abandon` (which taints the segment), also when
/// the future holding it is dropped midway.
struct Unresolved<F: FnOnce()> {
    on_abandon: Option<F>,
}

impl<F: FnOnce()> Unresolved<F> {
    fn new(on_abandon: F) -> Self {
        Unresolved {
            on_abandon: Some(on_abandon),
        }
    }

    fn disarm(&mut self) {
        self.on_abandon = None;
    }
}

impl<F: FnOnce()> Drop for Unresolved<F> {
    fn drop(&mut self) {
        if let Some(f) = self.on_abandon.take() {
            f();
        }
    }
}

impl Replication {
    /// Keeps a copy of a batch being written at `position` for the pushes.
    fn stage(&self, seg: SegmentId, position: u64, payloads: &[&[u8]]) {
        let batch = Arc::new(payloads.iter().map(|p| p.to_vec()).collect());
        lock(&self.staged)
            .entry(seg)
            .or_default()
            .insert(position, batch);
    }

    /// Drops the copy once the store holds the batch (or failed to).
    fn unstage(&self, seg: SegmentId, position: u64) {
        let mut staged = lock(&self.staged);
        if let Some(m) = staged.get_mut(&seg) {
            m.remove(&position);
            if m.is_empty() {
                staged.remove(&seg);
            }
        }
    }

    /// Staged entries `from..`, contiguous, at most `max` of them and about `max_bytes`: slices
    /// of the staged batches, not copies.
    fn staged_from(&self, seg: SegmentId, from: u64, max: usize, max_bytes: usize) -> Entries {
        let mut out = Entries::default();
        let staged = lock(&self.staged);
        let Some(m) = staged.get(&seg) else {
            return out;
        };
        let (mut n, mut bytes, mut at) = (0usize, 0usize, from);
        // The batch holding `from`, then those right after it.
        let Some(first) = m.range(..=from).next_back().map(|(&p, _)| p) else {
            return out;
        };
        for (&p, batch) in m.range(first..) {
            if p > at {
                break;
            }
            let skip = (at - p) as usize;
            let mut end = skip;
            while end < batch.len() {
                let len = batch[end].len();
                if n >= max || (bytes + len > max_bytes && n > 0) {
                    break;
                }
                bytes += len;
                n += 1;
                end += 1;
            }
            if end > skip {
                out.push_shared(batch.clone(), skip..end);
                at += (end - skip) as u64;
            }
            if end < batch.len() {
                break;
            }
        }
        out
    }
}

#[derive(Default)]
struct ReplicationState {
    /// Segment -> replica -> entries it last reported holding (written).
    lengths: Reported,
    /// Segment -> replica -> entries it last reported fsynced.
    durable: Reported,
    /// Segment -> the length its replicas should reach.
    wanted: BTreeMap<SegmentId, u64>,
    /// Segment -> the length its replicas should have fsynced.
    wanted_durable: BTreeMap<SegmentId, u64>,
    /// Replicas with a push running.
    pushing: BTreeSet<(SegmentId, NodeId)>,
    /// Replicas that answered `LOST`: they started empty since the segment opened and never
    /// take its writes again.
    lost: BTreeSet<(SegmentId, NodeId)>,
    /// Segment -> woken when its wanted length rises, so that its running pushes send the new
    /// entries at once (with room in their window) instead of after their next answer.
    wake: BTreeMap<SegmentId, Arc<tokio::sync::Notify>>,
}

/// Segment -> replica -> a count it reported.
type Reported = BTreeMap<SegmentId, BTreeMap<NodeId, u64>>;

/// The count `replica` reported for `seg` in `map` (0 if it never answered).
fn reported(map: &Reported, seg: SegmentId, replica: NodeId) -> u64 {
    map.get(&seg)
        .and_then(|m| m.get(&replica))
        .copied()
        .unwrap_or(0)
}

impl ReplicationState {
    /// Entries `replica` last reported holding of `seg` (0 if it never answered).
    fn length(&self, seg: SegmentId, replica: NodeId) -> u64 {
        reported(&self.lengths, seg, replica)
    }

    /// Entries `replica` last reported fsynced of `seg` (0 if not known).
    fn durable(&self, seg: SegmentId, replica: NodeId) -> u64 {
        reported(&self.durable, seg, replica)
    }
}

type ReplicaLengths = Arc<Replication>;

/// How long a commit report waits for lagging replicas to answer a push.
const QUORUM_PROBE_WAIT: Duration = Duration::from_millis(200);
/// Entries a catch-up round sends at most.
const CATCH_UP_ENTRIES_MAX: u64 = 1_000;
/// Most `Replicate` rounds of one push in flight at once (each on its own connection): the
/// replica's group commit for one overlaps the transfer of the next.
const PUSH_WINDOW: usize = 2;
/// Bytes a catch-up round sends at most.
const CATCH_UP_BYTES_MAX: usize = 8 << 20;

/// A request-level error: becomes `ERR <reason>`.
pub type Failure = String;

/// A proposal that did not come back applied.
struct ProposeError {
    reason: String,
    /// Whether it may still commit (it reached a leader, or sat in this node's log when it
    /// lost its leadership): a cursor claim in that state must count as made.
    maybe_applied: bool,
}

impl Node {
    /// Wires a node around a started Raft and its state machine.
    pub fn new(
        cfg: NodeConfig,
        raft: Raft,
        sm: StateMachine,
        disk: Arc<NodeDisk>,
    ) -> std::io::Result<Node> {
        let data = Walrus::builder()
            .data_dir(cfg.data_dir.join("segments"))
            // `none` acknowledges from the page cache: nothing is fsynced on the write path.
            .fsync_schedule(if cfg.durability.needs_fsync() {
                FsyncSchedule::SyncEach
            } else {
                FsyncSchedule::NoFsync
            })
            .consistency(ReadConsistency::AtLeastOnce {
                persist_every: 1 << 30,
            })
            .reclaim_consumed(false)
            .inline_commit(crate::INLINE_COMMIT)
            .build_on(disk)?;
        let fences = load_fences(&data)?;
        let lease_cfg = LeaseConfig::for_lease(cfg.lease_ms);
        // A node that started empty and restarted before it caught up has a partial log: its
        // boot index comes from the first append, as at its first start.
        let boot_index = (!cfg.started_empty)
            .then(|| raft.metrics().borrow().last_log_index.filter(|&i| i > 0))
            .flatten();
        if let Some(i) = boot_index {
            // (If openraft applied past it already, the id then: the cautious side.)
            sm.watch_index(i);
        }
        Ok(Node {
            cfg,
            raft,
            sm,
            data: Arc::new(data),
            peers: Peers::default(),
            gates: Mutex::new(HashMap::new()),
            tail_moved: tokio::sync::Notify::new(),
            recorded_fences: tokio::sync::Mutex::new(fences.clone()),
            counters: Counters::default(),
            started: Instant::now(),
            leases: Mutex::new(HashMap::new()),
            grants: Mutex::default(),
            lease_cfg,
            replication: Arc::default(),
            fences: Arc::new(Mutex::new(fences)),
            repairing: Mutex::default(),
            complete: Mutex::default(),
            moving: Mutex::default(),
            recoveries: Mutex::default(),
            leader_contacts: Mutex::default(),
            cleared: Mutex::default(),
            taking_up: Mutex::default(),
            tainted: Mutex::default(),
            raft_floor: Mutex::new(None),
            boot: Mutex::new(Boot {
                index: boot_index,
                first_new: None,
            }),
        })
    }

    /// The Raft handle (for the RPC server).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// This node's config.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The applied metadata.
    pub fn state_machine(&self) -> &StateMachine {
        &self.sm
    }

    /// Entries of `segment` of `topic` stored on this node.
    pub fn local_entry_count(&self, topic: &str, segment: SegmentId) -> u64 {
        self.data.entry_count(&segment_key(topic, segment))
    }

    fn me(&self) -> NodeId {
        NodeId(self.cfg.id)
    }

    fn topic(&self, name: &str) -> Option<TopicMeta> {
        self.sm.read(|m| m.topic(name).cloned())
    }

    /// The topic's open segment (`None` if the topic is unknown, `Some(None)` while it has
    /// none), without cloning the rest of its chain.
    fn open_segment_of(&self, name: &str) -> Option<Option<SegmentMeta>> {
        self.sm
            .read(|m| m.topic(name).map(|t| t.open_segment().cloned()))
    }

    fn addr_of(&self, node: NodeId) -> Option<String> {
        self.sm
            .read(|m| m.nodes().get(&node).map(|n| n.addr.clone()))
    }

    /// Applies `f` to segment `seg` of `topic` in the applied metadata (`None` if the topic or
    /// the segment is gone). Searches from the open end, where recent segments are.
    fn with_segment<R>(
        &self,
        topic: &str,
        seg: SegmentId,
        f: impl FnOnce(&SegmentMeta) -> R,
    ) -> Option<R> {
        self.sm.read(|m| {
            m.topic(topic)
                .and_then(|t| t.segments.iter().rev().find(|s| s.id == seg))
                .map(f)
        })
    }

    /// Waits until the local state machine applies something new, or `max` passes.
    async fn wait_change(&self, max: Duration) {
        let mut rx = self.sm.subscribe();
        let _ = tokio::time::timeout(max, rx.changed()).await;
    }

    // ------------------------------------------------------------------ metadata

    /// Proposes a metadata command, forwarding it to the Raft leader if needed.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, Failure> {
        let resp = self.propose_raw(cmd).await.map_err(|e| e.reason)?;
        match resp.result {
            Some(Ok(o)) => Ok(o),
            Some(Err(rejected)) => Err(rejected),
            None => Err("proposal applied without a result".into()),
        }
    }

    async fn propose_raw(&self, cmd: Command) -> Result<MetaResponse, ProposeError> {
        let term_before = |m: &openraft::RaftMetrics<u64, BasicNode>| {
            (m.current_leader != Some(self.cfg.id)).then_some(m.current_term)
        };
        let follower_in = term_before(&self.raft.metrics().borrow());
        match self.raft.client_write(cmd.clone()).await {
            Ok(r) => Ok(r.data),
            Err(e) => {
                let Some(leader) = e.forward_to_leader().and_then(|f| f.leader_node.clone()) else {
                    // Not proposed if this node was no leader when asked and has not been one
                    // since (that takes a new term); a leader that lost its leadership may
                    // have the entry in its log, which a successor may still commit.
                    let same_term = follower_in.is_some()
                        && follower_in == Some(self.raft.metrics().borrow().current_term);
                    return Err(ProposeError {
                        reason: format!("no metadata leader: {e}"),
                        maybe_applied: !same_term,
                    });
                };
                match self
                    .peers
                    .get(&leader.addr)
                    .call(&RpcRequest::Propose(cmd), self.cfg.request_timeout)
                    .await
                {
                    Ok(RpcResponse::Propose(r)) => r.map_err(|reason| ProposeError {
                        reason,
                        maybe_applied: true,
                    }),
                    Ok(_) => Err(ProposeError {
                        reason: "mismatched rpc response".into(),
                        maybe_applied: true,
                    }),
                    Err(e) => Err(ProposeError {
                        reason: format!("metadata leader {} unreachable: {e}", leader.addr),
                        maybe_applied: true,
                    }),
                }
            }
        }
    }

    /// Registers this node in the metadata (address and liveness); idempotent.
    pub async fn register_self(&self) -> Result<(), Failure> {
        self.propose(Command::RegisterNode {
            node: self.me(),
            addr: self.cfg.raft_advertise.clone(),
        })
        .await
        .map(|_| ())
    }

    /// Adds a node: learner first, voter once caught up, then registered in the metadata.
    pub async fn join(
        &self,
        id: u64,
        raft_addr: String,
        client_addr: String,
    ) -> Result<(), Failure> {
        if let Err(e) = self.raft.ensure_linearizable().await {
            let Some(leader) = e.forward_to_leader().and_then(|f| f.leader_node.clone()) else {
                return Err(format!("no metadata leader: {e}"));
            };
            let req = RpcRequest::Join {
                id,
                raft_addr,
                client_addr,
            };
            return match self
                .peers
                .get(&leader.addr)
                .call(&req, self.cfg.request_timeout * 6)
                .await
            {
                Ok(RpcResponse::Join(r)) => r,
                Ok(_) => Err("mismatched rpc response".into()),
                Err(e) => Err(format!("metadata leader unreachable: {e}")),
            };
        }
        tracing::info!(id, %raft_addr, %client_addr, "adding node as learner");
        self.raft
            .add_learner(id, BasicNode::new(raft_addr.clone()), true)
            .await
            .map_err(|e| e.to_string())?;
        let voters: BTreeSet<u64> = [id].into_iter().collect();
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(voters), false)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(id, "node is a voter");
        self.propose(Command::RegisterNode {
            node: NodeId(id),
            addr: raft_addr,
        })
        .await
        .map(|_| ())
    }

    // ------------------------------------------------------------------ PUT

    /// Appends `payloads` to `topic` (created if needed) as one atomic batch (one group
    /// commit, consecutive offsets, in order) and returns the offset of the first, once the
    /// write meets `level`; a level that cannot be met in the request timeout is `ERR`.
    /// `forwarded` marks a request another node routed here: it is never forwarded again.
    pub async fn put_batch(
        &self,
        topic: &str,
        payloads: &[&[u8]],
        level: Durability,
        forwarded: bool,
    ) -> Result<u64, Failure> {
        self.put_batch_in_turn(topic, payloads, level, forwarded, Turn::default())
            .await
    }

    /// [`Node::put_batch`] for one of several pipelined runs of a connection: it waits for
    /// `turn`, and passes it on as soon as its entries have offsets (when this node leads the
    /// segment) or when it is done (forwarded, or failed).
    pub async fn put_batch_in_turn(
        &self,
        topic: &str,
        payloads: &[&[u8]],
        level: Durability,
        forwarded: bool,
        mut turn: Turn,
    ) -> Result<u64, Failure> {
        turn.wait().await;
        self.counters
            .puts
            .fetch_add(payloads.len() as u64, Ordering::Relaxed);
        let deadline = Instant::now() + self.cfg.request_timeout;
        loop {
            if Instant::now() >= deadline {
                return Err("timed out waiting for the segment leader".into());
            }
            let Some(open) = self.open_segment_of(topic) else {
                if forwarded {
                    return Err("unknown topic here; retry".into());
                }
                self.propose(Command::CreateTopic {
                    name: topic.to_string(),
                })
                .await?;
                self.wait_for_topic(topic).await;
                continue;
            };
            let Some(seg) = open else {
                self.wait_change(Duration::from_millis(50)).await;
                continue;
            };
            let Some(leader) = seg.leader() else {
                return Err("open segment has no leader".into());
            };
            if leader == self.me() {
                let replicated = seg.replicas.len() > 1;
                let mut staged = Staging {
                    replication: &self.replication,
                    seg: seg.id,
                    position: None,
                };
                // Replication starts as soon as the batch has its positions, while this node's
                // own write waits for its group commit: the two fsyncs overlap.
                let appended = self
                    .append_local(topic, &seg, payloads, |position, pending| {
                        turn.begun();
                        if replicated {
                            if pending {
                                self.replication.stage(seg.id, position, payloads);
                                staged.position = Some(position);
                            }
                            let end = position + payloads.len() as u64;
                            self.start_pushes(topic, &seg, end, level.needs_fsync());
                        }
                    })
                    .await;
                // `staged` stays until this PUT is done: the pushes for it send from there.
                match appended? {
                    Some(offset) => {
                        if level.needs_fsync() && !self.store_fsyncs() {
                            self.sync_store()?;
                        }
                        if replicated {
                            // The pushes started when the batch was queued.
                            let end = offset - seg.base_offset + payloads.len() as u64;
                            let quorum = self.quorum_wait(&seg, end, level.needs_fsync());
                            if level.needs_quorum() {
                                let remaining = deadline.saturating_duration_since(Instant::now());
                                match tokio::time::timeout(remaining, quorum).await {
                                    Ok(true) => {}
                                    _ => {
                                        return Err("no replica quorum in time; the write may \
                                                    or may not be kept"
                                            .into())
                                    }
                                }
                            }
                        }
                        // Acknowledge only under a live lease: once it runs out, a failover
                        // may seal the segment without this write (it waits out the lease
                        // before collecting the replicas' lengths).
                        if !self.holds_lease(&seg) {
                            return Err("the segment leader's lease ended before the write was \
                                        acknowledged; it may or may not be kept"
                                .into());
                        }
                        return Ok(offset);
                    }
                    // Sealing: wait for the next segment to open.
                    None => self.wait_change(Duration::from_millis(50)).await,
                }
                continue;
            }
            if forwarded {
                return Err("not the segment leader; retry".into());
            }
            let Some(addr) = self.addr_of(leader) else {
                return Err(format!("no address for node {}", leader.0));
            };
            self.counters
                .puts_forwarded
                .fetch_add(payloads.len() as u64, Ordering::Relaxed);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let req = RpcRequest::Put {
                topic: topic.to_string(),
                durability: level,
                payloads: payloads.iter().map(|p| p.to_vec()).collect(),
            };
            match self.peers.get(&addr).call(&req, remaining).await {
                Ok(RpcResponse::Put(Ok(offset))) => return Ok(offset),
                Ok(RpcResponse::Put(Err(e))) if e.ends_with("retry") => {
                    self.wait_change(Duration::from_millis(50)).await;
                }
                Ok(RpcResponse::Put(Err(e))) => return Err(e),
                Ok(_) => return Err("mismatched rpc response".into()),
                Err(e) => return Err(format!("segment leader {} unavailable: {e}", leader.0)),
            }
        }
    }

    async fn wait_for_topic(&self, topic: &str) {
        for _ in 0..20 {
            if self.sm.read(|m| m.topic(topic).is_some()) {
                return;
            }
            self.wait_change(Duration::from_millis(50)).await;
        }
    }

    /// Leader side: brings every other replica of `seg` up to `end` entries, each by its own
    /// task (which keeps going after the caller stops waiting). The returned future resolves
    /// to `true` once a majority of the replica set (this node included) holds `end` entries
    /// durably, and to `false` if that can no longer happen.
    fn replicate(
        &self,
        topic: &str,
        seg: &SegmentMeta,
        end: u64,
        durable: bool,
    ) -> impl std::future::Future<Output = bool> {
        self.start_pushes(topic, seg, end, durable);
        self.quorum_wait(seg, end, durable)
    }

    /// Resolves to `true` once a majority of `seg`'s replicas (this node included) hold `end`
    /// entries (fsynced, if `durable`), as the pushes report them.
    fn quorum_wait(
        &self,
        seg: &SegmentMeta,
        end: u64,
        durable: bool,
    ) -> impl std::future::Future<Output = bool> {
        let need = walrus_core::cluster::majority(seg.replicas.len()).saturating_sub(1);
        let others: Vec<NodeId> = seg
            .replicas
            .iter()
            .copied()
            .filter(|&r| r != self.me())
            .collect();
        let repl = self.replication.clone();
        let id = seg.id;
        async move {
            loop {
                let changed = repl.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let holding = {
                    let st = lock(&repl.state);
                    others
                        .iter()
                        .filter(|&&r| {
                            let held = if durable {
                                st.durable(id, r)
                            } else {
                                st.length(id, r)
                            };
                            held >= end
                        })
                        .count()
                };
                if holding >= need {
                    return true;
                }
                changed.await;
            }
        }
    }

    /// Raises the length `seg`'s replicas should reach (and have fsynced, if `durable`) to
    /// `end`, and starts a push to each replica that has none running.
    fn start_pushes(&self, topic: &str, seg: &SegmentMeta, end: u64, durable: bool) {
        let others = seg.replicas.iter().copied().filter(|&r| r != self.me());
        let mut start = Vec::new();
        let wake = {
            let mut st = lock(&self.replication.state);
            let w = st.wanted.entry(seg.id).or_default();
            *w = (*w).max(end);
            if durable {
                let w = st.wanted_durable.entry(seg.id).or_default();
                *w = (*w).max(end);
            }
            let mut running = false;
            for r in others {
                // One push per replica at a time; a running one picks up the new target.
                if st.pushing.insert((seg.id, r)) {
                    start.push(r);
                } else {
                    running = true;
                }
            }
            let wake = st.wake.entry(seg.id).or_default().clone();
            if running {
                wake.notify_waiters();
            }
            wake
        };
        for r in start {
            let push = Push {
                client: self.addr_of(r).map(|a| self.peers.get(&a)),
                data: self.data.clone(),
                repl: self.replication.clone(),
                topic: topic.to_string(),
                segment: seg.id,
                epoch: seg.epoch,
                replica: r,
                timeout: self.cfg.request_timeout,
                fences: self.fences.clone(),
                wake: wake.clone(),
            };
            tokio::spawn(push.run());
        }
    }

    /// Replica side: stores entries `position..` of a segment led elsewhere. Answers with the
    /// entries now held durably: fewer than `position` means the leader must send the gap
    /// first; entries already held are skipped.
    ///
    /// A leader keeps several `Replicate`s of a segment in flight (on separate connections):
    /// each takes its positions in turn (waiting a little for an earlier one still on its way),
    /// and their group commits overlap.
    pub async fn store_replica(
        &self,
        topic: &str,
        segment: u64,
        epoch: u64,
        sync: bool,
        position: u64,
        payloads: &Entries,
    ) -> Result<ReplicaHeld, Failure> {
        let seg = SegmentId(segment);
        // Shared for the whole write: a fence (exclusive) sees all of it or none.
        let gate = self.gate(seg);
        let _held = gate.read().await;
        // Fenced by a recovery here, or (durably, through Raft) recovered at a newer epoch.
        let recovered = self
            .with_segment(topic, seg, |s| s.epoch.0 > epoch)
            .unwrap_or(false);
        if recovered || self.fenced_past(seg, epoch) {
            return Err(FENCED.into());
        }
        if self.rejoin_pending() {
            return Err(REJOIN_PENDING.into());
        }
        if self.lost_since_open(seg) {
            return Err(LOST.into());
        }
        let key = segment_key(topic, seg);
        let refs: Vec<&[u8]> = payloads.iter().collect();
        let give_up = Instant::now() + GAP_WAIT;
        let mut raced = 0;
        let pending = loop {
            let moved = self.tail_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            // Past every entry given a position here, those still in the group commit too.
            let next = self.data.next_offset(&key);
            // `position` comes off the network: compare before adding, so nothing can overflow.
            if position <= next {
                let end = position + refs.len() as u64;
                if end <= next {
                    // All given positions already; done once those still in the group
                    // commit are.
                    if self.data.entry_count(&key) >= end {
                        break None;
                    }
                } else {
                    let fresh = &refs[(next - position) as usize..];
                    match self.data.batch_append_begin_at(&key, next, fresh) {
                        Ok(p) => break Some(p),
                        // The store moved after `next_offset` (it rewound after a failed
                        // write): look again.
                        Err(e)
                            if raced < 2
                                && e.get_ref().is_some_and(|i| i.is::<walrus::NotAtOffset>()) =>
                        {
                            raced += 1;
                            continue;
                        }
                        Err(e) => return Err(format!("replica append failed: {e}")),
                    }
                }
            }
            // Wait for an earlier `Replicate` (still on its way, or in the group commit).
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            let _ = tokio::time::timeout(left, moved).await;
        };
        if let Some(p) = pending {
            self.tail_moved.notify_waiters();
            let done = p.done().await;
            self.tail_moved.notify_waiters();
            done.map_err(|e| format!("replica append failed: {e}"))?;
        }
        let written = self.data.entry_count(&key);
        let durable = if self.store_fsyncs() {
            written
        } else if sync {
            self.sync_store()?;
            written
        } else {
            0
        };
        Ok(ReplicaHeld { written, durable })
    }

    /// Appends `payloads` (entries `position..` of the segment) after the entries held here,
    /// skipping those already held; the caller holds the segment's gate exclusively. Returns
    /// the entries now held.
    async fn append_at(
        &self,
        topic: &str,
        seg: SegmentId,
        position: u64,
        payloads: &[&[u8]],
    ) -> Result<u64, Failure> {
        let key = segment_key(topic, seg);
        let count = self.data.entry_count(&key);
        // `position` comes off the network: compare before adding, so nothing can overflow.
        if position > count || payloads.len() as u64 <= count - position {
            return Ok(count);
        }
        let fresh = &payloads[(count - position) as usize..];
        let failed = |e: std::io::Error| format!("replica append failed: {e}");
        self.data
            .batch_append_begin(&key, fresh)
            .map_err(failed)?
            .done()
            .await
            .map_err(failed)?;
        Ok(self.data.entry_count(&key))
    }

    /// Entries of `seg` held durably by a majority of its replicas (this node's own count
    /// included): what readers may see.
    fn quorum_length(&self, topic: &str, seg: &SegmentMeta) -> u64 {
        let local = self.data.entry_count(&segment_key(topic, seg.id));
        if seg.replicas.len() <= 1 || !self.cfg.durability.needs_quorum() {
            return local;
        }
        let fsynced = self.cfg.durability.needs_fsync();
        let st = lock(&self.replication.state);
        let mut all: Vec<u64> = seg
            .replicas
            .iter()
            .map(|&r| {
                if r == self.me() {
                    local
                } else if fsynced {
                    st.durable(seg.id, r)
                } else {
                    st.length(seg.id, r)
                }
            })
            .collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        let k = walrus_core::cluster::majority(all.len());
        all.get(k.saturating_sub(1)).copied().unwrap_or(0)
    }

    /// Whether the replicas of `seg` that answered `LOST` leave too few for a majority.
    fn quorum_lost(&self, seg: &SegmentMeta) -> bool {
        let st = lock(&self.replication.state);
        let lost = seg
            .replicas
            .iter()
            .filter(|&&r| st.lost.contains(&(seg.id, r)))
            .count();
        lost > 0 && seg.replicas.len() - lost < walrus_core::cluster::majority(seg.replicas.len())
    }

    /// Whether a recovery fenced `seg` here at an epoch past `epoch`.
    fn fenced_past(&self, seg: SegmentId, epoch: u64) -> bool {
        lock(&self.fences).get(&seg).is_some_and(|&f| f > epoch)
    }

    /// Whether this node holds an unexpired lease on `seg` at its epoch and no recovery has
    /// fenced it.
    fn holds_lease(&self, seg: &SegmentMeta) -> bool {
        let lease = lock(&self.leases).get(&seg.id).copied();
        lease.is_some_and(|l| l.epoch == seg.epoch && l.is_valid(self.now_ms()))
            && !self.fenced_past(seg.id, seg.epoch.0)
    }

    /// Replica side of a recovery's fence: from now on refuse writes to `segment` of epochs
    /// below `epoch` (as leader or replica), and answer with the entries held durably. The
    /// count is taken under the segment's gate, so no write of the old epoch lands after it.
    ///
    /// The fence is durable before the answer: the recovery's seal may commit long after
    /// (its Raft entry can wait out a partition), and a replica that restarted in between and
    /// forgot the fence would let the old leader, leased again by another metadata leader
    /// that knew nothing of the recovery, reach a quorum past that seal. (Found by the Tier B
    /// simulation, seed 82.)
    pub async fn fence(&self, topic: &str, segment: u64, epoch: u64) -> Result<u64, Failure> {
        let seg = SegmentId(segment);
        if self.rejoin_pending() {
            return Err(REJOIN_PENDING.into());
        }
        if self.lost_since_open(seg) {
            return Err(LOST.into());
        }
        {
            // Writes of older epochs stop at once; the record below makes it last.
            let mut fences = lock(&self.fences);
            let f = fences.entry(seg).or_default();
            *f = (*f).max(epoch);
        }
        let mut recorded = self.recorded_fences.lock().await;
        if recorded.get(&seg).is_none_or(|&r| r < epoch) {
            let mut record = [0u8; FENCE_RECORD_LEN];
            record[..8].copy_from_slice(&segment.to_le_bytes());
            record[8..].copy_from_slice(&epoch.to_le_bytes());
            let failed = |e: std::io::Error| format!("recording the fence failed: {e}");
            self.data
                .batch_append_begin(FENCES_KEY, &[&record])
                .map_err(failed)?
                .done()
                .await
                .map_err(failed)?;
            if !self.store_fsyncs() {
                self.sync_store()?;
            }
            recorded.insert(seg, epoch);
        }
        drop(recorded);
        let gate = self.gate(seg);
        let _held = gate.write().await;
        tracing::info!(topic, segment, epoch, "segment fenced for recovery");
        Ok(self.data.entry_count(&segment_key(topic, seg)))
    }

    /// Replica side of a recovery's seal: answers with the entries held, and if that is short
    /// of the sealed count `len`, starts fetching the rest from `donor` (then the other
    /// replicas).
    pub fn seal_at(self: &Arc<Self>, topic: &str, segment: u64, len: u64, donor: u64) -> u64 {
        let seg = SegmentId(segment);
        let held = self.local_entry_count(topic, seg);
        if held < len {
            self.repair_from(topic, seg, len, NodeId(donor));
        }
        held
    }

    /// Starts fetching entries up to `len` of `seg` from `donor`, then the other replicas.
    fn repair_from(self: &Arc<Self>, topic: &str, seg: SegmentId, len: u64, donor: NodeId) {
        let mut sources = vec![donor];
        let others = self
            .with_segment(topic, seg, |s| s.replicas.clone())
            .unwrap_or_default();
        sources.extend(others.into_iter().filter(|&r| r != donor));
        self.spawn_repair(topic, seg, len, sources);
    }

    /// Replica side of a recovery's copy, before the seal is proposed: make sure the first
    /// `len` entries of `segment`, fenced here at `epoch`, are held durably, fetching what is
    /// missing from `donor` (then the other replicas). Answers with the entries held once the
    /// fetch is done, or after `COPY_WAIT` with what it has so far (the coordinator asks again).
    pub async fn copy_to(
        self: &Arc<Self>,
        topic: &str,
        segment: u64,
        epoch: u64,
        len: u64,
        donor: u64,
    ) -> Result<u64, Failure> {
        let seg = SegmentId(segment);
        if self.rejoin_pending() {
            return Err(REJOIN_PENDING.into());
        }
        if self.lost_since_open(seg) {
            return Err(LOST.into());
        }
        // Fenced at this recovery's epoch: the old leader can add nothing more here, so the
        // count only grows by the copy.
        if lock(&self.fences).get(&seg) != Some(&epoch) {
            return Err(format!(
                "segment {segment} is not fenced at epoch {epoch} here"
            ));
        }
        // Once sealed, `SealAt` decides the length; a copy could only add entries past it.
        if self
            .with_segment(topic, seg, |s| s.sealed_entries().is_some())
            .unwrap_or(true)
        {
            return Err(format!("segment {segment} is sealed or unknown here"));
        }
        if self.local_entry_count(topic, seg) < len {
            self.repair_from(topic, seg, len, NodeId(donor));
            let deadline = Instant::now() + COPY_WAIT;
            while self.local_entry_count(topic, seg) < len && Instant::now() < deadline {
                tokio::time::sleep(COPY_POLL).await;
            }
        }
        if !self.store_fsyncs() {
            self.sync_store()?;
        }
        Ok(self.local_entry_count(topic, seg))
    }

    /// Starts fetching entries `held..len` of a sealed segment from `sources` (in order),
    /// unless a fetch for it is already running.
    fn spawn_repair(self: &Arc<Self>, topic: &str, seg: SegmentId, len: u64, sources: Vec<NodeId>) {
        if !lock(&self.repairing).insert(seg) {
            return;
        }
        let node = self.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            if let Err(e) = node.repair(&topic, seg, len, &sources).await {
                tracing::debug!(%topic, segment = seg.0, error = %e, "repair stopped; retried later");
            }
            lock(&node.repairing).remove(&seg);
        });
    }

    /// Fetches the entries of a sealed segment this replica lacks, up to `len`, round by round.
    async fn repair(
        &self,
        topic: &str,
        seg: SegmentId,
        len: u64,
        sources: &[NodeId],
    ) -> Result<(), Failure> {
        let mut fetched = 0u64;
        'rounds: loop {
            let held = self.local_entry_count(topic, seg);
            if held >= len {
                if fetched > 0 {
                    self.counters.repairs.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(topic, segment = seg.0, len, fetched, "replica repaired");
                }
                // A recovery's copy (before the seal) is not a sealed segment made whole.
                if self
                    .with_segment(topic, seg, |s| s.sealed_entries())
                    .flatten()
                    .is_some_and(|sealed| sealed <= held)
                {
                    lock(&self.complete).insert(seg);
                }
                return Ok(());
            }
            let plan = ReadPlan {
                segment: seg,
                replicas: Vec::new(),
                sealed: true,
                first_offset: 0,
                position: held,
                count: (len - held).min(CATCH_UP_ENTRIES_MAX),
            };
            let mut last = String::from("no replica to fetch from");
            for &src in sources.iter().filter(|&&r| r != self.me()) {
                match self.read_from_replica(topic, &plan, src).await {
                    Ok(entries) if !entries.is_empty() => {
                        let n = entries.len() as u64;
                        let gate = self.gate(seg);
                        let _held = gate.write().await;
                        let refs: Vec<&[u8]> = entries.iter().map(Vec::as_slice).collect();
                        self.append_at(topic, seg, held, &refs).await?;
                        fetched += n;
                        self.counters
                            .repaired_entries
                            .fetch_add(n, Ordering::Relaxed);
                        continue 'rounds;
                    }
                    Ok(_) => last = format!("replica {} lacks position {held}", src.0),
                    Err(e) => last = e,
                }
            }
            return Err(last);
        }
    }

    /// The segment's gate: `true` once closed for a seal. Appends (a leader's or a replica's)
    /// hold it shared until their write completes; a fence, a seal and a repair exclusively.
    fn gate(&self, seg: SegmentId) -> Arc<tokio::sync::RwLock<bool>> {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(seg)
            .or_default()
            .clone()
    }

    /// Appends on this node, the open segment's leader. `Ok(None)` while the segment is being
    /// sealed.
    /// Appends `payloads` to the open segment `seg` led here, under its lease and gate.
    /// `queued(position, pending)` runs once the batch has its positions but before this node's
    /// own (group-committed) write completes, so the caller can send it to the replicas
    /// meanwhile. `Ok(None)`: not now (no lease yet, sealing, fenced); retry after a change.
    async fn append_local(
        &self,
        topic: &str,
        seg: &SegmentMeta,
        payloads: &[&[u8]],
        queued: impl FnOnce(u64, bool),
    ) -> Result<Option<u64>, Failure> {
        let seg_ref = SegmentRef {
            topic: topic.to_string(),
            segment: seg.id,
        };
        let lease = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&seg.id)
            .copied();
        let Some(lease) = lease else {
            // No lease yet (the renew loop grants one within 100 ms): wait, then retry.
            return Ok(None);
        };
        let now = self.now_ms();
        if let Err(denied) = self
            .sm
            .read(|m| may_append(m, self.me(), &seg_ref, &lease, now))
        {
            tracing::debug!(topic, segment = seg.id.0, %denied, "append refused by the lease check");
            return Ok(None);
        }
        let gate = self.gate(seg.id);
        let key = segment_key(topic, seg.id);
        let position = {
            let frozen = gate.read().await;
            // Closed for a seal, or fenced by a failover (which will seal it and open the next
            // segment elsewhere; the caller then follows the metadata there).
            if *frozen || self.fenced_past(seg.id, seg.epoch.0) {
                return Ok(None);
            }
            // A full segment takes nothing more, even if the gate is open: after a restart the
            // gate starts open, while a seal at the full length may still be on its way
            // through Raft. (Found by the Tier B simulation, seed 1464.)
            if self.data.entry_count(&key) >= self.cfg.max_segment_entries {
                drop(frozen);
                self.close_gate(topic, seg.id).await;
                return Ok(None);
            }
            let pending = self
                .data
                .batch_append_begin(&key, payloads)
                .map_err(|e| format!("append failed: {e}"))?;
            queued(pending.first(), pending.is_pending());
            // Some of the batch may go to replicas before this store has it. If the store then
            // rolls it back (a failed write), appending at those positions again could give
            // replicas different entries there: the segment is left to a failover. So is it
            // when nobody learns the outcome (this future dropped midway, say by a timeout).
            let mut unresolved = Unresolved::new(|| self.taint(seg.id, seg.epoch.0));
            let appended = pending.done().await;
            let position = match appended {
                Ok(p) => {
                    unresolved.disarm();
                    p
                }
                Err(e) => return Err(format!("append failed: {e}")),
            };
            #[cfg(madsim)]
            crate::sim::record_append(crate::sim::Append {
                node: self.me().0,
                topic: topic.to_string(),
                segment: seg.id.0,
                epoch: seg.epoch.0,
                first: seg.base_offset + position,
                count: payloads.len() as u64,
            });
            position
        };
        if position + payloads.len() as u64 >= self.cfg.max_segment_entries {
            // Close the gate now so the count stays exact; the rollover loop proposes the seal
            // within one tick.
            self.close_gate(topic, seg.id).await;
        }
        Ok(Some(seg.base_offset + position))
    }

    async fn close_gate(&self, topic: &str, seg: SegmentId) {
        *self.gate(seg).write().await = true;
        tracing::debug!(topic, segment = seg.0, "segment full; gate closed");
    }

    /// Never appends to `seg` at `epoch` again here (its lease is dropped and not renewed):
    /// a failover seals it from the replicas.
    fn taint(&self, seg: SegmentId, epoch: u64) {
        tracing::warn!(
            segment = seg.0,
            epoch,
            "local append failed or was abandoned; segment left to a failover"
        );
        lock(&self.tainted).insert((seg, epoch));
        lock(&self.leases).remove(&seg);
    }

    /// Seals `seg` (which this node leads) at its exact local length.
    async fn seal(&self, topic: &str, seg: &SegmentMeta, stuck: bool) -> Result<(), Failure> {
        *self.gate(seg.id).write().await = true;
        let entries = self.data.entry_count(&segment_key(topic, seg.id));
        // A segment whose replicas that lost their copies leave too few for a quorum can never
        // reach one again: seal it at this node's length. Every acknowledged entry is here (a
        // leader acknowledges only what it holds), and the other replicas' repair loops copy
        // the sealed segment from here.
        if !stuck && self.quorum_length(topic, seg) < entries {
            // Seal only what a majority holds: a PUT still waiting for its quorum may yet be
            // acknowledged, and a sealed entry on this node alone would be unreadable if it
            // failed.
            let quorum = self.replicate(topic, seg, entries, self.store_fsyncs());
            let _ = tokio::time::timeout(QUORUM_PROBE_WAIT, quorum).await;
            if self.quorum_length(topic, seg) < entries {
                return Err("replicas lag the segment; seal retried".into());
            }
        }
        let cmd = Command::Seal {
            topic: topic.to_string(),
            segment: seg.id,
            epoch: seg.epoch,
            entries,
        };
        match self.propose(cmd).await {
            Ok(o) => {
                self.counters.seals.fetch_add(1, Ordering::Relaxed);
                tracing::info!(topic, segment = seg.id.0, entries, outcome = ?o, "segment sealed");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    // ------------------------------------------------------------------ GET

    /// Hands out the next entry at the topic's shared cursor (`None`: nothing to read).
    ///
    /// At-least-once: the entry is read first, then claimed by a cursor compare-and-set. Once
    /// the claim is sent, only a definite refusal (the cursor moved) makes this GET try again;
    /// if the claim's outcome is unknown (timeout, lost leader) the entry is handed out anyway,
    /// since the claim may have committed. So an `ERR` reply never hides a consumed entry; at
    /// worst an entry is delivered twice.
    pub async fn get(&self, topic: &str) -> Result<Option<Vec<u8>>, Failure> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        // Finish before the server's request timeout, which would drop this future mid-claim.
        let deadline = Instant::now() + self.cfg.request_timeout * 9 / 10;
        let mut asked_report = false;
        for _ in 0..GET_ATTEMPTS_MAX {
            // Plan inside the read lock: a GET must not clone the topic's whole chain.
            let planned = self.sm.read(|m| {
                m.topic(topic).map(|t| {
                    (
                        next_shared_read(topic, t, 1),
                        t.open_segment().and_then(|s| s.leader()),
                    )
                })
            });
            let Some((next, open_leader)) = planned else {
                return Err("unknown topic".into());
            };
            let Some((plan, cmd)) = next else {
                if !asked_report {
                    asked_report = true;
                    if let Some(leader) = open_leader {
                        self.ask_report(topic, leader).await;
                    }
                    continue;
                }
                self.counters.gets_empty.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            };
            // Read first, then claim: an entry is never skipped because its holder failed.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let mut entries = tokio::time::timeout(remaining, self.read_plan(topic, &plan))
                .await
                .map_err(|_| "timed out reading the entry".to_string())??;
            if entries.is_empty() {
                return Err("segment holder returned nothing".into());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err("timed out before claiming the entry".into());
            }
            match tokio::time::timeout(remaining, self.propose_raw(cmd)).await {
                Ok(Ok(MetaResponse {
                    result: Some(Ok(Outcome::CursorAdvanced { .. })),
                })) => return Ok(Some(entries.swap_remove(0))),
                // Applied, but refused (another GET claimed this entry): try the next one.
                Ok(Ok(_)) => self.wait_change(Duration::from_millis(100)).await,
                // Certainly not proposed (no metadata leader known here): try again.
                Ok(Err(e)) if !e.maybe_applied => {
                    tracing::debug!(topic, error = %e.reason, "cursor claim not proposed; retrying");
                    self.wait_change(Duration::from_millis(100)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(topic, error = %e.reason, "cursor claim outcome unknown; delivering (at-least-once)");
                    return Ok(Some(entries.swap_remove(0)));
                }
                Err(_) => {
                    tracing::debug!(topic, "cursor claim timed out; delivering (at-least-once)");
                    return Ok(Some(entries.swap_remove(0)));
                }
            }
        }
        Err("cursor contended; retry".into())
    }

    async fn ask_report(&self, topic: &str, leader: NodeId) {
        if leader == self.me() {
            let _ = self.report_committed(topic).await;
        } else if let Some(addr) = self.addr_of(leader) {
            let req = RpcRequest::ReportCommitted {
                topic: topic.to_string(),
            };
            let _ = self
                .peers
                .get(&addr)
                .call(&req, self.cfg.request_timeout)
                .await;
        }
        self.wait_change(Duration::from_millis(20)).await;
    }

    /// Reports this node's durable length of the topic's open segment, if it leads it and the
    /// metadata lags.
    pub async fn report_committed(&self, topic: &str) -> Result<(), Failure> {
        let Some(open) = self.open_segment_of(topic) else {
            return Err("unknown topic".into());
        };
        let Some(seg) = open else {
            return Ok(());
        };
        if seg.leader() != Some(self.me()) {
            return Err("not the segment leader".into());
        }
        let mut count = self.quorum_length(topic, &seg);
        let local = self.data.entry_count(&segment_key(topic, seg.id));
        if count < local {
            // Replicas lag (or, after a restart, this node has not heard from them yet): push,
            // and give a quorum a moment to answer.
            let quorum = self.replicate(topic, &seg, local, self.store_fsyncs());
            let _ = tokio::time::timeout(QUORUM_PROBE_WAIT, quorum).await;
            count = self.quorum_length(topic, &seg);
        }
        if count <= seg.committed {
            return Ok(());
        }
        let cmd = Command::ReportCommitted {
            topic: topic.to_string(),
            segment: seg.id,
            epoch: seg.epoch,
            committed: count,
        };
        self.propose(cmd).await.map(|_| ())
    }

    /// Reads a planned range from the first replica that holds all of it (the leader first).
    async fn read_plan(&self, topic: &str, plan: &ReadPlan) -> Result<Vec<Vec<u8>>, Failure> {
        let mut last = String::from("segment has no replica");
        for &holder in &plan.replicas {
            match self.read_from_replica(topic, plan, holder).await {
                Ok(entries) if entries.len() as u64 >= plan.count.min(1) => return Ok(entries),
                Ok(_) => last = format!("replica {} does not hold the entries yet", holder.0),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn read_from_replica(
        &self,
        topic: &str,
        plan: &ReadPlan,
        holder: NodeId,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        if holder == self.me() {
            return self.read_local(topic, plan.segment.0, plan.position, plan.count);
        }
        let addr = self
            .addr_of(holder)
            .ok_or_else(|| format!("no address for node {}", holder.0))?;
        let req = RpcRequest::Read {
            topic: topic.to_string(),
            segment: plan.segment.0,
            position: plan.position,
            count: plan.count,
        };
        match self
            .peers
            .get(&addr)
            .call(&req, self.cfg.request_timeout)
            .await
        {
            Ok(RpcResponse::Read(r)) => r,
            Ok(_) => Err("mismatched rpc response".into()),
            Err(e) => Err(format!("segment holder {} unavailable: {e}", holder.0)),
        }
    }

    /// Reads entries of a segment held here.
    pub fn read_local(
        &self,
        topic: &str,
        segment: u64,
        position: u64,
        count: u64,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let key = segment_key(topic, SegmentId(segment));
        self.data
            .read_from(&key, position, count.min(10_000) as usize, 16 << 20)
            .map(|v| v.into_iter().map(|e| e.data).collect())
            .map_err(|e| format!("read failed: {e}"))
    }

    // ------------------------------------------------------------------ STATE, METRICS

    /// `STATE <topic>` as JSON.
    pub fn state_json(&self, topic: &str) -> Result<String, Failure> {
        let t = self.topic(topic).ok_or("unknown topic")?;
        let segments: Vec<_> = t
            .segments
            .iter()
            .map(|s| {
                let entries = match s.sealed_entries() {
                    Some(n) => n,
                    None if s.leader() == Some(self.me()) => {
                        self.data.entry_count(&segment_key(topic, s.id))
                    }
                    None => s.committed,
                };
                json!({
                    "id": s.id.0,
                    "leader": s.leader().map(|n| n.0),
                    "replicas": s.replicas.iter().map(|n| n.0).collect::<Vec<_>>(),
                    "epoch": s.epoch.0,
                    "sealed": !s.is_open(),
                    "base_offset": s.base_offset,
                    "entry_count": entries,
                    "committed": s.committed,
                    "lagging_replicas": self.lagging_replicas(topic, s),
                })
            })
            .collect();
        let durability = self.durability_name();
        Ok(json!({ "topic": topic, "cursor": t.cursor, "durability": durability, "segments": segments }).to_string())
    }

    /// `METRICS` as JSON.
    pub fn metrics_json(&self) -> String {
        let m = self.raft.metrics().borrow().clone();
        let c = &self.counters;
        let nodes: BTreeMap<String, serde_json::Value> = self.sm.read(|md| {
            md.nodes()
                .iter()
                .map(|(id, n)| (id.0.to_string(), json!({ "addr": n.addr, "live": n.live })))
                .collect()
        });
        json!({
            "node_id": self.cfg.id,
            "durability": self.durability_name(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "raft": {
                "state": format!("{:?}", m.state),
                "current_term": m.current_term,
                "current_leader": m.current_leader,
                "last_log_index": m.last_log_index,
                "last_applied": m.last_applied.map(|l| l.index),
                "voters": m.membership_config.membership().voter_ids().collect::<Vec<_>>(),
                "learners": m.membership_config.membership().learner_ids().collect::<Vec<_>>(),
            },
            "nodes": nodes,
            "recoveries": *lock(&self.recoveries),
            "counters": {
                "puts": c.puts.load(Ordering::Relaxed),
                "puts_forwarded": c.puts_forwarded.load(Ordering::Relaxed),
                "gets": c.gets.load(Ordering::Relaxed),
                "gets_empty": c.gets_empty.load(Ordering::Relaxed),
                "errors": c.errors.load(Ordering::Relaxed),
                "seals": c.seals.load(Ordering::Relaxed),
                "failovers": c.failovers.load(Ordering::Relaxed),
                "re_replications": c.repairs.load(Ordering::Relaxed),
                "re_replicated_entries": c.repaired_entries.load(Ordering::Relaxed),
                "replicas_moved": c.replicas_moved.load(Ordering::Relaxed),
                "replica_pushes": self.replication.pushes.load(Ordering::Relaxed),
                "replica_entries_sent": self.replication.entries_sent.load(Ordering::Relaxed),
                "rpc_connections": c.rpc_connections.load(Ordering::Relaxed),
                "rpc_in_flight": c.rpc_in_flight.load(Ordering::Relaxed),
            },
        })
        .to_string()
    }

    /// `STATE`: the replicas of the open segment `seg` that last reported fewer entries than
    /// this node holds; known only on the segment's leader (`null` elsewhere, and for sealed
    /// segments). A segment with any is
    /// under-replicated.
    fn lagging_replicas(&self, topic: &str, seg: &SegmentMeta) -> Option<Vec<u64>> {
        // Replica lengths are tracked while pushing the open segment; after a restart they are
        // unknown for sealed ones (which the repair loop heals from the replicas' side).
        if seg.leader() != Some(self.me()) || !seg.is_open() {
            return None;
        }
        let local = self.data.entry_count(&segment_key(topic, seg.id));
        let st = lock(&self.replication.state);
        Some(
            seg.replicas
                .iter()
                .filter(|&&r| r != self.me())
                .filter(|&&r| st.length(seg.id, r) < local)
                .map(|r| r.0)
                .collect(),
        )
    }

    /// The durability level PUTs are acknowledged at (`STATE`, `METRICS`).
    fn durability_name(&self) -> &'static str {
        self.cfg.durability.name()
    }

    /// Whether the segment store fsyncs every write before it returns.
    fn store_fsyncs(&self) -> bool {
        self.cfg.durability.needs_fsync()
    }

    /// Fsyncs the segment store (for a write acknowledged at an fsync level on a node whose
    /// store does not fsync every write).
    fn sync_store(&self) -> Result<(), Failure> {
        let sync = || self.data.sync();
        #[cfg(not(madsim))]
        let synced = tokio::task::block_in_place(sync);
        #[cfg(madsim)]
        let synced = sync();
        synced.map_err(|e| format!("fsync failed: {e}"))
    }

    /// The request counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts a request that ended in `ERR`.
    pub fn count_error(&self) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
    }

    // ------------------------------------------------------------------ background loops

    /// Segments this node leads, per the local metadata.
    fn led_open_segments(&self) -> Vec<(String, SegmentMeta)> {
        let me = self.me();
        self.sm.read(|m| {
            m.topics()
                .iter()
                .filter_map(|(name, t)| {
                    t.open_segment()
                        .filter(|s| s.leader() == Some(me))
                        .map(|s| (name.clone(), s.clone()))
                })
                .collect()
        })
    }

    /// Reports committed lengths of the segments this node leads, forever.
    pub async fn commit_report_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(COMMIT_REPORT_INTERVAL).await;
            // All at once: one at a time, a node leading many written segments waited a Raft
            // round per segment, and readers of the last one waited for all of them.
            let this = &self;
            let reports = this
                .led_open_segments()
                .into_iter()
                .filter(|(topic, seg)| {
                    this.data.entry_count(&segment_key(topic, seg.id)) > seg.committed
                })
                .map(|(topic, _)| async move {
                    if let Err(e) = this.report_committed(&topic).await {
                        tracing::debug!(%topic, error = %e, "commit report failed");
                    }
                });
            futures_util::future::join_all(reports).await;
        }
    }

    /// The rollover monitor: seals full segments this node leads (and retries seals whose
    /// proposal failed).
    pub async fn rollover_loop(self: Arc<Self>) {
        let mut tick =
            tokio::time::interval(self.cfg.monitor_check.min(Duration::from_millis(100)));
        let mut last_full_scan = Instant::now();
        loop {
            tick.tick().await;
            let full_scan = last_full_scan.elapsed() >= self.cfg.monitor_check;
            if full_scan {
                last_full_scan = Instant::now();
            }
            let led = self.led_open_segments();
            {
                let open: BTreeSet<SegmentId> = led.iter().map(|(_, s)| s.id).collect();
                lock(&self.replication.state)
                    .lost
                    .retain(|(seg, _)| open.contains(seg));
            }
            for (topic, seg) in led {
                if self.fenced_past(seg.id, seg.epoch.0) {
                    // A failover is sealing it.
                    continue;
                }
                let closed = *self.gate(seg.id).read().await;
                let full = full_scan
                    && self.data.entry_count(&segment_key(&topic, seg.id))
                        >= self.cfg.max_segment_entries;
                let stuck = self.quorum_lost(&seg);
                if closed || full || stuck {
                    if let Err(e) = self.seal(&topic, &seg, stuck).await {
                        tracing::warn!(%topic, segment = seg.id.0, error = %e, "seal failed; will retry");
                    }
                }
            }
        }
    }

    /// This node's clock for leases, in ms since it started. (Under simulation it may run fast
    /// or slow, within the drift bound, as the simulator decides.)
    fn now_ms(&self) -> u64 {
        let raw = self.started.elapsed().as_millis() as u64;
        #[cfg(madsim)]
        let raw = crate::sim::skewed_ms(self.cfg.id, raw);
        raw
    }

    /// Grantor side (on the metadata leader): renews `holder`'s lease on each segment asked
    /// for that the metadata names it leader of, open, at the epoch asked. One confirmation
    /// covers them all, so renewing costs a holder one metadata round however many segments
    /// it leads (renewing them one at a time, a node leading ~30 segments on a loaded machine
    /// took longer than a lease, and its leases lapsed with nothing wrong).
    ///
    /// The grant reads linearizable metadata: leadership is confirmed by a quorum and everything
    /// committed is applied first. A leader fresh from an election has not yet applied what its
    /// predecessors committed (a seal, say), and must not grant a lease on that stale view.
    pub async fn grant_leases(
        &self,
        holder: u64,
        asks: &[LeaseAsk],
    ) -> Result<Vec<Result<(), Failure>>, Failure> {
        let term = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            if m.current_leader != Some(self.cfg.id) {
                return Err("not the metadata leader".into());
            }
            m.current_term
        };
        // Bounded: a leader that loses its leadership while confirming would otherwise wait
        // forever for an entry that never commits.
        match tokio::time::timeout(LEASE_GRANT_CONFIRM_MAX, self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("cannot confirm the metadata: {e}")),
            Err(_) => return Err("timed out confirming the metadata".into()),
        }
        // A quorum heard from this leader after the request was sent; a successor's takeover
        // bound counts from this contact (filed under the term read before confirming, which
        // is never later than the term confirmed).
        self.note_leader_contact(term);
        let now = self.now_ms();
        let mut grants = lock(&self.grants);
        let Grants { table, recovering } = &mut *grants;
        Ok(self.sm.read(|m| {
            asks.iter()
                .map(|ask| {
                    if recovering.contains(&SegmentId(ask.segment)) {
                        return Err("the segment is being recovered".into());
                    }
                    let seg = SegmentRef {
                        topic: ask.topic.clone(),
                        segment: SegmentId(ask.segment),
                    };
                    table
                        .grant(m, NodeId(holder), &seg, Epoch(ask.epoch), now)
                        .map_err(|e| e.to_string())
                })
                .collect()
        }))
    }

    /// A Raft append arrived carrying the leader's commit index: for a node that started with
    /// an empty log, the first one bounds what was applied before it started (see `Boot`).
    ///
    /// Only a commit of the leader's own term counts (`commit` is its (term, index)): a leader
    /// fresh from an election may not yet know how far its predecessor committed, and this
    /// node (if it lost its log) may have applied further than that. Once a leader committed
    /// an entry of its own term, every entry committed before lies below it.
    pub fn note_leader_commit(&self, commit: Option<(u64, u64)>, leader_term: u64) {
        let Some((term, index)) = commit else {
            return;
        };
        if term != leader_term {
            return;
        }
        let mut b = lock(&self.boot);
        if b.index.is_none() {
            b.index = Some(index);
        }
    }

    /// Whether `seg` was opened after this process started (see `Boot`); `false` while unsure.
    ///
    /// A node that started empty knows it from its own `Command::Rejoin` once applied here:
    /// proposed after the start, committed through the current metadata leader, so every
    /// segment at or past its bound opened after the start. (The boot index of such a node
    /// comes from the first Raft append it received, which a deposed leader still sending
    /// from a minority may have sent: it can lie below what this node applied before it lost
    /// its disk, Tier B seed 731.)
    fn opened_since_start(&self, seg: SegmentId) -> bool {
        if self.cfg.started_empty {
            let (me, incarnation) = (self.me(), self.cfg.incarnation);
            return self
                .sm
                .read(|m| m.rejoin_of(me))
                .is_some_and(|r| r.incarnation == incarnation && seg >= r.first_new);
        }
        self.settle_boot();
        lock(&self.boot).first_new.is_some_and(|first| seg >= first)
    }

    /// Whether this node started empty and its `Command::Rejoin` is not applied here yet: it
    /// cannot tell yet which segments opened after its start.
    fn rejoin_pending(&self) -> bool {
        self.cfg.started_empty && self.rejoin_bound().is_none()
    }

    /// The bound this process's `Command::Rejoin` recorded, once applied here.
    pub fn rejoin_bound(&self) -> Option<SegmentId> {
        let (me, incarnation) = (self.me(), self.cfg.incarnation);
        self.sm
            .read(|m| m.rejoin_of(me))
            .filter(|r| r.incarnation == incarnation)
            .map(|r| r.first_new)
    }

    /// Announces this process's start with an empty data directory (`Command::Rejoin`),
    /// until the metadata has it.
    pub async fn announce_rejoin(&self) -> Result<(), Failure> {
        self.propose(Command::Rejoin {
            node: self.me(),
            incarnation: self.cfg.incarnation,
        })
        .await
        .map(|_| ())
    }

    /// Whether this node started empty and `seg` may predate it (see
    /// `NodeConfig::started_empty`).
    fn lost_since_open(&self, seg: SegmentId) -> bool {
        (self.cfg.started_empty && !self.opened_since_start(seg))
            || self.cfg.lost_before.is_some_and(|b| seg.0 < b)
    }

    /// Whether a Raft append (or snapshot) from a leader of `term` may be taken here.
    ///
    /// A node that started empty forgot its vote and every term it saw. A deposed leader of
    /// an older term, still sending from what was a minority, would find it willing, and with
    /// its acknowledgement could commit entries over ones a newer term committed with this
    /// node's earlier help (Tier B seed 1422: two committed metadata logs). So it takes appends
    /// only from a term no lower than the highest that enough other voters report
    /// (`learn_raft_floor`): those meet every majority that committed anything. Once it took
    /// one, its own persisted vote refuses older terms, as for any node.
    pub fn takes_raft_append(&self, term: u64) -> bool {
        !self.cfg.started_empty || lock(&self.raft_floor).is_some_and(|floor| term >= floor)
    }

    /// Learns the floor of `takes_raft_append`: asks `seed` (a peer's RPC address) for the
    /// voters, then every voter but this node (and any further voter an answer names) for its
    /// Raft term, until
    /// `recovery::fence_quorum(voters)` of them answered (the fewest that meet every majority
    /// of the voters in a node other than this one). Returns the floor (the highest term
    /// heard).
    pub async fn learn_raft_floor(&self, seed: &str) -> Result<u64, Failure> {
        let timeout = Duration::from_secs(1);
        let ask = |addr: String| async move {
            match self
                .peers
                .get(&addr)
                .call(&RpcRequest::RaftTerm, timeout)
                .await
            {
                Ok(RpcResponse::RaftTerm { term, voters }) => Ok((term, voters)),
                Ok(_) => Err("mismatched rpc response".to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        let (seed_term, voters) = ask(seed.to_string()).await?;
        // Every voter any answer names is asked (a peer may not have heard of a membership
        // change yet), and the quorum is counted over all of them.
        let mut voters: BTreeMap<u64, String> = voters.into_iter().collect();
        let mut asked = BTreeSet::new();
        let mut terms: Vec<u64> = Vec::new();
        for _ in 0..=walrus_core::cluster::metadata::NODES_MAX {
            if voters.len() > walrus_core::cluster::metadata::NODES_MAX {
                return Err(format!("the answers named {} voters", voters.len()));
            }
            let round: Vec<(u64, String)> = voters
                .iter()
                .filter(|(id, _)| **id != self.cfg.id && !asked.contains(*id))
                .map(|(id, addr)| (*id, addr.clone()))
                .collect();
            if round.is_empty() {
                break;
            }
            asked.extend(round.iter().map(|(id, _)| *id));
            let answers =
                futures_util::future::join_all(round.into_iter().map(|(_, a)| ask(a))).await;
            for (term, named) in answers.into_iter().filter_map(Result::ok) {
                terms.push(term);
                for (id, addr) in named {
                    voters.entry(id).or_insert(addr);
                }
            }
        }
        if voters.len() > walrus_core::cluster::metadata::NODES_MAX {
            return Err(format!("the answers named {} voters", voters.len()));
        }
        let need = walrus_core::cluster::recovery::fence_quorum(voters.len());
        if terms.len() < need {
            return Err(format!(
                "{} of {} voters answered; {need} needed",
                terms.len(),
                voters.len()
            ));
        }
        let floor = terms
            .into_iter()
            .chain([seed_term])
            .max()
            .unwrap_or(seed_term);
        *lock(&self.raft_floor) = Some(floor);
        tracing::info!(floor, "raft appends taken from this term on");
        Ok(floor)
    }

    /// Whether this node's Raft log holds everything committed before it started: always,
    /// unless it started empty; then once its log reaches the commit index of the first
    /// append it received (see `Boot`).
    pub fn raft_caught_up(&self) -> bool {
        if !self.cfg.started_empty {
            return true;
        }
        let Some(index) = lock(&self.boot).index else {
            return false;
        };
        self.raft.metrics().borrow().last_log_index.unwrap_or(0) >= index
    }

    /// Fixes `Boot::first_new` once this node has applied up to the boot index: the next
    /// segment id as the metadata stood at exactly that index (`StateMachine::watch_index`),
    /// so a segment opened after it never counts as old, however late this runs.
    fn settle_boot(&self) {
        let mut b = lock(&self.boot);
        if b.first_new.is_none() && b.index.is_some() {
            b.first_new = self.sm.watched_next_segment();
        }
    }

    /// Records that the metadata leader of `term` was heard from (or, as that leader,
    /// granted) now.
    pub fn note_leader_contact(&self, term: u64) {
        let now = self.now_ms();
        let mut c = lock(&self.leader_contacts);
        let at = c.entry(term).or_default();
        *at = (*at).max(now);
        // Bounded: the two oldest terms merge under the older one, keeping the later time.
        // A question about any term above it then sees that time: earlier, never later.
        if c.len() > LEADER_CONTACT_TERMS_MAX {
            if let (Some((k1, t1)), Some((_, t2))) = (c.pop_first(), c.pop_first()) {
                c.insert(k1, t1.max(t2));
            }
        }
    }

    /// Milliseconds since this node last heard from the metadata leader of any term below
    /// `term` (since it started, if never).
    fn leader_contact_before(&self, term: u64) -> u64 {
        let last = lock(&self.leader_contacts)
            .range(..term)
            .map(|(_, &at)| at)
            .max()
            .unwrap_or(0);
        self.now_ms().saturating_sub(last)
    }

    /// A new metadata leader's question (see `Takeover`): milliseconds since this node last
    /// heard from a leader of an older term, once it has seen `term` (so it refuses older
    /// leaders from now on and the answer stays true).
    pub fn leader_contact(&self, term: u64) -> Option<u64> {
        if self.raft.metrics().borrow().current_term < term {
            return None;
        }
        Some(self.leader_contact_before(term))
    }

    /// Holder side: renews the leases of every open segment this node leads, every 100 ms, in
    /// one request; an append needs a lease that has not expired (counted from when it was
    /// requested).
    pub async fn lease_loop(self: Arc<Self>) {
        loop {
            self.settle_boot();
            let led = self.led_open_segments();
            let led_ids: BTreeSet<(SegmentId, u64)> =
                led.iter().map(|(_, s)| (s.id, s.epoch.0)).collect();
            lock(&self.cleared).retain(|k| led_ids.contains(k));
            lock(&self.tainted).retain(|k| led_ids.contains(k));
            let mut renew = Vec::new();
            for (topic, seg) in led {
                if self.fenced_past(seg.id, seg.epoch.0) {
                    // Fenced by a failover: let the lease run out so that the recovery (or a
                    // new metadata leader's) can finish.
                    continue;
                }
                let key = (seg.id, seg.epoch.0);
                if lock(&self.tainted).contains(&key) {
                    continue;
                }
                if !lock(&self.cleared).contains(&key) {
                    if !self.opened_since_start(seg.id) {
                        // First sight in this process of a segment that may predate it: check
                        // the replicas on the side (they may be slow to answer) and take the
                        // first lease right after.
                        if lock(&self.taking_up).insert(seg.id) {
                            let this = self.clone();
                            tokio::spawn(async move {
                                if this.replicas_not_ahead(&topic, &seg).await {
                                    lock(&this.cleared).insert(key);
                                    this.renew_leases(&[(topic, seg.clone())]).await;
                                }
                                lock(&this.taking_up).remove(&seg.id);
                            });
                        }
                        continue;
                    }
                    lock(&self.cleared).insert(key);
                }
                renew.push((topic, seg));
            }
            if !renew.is_empty() {
                self.renew_leases(&renew).await;
            }
            tokio::time::sleep(LEASE_RENEW_INTERVAL).await;
        }
    }

    /// Asks the metadata leader to renew this node's leases on `segs` (counted from now).
    async fn renew_leases(&self, segs: &[(String, SegmentMeta)]) {
        let requested_at = self.now_ms();
        let asks: Vec<LeaseAsk> = segs
            .iter()
            .map(|(topic, seg)| LeaseAsk {
                topic: topic.clone(),
                segment: seg.id.0,
                epoch: seg.epoch.0,
            })
            .collect();
        let leader = self.raft.metrics().borrow().current_leader;
        let answers = match leader {
            Some(l) if l == self.cfg.id => self.grant_leases(self.cfg.id, &asks).await,
            Some(l) => match self.addr_of(NodeId(l)) {
                Some(addr) => {
                    let req = RpcRequest::LeaseGrant {
                        holder: self.cfg.id,
                        segments: asks,
                    };
                    match self
                        .peers
                        .get(&addr)
                        .call(&req, LEASE_RENEW_INTERVAL * 5)
                        .await
                    {
                        Ok(RpcResponse::LeaseGrant(answers)) => answers,
                        Ok(other) => Err(format!("unexpected answer {other:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                }
                None => Err(format!("no address for metadata leader {l}")),
            },
            None => Err("no metadata leader".into()),
        };
        let answers = match answers {
            Ok(a) if a.len() == segs.len() => a,
            Ok(a) => {
                tracing::debug!(
                    asked = segs.len(),
                    answered = a.len(),
                    "lease answer mismatch"
                );
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "lease renewal failed");
                return;
            }
        };
        let mut leases = lock(&self.leases);
        for ((topic, seg), answer) in segs.iter().zip(answers) {
            match answer {
                Ok(()) => {
                    leases.insert(
                        seg.id,
                        Lease::granted(seg.epoch, requested_at, &self.lease_cfg),
                    );
                }
                Err(e) => {
                    tracing::debug!(%topic, segment = seg.id.0, error = %e, "lease not granted");
                }
            }
        }
    }

    /// Whether every replica of `seg` answers holding no more entries than this node's store.
    /// A leader takes up an open segment (asks for its first lease in this process) only then:
    /// a replica holding more means this node lost entries it had sent (a restart that lost
    /// unsynced writes, a wiped directory, a failed local write), and appending at those
    /// positions again would give the replicas different entries there. Such a segment gets
    /// no lease, so a failover seals it from the replicas.
    async fn replicas_not_ahead(&self, topic: &str, seg: &SegmentMeta) -> bool {
        let local = self.local_entry_count(topic, seg.id);
        for &r in seg.replicas.iter().filter(|&&r| r != self.me()) {
            let Some(addr) = self.addr_of(r) else {
                return false;
            };
            let req = RpcRequest::Held {
                topic: topic.to_string(),
                segment: seg.id.0,
            };
            match self
                .peers
                .get(&addr)
                .call(&req, LEASE_RENEW_INTERVAL * 5)
                .await
            {
                Ok(RpcResponse::Held(n)) if n <= local => {}
                Ok(RpcResponse::Held(n)) => {
                    tracing::warn!(topic, segment = seg.id.0, replica = r.0, held = n, local,
                        "a replica holds entries this leader lacks; leaving the segment to a failover");
                    return false;
                }
                _ => return false,
            }
        }
        true
    }

    /// The failure detector, active on the metadata leader: probes every registered node and
    /// marks it dead after repeated failures (and live again once it answers).
    pub async fn probe_loop(self: Arc<Self>) {
        let mut failures: HashMap<NodeId, u32> = HashMap::new();
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let is_leader = self.raft.metrics().borrow().current_leader == Some(self.cfg.id);
            if !is_leader {
                failures.clear();
                continue;
            }
            let nodes: Vec<(NodeId, String, bool)> = self.sm.read(|m| {
                m.nodes()
                    .iter()
                    .map(|(id, n)| (*id, n.addr.clone(), n.live))
                    .collect()
            });
            for (id, addr, live) in nodes {
                if id == self.me() {
                    continue;
                }
                let up = matches!(
                    self.peers
                        .get(&addr)
                        .call(&RpcRequest::Ping, PROBE_INTERVAL)
                        .await,
                    Ok(RpcResponse::Pong)
                );
                let n = failures.entry(id).or_default();
                *n = if up { 0 } else { *n + 1 };
                let verdict = if up && !live {
                    Some(true)
                } else if !up && live && *n >= PROBE_FAILURES_MAX {
                    Some(false)
                } else {
                    None
                };
                if let Some(live) = verdict {
                    tracing::info!(node = id.0, live, "node liveness changed");
                    let _ = self.propose(Command::SetNodeLive { node: id, live }).await;
                }
            }
        }
    }
}

/// A takeover bound being collected by a fresh metadata leader.
struct Pending {
    takeover: Takeover,
    started_ms: u64,
    ticks: u32,
}

/// A recovery the failover loop drives, and how long it has been at it.
struct Driving {
    rec: Recovery,
    ticks: u32,
}

impl Node {
    /// Failover, active on the metadata leader: a segment whose leader has not renewed its
    /// lease for the detection timeout (the lease plus the clock-drift bound and a margin, so
    /// the old lease has run out on the leader's own clock) is recovered with
    /// `core::cluster::recovery::Recovery`: fence the replicas at the next epoch, take the
    /// longest length of a fenced majority (it holds every acknowledged entry), propose
    /// `Recover` (seal there, open the next segment on a live node), then bring the replicas
    /// up to the seal.
    ///
    /// A new term of metadata leadership starts with every open segment counted as granted
    /// at that moment: grants made by a predecessor are unknown here.
    pub async fn failover_loop(self: Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(SegmentRef, RecoveryInput)>();
        let (contact_tx, mut contact_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut takeover: Option<Pending> = None;
        let mut led_term: Option<u64> = None;
        let mut driving: BTreeMap<SegmentRef, Driving> = BTreeMap::new();
        let mut dead_since: BTreeMap<NodeId, Instant> = BTreeMap::new();
        let mut tick = 0u64;
        loop {
            tokio::time::sleep(FAILOVER_TICK).await;
            tick += 1;
            let (leader, term, voters) = {
                let metrics = self.raft.metrics();
                let m = metrics.borrow();
                let voters: Vec<NodeId> = m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .map(NodeId)
                    .collect();
                (m.current_leader, m.current_term, voters)
            };
            if leader != Some(self.cfg.id) {
                if led_term.take().is_some() {
                    driving.clear();
                    lock(&self.recoveries).clear();
                    *lock(&self.grants) = Grants::default();
                }
                continue;
            }
            if led_term != Some(term) {
                led_term = Some(term);
                driving.clear();
                lock(&self.recoveries).clear();
                dead_since.clear();
                *lock(&self.grants) = Grants::default();
                while rx.try_recv().is_ok() {}
                let now = self.now_ms();
                let mut t = Takeover::new(voters);
                t.report(
                    self.me(),
                    now,
                    self.leader_contact_before(term),
                    &self.lease_cfg,
                );
                takeover = Some(Pending {
                    takeover: t,
                    started_ms: now,
                    ticks: 0,
                });
            }
            if tick.is_multiple_of(RE_REPLICATION_EVERY_TICKS) {
                self.re_replicate(&mut dead_since);
            }
            let now = self.now_ms();
            // A fresh term first learns how long ago its predecessors could have granted
            // (`Takeover`); until then it replaces nobody. Segments it then finds unknown count
            // as granted at that bound, and any it meets later as granted when first seen.
            let mut assume_at = now;
            if let Some(p) = takeover.as_mut() {
                while let Ok((asked_term, node, elapsed)) = contact_rx.try_recv() {
                    if asked_term == term {
                        p.takeover
                            .report(node, self.now_ms(), elapsed, &self.lease_cfg);
                    }
                }
                p.ticks += 1;
                let bound = match p.takeover.bound() {
                    Some(b) => Some(b),
                    // No majority answers: count from this term's start, as without them.
                    None if p.ticks > TAKEOVER_TICKS_MAX => Some(p.started_ms),
                    None => None,
                };
                match bound {
                    Some(b) => {
                        tracing::info!(term, bound_ms = b, now_ms = now, "takeover bound known");
                        assume_at = b.min(now);
                        takeover = None;
                    }
                    None => {
                        if p.ticks % 2 == 1 {
                            for v in p.takeover.missing() {
                                self.ask_leader_contact(term, v, contact_tx.clone());
                            }
                        }
                        continue;
                    }
                }
            }
            let open: Vec<(SegmentRef, SegmentMeta)> = self.sm.read(|m| {
                m.topics()
                    .iter()
                    .filter_map(|(name, t)| {
                        t.open_segment().map(|s| {
                            let r = SegmentRef {
                                topic: name.clone(),
                                segment: s.id,
                            };
                            (r, s.clone())
                        })
                    })
                    .collect()
            });
            let mut out = Vec::new();
            {
                let mut g = lock(&self.grants);
                let open_ids: BTreeSet<SegmentId> = open.iter().map(|(_, s)| s.id).collect();
                g.recovering.retain(|id| open_ids.contains(id));
                for (r, s) in &open {
                    let holder = s.leader().unwrap_or_default();
                    if !g.table.knows(r) {
                        g.table.assume_granted(r, holder, s.epoch, assume_at);
                        continue;
                    }
                    if driving.contains_key(r)
                        || !g.table.may_choose_successor(r, now, &self.lease_cfg)
                    {
                        continue;
                    }
                    let mut effects = Vec::new();
                    if let Some(rec) =
                        Recovery::start(self.me(), r.clone(), s.epoch, &s.replicas, &mut effects)
                            .map(|rec| rec.with_copy_patience(self.copy_patience_ticks()))
                    {
                        tracing::warn!(topic = %r.topic, segment = r.segment.0, leader = holder.0,
                            epoch = s.epoch.0, "segment leader's lease lapsed; failing over");
                        g.recovering.insert(s.id);
                        out.extend(effects.into_iter().map(|e| (r.clone(), e)));
                        driving.insert(r.clone(), Driving { rec, ticks: 0 });
                    }
                }
            }
            // Answers that came back, and what the metadata now says.
            while let Ok((r, input)) = rx.try_recv() {
                if let Some(d) = driving.get_mut(&r) {
                    let mut effects = Vec::new();
                    d.rec.handle(input, &mut effects);
                    out.extend(effects.into_iter().map(|e| (r.clone(), e)));
                }
            }
            driving.retain(|r, d| {
                d.ticks += 1;
                let sealed = self.with_segment(&r.topic, r.segment, |s| s.sealed_entries());
                let mut effects = Vec::new();
                match sealed {
                    // The topic (or segment) is gone.
                    None => return false,
                    Some(Some(entries)) => d
                        .rec
                        .handle(RecoveryInput::SegmentSealed { entries }, &mut effects),
                    Some(None) => {}
                }
                if d.ticks % RECOVERY_RESEND_TICKS == 0 {
                    d.rec.handle(RecoveryInput::Tick, &mut effects);
                }
                out.extend(effects.into_iter().map(|e| (r.clone(), e)));
                match d.rec.phase() {
                    Phase::Done { len } => {
                        tracing::info!(topic = %r.topic, segment = r.segment.0, len, "recovery done: every replica holds the seal");
                        false
                    }
                    Phase::Sealing { .. } => d.ticks < RECOVERY_SEALING_TICKS_MAX,
                    _ => true,
                }
            });
            *lock(&self.recoveries) = driving
                .iter()
                .map(|(r, d)| recovery_json(r, &d.rec))
                .collect();
            for (r, effect) in out {
                self.run_recovery_effect(r, effect, tx.clone());
            }
        }
    }

    /// Recovery ticks a recovery of a segment with an even number of replicas waits for a
    /// majority of them to hold its length before it seals on a fence quorum (one of two):
    /// `--re-replicate-after`, the time after which an unreachable node counts as gone. A
    /// seal on one copy of two could otherwise lose, with that one disk, entries it counted
    /// (Tier B seed 14944).
    fn copy_patience_ticks(&self) -> u32 {
        let tick = FAILOVER_TICK * RECOVERY_RESEND_TICKS;
        u32::try_from(self.cfg.re_replicate_after.as_millis() / tick.as_millis())
            .unwrap_or(u32::MAX)
    }

    /// Asks voter `node` how long ago it last heard from a metadata leader (for `Takeover`);
    /// the answer, tagged with `term`, goes to `tx`.
    fn ask_leader_contact(
        self: &Arc<Self>,
        term: u64,
        node: NodeId,
        tx: tokio::sync::mpsc::UnboundedSender<(u64, NodeId, u64)>,
    ) {
        let Some(addr) = self.addr_of(node) else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let req = RpcRequest::LeaderContact { term };
            if let Ok(RpcResponse::LeaderContact(Some(elapsed))) =
                this.peers.get(&addr).call(&req, FAILOVER_TICK * 2).await
            {
                let _ = tx.send((term, node, elapsed));
            }
        });
    }

    /// Re-replication, on the metadata leader: once a node has been dead (per the failure
    /// detector) for `re_replicate_after`, each sealed segment it holds gets a live node that
    /// is not yet a replica. That node first fetches the whole segment (`SealAt`); only then
    /// does `MoveReplica` swap it in, so the segment never has fewer copies. A few segments per
    /// pass, each by its own task.
    fn re_replicate(self: &Arc<Self>, dead_since: &mut BTreeMap<NodeId, Instant>) {
        let nodes: Vec<(NodeId, bool)> = self
            .sm
            .read(|m| m.nodes().iter().map(|(id, n)| (*id, n.live)).collect());
        dead_since.retain(|id, _| nodes.iter().any(|&(n, live)| n == *id && !live));
        for &(id, live) in &nodes {
            if !live {
                dead_since.entry(id).or_insert_with(Instant::now);
            }
        }
        let gone: BTreeSet<NodeId> = dead_since
            .iter()
            .filter(|(_, at)| at.elapsed() >= self.cfg.re_replicate_after)
            .map(|(id, _)| *id)
            .collect();
        if gone.is_empty() {
            return;
        }
        let live: Vec<NodeId> = nodes.iter().filter(|n| n.1).map(|n| n.0).collect();
        let moving = lock(&self.moving).clone();
        let work: Vec<(String, SegmentMeta, NodeId)> = self.sm.read(|m| {
            m.topics()
                .iter()
                .flat_map(|(name, t)| {
                    t.segments
                        .iter()
                        .filter(|s| !s.is_open() && !moving.contains(&s.id))
                        .filter_map(|s| {
                            let from = s.replicas.iter().find(|r| gone.contains(r))?;
                            Some((name.clone(), s.clone(), *from))
                        })
                })
                .take(RE_REPLICATION_BATCH)
                .collect()
        });
        for (topic, seg, from) in work {
            let spare: Vec<NodeId> = live
                .iter()
                .copied()
                .filter(|n| !seg.replicas.contains(n))
                .collect();
            let donor = seg
                .replicas
                .iter()
                .copied()
                .find(|r| live.contains(r) && *r != from);
            let (Some(&to), Some(donor)) =
                (spare.get(seg.id.0 as usize % spare.len().max(1)), donor)
            else {
                continue;
            };
            lock(&self.moving).insert(seg.id);
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.move_replica(&topic, &seg, from, to, donor).await {
                    tracing::debug!(%topic, segment = seg.id.0, error = %e, "replica move failed; retried later");
                }
                lock(&node.moving).remove(&seg.id);
            });
        }
    }

    /// Copies sealed `seg` to `to` (fetching from `donor` and the other replicas), then swaps
    /// it in for `from`.
    async fn move_replica(
        &self,
        topic: &str,
        seg: &SegmentMeta,
        from: NodeId,
        to: NodeId,
        donor: NodeId,
    ) -> Result<(), Failure> {
        let len = seg.sealed_entries().unwrap_or(0);
        let addr = self
            .addr_of(to)
            .ok_or_else(|| format!("no address for node {}", to.0))?;
        let req = RpcRequest::SealAt {
            topic: topic.to_string(),
            segment: seg.id.0,
            len,
            donor: donor.0,
        };
        let deadline = Instant::now() + self.cfg.request_timeout * 12;
        loop {
            match self.peers.get(&addr).call(&req, RECOVERY_RPC_TIMEOUT).await {
                Ok(RpcResponse::SealAt(Ok(held))) if held >= len => break,
                _ if Instant::now() >= deadline => {
                    return Err(format!("node {} did not fetch the segment in time", to.0))
                }
                _ => tokio::time::sleep(REPAIR_INTERVAL).await,
            }
        }
        let outcome = self
            .propose(Command::MoveReplica {
                topic: topic.to_string(),
                segment: seg.id,
                from,
                to,
            })
            .await?;
        if outcome == Outcome::ReplicaMoved {
            self.counters.replicas_moved.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                topic,
                segment = seg.id.0,
                from = from.0,
                to = to.0,
                len,
                "sealed segment re-replicated"
            );
        }
        Ok(())
    }

    /// Carries out one effect of a recovery in its own task; answers come back on `tx`.
    fn run_recovery_effect(
        self: &Arc<Self>,
        r: SegmentRef,
        effect: Effect,
        tx: tokio::sync::mpsc::UnboundedSender<(SegmentRef, RecoveryInput)>,
    ) {
        let node = self.clone();
        tokio::spawn(async move {
            match effect {
                Effect::Propose(cmd) => match node.propose(cmd).await {
                    Ok(Outcome::Recovered {
                        epoch,
                        next,
                        leader,
                    }) => {
                        node.counters.failovers.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(topic = %r.topic, segment = r.segment.0, epoch = epoch.0,
                            next = next.0, leader = leader.0, "segment recovered; next segment opened");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(topic = %r.topic, segment = r.segment.0, error = %e, "recover proposal failed")
                    }
                },
                Effect::Send { to, msg } => {
                    let Some(addr) = node.addr_of(to) else {
                        return;
                    };
                    let req = match &msg {
                        PeerMsg::Fence { epoch, .. } => RpcRequest::Fence {
                            topic: r.topic.clone(),
                            segment: r.segment.0,
                            epoch: epoch.0,
                        },
                        PeerMsg::SealAt { len, donor, .. } => RpcRequest::SealAt {
                            topic: r.topic.clone(),
                            segment: r.segment.0,
                            len: *len,
                            donor: donor.0,
                        },
                        PeerMsg::CopyTo {
                            epoch, len, donor, ..
                        } => RpcRequest::CopyTo {
                            topic: r.topic.clone(),
                            segment: r.segment.0,
                            epoch: epoch.0,
                            len: *len,
                            donor: donor.0,
                        },
                        _ => return,
                    };
                    let answer = node.peers.get(&addr).call(&req, RECOVERY_RPC_TIMEOUT).await;
                    if let Ok(RpcResponse::Fence(Err(e))) = &answer {
                        // It lost its disk since the segment opened (or has not caught up
                        // since it started empty): no copy can be waited for there.
                        if e == LOST || e == REJOIN_PENDING {
                            let _ = tx.send((r, RecoveryInput::Lost { from: to }));
                            return;
                        }
                    }
                    let input = match (answer, msg) {
                        (Ok(RpcResponse::Fence(Ok(len))), PeerMsg::Fence { seg, epoch, .. }) => {
                            PeerMsg::FenceAck {
                                seg,
                                epoch,
                                from: to,
                                len,
                            }
                        }
                        (
                            Ok(RpcResponse::SealAt(Ok(held))),
                            PeerMsg::SealAt {
                                seg, epoch, len, ..
                            },
                        ) if held >= len => PeerMsg::SealDone {
                            seg,
                            epoch,
                            from: to,
                            len,
                        },
                        (Ok(RpcResponse::CopyTo(Ok(held))), PeerMsg::CopyTo { seg, epoch, .. }) => {
                            PeerMsg::Copied {
                                seg,
                                epoch,
                                from: to,
                                len: held,
                            }
                        }
                        _ => return,
                    };
                    let _ = tx.send((r, RecoveryInput::Peer(input)));
                }
                _ => {}
            }
        });
    }

    /// Every node: fetches the entries it lacks of sealed segments it is a replica of (after a
    /// restart, a failover that sealed past what it held, or a wiped data directory).
    pub async fn repair_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REPAIR_INTERVAL).await;
            let me = self.me();
            let wanted: Vec<(String, SegmentId, u64, Vec<NodeId>)> = {
                let complete = lock(&self.complete);
                self.sm.read(|m| {
                    m.topics()
                        .iter()
                        .flat_map(|(name, t)| {
                            t.segments
                                .iter()
                                .filter(|s| s.replicas.contains(&me) && !complete.contains(&s.id))
                                .filter_map(|s| {
                                    s.sealed_entries()
                                        .map(|n| (name.clone(), s.id, n, s.replicas.clone()))
                                })
                        })
                        .collect()
                })
            };
            for (topic, seg, len, replicas) in wanted {
                if self.local_entry_count(&topic, seg) >= len {
                    lock(&self.complete).insert(seg);
                } else {
                    self.spawn_repair(&topic, seg, len, replicas);
                }
            }
        }
    }
}

/// A recovery as `METRICS` shows it: where it is, the length it works towards, and what each
/// fenced replica holds.
fn recovery_json(r: &SegmentRef, rec: &Recovery) -> serde_json::Value {
    let (phase, len) = match rec.phase() {
        Phase::Fencing => ("fencing", None),
        Phase::Copying { len, .. } => ("copying", Some(*len)),
        Phase::Proposed { len, .. } => ("proposed", Some(*len)),
        Phase::Sealing { len, .. } => ("sealing", Some(*len)),
        Phase::Done { len } => ("done", Some(*len)),
    };
    let fenced: BTreeMap<String, u64> = rec
        .fenced()
        .iter()
        .map(|(n, l)| (n.0.to_string(), *l))
        .collect();
    json!({
        "topic": r.topic,
        "segment": r.segment.0,
        "epoch": rec.new_epoch().0,
        "phase": phase,
        "len": len,
        "fenced": fenced,
    })
}

/// Name of a segment's topic in the local `walrus` engine: short, valid, unique per segment.
/// The store's topic of fences: one `FENCE_RECORD_LEN`-byte entry (segment, epoch; little
/// endian) per fence taken. Segment keys look like `s<id>-<crc>`, so the name is free.
const FENCES_KEY: &str = "fences";
const FENCE_RECORD_LEN: usize = 16;

/// The fences recorded in `data` (the highest epoch per segment). A malformed entry cannot
/// come from this code; it is skipped with a warning rather than stopping the node.
fn load_fences(data: &Walrus<NodeDisk>) -> std::io::Result<HashMap<SegmentId, u64>> {
    let mut fences: HashMap<SegmentId, u64> = HashMap::new();
    let (mut at, end) = (data.first_offset(FENCES_KEY), data.entry_count(FENCES_KEY));
    while at < end {
        let entries = data.read_from(FENCES_KEY, at, 1_000, 1 << 20)?;
        if entries.is_empty() {
            break;
        }
        at += entries.len() as u64;
        for e in entries {
            let (Ok(seg), Ok(epoch)) = (
                <[u8; 8]>::try_from(e.data.get(..8).unwrap_or_default()),
                <[u8; 8]>::try_from(e.data.get(8..).unwrap_or_default()),
            ) else {
                tracing::warn!(len = e.data.len(), "skipping a malformed fence record");
                continue;
            };
            let f = fences
                .entry(SegmentId(u64::from_le_bytes(seg)))
                .or_default();
            *f = (*f).max(u64::from_le_bytes(epoch));
        }
    }
    Ok(fences)
}

pub fn segment_key(topic: &str, segment: SegmentId) -> String {
    format!("s{}-{:08x}", segment.0, crc32c::crc32c(topic.as_bytes()))
}

/// One replication push: brings one replica of a segment up to the length its leader wants,
/// sending the entries it lacks from this node's store, round after round, until it has them
/// all or cannot be reached.
struct Push {
    /// The replica's client (each round in flight on a connection of its own).
    client: Option<Arc<RpcClient>>,
    data: Arc<Walrus<NodeDisk>>,
    repl: ReplicaLengths,
    topic: String,
    segment: SegmentId,
    epoch: Epoch,
    replica: NodeId,
    timeout: Duration,
    fences: Arc<Mutex<HashMap<SegmentId, u64>>>,
    /// Woken when the segment's wanted length rises.
    wake: Arc<tokio::sync::Notify>,
}

impl Push {
    async fn run(self) {
        // `rounds` leaves `pushing` itself when it is done; on an error this does.
        if let Err(e) = self.rounds().await {
            tracing::debug!(topic = %self.topic, replica = self.replica.0, error = %e, "replication push stopped");
            lock(&self.repl.state)
                .pushing
                .remove(&(self.segment, self.replica));
        }
    }

    async fn rounds(&self) -> Result<(), String> {
        let Some(client) = &self.client else {
            return Err("no address for the replica".into());
        };
        // Rounds in flight, oldest first, each with the position after its entries.
        let mut calls = FuturesOrdered::new();
        // Where the next round starts: after the entries in flight, else at the replica's
        // length.
        let mut sent: Option<u64> = None;
        loop {
            // Registered before looking at the wanted length, so no rise is missed.
            let more = self.wake.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            while calls.len() < PUSH_WINDOW {
                let Some((req, end)) = self.next_round(calls.is_empty(), &mut sent)? else {
                    break;
                };
                let client = client.clone();
                let timeout = self.timeout;
                calls.push_back(async move { (client.call(&req, timeout).await, end) });
            }
            if calls.is_empty() {
                // `next_round` left `pushing` (done) or returned an error.
                return Ok(());
            }
            // The next answer; or, with room in the window, new entries to send meanwhile.
            let next = if calls.len() < PUSH_WINDOW {
                tokio::select! {
                    next = calls.next() => next,
                    () = &mut more => continue,
                }
            } else {
                calls.next().await
            };
            let Some((answer, end)) = next else {
                return Ok(());
            };
            let held = match answer {
                Ok(RpcResponse::Replicate(Ok(n))) => n,
                Ok(RpcResponse::Replicate(Err(e))) if e == FENCED => {
                    // A failover fenced this epoch: stop writing and stop renewing the lease.
                    let mut fences = lock(&self.fences);
                    let f = fences.entry(self.segment).or_default();
                    *f = (*f).max(self.epoch.0.saturating_add(1));
                    return Err(e);
                }
                Ok(RpcResponse::Replicate(Err(e))) if e == LOST => {
                    // It never takes this segment's writes again: the rollover monitor seals
                    // the segment if the others are too few for a quorum.
                    lock(&self.repl.state)
                        .lost
                        .insert((self.segment, self.replica));
                    return Err(e);
                }
                Ok(RpcResponse::Replicate(Err(e))) => return Err(e),
                Ok(_) => return Err("mismatched rpc response".into()),
                Err(e) => return Err(e.to_string()),
            };
            if held.written < end {
                // The replica did not take all of it (a gap, or it lost data): the rounds
                // still in flight count as they answer, new ones start from its length.
                sent = None;
            }
            // The latest answer, even if lower (a replica that lost data must not count).
            let mut st = lock(&self.repl.state);
            let known = st.durable(self.segment, self.replica);
            let durable = if held.durable >= held.written {
                held.durable
            } else {
                // Not synced by this round: what was fsynced before, if still written.
                known.min(held.written)
            };
            st.lengths
                .entry(self.segment)
                .or_default()
                .insert(self.replica, held.written);
            st.durable
                .entry(self.segment)
                .or_default()
                .insert(self.replica, durable);
            drop(st);
            self.repl.changed.notify_waiters();
        }
    }

    /// The next round to send, if any, with the position after its entries: entries from
    /// `sent` (or the replica's length) up to the length wanted, or (with nothing in flight)
    /// only a request to fsync. With nothing in flight and nothing to do, leaves `pushing` and
    /// returns `None`.
    fn next_round(
        &self,
        idle: bool,
        sent: &mut Option<u64>,
    ) -> Result<Option<(RpcRequest, u64)>, String> {
        let (from, target, sync) = {
            let mut st = lock(&self.repl.state);
            let target = st.wanted.get(&self.segment).copied().unwrap_or(0);
            let target_durable = st.wanted_durable.get(&self.segment).copied().unwrap_or(0);
            let held = st.length(self.segment, self.replica);
            let durable = st.durable(self.segment, self.replica);
            if idle && held >= target && durable >= target_durable {
                // Done; leaving `pushing` under the same lock lets the next writer start a
                // new push.
                st.pushing.remove(&(self.segment, self.replica));
                return Ok(None);
            }
            let from = if idle { held } else { sent.unwrap_or(held) };
            (from, target, durable < target_durable)
        };
        let want = (target.saturating_sub(from)).min(CATCH_UP_ENTRIES_MAX) as usize;
        if want == 0 && !(idle && sync) {
            // Everything is on its way; the answers will tell.
            return Ok(None);
        }
        let key = segment_key(&self.topic, self.segment);
        let payloads = if want == 0 {
            // Everything is written there; this round only asks for the fsync.
            Entries::default()
        } else {
            // A batch still staged (its PUT is running) is sent from there; older entries
            // come from the store, followed by whatever is staged after them.
            let staged = self
                .repl
                .staged_from(self.segment, from, want, CATCH_UP_BYTES_MAX);
            if !staged.is_empty() {
                staged
            } else {
                let p: Vec<Vec<u8>> = self
                    .data
                    .read_from(&key, from, want, CATCH_UP_BYTES_MAX)
                    .map_err(|e| format!("reading the entries to send: {e}"))?
                    .into_iter()
                    .map(|e| e.data)
                    .collect();
                let (n, bytes) = (p.len(), p.iter().map(Vec::len).sum::<usize>());
                let mut entries = Entries::from_vecs(p);
                if n < want {
                    // The rest may still be in this node's group commit.
                    if let Entries::Shared(more) = self.repl.staged_from(
                        self.segment,
                        from + n as u64,
                        want - n,
                        CATCH_UP_BYTES_MAX.saturating_sub(bytes),
                    ) {
                        for (batch, range) in more {
                            entries.push_shared(batch, range);
                        }
                    }
                }
                entries
            }
        };
        if payloads.is_empty() && want > 0 {
            if !idle {
                // Not here yet (still being staged): the next answer brings another look.
                return Ok(None);
            }
            // Nothing here to send (this store is shorter than the target): no round can
            // make progress, so stop instead of spinning.
            return Err(format!("no entries at position {from} to send"));
        }
        self.repl.pushes.fetch_add(1, Ordering::Relaxed);
        self.repl
            .entries_sent
            .fetch_add(payloads.len() as u64, Ordering::Relaxed);
        let end = from + payloads.len() as u64;
        *sent = Some(end);
        Ok(Some((
            RpcRequest::Replicate {
                topic: self.topic.clone(),
                segment: self.segment.0,
                epoch: self.epoch.0,
                sync,
                position: from,
                payloads,
            },
            end,
        )))
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every update is one
/// step).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_abandoned_while_it_waits_runs_its_taint_and_a_finished_one_does_not() {
        use std::cell::Cell;
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let tainted = Cell::new(0);
        // Waits forever, as an append whose commit never reports would.
        let stuck = async {
            let mut u = Unresolved::new(|| tainted.set(tainted.get() + 1));
            std::future::pending::<()>().await;
            u.disarm();
        };
        let mut stuck = Box::pin(stuck);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(stuck.as_mut().poll(&mut cx).is_pending());
        assert_eq!(tainted.get(), 0);
        drop(stuck);
        assert_eq!(tainted.get(), 1, "dropping the waiting future taints");
        let done = async {
            let mut u = Unresolved::new(|| tainted.set(tainted.get() + 1));
            std::future::ready(()).await;
            u.disarm();
        };
        assert_eq!(Box::pin(done).as_mut().poll(&mut cx), Poll::Ready(()));
        assert_eq!(tainted.get(), 1, "a finished append taints nothing");
        drop(Unresolved::new(|| tainted.set(tainted.get() + 1)));
        assert_eq!(tainted.get(), 2, "a failed one (never disarmed) taints");
    }

    #[test]
    fn staged_batches_are_served_contiguously_from_any_position() {
        let r = Replication::default();
        let seg = SegmentId(7);
        r.stage(seg, 10, &[b"a", b"b", b"c"]);
        r.stage(seg, 13, &[b"d", b"e"]);
        r.stage(seg, 20, &[b"x"]); // not contiguous with the rest
        let got = |from, max, bytes| {
            r.staged_from(seg, from, max, bytes)
                .iter()
                .map(<[u8]>::to_vec)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            got(10, 10, 1 << 20),
            [b"a", b"b", b"c", b"d", b"e"].map(|b| b.to_vec())
        );
        assert_eq!(got(12, 2, 1 << 20), [b"c", b"d"].map(|b| b.to_vec()));
        assert_eq!(got(14, 10, 1 << 20), [b"e"].map(|b| b.to_vec()));
        // At least one entry, then no more than the byte budget.
        assert_eq!(got(11, 10, 1), [b"b"].map(|b| b.to_vec()));
        assert!(got(9, 10, 1 << 20).is_empty());
        assert!(got(15, 10, 1 << 20).is_empty());
        assert!(r.staged_from(SegmentId(8), 10, 10, 1 << 20).is_empty());
        // Slices of the staged batches, not copies.
        match r.staged_from(seg, 11, 3, 1 << 20) {
            Entries::Shared(parts) => {
                let ranges: Vec<_> = parts.iter().map(|(_, r)| r.clone()).collect();
                assert_eq!(ranges, [1..3, 0..1]);
            }
            other => panic!("{other:?}"),
        }
        r.unstage(seg, 10);
        assert!(got(11, 10, 1 << 20).is_empty());
        assert_eq!(got(13, 10, 1 << 20).len(), 2);
        r.unstage(seg, 13);
        r.unstage(seg, 20);
        assert!(lock(&r.staged).is_empty());
    }
}
