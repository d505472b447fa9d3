//! Segment rollover: when a segment is full, who leads the next one, and the gate that makes a
//! leader propose exactly one seal per segment. It must not touch metadata state itself: the seal
//! only happens when the metadata group applies the conditional `Seal` command.
//!
//! Why a gate: upstream rolled segments from whichever writer noticed the threshold, so 8
//! concurrent writers crossing it together each rolled and 5.5% of acknowledged entries landed in
//! a segment that was already closed. Here the leader is the only appender, it stops admitting
//! entries the moment the threshold is crossed, waits until everything it assigned is committed,
//! and then proposes one seal with that exact count.

use super::NodeId;

/// Default entry-count rollover limit (`WALRUS_MAX_SEGMENT_ENTRIES`).
pub const MAX_SEGMENT_ENTRIES_DEFAULT: u64 = 1_000_000;

/// When a segment counts as full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RolloverPolicy {
    /// Seal once the segment holds at least this many entries (at least 1).
    pub max_entries: u64,
    /// Also seal once the payload bytes reach this, if set.
    pub max_bytes: Option<u64>,
}

impl Default for RolloverPolicy {
    fn default() -> Self {
        RolloverPolicy {
            max_entries: MAX_SEGMENT_ENTRIES_DEFAULT,
            max_bytes: None,
        }
    }
}

impl RolloverPolicy {
    /// Reads `WALRUS_MAX_SEGMENT_ENTRIES` from an already-fetched value (the shell reads the
    /// environment; core must not). Missing, unparsable or zero values give the default.
    pub fn from_env_value(max_entries: Option<&str>) -> Self {
        let max_entries = max_entries
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&v| v > 0)
            .unwrap_or(MAX_SEGMENT_ENTRIES_DEFAULT);
        RolloverPolicy {
            max_entries,
            max_bytes: None,
        }
    }

    /// Whether a segment holding `entries` entries of `bytes` payload bytes is full.
    pub fn is_full(&self, entries: u64, bytes: u64) -> bool {
        entries >= self.max_entries.max(1) || self.max_bytes.is_some_and(|m| bytes >= m)
    }
}

/// Where the leader of one open segment is in its rollover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateState {
    /// Below the limit: new batches are admitted.
    Admitting,
    /// The limit was crossed with `assigned` entries; no more batches; waiting for all of them to
    /// be committed before proposing the seal.
    Draining {
        /// Entries assigned when the limit was crossed (the future sealed count).
        assigned: u64,
    },
    /// The single seal proposal for `entries` has been emitted.
    SealProposed {
        /// The proposed sealed count.
        entries: u64,
    },
}

/// The leader-side rollover gate of one segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SealGate {
    policy: RolloverPolicy,
    state: GateState,
}

impl SealGate {
    /// A gate for a freshly opened segment.
    pub fn new(policy: RolloverPolicy) -> Self {
        SealGate {
            policy,
            state: GateState::Admitting,
        }
    }

    /// The current state.
    pub fn state(&self) -> GateState {
        self.state
    }

    /// Whether a new batch may be assigned offsets now.
    pub fn admits(&self) -> bool {
        self.state == GateState::Admitting
    }

    /// Records that the leader has now assigned `assigned` entries totalling `bytes` bytes.
    /// Crossing the limit closes the gate; later calls never reopen it.
    pub fn on_assigned(&mut self, assigned: u64, bytes: u64) {
        if self.state == GateState::Admitting && self.policy.is_full(assigned, bytes) {
            self.state = GateState::Draining { assigned };
        }
    }

    /// Records the committed length. Returns `Some(entries)` exactly once per segment: the
    /// moment everything assigned before the gate closed is committed, which is when the leader
    /// must propose `Seal { entries }`.
    pub fn on_committed(&mut self, committed: u64) -> Option<u64> {
        match self.state {
            GateState::Draining { assigned } if committed >= assigned => {
                self.state = GateState::SealProposed { entries: assigned };
                Some(assigned)
            }
            _ => None,
        }
    }
}

/// The leader of the next segment: the first node of `live_voters` after `current` in id order,
/// wrapping around (round-robin). `current` need not be live. `None` only if there are no live
/// voters.
pub fn next_leader(live_voters: &[NodeId], current: NodeId) -> Option<NodeId> {
    let mut sorted: Vec<NodeId> = live_voters.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted
        .iter()
        .copied()
        .find(|&n| n > current)
        .or_else(|| sorted.first().copied())
}

/// A replica set led by `leader`: the leader, then the following live voters in round-robin
/// order, `min(replication_factor, live voters)` nodes in all. `leader` must be in `live_voters`.
pub fn choose_replicas(
    live_voters: &[NodeId],
    leader: NodeId,
    replication_factor: usize,
) -> Vec<NodeId> {
    let mut sorted: Vec<NodeId> = live_voters.to_vec();
    sorted.sort();
    sorted.dedup();
    let Some(start) = sorted.iter().position(|&n| n == leader) else {
        return Vec::new();
    };
    let want = replication_factor.min(sorted.len());
    (0..want)
        .map(|i| sorted[(start + i) % sorted.len()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<NodeId> {
        v.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn next_leader_is_round_robin_over_live_voters() {
        let live = ids(&[7, 3, 11]);
        assert_eq!(next_leader(&live, NodeId(3)), Some(NodeId(7)));
        assert_eq!(next_leader(&live, NodeId(7)), Some(NodeId(11)));
        assert_eq!(next_leader(&live, NodeId(11)), Some(NodeId(3)));
        // A dead current leader still advances past its position.
        assert_eq!(next_leader(&live, NodeId(8)), Some(NodeId(11)));
        assert_eq!(next_leader(&[], NodeId(1)), None);
    }

    #[test]
    fn replicas_start_at_leader_and_wrap() {
        let live = ids(&[1, 2, 3, 4]);
        assert_eq!(choose_replicas(&live, NodeId(3), 3), ids(&[3, 4, 1]));
        assert_eq!(choose_replicas(&live[..2], NodeId(2), 3), ids(&[2, 1]));
        assert_eq!(choose_replicas(&live, NodeId(9), 3), ids(&[]));
    }

    #[test]
    fn env_value_parsing_falls_back_to_default() {
        assert_eq!(RolloverPolicy::from_env_value(Some("10")).max_entries, 10);
        assert_eq!(
            RolloverPolicy::from_env_value(Some("0")).max_entries,
            MAX_SEGMENT_ENTRIES_DEFAULT
        );
        assert_eq!(
            RolloverPolicy::from_env_value(Some("x")).max_entries,
            MAX_SEGMENT_ENTRIES_DEFAULT
        );
        assert_eq!(
            RolloverPolicy::from_env_value(None).max_entries,
            MAX_SEGMENT_ENTRIES_DEFAULT
        );
    }

    #[test]
    fn gate_proposes_exactly_once_even_when_many_batches_cross_the_limit() {
        let mut gate = SealGate::new(RolloverPolicy {
            max_entries: 4,
            max_bytes: None,
        });
        gate.on_assigned(3, 30);
        assert!(gate.admits());
        // Eight writers' batches arrive together: only the first crossing one is admitted.
        gate.on_assigned(5, 50);
        assert!(!gate.admits());
        gate.on_assigned(9, 90);
        assert_eq!(gate.state(), GateState::Draining { assigned: 5 });
        assert_eq!(gate.on_committed(4), None);
        assert_eq!(gate.on_committed(5), Some(5));
        assert_eq!(gate.on_committed(5), None);
        assert_eq!(gate.on_committed(6), None);
    }

    #[test]
    fn byte_limit_also_closes_the_gate() {
        let mut gate = SealGate::new(RolloverPolicy {
            max_entries: 100,
            max_bytes: Some(10),
        });
        gate.on_assigned(1, 12);
        assert_eq!(gate.state(), GateState::Draining { assigned: 1 });
    }

    proptest::proptest! {
        #[test]
        fn gate_emits_at_most_one_seal(steps in proptest::collection::vec((0u64..20, proptest::bool::ANY), 0..60)) {
            let mut gate = SealGate::new(RolloverPolicy { max_entries: 5, max_bytes: None });
            let mut assigned = 0u64;
            let mut seals = Vec::new();
            for (n, commit) in steps {
                if commit {
                    if let Some(e) = gate.on_committed(n.min(assigned)) { seals.push(e); }
                } else if gate.admits() {
                    assigned += n % 3 + 1;
                    gate.on_assigned(assigned, 0);
                }
                proptest::prop_assert!(seals.len() <= 1);
                if let Some(&e) = seals.first() {
                    proptest::prop_assert_eq!(e, assigned);
                    proptest::prop_assert!(e >= 5);
                }
            }
        }
    }
}
