//! "no writes after seal" and "sealed counts equal the data": a sealed count never changes once
//! applied, a replica that durably recorded a fence never writes past the seal (but for a
//! recovery's copy that raced the old leader's seal), and a replica
//! that reports its seal done holds exactly the sealed entries.

use walrus_core::cluster::SegmentRef;

use super::Violation;
use crate::world::{Role, World};

/// The spec property mirrored.
pub const NAME: &str = "sealed segments never change";

/// After a structural metadata change: sealed counts are stable.
pub fn on_meta_change(w: &mut World) -> Option<Violation> {
    let mut found = None;
    for (name, t) in w.meta.topics() {
        for s in &t.segments {
            let Some(n) = s.sealed_entries() else {
                continue;
            };
            let seg = SegmentRef {
                topic: name.clone(),
                segment: s.id,
            };
            let old = *w.sealed_seen.entry(seg.clone()).or_insert(n);
            if old != n && found.is_none() {
                found = Some(Violation::new(
                    NAME,
                    format!("{seg:?} was sealed at {old} entries, now at {n}"),
                ));
            }
        }
    }
    found
}

/// Node `i` persists `len` entries at `pos` of `seg`.
pub fn on_persist(
    w: &World,
    i: usize,
    seg: &SegmentRef,
    pos: u64,
    len: usize,
) -> Option<Violation> {
    let sealed = w.sealed_seen.get(seg)?;
    let fenced = w.nodes[i].disks.get(seg).and_then(|d| d.fenced)?;
    // A recovery's copy (made before it proposes its seal) may race the old leader's own seal,
    // which counts only what was committed and so may end short of the copy; the `SealAt`
    // that follows cuts the copy back. Any other write past the seal is a fenced replica
    // taking the old leader's writes.
    let copying = matches!(
        w.nodes[i].roles.get(seg),
        Some(Role::Follower(f)) if f.seal_target().is_some_and(|t| !t.sealed)
    );
    if pos + len as u64 > *sealed && !copying {
        return Some(Violation::new(
            NAME,
            format!(
                "node {} (fenced at {fenced:?}) writes {seg:?} positions {pos}..{} past the \
                 seal at {sealed}",
                i + 1,
                pos + len as u64
            ),
        ));
    }
    None
}

/// Periodic: a replica that reports its seal done holds exactly the sealed entries.
pub fn sweep(w: &World) -> Option<Violation> {
    for n in w.nodes.iter().filter(|n| n.up) {
        for (seg, role) in &n.roles {
            let Role::Follower(f) = role else { continue };
            if !f.is_sealed_done() {
                continue;
            }
            let Some(&sealed) = w.sealed_seen.get(seg) else {
                continue;
            };
            let d = n.disks.get(seg).map(|d| &d.durable[..]).unwrap_or(&[]);
            let ghost = w.ghost_of(seg);
            let want = ghost.get(..sealed as usize);
            if d.len() as u64 != sealed || want != Some(d) {
                return Some(Violation::new(
                    NAME,
                    format!(
                        "node {} reports {seg:?} sealed done with {} entries; sealed at {sealed}",
                        n.id.0,
                        d.len()
                    ),
                ));
            }
        }
    }
    None
}
