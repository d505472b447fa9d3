//! openraft's network over our internal RPC (`rpc.rs`): one connection per target, used only by
//! Raft so that heartbeats never queue behind data traffic.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use crate::meta::TypeConfig;
use crate::rpc::{RpcClient, RpcRequest, RpcResponse};

/// Creates a [`Network`] per Raft peer.
pub struct NetworkFactory;

/// The connection to one Raft peer.
pub struct Network {
    target: u64,
    client: RpcClient,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Network {
        Network {
            target,
            client: RpcClient::new(node.addr.clone()),
        }
    }
}

type Rpc<T, E = RaftError<u64>> = Result<T, RPCError<u64, BasicNode, E>>;

impl Network {
    async fn send<E: std::error::Error>(
        &self,
        req: RpcRequest,
        option: &RPCOption,
    ) -> Rpc<RpcResponse, E> {
        let ttl = option.hard_ttl().max(Duration::from_millis(1));
        self.client.call(&req, ttl).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })
    }

    /// A peer that refused the request for now: a network error, so openraft retries.
    fn refused<E: std::error::Error>(why: String) -> RPCError<u64, BasicNode, E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other(why)))
    }

    fn mismatch<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
        let e = std::io::Error::new(std::io::ErrorKind::InvalidData, "mismatched rpc response");
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<u64>> {
        match self.send(RpcRequest::AppendEntries(rpc), &option).await? {
            RpcResponse::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            // Not taken from this leader now (a node that started empty), as if unreachable.
            RpcResponse::Refused(why) => Err(Self::refused(why)),
            _ => Err(Self::mismatch()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        match self.send(RpcRequest::InstallSnapshot(rpc), &option).await? {
            RpcResponse::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            RpcResponse::Refused(why) => Err(Self::refused(why)),
            _ => Err(Self::mismatch()),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> Rpc<VoteResponse<u64>> {
        match self.send(RpcRequest::Vote(rpc), &option).await? {
            RpcResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            // No vote from this peer this time, as if it were unreachable.
            RpcResponse::Refused(why) => Err(Self::refused(why)),
            _ => Err(Self::mismatch()),
        }
    }
}
