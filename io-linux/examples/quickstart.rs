//! The main job until the node exists: append to a topic through the embedded library, close,
//! reopen (recovery), and read everything back.
//!
//! `cargo run --release -p walrus --example quickstart -- [data_dir] [entries]`

use std::time::Instant;

use walrus::{FsyncSchedule, ReadConsistency, Walrus};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "./wal_files/quickstart".to_string());
    let entries: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let _ = std::fs::remove_dir_all(&dir);
    let open = || {
        Walrus::builder()
            .data_dir(&dir)
            .consistency(ReadConsistency::AtLeastOnce {
                persist_every: 10_000,
            })
            .fsync_schedule(FsyncSchedule::SyncEach)
            .build()
    };

    let wal = open()?;
    let started = Instant::now();
    let batch: Vec<Vec<u8>> = (0..64)
        .map(|i| format!("entry {i:>6}").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = batch.iter().map(|b| b.as_slice()).collect();
    let mut written = 0;
    while written < entries {
        let n = refs.len().min((entries - written) as usize);
        wal.batch_append_for_topic("quickstart", &refs[..n])?;
        written += n as u64;
    }
    println!(
        "appended {written} durable entries in batches of 64 in {:.2?}",
        started.elapsed()
    );
    drop(wal);

    let wal = open()?;
    println!(
        "reopened: topics {:?}, {} entries",
        wal.topics(),
        wal.entry_count("quickstart")
    );
    let started = Instant::now();
    let mut read = 0u64;
    loop {
        let got = wal.batch_read_for_topic("quickstart", 1 << 20, true)?;
        if got.is_empty() {
            break;
        }
        for e in &got {
            let want = format!("entry {:>6}", read % 64);
            assert_eq!(e.data, want.as_bytes(), "entry {read} came back changed");
            read += 1;
        }
    }
    println!(
        "read back {read} entries, byte-exact, in {:.2?}",
        started.elapsed()
    );
    assert_eq!(read, entries);
    Ok(())
}
