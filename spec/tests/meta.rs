//! Model A (metadata, rollover, cursors): all properties hold on the real core; the planted
//! unconditional seal is caught.

use walrus_spec::meta_model::{MetaBug, MetaModel};
use walrus_spec::{big, check};

const SAFETY_AND_LIVENESS: [&str; 8] = [
    "domain consistency",
    "sealed counts equal the data",
    "no writes after seal",
    "cursors within bounds",
    "group offsets never regress",
    "liveness: over-full segment eventually sealed",
    "liveness: available entries eventually read",
    "liveness: writes resume after leader crash",
];

#[test]
fn metadata_model_holds() {
    let model = if big() {
        MetaModel::big(MetaBug::None)
    } else {
        MetaModel::small(MetaBug::None)
    };
    let r = check("meta", model, None);
    for p in SAFETY_AND_LIVENESS {
        assert!(!r.discoveries.contains(&p), "{p} violated");
    }
    // The model reaches the interesting places (otherwise the checks above say little).
    assert!(r.discoveries.contains(&"a topic reaches its segment bound"));
    assert!(r.discoveries.contains(&"a segment is recovered"));
}

#[test]
fn unconditional_seal_is_caught() {
    let r = check(
        "meta+UnconditionalSeal",
        MetaModel::small(MetaBug::UnconditionalSeal),
        Some("sealed counts equal the data"),
    );
    assert!(r.discoveries.contains(&"sealed counts equal the data"));
}
