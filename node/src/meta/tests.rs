//! Tests of the metadata Raft storage: openraft's conformance suite, durability across a
//! reopen, snapshot round-trip, and a single-node Raft that rebuilds its state from the log.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    BasicNode, CommittedLeaderId, Config, Entry, EntryPayload, LogId, RaftLogReader,
    RaftSnapshotBuilder, ServerState, SnapshotPolicy, StorageError, Vote,
};
use tempfile::TempDir;
use walrus_core::cluster::metadata::{Command, Outcome};
use walrus_core::cluster::NodeId as ClusterNodeId;

use super::{LogStore, MetaResponse, Raft, StateMachine, TypeConfig};

// ---------------------------------------------------------------------------------------------
// 1. openraft's storage conformance suite

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let store = LogStore::open(dir.path()).map_err(|e| openraft::StorageIOError::write(&e))?;
        let sm = StateMachine::open(3, disk(), dir.path())
            .map_err(|e| openraft::StorageIOError::write(&e))?;
        Ok((dir, store, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("storage suite: {e}");
    }
}

fn disk() -> Arc<crate::NodeDisk> {
    Arc::new(walrus::LinuxDisk::new(walrus::Backend::Pwrite))
}

// ---------------------------------------------------------------------------------------------
// 2. durability across a reopen

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn cmd_entry(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::CreateTopic {
            name: format!("topic-{index}"),
        }),
    }
}

/// Appends through `RaftLogStorage::append` and waits for the flush callback.
async fn append(store: &mut LogStore, entries: Vec<Entry<TypeConfig>>) {
    store.blocking_append(entries).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new_committed(3, 1);
    let expect_entries: Vec<Entry<TypeConfig>>;
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        append(&mut store, (0..10).map(|i| cmd_entry(1, i)).collect()).await;
        store.save_vote(&Vote::new(2, 1)).await.unwrap();
        // Entries 7..10 are truncated and only 7..9 replaced by a new leader's: the old entry 9
        // must stay gone.
        store.truncate(log_id(1, 7)).await.unwrap();
        append(&mut store, (7..9).map(|i| cmd_entry(3, i)).collect()).await;
        store.save_vote(&vote).await.unwrap();
        store.purge(log_id(1, 2)).await.unwrap();
        store.save_committed(Some(log_id(3, 8))).await.unwrap();
        expect_entries = store.try_get_log_entries(0..100).await.unwrap();
        assert_eq!(expect_entries.len(), 6, "entries 3..9");
        assert_eq!(expect_entries[0].log_id, log_id(1, 3));
        assert_eq!(expect_entries[4].log_id, log_id(3, 7));
    }
    let mut store = LogStore::open(dir.path()).unwrap();
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(3, 8)));
    assert_eq!(store.read_vote().await.unwrap(), Some(vote));
    assert_eq!(store.read_committed().await.unwrap(), Some(log_id(3, 8)));
    assert_eq!(
        store.try_get_log_entries(0..100).await.unwrap(),
        expect_entries
    );
    assert_eq!(store.try_get_log_entries(..3).await.unwrap(), vec![]);
    assert_eq!(
        store.try_get_log_entries(8..=8).await.unwrap(),
        vec![cmd_entry(3, 8)]
    );

    // Purging everything keeps the purged id as the last log id, also after a reopen.
    store.purge(log_id(3, 8)).await.unwrap();
    drop(store);
    let mut store = LogStore::open(dir.path()).unwrap();
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 8)));
    assert_eq!(state.last_log_id, Some(log_id(3, 8)));
    assert_eq!(store.try_get_log_entries(..).await.unwrap(), vec![]);
}

// ---------------------------------------------------------------------------------------------
// 3. state machine: responses and snapshot round-trip

#[tokio::test]
async fn state_machine_applies_and_snapshot_round_trips() {
    let mut sm = StateMachine::new(3);
    let mut rx = sm.subscribe();
    let entries = vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(1, 2),
            payload: EntryPayload::Normal(Command::RegisterNode {
                node: ClusterNodeId(1),
                addr: "127.0.0.1:1".into(),
            }),
        },
        Entry {
            log_id: log_id(1, 3),
            payload: EntryPayload::Normal(Command::CreateTopic { name: "t".into() }),
        },
        Entry {
            log_id: log_id(1, 4),
            payload: EntryPayload::Normal(Command::DeleteTopic {
                name: "nope".into(),
            }),
        },
    ];
    let responses = sm.apply(entries).await.unwrap();
    assert_eq!(responses.len(), 4);
    assert_eq!(responses[0], MetaResponse { result: None });
    assert_eq!(responses[1].result, Some(Ok(Outcome::NodeRegistered)));
    assert!(matches!(
        responses[2].result,
        Some(Ok(Outcome::TopicCreated { .. }))
    ));
    assert_eq!(responses[3].result, Some(Err("unknown topic".to_string())));
    assert_eq!(sm.last_applied(), Some(log_id(1, 4)));
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 4);

    assert!(sm.get_current_snapshot().await.unwrap().is_none());
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 4)));
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);

    let mut other = StateMachine::new(3);
    let mut receiving = other.begin_receiving_snapshot().await.unwrap();
    receiving
        .get_mut()
        .extend_from_slice(snap.snapshot.get_ref());
    other.install_snapshot(&snap.meta, receiving).await.unwrap();
    assert_eq!(other.last_applied(), Some(log_id(1, 4)));
    assert_eq!(
        other.read(|m| m.clone()),
        sm.read(|m| m.clone()),
        "installed metadata equals the source"
    );
    assert!(other.read(|m| m.topic("t").is_some()));
    let installed = other.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(installed.meta, snap.meta);
    assert_eq!(installed.snapshot.get_ref(), snap.snapshot.get_ref());

    // A corrupt snapshot is a storage error, and leaves the state alone.
    let mut third = StateMachine::new(3);
    let bad = Box::new(io::Cursor::new(vec![1, 2, 3]));
    assert!(third.install_snapshot(&snap.meta, bad).await.is_err());
    assert_eq!(third.last_applied(), None);
}

// ---------------------------------------------------------------------------------------------
// 4. a single-node Raft on the store, rebuilt from the durable log after a restart

/// A network for a single-node cluster: every peer is unreachable (it is never called).
struct NoNetwork;

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoNetwork {
        NoNetwork
    }
}

fn unreachable<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&io::Error::new(
        io::ErrorKind::NotConnected,
        "no network in this test",
    )))
}

impl RaftNetwork<TypeConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable())
    }
}

fn test_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "meta-test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        snapshot_policy: SnapshotPolicy::Never,
        ..Default::default()
    };
    Arc::new(config.validate().unwrap())
}

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// Opens the store in `dir` again once a stopped Raft core has dropped it (and so released
/// the directory).
async fn reopen(dir: &std::path::Path) -> LogStore {
    for _ in 0..100 {
        match LogStore::open(dir) {
            Ok(s) => return s,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
    panic!("the store in {} was never released", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_raft_rebuilds_state_from_log() {
    let dir = tempfile::tempdir().unwrap();
    let members = BTreeMap::from([(1u64, BasicNode::new("127.0.0.1:1"))]);

    let last_index;
    {
        let store = LogStore::open(dir.path()).unwrap();
        let sm = StateMachine::new(3);
        let raft = Raft::new(1, test_config(), NoNetwork, store, sm.clone())
            .await
            .unwrap();
        raft.initialize(members.clone()).await.unwrap();
        raft.wait(WAIT)
            .state(ServerState::Leader, "leader")
            .await
            .unwrap();

        let r = raft
            .client_write(Command::RegisterNode {
                node: ClusterNodeId(1),
                addr: "127.0.0.1:1".into(),
            })
            .await
            .unwrap();
        assert_eq!(r.data.result, Some(Ok(Outcome::NodeRegistered)));
        let r = raft
            .client_write(Command::CreateTopic { name: "t".into() })
            .await
            .unwrap();
        assert!(matches!(
            r.data.result,
            Some(Ok(Outcome::TopicCreated { .. }))
        ));
        // A rejected command is a normal, committed response.
        let r = raft
            .client_write(Command::DeleteTopic {
                name: "missing".into(),
            })
            .await
            .unwrap();
        assert_eq!(r.data.result, Some(Err("unknown topic".into())));
        last_index = r.log_id.index;

        // The response is sent after apply, so the state machine already shows the topic.
        assert!(sm.read(|m| m.topic("t").is_some()));
        assert_eq!(sm.last_applied(), Some(r.log_id));
        assert!(*sm.subscribe().borrow() >= last_index);

        raft.shutdown().await.unwrap();
    }

    let store = reopen(dir.path()).await;
    // Raft saved the committed id durably, so openraft re-applies up to it at startup.
    let mut store = store;
    let committed = store.read_committed().await.unwrap();
    assert!(
        committed.is_some_and(|c| c.index >= last_index),
        "{committed:?}"
    );
    let sm = StateMachine::new(3);
    let raft = Raft::new(1, test_config(), NoNetwork, store, sm.clone())
        .await
        .unwrap();
    match raft.initialize(members).await {
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
        other => panic!("initialize after restart: {other:?}"),
    }
    raft.wait(WAIT)
        .applied_index_at_least(Some(last_index), "re-applied")
        .await
        .unwrap();
    assert!(sm.read(|m| m.topic("t").is_some()));
    assert!(sm.read(|m| m.nodes().contains_key(&ClusterNodeId(1))));

    // And the restarted node leads and accepts writes again.
    leads_and_writes_past(&raft, last_index).await;
    assert!(sm.read(|m| m.topic("u").is_some() && m.topic("t").is_some()));
    raft.shutdown().await.unwrap();
}

/// Waits for `raft` to lead, then has it commit topic `u`, past `last_index`.
async fn leads_and_writes_past(raft: &Raft, last_index: u64) {
    raft.wait(WAIT)
        .state(ServerState::Leader, "leader again")
        .await
        .unwrap();
    let r = raft
        .client_write(Command::CreateTopic { name: "u".into() })
        .await
        .unwrap();
    assert!(r.log_id.index > last_index);
}

/// With snapshots every 100 entries: the log is purged behind them, the store rewritten once
/// its records far outnumber the live ones, and a restarted node starts from the kept
/// snapshot and the entries after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_raft_snapshots_purges_and_restarts_from_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let members = BTreeMap::from([(1u64, BasicNode::new("127.0.0.1:1"))]);
    let config = || {
        let mut c = (*test_config()).clone();
        c.snapshot_policy = SnapshotPolicy::LogsSinceLast(100);
        c.max_in_snapshot_log_to_keep = 10;
        Arc::new(c.validate().unwrap())
    };
    const WRITES: u64 = 5_000;
    let last_index;
    {
        let store = LogStore::open(dir.path()).unwrap();
        let mut reader = store.clone();
        let sm = StateMachine::open(3, disk(), dir.path()).unwrap();
        store.purge_behind(sm.kept_snapshots());
        let raft = Raft::new(1, config(), NoNetwork, store, sm.clone())
            .await
            .unwrap();
        raft.initialize(members.clone()).await.unwrap();
        raft.wait(WAIT)
            .state(ServerState::Leader, "leader")
            .await
            .unwrap();
        let mut last = 0;
        for round in 0..WRITES / 50 {
            let writes = (0..50).map(|k| {
                let raft = raft.clone();
                async move {
                    raft.client_write(Command::RegisterNode {
                        node: ClusterNodeId(1),
                        addr: format!("127.0.0.1:{}", round * 50 + k),
                    })
                    .await
                    .unwrap()
                    .log_id
                    .index
                }
            });
            last = last.max(
                *futures_util::future::join_all(writes)
                    .await
                    .iter()
                    .max()
                    .unwrap(),
            );
        }
        last_index = last;
        raft.wait(WAIT)
            .metrics(
                |m| m.purged.is_some_and(|p| p.index + 200 >= last_index),
                "purged behind a recent snapshot",
            )
            .await
            .unwrap();
        let kept = reader.try_get_log_entries(..).await.unwrap().len();
        assert!(kept < 300, "{kept} entries still in the log");
        // The topics were rewritten at least once (5,000 records > 4,096).
        let current = std::fs::read_to_string(dir.path().join("current")).unwrap();
        assert!(current == "raft-b\n" || current == "raft\n", "{current:?}");
        raft.shutdown().await.unwrap();
    }

    let store = reopen(dir.path()).await;
    let sm = StateMachine::open(3, disk(), dir.path()).unwrap();
    store.purge_behind(sm.kept_snapshots());
    // It starts from its snapshot, before any entry is re-applied.
    assert!(sm
        .last_applied()
        .is_some_and(|l| l.index + 200 >= last_index));
    let raft = Raft::new(1, config(), NoNetwork, store, sm.clone())
        .await
        .unwrap();
    raft.wait(WAIT)
        .applied_index_at_least(Some(last_index), "re-applied")
        .await
        .unwrap();
    // The address of one of the last round's writes.
    let addr = sm
        .read(|m| m.nodes().get(&ClusterNodeId(1)).map(|n| n.addr.clone()))
        .unwrap();
    let port: u64 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert!(port >= WRITES - 50, "{addr}");
    leads_and_writes_past(&raft, last_index).await;
    raft.shutdown().await.unwrap();
}

/// A snapshot file that fails its checksum stops the node from starting on it.
#[test]
fn a_damaged_snapshot_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = vec![0u8; 4];
    bytes.extend_from_slice(b"not a snapshot");
    std::fs::write(dir.path().join("snapshot"), &bytes).unwrap();
    let err = StateMachine::open(3, disk(), dir.path()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

/// A purge waits for a kept snapshot that covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_waits_for_a_kept_snapshot_covering_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    append(&mut store, (0..20).map(|i| cmd_entry(1, i)).collect()).await;
    let (kept_tx, kept) = tokio::sync::watch::channel(Some(5));
    store.purge_behind(kept);
    store.purge(log_id(1, 3)).await.unwrap();
    let mut s2 = store.clone();
    let later = tokio::spawn(async move { s2.purge(log_id(1, 12)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.get_log_state().await.unwrap().last_purged_log_id,
        Some(log_id(1, 3)),
        "purged past the kept snapshot"
    );
    kept_tx.send_replace(Some(12));
    later.await.unwrap().unwrap();
    assert_eq!(
        store.get_log_state().await.unwrap().last_purged_log_id,
        Some(log_id(1, 12))
    );
}
