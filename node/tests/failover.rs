//! Failover on real processes: SIGKILL the leader of an open segment while writers run, wipe a
//! node's data directory, and kill a random node every 5 s for a minute. Every acknowledged
//! PUT must read back, in order; a write that fails gets `ERR` within the request timeout (or
//! loses its connection because its node was killed), never a hang.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use walrus_core::wire::Reply;

/// Request timeout the nodes run with (`common::NodeProc` passes 3000 ms).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(3000);

/// What one writer saw.
#[derive(Default)]
struct WriterLog {
    /// Sequence numbers acknowledged `OK`, with when.
    acked: Vec<(u64, Instant)>,
    /// Writes answered `ERR`.
    errs: u64,
    /// Writes whose connection broke (their node was killed).
    lost: u64,
    /// The longest any write took to get an answer (`OK` or `ERR`).
    slowest: Duration,
}

fn payload(topic: &str, writer: usize, seq: u64) -> Vec<u8> {
    format!("{topic}/w{writer}/{seq}").into_bytes()
}

/// Writes `topic/w<id>/<seq>` for increasing `seq` until `stop`, through `addrs` (starting at
/// `first`, moving on when a connection breaks), pausing `pause` between writes.
fn writer(
    addrs: &[String],
    first: usize,
    topic: &str,
    id: usize,
    stop: &AtomicBool,
    pause: Duration,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut which = first % addrs.len();
    let mut conn: Option<Client> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Client::connect(&addrs[which], Duration::from_secs(10)) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    which = (which + 1) % addrs.len();
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let started = Instant::now();
        let r = c.request(&[format!("PUT {topic} ").as_bytes(), &payload(topic, id, seq)].concat());
        match r {
            Ok(Reply::Ok(_)) => log.acked.push((seq, Instant::now())),
            Ok(Reply::Err(_)) => log.errs += 1,
            Ok(other) => panic!("PUT answered {other:?}"),
            Err(_) => {
                log.lost += 1;
                conn = None;
                which = (which + 1) % addrs.len();
            }
        }
        if conn.is_some() {
            log.slowest = log.slowest.max(started.elapsed());
        }
        seq += 1;
        std::thread::sleep(pause);
    }
    log
}

/// GETs `topic` through `c` until every acknowledged write of `logs` (writer id -> log) was
/// delivered (bounded), and checks per writer: every acknowledged sequence number present,
/// once, in increasing order (nothing acknowledged reordered or duplicated). A write that got
/// `ERR` may or may not be kept, and when the forwarding node's timeout ran out while the
/// leader still held it, it may land after the writer's next write: unacknowledged entries
/// are not ordered by this check. The one
/// exception is at-least-once redelivery: a GET whose cursor claim had an unknown outcome (the
/// metadata leader changed under it) hands its entry out, and the next GET may hand out the
/// same one again; such back-to-back repeats are counted and dropped.
fn check_topic(c: &mut Client, topic: &str, logs: &BTreeMap<usize, &WriterLog>) {
    let mut delivered: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    let want: usize = logs.values().map(|l| l.acked.len()).sum();
    let mut seen_acked = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    let prefix = format!("{topic}/w");
    let body = format!("GET {topic}");
    let (mut errs, mut empties, mut redelivered) = (0u64, 0u64, 0u64);
    let mut previous: Option<(usize, u64)> = None;
    let mut last_err = String::new();
    while seen_acked < want && Instant::now() < deadline {
        let p = match c.request(body.as_bytes()).expect("GET") {
            Reply::Ok(Some(p)) => p,
            Reply::Empty => {
                empties += 1;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Reply::Err(e) => {
                errs += 1;
                last_err = e;
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            other => panic!("GET answered {other:?}"),
        };
        {
            let text = String::from_utf8(p).expect("payloads are text");
            let rest = text.strip_prefix(&prefix).expect("a payload of this topic");
            let (w, seq) = rest.split_once('/').expect("writer/seq");
            let (w, seq): (usize, u64) = (w.parse().unwrap(), seq.parse().unwrap());
            if previous.replace((w, seq)) == Some((w, seq)) {
                redelivered += 1;
                continue;
            }
            if logs[&w].acked.binary_search_by_key(&seq, |a| a.0).is_ok() {
                seen_acked += 1;
            }
            delivered.entry(w).or_default().push(seq);
        }
    }
    eprintln!(
        "{topic}: {seen_acked} of {want} acknowledged writes read back; GETs answered ERR \
         {errs} times (last: {last_err:?}), EMPTY {empties} times; {redelivered} redelivered"
    );
    for (w, log) in logs {
        let got: Vec<u64> = delivered
            .get(w)
            .into_iter()
            .flatten()
            .copied()
            .filter(|s| log.acked.binary_search_by_key(s, |a| a.0).is_ok())
            .collect();
        if let Some(i) = got.windows(2).position(|p| p[0] >= p[1]) {
            panic!(
                "{topic} writer {w}: delivered out of order or twice at index {i}: ...{:?}...",
                &got[i.saturating_sub(5)..(i + 6).min(got.len())]
            );
        }
        let missing: Vec<u64> = log
            .acked
            .iter()
            .map(|a| a.0)
            .filter(|s| got.binary_search(s).is_err())
            .collect();
        assert!(
            missing.is_empty(),
            "{topic} writer {w}: {} acknowledged writes missing: {missing:?}",
            missing.len()
        );
    }
}

/// Waits (bounded) until the node behind `c` knows a metadata leader outside `dead`. Until
/// then a GET's cursor claim may have an unknown outcome, and at-least-once hands the same
/// entry out again.
fn wait_metadata_leader_not(c: &mut Client, dead: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = ok(eventually(c, b"METRICS")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        let leader = v["raft"]["current_leader"].as_u64();
        if leader.is_some_and(|l| !dead.contains(&l)) {
            return;
        }
        assert!(Instant::now() < deadline, "no new metadata leader: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn failover_killing_the_open_segments_leader_mid_write_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(tmp.path(), &[]);
    let mut c = nodes[0].client();
    assert_eq!(eventually(&mut c, b"REGISTER fo"), Reply::Ok(None));
    ok(eventually(&mut c, b"PUT fo first"));
    let leader = open_leader(&mut c, "fo");
    // Writers talk to the other two nodes, which forward to the leader, then follow the
    // failover.
    let others: Vec<String> = nodes
        .iter()
        .filter(|n| n.id != leader)
        .map(|n| n.addr())
        .collect();
    let stop = AtomicBool::new(false);
    let killed_at = Mutex::new(None::<Instant>);
    let logs: Vec<WriterLog> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|w| {
                let (others, stop) = (&others, &stop);
                s.spawn(move || writer(others, w, "fo", w, stop, Duration::from_millis(5)))
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        nodes[leader as usize - 1].kill();
        *killed_at.lock().unwrap() = Some(Instant::now());
        std::thread::sleep(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let killed_at = killed_at.lock().unwrap().unwrap();
    let after: Vec<Instant> = logs
        .iter()
        .flat_map(|l| l.acked.iter().map(|a| a.1))
        .filter(|&t| t > killed_at)
        .collect();
    assert!(
        !after.is_empty(),
        "no write was acknowledged after the kill"
    );
    let first_after = after.iter().min().unwrap().duration_since(killed_at);
    eprintln!(
        "first acknowledged write {first_after:?} after SIGKILL of segment leader {leader}; \
         acked {:?}, ERR {:?}",
        logs.iter().map(|l| l.acked.len()).collect::<Vec<_>>(),
        logs.iter().map(|l| l.errs).collect::<Vec<_>>()
    );
    for l in &logs {
        assert!(
            l.slowest < REQUEST_TIMEOUT * 3,
            "a write took {:?}",
            l.slowest
        );
    }
    let live: Vec<&NodeProc> = nodes.iter().filter(|n| n.id != leader).collect();
    assert!(metric_sum(&live, "failovers") >= 1, "no failover counted");
    let mut c = live[0].client();
    let state = String::from_utf8(ok(eventually(&mut c, b"STATE fo")).unwrap()).unwrap();
    assert_ne!(open_leader(&mut c, "fo"), leader, "{state}");
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    let recovered = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["sealed"] == true && s["epoch"].as_u64() > Some(0))
        .count();
    assert!(
        recovered >= 1,
        "no segment was sealed by a failover: {state}"
    );
    let by_writer: BTreeMap<usize, &WriterLog> = logs.iter().enumerate().collect();
    assert_eq!(drain(&mut c, "fo", 1), vec![b"first".to_vec()]);
    check_topic(&mut c, "fo", &by_writer);
    // The old leader comes back as an ordinary member and the topic keeps working.
    nodes[leader as usize - 1].restart();
    let mut c = nodes[leader as usize - 1].client();
    ok(eventually(&mut c, b"PUT fo back"));
}

#[test]
fn failover_a_wiped_node_rejoins_and_is_repopulated() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("WALRUS_MAX_SEGMENT_ENTRIES", "10")];
    let mut nodes = cluster(tmp.path(), &env);
    let mut c = nodes[0].client();
    assert_eq!(eventually(&mut c, b"REGISTER wp"), Reply::Ok(None));
    let mut acked = Vec::new();
    for i in 0..35 {
        let p = format!("e{i}").into_bytes();
        ok(eventually(&mut c, &[b"PUT wp ".as_slice(), &p].concat()));
        acked.push(p);
    }
    // Node 3 loses its disk and comes back through node 1.
    nodes[2].wipe_and_restart();
    let mut c3 = nodes[2].client();
    for i in 35..40 {
        let p = format!("e{i}").into_bytes();
        ok(eventually(&mut c3, &[b"PUT wp ".as_slice(), &p].concat()));
        acked.push(p);
    }
    // It fetches the sealed segments it belongs to (at least the first 30 entries).
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_sum(&[&nodes[2]], "re_replicated_entries") < 30 {
        assert!(
            Instant::now() < deadline,
            "the wiped node was not repopulated"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(metric_sum(&[&nodes[2]], "re_replications") >= 3);
    // With node 1 gone, the rest (node 3 among them) still serve every entry in order, once
    // they have a new metadata leader (until then a GET's claim could not be confirmed, and
    // at-least-once would hand the same entry out again).
    nodes[0].kill();
    let mut c3 = nodes[2].client();
    wait_metadata_leader_not(&mut c3, &[1]);
    let got = drain_until(&mut c3, "wp", acked.len());
    assert_eq!(got, acked);
}

/// The leader of an open segment loses its disk and is back (with the same id) before its
/// lease could lapse: it must not take the segment up again from an empty store, since writing
/// there would give positions the replicas already hold new entries (and acknowledge them).
/// It finds the replicas ahead of it, asks for no lease, and a failover seals the segment from
/// the replicas.
#[test]
fn failover_a_wiped_open_segment_leader_does_not_take_its_segment_up_again() {
    let tmp = tempfile::tempdir().unwrap();
    // A long lease, so that the wiped node is back well before anyone could replace it.
    let env = [
        ("WALRUS_MAX_SEGMENT_ENTRIES", "10"),
        ("WALRUS_LEASE_MS", "4000"),
    ];
    let mut nodes = cluster(tmp.path(), &env);
    let mut c = nodes[0].client();
    assert_eq!(eventually(&mut c, b"REGISTER wl"), Reply::Ok(None));
    let mut acked = Vec::new();
    // Node 1 bootstrapped the cluster (a wiped node 1 would start a new one): write until
    // another node leads the open segment.
    let mut i = 0;
    while acked.len() < 5 || open_leader(&mut c, "wl") == 1 {
        let p = format!("e{i}").into_bytes();
        ok(eventually(&mut c, &[b"PUT wl ".as_slice(), &p].concat()));
        acked.push(p);
        i += 1;
        assert!(i < 100, "the open segment never moved off node 1");
    }
    let leader = open_leader(&mut c, "wl");
    nodes[leader as usize - 1].wipe_and_restart();
    for _ in 0..5 {
        let p = format!("e{i}").into_bytes();
        ok(eventually(&mut c, &[b"PUT wl ".as_slice(), &p].concat()));
        acked.push(p);
        i += 1;
    }
    let others: Vec<&NodeProc> = nodes.iter().filter(|n| n.id != leader).collect();
    assert!(
        metric_sum(&others, "failovers") >= 1,
        "the wiped leader's segment was not failed over"
    );
    let got = drain_until(&mut c, "wl", acked.len());
    assert_eq!(got, acked);
}

/// Two replicas per segment; returns the cluster, the metadata leader `x`, and the leader `l`
/// and other replica `r` (node indexes) of an open segment of `wr` they both acknowledged
/// entries of (`acked`, in order). Neither `l` nor `r` is `x`, and `r` is not node 1 (a wiped
/// node 1 would found a new cluster).
fn two_replica_segment(
    n: u64,
    dir: &std::path::Path,
) -> (Vec<NodeProc>, usize, usize, u64, Vec<Vec<u8>>) {
    let s = segment_off_the_metadata_leader(n, 2, dir, |_, others| others[0] != 1);
    (s.nodes, s.leader, s.others[0], s.x, s.acked)
}

/// A cluster with an open segment of topic `wr` placed away from the metadata leader.
struct Placed {
    nodes: Vec<NodeProc>,
    /// The metadata leader's id.
    x: u64,
    /// Index in `nodes` of the segment's leader.
    leader: usize,
    /// Indexes of its other replicas.
    others: Vec<usize>,
    /// Payloads acknowledged so far, in order; the last three by every replica.
    acked: Vec<Vec<u8>>,
}

/// Starts `n` nodes with `rf` replicas per segment (of at most 20 entries) and writes to `wr`
/// until its open segment has room left and no replica on the metadata leader, and `accept`
/// (leader id, other replica ids) agrees; then writes three more entries into it.
fn segment_off_the_metadata_leader(
    n: u64,
    rf: u64,
    dir: &std::path::Path,
    accept: impl Fn(u64, &[u64]) -> bool,
) -> Placed {
    let rf = rf.to_string();
    let env = [
        ("WALRUS_MAX_SEGMENT_ENTRIES", "20"),
        ("WALRUS_REPLICATION_FACTOR", rf.as_str()),
    ];
    let nodes = cluster_of(n, dir, &env);
    let mut c = nodes[0].client();
    assert_eq!(eventually(&mut c, b"REGISTER wr"), Reply::Ok(None));
    // The metadata leader stays up throughout.
    let m = ok(eventually(&mut c, b"METRICS")).unwrap();
    let x = serde_json::from_slice::<serde_json::Value>(&m).unwrap()["raft"]["current_leader"]
        .as_u64()
        .unwrap();
    let mut acked = Vec::new();
    let mut i = 0;
    let mut put = |c: &mut Client, acked: &mut Vec<Vec<u8>>| {
        let p = format!("e{i}").into_bytes();
        ok(eventually(c, &[b"PUT wr ".as_slice(), &p].concat()));
        acked.push(p);
        i += 1;
    };
    let (l, others) = loop {
        put(&mut c, &mut acked);
        let state = ok(eventually(&mut c, b"STATE wr")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&state).unwrap();
        let open = v["segments"].as_array().unwrap().last().unwrap().clone();
        let leader = open["leader"].as_u64().unwrap();
        let replicas: Vec<u64> = open["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        let others: Vec<u64> = replicas.iter().copied().filter(|&n| n != leader).collect();
        if !replicas.contains(&x)
            && replicas.len() as u64 == rf.parse::<u64>().unwrap()
            && open["committed"].as_u64().unwrap() <= 8
            && accept(leader, &others)
        {
            break (leader, others);
        }
        assert!(acked.len() < 400, "no open segment placed as wanted: {v}");
    };
    // Acknowledged in that segment (by a majority of its replicas: with two, both).
    for _ in 0..3 {
        put(&mut c, &mut acked);
    }
    Placed {
        nodes,
        x,
        leader: l as usize - 1,
        others: others.iter().map(|&o| o as usize - 1).collect(),
        acked,
    }
}

/// A replica that lost its disk holds none of what it acknowledged, so it must not count in a
/// recovery's fence quorum: sealing from its empty copy would drop acknowledged entries. With
/// two replicas per segment (a fence quorum of one): leader L and replica R acknowledge
/// entries, R loses its disk, L dies, and R comes back empty. The recovery must wait for L.
#[test]
fn failover_a_wiped_replica_does_not_count_in_a_recovery() {
    wiped_replica_while_its_leader_is_down(3, false);
}

/// As above, but R, once it has caught up, restarts again while L is still down: an ordinary
/// restart by then, which must still not count R's empty copy of the older segment. (Four
/// nodes: with three, a wiped node needs both others' Raft terms before it rejoins, so it
/// could not catch up while L is down.)
#[test]
fn failover_a_wiped_replica_does_not_count_in_a_recovery_after_another_restart() {
    wiped_replica_while_its_leader_is_down(4, true);
}

fn wiped_replica_while_its_leader_is_down(nodes: u64, restart_again: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut nodes, l, r, x, acked) = two_replica_segment(nodes, tmp.path());
    nodes[r].kill();
    std::fs::remove_dir_all(&nodes[r].dir).unwrap();
    nodes[l].kill();
    nodes[r].restart();
    if restart_again {
        // R records in its directory when it has caught up; then it restarts.
        let record = nodes[r].dir.join("rejoin");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&record).is_ok_and(|t| t.contains("lost-before=")) {
            assert!(Instant::now() < deadline, "R never recorded its rejoin");
            std::thread::sleep(Duration::from_millis(50));
        }
        nodes[r].restart();
    }
    // Long enough for L's lease to lapse and a failover to start.
    std::thread::sleep(Duration::from_secs(6));
    nodes[l].restart();
    let mut cx = nodes[x as usize - 1].client();
    let got = drain_until(&mut cx, "wr", acked.len());
    assert_eq!(without_retries(got), acked);
}

/// A recovery seals at the longest length it fenced, which may include entries the old leader
/// wrote but never got acknowledged. Those must be on a majority of the replicas before the
/// seal commits: sealed on the old leader alone, they would be lost with it, and readers would
/// stop at them for good (Tier B seed 5943). Three replicas L, A, B of five nodes; a write
/// reaches only L's disk; A answers the fence and freezes; L answers with the longer length. No seal
/// may commit while A cannot take the copy. Then L dies: the recovery fences again, seals at
/// what A and B hold, and the topic reads on past the segment.
#[test]
fn failover_copies_a_tail_only_the_old_leader_holds_before_sealing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let Placed {
        mut nodes,
        x,
        leader: l,
        others,
        acked,
    } = segment_off_the_metadata_leader(5, 3, tmp.path(), |_, _| true);
    let (a, b) = (others[0], others[1]);
    let mut cx = nodes[x as usize - 1].client();
    let mut cl = nodes[l].client();
    let (seg, held) = open_segment_count(&mut cl);

    // Both followers die; a write reaches L's disk only, so it is never acknowledged.
    nodes[a].kill();
    nodes[b].kill();
    let addr = nodes[l].addr();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&addr, Duration::from_secs(5)).unwrap();
        let _ = c.request(b"PUT wr tail");
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_segment_count(&mut cl) != (seg, held + 1) {
        assert!(Instant::now() < deadline, "L never stored the tail");
        std::thread::sleep(Duration::from_millis(20));
    }

    // L dies, so its lease lapses and a recovery starts. A comes back, answers the fence
    // (holding `held` entries), and freezes. (L is restarted, not frozen: a voter frozen for
    // seconds calls an election when it wakes, and a new metadata leader starts the recovery
    // over.)
    nodes[l].kill();
    nodes[a].restart();
    let a_id = (a + 1).to_string();
    let l_id = (l + 1).to_string();
    wait_for_recovery(&mut cx, seg, |r| r["fenced"].get(&a_id).is_some());
    nodes[a].pause();

    // L comes back and answers with the longest length. With L and the two nodes outside the
    // segment, Raft has a majority: a seal could commit now, but only L holds the tail, so the
    // recovery must wait to copy it.
    nodes[l].restart();
    let r = wait_for_recovery(&mut cx, seg, |r| r["fenced"].get(&l_id).is_some());
    assert_eq!(r["fenced"][&l_id], held + 1, "{r}");
    assert_eq!(r["len"], held + 1, "{r}");
    assert_eq!(r["phase"], "copying", "{r}");
    std::thread::sleep(Duration::from_secs(2));
    let (_, open) = segment_state(&mut cx, seg);
    assert!(
        open,
        "sealed while only L held entry {held} of segment {seg}"
    );

    // L dies with the only copy of the tail. A and B come back: the recovery fences again and
    // seals at what they hold; the topic reads on, past the segment, to a new write.
    nodes[l].kill();
    nodes[a].resume();
    nodes[b].restart();
    let _ = writer.join();
    let got = drain_until(&mut cx, "wr", acked.len());
    assert_eq!(without_retries(got), acked);
    ok(eventually(&mut cx, b"PUT wr after"));
    let got = drain_until(&mut cx, "wr", 1);
    assert_eq!(got, vec![b"after".to_vec()]);
    let (count, open) = segment_state(&mut cx, seg);
    assert!(!open);
    assert_eq!(count, held, "sealed with the unacknowledged tail");
}

/// `got` without the second copies of retried PUTs. The setup retries a PUT answered `ERR`,
/// which may have been written all the same; with one sequential writer of distinct payloads,
/// such a copy follows the first at once.
fn without_retries(mut got: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    got.dedup();
    got
}

/// The open segment of `wr` and the entries it holds, as its leader's `STATE` shows them.
fn open_segment_count(c: &mut Client) -> (u64, u64) {
    let state = ok(eventually(c, b"STATE wr")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&state).unwrap();
    let open = v["segments"].as_array().unwrap().last().unwrap().clone();
    (
        open["id"].as_u64().unwrap(),
        open["entry_count"].as_u64().unwrap(),
    )
}

/// Segment `seg` of `wr`: its entry count (sealed: the sealed count) and whether it is open.
fn segment_state(c: &mut Client, seg: u64) -> (u64, bool) {
    let state = ok(eventually(c, b"STATE wr")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&state).unwrap();
    let s = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == seg)
        .unwrap_or_else(|| panic!("no segment {seg}: {v}"))
        .clone();
    (s["entry_count"].as_u64().unwrap(), s["sealed"] == false)
}

/// Polls the metadata leader's `METRICS` until its recovery of segment `seg` satisfies `f`
/// (bounded); returns that recovery.
fn wait_for_recovery(
    c: &mut Client,
    seg: u64,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = ok(eventually(c, b"METRICS")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        if let Some(r) = v["recoveries"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["segment"] == seg && f(r))
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no recovery of segment {seg} as wanted: {}",
            v["recoveries"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replica sets of the sealed segments of `topic`, in chain order, from `STATE`.
fn sealed_replicas(c: &mut Client, topic: &str) -> Vec<Vec<u64>> {
    let state = ok(eventually(c, format!("STATE {topic}").as_bytes())).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&state).unwrap();
    v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["sealed"] == true)
        .map(|s| {
            s["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn failover_sealed_segments_of_a_node_that_stays_down_move_to_another_node() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [
        ("WALRUS_MAX_SEGMENT_ENTRIES", "5"),
        ("WALRUS_RE_REPLICATE_AFTER_MS", "1000"),
    ];
    let mut nodes = cluster_of(5, tmp.path(), &env);
    let mut c = nodes[0].client();
    assert_eq!(eventually(&mut c, b"REGISTER mv"), Reply::Ok(None));
    let mut acked = Vec::new();
    for i in 0..20 {
        let p = format!("m{i}").into_bytes();
        ok(eventually(&mut c, &[b"PUT mv ".as_slice(), &p].concat()));
        acked.push(p);
    }
    // Wait until the four full segments are sealed, then take down a replica of the first.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sealed_replicas(&mut c, "mv").len() < 4 {
        assert!(Instant::now() < deadline, "segments not sealed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = sealed_replicas(&mut c, "mv");
    let victim = *before[0].iter().find(|&&r| r != 1).unwrap();
    nodes[victim as usize - 1].kill();
    // The failure detector marks it dead (about 2 s); 1 s later its sealed segments move.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let now = sealed_replicas(&mut c, "mv");
        if now.iter().all(|r| !r.contains(&victim)) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "node {victim} still holds sealed segments: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(after.iter().all(|r| r.len() == 3), "{after:?}");
    let live: Vec<&NodeProc> = nodes.iter().filter(|n| n.id != victim).collect();
    assert!(metric_sum(&live, "replicas_moved") >= 1);
    // The victim returns; then the two original replicas of the first segment that kept it go
    // down. Only the node it moved to holds it now, and every entry still reads back in order
    // (3 of 5 nodes keep the metadata available).
    nodes[victim as usize - 1].restart();
    drop(nodes[victim as usize - 1].client());
    let moved_to = *after[0].iter().find(|r| !before[0].contains(r)).unwrap();
    let originals: Vec<u64> = after[0]
        .iter()
        .copied()
        .filter(|&r| r != moved_to)
        .collect();
    for &o in &originals {
        nodes[o as usize - 1].kill();
    }
    let mut cz = nodes[moved_to as usize - 1].client();
    wait_metadata_leader_not(&mut cz, &originals);
    let got = drain_until(&mut cz, "mv", acked.len());
    assert_eq!(got, acked, "segment 0 moved from {victim} to {moved_to}");
}

#[test]
fn failover_chaos_a_random_node_killed_every_5s_for_60s_loses_no_acknowledged_write() {
    let seed: u64 = std::env::var("WALRUS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "chaos seed {seed}: replay the kill order with WALRUS_CHAOS_SEED={seed} cargo test \
         -p walrus-node --test failover chaos"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let env = [("WALRUS_MAX_SEGMENT_ENTRIES", "300")];
    let mut nodes = cluster(tmp.path(), &env);
    let topics = ["c0", "c1", "c2", "c3"];
    {
        let mut c = nodes[0].client();
        for t in topics {
            assert_eq!(
                eventually(&mut c, format!("REGISTER {t}").as_bytes()),
                Reply::Ok(None)
            );
        }
    }
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
    let stop = AtomicBool::new(false);
    let mut kills = Vec::new();
    let logs: Vec<WriterLog> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|w| {
                let (addrs, stop) = (&addrs, &stop);
                s.spawn(move || writer(addrs, w, topics[w % 4], w, stop, Duration::from_millis(40)))
            })
            .collect();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_secs(3));
            let victim = rng.gen_range(0..nodes.len());
            nodes[victim].kill();
            kills.push(victim + 1);
            std::thread::sleep(Duration::from_secs(2));
            nodes[victim].restart();
        }
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    let errs: u64 = logs.iter().map(|l| l.errs).sum();
    let lost: u64 = logs.iter().map(|l| l.lost).sum();
    eprintln!(
        "killed nodes {kills:?}; {acked} writes acknowledged, {errs} ERR, {lost} lost their \
         connection to a killed node"
    );
    for (w, l) in logs.iter().enumerate() {
        assert!(
            l.slowest < REQUEST_TIMEOUT * 3,
            "writer {w}: a write took {:?} to be answered",
            l.slowest
        );
    }
    assert!(acked > 0);
    let drain_started = Instant::now();
    // One reader per topic, in parallel (each GET is a Raft write; they batch).
    std::thread::scope(|s| {
        for (i, t) in topics.iter().enumerate() {
            let (logs, node) = (&logs, &nodes[i % nodes.len()]);
            s.spawn(move || {
                let of_topic: BTreeMap<usize, &WriterLog> = logs
                    .iter()
                    .enumerate()
                    .filter(|(w, _)| w % 4 == i)
                    .collect();
                check_topic(&mut node.client(), t, &of_topic);
            });
        }
    });
    let all: Vec<&NodeProc> = nodes.iter().filter(|n| n.is_running()).collect();
    eprintln!(
        "read back in {:?}; failovers {} (counted on the current processes), \
         re-replications {}",
        drain_started.elapsed(),
        metric_sum(&all, "failovers"),
        metric_sum(&all, "re_replications")
    );
}

#[test]
fn durability_levels_per_request_and_quorum_memory_survives_a_leader_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(tmp.path(), &[("WALRUS_DURABILITY", "quorum-memory")]);
    let mut c = nodes[0].client();
    assert_eq!(eventually(&mut c, b"REGISTER dl"), Reply::Ok(None));
    let mut acked = Vec::new();
    // A plain PUT is acknowledged at the node's level; PUTD names its own and the reply says
    // which level was met.
    ok(eventually(&mut c, b"PUT dl p0"));
    acked.push(b"p0".to_vec());
    for (i, level) in ["quorum-fsync", "quorum-memory", "leader-fsync", "none"]
        .iter()
        .enumerate()
    {
        let p = format!("d{i}");
        let r = ok(eventually(
            &mut c,
            format!("PUTD {level} dl {p}").as_bytes(),
        ))
        .unwrap();
        let r = String::from_utf8(r).unwrap();
        assert!(r.ends_with(&format!(" {level}")), "{level}: {r}");
        acked.push(p.into_bytes());
    }
    assert!(matches!(
        c.request(b"PUTD fast dl x").unwrap(),
        Reply::Err(e) if e.contains("unknown durability")
    ));
    let state = String::from_utf8(ok(eventually(&mut c, b"STATE dl")).unwrap()).unwrap();
    assert!(
        state.contains("\"durability\":\"quorum-memory\""),
        "{state}"
    );
    for i in 0..20 {
        let p = format!("m{i}").into_bytes();
        ok(eventually(&mut c, &[b"PUT dl ".as_slice(), &p].concat()));
        acked.push(p);
    }
    // Every acknowledged write was on a majority (in memory): a SIGKILL of the leader (which
    // keeps the page cache) loses none of them.
    let leader = open_leader(&mut c, "dl");
    nodes[leader as usize - 1].kill();
    let survivor = nodes.iter().find(|n| n.id != leader).unwrap();
    let mut cs = survivor.client();
    wait_metadata_leader_not(&mut cs, &[leader]);
    ok(eventually(&mut cs, b"PUT dl after"));
    acked.push(b"after".to_vec());
    let got = drain_until(&mut cs, "dl", acked.len());
    assert_eq!(got, acked);
}
