//! "every replica's committed prefix equal" (spec: "entries in strict order"): every replica's
//! durable log is a prefix of what the segment's leader assigned, position by position; at the
//! end every sealed segment is held exactly by a majority of its replicas.

use walrus_core::cluster::{majority, SegmentRef};

use super::Violation;
use crate::world::World;

/// The spec property mirrored.
pub const NAME: &str = "every replica's committed prefix equal";

/// Periodic: replica logs agree with the assigned entries.
pub fn sweep(w: &World) -> Option<Violation> {
    for n in &w.nodes {
        for (seg, d) in &n.disks {
            let ghost = w.ghost_of(seg);
            for log in [&d.durable, &d.visible] {
                if log.len() > ghost.len() || log[..] != ghost[..log.len()] {
                    let p = log
                        .iter()
                        .zip(ghost)
                        .position(|(a, b)| a != b)
                        .unwrap_or(ghost.len());
                    return Some(Violation::new(
                        NAME,
                        format!(
                            "node {} holds {seg:?} entries that differ from the leader's at \
                             position {p} (len {}, assigned {})",
                            n.id.0,
                            log.len(),
                            ghost.len()
                        ),
                    ));
                }
            }
        }
    }
    None
}

/// At the end: every sealed segment is exactly on a majority of its replicas.
pub fn final_check(w: &World) -> Option<Violation> {
    for (name, t) in w.meta.topics() {
        for s in &t.segments {
            let Some(len) = s.sealed_entries() else {
                continue;
            };
            let seg = SegmentRef {
                topic: name.clone(),
                segment: s.id,
            };
            let want = &w.ghost_of(&seg)[..(len as usize).min(w.ghost_of(&seg).len())];
            let exact = s
                .replicas
                .iter()
                .filter(|r| {
                    w.nodes[(r.0 - 1) as usize]
                        .disks
                        .get(&seg)
                        .is_some_and(|d| d.durable == want)
                })
                .count();
            if exact < majority(s.replicas.len()) {
                return Some(Violation::new(
                    NAME,
                    format!(
                        "{seg:?} sealed at {len} is held exactly by only {exact} of {} replicas",
                        s.replicas.len()
                    ),
                ));
            }
        }
    }
    None
}
