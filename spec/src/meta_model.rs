//! Model A: metadata, rollover, cursors and consumer groups, checked by driving the real
//! `walrus_core::cluster` code (`Metadata::apply`, `SealGate`, `cursor::next_shared_read`). It
//! owns only the environment (which proposal Raft applies when, crashes, readers) and must not
//! re-implement any rule of the core.
//!
//! Raft is modelled as a pool of proposals that may be applied in any order and any number of
//! times (duplicates from client retries and leader changes). Data is committed as soon as the
//! leader writes it here; replication is model B's business.

use std::collections::BTreeMap;

use stateright::{Model, Property};
use walrus_core::cluster::cursor::next_shared_read;
use walrus_core::cluster::metadata::{Command, Metadata, Outcome};
use walrus_core::cluster::rollover::{RolloverPolicy, SealGate};
use walrus_core::cluster::{Epoch, NodeId, SegmentId};

/// A deliberately broken variant, to show that the checker bites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaBug {
    /// The real thing.
    None,
    /// `Seal` ignores the segment and epoch it names and seals whatever is open (the upstream
    /// behaviour that let racing writers seal twice).
    UnconditionalSeal,
}

/// Bounds and variant of model A.
#[derive(Debug, Clone)]
pub struct MetaModel {
    /// Topics (at most [`TOPIC_NAMES`]`.len()`).
    pub topics: usize,
    /// Rollover limit per segment.
    pub max_entries: u64,
    /// Per topic: no appends once it has more than this many segments.
    pub max_segments: [usize; 2],
    /// Node crashes allowed (of three nodes).
    pub max_crashes: u8,
    /// Most entries one `GET` takes.
    pub read_batch: u64,
    /// Planted bug.
    pub bug: MetaBug,
}

/// Topic names used by the model.
pub const TOPIC_NAMES: [&str; 2] = ["t0", "t1"];
/// The cluster's nodes.
pub const NODES: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];

/// The leader-side state of one topic's open segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Writer {
    seg: SegmentId,
    epoch: Epoch,
    leader: NodeId,
    gate: SealGate,
    assigned: u64,
}

/// One state of model A.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetaState {
    /// The replicated metadata (as every node applies it).
    pub meta: Metadata,
    /// Per topic: the leader of the open segment as it sees itself.
    pub writers: Vec<Option<Writer>>,
    /// Ghost: entries actually written to each segment.
    pub data: BTreeMap<SegmentId, u64>,
    /// Proposals Raft may still apply (again).
    pub proposals: Vec<Command>,
    /// Crashed nodes so far.
    pub crashes: u8,
    /// Ghost: entries handed out by `GET` per topic.
    pub delivered: Vec<u64>,
    /// Ghost: highest group offset seen per topic.
    pub group_high: Vec<u64>,
    /// Ghost: a group offset went down.
    pub group_regressed: bool,
    /// Ghost: a write hit a sealed segment.
    pub write_after_seal: bool,
    /// Ghost: a read plan pointed at entries that do not exist.
    pub read_out_of_bounds: bool,
}

/// An action of model A.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetaAction {
    /// The leader of topic `.0` appends one entry.
    Append(usize),
    /// Raft applies proposal `.0`.
    Apply(usize),
    /// A node crashes; the failure detector marks it dead.
    Crash(NodeId),
    /// The metadata leader proposes recovery of topic `.0`'s open segment (its leader is dead).
    ProposeRecover(usize),
    /// A `GET` on topic `.0` via the shared cursor.
    Read(usize),
    /// Consumer group of topic `.0` commits offset `.1`.
    CommitGroup(usize, u64),
}

impl MetaModel {
    /// The default small bounds: 2 topics, appends until the first has 3 segments and the
    /// second 2, 1 entry per segment, 1 crash, `GET` takes all that one segment has available.
    pub fn small(bug: MetaBug) -> Self {
        MetaModel {
            topics: 2,
            max_entries: 1,
            max_segments: [2, 1],
            max_crashes: 1,
            read_batch: 10,
            bug,
        }
    }

    /// Larger bounds for `WALRUS_SPEC_BIG=1`.
    pub fn big(bug: MetaBug) -> Self {
        MetaModel {
            topics: 2,
            max_entries: 1,
            max_segments: [2, 2],
            max_crashes: 1,
            read_batch: 10,
            bug,
        }
    }

    /// Whether no action but a crash can change `s` (the bounded model's end of progress).
    pub fn is_quiescent(&self, s: &MetaState) -> bool {
        let mut acts = Vec::new();
        self.actions(s, &mut acts);
        acts.into_iter()
            .filter(|a| !matches!(a, MetaAction::Crash(_)))
            .all(|a| self.next_state(s, a).is_none())
    }

    fn policy(&self) -> RolloverPolicy {
        RolloverPolicy {
            max_entries: self.max_entries,
            max_bytes: None,
        }
    }

    /// After metadata changed: a live node named leader of a newly opened segment starts leading
    /// it (what the node shell does when it applies the command).
    fn refresh_writers(&self, s: &mut MetaState) {
        for (i, name) in TOPIC_NAMES.iter().take(self.topics).enumerate() {
            let open = s.meta.topic(name).and_then(|t| t.open_segment()).cloned();
            let current = s.writers[i].as_ref().map(|w| (w.seg, w.epoch));
            match open {
                Some(o) if current != Some((o.id, o.epoch)) => {
                    let leader = o.leader().unwrap_or_default();
                    let live = s.meta.nodes().get(&leader).is_some_and(|n| n.live);
                    s.writers[i] = live.then(|| Writer {
                        seg: o.id,
                        epoch: o.epoch,
                        leader,
                        gate: SealGate::new(self.policy()),
                        assigned: 0,
                    });
                }
                _ => {}
            }
        }
    }

    fn propose(s: &mut MetaState, cmd: Command) {
        if !s.proposals.contains(&cmd) {
            s.proposals.push(cmd);
        }
    }
}

impl Model for MetaModel {
    type State = MetaState;
    type Action = MetaAction;

    fn init_states(&self) -> Vec<MetaState> {
        let mut meta = Metadata::default();
        for n in NODES {
            // Registering three fresh nodes on empty metadata always succeeds.
            let _ = meta.apply(&Command::RegisterNode {
                node: n,
                addr: format!("n{}", n.0),
            });
        }
        for name in TOPIC_NAMES.iter().take(self.topics) {
            let _ = meta.apply(&Command::CreateTopic {
                name: name.to_string(),
            });
        }
        let mut s = MetaState {
            meta,
            writers: vec![None; self.topics],
            data: BTreeMap::new(),
            proposals: Vec::new(),
            crashes: 0,
            delivered: vec![0; self.topics],
            group_high: vec![0; self.topics],
            group_regressed: false,
            write_after_seal: false,
            read_out_of_bounds: false,
        };
        self.refresh_writers(&mut s);
        vec![s]
    }

    fn actions(&self, s: &MetaState, actions: &mut Vec<MetaAction>) {
        for (t, name) in TOPIC_NAMES.iter().enumerate().take(self.topics) {
            actions.push(MetaAction::Append(t));
            actions.push(MetaAction::ProposeRecover(t));
            actions.push(MetaAction::Read(t));
            // A group commits everything readable (and, to probe the rule, one past it and
            // one below its last commit).
            if let Some(topic) = s.meta.topic(name) {
                let end = topic.readable_end();
                actions.push(MetaAction::CommitGroup(t, end));
                actions.push(MetaAction::CommitGroup(t, end + 1));
            }
            if let Some(below) = s.group_high[t].checked_sub(1) {
                actions.push(MetaAction::CommitGroup(t, below));
            }
        }
        for i in 0..s.proposals.len() {
            actions.push(MetaAction::Apply(i));
        }
        if s.crashes < self.max_crashes {
            for n in NODES {
                actions.push(MetaAction::Crash(n));
            }
        }
    }

    fn next_state(&self, last: &MetaState, action: MetaAction) -> Option<MetaState> {
        let mut s = last.clone();
        match action {
            MetaAction::Append(t) => {
                let name = TOPIC_NAMES[t];
                let segments = s.meta.topic(name)?.segments.len();
                let w = s.writers[t].as_mut()?;
                let live = s.meta.nodes().get(&w.leader).is_some_and(|n| n.live);
                if !live || !w.gate.admits() || segments > self.max_segments[t] {
                    return None;
                }
                let sealed = s
                    .meta
                    .topic(name)?
                    .segments
                    .iter()
                    .any(|x| x.id == w.seg && !x.is_open());
                s.write_after_seal |= sealed;
                w.assigned += 1;
                *s.data.entry(w.seg).or_insert(0) += 1;
                w.gate.on_assigned(w.assigned, 0);
                let (seg, epoch, assigned) = (w.seg, w.epoch, w.assigned);
                let seal = w.gate.on_committed(assigned);
                // Raft batches the leader's commit reports: only the newest one is pending.
                s.proposals.retain(
                    |c| !matches!(c, Command::ReportCommitted { segment, .. } if *segment == seg),
                );
                Self::propose(
                    &mut s,
                    Command::ReportCommitted {
                        topic: name.into(),
                        segment: seg,
                        epoch,
                        committed: assigned,
                    },
                );
                if let Some(entries) = seal {
                    Self::propose(
                        &mut s,
                        Command::Seal {
                            topic: name.into(),
                            segment: seg,
                            epoch,
                            entries,
                        },
                    );
                }
            }
            MetaAction::Apply(i) => {
                let mut cmd = s.proposals.get(i)?.clone();
                if self.bug == MetaBug::UnconditionalSeal {
                    if let Command::Seal {
                        topic,
                        segment,
                        epoch,
                        ..
                    } = &mut cmd
                    {
                        if let Some(open) = s.meta.topic(topic).and_then(|t| t.open_segment()) {
                            *segment = open.id;
                            *epoch = open.epoch;
                        }
                    }
                }
                match s.meta.apply(&cmd) {
                    Ok(Outcome::Unchanged) | Err(_) => return None,
                    Ok(_) => {}
                }
                self.refresh_writers(&mut s);
            }
            MetaAction::Crash(n) => {
                if s.crashes >= self.max_crashes || !s.meta.nodes().get(&n)?.live {
                    return None;
                }
                s.crashes += 1;
                let _ = s.meta.apply(&Command::SetNodeLive {
                    node: n,
                    live: false,
                });
                for w in s.writers.iter_mut() {
                    if w.as_ref().is_some_and(|w| w.leader == n) {
                        *w = None;
                    }
                }
            }
            MetaAction::ProposeRecover(t) => {
                let name = TOPIC_NAMES[t];
                let open = s.meta.topic(name)?.open_segment()?.clone();
                let leader_live = open
                    .leader()
                    .and_then(|l| s.meta.nodes().get(&l))
                    .is_some_and(|n| n.live);
                if leader_live {
                    return None;
                }
                // No replication here: what was written is what survives.
                let entries = s.data.get(&open.id).copied().unwrap_or(0);
                let cmd = Command::Recover {
                    topic: name.into(),
                    segment: open.id,
                    epoch: open.epoch,
                    entries,
                };
                if s.proposals.contains(&cmd) {
                    return None;
                }
                s.proposals.push(cmd);
            }
            MetaAction::Read(t) => {
                let name = TOPIC_NAMES[t];
                let (plan, cmd) = next_shared_read(name, s.meta.topic(name)?, self.read_batch)?;
                let have = s.data.get(&plan.segment).copied().unwrap_or(0);
                s.read_out_of_bounds |= plan.position + plan.count > have;
                match s.meta.apply(&cmd) {
                    Ok(Outcome::CursorAdvanced { .. }) => s.delivered[t] += plan.count,
                    _ => return None,
                }
            }
            MetaAction::CommitGroup(t, offset) => {
                let name = TOPIC_NAMES[t];
                let cmd = Command::CommitGroup {
                    topic: name.into(),
                    group: "g".into(),
                    offset,
                };
                match s.meta.apply(&cmd) {
                    Ok(Outcome::Unchanged) | Err(_) => return None,
                    Ok(_) => {}
                }
                let now = s.meta.topic(name)?.groups.get("g").copied().unwrap_or(0);
                s.group_regressed |= now < s.group_high[t];
                s.group_high[t] = s.group_high[t].max(now);
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("domain consistency", |_: &MetaModel, s: &MetaState| {
                s.meta.check_invariants().is_ok()
            }),
            Property::always(
                "sealed counts equal the data",
                |_: &MetaModel, s: &MetaState| {
                    s.meta.topics().values().all(|t| {
                        t.segments.iter().all(|seg| match seg.sealed_entries() {
                            Some(n) => s.data.get(&seg.id).copied().unwrap_or(0) == n,
                            None => true,
                        })
                    })
                },
            ),
            Property::always("no writes after seal", |_: &MetaModel, s: &MetaState| {
                !s.write_after_seal
            }),
            Property::always("cursors within bounds", |m: &MetaModel, s: &MetaState| {
                !s.read_out_of_bounds
                    && TOPIC_NAMES.iter().take(m.topics).enumerate().all(|(i, n)| {
                        s.meta.topic(n).is_some_and(|t| {
                            let written: u64 = t
                                .segments
                                .iter()
                                .map(|x| s.data.get(&x.id).copied().unwrap_or(0))
                                .sum();
                            t.cursor == s.delivered[i] && t.readable_end() <= written
                        })
                    })
            }),
            Property::always(
                "group offsets never regress",
                |_: &MetaModel, s: &MetaState| !s.group_regressed,
            ),
            Property::always(
                "liveness: over-full segment eventually sealed",
                |m: &MetaModel, s: &MetaState| {
                    !m.is_quiescent(s)
                        || s.meta.topics().values().all(|t| {
                            t.open_segment().is_none_or(|o| {
                                s.data.get(&o.id).copied().unwrap_or(0) < m.max_entries
                            })
                        })
                },
            ),
            Property::always(
                "liveness: available entries eventually read",
                |m: &MetaModel, s: &MetaState| {
                    !m.is_quiescent(s)
                        || s.meta
                            .topics()
                            .values()
                            .all(|t| t.cursor == t.readable_end())
                },
            ),
            Property::always(
                "liveness: writes resume after leader crash",
                |m: &MetaModel, s: &MetaState| {
                    !m.is_quiescent(s)
                        || s.meta.topics().values().all(|t| {
                            t.open_segment()
                                .and_then(|o| o.leader())
                                .and_then(|l| s.meta.nodes().get(&l))
                                .is_some_and(|n| n.live)
                        })
                },
            ),
            Property::sometimes(
                "a topic reaches its segment bound",
                |m: &MetaModel, s: &MetaState| {
                    s.meta
                        .topics()
                        .values()
                        .any(|t| t.segments.len() > m.max_segments[0])
                },
            ),
            Property::sometimes("a segment is recovered", |_: &MetaModel, s: &MetaState| {
                s.meta
                    .topics()
                    .values()
                    .any(|t| t.segments.iter().any(|x| x.epoch > Epoch(0)))
            }),
        ]
    }
}
