//! Recovery of a segment whose leader is gone, as run by the metadata leader: fence the old
//! epoch on the replicas, collect the durable lengths of a fence quorum (enough replicas to meet
//! every majority; see `fence_quorum`), choose the longest (which includes every committed
//! entry), copy it to enough fenced replicas (`Phase::Copying`), only then propose sealing there,
//! and finally drive every replica to exactly that length. It must only be started once the old
//! lease can no longer be valid (see `lease::LeaseTable`), and it never writes metadata itself:
//! it proposes `Recover`.
//!
//! Why the longest of a fence quorum: a committed entry is durable on a majority, which meets
//! every fence quorum, so at least one fenced replica holds it. Fencing first guarantees no entry can
//! become committed at the old epoch after the lengths were collected.
//!
//! Why copy before proposing: the longest length may include entries that were never
//! acknowledged and that only one replica (often the old leader) holds. Sealed, they are part
//! of the segment for good; if that one replica then lost its disk, the segment would have
//! entries nobody holds and its readers would stop there forever. So the entries up to the
//! chosen length are first made durable on a majority of the replicas (as durable as an
//! acknowledged entry), or, if only a fence quorum of replicas answers for a long while (the
//! copy patience: in the node, the time after which a node counts as gone), on a fence quorum
//! (fewer than a majority only for an even number of replicas). A copy that makes
//! no progress (its donor died, say) starts the fencing over: lengths are collected again and a
//! new length chosen, which is safe since nothing was proposed yet.

use std::collections::{BTreeMap, BTreeSet};

use super::metadata::Command;
use super::{majority, Effect, Epoch, NodeId, PeerMsg, SegmentRef};

/// Replicas a recovery must fence: enough to meet every write quorum (a majority), so that
/// one of them holds each acknowledged entry and no new write can be acknowledged; that is
/// `n - majority(n) + 1`. Fewer than a majority when `n` is even: of 2 replicas (a segment
/// opened while only 2 nodes were live), every write needed both, so one survivor suffices.
pub fn fence_quorum(n: usize) -> usize {
    (n + 1).saturating_sub(majority(n)).min(n)
}

/// Coordinator ticks a recovery spends in `Phase::Copying` (over all its rounds of fencing),
/// by default, waiting for a majority of the replicas to hold the chosen length before it
/// settles for a fence quorum (`Recovery::with_copy_patience` sets it).
pub const COPY_PATIENCE_TICKS: u32 = 2;

/// Coordinator ticks without reaching enough copies after which a recovery fences again.
pub const COPY_STALL_TICKS: u32 = 8;

/// An input to a recovery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecoveryInput {
    /// A replica's answer.
    Peer(PeerMsg),
    /// Metadata shows the segment sealed at `entries` (by this recovery's `Recover`, or by the
    /// old leader's `Seal` that won the race).
    SegmentSealed {
        /// The sealed count.
        entries: u64,
    },
    /// Replica `from` answered the fence that it holds nothing of the segment (it lost its
    /// disk since the segment opened): it neither counts in the fence quorum nor can it hold
    /// a copy, so the copies need not wait for it.
    Lost {
        /// The replica.
        from: NodeId,
    },
    /// Periodic timer: retransmit whatever the current phase waits for.
    Tick,
}

/// Where a recovery is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waiting for a fence quorum of `FenceAck`s.
    Fencing,
    /// Chose `len` (the longest of a fence quorum); copying it from `donor` to fenced replicas
    /// that hold less, until enough hold it durably (`Recovery::copies_needed`).
    Copying {
        /// The length to seal at.
        len: u64,
        /// A replica holding `len` entries.
        donor: NodeId,
        /// Ticks spent in this phase.
        ticks: u32,
    },
    /// `Recover { entries: len }` proposed; waiting for metadata to seal.
    Proposed {
        /// Proposed seal length.
        len: u64,
        /// A replica holding `len` entries.
        donor: NodeId,
    },
    /// Sealed at `len`; bringing every replica to exactly `len`.
    Sealing {
        /// The sealed length.
        len: u64,
        /// A replica holding it.
        donor: NodeId,
        /// Replicas that reported `SealDone`.
        done: BTreeSet<NodeId>,
    },
    /// Every replica holds exactly the sealed length.
    Done {
        /// The sealed length.
        len: u64,
    },
}

/// One segment recovery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recovery {
    me: NodeId,
    seg: SegmentRef,
    old_epoch: Epoch,
    new_epoch: Epoch,
    replicas: Vec<NodeId>,
    fenced: BTreeMap<NodeId, u64>,
    phase: Phase,
    /// Ticks spent in `Phase::Copying`, over every round of fencing.
    copy_ticks: u32,
    /// `copy_ticks` after which a fence quorum of copies suffices.
    copy_patience: u32,
    /// Replicas that answered that they lost the segment.
    lost: BTreeSet<NodeId>,
}

impl Recovery {
    /// Starts recovering `seg`, open at `old_epoch` with `replicas`, coordinated by `me`.
    /// Returns `None` if the epoch cannot be bumped (`u64::MAX`).
    pub fn start(
        me: NodeId,
        seg: SegmentRef,
        old_epoch: Epoch,
        replicas: &[NodeId],
        out: &mut Vec<Effect>,
    ) -> Option<Recovery> {
        let new_epoch = Epoch(old_epoch.0.checked_add(1)?);
        let r = Recovery {
            me,
            seg,
            old_epoch,
            new_epoch,
            replicas: replicas.to_vec(),
            fenced: BTreeMap::new(),
            phase: Phase::Fencing,
            copy_ticks: 0,
            copy_patience: COPY_PATIENCE_TICKS,
            lost: BTreeSet::new(),
        };
        r.send_fences(out);
        Some(r)
    }

    /// Waits `ticks` ticks of copying (rather than `COPY_PATIENCE_TICKS`) for a majority of
    /// the replicas before settling for a fence quorum. This only matters for an even number
    /// of replicas, where a fence quorum is less than a majority: a 2-replica segment whose
    /// other replica is away seals on one copy only after this long.
    pub fn with_copy_patience(mut self, ticks: u32) -> Recovery {
        self.copy_patience = ticks;
        self
    }

    /// Handles one input, appending effects to `out`.
    pub fn handle(&mut self, input: RecoveryInput, out: &mut Vec<Effect>) {
        match input {
            RecoveryInput::Peer(PeerMsg::FenceAck {
                epoch, from, len, ..
            }) if epoch == self.new_epoch && self.replicas.contains(&from) => {
                self.held(from, len);
                if self.phase == Phase::Fencing
                    && self.fenced.len() >= fence_quorum(self.replicas.len())
                {
                    // The fenced map is non-empty here (the fence quorum of a non-empty set is
                    // at least 1).
                    let (len, donor) = self
                        .fenced
                        .iter()
                        .map(|(&n, &l)| (l, n))
                        // Longest first; on a tie the lowest node id, for determinism.
                        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
                        .unwrap_or((0, self.me));
                    self.phase = Phase::Copying {
                        len,
                        donor,
                        ticks: 0,
                    };
                    self.drive_copies(out);
                } else if let Phase::Copying { len: want, .. } = self.phase {
                    // A replica fenced late: it may complete the copies, or take one.
                    if !self.enough_copies(out) && len < want {
                        self.send_copy(from, out);
                    }
                }
            }
            RecoveryInput::Peer(PeerMsg::Copied {
                epoch, from, len, ..
            }) if epoch == self.new_epoch && self.replicas.contains(&from) => {
                if self.fenced.contains_key(&from) {
                    self.held(from, len);
                    self.enough_copies(out);
                }
            }
            RecoveryInput::Peer(PeerMsg::SealDone {
                epoch, from, len, ..
            }) if epoch == self.new_epoch => {
                if let Phase::Sealing {
                    len: want, done, ..
                } = &mut self.phase
                {
                    if len == *want && self.replicas.contains(&from) {
                        done.insert(from);
                        if done.len() == self.replicas.len() {
                            self.phase = Phase::Done { len };
                        }
                    }
                }
            }
            RecoveryInput::Peer(_) => {}
            RecoveryInput::Lost { from } => {
                if self.replicas.contains(&from) && !self.fenced.contains_key(&from) {
                    self.lost.insert(from);
                    self.enough_copies(out);
                }
            }
            RecoveryInput::SegmentSealed { entries } => {
                if let Phase::Proposed { donor, .. } | Phase::Copying { donor, .. } = self.phase {
                    // If the old leader's own seal won (before or after the copies), it sealed
                    // no more than was committed, which the longest fenced replica (the donor)
                    // holds.
                    self.phase = Phase::Sealing {
                        len: entries,
                        donor,
                        done: BTreeSet::new(),
                    };
                    self.copy_ticks = 0;
                    self.send_seals(out);
                }
            }
            RecoveryInput::Tick => match &mut self.phase {
                Phase::Fencing => self.send_fences(out),
                Phase::Copying { ticks, .. } => {
                    *ticks += 1;
                    // Counted up to the patience only: past it nothing reads the count, and an
                    // unbounded count would make every retransmission a new state for the
                    // model checker.
                    if self.copy_ticks < self.copy_patience {
                        self.copy_ticks += 1;
                    }
                    if *ticks >= COPY_STALL_TICKS {
                        // No progress: fence again and choose afresh from what the replicas
                        // hold now (a donor that died no longer answers; copies made so far
                        // count in the new lengths).
                        self.fenced.clear();
                        self.phase = Phase::Fencing;
                        self.send_fences(out);
                    } else {
                        self.drive_copies(out);
                    }
                }
                Phase::Proposed { len, .. } => {
                    let len = *len;
                    out.push(self.proposal(len))
                }
                Phase::Sealing { donor, done, .. } => {
                    // The donor may have crashed; any replica that reported `SealDone` holds
                    // exactly the sealed entries and can serve the stragglers instead.
                    if !done.contains(donor) {
                        if let Some(&d) = done.iter().next() {
                            if let Phase::Sealing { donor, .. } = &mut self.phase {
                                *donor = d;
                            }
                        }
                    }
                    self.send_seals(out)
                }
                Phase::Done { .. } => {}
            },
        }
    }

    /// The current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The replicas that answered the fence, with the entries each holds durably (as far as
    /// this recovery knows: copies count once reported).
    pub fn fenced(&self) -> &BTreeMap<NodeId, u64> {
        &self.fenced
    }

    /// The epoch this recovery fences with.
    pub fn new_epoch(&self) -> Epoch {
        self.new_epoch
    }

    /// The segment.
    pub fn seg(&self) -> &SegmentRef {
        &self.seg
    }

    /// How many replicas must hold the chosen length durably before it is proposed: a
    /// majority (or all of those that did not lose the segment, if fewer), never less than a
    /// fence quorum; once the copy patience ran out a fence quorum (which a recovery can always
    /// reach when it could fence at all).
    pub fn copies_needed(&self) -> usize {
        let n = self.replicas.len();
        if self.copy_ticks >= self.copy_patience {
            fence_quorum(n)
        } else {
            // Replicas that lost the segment can take no copy: a majority of the others.
            majority(n)
                .min(n.saturating_sub(self.lost.len()))
                .max(fence_quorum(n))
        }
    }

    /// Records that fenced replica `from` durably holds `len` entries (lengths of a fenced
    /// replica only grow: the old leader can no longer write to it).
    fn held(&mut self, from: NodeId, len: u64) {
        self.lost.remove(&from);
        let l = self.fenced.entry(from).or_default();
        *l = (*l).max(len);
    }

    /// In `Copying`: proposes (and returns `true`) once enough fenced replicas hold the chosen
    /// length.
    fn enough_copies(&mut self, out: &mut Vec<Effect>) -> bool {
        let Phase::Copying { len, donor, .. } = self.phase else {
            return false;
        };
        let holders = self.fenced.values().filter(|&&l| l >= len).count();
        if holders < self.copies_needed() {
            return false;
        }
        self.phase = Phase::Proposed { len, donor };
        // Only copying reads it: forgetting it keeps the states after it few.
        self.copy_ticks = 0;
        out.push(self.proposal(len));
        true
    }

    /// In `Copying`: proposes if enough replicas hold the chosen length; otherwise asks every
    /// fenced replica that holds less to copy it, and keeps fencing the others (which may then
    /// take a copy too).
    fn drive_copies(&mut self, out: &mut Vec<Effect>) {
        let Phase::Copying { len, .. } = self.phase else {
            return;
        };
        if self.enough_copies(out) {
            return;
        }
        let short: Vec<NodeId> = self
            .fenced
            .iter()
            .filter(|&(_, &l)| l < len)
            .map(|(&n, _)| n)
            .collect();
        for to in short {
            self.send_copy(to, out);
        }
        self.send_fences(out);
    }

    fn send_copy(&self, to: NodeId, out: &mut Vec<Effect>) {
        let Phase::Copying { len, donor, .. } = self.phase else {
            return;
        };
        out.push(Effect::Send {
            to,
            msg: PeerMsg::CopyTo {
                seg: self.seg.clone(),
                epoch: self.new_epoch,
                len,
                donor,
                coordinator: self.me,
            },
        });
    }

    fn proposal(&self, len: u64) -> Effect {
        Effect::Propose(Command::Recover {
            topic: self.seg.topic.clone(),
            segment: self.seg.segment,
            epoch: self.old_epoch,
            entries: len,
        })
    }

    fn send_fences(&self, out: &mut Vec<Effect>) {
        for &to in &self.replicas {
            if !self.fenced.contains_key(&to) {
                out.push(Effect::Send {
                    to,
                    msg: PeerMsg::Fence {
                        seg: self.seg.clone(),
                        epoch: self.new_epoch,
                        coordinator: self.me,
                    },
                });
            }
        }
    }

    fn send_seals(&self, out: &mut Vec<Effect>) {
        let Phase::Sealing { len, donor, done } = &self.phase else {
            return;
        };
        for &to in &self.replicas {
            if !done.contains(&to) {
                out.push(Effect::Send {
                    to,
                    msg: PeerMsg::SealAt {
                        seg: self.seg.clone(),
                        epoch: self.new_epoch,
                        len: *len,
                        donor: *donor,
                        coordinator: self.me,
                    },
                });
            }
        }
    }
}
