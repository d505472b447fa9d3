//! Internal RPC between nodes: Raft messages, forwarded metadata proposals, joins, and the data
//! path (forwarded PUTs, segment reads). One TCP listener per node (the raft port); frames are
//! `[u32 LE length][bincode body]`, bounded by [`RPC_FRAME_MAX`] before anything is allocated.
//! Every call has a timeout: a partitioned peer costs a bounded wait, never a hang.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bincode::Options;
use openraft::error::InstallSnapshotError;
use openraft::error::RaftError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use walrus_core::cluster::metadata::Command;

use crate::meta::{MetaResponse, TypeConfig};

/// Largest RPC frame: 64 MiB (a Raft append batch or a segment read).
pub const RPC_FRAME_MAX: usize = 64 << 20;

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcRequest {
    /// Raft replication.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<u64>),
    /// Raft snapshot transfer.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A metadata command for the Raft leader to propose.
    Propose(Command),
    /// A new node asks to join: add it as a learner, then as a voter.
    Join {
        /// Its node id.
        id: u64,
        /// Its internal RPC address.
        raft_addr: String,
        /// Its client address.
        client_addr: String,
    },
    /// PUTs (one atomic batch) forwarded to the leader of the topic's open segment.
    Put {
        /// Topic.
        topic: String,
        /// The level to acknowledge at.
        durability: walrus_core::wire::Durability,
        /// Payloads, in order.
        #[serde(with = "payloads")]
        payloads: Vec<Vec<u8>>,
    },
    /// Segment leader → replica: store these entries of a segment at `position`.
    Replicate {
        /// Topic.
        topic: String,
        /// Segment id.
        segment: u64,
        /// The epoch the sender leads; a replica fenced past it refuses.
        epoch: u64,
        /// Fsync before answering (a write acknowledged at an fsync level on a node whose
        /// store does not fsync every write).
        sync: bool,
        /// Segment-relative position of the first entry.
        position: u64,
        /// The entries, in order.
        payloads: Entries,
    },
    /// Recovery coordinator (the metadata leader) → replica: refuse the segment's epochs below
    /// `epoch` from now on, and report the entries held durably.
    Fence {
        /// Topic.
        topic: String,
        /// Segment id.
        segment: u64,
        /// The recovery's epoch.
        epoch: u64,
    },
    /// Recovery coordinator → replica: the segment is sealed at `len`; fetch what is missing
    /// from `donor` (and the other replicas) and report the entries held.
    SealAt {
        /// Topic.
        topic: String,
        /// Segment id.
        segment: u64,
        /// The sealed count.
        len: u64,
        /// A replica that holds `len` entries.
        donor: u64,
    },
    /// Read entries of a segment this node holds.
    Read {
        /// Topic.
        topic: String,
        /// Segment id.
        segment: u64,
        /// Position in the segment.
        position: u64,
        /// Entries wanted.
        count: u64,
    },
    /// Ask the leader of a topic's open segment to report its committed length now.
    ReportCommitted {
        /// Topic.
        topic: String,
    },
    /// Liveness probe from the metadata leader.
    Ping,
    /// A segment leader asks the metadata leader to grant (renew) its leases: every open
    /// segment it leads, in one request, confirmed with one metadata round.
    LeaseGrant {
        /// The holder.
        holder: u64,
        /// The segments asked for.
        segments: Vec<LeaseAsk>,
    },
    /// A segment leader, before its first lease in this process, asks a replica how many
    /// entries of the segment it holds.
    Held {
        /// Topic.
        topic: String,
        /// Segment id.
        segment: u64,
    },
    /// A new metadata leader asks how long ago this node last heard from a metadata leader
    /// (answered only once this node has seen `term`, so it refuses older leaders from then on).
    LeaderContact {
        /// The new leader's Raft term.
        term: u64,
    },
    /// A node that started empty asks for this node's Raft term and the voters it knows,
    /// before it takes any Raft append (see `Node::takes_raft_append`).
    RaftTerm,
    /// Recovery coordinator → replica fenced at `epoch`: before the seal is proposed, hold the
    /// first `len` entries durably, fetching what is missing from `donor` (and the other
    /// replicas); answer with the entries held.
    CopyTo {
        /// Topic.
        topic: String,
        /// Segment id.
        segment: u64,
        /// The recovery's epoch.
        epoch: u64,
        /// The length the recovery will seal at.
        len: u64,
        /// A replica that holds `len` entries.
        donor: u64,
    },
}

/// One segment in a [`RpcRequest::LeaseGrant`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAsk {
    /// Topic.
    pub topic: String,
    /// Segment id.
    pub segment: u64,
    /// The epoch the holder leads.
    pub epoch: u64,
}

/// The answer to an [`RpcRequest`], variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcResponse {
    /// Raft replication.
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// Raft election.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// Raft snapshot transfer.
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// Result of a proposal.
    Propose(Result<MetaResponse, String>),
    /// Result of a join.
    Join(Result<(), String>),
    /// The topic-wide offset of the first entry of a forwarded PUT batch.
    Put(Result<u64, String>),
    /// Entries of the segment the replica now holds durably (fewer than asked: it lacks
    /// entries before `position`, which the leader sends next).
    Replicate(Result<ReplicaHeld, String>),
    /// Entries read.
    Read(#[serde(with = "payloads_result")] Result<Vec<Vec<u8>>, String>),
    /// Result of a commit report.
    ReportCommitted(Result<(), String>),
    /// Answer to a probe.
    Pong,
    /// The request was refused: this node may not answer it now (a vote, while its Raft log
    /// catches up after it started empty).
    Refused(String),
    /// Result of a lease request: the request as a whole, then each segment in the order
    /// asked.
    LeaseGrant(Result<Vec<Result<(), String>>, String>),
    /// Entries of the fenced segment the replica holds durably.
    Fence(Result<u64, String>),
    /// Entries of the sealed segment the replica holds now (a catch-up may still be running).
    SealAt(Result<u64, String>),
    /// Entries of the segment held here (written).
    Held(u64),
    /// Milliseconds since this node last heard from a metadata leader; `None` while it has
    /// not yet seen the asker's term.
    LeaderContact(Option<u64>),
    /// This node's current Raft term and the voters of its membership (id, RPC address).
    RaftTerm {
        /// The term of its vote.
        term: u64,
        /// The voters, in id order.
        voters: Vec<(u64, String)>,
    },
    /// Entries of the fenced segment the replica holds durably after the copy (fewer than
    /// asked: the copy is still running).
    CopyTo(Result<u64, String>),
}

/// What a replica holds of a segment after a `Replicate`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ReplicaHeld {
    /// Entries written (at least in its page cache).
    pub written: u64,
    /// Entries known fsynced (`written` when its store fsyncs every write or it just synced;
    /// otherwise 0: not known).
    pub durable: u64,
}

/// A list of payloads serialized as byte strings: bincode then writes each as one length and
/// one copy (the derived form of `Vec<u8>` goes byte by byte, which dominated the profile of
/// a replicated write). The encoding is the same bytes as the derived one.
struct Payloads<'a>(&'a [Vec<u8>]);

impl Serialize for Payloads<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|p| serde_bytes::Bytes::new(p)))
    }
}

/// `#[serde(with)]` for `Vec<Vec<u8>>` fields: see [`Payloads`].
mod payloads {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        super::Payloads(v).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        // The decoder's size limit bounds every length before it is allocated.
        let v: Vec<serde_bytes::ByteBuf> = Deserialize::deserialize(d)?;
        Ok(v.into_iter().map(serde_bytes::ByteBuf::into_vec).collect())
    }
}

/// `#[serde(with)]` for `Result<Vec<Vec<u8>>, String>`: encoded as the derived `Result` is.
mod payloads_result {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    #[serde(rename = "Result")]
    enum Out<'a> {
        Ok(super::Payloads<'a>),
        Err(&'a str),
    }

    #[derive(Deserialize)]
    #[serde(rename = "Result")]
    enum In {
        Ok(#[serde(with = "super::payloads")] Vec<Vec<u8>>),
        Err(String),
    }

    pub fn serialize<S: Serializer>(
        v: &Result<Vec<Vec<u8>>, String>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Ok(p) => Out::Ok(super::Payloads(p)),
            Err(e) => Out::Err(e),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Result<Vec<Vec<u8>>, String>, D::Error> {
        Ok(match In::deserialize(d)? {
            In::Ok(p) => Ok(p),
            In::Err(e) => Err(e),
        })
    }
}

/// The entries of a `Replicate`, encoded like a `payloads` list. The sender builds them from
/// slices of shared batches (what the leader staged or read: no copy per replica); the
/// receiver decodes them into one flat buffer (one allocation, not one per entry).
#[derive(Debug, Clone)]
pub enum Entries {
    /// Ranges of shared batches, in order.
    Shared(Vec<SharedRange>),
    /// Entries back to back in `data`; entry `i` ends at `ends[i]`.
    Flat {
        /// The entries' bytes.
        data: Vec<u8>,
        /// End of each entry in `data`.
        ends: Vec<usize>,
    },
}

/// `batch[range]` of a shared batch.
pub type SharedRange = (Arc<Vec<Vec<u8>>>, std::ops::Range<usize>);

impl Default for Entries {
    fn default() -> Entries {
        Entries::Shared(Vec::new())
    }
}

impl Entries {
    /// Owned entries as one shared batch.
    pub fn from_vecs(v: Vec<Vec<u8>>) -> Entries {
        let n = v.len();
        Entries::Shared(vec![(Arc::new(v), 0..n)])
    }

    /// Appends `batch[range]` (a `Shared` list only; a `Flat` one is left as it is).
    pub fn push_shared(&mut self, batch: Arc<Vec<Vec<u8>>>, range: std::ops::Range<usize>) {
        if let Entries::Shared(parts) = self {
            if !range.is_empty() {
                parts.push((batch, range));
            }
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            Entries::Shared(parts) => parts.iter().map(|(_, r)| r.len()).sum(),
            Entries::Flat { ends, .. } => ends.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total payload bytes.
    pub fn bytes(&self) -> usize {
        self.iter().map(<[u8]>::len).sum()
    }

    /// The entries, in order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = &[u8]> + '_> {
        match self {
            Entries::Shared(parts) => Box::new(
                parts
                    .iter()
                    .flat_map(|(b, r)| b[r.clone()].iter().map(Vec::as_slice)),
            ),
            Entries::Flat { data, ends } => {
                Box::new(ends.iter().scan(0usize, move |start, &end| {
                    let e = &data[*start..end];
                    *start = end;
                    Some(e)
                }))
            }
        }
    }
}

impl Serialize for Entries {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for e in self.iter() {
            seq.serialize_element(serde_bytes::Bytes::new(e))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Entries, D::Error> {
        struct Seq;
        impl<'de> serde::de::Visitor<'de> for Seq {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of byte strings")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Entries, A::Error> {
                // Capacity from the claimed count only up to a small bound: the decoder's size
                // limit, not the claim, bounds what is allocated.
                let mut ends = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                let mut data = Vec::new();
                while seq.next_element_seed(AppendTo(&mut data))?.is_some() {
                    ends.push(data.len());
                }
                Ok(Entries::Flat { data, ends })
            }
        }
        d.deserialize_seq(Seq)
    }
}

/// Decodes one byte string onto the end of a buffer.
struct AppendTo<'a>(&'a mut Vec<u8>);

impl<'de> serde::de::DeserializeSeed<'de> for AppendTo<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> serde::de::Visitor<'de> for AppendTo<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a byte string")
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.0.extend_from_slice(v);
        Ok(())
    }
    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<(), E> {
        self.0.extend_from_slice(&v);
        Ok(())
    }
}

/// bincode settings for RPC bodies: fixed-width integers and a size limit on decode.
pub fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(RPC_FRAME_MAX as u64)
}

/// Writes one frame holding `msg`.
pub async fn write_msg<T: Serialize>(stream: &mut TcpStream, msg: &T) -> io::Result<()> {
    let frame = encode_frame(msg)?;
    stream.write_all(&frame).await?;
    // A no-op on a kernel socket; the simulator's streams send on flush.
    stream.flush().await
}

/// `[u32 LE length][bincode body]`, encoded straight into one buffer.
fn encode_frame<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let bad = |e: bincode::Error| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let len = codec().serialized_size(msg).map_err(bad)?;
    if len > RPC_FRAME_MAX as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "rpc message over the frame limit",
        ));
    }
    let mut frame = Vec::with_capacity(len as usize + 4);
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    codec().serialize_into(&mut frame, msg).map_err(bad)?;
    Ok(frame)
}

/// Decodes one frame body.
fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<T> {
    codec()
        .deserialize(body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad rpc frame: {e}")))
}

/// Reads one frame and decodes it; `Ok(None)` on a clean end of stream.
pub async fn read_msg<T: for<'de> Deserialize<'de>>(
    stream: &mut TcpStream,
) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > RPC_FRAME_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("rpc frame of {len} bytes is over the limit"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    decode_body(&body).map(Some)
}

/// Connections to one peer: each call takes an idle one (or opens a new one) for itself, so
/// calls never wait for each other. A lease renewal or a fence is not queued behind replication
/// rounds of other segments, and a push's rounds in flight each have their own connection.
pub struct RpcClient {
    addr: String,
    idle: std::sync::Mutex<Vec<TcpStream>>,
    /// Bounds the calls in flight (and so the connections open) to the peer.
    in_flight: Semaphore,
}

/// Idle connections kept per peer; more are opened while needed, then closed.
pub const IDLE_CONNECTIONS_MAX: usize = 16;

/// Calls in flight to one peer at most; a call past it waits (within its timeout) for a slot.
pub const CALLS_IN_FLIGHT_MAX: usize = 256;

impl RpcClient {
    /// A client for `addr` (`host:port`); nothing is connected yet.
    pub fn new(addr: String) -> RpcClient {
        RpcClient {
            addr,
            idle: std::sync::Mutex::new(Vec::new()),
            in_flight: Semaphore::new(CALLS_IN_FLIGHT_MAX),
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `req` and waits at most `timeout` (all of it: for a slot, the connection, the
    /// answer) for the answer. Errors of kind `ConnectionRefused` mean the peer is down.
    ///
    /// Cancel-safe: the stream is the call's own until a whole answer was read, and only then
    /// goes back to the idle ones, so a call dropped midway (its caller timed out) never leaves
    /// a stale answer for the next call to read.
    pub async fn call(&self, req: &RpcRequest, timeout: Duration) -> io::Result<RpcResponse> {
        let mut reused = false;
        let result = tokio::time::timeout(timeout, async {
            let _slot = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| io::Error::other("rpc client closed"))?;
            let idle = self.idle().pop();
            let mut stream = match idle {
                Some(s) => {
                    reused = true;
                    s
                }
                None => {
                    let s = TcpStream::connect(&self.addr).await?;
                    s.set_nodelay(true)?;
                    s
                }
            };
            write_msg(&mut stream, req).await?;
            let answer = read_msg(&mut stream).await?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection")
            })?;
            Ok((stream, answer))
        })
        .await;
        match result {
            Ok(Ok((stream, answer))) => {
                let mut idle = self.idle();
                if idle.len() < IDLE_CONNECTIONS_MAX {
                    idle.push(stream);
                }
                Ok(answer)
            }
            // The stream (dropped here) may hold half a message: never reuse it. A kept
            // connection that failed says the peer went away (restarted, say): the other kept
            // ones are as stale, so they go too rather than fail one call each.
            Ok(Err(e)) => {
                if reused {
                    self.idle().clear();
                }
                Err(e)
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("rpc to {} timed out", self.addr),
            )),
        }
    }
}

/// Clients by address, shared by everything that talks to peers.
#[derive(Default, Clone)]
pub struct Peers {
    clients: Arc<std::sync::Mutex<HashMap<String, Arc<RpcClient>>>>,
}

impl Peers {
    /// The client for `addr`, created on first use.
    pub fn get(&self, addr: &str) -> Arc<RpcClient> {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(addr.to_string())
            .or_insert_with(|| Arc::new(RpcClient::new(addr.to_string())))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload_lists() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)
    }

    /// The payload lists as the derived serde would encode them (each byte a sequence element).
    #[derive(Serialize)]
    struct Derived(Vec<Vec<u8>>);

    proptest! {
        #[test]
        fn replicate_round_trips_and_every_truncation_is_an_error(
            payloads in payload_lists(),
            position in any::<u64>(),
        ) {
            // Sent as two slices of shared batches, as a leader sends staged entries.
            let cut = payloads.len() / 2;
            let mut entries = Entries::from_vecs(payloads[..cut].to_vec());
            let rest = Arc::new(payloads[cut..].to_vec());
            entries.push_shared(rest.clone(), 0..rest.len());
            let req = RpcRequest::Replicate {
                topic: "t".into(),
                segment: 3,
                epoch: 2,
                sync: true,
                position,
                payloads: entries,
            };
            let frame = encode_frame(&req).unwrap();
            let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
            prop_assert_eq!(len, frame.len() - 4);
            match decode_body::<RpcRequest>(&frame[4..]).unwrap() {
                RpcRequest::Replicate { position: p, payloads: got, .. } => {
                    prop_assert_eq!(p, position);
                    let flat = matches!(got, Entries::Flat { .. });
                    prop_assert!(flat, "decoded entries are flat");
                    prop_assert_eq!(got.len(), payloads.len());
                    let got: Vec<Vec<u8>> = got.iter().map(<[u8]>::to_vec).collect();
                    prop_assert_eq!(got, payloads.clone());
                }
                other => prop_assert!(false, "decoded {:?}", other),
            }
            for cut in 4..frame.len() {
                prop_assert!(decode_body::<RpcRequest>(&frame[4..cut]).is_err());
            }
        }

        #[test]
        fn read_answers_round_trip_and_keep_the_derived_encoding(
            payloads in payload_lists(),
            err in any::<bool>(),
        ) {
            let r = if err { Err("no such segment".to_string()) } else { Ok(payloads.clone()) };
            let body = codec().serialize(&RpcResponse::Read(r.clone())).unwrap();
            match decode_body::<RpcResponse>(&body).unwrap() {
                RpcResponse::Read(got) => prop_assert_eq!(got, r),
                other => prop_assert!(false, "decoded {:?}", other),
            }
            // Byte strings are encoded exactly as the derived `Vec<u8>` was.
            let ours = codec().serialize(&Payloads(&payloads)).unwrap();
            let entries = codec().serialize(&Entries::from_vecs(payloads.clone())).unwrap();
            let derived = codec().serialize(&Derived(payloads)).unwrap();
            prop_assert_eq!(&ours, &derived);
            prop_assert_eq!(entries, derived);
        }

        #[test]
        fn lease_grants_round_trip_and_every_truncation_is_an_error(
            asks in prop::collection::vec(("[a-z]{0,12}", any::<u64>(), any::<u64>()), 0..40),
            holder in any::<u64>(),
            granted in prop::collection::vec(any::<bool>(), 0..40),
        ) {
            let segments: Vec<LeaseAsk> = asks
                .into_iter()
                .map(|(topic, segment, epoch)| LeaseAsk { topic, segment, epoch })
                .collect();
            let frame = encode_frame(&RpcRequest::LeaseGrant { holder, segments: segments.clone() })
                .unwrap();
            match decode_body::<RpcRequest>(&frame[4..]).unwrap() {
                RpcRequest::LeaseGrant { holder: h, segments: got } => {
                    prop_assert_eq!(h, holder);
                    prop_assert_eq!(got, segments);
                }
                other => prop_assert!(false, "decoded {:?}", other),
            }
            for cut in 4..frame.len() {
                prop_assert!(decode_body::<RpcRequest>(&frame[4..cut]).is_err());
            }
            let answers: Vec<Result<(), String>> = granted
                .iter()
                .map(|&g| if g { Ok(()) } else { Err("not the leader".to_string()) })
                .collect();
            let frame = encode_frame(&RpcResponse::LeaseGrant(Ok(answers.clone()))).unwrap();
            match decode_body::<RpcResponse>(&frame[4..]).unwrap() {
                RpcResponse::LeaseGrant(got) => prop_assert_eq!(got, Ok(answers)),
                other => prop_assert!(false, "decoded {:?}", other),
            }
            for cut in 4..frame.len() {
                prop_assert!(decode_body::<RpcResponse>(&frame[4..cut]).is_err());
            }
        }

        #[test]
        fn raft_terms_round_trip_and_every_truncation_is_an_error(
            term in any::<u64>(),
            voters in prop::collection::vec((any::<u64>(), "[a-z0-9.:]{0,20}"), 0..10),
        ) {
            let frame = encode_frame(&RpcResponse::RaftTerm { term, voters: voters.clone() })
                .unwrap();
            match decode_body::<RpcResponse>(&frame[4..]).unwrap() {
                RpcResponse::RaftTerm { term: t, voters: v } => {
                    prop_assert_eq!(t, term);
                    prop_assert_eq!(v, voters);
                }
                other => prop_assert!(false, "decoded {:?}", other),
            }
            for cut in 4..frame.len() {
                prop_assert!(decode_body::<RpcResponse>(&frame[4..cut]).is_err());
            }
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_body::<RpcRequest>(&body);
            let _ = decode_body::<RpcResponse>(&body);
        }
    }

    #[test]
    fn a_huge_payload_length_is_refused_before_allocation() {
        // A Replicate whose one payload claims u64::MAX - 1 bytes.
        let req = RpcRequest::Replicate {
            topic: "t".into(),
            segment: 0,
            epoch: 0,
            sync: false,
            position: 0,
            payloads: Entries::from_vecs(vec![vec![7]]),
        };
        let mut body = codec().serialize(&req).unwrap();
        let at = body.len() - 1 - 8;
        body[at..at + 8].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(decode_body::<RpcRequest>(&body).is_err());
    }
}
