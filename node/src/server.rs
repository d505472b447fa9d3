//! The two listeners of a node: the client server (the walrus wire protocol) and the internal
//! RPC server. Both bound every connection: frames are checked against their limit before any
//! buffering, connections are capped by a semaphore, and every request has a deadline.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use walrus_core::wire::{
    encode_reply, parse_command, put_frame, put_offset_reply, take_frame, Command, Reply,
};

use crate::node::{Node, Turn};
use crate::rpc::{read_msg, write_msg, RpcRequest, RpcResponse};

/// Most client connections served at once; more wait in the accept queue.
pub const CLIENT_CONNECTIONS_MAX: usize = 1024;
/// Most requests of one client connection in flight at once (pipelining); the bytes held per
/// connection are bounded by this times the frame limit.
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
    // PUT runs started and not yet answered, oldest first, with their request counts. They run
    // concurrently (one run's group commit and replication overlap the next one's), each taking
    // its offsets after the run before it (`Turn`); replies go out in request order.
    let mut runs = FuturesOrdered::new();
    let mut in_flight = 0usize;
    let mut last_turn = None;
    let mut eof = false;
    loop {
        // Start a run for every stretch of buffered PUTs to one topic, while there is room.
        let mut used = 0usize;
        let mut next = Next::More;
        while in_flight < PIPELINE_REQUESTS_MAX {
            let room =
                (PIPELINE_REQUESTS_MAX - in_flight).min(walrus_core::limits::BATCH_ENTRIES_MAX);
            next = put_run_at(&buf[used..], frame_max, room);
            let Next::Run { bytes, count } = next else {
                break;
            };
            let raw = buf[used..used + bytes].to_vec();
            used += bytes;
            in_flight += count;
            runs.push_back(put_run(node, raw, count, Turn::next(&mut last_turn)));
        }
        buf.drain(..used);
        match next {
            Next::Other | Next::Broken(_) => {
                // Anything but a PUT runs alone, after everything before it is answered.
                while let Some((out, count)) = runs.next().await {
                    write_out(&mut stream, &out).await?;
                    in_flight -= count;
                }
                let mut out = Vec::new();
                if let Next::Broken(reason) = next {
                    // The stream can no longer be trusted as frames: say why and hang up.
                    put_frame(&mut out, &encode_reply(&Reply::Err(reason)));
                    write_out(&mut stream, &out).await?;
                    return Ok(());
                }
                // `put_run_at` saw a whole frame here.
                if let Ok(Some((body, n))) = take_frame(&buf, frame_max) {
                    let reply = handle(node, body).await;
                    if matches!(reply, Reply::Err(_)) {
                        node.count_error();
                    }
                    put_frame(&mut out, &encode_reply(&reply));
                    write_out(&mut stream, &out).await?;
                    buf.drain(..n);
                }
                continue;
            }
            Next::Run { .. } | Next::More => {}
        }
        if eof && runs.is_empty() {
            return Ok(());
        }
        let reading = !eof && in_flight < PIPELINE_REQUESTS_MAX;
        tokio::select! {
            Some((out, count)) = runs.next(), if !runs.is_empty() => {
                write_out(&mut stream, &out).await?;
                in_flight -= count;
            }
            n = stream.read(&mut chunk), if reading => {
                let n = n?;
                if n == 0 {
                    eof = true;
                } else {
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }
}

async fn write_out(stream: &mut TcpStream, out: &[u8]) -> std::io::Result<()> {
    stream.write_all(out).await?;
    // A no-op on a kernel socket; the simulator's streams send on flush.
    stream.flush().await
}

/// What the buffered bytes start with.
enum Next {
    /// `count` PUTs to one topic (at most `room`, at least one), in the first `bytes` bytes.
    Run { bytes: usize, count: usize },
    /// A whole frame of another command (or a malformed one, which `handle` answers).
    Other,
    /// Not a whole frame yet.
    More,
    /// A frame over the limit: the stream is out of step.
    Broken(String),
}

fn put_run_at(buf: &[u8], frame_max: usize, room: usize) -> Next {
    let mut topic = None;
    let (mut bytes, mut count) = (0, 0);
    while count < room {
        match take_frame(&buf[bytes..], frame_max) {
            Ok(Some((body, n))) => match parse_command(body) {
                Ok(Command::Put(t, _)) if topic.is_none_or(|first| first == t) => {
                    topic = Some(t);
                    bytes += n;
                    count += 1;
                }
                _ => break,
            },
            Ok(None) => break,
            Err(e) if count == 0 => return Next::Broken(e.to_string()),
            Err(_) => break,
        }
    }
    if count > 0 {
        Next::Run { bytes, count }
    } else if matches!(take_frame(buf, frame_max), Ok(Some(_))) {
        Next::Other
    } else {
        Next::More
    }
}

/// Appends a run of `count` PUTs to one topic (their frames, `raw`) as one atomic batch (one
/// group commit, offsets in request order) and returns their reply frames.
async fn put_run(node: &Node, raw: Vec<u8>, count: usize, turn: Turn) -> (Vec<u8>, usize) {
    let mut topic = "";
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(count);
    let mut at = 0;
    // `put_run_at` checked these frames already.
    while let Ok(Some((body, n))) = take_frame(&raw[at..], usize::MAX) {
        if let Ok(Command::Put(t, p)) = parse_command(body) {
            topic = t;
            payloads.push(p);
        }
        at += n;
    }
    let timeout = node.config().request_timeout;
    let level = node.config().durability;
    let result = match tokio::time::timeout(
        timeout,
        node.put_batch_in_turn(topic, &payloads, level, false, turn),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    };
    let mut out = Vec::with_capacity(count * 16);
    match result {
        Ok(first) => {
            for k in 0..count as u64 {
                put_offset_reply(&mut out, first + k);
            }
        }
        Err(e) => {
            let frame = encode_reply(&Reply::Err(e));
            for _ in 0..count {
                node.count_error();
                put_frame(&mut out, &frame);
            }
        }
    }
    (out, count)
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

/// Why a node that started empty refuses a Raft append (see `Node::takes_raft_append`).
const RAFT_FLOOR_REFUSAL: &str =
    "this node started empty and takes raft appends only from a term a majority has reached";

async fn rpc(node: &Arc<Node>, req: RpcRequest) -> RpcResponse {
    let raft = node.raft();
    match req {
        RpcRequest::AppendEntries(r) => {
            if !node.takes_raft_append(r.vote.leader_id.term) {
                return RpcResponse::Refused(RAFT_FLOOR_REFUSAL.into());
            }
            node.note_leader_contact(r.vote.leader_id.term);
            node.note_leader_commit(
                r.leader_commit.map(|l| (l.leader_id.term, l.index)),
                r.vote.leader_id.term,
            );
            RpcResponse::AppendEntries(raft.append_entries(r).await)
        }
        RpcRequest::Vote(r) => {
            if node.raft_caught_up() {
                RpcResponse::Vote(raft.vote(r).await)
            } else {
                RpcResponse::Refused(
                    "this node started empty and its raft log has not caught up: it does not \
                     vote yet"
                        .into(),
                )
            }
        }
        RpcRequest::InstallSnapshot(r) => {
            if !node.takes_raft_append(r.vote.leader_id.term) {
                return RpcResponse::Refused(RAFT_FLOOR_REFUSAL.into());
            }
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
        } => RpcResponse::Fence(node.fence(&topic, segment, epoch).await),
        RpcRequest::SealAt {
            topic,
            segment,
            len,
            donor,
        } => RpcResponse::SealAt(Ok(node.seal_at(&topic, segment, len, donor))),
        RpcRequest::CopyTo {
            topic,
            segment,
            epoch,
            len,
            donor,
        } => RpcResponse::CopyTo(node.copy_to(&topic, segment, epoch, len, donor).await),
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
        RpcRequest::LeaseGrant { holder, segments } => {
            RpcResponse::LeaseGrant(node.grant_leases(holder, &segments).await)
        }
        RpcRequest::Held { topic, segment } => RpcResponse::Held(
            node.local_entry_count(&topic, walrus_core::cluster::SegmentId(segment)),
        ),
        RpcRequest::LeaderContact { term } => RpcResponse::LeaderContact(node.leader_contact(term)),
        RpcRequest::RaftTerm => {
            let m = raft.metrics().borrow().clone();
            let voters = m
                .membership_config
                .membership()
                .voter_ids()
                .filter_map(|id| {
                    m.membership_config
                        .membership()
                        .get_node(&id)
                        .map(|n| (id, n.addr.clone()))
                })
                .collect();
            RpcResponse::RaftTerm {
                term: m.current_term,
                voters,
            }
        }
    }
}
