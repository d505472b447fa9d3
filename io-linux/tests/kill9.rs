//! Real disk, real crash: a child process appends under `SyncEach` and prints every
//! acknowledged offset; the parent kills it with SIGKILL at a random moment, reopens the data
//! directory and requires every acknowledged entry, byte-exact. Repeated over several kill
//! points, each run continuing the same data directory.
//!
//! The child is this same test binary re-executed with `WALRUS_KILL9_CHILD` set, running
//! `kill9_child_process` (which does nothing in a normal run).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use walrus::{FsyncSchedule, Walrus};

const TOPICS: [&str; 3] = ["k0", "k1", "shared"];
/// Kill points per test run.
const ROUNDS: u64 = 6;
/// Upper bound on one round, so a stuck child cannot hang the test.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

fn payload(topic: &str, thread: u64, seq: u64) -> Vec<u8> {
    let mut p = format!("{topic}:{thread}:{seq}:").into_bytes();
    let extra = (seq * 37 % 900) as usize + if seq.is_multiple_of(97) { 70_000 } else { 0 };
    p.resize(p.len() + extra, (seq % 251) as u8);
    p
}

/// The child: two threads append (singles and batches) to their own topic and to a shared one
/// and print `ACK <topic> <offset> <thread> <seq>` for every entry once its append returned.
#[test]
fn kill9_child_process() {
    let Ok(dir) = std::env::var("WALRUS_KILL9_CHILD") else {
        return;
    };
    let start_seq: u64 = std::env::var("WALRUS_KILL9_SEQ").unwrap().parse().unwrap();
    let wal = Walrus::builder()
        .data_dir(&dir)
        .fsync_schedule(FsyncSchedule::SyncEach)
        .segment_bytes(256 << 10)
        .build()
        .unwrap();
    let out = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for thread in 0..2u64 {
            let wal = &wal;
            let out = &out;
            s.spawn(move || {
                use std::io::Write;
                let mut seq = start_seq;
                loop {
                    let topic = if seq.is_multiple_of(3) {
                        "shared"
                    } else {
                        TOPICS[thread as usize]
                    };
                    let n = if seq.is_multiple_of(5) {
                        1 + seq % 7
                    } else {
                        1
                    };
                    let batch: Vec<Vec<u8>> =
                        (0..n).map(|i| payload(topic, thread, seq + i)).collect();
                    let refs: Vec<&[u8]> = batch.iter().map(|b| b.as_slice()).collect();
                    let first = wal.batch_append(topic, &refs).unwrap();
                    let mut o = out.lock().unwrap();
                    for i in 0..n {
                        writeln!(o, "ACK {topic} {} {thread} {}", first + i, seq + i).unwrap();
                    }
                    o.flush().unwrap();
                    seq += n;
                }
            });
        }
    });
}

#[test]
fn sigkill_loses_no_acknowledged_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed: u64 = std::env::var("WALRUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    println!("seed {seed} (replay: WALRUS_SEED={seed} cargo test -p walrus --test kill9)");
    // (topic, offset) -> (thread, seq) of every acknowledged entry, over all rounds.
    let mut acked: HashMap<(String, u64), (u64, u64)> = HashMap::new();
    for round in 0..ROUNDS {
        let kill_after_acks: usize = rng.gen_range(1..3000);
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill9_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("WALRUS_KILL9_CHILD", tmp.path())
            .env("WALRUS_KILL9_SEQ", (round * 10_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let started = Instant::now();
        let mut seen = 0usize;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 5 && f[0] == "ACK" {
                let key = (f[1].to_string(), f[2].parse().unwrap());
                acked.insert(key, (f[3].parse().unwrap(), f[4].parse().unwrap()));
                seen += 1;
            }
            if seen >= kill_after_acks || started.elapsed() > ROUND_TIMEOUT {
                break;
            }
        }
        // SIGKILL exactly the process we started, by its handle.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(seen > 0, "round {round}: the child acknowledged nothing");

        let wal = Walrus::builder()
            .data_dir(tmp.path())
            .segment_bytes(256 << 10)
            .build()
            .unwrap();
        for ((topic, offset), (thread, seq)) in &acked {
            let got = wal.read_from(topic, *offset, 1, usize::MAX).unwrap();
            assert_eq!(
                got.len(),
                1,
                "round {round}: acknowledged {topic}@{offset} is missing"
            );
            assert!(
                got[0].data == payload(topic, *thread, *seq),
                "round {round}: {topic}@{offset} changed"
            );
        }
        // Nothing but whole, well-formed entries past the acknowledged ones either.
        for topic in TOPICS {
            let all = wal.read_from(topic, 0, usize::MAX, usize::MAX).unwrap();
            assert_eq!(all.len() as u64, wal.entry_count(topic));
            for e in &all {
                assert!(
                    e.data.starts_with(topic.as_bytes()),
                    "foreign bytes in {topic}"
                );
            }
        }
        println!(
            "round {round}: killed after {seen} acks; {} acknowledged entries verified",
            acked.len()
        );
    }
}
