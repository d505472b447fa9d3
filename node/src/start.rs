//! Starting a node: flags, the data directory, Raft, listeners and background loops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::net::TcpListener;

use crate::meta::{LogStore, Raft, StateMachine};
use crate::network::NetworkFactory;
use crate::node::{Node, NodeConfig};
use crate::server::{serve_clients, serve_rpc};
use crate::NodeDisk;
use walrus::{Disk, DiskFile};

/// Command-line flags (as upstream walrus documents them).
#[derive(Parser, Debug, Clone)]
#[command(name = "walrus-node", about = "A walrus cluster node")]
pub struct Args {
    /// This node's id (any u64, stable across restarts).
    #[arg(long)]
    pub node_id: u64,
    /// Data directory.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Port for Raft and internal RPC.
    #[arg(long, default_value_t = 6000)]
    pub raft_port: u16,
    /// Host to bind for Raft and internal RPC.
    #[arg(long, default_value = "127.0.0.1")]
    pub raft_host: String,
    /// Host other nodes use to reach this one (defaults to --raft-host).
    #[arg(long)]
    pub raft_advertise_host: Option<String>,
    /// Port for clients.
    #[arg(long, default_value_t = 8080)]
    pub client_port: u16,
    /// Host to bind for clients.
    #[arg(long, default_value = "127.0.0.1")]
    pub client_host: String,
    /// Raft address (host:port) of an existing node to join; without it, this node starts (or
    /// restarts) a cluster of its own.
    #[arg(long)]
    pub join: Option<String>,
    /// Entries after which an open segment is sealed.
    #[arg(long, env = "WALRUS_MAX_SEGMENT_ENTRIES", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_segment_entries: u64,
    /// Period of the rollover monitor, in milliseconds.
    #[arg(long, env = "WALRUS_MONITOR_CHECK_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub monitor_check_ms: u64,
    /// Longest a client request may wait before it gets `ERR`, in milliseconds.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub request_timeout_ms: u64,
    /// When a PUT is acknowledged: `quorum-fsync` (default: once a majority of the segment's
    /// replicas have fsynced it), `leader-fsync` (once the segment leader has; the other
    /// replicas follow in the background) or `none` (once it is in the leader's page cache;
    /// lost on power failure).
    #[arg(long, env = "WALRUS_DURABILITY", default_value = "quorum-fsync", value_parser = ["quorum-fsync", "quorum-memory", "leader-fsync", "none"])]
    pub durability: String,
    /// Replicas per segment: each new segment gets `min(this, live nodes)`, placed round-robin.
    #[arg(long, env = "WALRUS_REPLICATION_FACTOR", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub replication_factor: u64,
    /// Segment-leader lease, in ms. A leader stops acknowledging writes when its lease runs
    /// out unrenewed; the metadata leader fails a segment over once the lease plus a quarter
    /// (the clock-drift bound) plus a tenth has passed since its last grant.
    #[arg(long, env = "WALRUS_LEASE_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    pub lease_ms: u64,
    /// How long a node must stay dead (per the failure detector) before the sealed segments
    /// it held are copied to another live node and the metadata moves them there.
    #[arg(long, env = "WALRUS_RE_REPLICATE_AFTER_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub re_replicate_after_ms: u64,
    /// Metadata log entries applied between two snapshots of the metadata. Each snapshot is
    /// kept in the data directory, and the log entries it covers (but the last 1,000, for
    /// followers a little behind) are deleted, so the log stays bounded however many cursor
    /// claims and segment changes pass through it.
    #[arg(long, env = "WALRUS_RAFT_SNAPSHOT_EVERY", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(16..=100_000_000))]
    pub raft_snapshot_every: u64,
    /// Largest client frame accepted, in bytes.
    #[arg(long, default_value_t = walrus_core::wire::FRAME_LEN_MAX_DEFAULT)]
    pub max_frame_bytes: usize,
}

/// Metadata log entries kept behind a snapshot (for followers a little behind, which then
/// need no snapshot), at most.
const RAFT_ENTRIES_KEPT: u64 = 1_000;

/// Runs a node on real files until the process is stopped.
#[cfg(not(madsim))]
pub async fn run(args: Args) -> Result<(), String> {
    run_on(
        Arc::new(walrus::LinuxDisk::new(walrus::Backend::IoUring)),
        args,
    )
    .await
}

/// Runs a node whose stores all live on `disk` (the simulation gives each node its own).
pub async fn run_on(disk: Arc<NodeDisk>, args: Args) -> Result<(), String> {
    disk.create_dir_all(&args.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.data_dir.display()))?;
    // A node joining with an empty data directory (new, or its disk was lost) may have voted
    // and acknowledged before, as the same id: it holds none of that now (see
    // `NodeConfig::started_empty`). It stays so across restarts until it has caught up.
    let rejoin = open_data_dir(&*disk, &args)?;
    let started_empty = rejoin.is_some_and(|r| r.lost_before.is_none());
    if started_empty && args.join.is_none() {
        return Err(format!(
            "{} has not caught up since it started empty: start it with --join",
            args.data_dir.display()
        ));
    }
    let raft_advertise = format!(
        "{}:{}",
        args.raft_advertise_host
            .as_deref()
            .unwrap_or(&args.raft_host),
        args.raft_port
    );
    let client_advertise = format!("{}:{}", args.client_host, args.client_port);
    let rpc_listener = TcpListener::bind((args.raft_host.as_str(), args.raft_port))
        .await
        .map_err(|e| {
            format!(
                "cannot bind raft {}:{}: {e}",
                args.raft_host, args.raft_port
            )
        })?;
    let client_listener = TcpListener::bind((args.client_host.as_str(), args.client_port))
        .await
        .map_err(|e| {
            format!(
                "cannot bind client {}:{}: {e}",
                args.client_host, args.client_port
            )
        })?;

    #[cfg(not(madsim))]
    let log = LogStore::open(&args.data_dir.join("raft"));
    #[cfg(madsim)]
    let log = LogStore::open_on(disk.clone(), &args.data_dir.join("raft"));
    let log = log.map_err(|e| format!("cannot open the raft log: {e}"))?;
    // Rewritten about as often as snapshots are taken (at most every 4,096 records).
    log.set_rewrite_after(args.raft_snapshot_every.min(4_096));
    let sm = StateMachine::open(
        args.replication_factor as usize,
        disk.clone(),
        &args.data_dir.join("raft"),
    )
    .map_err(|e| format!("cannot open the metadata snapshot: {e}"))?;
    log.purge_behind(sm.kept_snapshots());
    let config = Config {
        cluster_name: "walrus".into(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(args.raft_snapshot_every),
        max_in_snapshot_log_to_keep: args.raft_snapshot_every.min(RAFT_ENTRIES_KEPT),
        // Turned on once the log has caught up (`Node::raft_caught_up`).
        enable_elect: !started_empty,
        ..Default::default()
    }
    .validate()
    .map_err(|e| format!("raft config: {e}"))?;
    let raft = Raft::new(
        args.node_id,
        Arc::new(config),
        NetworkFactory,
        log,
        sm.clone(),
    )
    .await
    .map_err(|e| format!("cannot start raft: {e}"))?;

    let cfg = NodeConfig {
        id: args.node_id,
        data_dir: args.data_dir.clone(),
        raft_advertise: raft_advertise.clone(),
        client_advertise: client_advertise.clone(),
        max_segment_entries: args.max_segment_entries,
        monitor_check: Duration::from_millis(args.monitor_check_ms),
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        durability: crate::node::Durability::parse(args.durability.as_bytes())
            .ok_or_else(|| format!("unknown durability {}", args.durability))?,
        lease_ms: args.lease_ms,
        re_replicate_after: Duration::from_millis(args.re_replicate_after_ms),
        started_empty,
        incarnation: rejoin.map_or(0, |r| r.incarnation),
        lost_before: rejoin.and_then(|r| r.lost_before),
    };
    let node = Arc::new(
        Node::new(cfg, raft.clone(), sm, disk.clone())
            .map_err(|e| format!("cannot open segment store: {e}"))?,
    );
    #[cfg(madsim)]
    crate::sim::register(&node);
    tokio::spawn(serve_rpc(node.clone(), rpc_listener));

    match &args.join {
        None => {
            let members: BTreeMap<u64, BasicNode> =
                [(args.node_id, BasicNode::new(raft_advertise.clone()))].into();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!("initialized a new cluster"),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    tracing::info!("restarting an existing cluster member")
                }
                Err(e) => return Err(format!("cannot initialize raft: {e}")),
            }
        }
        Some(addr) => {
            if started_empty {
                learn_raft_floor(&node, addr).await?;
            }
            join(&node, addr, &raft_advertise, &client_advertise).await?
        }
    }
    // Register (or refresh) this node's address once a leader exists.
    retry_in_background(
        "register this node in the metadata",
        node.clone(),
        |n| async move { n.register_self().await },
    );
    if started_empty {
        // Until the metadata records this start, every segment counts as older than it.
        retry_in_background(
            "announce this node's rejoin",
            node.clone(),
            |n| async move { n.announce_rejoin().await },
        );
    }
    if started_empty {
        let (node, disk, dir) = (node.clone(), disk.clone(), args.data_dir.clone());
        tokio::spawn(async move {
            while !node.raft_caught_up() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            node.raft().runtime_config().elect(true);
            tracing::info!("the raft log caught up: this node votes and stands for election");
            // From here a restart is an ordinary one, but for the segments that predate it.
            let lost_before = loop {
                if let Some(b) = node.rejoin_bound() {
                    break b;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let done = RejoinRecord {
                incarnation: node.config().incarnation,
                lost_before: Some(lost_before.0),
            };
            for round in 0u32..600 {
                match write_rejoin(&*disk, &dir, &done) {
                    Ok(()) => return,
                    Err(e) => tracing::debug!(round, error = %e, "pending: record the rejoin"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tracing::error!("could not record the rejoin in the data directory");
        });
    }
    tokio::spawn(node.clone().commit_report_loop());
    tokio::spawn(node.clone().rollover_loop());
    tokio::spawn(node.clone().probe_loop());
    tokio::spawn(node.clone().lease_loop());
    tokio::spawn(node.clone().failover_loop());
    tokio::spawn(node.clone().repair_loop());
    tracing::info!(node_id = args.node_id, client = %client_advertise, raft = %raft_advertise, "walrus node serving");
    // A Raft that stopped on a fatal error (its log could not be written: a failed fsync)
    // never comes back in this process. Exit, so that the supervisor restarts the node and
    // recovery rebuilds its state from what is durable, rather than serve as a zombie.
    let mut metrics = raft.metrics();
    let fatal = async move {
        loop {
            if let Err(f) = &metrics.borrow().running_state {
                return f.to_string();
            }
            if metrics.changed().await.is_err() {
                return "raft shut down".to_string();
            }
        }
    };
    tokio::select! {
        () = serve_clients(node, client_listener, args.max_frame_bytes) => Ok(()),
        reason = fatal => {
            tracing::error!(%reason, "the metadata raft stopped; exiting");
            Err(format!("the metadata raft stopped: {reason}"))
        }
    }
}

async fn join(node: &Node, addr: &str, raft_addr: &str, client_addr: &str) -> Result<(), String> {
    if node
        .raft()
        .is_initialized()
        .await
        .map_err(|e| e.to_string())?
    {
        tracing::info!("already a cluster member; not joining again");
        return Ok(());
    }
    let peers = crate::rpc::RpcClient::new(addr.to_string());
    let req = crate::rpc::RpcRequest::Join {
        id: node.config().id,
        raft_addr: raft_addr.to_string(),
        client_addr: client_addr.to_string(),
    };
    let mut last = String::new();
    for _ in 0..60 {
        // A member that lost its data is caught up by the metadata leader on its own: once
        // that has begun, the node it joins through need not be up.
        if node.raft().is_initialized().await.unwrap_or(false) {
            tracing::info!("the metadata leader reached this node; not joining");
            return Ok(());
        }
        match peers.call(&req, Duration::from_secs(30)).await {
            Ok(crate::rpc::RpcResponse::Join(Ok(()))) => {
                tracing::info!(%addr, "joined the cluster");
                return Ok(());
            }
            Ok(crate::rpc::RpcResponse::Join(Err(e))) => last = e,
            Ok(_) => last = "mismatched rpc response".into(),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("could not join via {addr}: {last}"))
}

/// Runs `attempt` on a task until it succeeds: every 200 ms, for up to two minutes.
fn retry_in_background<F, Fut>(what: &'static str, node: Arc<Node>, attempt: F)
where
    F: Fn(Arc<Node>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        for round in 0u32..600 {
            match attempt(node.clone()).await {
                Ok(()) => return,
                Err(e) => tracing::debug!(round, error = %e, "pending: {what}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::error!("could not {what}");
    });
}

/// A node that started empty learns the lowest Raft term it may take appends from (see
/// `Node::takes_raft_append`) before it joins: retried until enough voters answer.
async fn learn_raft_floor(node: &Node, addr: &str) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..600 {
        match node.learn_raft_floor(addr).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "could not learn the raft term of a majority via {addr}: {last}"
    ))
}

/// A node that started with an empty data directory and joined records that in
/// `<data dir>/rejoin`, before its node id: while `lost_before` is unset it has not caught up
/// yet, and a restart is as cautious as its first start (`NodeConfig::started_empty`), under
/// the same incarnation. Once set, segments below it stay lost to this node
/// (`NodeConfig::lost_before`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RejoinRecord {
    incarnation: u64,
    lost_before: Option<u64>,
}

const REJOIN_FILE: &str = "rejoin";
const REJOIN_FILE_MAX_BYTES: u64 = 128;

impl RejoinRecord {
    fn encode(&self) -> String {
        match self.lost_before {
            None => format!("incarnation={}\n", self.incarnation),
            Some(b) => format!("incarnation={}\nlost-before={b}\n", self.incarnation),
        }
    }

    fn decode(text: &[u8]) -> Option<RejoinRecord> {
        // Every line ends in a newline: a record cut short (in the middle of a number) is none.
        let text = std::str::from_utf8(text).ok()?.strip_suffix('\n')?;
        let mut lines = text.lines();
        let incarnation = lines.next()?.strip_prefix("incarnation=")?.parse().ok()?;
        let lost_before = match lines.next() {
            None => None,
            Some(l) => Some(l.strip_prefix("lost-before=")?.parse().ok()?),
        };
        lines.next().is_none().then_some(RejoinRecord {
            incarnation,
            lost_before,
        })
    }
}

/// Writes the rejoin record durably (a whole new file renamed over the old one).
fn write_rejoin<D: Disk>(disk: &D, dir: &Path, record: &RejoinRecord) -> std::io::Result<()> {
    crate::replace_file(disk, dir, REJOIN_FILE, &[record.encode().as_bytes()])
}

/// Checks the data directory's node id, claiming a new directory for this node, and returns
/// its rejoin record, if any (one is made now for a new directory when joining).
fn open_data_dir<D: Disk>(disk: &D, args: &Args) -> Result<Option<RejoinRecord>, String> {
    let dir = &args.data_dir;
    if !check_node_id(disk, args)? {
        let path = dir.join(REJOIN_FILE);
        let file = match disk.open(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        let len = file
            .len()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if len > REJOIN_FILE_MAX_BYTES {
            return Err(format!("{} is not a rejoin record", path.display()));
        }
        let bytes = file
            .read_all()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        return RejoinRecord::decode(&bytes)
            .map(Some)
            .ok_or_else(|| format!("{} is not a rejoin record", path.display()));
    }
    let record = args.join.is_some().then(|| RejoinRecord {
        incarnation: draw_incarnation(),
        lost_before: None,
    });
    if let Some(r) = &record {
        write_rejoin(disk, dir, r).map_err(|e| format!("cannot write the rejoin record: {e}"))?;
    }
    claim_node_id(disk, args)?;
    Ok(record)
}

/// The node id is stored next to the data: a data directory never changes hands silently.
/// Returns whether the directory is new (no id written yet).
fn check_node_id<D: Disk>(disk: &D, args: &Args) -> Result<bool, String> {
    const ID_FILE_MAX_BYTES: u64 = 64;
    let path = args.data_dir.join("node-id");
    let file = disk
        .open(&path, true)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let len = file
        .len()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if len == 0 {
        // New (or created but never written before a crash).
        return Ok(true);
    }
    if len > ID_FILE_MAX_BYTES {
        return Err(format!("{} is not a node id file", path.display()));
    }
    let bytes = file
        .read_all()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        Some(id) if id == args.node_id => Ok(false),
        Some(id) => Err(format!(
            "{} belongs to node {id}, not {}",
            args.data_dir.display(),
            args.node_id
        )),
        None => Err(format!("{} is not a node id file", path.display())),
    }
}

/// Claims a new data directory for this node, durably.
fn claim_node_id<D: Disk>(disk: &D, args: &Args) -> Result<(), String> {
    let path = args.data_dir.join("node-id");
    let text = format!("{}\n", args.node_id);
    disk.open(&path, true)
        .and_then(|file| {
            file.write_all_at(text.as_bytes(), 0)?;
            file.sync_data()
        })
        .and_then(|()| disk.sync_dir(&args.data_dir))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A random number for `NodeConfig::incarnation` (the simulator's seeded one under madsim).
fn draw_incarnation() -> u64 {
    #[cfg(madsim)]
    {
        use madsim::rand::Rng;
        madsim::rand::thread_rng().gen()
    }
    #[cfg(not(madsim))]
    {
        rand::random()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_rejoin_record_reads_back_as_written(
            incarnation in any::<u64>(),
            lost_before in proptest::option::of(any::<u64>()),
        ) {
            let r = RejoinRecord { incarnation, lost_before };
            prop_assert_eq!(RejoinRecord::decode(r.encode().as_bytes()), Some(r));
        }

        #[test]
        fn any_bytes_decode_to_a_record_or_none(
            bytes in proptest::collection::vec(any::<u8>(), 0..REJOIN_FILE_MAX_BYTES as usize),
        ) {
            let _ = RejoinRecord::decode(&bytes);
        }

        #[test]
        fn a_torn_record_never_reads_as_caught_up(incarnation in any::<u64>(), b in any::<u64>(), cut in 1usize..20) {
            let text = RejoinRecord { incarnation, lost_before: Some(b) }.encode();
            let torn = &text.as_bytes()[..text.len().saturating_sub(cut)];
            // (The file is replaced by rename, so this is belt and braces.) Cut after the first
            // line, it is the record before the rejoin was done: the cautious reading.
            if let Some(r) = RejoinRecord::decode(torn) {
                prop_assert_eq!(r, RejoinRecord { incarnation, lost_before: None });
            }
        }
    }
}
