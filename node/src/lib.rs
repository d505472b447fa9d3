//! `walrus-node`: the cluster node. Metadata in an openraft group whose log and vote live on
//! our WAL (`meta`), internal RPC between nodes (`rpc`, `network`), the client server
//! (`server`), and the node itself (`node`), which routes requests and runs the background
//! loops. Every metadata decision is made by `walrus_core::cluster`; this crate only drives it.

pub mod meta;
pub mod network;
pub mod node;
pub mod rpc;
pub mod server;
pub mod start;
