//! Corruption and full disks: damaged bytes give a clear error or stop recovery at the damage,
//! never a panic and never a wrong payload; a full disk returns an error and loses nothing
//! already acknowledged.

use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use walrus::{FsyncSchedule, Walrus};
use walrus_io_sim::{SimDisk, SimFaults};

fn payload(topic: &str, offset: u64) -> Vec<u8> {
    let mut p = format!("{topic}@{offset}:").into_bytes();
    p.resize(p.len() + (offset * 13 % 700) as usize, (offset % 251) as u8);
    p
}

fn fill(dir: &Path) {
    let wal = Walrus::builder()
        .data_dir(dir)
        .fsync_schedule(FsyncSchedule::NoFsync)
        .segment_bytes(16 << 10)
        .build()
        .unwrap();
    for topic in ["a", "b"] {
        for o in 0..200u64 {
            if o % 10 == 0 {
                let batch: Vec<Vec<u8>> = (0..1).map(|_| payload(topic, o)).collect();
                let refs: Vec<&[u8]> = batch.iter().map(|b| b.as_slice()).collect();
                wal.batch_append_for_topic(topic, &refs).unwrap();
            } else {
                wal.append_for_topic(topic, &payload(topic, o)).unwrap();
            }
        }
    }
}

/// Every entry a damaged store returns is the original one at that offset.
fn check_reads(wal: &Walrus, trial: u64) {
    for topic in ["a", "b"] {
        let first = wal.first_offset(topic);
        let end = wal.entry_count(topic);
        assert!(end <= 200, "trial {trial}: {topic} grew to {end}");
        if let Ok(all) = wal.read_from(topic, first, usize::MAX, usize::MAX) {
            for (i, e) in all.iter().enumerate() {
                assert_eq!(
                    e.data,
                    payload(topic, first + i as u64),
                    "trial {trial}: wrong payload"
                );
            }
        }
        let mut at = wal.cursor(topic);
        for _ in 0..250 {
            match wal.read_next(topic, true) {
                Ok(Some(e)) => {
                    assert_eq!(
                        e.data,
                        payload(topic, at),
                        "trial {trial}: wrong payload from read_next"
                    );
                    at += 1;
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

#[test]
fn random_byte_flips_never_yield_a_wrong_payload() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut opened = 0;
    let mut shortened = 0;
    for trial in 0..60u64 {
        let tmp = tempfile::tempdir().unwrap();
        fill(tmp.path());
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        for topic in ["a", "b"] {
            for e in std::fs::read_dir(tmp.path().join(topic)).unwrap() {
                files.push(e.unwrap().path());
            }
        }
        files.sort();
        for _ in 0..rng.gen_range(1..6) {
            let f = &files[rng.gen_range(0..files.len())];
            let mut bytes = std::fs::read(f).unwrap();
            if bytes.is_empty() {
                continue;
            }
            // Mostly the written part, where a flip matters.
            let limit = bytes.iter().rposition(|&b| b != 0).unwrap_or(0) + 1;
            let at = rng.gen_range(0..limit.max(1).min(bytes.len()));
            bytes[at] ^= 1 << rng.gen_range(0..8);
            std::fs::write(f, &bytes).unwrap();
        }
        match Walrus::builder()
            .data_dir(tmp.path())
            .segment_bytes(16 << 10)
            .build()
        {
            Ok(wal) => {
                opened += 1;
                if wal.entry_count("a") < 200 || wal.entry_count("b") < 200 {
                    shortened += 1;
                }
                check_reads(&wal, trial);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    assert!(opened > 30, "most damaged stores still open ({opened})");
    assert!(
        shortened > 10,
        "flips must actually hit entries ({shortened})"
    );
}

#[test]
fn bit_flips_on_read_are_caught_by_the_checksum() {
    let disk = Arc::new(SimDisk::new(5, SimFaults::default()));
    let wal = Walrus::builder()
        .data_dir("/w")
        .fsync_schedule(FsyncSchedule::SyncEach)
        .build_on(disk.clone())
        .unwrap();
    for o in 0..300 {
        wal.append_for_topic("t", &payload("t", o)).unwrap();
    }
    disk.set_faults(SimFaults {
        read_bit_flip: 0.2,
        ..Default::default()
    });
    let (mut good, mut refused) = (0, 0);
    for round in 0..400u64 {
        let o = round % 300;
        match wal.read_from("t", o, 1, usize::MAX) {
            Ok(e) => {
                assert_eq!(
                    e[0].data,
                    payload("t", o),
                    "a flipped bit reached the caller"
                );
                good += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
                refused += 1;
            }
        }
    }
    assert!(good > 0 && refused > 0, "good {good}, refused {refused}");
}

#[test]
fn a_full_disk_returns_an_error_and_loses_nothing_acknowledged() {
    let disk = Arc::new(SimDisk::new(
        9,
        SimFaults {
            capacity_bytes: Some(300_000),
            ..Default::default()
        },
    ));
    let open = || {
        let build = || {
            Walrus::builder()
                .data_dir("/w")
                .fsync_schedule(FsyncSchedule::SyncEach)
                .segment_bytes(32 << 10)
                .build_on(disk.clone())
        };
        match build() {
            Ok(w) => w,
            // Recovery may need room to replay its journal: free space, as an operator would.
            Err(e) if e.raw_os_error() == Some(28) => {
                disk.set_faults(SimFaults::default());
                build().unwrap()
            }
            Err(e) => panic!("reopen failed: {e}"),
        }
    };
    let wal = open();
    let mut acked = 0u64;
    let err = loop {
        match wal.append_for_topic("t", &payload("t", acked)) {
            Ok(()) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 100_000, "the disk never filled");
    };
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC expected, got {err}");
    assert!(acked > 100);
    // Keep pushing: the engine may still find room (a journal checkpoint frees its space), but
    // it ends up refusing every append, each with an error.
    let mut refused_in_a_row = 0;
    for _ in 0..10_000 {
        match wal.append_for_topic("t", &payload("t", acked)) {
            Ok(()) => {
                acked += 1;
                refused_in_a_row = 0;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "{e}");
                refused_in_a_row += 1;
                if refused_in_a_row == 20 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused_in_a_row, 20, "a full disk must refuse appends");
    let all = wal.read_from("t", 0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len() as u64, acked);
    // A crash while full loses nothing acknowledged.
    disk.crash();
    drop(wal);
    disk.restart();
    let wal = open();
    assert_eq!(wal.entry_count("t"), acked);
    // Once space is freed, appends continue at the next offset.
    disk.set_faults(SimFaults::default());
    wal.append_for_topic("t", &payload("t", acked)).unwrap();
    let all = wal.read_from("t", 0, usize::MAX, usize::MAX).unwrap();
    for (o, e) in all.iter().enumerate() {
        assert_eq!(e.data, payload("t", o as u64));
    }
    assert_eq!(all.len() as u64, acked + 1);
}
