//! The cluster brain as pure state machines: metadata, leases, rollover, cursors and segment
//! replication. It owns the rules and the effect vocabulary and must never do I/O, read a clock,
//! draw randomness or spawn threads: time (`now`, milliseconds) and every completion are inputs.
//!
//! Shape: each machine takes one input value at a time and appends [`Effect`]s to a caller-owned
//! `Vec`. The node shell executes effects (disk writes with an [`IoId`], sends, Raft proposals,
//! client replies) and feeds the results back as inputs. An acknowledgement that needs durability
//! is only emitted after the matching `IoDone` input.

pub mod cursor;
pub mod follower;
pub mod lease;
pub mod metadata;
pub mod recovery;
pub mod replication;
pub mod rollover;

use serde::{Deserialize, Serialize};

pub use metadata::{Command, Metadata, Outcome, Rejection};

/// A cluster node id. Any `u64` is valid; ids are compared numerically for round-robin order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct NodeId(pub u64);

/// A segment id, unique within its topic and increasing along the topic's chain.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct SegmentId(pub u64);

/// A segment epoch. It only grows; recovery bumps it to fence the previous leader.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Epoch(pub u64);

/// Names one disk operation of one segment machine. Unique per machine; the shell routes the
/// matching `IoDone` back by `(SegmentRef, IoId)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct IoId(pub u64);

/// Names one client request so that its reply can be routed back.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct RequestId(pub u64);

/// One entry's payload. Metadata never carries these; only the data path does.
pub type Entry = Vec<u8>;

/// A segment of a topic: `(topic, segment_id)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SegmentRef {
    /// The topic name.
    pub topic: String,
    /// The segment id within the topic.
    pub segment: SegmentId,
}

/// Something the shell must do on behalf of a state machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Append `entries` at position `pos` of the segment's local log and make them durable; answer
    /// with `IoDone { io }`. Positions are segment-relative (0 = first entry of the segment).
    Persist {
        /// The completion to report.
        io: IoId,
        /// Which segment.
        seg: SegmentRef,
        /// Position of the first entry.
        pos: u64,
        /// The entries, in order.
        entries: Vec<Entry>,
    },
    /// Cut the segment's local log to `len` entries and make that durable; answer with `IoDone`.
    Truncate {
        /// The completion to report.
        io: IoId,
        /// Which segment.
        seg: SegmentRef,
        /// The new length.
        len: u64,
    },
    /// Durably record that this replica has been fenced at `epoch`; answer with `IoDone`.
    PersistEpoch {
        /// The completion to report.
        io: IoId,
        /// Which segment.
        seg: SegmentRef,
        /// The epoch to remember across restarts.
        epoch: Epoch,
    },
    /// Read `count` entries from position `pos` of the local log; answer with `ReadDone`.
    ReadLog {
        /// The completion to report.
        io: IoId,
        /// Which segment.
        seg: SegmentRef,
        /// First position.
        pos: u64,
        /// How many entries.
        count: u64,
    },
    /// Send a message to a peer. Delivery may fail; machines retransmit on `Tick`.
    Send {
        /// Destination node.
        to: NodeId,
        /// The message.
        msg: PeerMsg,
    },
    /// Propose a command to the metadata Raft group. It may be lost or applied later.
    Propose(Command),
    /// Answer a client request.
    Reply {
        /// The request being answered.
        request: RequestId,
        /// The answer.
        reply: ClientReply,
    },
}

/// The answer to a client append.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientReply {
    /// The batch is durable on a write quorum; its first entry has topic-wide offset `first`.
    Appended {
        /// Topic-wide offset of the first entry.
        first: u64,
        /// Number of entries.
        count: u64,
    },
    /// This node may not append to the segment now (not leader, lease expired, fenced); retry
    /// against the current leader. For a batch that was already in flight the outcome is unknown.
    NotLeader,
    /// The segment reached its rollover limit; retry once the next segment is open.
    SegmentFull,
    /// The batch is empty or larger than the limits allow.
    BadBatch,
}

/// Messages between segment replicas and the recovery coordinator. Ordered so that test
/// harnesses and models can keep in-flight messages as a canonical set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerMsg {
    /// Leader → follower: entries starting at `pos`, with the leader's committed length.
    Append {
        /// Which segment.
        seg: SegmentRef,
        /// The leader's epoch.
        epoch: Epoch,
        /// Position of the first entry.
        pos: u64,
        /// The entries.
        entries: Vec<Entry>,
        /// The leader's committed length, so followers may serve committed reads.
        committed: u64,
    },
    /// Follower → leader: the follower durably holds the first `durable` entries at `epoch`.
    AppendAck {
        /// Which segment.
        seg: SegmentRef,
        /// The epoch the follower accepted.
        epoch: Epoch,
        /// The acknowledging follower.
        from: NodeId,
        /// Durable length on the follower.
        durable: u64,
    },
    /// Follower → leader: refused; the follower is at `epoch` and expects position `expected`.
    AppendNack {
        /// Which segment.
        seg: SegmentRef,
        /// The follower's current epoch (higher than the sender's means: you are fenced).
        epoch: Epoch,
        /// The refusing follower.
        from: NodeId,
        /// The next position the follower would accept.
        expected: u64,
    },
    /// Coordinator → replica: stop accepting the old epoch; adopt `epoch` and report your length.
    Fence {
        /// Which segment.
        seg: SegmentRef,
        /// The new epoch.
        epoch: Epoch,
        /// Who to answer.
        coordinator: NodeId,
    },
    /// Replica → coordinator: fenced at `epoch`, holding `len` durable entries.
    FenceAck {
        /// Which segment.
        seg: SegmentRef,
        /// The epoch adopted.
        epoch: Epoch,
        /// The replica.
        from: NodeId,
        /// Its durable length.
        len: u64,
    },
    /// Coordinator → fenced replica: before the seal is proposed, durably hold the first `len`
    /// entries, fetching what is missing from `donor`; answer with `Copied`.
    CopyTo {
        /// Which segment.
        seg: SegmentRef,
        /// The recovery epoch (the replica must be fenced at it).
        epoch: Epoch,
        /// The length the recovery will seal at.
        len: u64,
        /// A replica known to hold `len` entries.
        donor: NodeId,
        /// Who to answer.
        coordinator: NodeId,
    },
    /// Fenced replica → coordinator: I durably hold `len` entries (at least what `CopyTo` asked).
    Copied {
        /// Which segment.
        seg: SegmentRef,
        /// The recovery epoch.
        epoch: Epoch,
        /// The replica.
        from: NodeId,
        /// Its durable length.
        len: u64,
    },
    /// Coordinator → replica: the segment is sealed at `len`; fetch missing entries from `donor`.
    SealAt {
        /// Which segment.
        seg: SegmentRef,
        /// The recovery epoch.
        epoch: Epoch,
        /// The sealed entry count.
        len: u64,
        /// A replica known to hold `len` entries.
        donor: NodeId,
        /// Who to answer.
        coordinator: NodeId,
    },
    /// Lagging replica → donor: send me entries `[from, upto)`.
    FetchTail {
        /// Which segment.
        seg: SegmentRef,
        /// The recovery epoch.
        epoch: Epoch,
        /// First position wanted.
        from: u64,
        /// End position (exclusive).
        upto: u64,
        /// Who wants them.
        requester: NodeId,
    },
    /// Donor → lagging replica: entries starting at `pos`.
    TailData {
        /// Which segment.
        seg: SegmentRef,
        /// The recovery epoch.
        epoch: Epoch,
        /// Position of the first entry.
        pos: u64,
        /// The entries.
        entries: Vec<Entry>,
    },
    /// Replica → coordinator: I durably hold exactly the sealed `len` entries.
    SealDone {
        /// Which segment.
        seg: SegmentRef,
        /// The recovery epoch.
        epoch: Epoch,
        /// The replica.
        from: NodeId,
        /// Its (sealed) length.
        len: u64,
    },
}

impl PeerMsg {
    /// The segment a message is about, for routing to the right machine.
    pub fn seg(&self) -> &SegmentRef {
        match self {
            PeerMsg::Append { seg, .. }
            | PeerMsg::AppendAck { seg, .. }
            | PeerMsg::AppendNack { seg, .. }
            | PeerMsg::Fence { seg, .. }
            | PeerMsg::FenceAck { seg, .. }
            | PeerMsg::CopyTo { seg, .. }
            | PeerMsg::Copied { seg, .. }
            | PeerMsg::SealAt { seg, .. }
            | PeerMsg::FetchTail { seg, .. }
            | PeerMsg::TailData { seg, .. }
            | PeerMsg::SealDone { seg, .. } => seg,
        }
    }
}

/// Size of a majority of `n` replicas (`n / 2 + 1`); 0 replicas need 0.
pub fn majority(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        n / 2 + 1
    }
}
