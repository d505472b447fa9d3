//! Model B: one segment replicated on three nodes, with leases over discrete time, a lossy
//! network, disks whose writes complete later (and vanish on a crash), a crash, failover by the
//! recovery coordinator and the metadata that seals. It drives the real core machines
//! (`SegmentLeader`, `SegmentFollower`, `Recovery`, `Metadata`, `LeaseTable`) and owns only the
//! environment; it must not re-implement their rules.

use stateright::{Model, Property};
use walrus_core::cluster::follower::{FollowerInput, SegmentFollower};
use walrus_core::cluster::lease::{may_append, Lease, LeaseConfig, LeaseTable};
use walrus_core::cluster::metadata::{Command, Metadata};
use walrus_core::cluster::recovery::{Phase, Recovery, RecoveryInput};
use walrus_core::cluster::replication::{LeaderInput, SegmentLeader};
use walrus_core::cluster::rollover::RolloverPolicy;
use walrus_core::cluster::{
    ClientReply, Effect, Entry, Epoch, IoId, NodeId, PeerMsg, RequestId, SegmentId, SegmentRef,
};

/// A deliberately broken variant, to show that the checker bites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepBug {
    /// The real thing.
    None,
    /// A fenced follower that receives an append of the old epoch forgets its fence (as if the
    /// epoch check were missing) and accepts it.
    FollowerAcceptsStaleEpoch,
    /// Disks report a write complete before it is durable (as if acks were sent before fsync).
    AckBeforePersist,
    /// A replica asked to copy a recovery's length claims at once to hold it (as if the
    /// coordinator proposed the seal without waiting for the copies).
    CopyClaimedEarly,
}

/// Bounds and variant of model B.
#[derive(Debug, Clone)]
pub struct RepModel {
    /// Client appends (one entry each).
    pub appends: u8,
    /// Rollover limit of the segment.
    pub max_entries: u64,
    /// Messages the network may lose.
    pub max_drops: u8,
    /// Node crashes (permanent).
    pub max_crashes: u8,
    /// Losses and crashes together (a fault budget that keeps the space small).
    pub max_faults: u8,
    /// Only the first this many nodes may crash (1 = the leader, the failover case; 3 = any).
    pub crashable: usize,
    /// Last instant of the discrete clock.
    pub max_time: u64,
    /// Lease timing (model milliseconds are clock ticks).
    pub lease: LeaseConfig,
    /// Planted bug.
    pub bug: RepBug,
}

/// The topic of the modelled segment.
pub const TOPIC: &str = "t";
/// Replicas; the first leads.
pub const NODES: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
/// The metadata leader running recovery (it does not crash here: Raft masks that).
pub const COORDINATOR: NodeId = NodeId(9);

/// A replica's machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// Leads the segment.
    Leader(SegmentLeader),
    /// Follows it (or stepped down).
    Follower(SegmentFollower),
}

/// A disk operation in flight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DiskOp {
    /// Positional write.
    Write(u64, Vec<Entry>),
    /// Cut to a length.
    Truncate(u64),
    /// Record a fence epoch.
    Epoch(Epoch),
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    /// Its machine; `None` once crashed.
    pub role: Option<Role>,
    /// Durable log.
    pub log: Vec<Entry>,
    /// Durable fence epoch.
    pub fenced_epoch: Option<Epoch>,
    /// Writes not yet durable, completing in order.
    pub pending: Vec<(IoId, DiskOp)>,
}

/// One state of model B.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepState {
    /// The clock (shared; drift is covered by `LeaseConfig::validate` and the core proptest).
    pub now: u64,
    /// Metadata as applied by Raft.
    pub meta: Metadata,
    /// The metadata leader's lease grants.
    pub leases: LeaseTable,
    /// Nodes 1..=3.
    pub nodes: Vec<Node>,
    /// Messages in flight, as a sorted set.
    pub net: Vec<(NodeId, PeerMsg)>,
    /// Proposals waiting for Raft.
    pub proposals: Vec<Command>,
    /// The coordinator's recovery, once started.
    pub recovery: Option<Recovery>,
    /// Client appends issued.
    pub issued: u8,
    /// Messages lost so far.
    pub drops: u8,
    /// Crashes so far.
    pub crashes: u8,
    /// A loss happened since the last retransmission tick.
    pub lost: bool,
    /// Ghost: entries in the order the leader assigned them.
    pub assigned: Vec<Entry>,
    /// Ghost: entries acknowledged to clients, by position.
    pub acked: Vec<u64>,
    /// Ghost: something was written to, or acknowledged in, a segment past its seal.
    pub write_after_seal: bool,
}

/// An action of model B.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RepAction {
    /// A client appends one entry at the leader.
    ClientAppend,
    /// Deliver message `.0` of the network.
    Deliver(usize),
    /// Lose message `.0`.
    Drop(usize),
    /// The oldest pending write of node `.0` (index) completes.
    DiskDone(usize),
    /// Node `.0` (index) crashes for good.
    Crash(usize),
    /// Time passes by one tick.
    AdvanceTime,
    /// After a loss: every machine's retransmission timer fires.
    Retransmit,
    /// The metadata leader starts recovering the segment.
    StartRecovery,
    /// Raft applies proposal `.0`.
    Apply(usize),
}

fn seg() -> SegmentRef {
    SegmentRef {
        topic: TOPIC.into(),
        segment: SegmentId(0),
    }
}

fn idx(n: NodeId) -> Option<usize> {
    NODES.iter().position(|&x| x == n)
}

impl RepModel {
    /// The default small bounds.
    pub fn small(bug: RepBug) -> Self {
        RepModel {
            appends: 1,
            max_entries: 1,
            max_drops: 1,
            max_crashes: 1,
            max_faults: 1,
            crashable: 1,
            max_time: 2,
            lease: LeaseConfig {
                lease_duration_ms: 1,
                max_clock_drift_ms: 0,
                detection_timeout_ms: 2,
            },
            bug,
        }
    }

    /// Larger bounds for `WALRUS_SPEC_BIG=1`.
    pub fn big(bug: RepBug) -> Self {
        RepModel {
            appends: 2,
            max_entries: 2,
            crashable: 3,
            max_faults: 2,
            ..RepModel::small(bug)
        }
    }

    /// Whether no action but a crash can change `s`.
    pub fn is_quiescent(&self, s: &RepState) -> bool {
        let mut acts = Vec::new();
        self.actions(s, &mut acts);
        acts.into_iter()
            .filter(|a| !matches!(a, RepAction::Crash(_)))
            .all(|a| self.next_state(s, a).is_none())
    }

    /// The sealed length of the segment, if sealed.
    pub fn sealed_len(s: &RepState) -> Option<u64> {
        s.meta
            .topic(TOPIC)?
            .segments
            .first()
            .and_then(|x| x.sealed_entries())
    }

    /// Feeds an input's effects through the environment until nothing more happens.
    fn run(&self, s: &mut RepState, from: NodeId, effects: Vec<Effect>) {
        let mut work: Vec<(NodeId, Effect)> = effects.into_iter().map(|e| (from, e)).collect();
        while !work.is_empty() {
            let (at, e) = work.remove(0);
            let mut more = Vec::new();
            match e {
                Effect::Send { to, msg } => {
                    let m = (to, msg);
                    if let Err(p) = s.net.binary_search(&m) {
                        s.net.insert(p, m);
                    }
                }
                Effect::Propose(cmd) => {
                    if !s.proposals.contains(&cmd) {
                        s.proposals.push(cmd);
                    }
                }
                Effect::Reply { reply, .. } => {
                    if let ClientReply::Appended { first, count } = reply {
                        for p in first..first + count {
                            s.acked.push(p);
                            if Self::sealed_len(s).is_some_and(|l| p >= l) {
                                s.write_after_seal = true;
                            }
                        }
                    }
                }
                Effect::Persist {
                    io, pos, entries, ..
                } => {
                    let Some(i) = idx(at) else { continue };
                    // A replica that durably recorded a fence must never write past the seal
                    // (an unfenced straggler may; recovery truncates it).
                    if let Some(l) = Self::sealed_len(s) {
                        if s.nodes[i].fenced_epoch.is_some() && pos + entries.len() as u64 > l {
                            s.write_after_seal = true;
                        }
                    }
                    s.nodes[i].pending.push((io, DiskOp::Write(pos, entries)));
                    if self.bug == RepBug::AckBeforePersist {
                        more.extend(self.io_done(s, i, io));
                    }
                }
                Effect::Truncate { io, len, .. } => {
                    let Some(i) = idx(at) else { continue };
                    s.nodes[i].pending.push((io, DiskOp::Truncate(len)));
                }
                Effect::PersistEpoch { io, epoch, .. } => {
                    let Some(i) = idx(at) else { continue };
                    s.nodes[i].pending.push((io, DiskOp::Epoch(epoch)));
                }
                Effect::ReadLog { io, pos, count, .. } => {
                    let Some(i) = idx(at) else { continue };
                    let log = &s.nodes[i].log;
                    let end = ((pos + count) as usize).min(log.len());
                    let entries = log.get(pos as usize..end).unwrap_or_default().to_vec();
                    if let Some(Role::Follower(f)) = &mut s.nodes[i].role {
                        let mut out = Vec::new();
                        f.handle(FollowerInput::ReadDone { io, entries }, &mut out);
                        more.extend(out);
                    }
                }
            }
            work.extend(more.into_iter().map(|e| (at, e)));
        }
    }

    /// Tells node `i`'s machine that `io` completed; returns its effects.
    fn io_done(&self, s: &mut RepState, i: usize, io: IoId) -> Vec<Effect> {
        let mut out = Vec::new();
        match &mut s.nodes[i].role {
            Some(Role::Leader(l)) => l.handle(s.now, LeaderInput::IoDone { io }, &mut out),
            Some(Role::Follower(f)) => f.handle(FollowerInput::IoDone { io }, &mut out),
            None => {}
        }
        out
    }

    fn deliver(&self, s: &mut RepState, to: NodeId, msg: PeerMsg) {
        if to == COORDINATOR {
            if let Some(r) = &mut s.recovery {
                let mut out = Vec::new();
                r.handle(RecoveryInput::Peer(msg), &mut out);
                self.run(s, COORDINATOR, out);
            }
            return;
        }
        let Some(i) = idx(to) else { return };
        if let (
            RepBug::CopyClaimedEarly,
            PeerMsg::CopyTo {
                seg, epoch, len, ..
            },
        ) = (self.bug, &msg)
        {
            if s.nodes[i].role.is_some() {
                let claim = PeerMsg::Copied {
                    seg: seg.clone(),
                    epoch: *epoch,
                    from: to,
                    len: *len,
                };
                self.run(
                    s,
                    to,
                    vec![Effect::Send {
                        to: COORDINATOR,
                        msg: claim,
                    }],
                );
                return;
            }
        }
        if s.nodes[i].role.is_none() {
            // Lost with the crashed node: senders must retransmit.
            s.lost = true;
            return;
        }
        let mut out = Vec::new();
        let role = s.nodes[i].role.take();
        let role = match role {
            None => None,
            Some(Role::Leader(l))
                if matches!(msg, PeerMsg::Fence { .. } | PeerMsg::SealAt { .. }) =>
            {
                // Recovery reached the old leader: the shell makes it step down and answer as a
                // replica.
                let mut f = l.step_down(&mut out);
                f.handle(FollowerInput::Peer(msg), &mut out);
                Some(Role::Follower(f))
            }
            Some(Role::Leader(mut l)) => {
                l.handle(s.now, LeaderInput::Peer(msg), &mut out);
                Some(Role::Leader(l))
            }
            Some(Role::Follower(mut f)) => {
                if self.bug == RepBug::FollowerAcceptsStaleEpoch {
                    if let PeerMsg::Append { epoch, .. } = &msg {
                        if f.is_fenced() && *epoch < f.epoch() {
                            f = SegmentFollower::restore(
                                to,
                                seg(),
                                NODES[0],
                                *epoch,
                                None,
                                f.durable(),
                            );
                        }
                    }
                }
                f.handle(FollowerInput::Peer(msg), &mut out);
                Some(Role::Follower(f))
            }
        };
        s.nodes[i].role = role;
        self.run(s, to, out);
    }

    /// Environment bookkeeping after every action: tell the coordinator when metadata sealed.
    fn sync(&self, s: &mut RepState) {
        let sealed = Self::sealed_len(s);
        if let (Some(entries), Some(r)) = (sealed, &mut s.recovery) {
            if matches!(r.phase(), Phase::Proposed { .. }) {
                let mut out = Vec::new();
                r.handle(RecoveryInput::SegmentSealed { entries }, &mut out);
                self.run(s, COORDINATOR, out);
            }
        }
    }

    fn durable_holders(s: &RepState, pos: u64) -> Vec<usize> {
        (0..NODES.len())
            .filter(|&i| {
                s.nodes[i]
                    .log
                    .get(pos as usize)
                    .is_some_and(|e| s.assigned.get(pos as usize) == Some(e))
            })
            .collect()
    }
}

impl Model for RepModel {
    type State = RepState;
    type Action = RepAction;

    fn init_states(&self) -> Vec<RepState> {
        let mut meta = Metadata::default();
        for n in NODES {
            let _ = meta.apply(&Command::RegisterNode {
                node: n,
                addr: String::new(),
            });
        }
        // On fresh metadata with nodes 1..3 the topic's first segment is 0, led by node 1.
        let _ = meta.apply(&Command::CreateTopic { name: TOPIC.into() });
        let mut leases = LeaseTable::new();
        let _ = leases.grant(&meta, NODES[0], &seg(), Epoch(0), 0);
        let policy = RolloverPolicy {
            max_entries: self.max_entries,
            max_bytes: None,
        };
        let mut leader = SegmentLeader::new(NODES[0], seg(), Epoch(0), 0, &NODES, policy);
        let mut out = Vec::new();
        leader.handle(
            0,
            LeaderInput::LeaseGranted(Lease::granted(Epoch(0), 0, &self.lease)),
            &mut out,
        );
        let mut nodes = vec![Node {
            role: Some(Role::Leader(leader)),
            log: Vec::new(),
            fenced_epoch: None,
            pending: Vec::new(),
        }];
        for &n in &NODES[1..] {
            nodes.push(Node {
                role: Some(Role::Follower(SegmentFollower::new(
                    n,
                    seg(),
                    NODES[0],
                    Epoch(0),
                ))),
                log: Vec::new(),
                fenced_epoch: None,
                pending: Vec::new(),
            });
        }
        vec![RepState {
            now: 0,
            meta,
            leases,
            nodes,
            net: Vec::new(),
            proposals: Vec::new(),
            recovery: None,
            issued: 0,
            drops: 0,
            crashes: 0,
            lost: false,
            assigned: Vec::new(),
            acked: Vec::new(),
            write_after_seal: false,
        }]
    }

    fn actions(&self, s: &RepState, actions: &mut Vec<RepAction>) {
        actions.push(RepAction::ClientAppend);
        for i in 0..s.net.len() {
            actions.push(RepAction::Deliver(i));
            if s.drops < self.max_drops && s.drops + s.crashes < self.max_faults {
                actions.push(RepAction::Drop(i));
            }
        }
        for i in 0..NODES.len() {
            actions.push(RepAction::DiskDone(i));
            if s.crashes < self.max_crashes
                && s.drops + s.crashes < self.max_faults
                && i < self.crashable
            {
                actions.push(RepAction::Crash(i));
            }
        }
        actions.push(RepAction::AdvanceTime);
        actions.push(RepAction::Retransmit);
        actions.push(RepAction::StartRecovery);
        for i in 0..s.proposals.len() {
            actions.push(RepAction::Apply(i));
        }
    }

    fn next_state(&self, last: &RepState, action: RepAction) -> Option<RepState> {
        let mut s = last.clone();
        match action {
            RepAction::ClientAppend => {
                if s.issued >= self.appends {
                    return None;
                }
                let now = s.now;
                let entry: Entry = vec![s.issued];
                let Some(Role::Leader(l)) = &mut s.nodes[0].role else {
                    return None;
                };
                if !l.can_append(now) {
                    return None;
                }
                let mut out = Vec::new();
                l.handle(
                    now,
                    LeaderInput::Append {
                        request: RequestId(u64::from(s.issued)),
                        entries: vec![entry.clone()],
                    },
                    &mut out,
                );
                s.issued += 1;
                s.assigned.push(entry);
                self.run(&mut s, NODES[0], out);
            }
            RepAction::Deliver(i) => {
                let (to, msg) = s.net.remove(i);
                self.deliver(&mut s, to, msg);
            }
            RepAction::Drop(i) => {
                if s.drops >= self.max_drops {
                    return None;
                }
                s.net.remove(i);
                s.drops += 1;
                s.lost = true;
            }
            RepAction::DiskDone(i) => {
                if s.nodes[i].pending.is_empty() {
                    return None;
                }
                let (io, op) = s.nodes[i].pending.remove(0);
                // With `AckBeforePersist` writes were reported as done when issued.
                let reported =
                    self.bug == RepBug::AckBeforePersist && matches!(op, DiskOp::Write(..));
                let node = &mut s.nodes[i];
                match op {
                    DiskOp::Write(pos, entries) => {
                        let end = pos as usize + entries.len();
                        if node.log.len() < end {
                            node.log.resize(end, Vec::new());
                        }
                        node.log[pos as usize..end].clone_from_slice(&entries);
                    }
                    DiskOp::Truncate(len) => node.log.truncate(len as usize),
                    DiskOp::Epoch(e) => node.fenced_epoch = Some(e),
                }
                if !reported {
                    let out = self.io_done(&mut s, i, io);
                    self.run(&mut s, NODES[i], out);
                }
            }
            RepAction::Crash(i) => {
                if s.crashes >= self.max_crashes || s.nodes[i].role.is_none() {
                    return None;
                }
                s.crashes += 1;
                s.lost = true;
                let node = &mut s.nodes[i];
                node.role = None;
                // What was not durable is gone.
                node.pending.clear();
                let _ = s.meta.apply(&Command::SetNodeLive {
                    node: NODES[i],
                    live: false,
                });
            }
            RepAction::AdvanceTime => {
                if s.now >= self.max_time {
                    return None;
                }
                s.now += 1;
            }
            RepAction::Retransmit => {
                if !s.lost || !s.net.is_empty() {
                    return None;
                }
                s.lost = false;
                let now = s.now;
                for (i, id) in NODES.into_iter().enumerate() {
                    let mut out = Vec::new();
                    match &mut s.nodes[i].role {
                        Some(Role::Leader(l)) => l.handle(now, LeaderInput::Tick, &mut out),
                        Some(Role::Follower(f)) => f.handle(FollowerInput::Tick, &mut out),
                        None => {}
                    }
                    self.run(&mut s, id, out);
                }
                if let Some(r) = &mut s.recovery {
                    let mut out = Vec::new();
                    r.handle(RecoveryInput::Tick, &mut out);
                    self.run(&mut s, COORDINATOR, out);
                }
            }
            RepAction::StartRecovery => {
                if s.recovery.is_some() {
                    return None;
                }
                let open = s.meta.topic(TOPIC)?.open_segment()?.clone();
                if open.id != SegmentId(0)
                    || !s.leases.may_choose_successor(&seg(), s.now, &self.lease)
                {
                    return None;
                }
                let mut out = Vec::new();
                s.recovery =
                    Recovery::start(COORDINATOR, seg(), open.epoch, &open.replicas, &mut out);
                self.run(&mut s, COORDINATOR, out);
            }
            RepAction::Apply(i) => {
                let cmd = s.proposals.remove(i);
                let _ = s.meta.apply(&cmd);
            }
        }
        self.sync(&mut s);
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("domain consistency", |_: &RepModel, s: &RepState| {
                s.meta.check_invariants().is_ok()
            }),
            Property::always(
                "at most one writer per segment",
                |m: &RepModel, s: &RepState| {
                    let _ = m;
                    let writers: Vec<(NodeId, Epoch)> = s
                        .nodes
                        .iter()
                        .zip(NODES)
                        .filter_map(|(n, id)| match &n.role {
                            Some(Role::Leader(l)) if l.can_append(s.now) => Some((id, l.epoch())),
                            _ => None,
                        })
                        .collect();
                    // At most one, and metadata agrees it leads the open segment at its epoch.
                    writers.len() <= 1
                        && writers.iter().all(|&(w, epoch)| {
                            let lease = Lease {
                                epoch,
                                expires_at_ms: u64::MAX,
                            };
                            may_append(&s.meta, w, &seg(), &lease, s.now).is_ok()
                        })
                },
            ),
            Property::always("no writes after seal", |_: &RepModel, s: &RepState| {
                !s.write_after_seal
            }),
            Property::always("entries in strict order", |_: &RepModel, s: &RepState| {
                s.nodes.iter().all(|n| {
                    n.log.len() <= s.assigned.len() && n.log[..] == s.assigned[..n.log.len()]
                })
            }),
            Property::always(
                "no committed entry lost when a minority crashes",
                |_: &RepModel, s: &RepState| {
                    s.acked.iter().all(|&p| {
                        let holders = Self::durable_holders(s, p);
                        let sealed_keeps = Self::sealed_len(s).is_some_and(|l| p < l);
                        // Durable on a majority, or (after recovery truncated stragglers) inside
                        // the seal and on a live replica.
                        holders.len() >= 2
                            || (sealed_keeps && holders.iter().any(|&i| s.nodes[i].role.is_some()))
                    })
                },
            ),
            Property::always(
                "a sealed segment contains every committed entry",
                |_: &RepModel, s: &RepState| match Self::sealed_len(s) {
                    Some(l) => s.acked.iter().all(|&p| p < l),
                    None => true,
                },
            ),
            Property::always(
                "every sealed entry is durable on a majority",
                |_: &RepModel, s: &RepState| match Self::sealed_len(s) {
                    // Three replicas: a majority and a fence quorum are both two. So losing
                    // any one disk later leaves a copy of every entry the seal counts.
                    Some(l) => (0..l).all(|p| Self::durable_holders(s, p).len() >= 2),
                    None => true,
                },
            ),
            Property::always(
                "sealed counts equal the data",
                |_: &RepModel, s: &RepState| {
                    let Some(l) = Self::sealed_len(s) else {
                        return true;
                    };
                    s.nodes.iter().all(|n| match &n.role {
                        Some(Role::Follower(f)) if f.is_sealed_done() => {
                            f.seal_target().is_some_and(|t| t.len == l)
                                && n.log.len() as u64 == l
                                && s.assigned.len() as u64 >= l
                                && n.log[..] == s.assigned[..l as usize]
                        }
                        _ => true,
                    })
                },
            ),
            Property::always(
                "liveness: over-full segment eventually sealed",
                |m: &RepModel, s: &RepState| {
                    !m.is_quiescent(s)
                        || (s.assigned.len() as u64) < m.max_entries
                        || Self::sealed_len(s).is_some()
                },
            ),
            Property::always(
                "liveness: writes resume after leader crash",
                |m: &RepModel, s: &RepState| {
                    !m.is_quiescent(s)
                        || s.nodes[0].role.is_some()
                        || s.meta
                            .topic(TOPIC)
                            .and_then(|t| t.open_segment())
                            .is_some_and(|o| {
                                o.id != SegmentId(0)
                                    && o.leader()
                                        .and_then(idx)
                                        .is_some_and(|i| s.nodes[i].role.is_some())
                            })
                },
            ),
            Property::always(
                "liveness: recovery brings live replicas to the seal",
                |m: &RepModel, s: &RepState| {
                    !m.is_quiescent(s)
                        || !matches!(
                            s.recovery.as_ref().map(|r| r.phase()),
                            Some(Phase::Sealing { .. }) | Some(Phase::Done { .. })
                        )
                        || s.nodes.iter().all(|n| match &n.role {
                            Some(Role::Follower(f)) => f.is_sealed_done(),
                            Some(Role::Leader(_)) => false,
                            None => true,
                        })
                },
            ),
            Property::sometimes("an entry is acknowledged", |_: &RepModel, s: &RepState| {
                !s.acked.is_empty()
            }),
            Property::sometimes(
                "recovery seals the segment",
                |_: &RepModel, s: &RepState| {
                    s.recovery
                        .as_ref()
                        .is_some_and(|r| matches!(r.phase(), Phase::Done { .. }))
                },
            ),
        ]
    }
}
