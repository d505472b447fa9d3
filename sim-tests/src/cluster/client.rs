//! Simulated clients: they speak the real client protocol (`walrus_core::wire`) over madsim TCP
//! to any node, exactly as `walrus-cli` does over a kernel socket, and report every outcome to
//! the oracle.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use madsim::net::TcpStream;
use madsim::time::{sleep, timeout, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walrus_core::wire::{
    encode_command, parse_reply, put_frame, take_frame, Command, Reply, FRAME_LEN_MAX_DEFAULT,
};

use super::{client_addr, World, LIVENESS_BOUND};
use crate::rng::Rng;

/// How long a client waits for one reply (the nodes answer `ERR` after 3 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(6);

/// One client's connections, one per node, opened on demand and dropped on any error.
#[derive(Default)]
pub struct Client {
    conns: BTreeMap<usize, (TcpStream, Vec<u8>)>,
    /// Whether the last request reached the wire (so a failure leaves its outcome unknown).
    pub last_sent: bool,
}

impl Client {
    /// Sends `cmd` to node `node` and waits at most `limit` for the reply.
    pub async fn request(
        &mut self,
        node: usize,
        cmd: &Command<'_>,
        limit: Duration,
    ) -> Result<Reply, String> {
        self.last_sent = false;
        let res = timeout(limit, self.exchange(node, cmd)).await;
        match res {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.conns.remove(&node);
                Err(e)
            }
            Err(_) => {
                // The reply may still come: this stream is out of step now.
                self.conns.remove(&node);
                Err("no reply in time".into())
            }
        }
    }

    async fn exchange(&mut self, node: usize, cmd: &Command<'_>) -> Result<Reply, String> {
        let (stream, buf) = match self.conns.entry(node) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let s = TcpStream::connect(client_addr(node))
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                e.insert((s, Vec::new()))
            }
        };
        let mut frame = Vec::new();
        put_frame(&mut frame, &encode_command(cmd));
        stream
            .write_all(&frame)
            .await
            .map_err(|e| format!("write: {e}"))?;
        stream.flush().await.map_err(|e| format!("flush: {e}"))?;
        self.last_sent = true;
        loop {
            match take_frame(buf, FRAME_LEN_MAX_DEFAULT) {
                Ok(Some((body, used))) => {
                    let reply = parse_reply(body);
                    buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("bad reply frame: {e}")),
            }
            let mut chunk = [0u8; 16 << 10];
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The name of topic `t`.
pub fn topic_name(t: usize) -> String {
    format!("t{t}")
}

/// The payload of `producer`'s `seq`-th PUT: a header naming both, then filler derived from
/// them, so that the oracle can tell a changed entry from a real one.
pub fn payload(topic: usize, producer: usize, seq: u64, len: usize) -> Vec<u8> {
    let mut p = format!("{topic}:{producer}:{seq}:").into_bytes();
    let mut k = seq.wrapping_mul(0x9e37_79b9) ^ producer as u64;
    while p.len() < len {
        k = k.wrapping_mul(6364136223846793005).wrapping_add(1);
        p.push(b'a' + (k >> 59) as u8 % 26);
    }
    p
}

/// The `topic:producer:seq` header of a payload, for the trace.
fn header(p: &[u8]) -> String {
    let n = p.iter().take(40).filter(|&&b| b == b':').count().min(3);
    let end = p
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b':')
        .nth(n.saturating_sub(1))
        .map_or(p.len().min(24), |(i, _)| i);
    String::from_utf8_lossy(&p[..end]).into_owned()
}

/// Registers every topic through any node, retrying until it works (bounded).
async fn register_all(world: &World, client: &mut Client, rng: &mut Rng) -> bool {
    for t in 0..world.cfg.topics {
        let name = topic_name(t);
        let mut ok = false;
        for _ in 0..200 {
            if world.stop_clients.load(Ordering::Acquire) {
                return false;
            }
            let node = rng.below(world.cfg.nodes);
            if let Ok(Reply::Ok(_)) = client
                .request(node, &Command::Register(&name), REPLY_TIMEOUT)
                .await
            {
                ok = true;
                break;
            }
            sleep(Duration::from_millis(200)).await;
        }
        if !ok {
            return false;
        }
    }
    true
}

/// A producer: one PUT at a time to a random topic through a random node, until told to stop.
pub async fn producer(world: Arc<World>, id: usize) {
    let cfg = world.cfg.clone();
    let mut rng = Rng::new(cfg.seed ^ (0x7072_6f64 + id as u64));
    let mut client = Client::default();
    if !register_all(&world, &mut client, &mut rng).await {
        return;
    }
    let mut seq = 0u64;
    while !world.stop_clients.load(Ordering::Acquire) {
        let t = rng.below(cfg.topics);
        let node = rng.below(cfg.nodes);
        let len = rng.range(cfg.payload_min as u64, cfg.payload_max as u64) as usize;
        seq += 1;
        let p = payload(t, id, seq, len);
        let name = topic_name(t);
        world.oracle.lock().unwrap().sent(t, id, seq, p.clone());
        let reply = client
            .request(node, &Command::Put(&name, &p), REPLY_TIMEOUT)
            .await;
        let offset = match &reply {
            Ok(Reply::Ok(Some(o))) => std::str::from_utf8(o).ok().and_then(|s| s.parse().ok()),
            _ => None,
        };
        match (reply, offset) {
            (Ok(Reply::Ok(_)), Some(offset)) => {
                world.trace(format!("ack t{t} p{id} s{seq} @{offset} via {node}"));
                world.oracle.lock().unwrap().acked(t, id, seq, offset);
            }
            (r, _) => {
                world.trace(format!("put failed t{t} p{id} s{seq} via {node}: {r:?}"));
                world.oracle.lock().unwrap().put_failures += 1;
                sleep(Duration::from_millis(rng.range(10, 300))).await;
            }
        }
    }
}

/// A consumer: GETs from a random topic through a random node, until told to stop.
pub async fn consumer(world: Arc<World>, id: usize) {
    let cfg = world.cfg.clone();
    let mut rng = Rng::new(cfg.seed ^ (0x636f_6e73 + id as u64));
    let mut client = Client::default();
    while !world.stop_clients.load(Ordering::Acquire) {
        let t = rng.below(cfg.topics);
        let node = rng.below(cfg.nodes);
        let name = topic_name(t);
        match client
            .request(node, &Command::Get(&name), REPLY_TIMEOUT)
            .await
        {
            Ok(Reply::Ok(Some(p))) => {
                world.trace(format!("get t{t} via {node}: {}", header(&p)));
                if let Err(v) = world.oracle.lock().unwrap().delivered(t, &p) {
                    world.fail(&v.checker, v.detail);
                }
            }
            Ok(Reply::Empty) | Ok(Reply::Ok(None)) => {
                sleep(Duration::from_millis(rng.range(20, 200))).await
            }
            r => {
                world.trace(format!("get t{t} via {node} failed: {r:?}"));
                if r.is_err() && client.last_sent {
                    // Sent, but no reply: the entry may have been handed out and lost in flight.
                    world.oracle.lock().unwrap().get_in_doubt(t);
                }
                sleep(Duration::from_millis(rng.range(20, 300))).await
            }
        }
    }
}

/// Liveness: after healing, one new PUT per topic must be acknowledged within the bound.
pub async fn liveness_writes(world: Arc<World>) -> Result<(), String> {
    let cfg = world.cfg.clone();
    let mut rng = Rng::new(cfg.seed ^ 0x6c69_7665);
    let mut client = Client::default();
    let deadline = Instant::now() + LIVENESS_BOUND;
    for t in 0..cfg.topics {
        let name = topic_name(t);
        let p = payload(t, usize::MAX >> 1, 1, cfg.payload_min);
        world
            .oracle
            .lock()
            .unwrap()
            .sent(t, usize::MAX >> 1, 1, p.clone());
        let mut last = String::new();
        loop {
            if Instant::now() >= deadline {
                return Err(format!(
                    "topic {name} took no write within {LIVENESS_BOUND:?} of healing: {last}"
                ));
            }
            let node = rng.below(cfg.nodes);
            match client
                .request(node, &Command::Put(&name, &p), REPLY_TIMEOUT)
                .await
            {
                Ok(Reply::Ok(Some(o))) => {
                    if let Some(offset) = std::str::from_utf8(&o).ok().and_then(|s| s.parse().ok())
                    {
                        world.trace(format!("liveness ack t{t} @{offset}"));
                        world
                            .oracle
                            .lock()
                            .unwrap()
                            .acked(t, usize::MAX >> 1, 1, offset);
                        break;
                    }
                    last = "OK without an offset".into();
                }
                r => last = format!("{r:?}"),
            }
            sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Reads every topic to its end through the shared cursor (bounded).
pub async fn drain(world: Arc<World>) -> Result<(), String> {
    let cfg = world.cfg.clone();
    let mut rng = Rng::new(cfg.seed ^ 0x6472_6169);
    let mut client = Client::default();
    let deadline = Instant::now() + LIVENESS_BOUND * 4;
    for t in 0..cfg.topics {
        let name = topic_name(t);
        let mut last = String::new();
        loop {
            if Instant::now() >= deadline {
                return Err(format!("draining {name} did not finish: {last}"));
            }
            let node = rng.below(cfg.nodes);
            match client
                .request(node, &Command::Get(&name), REPLY_TIMEOUT)
                .await
            {
                Ok(Reply::Ok(Some(p))) => {
                    world.trace(format!("drain t{t} via {node}: {}", header(&p)));
                    if let Err(v) = world.oracle.lock().unwrap().delivered(t, &p) {
                        world.fail(&v.checker, v.detail);
                        return Ok(());
                    }
                }
                Ok(Reply::Empty) | Ok(Reply::Ok(None)) => break,
                r => {
                    if r.is_err() && client.last_sent {
                        world.oracle.lock().unwrap().get_in_doubt(t);
                    }
                    last = format!("{r:?}");
                    sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    world.trace("drained every topic".into());
    Ok(())
}
