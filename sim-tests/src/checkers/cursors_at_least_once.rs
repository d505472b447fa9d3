//! "cursors within bounds": the shared cursor only moves forward by compare-and-set, each claim
//! starts exactly where the previous one ended (so no offset is ever skipped: at-least-once),
//! never passes the committed end, and hands out exactly the entries that were assigned there.
//! (A client may still miss a claimed range if the GET reply is lost: the cursor is at-least-once
//! up to the node that claimed it, which is what the design promises.)

use walrus_core::cluster::Entry;

use super::Violation;
use crate::world::World;

/// The spec property mirrored.
pub const NAME: &str = "cursors within bounds (at-least-once)";

/// A successful `AdvanceCursor` handed out `entries` from `first` of `topic`.
pub fn on_claim(w: &mut World, topic: &str, first: u64, entries: &[Entry]) -> Option<Violation> {
    let prev = w.oracle.claimed_end.get(topic).copied().unwrap_or(0);
    if first != prev {
        return Some(Violation::new(
            NAME,
            format!("{topic}: claim starts at {first} but the previous one ended at {prev}"),
        ));
    }
    let end = first + entries.len() as u64;
    let (cursor, readable) = w
        .meta
        .topic(topic)
        .map(|t| (t.cursor, t.readable_end()))
        .unwrap_or((0, 0));
    if cursor != end || end > readable {
        return Some(Violation::new(
            NAME,
            format!("{topic}: claim to {end}, cursor {cursor}, committed end {readable}"),
        ));
    }
    for (k, e) in entries.iter().enumerate() {
        let off = first + k as u64;
        let truth = w
            .seg_at(topic, off)
            .and_then(|(seg, pos)| w.ghost_of(&seg).get(pos as usize));
        if truth != Some(e) {
            return Some(Violation::new(
                NAME,
                format!("{topic}@{off}: a GET handed out an entry that is not the one there"),
            ));
        }
    }
    w.oracle.claimed_end.insert(topic.to_string(), end);
    None
}

/// At the end: every offset below each cursor was claimed.
pub fn final_check(w: &World) -> Option<Violation> {
    for (name, t) in w.meta.topics() {
        let claimed = w.oracle.claimed_end.get(name).copied().unwrap_or(0);
        if claimed != t.cursor {
            return Some(Violation::new(
                NAME,
                format!("{name}: cursor at {} but claims end at {claimed}", t.cursor),
            ));
        }
    }
    None
}
