//! Recovery of a segment whose leader is gone, as run by the metadata leader: fence the old
//! epoch on the replicas, collect the durable lengths of a fence quorum (enough replicas to meet
//! every majority; see `fence_quorum`), propose sealing at the longest
//! (which includes every committed entry), then drive every replica to exactly that length. It
//! must only be started once the old lease can no longer be valid (see `lease::LeaseTable`), and
//! it never writes metadata itself: it proposes `Recover`.
//!
//! Why the longest of a fence quorum: a committed entry is durable on a majority, which meets
//! every fence quorum, so at least one fenced replica holds it. Fencing first guarantees no entry can
//! become committed at the old epoch after the lengths were collected.

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
    /// Periodic timer: retransmit whatever the current phase waits for.
    Tick,
}

/// Where a recovery is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waiting for a fence quorum of `FenceAck`s.
    Fencing,
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
        };
        r.send_fences(out);
        Some(r)
    }

    /// Handles one input, appending effects to `out`.
    pub fn handle(&mut self, input: RecoveryInput, out: &mut Vec<Effect>) {
        match input {
            RecoveryInput::Peer(PeerMsg::FenceAck {
                epoch, from, len, ..
            }) if epoch == self.new_epoch && self.replicas.contains(&from) => {
                self.fenced.insert(from, len);
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
                    self.phase = Phase::Proposed { len, donor };
                    out.push(self.proposal(len));
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
            RecoveryInput::SegmentSealed { entries } => {
                if let Phase::Proposed { donor, .. } = self.phase {
                    // If the old leader's own seal won, it sealed no more than was committed,
                    // which the longest fenced replica (the donor) holds.
                    self.phase = Phase::Sealing {
                        len: entries,
                        donor,
                        done: BTreeSet::new(),
                    };
                    self.send_seals(out);
                }
            }
            RecoveryInput::Tick => match &self.phase {
                Phase::Fencing => self.send_fences(out),
                Phase::Proposed { len, .. } => out.push(self.proposal(*len)),
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

    /// The epoch this recovery fences with.
    pub fn new_epoch(&self) -> Epoch {
        self.new_epoch
    }

    /// The segment.
    pub fn seg(&self) -> &SegmentRef {
        &self.seg
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
