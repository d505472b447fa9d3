//! "no committed entry lost when a minority crashes" and "a sealed segment contains every
//! committed entry": an acknowledged entry is durable on a majority of its replica set when the
//! leader acknowledges it, every later read of its offset returns it, and at the end it is in
//! the topic below the committed end with the same payload.

use walrus_core::cluster::{majority, Entry, SegmentRef};

use super::Violation;
use crate::world::World;

/// The spec property mirrored.
pub const NAME: &str = "no acknowledged entry lost or changed";

/// The leader on node `i` emitted `Appended { first, count }`.
pub fn on_leader_ack(
    w: &World,
    i: usize,
    seg: &SegmentRef,
    first: u64,
    count: u64,
) -> Option<Violation> {
    let n = &w.nodes[i];
    let s = w
        .meta
        .topic(&seg.topic)?
        .segments
        .iter()
        .find(|s| s.id == seg.segment)?;
    let ghost = w.ghost_of(seg);
    let pos = first.checked_sub(s.base_offset)?;
    for p in pos..pos + count {
        let holders = s
            .replicas
            .iter()
            .filter(|r| {
                let d = w.nodes[(r.0 - 1) as usize].disks.get(seg);
                ghost.get(p as usize).is_some()
                    && d.and_then(|d| d.durable.get(p as usize)) == ghost.get(p as usize)
            })
            .count();
        if holders < majority(s.replicas.len()) {
            return Some(Violation::new(
                NAME,
                format!(
                    "{seg:?} position {p} acknowledged by node {} but durable on only \
                     {holders} of {} replicas",
                    n.id.0,
                    s.replicas.len()
                ),
            ));
        }
    }
    None
}

/// A client received `Appended { first, count }` for `entries`.
pub fn on_client_ack(
    w: &mut World,
    topic: &str,
    first: u64,
    count: u64,
    entries: &[Entry],
) -> Option<Violation> {
    if count != entries.len() as u64 {
        return Some(Violation::new(
            NAME,
            format!("ack count {count} for a batch of {}", entries.len()),
        ));
    }
    for (k, e) in entries.iter().enumerate() {
        let off = first + k as u64;
        let truth = w
            .seg_at(topic, off)
            .and_then(|(seg, pos)| w.ghost_of(&seg).get(pos as usize).cloned());
        if truth.as_ref() != Some(e) {
            return Some(Violation::new(
                NAME,
                format!(
                    "{topic}@{off} acknowledged for {:?} but the segment holding that offset \
                     has {:?} there",
                    String::from_utf8_lossy(e),
                    truth.map(|t| String::from_utf8_lossy(&t).into_owned())
                ),
            ));
        }
        if let Some(old) = w.oracle.acked.insert((topic.to_string(), off), e.clone()) {
            if &old != e {
                return Some(Violation::new(
                    NAME,
                    format!("{topic}@{off} acknowledged twice with different payloads"),
                ));
            }
        }
    }
    None
}

/// A client's GET returned `entries` from `first`.
pub fn on_client_read(
    w: &mut World,
    topic: &str,
    first: u64,
    entries: &[Entry],
) -> Option<Violation> {
    for (k, e) in entries.iter().enumerate() {
        let key = (topic.to_string(), first + k as u64);
        if let Some(a) = w.oracle.acked.get(&key) {
            if a != e {
                return Some(Violation::new(
                    NAME,
                    format!(
                        "{topic}@{} read back differs from the acknowledged entry",
                        key.1
                    ),
                ));
            }
        }
        if let Some(old) = w.oracle.read.insert(key.clone(), e.clone()) {
            if &old != e {
                return Some(Violation::new(
                    NAME,
                    format!("{topic}@{} read twice with different payloads", key.1),
                ));
            }
        }
    }
    None
}

/// At the end: every acknowledged entry is below the committed end and unchanged.
pub fn final_check(w: &World) -> Option<Violation> {
    for ((topic, off), e) in &w.oracle.acked {
        let end = w.meta.topic(topic).map(|t| t.readable_end()).unwrap_or(0);
        let truth = w
            .seg_at(topic, *off)
            .and_then(|(seg, pos)| w.ghost_of(&seg).get(pos as usize));
        if *off >= end || truth != Some(e) {
            return Some(Violation::new(
                NAME,
                format!("{topic}@{off} was acknowledged but is lost (committed end {end})"),
            ));
        }
    }
    None
}
