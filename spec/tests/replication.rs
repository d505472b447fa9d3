//! Model B (segment replication, leases, failover): all properties hold on the real core; the
//! planted stale-epoch follower and ack-before-persist are caught.

use walrus_spec::replication_model::{RepBug, RepModel};
use walrus_spec::{big, check};

const SAFETY_AND_LIVENESS: [&str; 11] = [
    "domain consistency",
    "at most one writer per segment",
    "no writes after seal",
    "entries in strict order",
    "no committed entry lost when a minority crashes",
    "a sealed segment contains every committed entry",
    "sealed counts equal the data",
    "every sealed entry is durable on a majority",
    "liveness: over-full segment eventually sealed",
    "liveness: writes resume after leader crash",
    "liveness: recovery brings live replicas to the seal",
];

#[test]
fn replication_model_holds() {
    let model = if big() {
        RepModel::big(RepBug::None)
    } else {
        RepModel::small(RepBug::None)
    };
    let r = check("replication", model, None);
    for p in SAFETY_AND_LIVENESS {
        assert!(!r.discoveries.contains(&p), "{p} violated");
    }
    assert!(r.discoveries.contains(&"an entry is acknowledged"));
    assert!(r.discoveries.contains(&"recovery seals the segment"));
}

#[test]
fn follower_accepting_a_stale_epoch_is_caught() {
    let prop = "a sealed segment contains every committed entry";
    let r = check(
        "replication+FollowerAcceptsStaleEpoch",
        RepModel::small(RepBug::FollowerAcceptsStaleEpoch),
        Some(prop),
    );
    assert!(r.discoveries.contains(&prop));
}

#[test]
fn ack_before_persist_is_caught() {
    let prop = "no committed entry lost when a minority crashes";
    let r = check(
        "replication+AckBeforePersist",
        RepModel::small(RepBug::AckBeforePersist),
        Some(prop),
    );
    assert!(r.discoveries.contains(&prop));
}

#[test]
fn sealing_before_the_copies_are_made_is_caught() {
    let prop = "every sealed entry is durable on a majority";
    let r = check(
        "replication+CopyClaimedEarly",
        RepModel::small(RepBug::CopyClaimedEarly),
        Some(prop),
    );
    assert!(r.discoveries.contains(&prop));
}
