//! The two listeners of a node: the client server (the walrus wire protocol) and the internal
//! RPC server. Both bound every connection: frames are checked against their limit before any
//! buffering, connections are capped by a semaphore, and every request has a deadline.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use walrus_core::wire::{
    encode_reply, parse_command, put_frame, put_offset_reply, take_frame, Command, Reply,
};

use crate::node::Node;
use crate::rpc::{read_msg, write_msg, RpcRequest, RpcResponse};

/// Most client connections served at once; more wait in the accept queue.
pub const CLIENT_CONNECTIONS_MAX: usize = 1024;
/// Most requests of one client connection answered in one round (pipelining); the bytes in
/// flight per connection are bounded by this times the frame limit.
pub const PIPELINE_REQUESTS_MAX: usize = 64;
/// Most internal RPC connections served at once.
pub const RPC_CONNECTIONS_MAX: usize = 256;

/// Serves clients on `listener` until the process ends.
pub async fn serve_clients(node: Arc<Node>, listener: TcpListener, frame_max: usize) {
    let slots = Arc::new(Semaphore::new(CLIENT_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = client_connection(&node, stream, frame_max).await {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
            drop(permit);
        });
    }
}

async fn client_connection(
    node: &Node,
    mut stream: TcpStream,
    frame_max: usize,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(8 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Take every whole frame already buffered (a pipelining client sends many at once).
        let mut bodies: Vec<&[u8]> = Vec::new();
        let mut used = 0usize;
        let mut broken: Option<String> = None;
        while bodies.len() < PIPELINE_REQUESTS_MAX {
            match take_frame(&buf[used..], frame_max) {
                Ok(Some((body, n))) => {
                    bodies.push(body);
                    used += n;
                }
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        let mut out = Vec::new();
        handle_all(node, &bodies, &mut out).await;
        if let Some(reason) = broken {
            // The stream can no longer be trusted as frames: say why and hang up.
            put_frame(&mut out, &encode_reply(&Reply::Err(reason)));
            stream.write_all(&out).await?;
            stream.flush().await?;
            return Ok(());
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            // A no-op on a kernel socket; the simulator's streams send on flush.
            stream.flush().await?;
        }
        buf.drain(..used);
        if bodies_were_capped(used, &buf) {
            continue;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether whole frames are still buffered (the previous round stopped at the pipeline cap).
fn bodies_were_capped(used: usize, rest: &[u8]) -> bool {
    used > 0 && matches!(take_frame(rest, usize::MAX), Ok(Some(_)))
}

/// Answers pipelined requests in order, as reply frames appended to `out`. Consecutive `PUT`s
/// to one topic become one atomic batch append (one group commit, offsets in request order);
/// everything else runs one by one.
async fn handle_all(node: &Node, bodies: &[&[u8]], out: &mut Vec<u8>) {
    let reply = |out: &mut Vec<u8>, r: &Reply| {
        if matches!(r, Reply::Err(_)) {
            node.count_error();
        }
        put_frame(out, &encode_reply(r));
    };
    let mut i = 0;
    while i < bodies.len() {
        if let Ok(Command::Put(topic, _)) = parse_command(bodies[i]) {
            let mut payloads: Vec<&[u8]> = Vec::new();
            let mut j = i;
            while j < bodies.len() && payloads.len() < walrus_core::limits::BATCH_ENTRIES_MAX {
                match parse_command(bodies[j]) {
                    Ok(Command::Put(t, p)) if t == topic => payloads.push(p),
                    _ => break,
                }
                j += 1;
            }
            if payloads.len() > 1 {
                let timeout = node.config().request_timeout;
                let level = node.config().durability;
                let result = match tokio::time::timeout(
                    timeout,
                    node.put_batch(topic, &payloads, level, false),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
                };
                match &result {
                    Ok(first) => {
                        for k in 0..payloads.len() as u64 {
                            put_offset_reply(out, first + k);
                        }
                    }
                    Err(e) => {
                        let err = Reply::Err(e.clone());
                        for _ in 0..payloads.len() {
                            reply(out, &err);
                        }
                    }
                }
                i = j;
                continue;
            }
        }
        reply(out, &handle(node, bodies[i]).await);
        i += 1;
    }
}

async fn handle(node: &Node, body: &[u8]) -> Reply {
    let cmd = match parse_command(body) {
        Ok(c) => c,
        Err(e) => return Reply::Err(e.to_string()),
    };
    let timeout = node.config().request_timeout;
    let work = async {
        match cmd {
            Command::Register(topic) => node
                .propose(walrus_core::cluster::metadata::Command::CreateTopic {
                    name: topic.to_string(),
                })
                .await
                .map(|_| Reply::Ok(None)),
            Command::Put(topic, payload) => node
                .put_batch(topic, &[payload], node.config().durability, false)
                .await
                .map(|offset| Reply::Ok(Some(offset.to_string().into_bytes()))),
            Command::PutWith(level, topic, payload) => node
                .put_batch(topic, &[payload], level, false)
                .await
                .map(|offset| Reply::Ok(Some(format!("{offset} {}", level.name()).into_bytes()))),
            Command::Get(topic) => node.get(topic).await.map(|e| match e {
                Some(data) => Reply::Ok(Some(data)),
                None => Reply::Empty,
            }),
            Command::State(topic) => node
                .state_json(topic)
                .map(|j| Reply::Ok(Some(j.into_bytes()))),
            Command::Metrics => Ok(Reply::Ok(Some(node.metrics_json().into_bytes()))),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(reason)) => Reply::Err(reason),
        Err(_) => Reply::Err(format!("timed out after {} ms", timeout.as_millis())),
    }
}

/// Serves internal RPC on `listener` until the process ends.
pub async fn serve_rpc(node: Arc<Node>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(RPC_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let c = node.counters();
            c.rpc_connections.fetch_add(1, Ordering::Relaxed);
            loop {
                let req: RpcRequest = match read_msg(&mut stream).await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "rpc connection dropped");
                        break;
                    }
                };
                // A handler stuck past any caller's patience would hold its connection slot
                // forever: drop it (the caller sees the connection close) and free the slot.
                let limit = node.config().request_timeout * 2;
                c.rpc_in_flight.fetch_add(1, Ordering::Relaxed);
                let handled = tokio::time::timeout(limit, rpc(&node, req)).await;
                c.rpc_in_flight.fetch_sub(1, Ordering::Relaxed);
                let Ok(resp) = handled else {
                    tracing::warn!("an rpc handler ran past {limit:?}; closing its connection");
                    break;
                };
                if write_msg(&mut stream, &resp).await.is_err() {
                    break;
                }
            }
            c.rpc_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

async fn rpc(node: &Arc<Node>, req: RpcRequest) -> RpcResponse {
    let raft = node.raft();
    match req {
        RpcRequest::AppendEntries(r) => {
            node.note_leader_contact(r.vote.leader_id.term);
            node.note_leader_commit(r.leader_commit.map(|l| l.index));
            RpcResponse::AppendEntries(raft.append_entries(r).await)
        }
        RpcRequest::Vote(r) => RpcResponse::Vote(raft.vote(r).await),
        RpcRequest::InstallSnapshot(r) => {
            node.note_leader_contact(r.vote.leader_id.term);
            RpcResponse::InstallSnapshot(raft.install_snapshot(r).await)
        }
        RpcRequest::Propose(cmd) => RpcResponse::Propose(match raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(e) => Err(format!("not the metadata leader: {e}")),
        }),
        RpcRequest::Join {
            id,
            raft_addr,
            client_addr,
        } => RpcResponse::Join(node.join(id, raft_addr, client_addr).await),
        RpcRequest::Put {
            topic,
            durability,
            payloads,
        } => {
            let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
            RpcResponse::Put(node.put_batch(&topic, &refs, durability, true).await)
        }
        RpcRequest::Replicate {
            topic,
            segment,
            epoch,
            sync,
            position,
            payloads,
        } => RpcResponse::Replicate(
            node.store_replica(&topic, segment, epoch, sync, position, &payloads)
                .await,
        ),
        RpcRequest::Fence {
            topic,
            segment,
            epoch,
        } => RpcResponse::Fence(Ok(node.fence(&topic, segment, epoch).await)),
        RpcRequest::SealAt {
            topic,
            segment,
            len,
            donor,
        } => RpcResponse::SealAt(Ok(node.seal_at(&topic, segment, len, donor))),
        RpcRequest::Read {
            topic,
            segment,
            position,
            count,
        } => RpcResponse::Read(node.read_local(&topic, segment, position, count)),
        RpcRequest::ReportCommitted { topic } => {
            RpcResponse::ReportCommitted(node.report_committed(&topic).await)
        }
        RpcRequest::Ping => RpcResponse::Pong,
        RpcRequest::LeaseGrant {
            topic,
            segment,
            epoch,
            holder,
        } => RpcResponse::LeaseGrant(node.grant_lease(&topic, segment, epoch, holder).await),
        RpcRequest::Held { topic, segment } => RpcResponse::Held(
            node.local_entry_count(&topic, walrus_core::cluster::SegmentId(segment)),
        ),
        RpcRequest::LeaderContact { term } => RpcResponse::LeaderContact(node.leader_contact(term)),
    }
}
