//! End-to-end tests on real processes: `walrus-node` binaries on loopback with free ports and
//! their own data directories, driven over TCP with the `walrus-cli` client. Every process a
//! test starts is killed by its handle when the test ends; every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use walrus_core::wire::{put_frame, Reply};

#[test]
fn single_node_serves_the_protocol_and_survives_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(7, tmp.path(), None, &[]);
    let mut c = node.client();
    // Right after start the node may not have registered itself yet: `ERR`, then `OK`.
    assert_eq!(eventually(&mut c, b"REGISTER logs"), Reply::Ok(None));
    // Payloads are bytes, kept exactly: spaces, newlines, NULs, invalid UTF-8.
    let payloads: Vec<Vec<u8>> = vec![
        b"hello world".to_vec(),
        b"  two  spaces \n".to_vec(),
        vec![0, 255, 0, 32, 10],
        Vec::new(),
    ];
    for p in &payloads {
        ok(put(&mut c, "logs", p));
    }
    assert_eq!(
        ok(c.request(b"GET logs").unwrap()).unwrap_or_default(),
        payloads[0]
    );
    // Malformed input gets ERR and the connection stays usable.
    assert!(matches!(c.request(b"FROB logs").unwrap(), Reply::Err(_)));
    assert!(matches!(c.request(b"GET no/such").unwrap(), Reply::Err(_)));
    let state = String::from_utf8(ok(c.request(b"STATE logs").unwrap()).unwrap()).unwrap();
    assert!(
        state.contains("\"segments\"") && state.contains("\"epoch\""),
        "{state}"
    );
    let metrics = String::from_utf8(ok(c.request(b"METRICS").unwrap()).unwrap()).unwrap();
    assert!(
        metrics.contains("\"raft\"") && metrics.contains("\"puts\":4"),
        "{metrics}"
    );

    // Restart twice: data and the shared cursor come back.
    for round in 0..2 {
        node.restart();
        let mut c = node.client();
        let want = &payloads[round + 1];
        assert_eq!(
            eventually(&mut c, b"GET logs"),
            Reply::Ok(Some(want.clone())),
            "after restart {round}"
        );
        ok(put(
            &mut c,
            "logs",
            format!("after restart {round}").as_bytes(),
        ));
    }
    let mut c = node.client();
    assert_eq!(eventually(&mut c, b"GET logs"), Reply::Ok(Some(Vec::new())));
    assert_eq!(
        c.request(b"GET logs").unwrap(),
        Reply::Ok(Some(b"after restart 0".to_vec()))
    );
    assert_eq!(
        c.request(b"GET logs").unwrap(),
        Reply::Ok(Some(b"after restart 1".to_vec()))
    );
    assert_eq!(c.request(b"GET logs").unwrap(), Reply::Empty);
}

#[test]
fn an_oversized_frame_gets_err_and_the_connection_is_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let node = NodeProc::start(1, tmp.path(), None, &[]);
    drop(node.client());
    let mut s = TcpStream::connect(node.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Announce 2 MiB (over the 1 MiB default) and follow with bytes that look like frames.
    s.write_all(&(2u32 << 20).to_le_bytes()).unwrap();
    let mut sneaky = Vec::new();
    put_frame(&mut sneaky, b"REGISTER sneaky");
    let _ = s.write_all(&sneaky);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(reply.len() > 4, "an ERR reply comes back before the close");
    assert!(
        reply[4..].starts_with(b"ERR"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    let mut c = node.client();
    assert!(
        matches!(c.request(b"STATE sneaky").unwrap(), Reply::Err(_)),
        "the trailing bytes were never parsed"
    );
}

#[test]
fn three_nodes_rotate_leaders_and_share_one_cursor() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("WALRUS_MAX_SEGMENT_ENTRIES", "4")];
    let n1 = NodeProc::start(10, &tmp.path().join("a"), None, &env);
    drop(n1.client());
    let n2 = NodeProc::start(20, &tmp.path().join("b"), Some(n1.raft_port), &env);
    let mut n3 = NodeProc::start(30, &tmp.path().join("c"), Some(n1.raft_port), &env);
    let mut clients = [n1.client(), n2.client(), n3.client()];
    assert_eq!(
        eventually(&mut clients[1], b"REGISTER events"),
        Reply::Ok(None)
    );
    let total = 20;
    for i in 0..total {
        let c = &mut clients[i % 3];
        let body = format!("PUT events e{i}");
        ok(eventually(c, body.as_bytes()));
    }
    // Segments of 4 entries, leaders round-robin over all three nodes.
    let state =
        String::from_utf8(ok(eventually(&mut clients[0], b"STATE events")).unwrap()).unwrap();
    for id in [10, 20, 30] {
        assert!(
            state.contains(&format!("\"leader\":{id}")),
            "node {id} never led a segment: {state}"
        );
    }
    // GETs from all nodes hand out each entry once, in order.
    let mut got = Vec::new();
    for i in 0..total {
        let r = eventually(&mut clients[(i + 1) % 3], b"GET events");
        got.push(String::from_utf8(ok(r).unwrap()).unwrap());
    }
    let want: Vec<String> = (0..total).map(|i| format!("e{i}")).collect();
    assert_eq!(got, want);
    assert_eq!(clients[2].request(b"GET events").unwrap(), Reply::Empty);

    // A node that is down: requests needing it get ERR quickly, never a hang.
    n3.kill();
    let started = Instant::now();
    for i in 0..6 {
        let r = put(&mut clients[i % 2], "events", b"while down");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a request hung"
        );
        let _ = r;
    }
    n3.restart();
    let mut c3 = n3.client();
    let state = String::from_utf8(ok(eventually(&mut c3, b"STATE events")).unwrap()).unwrap();
    assert!(state.contains("\"segments\""));
}

#[test]
fn bad_flags_and_values_exit_with_code_2() {
    let bin = env!("CARGO_BIN_EXE_walrus-node");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(bin);
        c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.status().unwrap().code()
    };
    assert_eq!(run(&[], &[]), Some(2), "missing --node-id");
    assert_eq!(run(&["--node-id", "x"], &[]), Some(2));
    assert_eq!(
        run(&["--node-id", "1", "--raft-port", "70000"], &[]),
        Some(2)
    );
    assert_eq!(
        run(
            &["--node-id", "1"],
            &[("WALRUS_MAX_SEGMENT_ENTRIES", "lots")]
        ),
        Some(2)
    );
    assert_eq!(
        run(&["--node-id", "1"], &[("WALRUS_MONITOR_CHECK_MS", "0")]),
        Some(2)
    );
}

#[test]
fn stress_eight_writers_one_topic_every_ack_read_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(tmp.path(), &[("WALRUS_MAX_SEGMENT_ENTRIES", "100")]);
    let mut c = nodes[0].client();
    assert_eq!(eventually(&mut c, b"REGISTER stress"), Reply::Ok(None));
    let per_writer = 150usize;
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
    let acked: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|w| {
                let addr = addrs[w % 3].clone();
                s.spawn(move || {
                    let mut c = Client::connect(&addr, Duration::from_secs(5)).unwrap();
                    let mut mine = Vec::new();
                    for i in 0..per_writer {
                        let p = format!("w{w}-{i}");
                        if let Reply::Ok(_) = put(&mut c, "stress", p.as_bytes()) {
                            mine.push(p);
                        }
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let acked_total: usize = acked.iter().map(|v| v.len()).sum();
    assert!(
        acked_total >= 8 * per_writer * 9 / 10,
        "too many PUTs failed: {acked_total}"
    );
    let mut got: Vec<String> = Vec::new();
    for node in &nodes {
        let mut c = node.client();
        got.extend(
            drain(&mut c, "stress", 8 * per_writer)
                .into_iter()
                .map(|p| String::from_utf8(p).unwrap()),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for p in &got {
        assert!(seen.insert(p.clone()), "{p} was delivered twice");
    }
    for p in acked.iter().flatten() {
        assert!(seen.contains(p), "acknowledged {p} was never delivered");
    }
    // Each writer's entries come back in its own order.
    for w in 0..8 {
        let prefix = format!("w{w}-");
        let order: Vec<usize> = got
            .iter()
            .filter_map(|p| p.strip_prefix(&prefix))
            .map(|i| i.parse().unwrap())
            .collect();
        assert!(
            order.windows(2).all(|x| x[0] < x[1]),
            "writer {w} reordered"
        );
    }
    let state = String::from_utf8(ok(c.request(b"STATE stress").unwrap()).unwrap()).unwrap();
    assert!(
        state.matches("\"sealed\":true").count() >= 10,
        "segments of 100 must have rolled: {state}"
    );
}

#[test]
fn multi_topic_hundred_topics_keep_their_order() {
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(tmp.path(), &[("WALRUS_MAX_SEGMENT_ENTRIES", "7")]);
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
    let per_topic = 12usize;
    // (topic, i) of every PUT that was answered ERR before it succeeded.
    let retried = std::sync::Mutex::new(std::collections::HashSet::new());
    std::thread::scope(|s| {
        for t in 0..10 {
            let addr = addrs[t % 3].clone();
            let retried = &retried;
            s.spawn(move || {
                let mut c = Client::connect(&addr, Duration::from_secs(5)).unwrap();
                for i in 0..per_topic {
                    for k in 0..10 {
                        let topic = format!("topic-{}", t * 10 + k);
                        let (r, errors) =
                            eventually_counting(&mut c, format!("PUT {topic} {i}").as_bytes());
                        assert!(matches!(r, Reply::Ok(_)), "{topic}: {r:?}");
                        if errors > 0 {
                            retried.lock().unwrap().insert((t * 10 + k, i));
                        }
                    }
                }
            });
        }
    });
    let retried = retried.into_inner().unwrap();
    let mut c = nodes[1].client();
    for t in 0..100 {
        let mut got = drain(&mut c, &format!("topic-{t}"), per_topic * 2);
        // A retried PUT may have been written by the attempt answered ERR too: then it shows
        // twice, side by side (one writer per topic). Nothing else may repeat or be missing.
        got.dedup_by(|a, b| {
            a == b
                && std::str::from_utf8(a)
                    .ok()
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| retried.contains(&(t, i)))
        });
        let want: Vec<Vec<u8>> = (0..per_topic).map(|i| i.to_string().into_bytes()).collect();
        assert_eq!(got, want, "topic-{t} (retried: {retried:?})");
    }
    // Nothing failed, so no lease may have lapsed: a node leading ~35 open segments renews
    // them all in time (it once renewed them one by one, queued behind replication rounds).
    let all: Vec<&NodeProc> = nodes.iter().collect();
    assert_eq!(
        metric_sum(&all, "failovers"),
        0,
        "a lease lapsed with no fault"
    );
}

#[test]
fn recovery_whole_cluster_restarts_twice_with_data_metadata_and_cursors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(tmp.path(), &[("WALRUS_MAX_SEGMENT_ENTRIES", "5")]);
    let mut c = nodes[0].client();
    for i in 0..30 {
        ok(eventually(&mut c, format!("PUT rec {i}").as_bytes()));
    }
    let first: Vec<Vec<u8>> = drain(&mut c, "rec", 10);
    assert_eq!(first.len(), 10);
    let mut next = 10;
    for round in 0..2 {
        for n in nodes.iter_mut() {
            n.kill();
        }
        for n in nodes.iter_mut() {
            n.spawn(None);
        }
        let mut c = nodes[(round + 1) % 3].client();
        // The cursor comes back where it was: the next GET hands out the next entry.
        for _ in 0..10 {
            let r = eventually(&mut c, b"GET rec");
            assert_eq!(
                r,
                Reply::Ok(Some(next.to_string().into_bytes())),
                "round {round}"
            );
            next += 1;
        }
        let state = String::from_utf8(ok(eventually(&mut c, b"STATE rec")).unwrap()).unwrap();
        assert!(state.contains("\"sealed\":true"), "{state}");
    }
    let mut c = nodes[2].client();
    assert_eq!(eventually(&mut c, b"GET rec"), Reply::Empty);
}

#[test]
fn resilience_a_killed_node_does_not_stop_other_topics_and_rejoins() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(tmp.path(), &[]);
    let mut c = nodes[0].client();
    // One topic per node as segment leader (round-robin at creation).
    let mut leader_of: Vec<(String, u64)> = Vec::new();
    for t in 0..6 {
        let topic = format!("r{t}");
        assert_eq!(
            eventually(&mut c, format!("REGISTER {topic}").as_bytes()),
            Reply::Ok(None)
        );
        ok(eventually(&mut c, format!("PUT {topic} before").as_bytes()));
        let state =
            String::from_utf8(ok(c.request(format!("STATE {topic}").as_bytes()).unwrap()).unwrap())
                .unwrap();
        let leader: u64 = state
            .split("\"leader\":")
            .nth(1)
            .unwrap()
            .split(|ch: char| !ch.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        leader_of.push((topic, leader));
    }
    let victim = 3u64;
    assert!(
        leader_of.iter().any(|(_, l)| *l == victim) && leader_of.iter().any(|(_, l)| *l != victim)
    );
    nodes[2].kill();
    // Writes to topics led elsewhere keep being acknowledged (after at most a metadata
    // election); writes to the victim's topics get ERR, never a hang.
    let mut c = nodes[0].client();
    for (topic, leader) in &leader_of {
        let started = Instant::now();
        let r = if *leader == victim {
            put(&mut c, topic, b"during")
        } else {
            eventually(&mut c, format!("PUT {topic} during").as_bytes())
        };
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{topic}: a request hung"
        );
        if *leader != victim {
            assert!(
                matches!(r, Reply::Ok(_)),
                "{topic} (led by {leader}) stopped: {r:?}"
            );
        } else {
            assert!(
                matches!(r, Reply::Err(_)),
                "{topic} is led by the dead node: {r:?}"
            );
        }
    }
    nodes[2].restart();
    let mut c3 = nodes[2].client();
    for (topic, _) in &leader_of {
        // After a restart an entry is visible once a quorum of its replicas confirms it:
        // `Empty` for a moment is allowed, a wrong or missing entry is not.
        let mut r = Reply::Empty;
        for _ in 0..100 {
            r = eventually(&mut c3, format!("GET {topic}").as_bytes());
            if r != Reply::Empty {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            r,
            Reply::Ok(Some(b"before".to_vec())),
            "{topic} after the rejoin"
        );
    }
}

#[test]
fn replication_quorum_writes_survive_one_follower_down_and_refuse_with_two_down() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(tmp.path(), &[]);
    let mut c = nodes[0].client();
    assert_eq!(eventually(&mut c, b"REGISTER rep"), Reply::Ok(None));
    let mut acked: Vec<Vec<u8>> = Vec::new();
    for i in 0..10 {
        let p = format!("a{i}").into_bytes();
        ok(eventually(&mut c, &[b"PUT rep ".as_slice(), &p].concat()));
        acked.push(p);
    }
    let state = String::from_utf8(ok(eventually(&mut c, b"STATE rep")).unwrap()).unwrap();
    assert!(state.contains("\"durability\":\"quorum-fsync\""), "{state}");
    let leader = open_leader(&mut c, "rep");
    let replicas_part = state.rsplit("\"replicas\":[").next().unwrap();
    let replicas = replicas_part.split(']').next().unwrap();
    assert_eq!(replicas.split(',').count(), 3, "{state}");
    // One follower down: a majority (leader + the other follower) still acknowledges.
    let followers: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    nodes[followers[0] as usize - 1].kill();
    let mut cl = nodes[leader as usize - 1].client();
    for i in 0..20 {
        let p = format!("b{i}").into_bytes();
        let r = eventually(&mut cl, &[b"PUT rep ".as_slice(), &p].concat());
        assert!(
            matches!(r, Reply::Ok(_)),
            "write {i} with one follower down: {r:?}"
        );
        acked.push(p);
    }
    // The leader's STATE names the dead follower as lagging; METRICS counts the pushes.
    let state = String::from_utf8(ok(eventually(&mut cl, b"STATE rep")).unwrap()).unwrap();
    assert!(
        state.contains(&format!("\"lagging_replicas\":[{}]", followers[0])),
        "{state}"
    );
    let metrics = String::from_utf8(ok(eventually(&mut cl, b"METRICS")).unwrap()).unwrap();
    assert!(!metrics.contains("\"replica_pushes\":0"), "{metrics}");
    // Two down: no quorum (for the data, and for the metadata): `ERR`, never a hang.
    nodes[followers[1] as usize - 1].kill();
    let started = Instant::now();
    let r = put(&mut cl, "rep", b"c0");
    assert!(
        matches!(r, Reply::Err(_)),
        "a write with two of three down: {r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the refused write took {:?}",
        started.elapsed()
    );
    // Both back: every acknowledged entry is still there, in order (the refused one may or
    // may not be kept).
    nodes[followers[0] as usize - 1].restart();
    nodes[followers[1] as usize - 1].restart();
    let mut c = nodes[followers[0] as usize - 1].client();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // `Empty` for a moment is allowed while the restarted nodes catch up; bounded.
    while got.len() < acked.len() && Instant::now() < deadline {
        got.extend(
            drain(&mut c, "rep", 100)
                .into_iter()
                .filter(|p| p.as_slice() != b"c0"),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(got, acked);
}

#[test]
fn pipelined_puts_get_offsets_in_request_order_across_rollovers_and_other_commands() {
    let tmp = tempfile::tempdir().unwrap();
    // Segments of 40 entries: the pipeline crosses several seals and leader moves.
    let nodes = cluster(tmp.path(), &[("WALRUS_MAX_SEGMENT_ENTRIES", "40")]);
    let mut c = nodes[0].client();
    ok(eventually(&mut c, b"PUT pipe warm"));
    ok(eventually(&mut c, b"PUT other warm"));
    // One connection, every request sent before any reply is read, in bursts so that the node
    // starts several runs while earlier ones are still being replicated.
    let mut s = TcpStream::connect(nodes[0].addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut expect = Vec::new();
    for burst in 0..10 {
        let mut out = Vec::new();
        for i in 0..30 {
            let n = burst * 30 + i;
            put_frame(&mut out, format!("PUT pipe p{n}").as_bytes());
            expect.push("pipe");
            if n % 37 == 0 {
                put_frame(&mut out, b"PUT other o");
                expect.push("other");
            }
            if n % 101 == 0 {
                put_frame(&mut out, b"STATE pipe");
                expect.push("state");
            }
        }
        s.write_all(&out).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    while replies.len() < expect.len() {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed after {} replies", replies.len());
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        while let Some((body, len)) = walrus_core::wire::take_frame(&buf[used..], 1 << 20).unwrap()
        {
            replies.push(walrus_core::wire::parse_reply(body));
            used += len;
        }
        buf.drain(..used);
    }
    let mut offsets = Vec::new();
    let mut acked = Vec::new();
    for (n, (kind, r)) in expect.iter().zip(&replies).enumerate() {
        match (*kind, r) {
            ("pipe", Reply::Ok(Some(o))) => {
                offsets.push(String::from_utf8_lossy(o).parse::<u64>().unwrap());
                acked.push(n);
            }
            ("state", Reply::Ok(Some(j))) => {
                assert!(String::from_utf8_lossy(j).contains("\"segments\""))
            }
            ("other", Reply::Ok(Some(_))) => {}
            (_, Reply::Err(e)) => panic!("request {n} ({kind}) failed: {e}"),
            (kind, r) => panic!("request {n} ({kind}): unexpected reply {r:?}"),
        }
    }
    // Every PUT acknowledged, at increasing offsets, and read back in request order.
    assert_eq!(offsets.len(), 300);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    let got = drain(&mut c, "pipe", 400);
    let want: Vec<Vec<u8>> = std::iter::once(b"warm".to_vec())
        .chain((0..300).map(|n| format!("p{n}").into_bytes()))
        .collect();
    assert_eq!(got, want);
}

/// A node that started empty with `--join` and has not caught up (here: the node it joins
/// through never answers) records that in its data directory; started again without
/// `--join`, it refuses to run rather than found a cluster of its own or count as caught up.
#[test]
fn a_node_that_has_not_caught_up_since_it_started_empty_needs_join() {
    let tmp = tempfile::tempdir().unwrap();
    let nobody = free_port();
    let mut n = NodeProc::start(2, &tmp.path().join("n2"), Some(nobody), &[]);
    let record = n.dir.join("rejoin");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&record).is_ok_and(|t| t.starts_with("incarnation=")) {
        assert!(Instant::now() < deadline, "no rejoin record written");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(n.exited_within(Duration::from_millis(500)).is_none());
    n.kill();
    n.spawn(None);
    let status = n.exited_within(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "started without --join: {status:?}"
    );
}
