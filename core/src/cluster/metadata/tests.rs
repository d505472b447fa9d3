//! Unit tests and proptests of the metadata state machine and its encodings.

use super::*;
use proptest::prelude::*;

fn cluster(n: u64) -> Metadata {
    let mut m = Metadata::default();
    for i in 1..=n {
        m.apply(&Command::RegisterNode {
            node: NodeId(i),
            addr: format!("10.0.0.{i}:7000"),
        })
        .unwrap();
    }
    m
}

fn create(m: &mut Metadata, name: &str) -> Outcome {
    m.apply(&Command::CreateTopic { name: name.into() })
        .unwrap()
}

fn seal(topic: &str, segment: u64, epoch: u64, entries: u64) -> Command {
    Command::Seal {
        topic: topic.into(),
        segment: SegmentId(segment),
        epoch: Epoch(epoch),
        entries,
    }
}

fn report(topic: &str, segment: u64, epoch: u64, committed: u64) -> Command {
    Command::ReportCommitted {
        topic: topic.into(),
        segment: SegmentId(segment),
        epoch: Epoch(epoch),
        committed,
    }
}

#[test]
fn move_replica_only_on_sealed_segments_and_idempotent() {
    let mut m = cluster(4);
    create(&mut m, "logs");
    let mv = |from: u64, to: u64| Command::MoveReplica {
        topic: "logs".into(),
        segment: SegmentId(0),
        from: NodeId(from),
        to: NodeId(to),
    };
    // Open: refused, nothing changes.
    assert_eq!(m.apply(&mv(2, 4)), Err(Rejection::BadMove));
    m.apply(&seal("logs", 0, 0, 5)).unwrap();
    assert_eq!(m.apply(&mv(2, 4)), Ok(Outcome::ReplicaMoved));
    let seg = &m.topic("logs").unwrap().segments[0];
    assert_eq!(seg.replicas, vec![NodeId(1), NodeId(4), NodeId(3)]);
    assert_eq!(seg.sealed_entries(), Some(5));
    // A repeat (the end state already holds) is a no-op; a move onto an existing replica or
    // from a node that is not one is refused.
    assert_eq!(m.apply(&mv(2, 4)), Ok(Outcome::Unchanged));
    assert_eq!(m.apply(&mv(1, 3)), Err(Rejection::BadMove));
    assert_eq!(m.apply(&mv(2, 2)), Err(Rejection::BadMove));
    assert_eq!(m.apply(&mv(1, 9)), Err(Rejection::UnknownNode));
    m.check_invariants().unwrap();
}

#[test]
fn create_topic_is_idempotent_and_places_three_replicas() {
    let mut m = cluster(4);
    assert_eq!(
        create(&mut m, "logs"),
        Outcome::TopicCreated {
            segment: SegmentId(0),
            leader: NodeId(1)
        }
    );
    assert_eq!(create(&mut m, "logs"), Outcome::Unchanged);
    let t = m.topic("logs").unwrap();
    assert_eq!(t.segments.len(), 1);
    assert_eq!(
        t.segments[0].replicas,
        vec![NodeId(1), NodeId(2), NodeId(3)]
    );
    // The second topic's first leader is spread to the next node.
    assert_eq!(
        create(&mut m, "metrics"),
        Outcome::TopicCreated {
            segment: SegmentId(1),
            leader: NodeId(2)
        }
    );
    assert_eq!(
        m.apply(&Command::CreateTopic { name: "a/b".into() }),
        Err(Rejection::BadTopicName(TopicNameError::BadChar('/')))
    );
}

#[test]
fn create_topic_needs_a_live_node() {
    let mut m = Metadata::default();
    assert_eq!(
        m.apply(&Command::CreateTopic { name: "t".into() }),
        Err(Rejection::NoLiveNodes)
    );
}

#[test]
fn seal_applies_once_and_rolls_to_next_leader() {
    let mut m = cluster(3);
    create(&mut m, "t");
    m.apply(&report("t", 0, 0, 5)).unwrap();
    assert_eq!(
        m.apply(&seal("t", 0, 0, 5)),
        Ok(Outcome::Sealed {
            next: SegmentId(1),
            leader: NodeId(2),
            base_offset: 5
        })
    );
    // The same proposal again (a Raft retry) changes nothing.
    assert_eq!(m.apply(&seal("t", 0, 0, 5)), Ok(Outcome::Unchanged));
    // A concurrent proposal with another count cannot seal it again, nor the new segment.
    assert_eq!(
        m.apply(&seal("t", 0, 0, 7)),
        Err(Rejection::NotOpen {
            segment: SegmentId(0),
            open: SegmentId(1)
        })
    );
    let t = m.topic("t").unwrap();
    assert_eq!(t.segments.len(), 2);
    assert_eq!(t.segments[0].sealed_entries(), Some(5));
    assert_eq!(
        t.segments[1].replicas,
        vec![NodeId(2), NodeId(3), NodeId(1)]
    );
    assert!(m.check_invariants().is_ok());
}

#[test]
fn seal_at_wrong_epoch_or_below_committed_is_refused() {
    let mut m = cluster(3);
    create(&mut m, "t");
    m.apply(&report("t", 0, 0, 4)).unwrap();
    assert_eq!(
        m.apply(&seal("t", 0, 1, 4)),
        Err(Rejection::EpochMismatch {
            given: Epoch(1),
            current: Epoch(0)
        })
    );
    assert_eq!(
        m.apply(&seal("t", 0, 0, 3)),
        Err(Rejection::WouldLoseCommitted {
            entries: 3,
            committed: 4
        })
    );
    assert_eq!(
        m.apply(&seal("nope", 0, 0, 3)),
        Err(Rejection::UnknownTopic)
    );
}

#[test]
fn recover_bumps_epoch_and_moves_leadership_off_the_dead_node() {
    let mut m = cluster(3);
    create(&mut m, "t");
    m.apply(&Command::SetNodeLive {
        node: NodeId(1),
        live: false,
    })
    .unwrap();
    let rec = Command::Recover {
        topic: "t".into(),
        segment: SegmentId(0),
        epoch: Epoch(0),
        entries: 2,
    };
    assert_eq!(
        m.apply(&rec),
        Ok(Outcome::Recovered {
            epoch: Epoch(1),
            next: SegmentId(1),
            leader: NodeId(2)
        })
    );
    assert_eq!(m.apply(&rec), Ok(Outcome::Unchanged));
    // The dead leader's late seal proposal is refused.
    assert!(m.apply(&seal("t", 0, 0, 9)).is_err());
    let t = m.topic("t").unwrap();
    assert_eq!(t.segments[0].epoch, Epoch(1));
    assert_eq!(t.segments[1].replicas, vec![NodeId(2), NodeId(3)]);
    assert_eq!(t.segments[1].base_offset, 2);
}

#[test]
fn cursor_is_compare_and_set_and_bounded_by_committed_end() {
    let mut m = cluster(1);
    create(&mut m, "t");
    let adv = |from, to| Command::AdvanceCursor {
        topic: "t".into(),
        from,
        to,
    };
    assert_eq!(
        m.apply(&adv(0, 1)),
        Err(Rejection::PastEnd { offset: 1, end: 0 })
    );
    m.apply(&report("t", 0, 0, 3)).unwrap();
    assert_eq!(
        m.apply(&adv(0, 2)),
        Ok(Outcome::CursorAdvanced { from: 0, to: 2 })
    );
    assert_eq!(
        m.apply(&adv(0, 3)),
        Err(Rejection::CursorMoved { current: 2 })
    );
    assert_eq!(
        m.apply(&adv(2, 1)),
        Err(Rejection::Regress {
            offset: 1,
            current: 2
        })
    );
}

#[test]
fn group_offsets_never_regress_nor_pass_the_end() {
    let mut m = cluster(1);
    create(&mut m, "t");
    m.apply(&report("t", 0, 0, 10)).unwrap();
    let commit = |offset| Command::CommitGroup {
        topic: "t".into(),
        group: "g".into(),
        offset,
    };
    assert_eq!(m.apply(&commit(4)), Ok(Outcome::GroupCommitted));
    assert_eq!(
        m.apply(&commit(3)),
        Err(Rejection::Regress {
            offset: 3,
            current: 4
        })
    );
    assert_eq!(
        m.apply(&commit(11)),
        Err(Rejection::PastEnd {
            offset: 11,
            end: 10
        })
    );
    assert_eq!(m.apply(&commit(4)), Ok(Outcome::Unchanged));
    assert_eq!(
        m.apply(&Command::CommitGroup {
            topic: "t".into(),
            group: String::new(),
            offset: 5
        }),
        Err(Rejection::BadGroupName)
    );
}

#[test]
fn overflowing_offsets_are_rejected() {
    let mut m = cluster(1);
    create(&mut m, "t");
    m.apply(&seal("t", 0, 0, u64::MAX)).unwrap();
    assert_eq!(m.apply(&report("t", 1, 0, 1)), Err(Rejection::Overflow));
    assert_eq!(m.apply(&seal("t", 1, 0, 1)), Err(Rejection::Overflow));
    assert!(m.check_invariants().is_ok());
}

#[test]
fn delete_topic_then_recreate_uses_fresh_segment_ids() {
    let mut m = cluster(2);
    create(&mut m, "t");
    assert_eq!(
        m.apply(&Command::DeleteTopic { name: "t".into() }),
        Ok(Outcome::TopicDeleted)
    );
    assert_eq!(
        m.apply(&Command::DeleteTopic { name: "t".into() }),
        Err(Rejection::UnknownTopic)
    );
    create(&mut m, "t");
    assert_eq!(m.topic("t").unwrap().segments[0].id, SegmentId(1));
}

#[test]
fn register_node_limits_address_length() {
    let mut m = Metadata::default();
    assert_eq!(
        m.apply(&Command::RegisterNode {
            node: NodeId(1),
            addr: "x".repeat(NODE_ADDR_LEN_MAX_BYTES + 1)
        }),
        Err(Rejection::AddrTooLong)
    );
    assert_eq!(
        m.apply(&Command::SetNodeLive {
            node: NodeId(1),
            live: true
        }),
        Err(Rejection::UnknownNode)
    );
}

#[test]
fn a_rejoin_records_the_next_segment_id_once_per_incarnation() {
    let mut m = cluster(3);
    assert_eq!(m.rejoin_of(NodeId(2)), None);
    create(&mut m, "t");
    let first = m.next_segment_id();
    let rejoin = |incarnation| Command::Rejoin {
        node: NodeId(2),
        incarnation,
    };
    assert_eq!(
        m.apply(&rejoin(7)),
        Ok(Outcome::Rejoined { first_new: first })
    );
    m.apply(&seal("t", 0, 0, 2)).unwrap();
    assert!(m.next_segment_id() > first);
    // A retried proposal of the same process changes nothing: its bound stays the first.
    assert_eq!(m.apply(&rejoin(7)), Ok(Outcome::Unchanged));
    assert_eq!(
        m.rejoin_of(NodeId(2)),
        Some(Rejoin {
            incarnation: 7,
            first_new: first
        })
    );
    // A later process (wiped again) gets the bound of its own announcement.
    let now = m.next_segment_id();
    assert_eq!(
        m.apply(&rejoin(8)),
        Ok(Outcome::Rejoined { first_new: now })
    );
    let bytes = m.encode_snapshot();
    assert_eq!(Metadata::decode_snapshot(&bytes).unwrap(), m);
}

#[test]
fn snapshot_round_trips_and_rejects_bad_versions() {
    let mut m = cluster(3);
    create(&mut m, "t");
    m.apply(&report("t", 0, 0, 2)).unwrap();
    m.apply(&seal("t", 0, 0, 2)).unwrap();
    let bytes = m.encode_snapshot();
    assert_eq!(Metadata::decode_snapshot(&bytes).unwrap(), m);
    let mut bad = bytes.clone();
    bad[0] = 9;
    assert!(matches!(
        Metadata::decode_snapshot(&bad),
        Err(DecodeError::Version(9))
    ));
    assert!(matches!(
        Metadata::decode_snapshot(&bytes[..2]),
        Err(DecodeError::TooShort)
    ));
    let mut trailing = bytes;
    trailing.push(0);
    assert!(matches!(
        Metadata::decode_snapshot(&trailing),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn snapshot_with_broken_invariant_is_refused() {
    let mut m = cluster(1);
    create(&mut m, "t");
    m.topics.get_mut("t").unwrap().cursor = 5;
    assert!(matches!(
        Metadata::decode_snapshot(&m.encode_snapshot()),
        Err(DecodeError::Invalid(_))
    ));
}

// ---- proptests ----

fn arb_command() -> impl Strategy<Value = Command> {
    let topic = prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("".to_string())
    ];
    let small = 0u64..6;
    prop_oneof![
        (1u64..5).prop_map(|n| Command::RegisterNode {
            node: NodeId(n),
            addr: format!("h{n}")
        }),
        (1u64..5, 0u64..3).prop_map(|(n, incarnation)| Command::Rejoin {
            node: NodeId(n),
            incarnation
        }),
        (1u64..5, any::<bool>()).prop_map(|(n, live)| Command::SetNodeLive {
            node: NodeId(n),
            live
        }),
        topic.clone().prop_map(|name| Command::CreateTopic { name }),
        topic.clone().prop_map(|name| Command::DeleteTopic { name }),
        (topic.clone(), small.clone(), 0u64..3, 0u64..8).prop_map(|(topic, s, e, n)| {
            Command::Seal {
                topic,
                segment: SegmentId(s),
                epoch: Epoch(e),
                entries: n,
            }
        }),
        (topic.clone(), small.clone(), 0u64..3, 0u64..8).prop_map(|(topic, s, e, n)| {
            Command::Recover {
                topic,
                segment: SegmentId(s),
                epoch: Epoch(e),
                entries: n,
            }
        }),
        (topic.clone(), small.clone(), 0u64..3, 0u64..8).prop_map(|(topic, s, e, n)| {
            Command::ReportCommitted {
                topic,
                segment: SegmentId(s),
                epoch: Epoch(e),
                committed: n,
            }
        }),
        (topic.clone(), 0u64..20, 0u64..20).prop_map(|(topic, from, to)| Command::AdvanceCursor {
            topic,
            from,
            to
        }),
        (topic.clone(), small.clone(), 1u64..5, 1u64..5).prop_map(|(topic, s, f, t)| {
            Command::MoveReplica {
                topic,
                segment: SegmentId(s),
                from: NodeId(f),
                to: NodeId(t),
            }
        }),
        (topic, 0u64..20).prop_map(|(topic, offset)| Command::CommitGroup {
            topic,
            group: "g".into(),
            offset
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(s, n)| Command::Seal {
            topic: "a".into(),
            segment: SegmentId(s % 4),
            epoch: Epoch(0),
            entries: n
        }),
    ]
}

proptest! {
    /// Random command sequences: apply never panics, rejections change nothing, every
    /// invariant holds after every step, sealed counts never change, cursors and groups never
    /// regress.
    #[test]
    fn apply_is_total_and_keeps_invariants(cmds in proptest::collection::vec(arb_command(), 0..80)) {
        let mut m = Metadata::default();
        for cmd in &cmds {
            let before = m.clone();
            match m.apply(cmd) {
                Err(_) => prop_assert_eq!(&m, &before),
                Ok(Outcome::Unchanged) => prop_assert_eq!(&m, &before),
                Ok(_) => {}
            }
            prop_assert_eq!(m.check_invariants(), Ok(()));
            for (name, t0) in before.topics() {
                let Some(t1) = m.topic(name) else { continue };
                if t1.segments.first().map(|s| s.id) != t0.segments.first().map(|s| s.id) {
                    continue; // deleted and recreated
                }
                prop_assert!(t1.cursor >= t0.cursor);
                for (g, off) in &t0.groups {
                    prop_assert!(t1.groups.get(g).copied().unwrap_or(0) >= *off);
                }
                for (s0, s1) in t0.segments.iter().zip(&t1.segments) {
                    prop_assert_eq!(s0.id, s1.id);
                    if let Some(n) = s0.sealed_entries() {
                        prop_assert_eq!(s1.sealed_entries(), Some(n));
                    }
                    prop_assert!(s1.epoch >= s0.epoch);
                    prop_assert!(s1.committed >= s0.committed);
                }
            }
        }
        let decoded = Metadata::decode_snapshot(&m.encode_snapshot());
        prop_assert_eq!(decoded.ok(), Some(m));
    }

    /// Concurrent seal proposals for one segment (every writer that saw it full) in any order:
    /// exactly one applies.
    #[test]
    fn racing_seals_apply_exactly_once(counts in proptest::collection::vec(0u64..10, 1..9)) {
        let mut m = cluster(3);
        create(&mut m, "t");
        let applied = counts
            .iter()
            .filter(|&&n| matches!(m.apply(&seal("t", 0, 0, n)), Ok(Outcome::Sealed { .. })))
            .count();
        prop_assert_eq!(applied, 1);
        prop_assert_eq!(m.topic("t").unwrap().segments[0].sealed_entries(), Some(counts[0]));
        prop_assert_eq!(m.topic("t").unwrap().segments.len(), 2);
    }

    #[test]
    fn snapshot_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Metadata::decode_snapshot(&bytes);
        let mut v = SNAPSHOT_FORMAT_VERSION.to_le_bytes().to_vec();
        v.extend_from_slice(&bytes);
        if let Ok(m) = Metadata::decode_snapshot(&v) {
            prop_assert_eq!(m.check_invariants(), Ok(()));
        }
    }

    #[test]
    fn command_round_trips_and_decoder_never_panics(
        cmd in arb_command(),
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        prop_assert_eq!(Command::decode(&cmd.encode()).ok(), Some(cmd));
        let _ = Command::decode(&bytes);
        let mut v = SNAPSHOT_FORMAT_VERSION.to_le_bytes().to_vec();
        v.extend_from_slice(&bytes);
        let _ = Command::decode(&v);
    }
}

#[test]
fn huge_length_prefix_does_not_allocate() {
    // A string length of 2^62 must be refused by the limit, not attempted.
    let mut v = SNAPSHOT_FORMAT_VERSION.to_le_bytes().to_vec();
    v.extend_from_slice(&2u32.to_le_bytes()); // variant CreateTopic
    v.extend_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(matches!(
        Command::decode(&v),
        Err(DecodeError::Malformed(_))
    ));
}
