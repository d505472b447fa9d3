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

/// Replaces `dir/name` whole and durably: `parts` go one after the other into
/// `dir/<name>.tmp`, which is synced, renamed over `name`, and the directory synced.
pub(crate) fn replace_file<D: walrus::Disk>(
    disk: &D,
    dir: &std::path::Path,
    name: &str,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    use walrus::DiskFile;
    let tmp = dir.join(format!("{name}.tmp"));
    let file = disk.open(&tmp, true)?;
    file.set_len(0)?;
    let mut at = 0u64;
    for part in parts {
        file.write_all_at(part, at)?;
        at += part.len() as u64;
    }
    file.sync_data()?;
    disk.rename(&tmp, &dir.join(name))?;
    disk.sync_dir(dir)
}
