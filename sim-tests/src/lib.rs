//! The `sim-tests` crate: deterministic fault-injection runs of the whole cluster.
