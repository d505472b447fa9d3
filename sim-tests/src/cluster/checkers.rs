//! Tier B checkers. Every 100 simulated ms each running node is sampled (its Raft metrics, its
//! applied metadata, its local segment data) and every local append since the last sample is
//! inspected. Each property is named after the spec invariant it mirrors (`spec/`,
//! `DistributedWalrus.tla`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use madsim::time::{sleep, Instant};
use walrus_core::cluster::SegmentId;

use super::{World, SAMPLE_EVERY};

/// A broken property.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Violation {
    /// The property (named after the spec invariant).
    pub checker: String,
    /// What was seen.
    pub detail: String,
}

/// What the samples of one run have established so far.
#[derive(Default)]
pub struct Samples {
    /// Raft leader ids (term, node) seen leading.
    leaders: BTreeSet<(u64, u64)>,
    /// Applied index -> (hash of the metadata at it, the node it was first seen on).
    metadata_at: BTreeMap<u64, (u32, u64)>,
    /// (topic, segment) -> (base offset, entries) once seen sealed.
    sealed: BTreeMap<(String, u64), (u64, u64)>,
    /// Sealed segments that a failover sealed (their epoch was bumped).
    recovered: BTreeSet<(String, u64)>,
    /// Replica sets of sealed segments as last seen, and how often one changed (a replica
    /// moved off a dead node).
    sealed_replicas: BTreeMap<(String, u64), Vec<u64>>,
    replica_moves: u64,
    /// The applied index at which each sealed segment's replica set was last recorded (a
    /// lagging node must not count an old set as a change back).
    replicas_seen_at: BTreeMap<(String, u64), Option<u64>>,
    /// (topic, segment) -> the node that appended to it.
    writer: BTreeMap<(String, u64), u64>,
    /// topic -> first offset -> (entries, node, segment) of every successful local append.
    appended: BTreeMap<String, BTreeMap<u64, (u64, u64, u64)>>,
}

/// A sealed segment as one node's metadata shows it.
struct SealedSeen {
    topic: String,
    seg: u64,
    base: u64,
    entries: u64,
    leader: Option<u64>,
    epoch: u64,
    replicas: Vec<u64>,
}

/// Samples every running node until aborted.
pub async fn sample_loop(world: Arc<World>) {
    loop {
        sleep(SAMPLE_EVERY).await;
        if let Err(v) = sample(&world) {
            world.fail(&v.checker, v.detail);
        }
    }
}

fn running(world: &World) -> Vec<(u64, Arc<walrus_node::node::Node>)> {
    let down = world.down.lock().unwrap().clone();
    (0..world.cfg.nodes)
        .filter(|i| !down.contains(i))
        .filter_map(|i| walrus_node::sim::node(i as u64 + 1).map(|n| (i as u64 + 1, n)))
        .collect()
}

fn violation(checker: &str, detail: String) -> Result<(), Violation> {
    Err(Violation {
        checker: checker.to_string(),
        detail,
    })
}

/// Acknowledged means durable on a majority of the segment's replicas (`quorum-fsync`): checked
/// whenever every replica of the segment holding a topic's highest acknowledged offset runs
/// (followers never shrink their copy, so this holds from the acknowledgement on).
fn check_quorum(world: &World) -> Result<(), Violation> {
    if world.cfg.replication_factor < 2 || world.cfg.planted != super::Planted::None {
        return Ok(());
    }
    let highest = world.oracle.lock().unwrap().highest_acked();
    let nodes: BTreeMap<u64, Arc<walrus_node::node::Node>> = running(world).into_iter().collect();
    // The most up-to-date metadata among the running nodes.
    let Some(any) = nodes
        .values()
        .max_by_key(|n| n.state_machine().read_applied(|idx, _| idx))
    else {
        return Ok(());
    };
    for (t, off) in highest {
        let name = super::client::topic_name(t);
        let seg = any.state_machine().read(|md| {
            md.topic(&name).and_then(|tm| {
                tm.segments
                    .iter()
                    .rev()
                    .find(|s| s.base_offset <= off)
                    // A lagging view may not know the segment that holds `off` yet.
                    .filter(|s| s.sealed_entries().is_none_or(|n| off < s.base_offset + n))
                    .map(|s| (s.id, s.base_offset, s.replicas.clone()))
            })
        });
        let Some((id, base, replicas)) = seg else {
            continue;
        };
        // A wiped replica lost its copy (the others still hold it: the end-to-end read back
        // checks that nothing acknowledged was lost).
        let wiped = world.wiped.lock().unwrap().clone();
        if replicas.len() < 2
            || !replicas.iter().all(|r| nodes.contains_key(&r.0))
            || replicas.iter().any(|r| wiped.contains(&r.0))
        {
            continue;
        }
        let holding = replicas
            .iter()
            .filter(|r| nodes[&r.0].local_entry_count(&name, id) > off - base)
            .count();
        let need = walrus_core::cluster::majority(replicas.len());
        if holding < need {
            return violation(
                "acknowledged entries are durable on a majority of replicas",
                format!(
                    "{name} offset {off} (segment {}) is held by {holding} of replicas {:?}, \
                     fewer than {need}",
                    id.0,
                    replicas.iter().map(|r| r.0).collect::<Vec<_>>()
                ),
            );
        }
    }
    Ok(())
}

fn sample(world: &World) -> Result<(), Violation> {
    check_quorum(world)?;
    let mut s = world.samples.lock().unwrap();
    let appends = walrus_node::sim::take_appends();
    for a in &appends {
        world.trace(format!(
            "append node {} {} seg {} epoch {} @{}+{}",
            a.node, a.topic, a.segment, a.epoch, a.first, a.count
        ));
    }
    let seal_of = |topic: &str, seg: u64| -> Option<u64> {
        running(world).into_iter().find_map(|(_, n)| {
            n.state_machine().read(|md| {
                md.topic(topic)
                    .and_then(|t| t.segments.iter().find(|x| x.id.0 == seg))
                    .and_then(|x| x.sealed_entries().map(|e| x.base_offset + e))
            })
        })
    };
    let wiped = world.wiped.lock().unwrap().clone();
    check_appends(&mut s, appends, seal_of, &wiped)?;
    for (id, node) in running(world) {
        let m = node.raft().metrics().borrow().clone();
        if m.state.is_leader() {
            // openraft identifies a leader by (term, node id): candidates of one term may lead
            // it in turn, each elected by a quorum, so a leader id names one node by
            // construction. Election safety in that form: a node acts as leader only under its
            // own leader id, with the vote committed (granted by a quorum).
            let lid = m.vote.leader_id();
            let term = m.current_term;
            if !m.vote.is_committed() || lid.voted_for() != Some(id) {
                return violation(
                    "Raft election safety (one leader per leader id)",
                    format!(
                        "node {id} leads term {term} without a quorum's vote: {}",
                        m.vote
                    ),
                );
            }
            s.leaders.insert((term, id));
        }
        let seen = node.state_machine().read_applied(|idx, md| {
            let sealed: Vec<SealedSeen> = md
                .topics()
                .iter()
                .flat_map(|(name, t)| {
                    t.segments.iter().filter_map(move |seg| {
                        seg.sealed_entries().map(|n| SealedSeen {
                            topic: name.clone(),
                            seg: seg.id.0,
                            base: seg.base_offset,
                            entries: n,
                            leader: seg.leader().map(|l| l.0),
                            epoch: seg.epoch.0,
                            replicas: seg.replicas.iter().map(|r| r.0).collect(),
                        })
                    })
                })
                .collect();
            let cursors: Vec<(String, u64, u64)> = md
                .topics()
                .iter()
                .map(|(name, t)| (name.clone(), t.cursor, t.readable_end()))
                .collect();
            (
                idx,
                crc32c::crc32c(&md.encode_snapshot()),
                md.check_invariants(),
                sealed,
                cursors,
            )
        });
        let (idx, hash, invariants, sealed, cursors) = seen;
        if let Err(e) = invariants {
            return violation(
                "metadata invariants (segments chain gaplessly, one open segment per topic)",
                format!("node {id} at applied index {idx:?}: {e}"),
            );
        }
        if let Some(idx) = idx {
            match s.metadata_at.get(&idx) {
                Some(&(h, first)) if h != hash => {
                    return violation(
                        "metadata identical on all nodes at the same applied index",
                        format!("index {idx}: node {first} has {h:08x}, node {id} has {hash:08x}"),
                    );
                }
                Some(_) => {}
                None => {
                    s.metadata_at.insert(idx, (hash, id));
                }
            }
        }
        for (topic, cursor, end) in cursors {
            if cursor > end {
                return violation(
                    "cursors within bounds",
                    format!("node {id}: {topic} cursor {cursor} past its readable end {end}"),
                );
            }
        }
        for SealedSeen {
            topic,
            seg,
            base,
            entries,
            leader,
            epoch,
            replicas,
        } in sealed
        {
            let key = (topic.clone(), seg);
            match s.sealed_replicas.get(&key) {
                Some(was)
                    if *was != replicas
                        && idx > s.replicas_seen_at.get(&key).copied().flatten() =>
                {
                    s.replica_moves += 1;
                    s.sealed_replicas.insert(key.clone(), replicas);
                    s.replicas_seen_at.insert(key.clone(), idx);
                }
                Some(_) => {}
                None => {
                    s.sealed_replicas.insert(key.clone(), replicas);
                    s.replicas_seen_at.insert(key.clone(), idx);
                }
            }
            if epoch > 0 {
                s.recovered.insert(key.clone());
            }
            match s.sealed.get(&key) {
                Some(&was) if was != (base, entries) => {
                    return violation(
                        "sealed segments never change",
                        format!(
                            "{topic} segment {seg} sealed as (base {}, {} entries), node {id} \
                             now says (base {base}, {entries} entries)",
                            was.0, was.1
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    s.sealed.insert(key, (base, entries));
                }
            }
            // The leader must still hold every sealed entry. It may hold more: a write that
            // failed (its fsync did) stays in the page cache, and a restart's recovery replays
            // it past the seal; readers never see it, since reads stop at the sealed count.
            if leader == Some(id) && !world.wiped.lock().unwrap().contains(&id) {
                let local = node.local_entry_count(&topic, SegmentId(seg));
                if local < entries {
                    return violation(
                        "sealed segments never change",
                        format!(
                            "{topic} segment {seg} is sealed at {entries} entries but its \
                             leader, node {id}, stores only {local}"
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// At most one node appends to a segment, and no successful (durable) append is ever
/// overwritten by a later one at the same offsets, unless a failover sealed its segment before
/// those offsets (they were never acknowledged: the leader's lease had run out, or no quorum
/// held them, and readers stop at the seal). `seal_of` gives a segment's sealed end offset.
/// A node in `wiped` lost every write it made before its disk went, durable or not: its own
/// earlier appends do not count against its later ones (whether what it lost was
/// acknowledged is the end-to-end oracle's to judge).
fn check_appends(
    s: &mut Samples,
    appends: Vec<walrus_node::sim::Append>,
    seal_of: impl Fn(&str, u64) -> Option<u64>,
    wiped: &BTreeSet<u64>,
) -> Result<(), Violation> {
    for a in appends {
        let key = (a.topic.clone(), a.segment);
        match s.writer.get(&key) {
            Some(&w) if w != a.node => {
                return violation(
                    "at most one node accepting writes per segment",
                    format!(
                        "{} segment {}: appended on node {w} and on node {}",
                        a.topic, a.segment, a.node
                    ),
                );
            }
            Some(_) => {}
            None => {
                s.writer.insert(key, a.node);
            }
        }
        let ranges = s.appended.entry(a.topic.clone()).or_default();
        let end = a.first + a.count;
        while let Some((&f, &(n, node, seg))) = ranges.range(..end).next_back() {
            if f + n <= a.first {
                break;
            }
            if node == a.node && wiped.contains(&node) {
                ranges.remove(&f);
                continue;
            }
            // Past the seal of an earlier segment: void, trim it and look again.
            if let Some(sealed_end) =
                seal_of(&a.topic, seg).filter(|&e| e <= a.first && seg != a.segment)
            {
                ranges.remove(&f);
                if sealed_end > f {
                    ranges.insert(f, (sealed_end - f, node, seg));
                }
                continue;
            }
            {
                return violation(
                    "no acknowledged entry lost or changed",
                    format!(
                        "{}: offsets {}..{} were durably appended on node {node}, then \
                         {}..{end} were appended again on node {} (the first write was lost)",
                        a.topic,
                        f,
                        f + n,
                        a.first,
                        a.node
                    ),
                );
            }
        }
        ranges.insert(a.first, (a.count, a.node, a.segment));
    }
    Ok(())
}

/// Waits (bounded) until every node runs, knows the same Raft leader, and has applied the same
/// metadata.
pub async fn converged(world: &World, bound: Duration) -> Result<(), String> {
    let deadline = Instant::now() + bound;
    let mut last = String::new();
    while Instant::now() < deadline {
        let nodes = running(world);
        if nodes.len() == world.cfg.nodes {
            let views: BTreeSet<(Option<u64>, Option<u64>, u32)> = nodes
                .iter()
                .map(|(_, n)| {
                    let leader = n.raft().metrics().borrow().current_leader;
                    n.state_machine().read_applied(|idx, md| {
                        (leader, idx, crc32c::crc32c(&md.encode_snapshot()))
                    })
                })
                .collect();
            if views.len() == 1 && views.iter().all(|v| v.0.is_some()) {
                return Ok(());
            }
            last = format!("views (leader, applied, hash): {views:?}");
        } else {
            last = format!("{} of {} nodes running", nodes.len(), world.cfg.nodes);
        }
        sleep(Duration::from_millis(200)).await;
    }
    Err(format!("not converged within {bound:?}: {last}"))
}

/// (metadata leaders observed, segments seen sealed).
pub fn final_counts(world: &World) -> (u64, u64, u64, u64) {
    let s = world.samples.lock().unwrap();
    (
        s.leaders.len() as u64,
        s.sealed.len() as u64,
        s.recovered.len() as u64,
        s.replica_moves,
    )
}

/// Every running node's Raft view, for failure messages: `node: state term leader applied`.
pub fn raft_views(world: &World) -> String {
    running(world)
        .iter()
        .map(|(id, n)| {
            let m = n.raft().metrics().borrow().clone();
            let c = n.counters();
            format!(
                "node {id}: {:?} term {} vote {} leader {:?} last log {:?} applied {:?}, rpc \
                 connections {} in flight {}",
                m.state,
                m.current_term,
                m.vote,
                m.current_leader,
                m.last_log_index,
                m.last_applied.map(|l| l.index),
                c.rpc_connections.load(std::sync::atomic::Ordering::Relaxed),
                c.rpc_in_flight.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
