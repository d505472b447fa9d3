//! Read planning over a topic's segment chain: the shared `GET` cursor, stateless reads by
//! offset and consumer-group reads. It owns the bounds (never past a sealed count, never past the
//! committed end of the open segment) and must not move any cursor itself: moving the shared
//! cursor is the metadata command it returns, applied in Raft order.

use super::metadata::{Command, SegmentMeta, TopicMeta};
use super::{NodeId, SegmentId};

/// Most entries one read plan covers.
pub const READ_ENTRIES_MAX: u64 = 10_000;

/// Which entries to fetch, from which replicas. Always within one segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReadPlan {
    /// The segment holding them.
    pub segment: SegmentId,
    /// Replicas that may serve it (any replica if sealed; only the leader, first, if open).
    pub replicas: Vec<NodeId>,
    /// Whether the segment is sealed.
    pub sealed: bool,
    /// Topic-wide offset of the first entry.
    pub first_offset: u64,
    /// Position of the first entry within the segment.
    pub position: u64,
    /// How many entries (at least 1).
    pub count: u64,
}

/// Plans a stateless read of up to `max` entries starting at topic-wide `offset`. `None` when
/// nothing committed is at `offset` yet (or `max` is 0). The plan never crosses a segment end.
pub fn plan_read(t: &TopicMeta, offset: u64, max: u64) -> Option<ReadPlan> {
    let max = max.min(READ_ENTRIES_MAX);
    if max == 0 || offset >= t.readable_end() {
        return None;
    }
    // Segments are sorted by base offset; the one holding `offset` is the last whose base is
    // <= offset among those that are non-empty.
    let idx = t.segments.partition_point(|s| s.base_offset <= offset);
    let seg = t.segments[..idx]
        .iter()
        .rev()
        .find(|s| offset < s.base_offset.saturating_add(readable_len(s)))?;
    let position = offset - seg.base_offset;
    let count = (readable_len(seg) - position).min(max);
    Some(ReadPlan {
        segment: seg.id,
        replicas: if seg.is_open() {
            seg.leader().into_iter().collect()
        } else {
            seg.replicas.clone()
        },
        sealed: !seg.is_open(),
        first_offset: offset,
        position,
        count,
    })
}

/// Plans the next `GET` on the shared cursor: the entries to hand out and the compare-and-set
/// command that claims them. The entries may be returned only after the command applied with
/// `CursorAdvanced`; if it is refused (`CursorMoved`), another reader got them: plan again.
pub fn next_shared_read(topic: &str, t: &TopicMeta, max: u64) -> Option<(ReadPlan, Command)> {
    let plan = plan_read(t, t.cursor, max)?;
    let cmd = Command::AdvanceCursor {
        topic: topic.to_string(),
        from: t.cursor,
        // Within readable_end, which cannot overflow (checked when stored).
        to: plan.first_offset.saturating_add(plan.count),
    };
    Some((plan, cmd))
}

/// Plans a consumer group's next read from its committed offset (0 if it never committed).
pub fn next_group_read(t: &TopicMeta, group: &str, max: u64) -> Option<ReadPlan> {
    plan_read(t, t.groups.get(group).copied().unwrap_or(0), max)
}

fn readable_len(s: &SegmentMeta) -> u64 {
    s.sealed_entries().unwrap_or(s.committed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::metadata::{Metadata, Outcome};
    use crate::cluster::Epoch;

    fn topic_with(sealed: &[u64], open_committed: u64) -> Metadata {
        let mut m = Metadata::default();
        m.apply(&Command::RegisterNode {
            node: NodeId(1),
            addr: String::new(),
        })
        .unwrap();
        m.apply(&Command::CreateTopic { name: "t".into() }).unwrap();
        for (i, &n) in sealed.iter().enumerate() {
            m.apply(&Command::Seal {
                topic: "t".into(),
                segment: SegmentId(i as u64),
                epoch: Epoch(0),
                entries: n,
            })
            .unwrap();
        }
        m.apply(&Command::ReportCommitted {
            topic: "t".into(),
            segment: SegmentId(sealed.len() as u64),
            epoch: Epoch(0),
            committed: open_committed,
        })
        .unwrap();
        m
    }

    #[test]
    fn reads_stop_at_segment_ends_and_skip_empty_segments() {
        let m = topic_with(&[3, 0, 2], 4);
        let t = m.topic("t").unwrap();
        let p = plan_read(t, 1, 100).unwrap();
        assert_eq!(
            (p.segment, p.position, p.count, p.sealed),
            (SegmentId(0), 1, 2, true)
        );
        let p = plan_read(t, 3, 100).unwrap();
        assert_eq!((p.segment, p.position, p.count), (SegmentId(2), 0, 2));
        let p = plan_read(t, 5, 100).unwrap();
        assert_eq!(
            (p.segment, p.position, p.count, p.sealed),
            (SegmentId(3), 0, 4, false)
        );
        assert_eq!(p.replicas, vec![NodeId(1)]);
        assert_eq!(plan_read(t, 9, 100), None);
        assert_eq!(plan_read(t, 0, 0), None);
    }

    #[test]
    fn shared_cursor_walks_the_chain_via_compare_and_set() {
        let mut m = topic_with(&[2], 1);
        let mut got = Vec::new();
        while let Some((plan, cmd)) = next_shared_read("t", m.topic("t").unwrap(), 10) {
            assert!(matches!(m.apply(&cmd), Ok(Outcome::CursorAdvanced { .. })));
            got.push((plan.segment, plan.first_offset, plan.count));
        }
        assert_eq!(got, vec![(SegmentId(0), 0, 2), (SegmentId(1), 2, 1)]);
        assert_eq!(m.topic("t").unwrap().cursor, 3);
    }

    #[test]
    fn a_racing_reader_loses_the_compare_and_set() {
        let mut m = topic_with(&[], 5);
        let (_, a) = next_shared_read("t", m.topic("t").unwrap(), 2).unwrap();
        let (_, b) = next_shared_read("t", m.topic("t").unwrap(), 3).unwrap();
        assert!(m.apply(&a).is_ok());
        assert!(m.apply(&b).is_err());
    }

    proptest::proptest! {
        /// Every plan lies inside one segment and below the committed end; walking the cursor
        /// visits every committed offset exactly once, in order.
        #[test]
        fn plans_stay_in_bounds(
            sealed in proptest::collection::vec(0u64..5, 0..5),
            open in 0u64..5,
            max in 1u64..4,
        ) {
            let mut m = topic_with(&sealed, open);
            let end = m.topic("t").unwrap().readable_end();
            let mut next = 0;
            while let Some((plan, cmd)) = next_shared_read("t", m.topic("t").unwrap(), max) {
                let t = m.topic("t").unwrap();
                let seg = t.segments.iter().find(|s| s.id == plan.segment).unwrap();
                proptest::prop_assert_eq!(plan.first_offset, next);
                proptest::prop_assert!(plan.count >= 1 && plan.count <= max);
                proptest::prop_assert!(plan.position + plan.count <= readable_len(seg));
                proptest::prop_assert!(plan.first_offset + plan.count <= end);
                next += plan.count;
                proptest::prop_assert!(m.apply(&cmd).is_ok());
            }
            proptest::prop_assert_eq!(next, end);
        }
    }
}
