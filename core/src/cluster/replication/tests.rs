//! Tests of the leader, follower and recovery machines: exact effects for the main paths, and a
//! proptest that drives a three-replica segment through random deliveries, losses and disk
//! completions, checking the replication invariants after every step.

use super::*;
use crate::cluster::follower::{FollowerInput, SegmentFollower};
use crate::cluster::recovery::{
    Phase, Recovery, RecoveryInput, COPY_PATIENCE_TICKS, COPY_STALL_TICKS,
};
use crate::cluster::rollover::RolloverPolicy;
use proptest::prelude::*;

const N1: NodeId = NodeId(1);
const N2: NodeId = NodeId(2);
const N3: NodeId = NodeId(3);

fn seg() -> SegmentRef {
    seg_ref("t", 0)
}

fn policy(max: u64) -> RolloverPolicy {
    RolloverPolicy {
        max_entries: max,
        max_bytes: None,
    }
}

fn leader(max: u64) -> SegmentLeader {
    let mut l = SegmentLeader::new(N1, seg(), Epoch(0), 100, &[N1, N2, N3], policy(max));
    let mut out = Vec::new();
    l.handle(
        0,
        LeaderInput::LeaseGranted(Lease {
            epoch: Epoch(0),
            expires_at_ms: 1_000,
        }),
        &mut out,
    );
    assert!(out.is_empty());
    l
}

fn ack(from: NodeId, durable: u64) -> LeaderInput {
    LeaderInput::Peer(PeerMsg::AppendAck {
        seg: seg(),
        epoch: Epoch(0),
        from,
        durable,
    })
}

fn append_msg(pos: u64, entries: &[&[u8]], committed: u64) -> PeerMsg {
    PeerMsg::Append {
        seg: seg(),
        epoch: Epoch(0),
        pos,
        entries: entries.iter().map(|e| e.to_vec()).collect(),
        committed,
    }
}

#[test]
fn leader_acks_only_after_a_durable_majority() {
    let mut l = leader(10);
    let mut out = Vec::new();
    l.handle(
        5,
        LeaderInput::Append {
            request: RequestId(7),
            entries: vec![b"a".to_vec(), b"b".to_vec()],
        },
        &mut out,
    );
    assert_eq!(
        out,
        vec![
            Effect::Persist {
                io: IoId(0),
                seg: seg(),
                pos: 0,
                entries: vec![b"a".to_vec(), b"b".to_vec()]
            },
            Effect::Send {
                to: N2,
                msg: append_msg(0, &[b"a", b"b"], 0)
            },
            Effect::Send {
                to: N3,
                msg: append_msg(0, &[b"a", b"b"], 0)
            },
        ]
    );
    out.clear();
    // A follower's ack alone is one of three: not a majority.
    l.handle(6, ack(N2, 2), &mut out);
    assert_eq!(out, vec![]);
    // The leader's own persist makes two of three.
    l.handle(7, LeaderInput::IoDone { io: IoId(0) }, &mut out);
    assert_eq!(
        out,
        vec![Effect::Reply {
            request: RequestId(7),
            reply: ClientReply::Appended {
                first: 100,
                count: 2
            }
        }]
    );
    assert_eq!(l.committed(), 2);
}

#[test]
fn leader_refuses_without_lease_and_when_full() {
    let mut l = SegmentLeader::new(N1, seg(), Epoch(0), 0, &[N1], policy(2));
    let mut out = Vec::new();
    let app = |r| LeaderInput::Append {
        request: RequestId(r),
        entries: vec![b"x".to_vec()],
    };
    l.handle(0, app(1), &mut out);
    assert_eq!(
        out,
        vec![Effect::Reply {
            request: RequestId(1),
            reply: ClientReply::NotLeader
        }]
    );
    out.clear();
    l.handle(
        0,
        LeaderInput::LeaseGranted(Lease {
            epoch: Epoch(0),
            expires_at_ms: 50,
        }),
        &mut out,
    );
    l.handle(
        1,
        LeaderInput::Append {
            request: RequestId(2),
            entries: vec![b"x".to_vec(), b"y".to_vec()],
        },
        &mut out,
    );
    out.clear();
    // Several writers crossing the limit at once: only the first batch was admitted.
    l.handle(2, app(3), &mut out);
    l.handle(2, app(4), &mut out);
    assert_eq!(
        out,
        vec![
            Effect::Reply {
                request: RequestId(3),
                reply: ClientReply::SegmentFull
            },
            Effect::Reply {
                request: RequestId(4),
                reply: ClientReply::SegmentFull
            },
        ]
    );
    out.clear();
    // Once everything assigned is committed, exactly one seal with the exact count.
    l.handle(3, LeaderInput::IoDone { io: IoId(0) }, &mut out);
    assert_eq!(
        out,
        vec![
            Effect::Reply {
                request: RequestId(2),
                reply: ClientReply::Appended { first: 0, count: 2 }
            },
            Effect::Propose(Command::Seal {
                topic: "t".into(),
                segment: SegmentId(0),
                epoch: Epoch(0),
                entries: 2
            }),
        ]
    );
    out.clear();
    l.handle(60, app(5), &mut out);
    assert_eq!(
        out,
        vec![Effect::Reply {
            request: RequestId(5),
            reply: ClientReply::NotLeader
        }]
    );
    l.handle(
        2,
        LeaderInput::Append {
            request: RequestId(6),
            entries: vec![],
        },
        &mut out,
    );
}

#[test]
fn leader_tick_retransmits_and_reports_commit() {
    let mut l = leader(10);
    let mut out = Vec::new();
    l.handle(
        1,
        LeaderInput::Append {
            request: RequestId(1),
            entries: vec![b"a".to_vec()],
        },
        &mut out,
    );
    l.handle(2, LeaderInput::IoDone { io: IoId(0) }, &mut out);
    l.handle(3, ack(N2, 1), &mut out);
    out.clear();
    l.handle(4, LeaderInput::Tick, &mut out);
    assert_eq!(
        out,
        vec![
            Effect::Send {
                to: N3,
                msg: append_msg(0, &[b"a"], 1)
            },
            Effect::Propose(Command::ReportCommitted {
                topic: "t".into(),
                segment: SegmentId(0),
                epoch: Epoch(0),
                committed: 1
            }),
        ]
    );
}

#[test]
fn leader_steps_down_on_newer_epoch() {
    let mut l = leader(10);
    let mut out = Vec::new();
    l.handle(
        1,
        LeaderInput::Append {
            request: RequestId(9),
            entries: vec![b"a".to_vec()],
        },
        &mut out,
    );
    out.clear();
    l.handle(
        2,
        LeaderInput::Peer(PeerMsg::AppendNack {
            seg: seg(),
            epoch: Epoch(1),
            from: N2,
            expected: 0,
        }),
        &mut out,
    );
    assert_eq!(
        out,
        vec![Effect::Reply {
            request: RequestId(9),
            reply: ClientReply::NotLeader
        }]
    );
    assert_eq!(l.state(), LeaderState::Fenced);
    assert!(!l.can_append(3));
}

#[test]
fn follower_accepts_contiguous_current_epoch_and_acks_after_persist() {
    let mut f = SegmentFollower::new(N2, seg(), N1, Epoch(0));
    let mut out = Vec::new();
    f.handle(
        FollowerInput::Peer(append_msg(0, &[b"a", b"b"], 0)),
        &mut out,
    );
    assert_eq!(
        out,
        vec![Effect::Persist {
            io: IoId(0),
            seg: seg(),
            pos: 0,
            entries: vec![b"a".to_vec(), b"b".to_vec()]
        }]
    );
    out.clear();
    // A gap is refused with the expected position.
    f.handle(FollowerInput::Peer(append_msg(5, &[b"z"], 0)), &mut out);
    assert_eq!(
        out,
        vec![Effect::Send {
            to: N1,
            msg: PeerMsg::AppendNack {
                seg: seg(),
                epoch: Epoch(0),
                from: N2,
                expected: 2
            }
        }]
    );
    out.clear();
    // An overlapping retransmission persists only the new suffix.
    f.handle(
        FollowerInput::Peer(append_msg(1, &[b"b", b"c"], 0)),
        &mut out,
    );
    assert_eq!(
        out,
        vec![Effect::Persist {
            io: IoId(1),
            seg: seg(),
            pos: 2,
            entries: vec![b"c".to_vec()]
        }]
    );
    out.clear();
    // The second write completes first: nothing is acknowledged until the first one does.
    f.handle(FollowerInput::IoDone { io: IoId(1) }, &mut out);
    assert_eq!(out, vec![]);
    f.handle(FollowerInput::IoDone { io: IoId(0) }, &mut out);
    assert_eq!(
        out,
        vec![Effect::Send {
            to: N1,
            msg: PeerMsg::AppendAck {
                seg: seg(),
                epoch: Epoch(0),
                from: N2,
                durable: 3
            }
        }]
    );
}

#[test]
fn fenced_follower_rejects_the_stale_leader() {
    let mut f = SegmentFollower::new(N2, seg(), N1, Epoch(0));
    let mut out = Vec::new();
    f.handle(FollowerInput::Peer(append_msg(0, &[b"a"], 0)), &mut out);
    f.handle(
        FollowerInput::Peer(PeerMsg::Fence {
            seg: seg(),
            epoch: Epoch(1),
            coordinator: N3,
        }),
        &mut out,
    );
    out.clear();
    f.handle(FollowerInput::IoDone { io: IoId(0) }, &mut out);
    // Fenced: the append is durable but the old leader is not told.
    assert_eq!(out, vec![]);
    f.handle(FollowerInput::IoDone { io: IoId(1) }, &mut out);
    assert_eq!(
        out,
        vec![Effect::Send {
            to: N3,
            msg: PeerMsg::FenceAck {
                seg: seg(),
                epoch: Epoch(1),
                from: N2,
                len: 1
            }
        }]
    );
    out.clear();
    f.handle(FollowerInput::Peer(append_msg(1, &[b"b"], 0)), &mut out);
    assert_eq!(
        out,
        vec![Effect::Send {
            to: N1,
            msg: PeerMsg::AppendNack {
                seg: seg(),
                epoch: Epoch(1),
                from: N2,
                expected: 1
            }
        }]
    );
    // A restart from disk remembers the fence.
    let r = SegmentFollower::restore(N2, seg(), N1, Epoch(0), Some(Epoch(1)), 1);
    assert!(r.is_fenced());
    assert_eq!(r.epoch(), Epoch(1));
}

/// A replica's answer to the epoch-1 fence of `seg()`.
fn fence_ack(from: NodeId, len: u64) -> RecoveryInput {
    RecoveryInput::Peer(PeerMsg::FenceAck {
        seg: seg(),
        epoch: Epoch(1),
        from,
        len,
    })
}

/// The recovery's proposal to seal `seg()` (epoch 0) at `entries`.
fn recover_proposal(entries: u64) -> Vec<Effect> {
    vec![Effect::Propose(Command::Recover {
        topic: "t".into(),
        segment: SegmentId(0),
        epoch: Epoch(0),
        entries,
    })]
}

#[test]
fn recovery_fences_copies_the_longest_to_a_majority_then_seals() {
    let mut out = Vec::new();
    let mut rec = Recovery::start(N3, seg(), Epoch(0), &[N1, N2, N3], &mut out).unwrap();
    let fence = |to| Effect::Send {
        to,
        msg: PeerMsg::Fence {
            seg: seg(),
            epoch: Epoch(1),
            coordinator: N3,
        },
    };
    assert_eq!(out, vec![fence(N1), fence(N2), fence(N3)]);
    out.clear();
    rec.handle(fence_ack(N2, 3), &mut out);
    assert_eq!(out, vec![]);
    rec.handle(fence_ack(N3, 1), &mut out);
    // Only N2 holds entries 1 and 2 (maybe never acknowledged): before they are sealed, N3
    // copies them, and N1 is still asked to fence.
    let copy_to = PeerMsg::CopyTo {
        seg: seg(),
        epoch: Epoch(1),
        len: 3,
        donor: N2,
        coordinator: N3,
    };
    assert_eq!(
        out,
        vec![
            Effect::Send {
                to: N3,
                msg: copy_to.clone()
            },
            fence(N1)
        ]
    );
    assert!(matches!(
        rec.phase(),
        Phase::Copying {
            len: 3,
            donor: N2,
            ..
        }
    ));

    // N3 fetches the tail from the donor N2.
    let mut f3 = SegmentFollower::restore(N3, seg(), N1, Epoch(0), Some(Epoch(1)), 1);
    out.clear();
    f3.handle(FollowerInput::Peer(copy_to), &mut out);
    let fetch = PeerMsg::FetchTail {
        seg: seg(),
        epoch: Epoch(1),
        from: 1,
        upto: 3,
        requester: N3,
    };
    assert_eq!(
        out,
        vec![Effect::Send {
            to: N2,
            msg: fetch.clone()
        }]
    );
    let mut f2 = SegmentFollower::restore(N2, seg(), N1, Epoch(0), Some(Epoch(1)), 3);
    out.clear();
    f2.handle(FollowerInput::Peer(fetch), &mut out);
    assert_eq!(
        out,
        vec![Effect::ReadLog {
            io: IoId(0),
            seg: seg(),
            pos: 1,
            count: 2
        }]
    );
    out.clear();
    f2.handle(
        FollowerInput::ReadDone {
            io: IoId(0),
            entries: vec![b"b".to_vec(), b"c".to_vec()],
        },
        &mut out,
    );
    let Some(Effect::Send { msg: tail, .. }) = out.pop() else {
        panic!("expected TailData");
    };
    f3.handle(FollowerInput::Peer(tail), &mut out);
    assert_eq!(
        out,
        vec![Effect::Persist {
            io: IoId(0),
            seg: seg(),
            pos: 1,
            entries: vec![b"b".to_vec(), b"c".to_vec()]
        }]
    );
    out.clear();
    f3.handle(FollowerInput::IoDone { io: IoId(0) }, &mut out);
    let copied = PeerMsg::Copied {
        seg: seg(),
        epoch: Epoch(1),
        from: N3,
        len: 3,
    };
    assert_eq!(
        out,
        vec![Effect::Send {
            to: N3,
            msg: copied.clone()
        }]
    );
    assert!(!f3.is_sealed_done(), "a copy is not a seal");

    // Two of three replicas hold the length: only now is it proposed.
    out.clear();
    rec.handle(RecoveryInput::Peer(copied), &mut out);
    assert_eq!(out, recover_proposal(3));
    out.clear();
    rec.handle(RecoveryInput::SegmentSealed { entries: 3 }, &mut out);
    assert_eq!(out.len(), 3);
    assert!(matches!(
        rec.phase(),
        Phase::Sealing {
            len: 3,
            donor: N2,
            ..
        }
    ));
    // N3 already holds the sealed length.
    out.clear();
    f3.handle(FollowerInput::Peer(seal_at_3()), &mut out);
    assert_eq!(
        out,
        vec![Effect::Send {
            to: N3,
            msg: PeerMsg::SealDone {
                seg: seg(),
                epoch: Epoch(1),
                from: N3,
                len: 3
            }
        }]
    );
    assert!(f3.is_sealed_done());
}

#[test]
fn recovery_whose_copy_stalls_fences_again_and_chooses_afresh() {
    let mut out = Vec::new();
    let mut rec = Recovery::start(N3, seg(), Epoch(0), &[N1, N2, N3], &mut out).unwrap();
    rec.handle(fence_ack(N1, 5), &mut out);
    rec.handle(fence_ack(N2, 3), &mut out);
    assert!(matches!(
        rec.phase(),
        Phase::Copying {
            len: 5,
            donor: N1,
            ..
        }
    ));
    // The donor N1 dies (its disk with it): N2's copy never completes.
    for _ in 0..COPY_STALL_TICKS - 1 {
        out.clear();
        rec.handle(RecoveryInput::Tick, &mut out);
        assert!(out.iter().all(|e| !matches!(e, Effect::Propose(_))));
    }
    assert!(matches!(rec.phase(), Phase::Copying { .. }));
    out.clear();
    rec.handle(RecoveryInput::Tick, &mut out);
    assert_eq!(rec.phase(), &Phase::Fencing);
    assert_eq!(out.len(), 3, "fences every replica again: {out:?}");
    // N1 no longer answers; N2 and N3 do, and N2 holds the longest of them.
    out.clear();
    rec.handle(fence_ack(N2, 3), &mut out);
    rec.handle(fence_ack(N3, 3), &mut out);
    assert_eq!(out, recover_proposal(3));
}

#[test]
fn recovery_of_an_even_replica_set_waits_a_while_for_a_majority_of_copies() {
    // Four replicas: a fence quorum is two, a majority three.
    let n4 = NodeId(4);
    let mut out = Vec::new();
    let mut rec = Recovery::start(N3, seg(), Epoch(0), &[N1, N2, N3, n4], &mut out).unwrap();
    rec.handle(fence_ack(N1, 4), &mut out);
    rec.handle(fence_ack(N2, 4), &mut out);
    assert!(matches!(rec.phase(), Phase::Copying { len: 4, .. }));
    assert_eq!(rec.copies_needed(), 3);
    for _ in 0..COPY_PATIENCE_TICKS - 1 {
        out.clear();
        rec.handle(RecoveryInput::Tick, &mut out);
        assert!(out.iter().all(|e| !matches!(e, Effect::Propose(_))));
    }
    // N3 and N4 never answer: two copies (a fence quorum) have to do.
    out.clear();
    rec.handle(RecoveryInput::Tick, &mut out);
    assert_eq!(out, recover_proposal(4));
}

#[test]
fn copy_patience_counts_over_every_round_of_fencing() {
    // Two replicas, the other one away: one copy has to do, but only after the patience
    // (longer than a round: the recovery fences again meanwhile).
    let patience = 2 * COPY_STALL_TICKS + 3;
    let mut out = Vec::new();
    let mut rec = Recovery::start(N3, seg(), Epoch(0), &[N1, N2], &mut out)
        .unwrap()
        .with_copy_patience(patience);
    let mut proposed_after = None;
    for t in 1..=3 * COPY_STALL_TICKS {
        out.clear();
        if rec.phase() == &Phase::Fencing {
            rec.handle(fence_ack(N2, 4), &mut out);
        }
        if out.iter().any(|e| matches!(e, Effect::Propose(_))) {
            proposed_after = Some(t - 1);
            break;
        }
        rec.handle(RecoveryInput::Tick, &mut out);
        if out.iter().any(|e| matches!(e, Effect::Propose(_))) {
            proposed_after = Some(t);
            break;
        }
    }
    assert_eq!(proposed_after, Some(patience));
    assert_eq!(rec.phase(), &Phase::Proposed { len: 4, donor: N2 });
}

#[test]
fn a_replica_that_lost_the_segment_is_not_waited_for() {
    // Two replicas; N1 lost its disk and answers so: the survivor's copy is all there can be.
    let mut out = Vec::new();
    let mut rec = Recovery::start(N3, seg(), Epoch(0), &[N1, N2], &mut out)
        .unwrap()
        .with_copy_patience(1_000);
    rec.handle(fence_ack(N2, 4), &mut out);
    out.clear();
    rec.handle(RecoveryInput::Lost { from: N1 }, &mut out);
    assert_eq!(out, recover_proposal(4));
    // Three replicas, one lost: still two copies (a fence quorum).
    let mut rec = Recovery::start(N3, seg(), Epoch(0), &[N1, N2, N3], &mut out)
        .unwrap()
        .with_copy_patience(1_000);
    rec.handle(RecoveryInput::Lost { from: N1 }, &mut out);
    rec.handle(fence_ack(N2, 4), &mut out);
    out.clear();
    rec.handle(fence_ack(N3, 2), &mut out);
    assert!(out.iter().all(|e| !matches!(e, Effect::Propose(_))));
    assert_eq!(rec.copies_needed(), 2);
}

#[test]
fn a_seal_by_the_old_leader_ends_the_copying() {
    let mut out = Vec::new();
    let mut rec = Recovery::start(N3, seg(), Epoch(0), &[N1, N2, N3], &mut out).unwrap();
    rec.handle(fence_ack(N1, 5), &mut out);
    rec.handle(fence_ack(N2, 3), &mut out);
    out.clear();
    // The old leader's seal (at what was committed) won the race.
    rec.handle(RecoveryInput::SegmentSealed { entries: 3 }, &mut out);
    assert!(matches!(
        rec.phase(),
        Phase::Sealing {
            len: 3,
            donor: N1,
            ..
        }
    ));
    assert!(out.iter().all(|e| matches!(
        e,
        Effect::Send {
            msg: PeerMsg::SealAt { len: 3, .. },
            ..
        }
    )));
}

#[test]
fn a_replica_copies_only_once_fenced_at_the_recovery_epoch() {
    let copy_to = |epoch| {
        FollowerInput::Peer(PeerMsg::CopyTo {
            seg: seg(),
            epoch: Epoch(epoch),
            len: 3,
            donor: N2,
            coordinator: N3,
        })
    };
    let mut out = Vec::new();
    // Not fenced: the old leader could still add to it.
    let mut f = SegmentFollower::new(N1, seg(), N2, Epoch(0));
    f.handle(copy_to(1), &mut out);
    f.handle(copy_to(0), &mut out);
    assert_eq!(out, vec![]);
    assert_eq!(f.seal_target(), None);
    // Fenced at another epoch.
    let mut f = SegmentFollower::restore(N1, seg(), N2, Epoch(0), Some(Epoch(2)), 1);
    f.handle(copy_to(1), &mut out);
    assert_eq!(out, vec![]);
    // Holding more than asked: answers at once with what it holds, cuts nothing.
    let mut f = SegmentFollower::restore(N1, seg(), N2, Epoch(0), Some(Epoch(1)), 4);
    f.handle(copy_to(1), &mut out);
    assert_eq!(
        out,
        vec![Effect::Send {
            to: N3,
            msg: PeerMsg::Copied {
                seg: seg(),
                epoch: Epoch(1),
                from: N1,
                len: 4
            }
        }]
    );
}

/// The epoch-1 recovery's `SealAt` of `seg()` at 3 entries, donor N2, coordinator N3.
fn seal_at_3() -> PeerMsg {
    PeerMsg::SealAt {
        seg: seg(),
        epoch: Epoch(1),
        len: 3,
        donor: N2,
        coordinator: N3,
    }
}

#[test]
fn survivor_with_uncommitted_tail_truncates_to_the_seal() {
    let mut f = SegmentFollower::restore(N1, seg(), N1, Epoch(0), Some(Epoch(1)), 5);
    let mut out = Vec::new();
    f.handle(FollowerInput::Peer(seal_at_3()), &mut out);
    assert_eq!(
        out,
        vec![Effect::Truncate {
            io: IoId(0),
            seg: seg(),
            len: 3
        }]
    );
}

// ---- proptest: a whole segment with random scheduling ----

#[derive(Debug, Clone)]
enum Step {
    Append(u8),
    Deliver(usize),
    Drop(usize),
    Io(usize),
    Tick,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        any::<u8>().prop_map(Step::Append),
        any::<usize>().prop_map(Step::Deliver),
        any::<usize>().prop_map(Step::Drop),
        any::<usize>().prop_map(Step::Io),
        Just(Step::Tick),
    ]
}

struct Sim {
    leader: SegmentLeader,
    followers: BTreeMap<NodeId, SegmentFollower>,
    /// Per node: durable log and in-flight writes (completing in any order per node).
    disk: BTreeMap<NodeId, Vec<Entry>>,
    inflight: Vec<(NodeId, IoId, u64, Vec<Entry>)>,
    net: Vec<(NodeId, PeerMsg)>,
    acked: Vec<Entry>,
    assigned: Vec<Entry>,
}

impl Sim {
    fn run(&mut self, from: NodeId, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Persist {
                    io, pos, entries, ..
                } => self.inflight.push((from, io, pos, entries)),
                Effect::Send { to, msg } => self.net.push((to, msg)),
                Effect::Reply {
                    reply: ClientReply::Appended { first, count },
                    ..
                } => {
                    for o in first..first + count {
                        self.acked.push(self.assigned[o as usize].clone());
                    }
                }
                _ => {}
            }
        }
    }
}

proptest! {
    #[test]
    fn replication_invariants_hold_under_random_schedules(
        steps in proptest::collection::vec(arb_step(), 0..150)
    ) {
        let mut sim = Sim {
            leader: SegmentLeader::new(N1, seg(), Epoch(0), 0, &[N1, N2, N3], policy(1_000)),
            followers: [N2, N3]
                .into_iter()
                .map(|n| (n, SegmentFollower::new(n, seg(), N1, Epoch(0))))
                .collect(),
            disk: [N1, N2, N3].into_iter().map(|n| (n, Vec::new())).collect(),
            inflight: Vec::new(),
            net: Vec::new(),
            acked: Vec::new(),
            assigned: Vec::new(),
        };
        let mut out = Vec::new();
        sim.leader.handle(0, LeaderInput::LeaseGranted(Lease { epoch: Epoch(0), expires_at_ms: u64::MAX }), &mut out);
        for step in steps {
            let mut out = Vec::new();
            let mut from = N1;
            match step {
                Step::Append(b) => {
                    let before = sim.leader.assigned();
                    sim.leader.handle(1, LeaderInput::Append { request: RequestId(b as u64), entries: vec![vec![b]] }, &mut out);
                    if sim.leader.assigned() > before { sim.assigned.push(vec![b]); }
                }
                Step::Deliver(i) if !sim.net.is_empty() => {
                    let (to, msg) = sim.net.remove(i % sim.net.len());
                    from = to;
                    if to == N1 {
                        sim.leader.handle(1, LeaderInput::Peer(msg), &mut out);
                    } else if let Some(f) = sim.followers.get_mut(&to) {
                        f.handle(FollowerInput::Peer(msg), &mut out);
                    }
                }
                Step::Drop(i) if !sim.net.is_empty() => { sim.net.remove(i % sim.net.len()); }
                Step::Io(i) if !sim.inflight.is_empty() => {
                    let (node, io, pos, entries) = sim.inflight.remove(i % sim.inflight.len());
                    from = node;
                    let log = sim.disk.get_mut(&node).unwrap();
                    // Out-of-order completion: writes beyond the current end land later; we
                    // model the file as positional.
                    let end = pos as usize + entries.len();
                    if log.len() < end { log.resize(end, Vec::new()); }
                    log[pos as usize..end].clone_from_slice(&entries);
                    if node == N1 {
                        sim.leader.handle(1, LeaderInput::IoDone { io }, &mut out);
                    } else {
                        sim.followers.get_mut(&node).unwrap().handle(FollowerInput::IoDone { io }, &mut out);
                    }
                }
                Step::Tick => sim.leader.handle(1, LeaderInput::Tick, &mut out),
                _ => {}
            }
            sim.run(from, out);
            // Durable prefixes agree with the assigned order (strict order, no holes counted).
            let durable = |n: NodeId| -> u64 {
                if n == N1 { sim.leader.local_durable() } else { sim.followers[&n].durable() }
            };
            for n in [N1, N2, N3] {
                let d = durable(n) as usize;
                prop_assert!(d <= sim.assigned.len());
                prop_assert_eq!(&sim.disk[&n][..d], &sim.assigned[..d]);
            }
            // Every acknowledged entry is durable on a majority; committed never exceeds it.
            let mut lens: Vec<u64> = [N1, N2, N3].iter().map(|&n| durable(n)).collect();
            lens.sort_unstable();
            prop_assert!(sim.leader.committed() <= lens[1]);
            prop_assert!(sim.acked.len() as u64 <= sim.leader.committed());
            prop_assert_eq!(&sim.acked[..], &sim.assigned[..sim.acked.len()]);
        }
    }
}

#[test]
fn fence_quorum_meets_every_majority() {
    use crate::cluster::majority;
    use crate::cluster::recovery::fence_quorum;
    assert_eq!(
        (1..=6).map(fence_quorum).collect::<Vec<_>>(),
        vec![1, 1, 2, 2, 3, 3]
    );
    assert_eq!(fence_quorum(0), 0);
    for n in 1..=9 {
        // Every write quorum meets every fence quorum, and the fence leaves no write quorum
        // unfenced.
        assert!(fence_quorum(n) + majority(n) > n, "n={n}");
        assert!(fence_quorum(n) <= majority(n), "n={n}");
    }
}

#[test]
fn recovery_of_a_two_replica_segment_needs_only_the_survivor() {
    // Opened while only two nodes were live: each write needed both replicas, so the
    // survivor alone holds every acknowledged entry once its leader is gone.
    let mut out = Vec::new();
    let mut rec = Recovery::start(N3, seg(), Epoch(0), &[N1, N2], &mut out).unwrap();
    out.clear();
    rec.handle(fence_ack(N2, 4), &mut out);
    // It waits a little for the other replica (both would hold the seal) ...
    assert!(out.iter().all(|e| !matches!(e, Effect::Propose(_))));
    for _ in 0..COPY_PATIENCE_TICKS {
        out.clear();
        rec.handle(RecoveryInput::Tick, &mut out);
    }
    // ... then seals from the survivor alone.
    assert_eq!(out, recover_proposal(4));
}
