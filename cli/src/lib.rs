//! The `walrus-cli` crate: REPL and one-shot client commands. Filled by the node issue.
//! It depends on `walrus-core` only (for the wire codec), never on `walrus-node`.
