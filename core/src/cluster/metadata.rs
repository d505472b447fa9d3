//! Cluster metadata: the replicated state every node applies in Raft log order (nodes, topics,
//! segment chains, cursors, consumer groups) and its snapshot format. It must never carry message
//! data, never panic on any command, and never depend on anything but the command and the state.
//!
//! Every data-path command is conditional (it names the segment and epoch it was computed
//! against) so that duplicated, reordered or stale proposals are refused instead of sealing the
//! wrong segment or sealing twice.

use std::collections::BTreeMap;

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::rollover::{choose_replicas, next_leader};
use super::{Epoch, NodeId, SegmentId};
use crate::topic::{validate_topic_name, TopicNameError};

/// Default number of replicas per segment (`min(this, live nodes)` are used).
pub const REPLICATION_FACTOR_DEFAULT: usize = 3;
/// Longest node address, in bytes.
pub const NODE_ADDR_LEN_MAX_BYTES: usize = 255;
/// Longest consumer group name, in bytes.
pub const GROUP_NAME_LEN_MAX_BYTES: usize = 255;
/// Most nodes the metadata will register.
pub const NODES_MAX: usize = 1024;
/// Most topics the metadata will hold.
pub const TOPICS_MAX: usize = 100_000;
/// Largest snapshot or encoded command we will decode, in bytes.
pub const SNAPSHOT_LEN_MAX_BYTES: u64 = 256 << 20;
/// Snapshot format version written in the first four bytes.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;

/// A command of the metadata group. Commands are values; [`Metadata::apply`] decides.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Command {
    /// Add a node, or change its address; a (re-)registered node is live.
    RegisterNode {
        /// The node.
        node: NodeId,
        /// Where peers and clients reach it.
        addr: String,
    },
    /// A node whose process started with an empty data directory (wiped, or new) announces
    /// itself, once per process with a random `incarnation`. The next segment id as this
    /// applies is recorded: only segments from it on can the node be sure to hold whole, since
    /// they opened after it started. An older one it counts as not holding (its copy, if any,
    /// went with the old directory). Recorded through the log, this bound cannot be moved by a
    /// deposed leader still sending appends from a minority.
    Rejoin {
        /// The node.
        node: NodeId,
        /// Tells this process's announcement from earlier ones.
        incarnation: u64,
    },
    /// Mark a node live or dead (decided by the metadata leader's failure detector).
    SetNodeLive {
        /// The node.
        node: NodeId,
        /// Its new liveness.
        live: bool,
    },
    /// Create a topic with one open segment; creating an existing topic changes nothing.
    CreateTopic {
        /// The topic name.
        name: String,
    },
    /// Delete a topic and all its state.
    DeleteTopic {
        /// The topic name.
        name: String,
    },
    /// Seal `segment` at exactly `entries` and open the next one, if `segment` is the open
    /// segment of `topic` at `epoch`.
    Seal {
        /// The topic.
        topic: String,
        /// The segment the proposer believes is open.
        segment: SegmentId,
        /// The epoch the proposer leads.
        epoch: Epoch,
        /// The exact number of entries in the segment.
        entries: u64,
    },
    /// Recover `segment` whose leader is gone: bump its epoch past `epoch`, seal it at `entries`
    /// and open the next segment on a live node. Applies only if it is still open at `epoch`.
    Recover {
        /// The topic.
        topic: String,
        /// The segment being recovered.
        segment: SegmentId,
        /// The epoch that is being fenced.
        epoch: Epoch,
        /// The chosen seal length (includes every committed entry).
        entries: u64,
    },
    /// The leader of the open segment reports that the first `committed` entries are on a write
    /// quorum; cursors and groups may advance up to there.
    ReportCommitted {
        /// The topic.
        topic: String,
        /// The open segment.
        segment: SegmentId,
        /// The leader's epoch.
        epoch: Epoch,
        /// Committed entries in the segment.
        committed: u64,
    },
    /// Move the shared cursor of `topic` from `from` to `to` (compare-and-set).
    AdvanceCursor {
        /// The topic.
        topic: String,
        /// The cursor value the proposer read.
        from: u64,
        /// The new cursor value.
        to: u64,
    },
    /// Commit a consumer group's offset (the next offset it will read).
    CommitGroup {
        /// The topic.
        topic: String,
        /// The group name.
        group: String,
        /// The new committed offset.
        offset: u64,
    },
    /// Replace replica `from` of the sealed `segment` with `to` (re-replication away from a
    /// node that stayed down). The proposer must have made sure `to` holds the whole segment
    /// first: the segment never has fewer copies than before.
    MoveReplica {
        /// The topic.
        topic: String,
        /// A sealed segment of it.
        segment: SegmentId,
        /// The replica being replaced.
        from: NodeId,
        /// Its replacement (a registered node not yet a replica).
        to: NodeId,
    },
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// The command was already in effect; nothing changed.
    Unchanged,
    /// A node was added or updated.
    NodeRegistered,
    /// A node's rejoin was recorded: segments from `first_new` on opened after it started.
    Rejoined {
        /// The first segment id opened after the node's announcement.
        first_new: SegmentId,
    },
    /// A node's liveness changed.
    NodeLiveChanged,
    /// A topic was created; its first segment is led by `leader`.
    TopicCreated {
        /// The first segment's id.
        segment: SegmentId,
        /// Its leader.
        leader: NodeId,
    },
    /// A topic was deleted.
    TopicDeleted,
    /// A segment was sealed and the next one opened.
    Sealed {
        /// The next (open) segment.
        next: SegmentId,
        /// Its leader.
        leader: NodeId,
        /// Its base offset.
        base_offset: u64,
    },
    /// A segment was recovered (fenced at `epoch`, sealed) and the next one opened.
    Recovered {
        /// The recovered segment's new epoch.
        epoch: Epoch,
        /// The next (open) segment.
        next: SegmentId,
        /// Its leader.
        leader: NodeId,
    },
    /// The open segment's committed length grew.
    CommittedRaised,
    /// The shared cursor moved.
    CursorAdvanced {
        /// Previous cursor.
        from: u64,
        /// New cursor.
        to: u64,
    },
    /// A consumer group's offset moved.
    GroupCommitted,
    /// A sealed segment's replica was replaced.
    ReplicaMoved,
}

/// Why a command was refused. State is unchanged after a rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The topic name is invalid.
    #[error("bad topic name: {0}")]
    BadTopicName(#[from] TopicNameError),
    /// No such topic.
    #[error("unknown topic")]
    UnknownTopic,
    /// No such node.
    #[error("unknown node")]
    UnknownNode,
    /// The named segment is not the topic's open segment (sealed already, or never existed).
    #[error("segment {segment:?} is not the open segment (open is {open:?})")]
    NotOpen {
        /// The named segment.
        segment: SegmentId,
        /// The open segment.
        open: SegmentId,
    },
    /// The named epoch is not the segment's current epoch.
    #[error("epoch {given:?} is not the current epoch {current:?}")]
    EpochMismatch {
        /// The epoch in the command.
        given: Epoch,
        /// The segment's epoch.
        current: Epoch,
    },
    /// Sealing at this length would drop entries already reported committed.
    #[error("seal length {entries} is below the committed length {committed}")]
    WouldLoseCommitted {
        /// The proposed length.
        entries: u64,
        /// The committed length.
        committed: u64,
    },
    /// There is no live node to lead a new segment.
    #[error("no live node")]
    NoLiveNodes,
    /// A node address is longer than [`NODE_ADDR_LEN_MAX_BYTES`].
    #[error("node address too long")]
    AddrTooLong,
    /// Registering one more node would exceed [`NODES_MAX`].
    #[error("too many nodes")]
    TooManyNodes,
    /// Creating one more topic would exceed [`TOPICS_MAX`].
    #[error("too many topics")]
    TooManyTopics,
    /// A group name is empty or longer than [`GROUP_NAME_LEN_MAX_BYTES`].
    #[error("bad consumer group name")]
    BadGroupName,
    /// The shared cursor is not at `from` any more (another reader moved it).
    #[error("cursor is at {current}, not at the expected value")]
    CursorMoved {
        /// The cursor's value.
        current: u64,
    },
    /// The offset is past the readable (committed) end of the topic.
    #[error("offset {offset} is past the committed end {end}")]
    PastEnd {
        /// The offset given.
        offset: u64,
        /// The committed end.
        end: u64,
    },
    /// The offset is below the current value, which must never regress.
    #[error("offset {offset} is below the current value {current}")]
    Regress {
        /// The offset given.
        offset: u64,
        /// The current value.
        current: u64,
    },
    /// An offset or epoch computation would overflow `u64`.
    #[error("arithmetic overflow")]
    Overflow,
    /// A replica move names a segment that is still open, a `from` that is not one of its
    /// replicas, or a `to` that already is one.
    #[error("not a valid replica move")]
    BadMove,
}

/// Why a snapshot or encoded command could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The input is shorter than the version header.
    #[error("input too short")]
    TooShort,
    /// The input is longer than [`SNAPSHOT_LEN_MAX_BYTES`].
    #[error("input too long")]
    TooLong,
    /// The version header names a format we do not know.
    #[error("unknown format version {0}")]
    Version(u32),
    /// The body is not a valid encoding.
    #[error("malformed body: {0}")]
    Malformed(String),
    /// The body decodes but breaks a metadata invariant.
    #[error("invalid metadata: {0}")]
    Invalid(String),
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its address.
    pub addr: String,
    /// Whether the failure detector considers it up.
    pub live: bool,
}

/// Whether a segment accepts appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SegmentState {
    /// Its leader may append (under a lease).
    Open,
    /// Closed at exactly `entries` entries.
    Sealed {
        /// The exact entry count.
        entries: u64,
    },
}

/// One segment of a topic's chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// Unique id (cluster-wide, never reused).
    pub id: SegmentId,
    /// The replica set; the first one is the leader.
    pub replicas: Vec<NodeId>,
    /// Current epoch.
    pub epoch: Epoch,
    /// Open or sealed.
    pub state: SegmentState,
    /// Topic-wide offset of the segment's first entry.
    pub base_offset: u64,
    /// Entries known committed (reported by the leader; equals the count once sealed).
    pub committed: u64,
}

impl SegmentMeta {
    /// The leader (first replica).
    pub fn leader(&self) -> Option<NodeId> {
        self.replicas.first().copied()
    }

    /// Whether the segment is open.
    pub fn is_open(&self) -> bool {
        self.state == SegmentState::Open
    }

    /// The sealed count, if sealed.
    pub fn sealed_entries(&self) -> Option<u64> {
        match self.state {
            SegmentState::Sealed { entries } => Some(entries),
            SegmentState::Open => None,
        }
    }
}

/// One topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopicMeta {
    /// The chain of segments, oldest first; all but the last are sealed, the last is open.
    pub segments: Vec<SegmentMeta>,
    /// The shared `GET` cursor: the topic-wide offset of the next entry to hand out.
    pub cursor: u64,
    /// Consumer groups and their committed offsets.
    pub groups: BTreeMap<String, u64>,
}

impl TopicMeta {
    /// The open segment (the last one of the chain).
    pub fn open_segment(&self) -> Option<&SegmentMeta> {
        self.segments.last().filter(|s| s.is_open())
    }

    /// Topic-wide offset one past the last committed entry: nothing at or beyond it may be read.
    pub fn readable_end(&self) -> u64 {
        match self.segments.last() {
            // base + committed was checked not to overflow when it was stored.
            Some(s) => s.base_offset.saturating_add(s.committed),
            None => 0,
        }
    }
}

/// The metadata state machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Metadata {
    replication_factor: usize,
    next_segment_id: u64,
    nodes: BTreeMap<NodeId, NodeInfo>,
    topics: BTreeMap<String, TopicMeta>,
    /// The latest [`Command::Rejoin`] of each node that sent one.
    rejoins: BTreeMap<NodeId, Rejoin>,
}

/// A node's latest [`Command::Rejoin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rejoin {
    /// The announcing process's incarnation.
    pub incarnation: u64,
    /// The next segment id when it applied: every segment from it on opened afterwards.
    pub first_new: SegmentId,
}

impl Default for Metadata {
    fn default() -> Self {
        Metadata::new(REPLICATION_FACTOR_DEFAULT)
    }
}

impl Metadata {
    /// Empty metadata whose segments get `min(replication_factor, live nodes)` replicas.
    pub fn new(replication_factor: usize) -> Self {
        Metadata {
            replication_factor: replication_factor.max(1),
            next_segment_id: 0,
            nodes: BTreeMap::new(),
            topics: BTreeMap::new(),
            rejoins: BTreeMap::new(),
        }
    }

    /// The latest [`Command::Rejoin`] of `node`, if it ever sent one.
    pub fn rejoin_of(&self, node: NodeId) -> Option<Rejoin> {
        self.rejoins.get(&node).copied()
    }

    /// Registered nodes.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeInfo> {
        &self.nodes
    }

    /// The id the next segment will get: every segment opened so far has a lower one.
    pub fn next_segment_id(&self) -> SegmentId {
        SegmentId(self.next_segment_id)
    }

    /// All topics.
    pub fn topics(&self) -> &BTreeMap<String, TopicMeta> {
        &self.topics
    }

    /// One topic.
    pub fn topic(&self, name: &str) -> Option<&TopicMeta> {
        self.topics.get(name)
    }

    /// Live nodes in id order (every registered node is a voter for segment placement).
    pub fn live_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.live)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Applies one command. Total: every command on every state returns; a rejection leaves the
    /// state unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, Rejection> {
        match cmd {
            Command::RegisterNode { node, addr } => self.register_node(*node, addr),
            Command::Rejoin { node, incarnation } => {
                if !self.rejoins.contains_key(node) && self.rejoins.len() >= NODES_MAX {
                    return Err(Rejection::TooManyNodes);
                }
                let rejoin = Rejoin {
                    incarnation: *incarnation,
                    first_new: SegmentId(self.next_segment_id),
                };
                match self.rejoins.insert(*node, rejoin) {
                    // The same announcement again (a retried proposal): the first one stands.
                    Some(old) if old.incarnation == *incarnation => {
                        self.rejoins.insert(*node, old);
                        Ok(Outcome::Unchanged)
                    }
                    _ => Ok(Outcome::Rejoined {
                        first_new: rejoin.first_new,
                    }),
                }
            }
            Command::SetNodeLive { node, live } => {
                let info = self.nodes.get_mut(node).ok_or(Rejection::UnknownNode)?;
                if info.live == *live {
                    return Ok(Outcome::Unchanged);
                }
                info.live = *live;
                Ok(Outcome::NodeLiveChanged)
            }
            Command::CreateTopic { name } => self.create_topic(name),
            Command::DeleteTopic { name } => {
                validate_topic_name(name)?;
                self.topics
                    .remove(name)
                    .map(|_| Outcome::TopicDeleted)
                    .ok_or(Rejection::UnknownTopic)
            }
            Command::Seal {
                topic,
                segment,
                epoch,
                entries,
            } => self.seal(topic, *segment, *epoch, *entries, false),
            Command::Recover {
                topic,
                segment,
                epoch,
                entries,
            } => self.seal(topic, *segment, *epoch, *entries, true),
            Command::ReportCommitted {
                topic,
                segment,
                epoch,
                committed,
            } => {
                let t = self.topics.get_mut(topic).ok_or(Rejection::UnknownTopic)?;
                let open = open_at_mut(t, *segment, *epoch)?;
                if *committed <= open.committed {
                    return Ok(Outcome::Unchanged);
                }
                open.base_offset
                    .checked_add(*committed)
                    .ok_or(Rejection::Overflow)?;
                open.committed = *committed;
                Ok(Outcome::CommittedRaised)
            }
            Command::AdvanceCursor { topic, from, to } => {
                let t = self.topics.get_mut(topic).ok_or(Rejection::UnknownTopic)?;
                if t.cursor != *from {
                    return Err(Rejection::CursorMoved { current: t.cursor });
                }
                if to < from {
                    return Err(Rejection::Regress {
                        offset: *to,
                        current: t.cursor,
                    });
                }
                let end = t.readable_end();
                if *to > end {
                    return Err(Rejection::PastEnd { offset: *to, end });
                }
                if to == from {
                    return Ok(Outcome::Unchanged);
                }
                t.cursor = *to;
                Ok(Outcome::CursorAdvanced {
                    from: *from,
                    to: *to,
                })
            }
            Command::CommitGroup {
                topic,
                group,
                offset,
            } => {
                if group.is_empty() || group.len() > GROUP_NAME_LEN_MAX_BYTES {
                    return Err(Rejection::BadGroupName);
                }
                let t = self.topics.get_mut(topic).ok_or(Rejection::UnknownTopic)?;
                let end = t.readable_end();
                if *offset > end {
                    return Err(Rejection::PastEnd {
                        offset: *offset,
                        end,
                    });
                }
                let current = t.groups.get(group).copied().unwrap_or(0);
                if *offset < current {
                    return Err(Rejection::Regress {
                        offset: *offset,
                        current,
                    });
                }
                if *offset == current && t.groups.contains_key(group) {
                    return Ok(Outcome::Unchanged);
                }
                t.groups.insert(group.clone(), *offset);
                Ok(Outcome::GroupCommitted)
            }
            Command::MoveReplica {
                topic,
                segment,
                from,
                to,
            } => {
                if !self.nodes.contains_key(to) {
                    return Err(Rejection::UnknownNode);
                }
                let t = self.topics.get_mut(topic).ok_or(Rejection::UnknownTopic)?;
                let s = t
                    .segments
                    .iter_mut()
                    .find(|s| s.id == *segment)
                    .ok_or(Rejection::BadMove)?;
                if s.replicas.contains(to) && !s.replicas.contains(from) {
                    // Already applied.
                    return Ok(Outcome::Unchanged);
                }
                let Some(slot) = s.replicas.iter().position(|r| r == from) else {
                    return Err(Rejection::BadMove);
                };
                if s.is_open() || s.replicas.contains(to) {
                    return Err(Rejection::BadMove);
                }
                s.replicas[slot] = *to;
                Ok(Outcome::ReplicaMoved)
            }
        }
    }

    /// Checks every structural invariant; `Err` names the first one broken. Used after decoding
    /// a snapshot and by the tests and models after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.rejoins.len() > NODES_MAX {
            return Err("too many rejoins".into());
        }
        if let Some((n, _)) = self
            .rejoins
            .iter()
            .find(|(_, r)| r.first_new.0 > self.next_segment_id)
        {
            return Err(format!(
                "node {}: rejoin bound past the next segment id",
                n.0
            ));
        }
        for (name, t) in &self.topics {
            let Some(last) = t.segments.last() else {
                return Err(format!("topic {name} has no segment"));
            };
            if !last.is_open() {
                return Err(format!("topic {name}: last segment is sealed"));
            }
            let mut expected_base = 0u64;
            let mut prev_id: Option<SegmentId> = None;
            for (i, s) in t.segments.iter().enumerate() {
                if prev_id.is_some_and(|p| p >= s.id) || s.id.0 >= self.next_segment_id {
                    return Err(format!("topic {name}: segment ids out of order"));
                }
                prev_id = Some(s.id);
                if s.base_offset != expected_base {
                    return Err(format!("topic {name}: segment {i} base is not contiguous"));
                }
                if s.replicas.is_empty() {
                    return Err(format!("topic {name}: segment {i} has no replicas"));
                }
                let mut r = s.replicas.clone();
                r.sort();
                r.dedup();
                if r.len() != s.replicas.len() {
                    return Err(format!("topic {name}: segment {i} repeats a replica"));
                }
                match s.state {
                    SegmentState::Sealed { entries } => {
                        if i + 1 == t.segments.len() {
                            return Err(format!("topic {name}: last segment sealed"));
                        }
                        if s.committed != entries {
                            return Err(format!("topic {name}: sealed count != committed"));
                        }
                        expected_base = s
                            .base_offset
                            .checked_add(entries)
                            .ok_or_else(|| format!("topic {name}: offset overflow"))?;
                    }
                    SegmentState::Open => {
                        if i + 1 != t.segments.len() {
                            return Err(format!("topic {name}: open segment not last"));
                        }
                        s.base_offset
                            .checked_add(s.committed)
                            .ok_or_else(|| format!("topic {name}: offset overflow"))?;
                    }
                }
            }
            let end = t.readable_end();
            if t.cursor > end {
                return Err(format!("topic {name}: cursor past the committed end"));
            }
            if t.groups.values().any(|&g| g > end) {
                return Err(format!("topic {name}: group offset past the committed end"));
            }
        }
        Ok(())
    }

    /// Encodes a snapshot: a 4-byte little-endian format version, then the body.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let mut out = SNAPSHOT_FORMAT_VERSION.to_le_bytes().to_vec();
        // Serializing plain owned data into a Vec cannot fail; the limit is far above any
        // metadata we would hold. An error would mean a bincode bug; we then write an empty body,
        // which decoding rejects instead of loading a wrong state.
        if let Ok(body) = codec().serialize(self) {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Decodes and validates a snapshot written by [`Metadata::encode_snapshot`].
    pub fn decode_snapshot(bytes: &[u8]) -> Result<Metadata, DecodeError> {
        let body = strip_version(bytes)?;
        let m: Metadata = codec()
            .deserialize(body)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if m.replication_factor == 0 {
            return Err(DecodeError::Invalid("replication factor 0".into()));
        }
        m.check_invariants().map_err(DecodeError::Invalid)?;
        Ok(m)
    }

    fn register_node(&mut self, node: NodeId, addr: &str) -> Result<Outcome, Rejection> {
        if addr.len() > NODE_ADDR_LEN_MAX_BYTES {
            return Err(Rejection::AddrTooLong);
        }
        let count = self.nodes.len();
        match self.nodes.get_mut(&node) {
            Some(info) if info.addr == addr && info.live => Ok(Outcome::Unchanged),
            Some(info) => {
                info.addr = addr.to_string();
                info.live = true;
                Ok(Outcome::NodeRegistered)
            }
            None if count >= NODES_MAX => Err(Rejection::TooManyNodes),
            None => {
                self.nodes.insert(
                    node,
                    NodeInfo {
                        addr: addr.to_string(),
                        live: true,
                    },
                );
                Ok(Outcome::NodeRegistered)
            }
        }
    }

    fn create_topic(&mut self, name: &str) -> Result<Outcome, Rejection> {
        validate_topic_name(name)?;
        if self.topics.contains_key(name) {
            return Ok(Outcome::Unchanged);
        }
        if self.topics.len() >= TOPICS_MAX {
            return Err(Rejection::TooManyTopics);
        }
        let live = self.live_nodes();
        if live.is_empty() {
            return Err(Rejection::NoLiveNodes);
        }
        // Spread first leaders over the nodes; deterministic because it only depends on state.
        let leader = live[self.topics.len() % live.len()];
        let segment = self.fresh_segment(&live, leader, 0)?;
        let id = segment.id;
        self.topics.insert(
            name.to_string(),
            TopicMeta {
                segments: vec![segment],
                cursor: 0,
                groups: BTreeMap::new(),
            },
        );
        Ok(Outcome::TopicCreated {
            segment: id,
            leader,
        })
    }

    /// `Seal` and `Recover` share their checks; `recover` additionally bumps the epoch and
    /// leads the next segment away from the old leader.
    fn seal(
        &mut self,
        topic: &str,
        segment: SegmentId,
        epoch: Epoch,
        entries: u64,
        recover: bool,
    ) -> Result<Outcome, Rejection> {
        let live = self.live_nodes();
        let t = self.topics.get(topic).ok_or(Rejection::UnknownTopic)?;
        // A repeat of a command that already applied is a no-op success, so retries are safe.
        if let Some(s) = t.segments.iter().find(|s| s.id == segment) {
            let sealed_epoch = if recover {
                epoch.0.checked_add(1).map(Epoch)
            } else {
                Some(epoch)
            };
            if s.sealed_entries() == Some(entries) && Some(s.epoch) == sealed_epoch {
                return Ok(Outcome::Unchanged);
            }
        }
        let open = open_at(t, segment, epoch)?;
        if entries < open.committed {
            return Err(Rejection::WouldLoseCommitted {
                entries,
                committed: open.committed,
            });
        }
        let next_base = open
            .base_offset
            .checked_add(entries)
            .ok_or(Rejection::Overflow)?;
        let new_epoch = if recover {
            Epoch(epoch.0.checked_add(1).ok_or(Rejection::Overflow)?)
        } else {
            epoch
        };
        let old_leader = open.leader().unwrap_or_default();
        let leader = next_leader(&live, old_leader).ok_or(Rejection::NoLiveNodes)?;
        let next = self.fresh_segment(&live, leader, next_base)?;
        let next_id = next.id;
        // The topic exists: it was looked up above and nothing removed it since.
        let Some(t) = self.topics.get_mut(topic) else {
            return Err(Rejection::UnknownTopic);
        };
        if let Some(s) = t.segments.last_mut() {
            s.state = SegmentState::Sealed { entries };
            s.committed = entries;
            s.epoch = new_epoch;
        }
        t.segments.push(next);
        Ok(if recover {
            Outcome::Recovered {
                epoch: new_epoch,
                next: next_id,
                leader,
            }
        } else {
            Outcome::Sealed {
                next: next_id,
                leader,
                base_offset: next_base,
            }
        })
    }

    fn fresh_segment(
        &mut self,
        live: &[NodeId],
        leader: NodeId,
        base_offset: u64,
    ) -> Result<SegmentMeta, Rejection> {
        let id = SegmentId(self.next_segment_id);
        self.next_segment_id = self
            .next_segment_id
            .checked_add(1)
            .ok_or(Rejection::Overflow)?;
        Ok(SegmentMeta {
            id,
            replicas: choose_replicas(live, leader, self.replication_factor),
            epoch: Epoch(0),
            state: SegmentState::Open,
            base_offset,
            committed: 0,
        })
    }
}

impl Command {
    /// Encodes a command for the Raft log: version header, then the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = SNAPSHOT_FORMAT_VERSION.to_le_bytes().to_vec();
        // As in `encode_snapshot`: cannot fail for owned data; an empty body would be rejected.
        if let Ok(body) = codec().serialize(self) {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Decodes a command written by [`Command::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
        let body = strip_version(bytes)?;
        codec()
            .deserialize(body)
            .map_err(|e| DecodeError::Malformed(e.to_string()))
    }
}

/// The one bincode configuration for metadata: bounded, so a corrupt length can never make the
/// decoder allocate more than [`SNAPSHOT_LEN_MAX_BYTES`]; no trailing garbage accepted.
fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(SNAPSHOT_LEN_MAX_BYTES)
        .with_fixint_encoding()
        .reject_trailing_bytes()
}

fn strip_version(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    if bytes.len() as u64 > SNAPSHOT_LEN_MAX_BYTES {
        return Err(DecodeError::TooLong);
    }
    let (head, body) = bytes
        .split_first_chunk::<4>()
        .ok_or(DecodeError::TooShort)?;
    let version = u32::from_le_bytes(*head);
    if version != SNAPSHOT_FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok(body)
}

fn open_at(t: &TopicMeta, segment: SegmentId, epoch: Epoch) -> Result<&SegmentMeta, Rejection> {
    let open = t.open_segment().ok_or(Rejection::NotOpen {
        segment,
        open: SegmentId(u64::MAX),
    })?;
    if open.id != segment {
        return Err(Rejection::NotOpen {
            segment,
            open: open.id,
        });
    }
    if open.epoch != epoch {
        return Err(Rejection::EpochMismatch {
            given: epoch,
            current: open.epoch,
        });
    }
    Ok(open)
}

fn open_at_mut(
    t: &mut TopicMeta,
    segment: SegmentId,
    epoch: Epoch,
) -> Result<&mut SegmentMeta, Rejection> {
    open_at(t, segment, epoch)?;
    // `open_at` just found the open (last) segment.
    t.segments.last_mut().ok_or(Rejection::UnknownTopic)
}

#[cfg(test)]
mod tests;
