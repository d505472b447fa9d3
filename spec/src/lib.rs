//! The `walrus-spec` crate: `DistributedWalrus.tla` and stateright models of the same invariants.
