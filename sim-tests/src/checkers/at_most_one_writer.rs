//! "at most one writer per segment": at any instant at most one node's leader machine accepts
//! appends for a segment (`can_append` on its own clock, i.e. by lease validity), and the
//! sequencer's metadata agrees that it leads that open segment at its epoch.

use std::collections::BTreeMap;

use walrus_core::cluster::lease::{may_append, Lease};
use walrus_core::cluster::SegmentRef;

use super::Violation;
use crate::world::{Role, World};

/// The spec property mirrored.
pub const NAME: &str = "at most one writer per segment";

/// Checked after every event.
pub fn check(w: &World) -> Option<Violation> {
    let mut writers: BTreeMap<&SegmentRef, u64> = BTreeMap::new();
    for (i, n) in w.nodes.iter().enumerate() {
        if !n.up {
            continue;
        }
        let now = w.local(i);
        for seg in &n.leading {
            let Some(Role::Leader(l)) = n.roles.get(seg) else {
                continue;
            };
            if !l.can_append(now) {
                continue;
            }
            let lease = Lease {
                epoch: l.epoch(),
                expires_at_ms: u64::MAX,
            };
            if let Err(e) = may_append(&w.meta, n.id, seg, &lease, 0) {
                return Some(Violation::new(
                    NAME,
                    format!(
                        "node {} accepts writes to {seg:?} at epoch {:?} but metadata says {e}",
                        n.id.0,
                        l.epoch()
                    ),
                ));
            }
            if let Some(other) = writers.insert(seg, n.id.0) {
                return Some(Violation::new(
                    NAME,
                    format!("nodes {other} and {} both accept writes to {seg:?}", n.id.0),
                ));
            }
        }
    }
    None
}
