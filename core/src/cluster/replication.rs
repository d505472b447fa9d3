//! The leader side of segment replication: assigns offsets, persists locally, sends batches to
//! followers, tracks each follower's durable length and acknowledges a client batch only once a
//! majority of the replica set holds it durably. It owns one open segment's write path and must
//! not decide anything metadata decides (it proposes the seal; it does not seal).

use std::collections::{BTreeMap, VecDeque};

use super::follower::{PendingIo, SegmentFollower};
use super::lease::Lease;
use super::metadata::Command;
use super::rollover::{RolloverPolicy, SealGate};
use super::{majority, ClientReply, Effect, Entry, Epoch, IoId, NodeId, PeerMsg, RequestId};
use super::{SegmentId, SegmentRef};
use crate::limits::{BATCH_BYTES_MAX, BATCH_ENTRIES_MAX};

/// An input to a segment leader.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeaderInput {
    /// A client wants `entries` appended.
    Append {
        /// For the reply.
        request: RequestId,
        /// The batch.
        entries: Vec<Entry>,
    },
    /// A disk operation this machine asked for completed.
    IoDone {
        /// Which one.
        io: IoId,
    },
    /// A message from a follower.
    Peer(PeerMsg),
    /// The metadata leader granted (or renewed) the lease.
    LeaseGranted(Lease),
    /// Periodic timer: retransmit to lagging followers, re-propose what may have been lost.
    Tick,
}

/// Whether the leader still leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaderState {
    /// Appending under its lease (subject to the rollover gate).
    Leading,
    /// A follower reported a newer epoch: recovery fenced this leader; it only answers refusals.
    Fenced,
}

/// The leader of one open segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SegmentLeader {
    me: NodeId,
    seg: SegmentRef,
    epoch: Epoch,
    base_offset: u64,
    followers: Vec<NodeId>,
    lease: Option<Lease>,
    gate: SealGate,
    state: LeaderState,
    assigned: u64,
    assigned_bytes: u64,
    local_durable: u64,
    pending: VecDeque<(IoId, u64, bool)>,
    follower_durable: BTreeMap<NodeId, u64>,
    /// Entries from position `buffer_start` to `assigned`, kept for retransmission until every
    /// follower holds them.
    buffer: VecDeque<Entry>,
    buffer_start: u64,
    committed: u64,
    waiting: VecDeque<(RequestId, u64, u64)>,
    next_io: u64,
}

impl SegmentLeader {
    /// A leader for a freshly opened segment whose replica set is `replicas` (`me` first).
    pub fn new(
        me: NodeId,
        seg: SegmentRef,
        epoch: Epoch,
        base_offset: u64,
        replicas: &[NodeId],
        policy: RolloverPolicy,
    ) -> Self {
        let followers: Vec<NodeId> = replicas.iter().copied().filter(|&n| n != me).collect();
        SegmentLeader {
            me,
            seg,
            epoch,
            base_offset,
            follower_durable: followers.iter().map(|&f| (f, 0)).collect(),
            followers,
            lease: None,
            gate: SealGate::new(policy),
            state: LeaderState::Leading,
            assigned: 0,
            assigned_bytes: 0,
            local_durable: 0,
            pending: VecDeque::new(),
            buffer: VecDeque::new(),
            buffer_start: 0,
            committed: 0,
            waiting: VecDeque::new(),
            next_io: 0,
        }
    }

    /// Handles one input at time `now` (ms), appending effects to `out`.
    pub fn handle(&mut self, now: u64, input: LeaderInput, out: &mut Vec<Effect>) {
        match input {
            LeaderInput::Append { request, entries } => self.append(now, request, entries, out),
            LeaderInput::IoDone { io } => {
                if let Some(p) = self.pending.iter_mut().find(|p| p.0 == io) {
                    p.2 = true;
                }
                // Completions may arrive out of order; the durable length is the done prefix.
                while let Some(&(_, end, true)) = self.pending.front() {
                    self.local_durable = self.local_durable.max(end);
                    self.pending.pop_front();
                }
                self.advance_commit(out);
            }
            LeaderInput::Peer(msg) => self.peer(msg, out),
            LeaderInput::LeaseGranted(lease) => {
                if lease.epoch == self.epoch
                    && self
                        .lease
                        .is_none_or(|l| l.expires_at_ms < lease.expires_at_ms)
                {
                    self.lease = Some(lease);
                }
            }
            LeaderInput::Tick => self.tick(out),
        }
    }

    /// The earliest time at which the leader's behaviour changes by itself (its lease expiry).
    pub fn next_deadline(&self) -> Option<u64> {
        self.lease.map(|l| l.expires_at_ms)
    }

    /// Whether it would accept a new batch at `now` (leading, leased, gate open).
    pub fn can_append(&self, now: u64) -> bool {
        self.state == LeaderState::Leading
            && self.lease.is_some_and(|l| l.is_valid(now))
            && self.gate.admits()
    }

    /// Entries assigned offsets so far.
    pub fn assigned(&self) -> u64 {
        self.assigned
    }

    /// Entries durable on a majority of the replica set.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Entries durable locally.
    pub fn local_durable(&self) -> u64 {
        self.local_durable
    }

    /// The segment's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The segment led.
    pub fn seg(&self) -> &SegmentRef {
        &self.seg
    }

    /// Leading or fenced.
    pub fn state(&self) -> LeaderState {
        self.state
    }

    /// Steps down (recovery is fencing this segment): refuses every waiting client batch (its
    /// outcome is unknown to the client, which retries; delivery is at-least-once) and turns
    /// into a follower that keeps the local log and in-flight disk writes.
    pub fn step_down(mut self, out: &mut Vec<Effect>) -> SegmentFollower {
        self.fence(out);
        let pending = self
            .pending
            .iter()
            .map(|&(io, end, done)| PendingIo::append(io, end, done))
            .collect();
        SegmentFollower::from_leader(
            self.me,
            self.seg,
            self.me,
            self.epoch,
            self.assigned,
            self.local_durable,
            pending,
            self.next_io,
        )
    }

    fn append(&mut self, now: u64, request: RequestId, entries: Vec<Entry>, out: &mut Vec<Effect>) {
        let reply = |reply| Effect::Reply { request, reply };
        if self.state != LeaderState::Leading || !self.lease.is_some_and(|l| l.is_valid(now)) {
            out.push(reply(ClientReply::NotLeader));
            return;
        }
        let bytes: u64 = entries.iter().map(|e| e.len() as u64).sum();
        if entries.is_empty() || entries.len() > BATCH_ENTRIES_MAX || bytes > BATCH_BYTES_MAX as u64
        {
            out.push(reply(ClientReply::BadBatch));
            return;
        }
        if !self.gate.admits() {
            out.push(reply(ClientReply::SegmentFull));
            return;
        }
        let pos = self.assigned;
        let end = match pos
            .checked_add(entries.len() as u64)
            .filter(|&e| self.base_offset.checked_add(e).is_some())
        {
            Some(e) => e,
            None => {
                out.push(reply(ClientReply::BadBatch));
                return;
            }
        };
        self.assigned = end;
        self.assigned_bytes = self.assigned_bytes.saturating_add(bytes);
        self.gate.on_assigned(self.assigned, self.assigned_bytes);
        let io = self.io();
        self.pending.push_back((io, end, false));
        self.waiting.push_back((request, pos, end));
        self.buffer.extend(entries.iter().cloned());
        out.push(Effect::Persist {
            io,
            seg: self.seg.clone(),
            pos,
            entries: entries.clone(),
        });
        for &f in &self.followers {
            out.push(Effect::Send {
                to: f,
                msg: PeerMsg::Append {
                    seg: self.seg.clone(),
                    epoch: self.epoch,
                    pos,
                    entries: entries.clone(),
                    committed: self.committed,
                },
            });
        }
        // A single-replica segment commits on the local persist alone.
        self.advance_commit(out);
    }

    fn peer(&mut self, msg: PeerMsg, out: &mut Vec<Effect>) {
        match msg {
            PeerMsg::AppendAck {
                epoch,
                from,
                durable,
                ..
            } if epoch == self.epoch && self.state == LeaderState::Leading => {
                if let Some(d) = self.follower_durable.get_mut(&from) {
                    // A follower cannot hold more than was assigned; clamp a confused report.
                    *d = (*d).max(durable.min(self.assigned));
                }
                self.trim_buffer();
                self.advance_commit(out);
            }
            PeerMsg::AppendNack {
                epoch,
                from,
                expected,
                ..
            } => {
                if epoch > self.epoch {
                    self.fence(out);
                } else if epoch == self.epoch && self.state == LeaderState::Leading {
                    self.send_from(from, expected, out);
                }
            }
            _ => {}
        }
    }

    fn tick(&mut self, out: &mut Vec<Effect>) {
        if self.state != LeaderState::Leading {
            return;
        }
        for f in self.followers.clone() {
            let d = self.follower_durable.get(&f).copied().unwrap_or(0);
            if d < self.assigned {
                self.send_from(f, d, out);
            }
        }
        // Re-reported on every tick, not only when it grew: a proposal may be lost (metadata
        // leader change, partition), and `ReportCommitted` is monotone and idempotent, so a
        // repeat is harmless while a lost one would leave readers below committed data.
        if self.committed > 0 {
            out.push(Effect::Propose(Command::ReportCommitted {
                topic: self.seg.topic.clone(),
                segment: self.seg.segment,
                epoch: self.epoch,
                committed: self.committed,
            }));
        }
        // The seal proposal may have been lost with a metadata leader change; repeating it is
        // harmless because `Seal` is conditional and idempotent.
        if let super::rollover::GateState::SealProposed { entries } = self.gate.state() {
            out.push(Effect::Propose(self.seal_command(entries)));
        }
    }

    fn send_from(&self, to: NodeId, from: u64, out: &mut Vec<Effect>) {
        if from < self.buffer_start || from >= self.assigned {
            return;
        }
        let skip = (from - self.buffer_start) as usize;
        let entries: Vec<Entry> = self.buffer.iter().skip(skip).cloned().collect();
        out.push(Effect::Send {
            to,
            msg: PeerMsg::Append {
                seg: self.seg.clone(),
                epoch: self.epoch,
                pos: from,
                entries,
                committed: self.committed,
            },
        });
    }

    fn advance_commit(&mut self, out: &mut Vec<Effect>) {
        if self.state != LeaderState::Leading {
            return;
        }
        let mut lens: Vec<u64> = self.follower_durable.values().copied().collect();
        lens.push(self.local_durable);
        lens.sort_unstable_by(|a, b| b.cmp(a));
        let quorum = majority(lens.len());
        // lens is non-empty (it holds the leader's own length), so quorum is in 1..=len.
        let committed = lens.get(quorum - 1).copied().unwrap_or(0);
        if committed <= self.committed {
            return;
        }
        self.committed = committed;
        while let Some(&(request, pos, end)) = self.waiting.front() {
            if end > committed {
                break;
            }
            self.waiting.pop_front();
            out.push(Effect::Reply {
                request,
                reply: ClientReply::Appended {
                    first: self.base_offset + pos,
                    count: end - pos,
                },
            });
        }
        if let Some(entries) = self.gate.on_committed(committed) {
            out.push(Effect::Propose(self.seal_command(entries)));
        }
    }

    fn seal_command(&self, entries: u64) -> Command {
        Command::Seal {
            topic: self.seg.topic.clone(),
            segment: self.seg.segment,
            epoch: self.epoch,
            entries,
        }
    }

    fn fence(&mut self, out: &mut Vec<Effect>) {
        if self.state == LeaderState::Fenced {
            return;
        }
        self.state = LeaderState::Fenced;
        for (request, _, _) in self.waiting.drain(..) {
            out.push(Effect::Reply {
                request,
                reply: ClientReply::NotLeader,
            });
        }
    }

    fn trim_buffer(&mut self) {
        let min = self
            .follower_durable
            .values()
            .copied()
            .min()
            .unwrap_or(self.assigned);
        while self.buffer_start < min && !self.buffer.is_empty() {
            self.buffer.pop_front();
            self.buffer_start += 1;
        }
    }

    fn io(&mut self) -> IoId {
        let io = IoId(self.next_io);
        self.next_io = self.next_io.wrapping_add(1);
        io
    }
}

/// Convenience for tests and models: the segment reference of `(topic, id)`.
pub fn seg_ref(topic: &str, id: u64) -> SegmentRef {
    SegmentRef {
        topic: topic.to_string(),
        segment: SegmentId(id),
    }
}

#[cfg(test)]
mod tests;
