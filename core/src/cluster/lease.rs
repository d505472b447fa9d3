//! Segment-leader leases: who may append to a segment at a given `now`, and when the metadata
//! leader may choose a successor. It owns the timing rule only; it must not read a clock (every
//! function takes `now` in milliseconds) and does not change metadata.
//!
//! Safety precondition: a lease must expire, on the holder's clock, before the grantor can pick
//! a successor on its clock, even if the clocks drift apart by up to `max_clock_drift_ms` over a
//! lease period. That is `lease_duration_ms + max_clock_drift_ms < detection_timeout_ms`, checked
//! by [`LeaseConfig::validate`]. The holder also counts its lease from the moment it *sent* the
//! request, not from when the grant arrived, so message delay only shortens it.

use std::collections::{BTreeMap, BTreeSet};

use super::metadata::Metadata;
use super::{Epoch, NodeId, SegmentRef};

/// Default lease length.
pub const LEASE_DURATION_MS_DEFAULT: u64 = 2_000;
/// Default bound on clock drift between two nodes over one lease period.
pub const MAX_CLOCK_DRIFT_MS_DEFAULT: u64 = 500;
/// Default time without a grant after which the metadata leader may replace a segment leader.
pub const DETECTION_TIMEOUT_MS_DEFAULT: u64 = 5_000;

/// Lease timing parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseConfig {
    /// How long a grant lets the holder append, from the time it asked.
    pub lease_duration_ms: u64,
    /// Worst drift between any two clocks over one lease period.
    pub max_clock_drift_ms: u64,
    /// How long after its last grant a leader may be replaced.
    pub detection_timeout_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lease_duration_ms: LEASE_DURATION_MS_DEFAULT,
            max_clock_drift_ms: MAX_CLOCK_DRIFT_MS_DEFAULT,
            detection_timeout_ms: DETECTION_TIMEOUT_MS_DEFAULT,
        }
    }
}

/// Why an append (or a grant) is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AppendDenied {
    /// The topic does not exist.
    #[error("unknown topic")]
    UnknownTopic,
    /// The segment is not the topic's open segment.
    #[error("segment is not open")]
    NotOpen,
    /// Metadata names another node as leader.
    #[error("not the leader")]
    NotLeader,
    /// The lease is for an older epoch than the segment's.
    #[error("stale epoch")]
    StaleEpoch,
    /// The lease has expired at `now`.
    #[error("lease expired")]
    LeaseExpired,
}

/// Why a lease configuration is unsafe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseConfigError {
    /// `lease + drift >= detection timeout`: a successor could be chosen while the old lease is
    /// still valid on the holder's clock.
    #[error("lease_duration_ms + max_clock_drift_ms must be below detection_timeout_ms")]
    Overlap,
    /// The lease duration is zero.
    #[error("lease_duration_ms must be positive")]
    Zero,
}

impl LeaseConfig {
    /// Timing derived from one lease length: clocks may drift by a quarter of a lease, and a
    /// successor may be chosen a tenth of a lease after that (a margin for scheduling), so the
    /// result always passes [`LeaseConfig::validate`] for a positive length.
    pub fn for_lease(lease_duration_ms: u64) -> LeaseConfig {
        let max_clock_drift_ms = lease_duration_ms / 4;
        let margin = (lease_duration_ms / 10).max(1);
        LeaseConfig {
            lease_duration_ms,
            max_clock_drift_ms,
            detection_timeout_ms: lease_duration_ms
                .saturating_add(max_clock_drift_ms)
                .saturating_add(margin),
        }
    }

    /// Checks the safety precondition.
    pub fn validate(&self) -> Result<(), LeaseConfigError> {
        if self.lease_duration_ms == 0 {
            return Err(LeaseConfigError::Zero);
        }
        match self.lease_duration_ms.checked_add(self.max_clock_drift_ms) {
            Some(sum) if sum < self.detection_timeout_ms => Ok(()),
            _ => Err(LeaseConfigError::Overlap),
        }
    }
}

/// A lease as its holder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The epoch it was granted for.
    pub epoch: Epoch,
    /// Holder-clock time at which it stops allowing appends.
    pub expires_at_ms: u64,
}

impl Lease {
    /// The lease the holder gets for a request it sent at `requested_at_ms` on its own clock.
    pub fn granted(epoch: Epoch, requested_at_ms: u64, cfg: &LeaseConfig) -> Lease {
        Lease {
            epoch,
            expires_at_ms: requested_at_ms.saturating_add(cfg.lease_duration_ms),
        }
    }

    /// Whether it still allows appends at `now`.
    pub fn is_valid(&self, now: u64) -> bool {
        now < self.expires_at_ms
    }
}

/// Whether `node` may append to `seg` at `now` holding `lease`: metadata must name it leader of
/// that open segment at the lease's epoch, and the lease must not have expired.
pub fn may_append(
    meta: &Metadata,
    node: NodeId,
    seg: &SegmentRef,
    lease: &Lease,
    now: u64,
) -> Result<(), AppendDenied> {
    leader_check(meta, node, seg, lease.epoch)?;
    if !lease.is_valid(now) {
        return Err(AppendDenied::LeaseExpired);
    }
    Ok(())
}

/// The grantor's (metadata leader's) record of the leases it handed out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LeaseTable {
    last_grant_ms: BTreeMap<SegmentRef, (NodeId, Epoch, u64)>,
}

impl LeaseTable {
    /// An empty table. After a metadata leader change, the new leader starts empty and treats
    /// every segment as granted at its start time (see [`LeaseTable::assume_granted`]).
    pub fn new() -> Self {
        LeaseTable::default()
    }

    /// Grants (or renews) a lease to `holder` at grantor time `now` if metadata names it leader
    /// of the open segment at `epoch`.
    pub fn grant(
        &mut self,
        meta: &Metadata,
        holder: NodeId,
        seg: &SegmentRef,
        epoch: Epoch,
        now: u64,
    ) -> Result<(), AppendDenied> {
        leader_check(meta, holder, seg, epoch)?;
        self.last_grant_ms.insert(seg.clone(), (holder, epoch, now));
        Ok(())
    }

    /// Records a grant the grantor may not know about (it just became metadata leader), so that
    /// it waits a full detection timeout before replacing anyone.
    pub fn assume_granted(&mut self, seg: &SegmentRef, holder: NodeId, epoch: Epoch, now: u64) {
        self.last_grant_ms.insert(seg.clone(), (holder, epoch, now));
    }

    /// Whether a successor may be chosen for `seg` at grantor time `now`: the last lease granted
    /// is past its detection timeout (so, by the precondition, expired on its holder's clock).
    pub fn may_choose_successor(&self, seg: &SegmentRef, now: u64, cfg: &LeaseConfig) -> bool {
        match self.last_grant_ms.get(seg) {
            Some(&(_, _, at)) => now >= at.saturating_add(cfg.detection_timeout_ms),
            None => true,
        }
    }

    /// Whether the table holds a grant (real or assumed) for `seg`.
    pub fn knows(&self, seg: &SegmentRef) -> bool {
        self.last_grant_ms.contains_key(seg)
    }

    /// Forgets a segment (sealed or recovered).
    pub fn forget(&mut self, seg: &SegmentRef) {
        self.last_grant_ms.remove(seg);
    }
}

/// What a new metadata leader learns about its predecessors' last grants, so that it need
/// not wait a full detection timeout from its own election before replacing a dead segment
/// leader.
///
/// The argument: a grantor confirms its leadership with a heartbeat round *after* a renewal
/// request arrives, so every member of some voter quorum heard from a leader after the holder
/// sent the request (at `ts`). Each voter records when it last heard from a metadata leader (or,
/// as leader, last granted). A majority of voters, asked once they have seen the new term (so
/// they refuse the old leader from then on), shares a member with that quorum; so the latest
/// contact among their answers is no earlier than `ts`. Elapsed times are measured on the
/// voters' clocks and are shortened by the drift bound before they count on this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    voters: BTreeSet<NodeId>,
    /// Voter -> its last contact with a metadata leader, on this node's clock.
    contacts: BTreeMap<NodeId, u64>,
}

impl Takeover {
    /// Starts collecting reports from `voters` (this node's current Raft voters).
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Takeover {
        Takeover {
            voters: voters.into_iter().collect(),
            contacts: BTreeMap::new(),
        }
    }

    /// `node` answered, received at `received_at_ms` on this node's clock, that `elapsed_ms` had
    /// passed on its own clock since its last contact with a metadata leader. The first answer
    /// per voter counts; answers from non-voters are ignored.
    pub fn report(
        &mut self,
        node: NodeId,
        received_at_ms: u64,
        elapsed_ms: u64,
        cfg: &LeaseConfig,
    ) {
        if !self.voters.contains(&node) {
            return;
        }
        let lease = u128::from(cfg.lease_duration_ms.max(1));
        let keep = lease.saturating_sub(u128::from(cfg.max_clock_drift_ms));
        // Rounded down: this node credits itself at most the drift-shortened elapsed time.
        let credited = (u128::from(elapsed_ms) * keep / lease) as u64;
        self.contacts
            .entry(node)
            .or_insert(received_at_ms.saturating_sub(credited));
    }

    /// Voters that have not answered yet.
    pub fn missing(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters
            .iter()
            .copied()
            .filter(|v| !self.contacts.contains_key(v))
    }

    /// Once a majority of voters answered: a time on this node's clock no earlier than any
    /// grant a predecessor made. Assuming every unknown segment granted then is safe.
    pub fn bound(&self) -> Option<u64> {
        if self.voters.is_empty() || self.contacts.len() * 2 <= self.voters.len() {
            return None;
        }
        self.contacts.values().copied().max()
    }
}

fn leader_check(
    meta: &Metadata,
    node: NodeId,
    seg: &SegmentRef,
    epoch: Epoch,
) -> Result<(), AppendDenied> {
    let t = meta.topic(&seg.topic).ok_or(AppendDenied::UnknownTopic)?;
    let open = t.open_segment().ok_or(AppendDenied::NotOpen)?;
    if open.id != seg.segment {
        return Err(AppendDenied::NotOpen);
    }
    if open.leader() != Some(node) {
        return Err(AppendDenied::NotLeader);
    }
    if open.epoch != epoch {
        return Err(AppendDenied::StaleEpoch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::metadata::Command;
    use crate::cluster::SegmentId;

    fn meta() -> Metadata {
        let mut m = Metadata::default();
        for i in 1..=3 {
            m.apply(&Command::RegisterNode {
                node: NodeId(i),
                addr: String::new(),
            })
            .unwrap();
        }
        m.apply(&Command::CreateTopic { name: "t".into() }).unwrap();
        m
    }

    fn seg(id: u64) -> SegmentRef {
        SegmentRef {
            topic: "t".into(),
            segment: SegmentId(id),
        }
    }

    #[test]
    fn config_precondition() {
        assert_eq!(LeaseConfig::default().validate(), Ok(()));
        let bad = LeaseConfig {
            lease_duration_ms: 4_600,
            ..LeaseConfig::default()
        };
        assert_eq!(bad.validate(), Err(LeaseConfigError::Overlap));
        let overflow = LeaseConfig {
            lease_duration_ms: u64::MAX,
            max_clock_drift_ms: 1,
            detection_timeout_ms: u64::MAX,
        };
        assert_eq!(overflow.validate(), Err(LeaseConfigError::Overlap));
    }

    #[test]
    fn only_the_leader_with_a_live_lease_may_append() {
        let m = meta();
        let cfg = LeaseConfig::default();
        let lease = Lease::granted(Epoch(0), 1_000, &cfg);
        assert_eq!(may_append(&m, NodeId(1), &seg(0), &lease, 2_999), Ok(()));
        assert_eq!(
            may_append(&m, NodeId(1), &seg(0), &lease, 3_000),
            Err(AppendDenied::LeaseExpired)
        );
        assert_eq!(
            may_append(&m, NodeId(2), &seg(0), &lease, 1_500),
            Err(AppendDenied::NotLeader)
        );
        let stale = Lease::granted(Epoch(7), 1_000, &cfg);
        assert_eq!(
            may_append(&m, NodeId(1), &seg(0), &stale, 1_500),
            Err(AppendDenied::StaleEpoch)
        );
        assert_eq!(
            may_append(&m, NodeId(1), &seg(9), &lease, 1_500),
            Err(AppendDenied::NotOpen)
        );
    }

    #[test]
    fn derived_timing_is_valid() {
        for ms in [1, 2, 3, 10, 1_000, 2_000, 60_000, u64::MAX / 2] {
            let cfg = LeaseConfig::for_lease(ms);
            assert_eq!(cfg.validate(), Ok(()), "{cfg:?}");
            assert_eq!(cfg.lease_duration_ms, ms);
        }
    }

    #[test]
    fn successor_only_after_detection_timeout() {
        let m = meta();
        let cfg = LeaseConfig::default();
        let mut table = LeaseTable::new();
        assert_eq!(
            table.grant(&m, NodeId(2), &seg(0), Epoch(0), 10),
            Err(AppendDenied::NotLeader)
        );
        table.grant(&m, NodeId(1), &seg(0), Epoch(0), 10).unwrap();
        assert!(!table.may_choose_successor(&seg(0), 5_009, &cfg));
        assert!(table.may_choose_successor(&seg(0), 5_010, &cfg));
        table.forget(&seg(0));
        table.assume_granted(&seg(0), NodeId(1), Epoch(0), 6_000);
        assert!(!table.may_choose_successor(&seg(0), 6_001, &cfg));
    }

    #[test]
    fn takeover_needs_a_majority_and_takes_the_latest_contact() {
        let cfg = LeaseConfig::for_lease(1_000); // drift 250: elapsed counts three quarters
        let mut t = Takeover::new([NodeId(1), NodeId(2), NodeId(3)]);
        t.report(NodeId(1), 2_000, 800, &cfg);
        assert_eq!(t.bound(), None);
        assert_eq!(t.missing().collect::<Vec<_>>(), vec![NodeId(2), NodeId(3)]);
        t.report(NodeId(9), 2_000, 0, &cfg); // not a voter
        assert_eq!(t.bound(), None);
        t.report(NodeId(3), 2_100, 400, &cfg);
        // 2_000 - 600 = 1_400 and 2_100 - 300 = 1_800: the later one.
        assert_eq!(t.bound(), Some(1_800));
        t.report(NodeId(3), 2_100, 0, &cfg); // a second answer changes nothing
        assert_eq!(t.bound(), Some(1_800));
        assert_eq!(Takeover::new([]).bound(), None);
    }

    proptest::proptest! {
        /// A new metadata leader that assumes every unknown segment granted at the takeover
        /// bound never chooses a successor while a lease a predecessor granted is still valid,
        /// whatever the clock rates (within the drift bound) and message delays.
        #[test]
        fn takeover_bound_covers_every_predecessor_grant(
            lease in 10u64..5_000,
            drift_pct in 0u64..50,
            slack in 1u64..500,
            rates in proptest::collection::vec(
                proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::strategy::Just(1_000u64), 0u64..=1_000],
                6,
            ),
            quorum in 0usize..10,
            answering in 0usize..10,
            ts in 10_000u64..100_000,
            after in proptest::collection::vec(
                proptest::prop_oneof![proptest::strategy::Just(0u64), 0u64..5_000],
                5,
            ),
            before in proptest::collection::vec(0u64..5_000, 5),
            answer_delay in proptest::collection::vec(0u64..5_000, 5),
            receive_delay in proptest::collection::vec(
                proptest::prop_oneof![proptest::strategy::Just(0u64), 0u64..5_000],
                5,
            ),
        ) {
            let drift = lease * drift_pct / 100;
            let cfg = LeaseConfig {
                lease_duration_ms: lease,
                max_clock_drift_ms: drift,
                detection_timeout_ms: lease + drift + slack,
            };
            // Each clock runs at (lease + d) / lease of real time, d within the drift bound, so
            // two clocks differ by at most `drift` over a lease. Index 5 is the new leader.
            let clock = |node: usize, real: u64| real * (lease + rates[node] * drift / 1_000) / lease;
            let majorities: [[usize; 3]; 10] = [
                [0, 1, 2], [0, 1, 3], [0, 1, 4], [0, 2, 3], [0, 2, 4],
                [0, 3, 4], [1, 2, 3], [1, 2, 4], [1, 3, 4], [2, 3, 4],
            ];
            let confirmed = majorities[quorum];
            let asked = majorities[answering];
            let mut t = Takeover::new((0..5).map(|v| NodeId(v as u64)));
            for &v in &asked {
                // The confirming quorum heard from the grantor after the request was sent;
                // the others last heard from a leader at any time.
                let contact = if confirmed.contains(&v) {
                    ts + after[v]
                } else {
                    ts.saturating_sub(before[v])
                };
                let answered = contact + answer_delay[v];
                let elapsed = clock(v, answered) - clock(v, contact);
                t.report(NodeId(v as u64), clock(5, answered + receive_delay[v]), elapsed, &cfg);
            }
            let bound = t.bound().expect("a majority answered");
            let mut table = LeaseTable::new();
            table.assume_granted(&seg(0), NodeId(1), Epoch(0), bound);
            let held = Lease::granted(Epoch(0), clock(4, ts), &cfg);
            // The first real millisecond at which the new leader may choose a successor.
            let mut real = 0u64;
            let mut step = 1u64 << 40;
            while step > 0 {
                if !table.may_choose_successor(&seg(0), clock(5, real + step - 1), &cfg) {
                    real += step;
                }
                step /= 2;
            }
            proptest::prop_assert!(table.may_choose_successor(&seg(0), clock(5, real), &cfg));
            proptest::prop_assert!(!held.is_valid(clock(4, real)), "successor at real {real}");
        }

        /// With a valid config and drift within the bound, whenever the grantor may choose a
        /// successor the holder's lease has already expired on the holder's clock.
        #[test]
        fn no_overlap_under_bounded_drift(
            lease in 1u64..5_000,
            drift in 0u64..2_000,
            slack in 1u64..2_000,
            requested_at in 0u64..1_000_000,
            delay in 0u64..3_000,
            skew in 0u64..2_000,
            elapsed in 0u64..20_000,
        ) {
            let cfg = LeaseConfig {
                lease_duration_ms: lease,
                max_clock_drift_ms: drift,
                detection_timeout_ms: lease + drift + slack,
            };
            proptest::prop_assert!(cfg.validate().is_ok());
            let held = Lease::granted(Epoch(0), requested_at, &cfg);
            // The grantor grants after the request arrives (delay >= 0 on a shared timeline).
            let grant_time = requested_at + delay;
            let mut table = LeaseTable::new();
            table.assume_granted(&seg(0), NodeId(1), Epoch(0), grant_time);
            let grantor_now = grant_time + elapsed;
            // The holder's clock may run behind the grantor's by at most `drift`.
            let holder_now = (requested_at + delay + elapsed).saturating_sub(skew.min(drift));
            if table.may_choose_successor(&seg(0), grantor_now, &cfg) {
                proptest::prop_assert!(!held.is_valid(holder_now));
            }
        }
    }
}
