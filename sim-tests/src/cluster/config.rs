//! Everything one Tier B seed decides: cluster size, workload and which faults fire how often.

use std::fmt;

use crate::rng::Rng;

/// A fault the Tier B driver injects.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum ClusterFault {
    /// SIGKILL-like: the node's tasks vanish and its disk loses (or tears) unsynced writes;
    /// restarted a little later.
    Kill,
    /// The nodes split into two groups that cannot reach each other.
    Partition,
    /// Messages from one group to the other are lost, the other way works.
    AsymmetricPartition,
    /// One node cut off from everyone (clients included).
    Isolate,
    /// Packets lost (TCP retransmits them: streams stall, never corrupt).
    PacketLoss,
    /// Latency raised well above normal.
    SlowNetwork,
    /// A node's fsyncs fail for a while (the writes they covered are gone).
    FsyncError,
    /// A node's disk is full for a while.
    DiskFull,
    /// A node's clock runs fast or slow (within the lease drift bound).
    ClockSkew,
    /// A node loses its disk: killed, its data directory gone, restarted empty (it rejoins
    /// through node 1 and is repopulated). Once per run, and only with three replicas per
    /// segment, so that every acknowledged entry keeps a copy.
    Wipe,
}

impl ClusterFault {
    /// Every kind, in a fixed order.
    pub const ALL: [ClusterFault; 10] = [
        ClusterFault::Kill,
        ClusterFault::Partition,
        ClusterFault::AsymmetricPartition,
        ClusterFault::Isolate,
        ClusterFault::PacketLoss,
        ClusterFault::SlowNetwork,
        ClusterFault::FsyncError,
        ClusterFault::DiskFull,
        ClusterFault::ClockSkew,
        ClusterFault::Wipe,
    ];
}

/// A bug planted on purpose, to prove the checkers catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Planted {
    /// The real code, nothing planted.
    None,
    /// Nodes acknowledge a PUT once it is in the page cache (`--durability none`) while every
    /// client still counts the acknowledgement as durable.
    AckBeforeFsync,
}

/// The parameters of one Tier B run, all derived from its seed.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The seed.
    pub seed: u64,
    /// Cluster nodes (3..=5).
    pub nodes: usize,
    /// Topics.
    pub topics: usize,
    /// Producer clients (each has one PUT outstanding at a time).
    pub producers: usize,
    /// Consumer clients (shared-cursor GETs).
    pub consumers: usize,
    /// Payload bytes per entry, at least (a header naming producer and sequence comes first).
    pub payload_min: usize,
    /// Payload bytes per entry, at most.
    pub payload_max: usize,
    /// Rollover limit (entries per segment).
    pub segment_entries: u64,
    /// Replicas per segment (`--replication-factor`); PUTs wait for a quorum of them.
    pub replication_factor: u64,
    /// Simulated seconds of the safety phase (faults on).
    pub safety_secs: u64,
    /// Mean simulated milliseconds between two faults.
    pub fault_every_ms: u64,
    /// The faults this seed injects ("swarm": each seed has its own mix).
    pub faults: Vec<ClusterFault>,
    /// What was planted.
    pub planted: Planted,
    /// Metadata log entries between snapshots (`--raft-snapshot-every`): small, so that
    /// snapshots, log purges, store rewrites and snapshot installs all happen under faults.
    pub raft_snapshot_every: u64,
}

impl ClusterConfig {
    /// Derives a run from `seed`.
    pub fn from_seed(seed: u64, planted: Planted) -> ClusterConfig {
        let mut r = Rng::new(seed ^ 0x7469_6572_5f62); // "tier_b"
        let nodes = r.range(3, 5) as usize;
        let topics = r.range(1, 3) as usize;
        let producers = r.range(1, 4) as usize;
        let consumers = r.range(0, 2) as usize;
        let payload_min = r.range(24, 64) as usize;
        let payload_max = payload_min + r.range(0, 400) as usize;
        let segment_entries = r.range(4, 60);
        // Every kind is on with probability 1/2, and at least one is on.
        let mut faults: Vec<ClusterFault> = ClusterFault::ALL
            .iter()
            .copied()
            .filter(|_| r.range(0, 1) == 1)
            .collect();
        if faults.is_empty() {
            faults.push(ClusterFault::ALL[r.below(ClusterFault::ALL.len())]);
        }
        let mut cfg = ClusterConfig {
            seed,
            nodes,
            topics,
            producers,
            consumers,
            payload_min,
            payload_max,
            segment_entries,
            safety_secs: r.range(15, 30),
            fault_every_ms: r.range(1_000, 4_000),
            faults,
            planted,
            replication_factor: [1, 3][r.below(2)],
            raft_snapshot_every: 0,
        };
        cfg.raft_snapshot_every = r.range(16, 300);
        if planted == Planted::AckBeforeFsync && !cfg.faults.contains(&ClusterFault::Kill) {
            // Page-cache acknowledgements are only lost by a crash, and only if no other
            // replica kept them.
            cfg.faults.push(ClusterFault::Kill);
        }
        if planted == Planted::AckBeforeFsync {
            cfg.replication_factor = 1;
        }
        if cfg.replication_factor < 3 && cfg.faults == [ClusterFault::Wipe] {
            // A wipe needs three replicas (seed 2658 injected no fault at all).
            cfg.faults.push(ClusterFault::Kill);
        }
        cfg
    }
}

impl fmt::Display for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} nodes, {} topics, {} producers, {} consumers, payload {}..={} B, \
             segment {} entries, replication factor {}, snapshot every {} entries, safety {} \
             s, a fault every ~{} ms of {:?}, planted {:?}",
            self.seed,
            self.nodes,
            self.topics,
            self.producers,
            self.consumers,
            self.payload_min,
            self.payload_max,
            self.segment_entries,
            self.replication_factor,
            self.raft_snapshot_every,
            self.safety_secs,
            self.fault_every_ms,
            self.faults,
            self.planted
        )
    }
}
