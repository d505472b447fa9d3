//! "domain consistency" and "entries in strict order": the sequencer's metadata keeps its
//! structural invariants (contiguous base offsets, one open segment last, cursor within the
//! committed end), a leader never assigns a position twice, and at the end every topic's
//! committed range is backed by assigned entries with no gap.

use walrus_core::cluster::{Entry, SegmentRef};

use super::Violation;
use crate::world::World;

/// The spec property mirrored.
pub const NAME: &str = "offsets gapless and monotonic per topic";

/// After every applied metadata command.
pub fn on_meta_change(w: &World) -> Option<Violation> {
    w.meta
        .check_invariants()
        .err()
        .map(|e| Violation::new(NAME, format!("metadata invariant broken: {e}")))
}

/// A leader machine persists `entries` at `pos`: positions are assigned once, in order.
pub fn on_leader_persist(
    w: &mut World,
    seg: &SegmentRef,
    pos: u64,
    entries: &[Entry],
) -> Option<Violation> {
    let g = w.ghost.entry(seg.clone()).or_default();
    if pos != g.len() as u64 {
        return Some(Violation::new(
            NAME,
            format!(
                "{seg:?}: leader assigned position {pos} but {} were assigned before",
                g.len()
            ),
        ));
    }
    g.extend(entries.iter().cloned());
    None
}

/// At the end: every committed offset of every topic maps to an assigned entry.
pub fn final_check(w: &World) -> Option<Violation> {
    for (name, t) in w.meta.topics() {
        for s in &t.segments {
            let len = s.sealed_entries().unwrap_or(s.committed);
            let seg = SegmentRef {
                topic: name.clone(),
                segment: s.id,
            };
            if (w.ghost_of(&seg).len() as u64) < len {
                return Some(Violation::new(
                    NAME,
                    format!(
                        "{seg:?} counts {len} entries but only {} were ever assigned",
                        w.ghost_of(&seg).len()
                    ),
                ));
            }
        }
    }
    None
}
