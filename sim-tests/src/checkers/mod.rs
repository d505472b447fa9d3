//! Safety checkers, one property per module, each named after the spec invariant it mirrors
//! (`spec/src/replication_model.rs`, `spec/src/meta_model.rs`). Hooks are called by the world
//! at the moment the property can first break; `sweep` runs periodically and at the end.

pub mod at_most_one_writer;
pub mod cursors_at_least_once;
pub mod no_acked_entry_lost;
pub mod offsets_gapless;
pub mod replicas_agree;
pub mod sealed_never_change;

use crate::world::World;

/// A broken property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The checker (spec property) that caught it.
    pub checker: &'static str,
    /// What was seen.
    pub detail: String,
}

impl Violation {
    /// A violation of `checker`.
    pub fn new(checker: &'static str, detail: String) -> Violation {
        Violation { checker, detail }
    }
}

/// The periodic whole-state checks.
pub fn sweep(w: &World) -> Option<Violation> {
    replicas_agree::sweep(w).or_else(|| sealed_never_change::sweep(w))
}

/// End-of-run checks (after the liveness phase).
pub fn final_checks(w: &World) -> Option<Violation> {
    no_acked_entry_lost::final_check(w)
        .or_else(|| offsets_gapless::final_check(w))
        .or_else(|| cursors_at_least_once::final_check(w))
        .or_else(|| replicas_agree::final_check(w))
}
