//! `walrus-node`: the cluster node. Metadata in an openraft group whose log and vote live on
//! our WAL (`meta`), internal RPC between nodes (`rpc`, `network`), the client server
//! (`server`), and the node itself (`node`), which routes requests and runs the background
//! loops. Every metadata decision is made by `walrus_core::cluster`; this crate only drives it.

pub mod meta;
pub mod network;
pub mod node;
pub mod rpc;
#[cfg(madsim)]
pub mod runtime;
pub mod server;
#[cfg(madsim)]
pub mod sim;
pub mod start;

/// The disk every store of a node runs on: real files, or the seeded fault-injecting disk of
/// the simulation (`--cfg madsim`), where one process hosts every node.
#[cfg(not(madsim))]
pub type NodeDisk = walrus::LinuxDisk;
/// The disk every store of a node runs on (simulated under `--cfg madsim`).
#[cfg(madsim)]
pub type NodeDisk = walrus_io_sim::SimDisk;

/// Whether `SyncEach` group commits run on the appending task (the simulation spawns no threads).
pub(crate) const INLINE_COMMIT: bool = cfg!(madsim);
