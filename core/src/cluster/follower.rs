//! The follower side of segment replication, and a replica's part in recovery: accept only the
//! current epoch and contiguous positions, acknowledge only what is durable, obey fencing, and
//! bring the local log to exactly the sealed length. It owns one replica of one segment and must
//! not choose seal lengths or leaders (the recovery coordinator and metadata do).

use std::collections::{BTreeMap, VecDeque};

use super::{Effect, Entry, Epoch, IoId, NodeId, PeerMsg, SegmentRef};

/// An input to a follower replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FollowerInput {
    /// A message from the leader, the coordinator or another replica.
    Peer(PeerMsg),
    /// A disk write, truncate or epoch record completed.
    IoDone {
        /// Which one.
        io: IoId,
    },
    /// A `ReadLog` completed.
    ReadDone {
        /// Which one.
        io: IoId,
        /// The entries read.
        entries: Vec<Entry>,
    },
    /// Periodic timer: re-drive a seal in progress.
    Tick,
}

/// A disk operation in flight, in issue order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PendingIo {
    io: IoId,
    kind: IoKind,
    done: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IoKind {
    Append { end: u64 },
    Truncate { len: u64 },
    Epoch { coordinator: Option<NodeId> },
}

impl PendingIo {
    /// An in-flight append that ends at `end` (used when a leader steps down).
    pub fn append(io: IoId, end: u64, done: bool) -> Self {
        PendingIo {
            io,
            kind: IoKind::Append { end },
            done,
        }
    }
}

/// Where a replica stands with the seal of its segment (or, before the seal, with a
/// recovery's copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SealTarget {
    /// The sealed length (or the length to copy).
    pub len: u64,
    /// `true` once metadata sealed at `len` (`SealAt`: reach exactly `len`, cutting what lies
    /// past it); `false` for a recovery's `CopyTo` (hold at least `len`, cut nothing).
    pub sealed: bool,
    /// Who holds it.
    pub donor: NodeId,
    /// Who to tell.
    pub coordinator: NodeId,
}

/// One follower replica of one segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SegmentFollower {
    me: NodeId,
    seg: SegmentRef,
    leader: NodeId,
    epoch: Epoch,
    /// Set once a coordinator moved us to a recovery epoch: no leader may append any more.
    fenced: bool,
    /// The epoch durably recorded (what a restart would come back with).
    durable_epoch_done: bool,
    received: u64,
    durable: u64,
    pending: VecDeque<PendingIo>,
    reads: BTreeMap<IoId, (NodeId, u64)>,
    seal: Option<SealTarget>,
    next_io: u64,
}

impl SegmentFollower {
    /// A follower of a freshly opened segment led by `leader` at `epoch`.
    pub fn new(me: NodeId, seg: SegmentRef, leader: NodeId, epoch: Epoch) -> Self {
        SegmentFollower {
            me,
            seg,
            leader,
            epoch,
            fenced: false,
            durable_epoch_done: true,
            received: 0,
            durable: 0,
            pending: VecDeque::new(),
            reads: BTreeMap::new(),
            seal: None,
            next_io: 0,
        }
    }

    /// A replica rebuilt after a restart from what its disk holds: `len` entries and, if it was
    /// ever fenced, the recorded fence epoch (which keeps refusing the old leader).
    pub fn restore(
        me: NodeId,
        seg: SegmentRef,
        leader: NodeId,
        open_epoch: Epoch,
        fenced_epoch: Option<Epoch>,
        len: u64,
    ) -> Self {
        let mut f = SegmentFollower::new(me, seg, leader, fenced_epoch.unwrap_or(open_epoch));
        f.fenced = fenced_epoch.is_some();
        f.received = len;
        f.durable = len;
        f
    }

    #[allow(clippy::too_many_arguments)] // internal hand-over of one leader's whole state
    pub(crate) fn from_leader(
        me: NodeId,
        seg: SegmentRef,
        leader: NodeId,
        epoch: Epoch,
        received: u64,
        durable: u64,
        pending: VecDeque<PendingIo>,
        next_io: u64,
    ) -> Self {
        let mut f = SegmentFollower::new(me, seg, leader, epoch);
        f.received = received;
        f.durable = durable;
        f.pending = pending;
        f.next_io = next_io;
        f
    }

    /// Handles one input, appending effects to `out`.
    pub fn handle(&mut self, input: FollowerInput, out: &mut Vec<Effect>) {
        match input {
            FollowerInput::Peer(msg) => self.peer(msg, out),
            FollowerInput::IoDone { io } => self.io_done(io, out),
            FollowerInput::ReadDone { io, entries } => {
                if let Some((to, pos)) = self.reads.remove(&io) {
                    out.push(Effect::Send {
                        to,
                        msg: PeerMsg::TailData {
                            seg: self.seg.clone(),
                            epoch: self.epoch,
                            pos,
                            entries,
                        },
                    });
                }
            }
            FollowerInput::Tick => self.drive_seal(out),
        }
    }

    /// Current epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Whether a coordinator fenced this replica.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Entries accepted (maybe not yet durable).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Entries durable.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The seal this replica is converging to, if any.
    pub fn seal_target(&self) -> Option<SealTarget> {
        self.seal
    }

    /// Whether the replica durably holds exactly its sealed length with nothing in flight.
    pub fn is_sealed_done(&self) -> bool {
        self.seal.is_some_and(|s| {
            s.sealed && self.durable == s.len && self.received == s.len && self.pending.is_empty()
        })
    }

    fn peer(&mut self, msg: PeerMsg, out: &mut Vec<Effect>) {
        match msg {
            PeerMsg::Append {
                epoch,
                pos,
                entries,
                ..
            } => self.append(epoch, pos, entries, out),
            PeerMsg::Fence {
                epoch, coordinator, ..
            } => {
                if epoch > self.epoch || (epoch == self.epoch && !self.fenced) {
                    self.adopt(epoch, Some(coordinator), out);
                } else if epoch == self.epoch && self.durable_epoch_done {
                    // A retransmitted fence: answer again.
                    out.push(self.fence_ack(coordinator));
                }
            }
            PeerMsg::SealAt {
                epoch,
                len,
                donor,
                coordinator,
                ..
            } => {
                if epoch < self.epoch {
                    return;
                }
                if epoch > self.epoch || !self.fenced {
                    self.adopt(epoch, None, out);
                }
                self.seal = Some(SealTarget {
                    len,
                    sealed: true,
                    donor,
                    coordinator,
                });
                self.drive_seal(out);
            }
            PeerMsg::CopyTo {
                epoch,
                len,
                donor,
                coordinator,
                ..
            } => {
                // Only a replica fenced at this recovery's epoch copies (the old leader can no
                // longer add to it), and a seal, once known, decides instead.
                if epoch != self.epoch
                    || !self.fenced
                    || !self.durable_epoch_done
                    || self.seal.is_some_and(|t| t.sealed)
                {
                    return;
                }
                self.seal = Some(SealTarget {
                    len,
                    sealed: false,
                    donor,
                    coordinator,
                });
                self.drive_seal(out);
            }
            PeerMsg::FetchTail {
                epoch,
                from,
                upto,
                requester,
                ..
            } => {
                // Only serve replicas of the same recovery, and only what is durable here.
                if epoch != self.epoch || !self.fenced {
                    return;
                }
                let end = upto.min(self.durable);
                if from < end {
                    let io = self.io();
                    self.reads.insert(io, (requester, from));
                    out.push(Effect::ReadLog {
                        io,
                        seg: self.seg.clone(),
                        pos: from,
                        count: end - from,
                    });
                }
            }
            PeerMsg::TailData {
                epoch,
                pos,
                entries,
                ..
            } => {
                let Some(target) = self.seal else { return };
                if epoch != self.epoch || pos > self.received || self.received >= target.len {
                    return;
                }
                let skip = (self.received - pos) as usize;
                let room = (target.len - self.received) as usize;
                let new: Vec<Entry> = entries.into_iter().skip(skip).take(room).collect();
                self.persist(new, out);
            }
            _ => {}
        }
    }

    fn append(&mut self, epoch: Epoch, pos: u64, entries: Vec<Entry>, out: &mut Vec<Effect>) {
        if self.fenced || epoch != self.epoch {
            // A stale (or unknown) leader: tell it our epoch so it steps down.
            out.push(self.nack());
            return;
        }
        if pos > self.received {
            // A gap: entries must be contiguous; ask for what we miss.
            out.push(self.nack());
            return;
        }
        let end = pos.saturating_add(entries.len() as u64);
        if end <= self.received {
            // Entirely a retransmission: repeat what is durable.
            out.push(self.ack());
            return;
        }
        let skip = (self.received - pos) as usize;
        self.persist(entries.into_iter().skip(skip).collect(), out);
    }

    fn persist(&mut self, entries: Vec<Entry>, out: &mut Vec<Effect>) {
        if entries.is_empty() {
            return;
        }
        let pos = self.received;
        self.received += entries.len() as u64;
        let io = self.io();
        self.pending.push_back(PendingIo {
            io,
            kind: IoKind::Append { end: self.received },
            done: false,
        });
        out.push(Effect::Persist {
            io,
            seg: self.seg.clone(),
            pos,
            entries,
        });
    }

    fn adopt(&mut self, epoch: Epoch, coordinator: Option<NodeId>, out: &mut Vec<Effect>) {
        self.epoch = epoch;
        self.fenced = true;
        self.durable_epoch_done = false;
        let io = self.io();
        self.pending.push_back(PendingIo {
            io,
            kind: IoKind::Epoch { coordinator },
            done: false,
        });
        out.push(Effect::PersistEpoch {
            io,
            seg: self.seg.clone(),
            epoch,
        });
    }

    fn io_done(&mut self, io: IoId, out: &mut Vec<Effect>) {
        if let Some(p) = self.pending.iter_mut().find(|p| p.io == io) {
            p.done = true;
        }
        let mut acked = false;
        // Completions may arrive out of order; only the done prefix counts as durable, so an
        // acknowledgement never covers an entry whose write has not completed.
        while self.pending.front().is_some_and(|p| p.done) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            match p.kind {
                IoKind::Append { end } => {
                    self.durable = self.durable.max(end);
                    acked = true;
                }
                IoKind::Truncate { len } => self.durable = len,
                IoKind::Epoch { coordinator } => {
                    self.durable_epoch_done = true;
                    if let Some(c) = coordinator {
                        out.push(self.fence_ack(c));
                    }
                }
            }
        }
        if acked && !self.fenced {
            out.push(self.ack());
        }
        if self.seal.is_some() {
            self.drive_seal(out);
        }
    }

    fn drive_seal(&mut self, out: &mut Vec<Effect>) {
        let Some(target) = self.seal else { return };
        if !self.durable_epoch_done {
            return;
        }
        if !target.sealed {
            // A copy: fetch up to `len` and report once it is durable; cut nothing.
            if self.received < target.len {
                self.fetch_tail(target, out);
            } else if self.durable >= target.len {
                out.push(Effect::Send {
                    to: target.coordinator,
                    msg: PeerMsg::Copied {
                        seg: self.seg.clone(),
                        epoch: self.epoch,
                        from: self.me,
                        len: self.durable,
                    },
                });
            }
        } else if self.received > target.len {
            // Entries past the seal were never committed (the seal includes every committed
            // entry), so cutting them loses nothing acknowledged.
            self.received = target.len;
            let io = self.io();
            self.pending.push_back(PendingIo {
                io,
                kind: IoKind::Truncate { len: target.len },
                done: false,
            });
            out.push(Effect::Truncate {
                io,
                seg: self.seg.clone(),
                len: target.len,
            });
        } else if self.received < target.len {
            self.fetch_tail(target, out);
        } else if self.is_sealed_done() {
            out.push(Effect::Send {
                to: target.coordinator,
                msg: PeerMsg::SealDone {
                    seg: self.seg.clone(),
                    epoch: self.epoch,
                    from: self.me,
                    len: target.len,
                },
            });
        }
    }

    fn fetch_tail(&self, target: SealTarget, out: &mut Vec<Effect>) {
        if target.donor != self.me {
            out.push(Effect::Send {
                to: target.donor,
                msg: PeerMsg::FetchTail {
                    seg: self.seg.clone(),
                    epoch: self.epoch,
                    from: self.received,
                    upto: target.len,
                    requester: self.me,
                },
            });
        }
    }

    fn ack(&self) -> Effect {
        Effect::Send {
            to: self.leader,
            msg: PeerMsg::AppendAck {
                seg: self.seg.clone(),
                epoch: self.epoch,
                from: self.me,
                durable: self.durable,
            },
        }
    }

    fn nack(&self) -> Effect {
        Effect::Send {
            to: self.leader,
            msg: PeerMsg::AppendNack {
                seg: self.seg.clone(),
                epoch: self.epoch,
                from: self.me,
                expected: self.received,
            },
        }
    }

    fn fence_ack(&self, coordinator: NodeId) -> Effect {
        Effect::Send {
            to: coordinator,
            msg: PeerMsg::FenceAck {
                seg: self.seg.clone(),
                epoch: self.epoch,
                from: self.me,
                len: self.durable,
            },
        }
    }

    fn io(&mut self) -> IoId {
        let io = IoId(self.next_io);
        self.next_io = self.next_io.wrapping_add(1);
        io
    }
}
