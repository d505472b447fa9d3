//! The `walrus-node` crate: the cluster node (openraft wiring, client server, internal RPC).
//!
//! It is filled by the node issue; until then it only re-exports the storage engine it will
//! stand on, so the dependency direction of ARCHITECTURE.md is already enforced by Cargo.
