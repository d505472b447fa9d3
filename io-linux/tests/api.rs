//! The embedded API on real files: upstream-compatible calls, the additions, edge cases and the
//! documented cursor semantics across a reopen.

use std::sync::Arc;

use walrus::{Backend, FsyncSchedule, ReadConsistency, Walrus};

fn open(dir: &std::path::Path, c: ReadConsistency, f: FsyncSchedule) -> Walrus {
    Walrus::builder()
        .data_dir(dir)
        .consistency(c)
        .fsync_schedule(f)
        .build()
        .unwrap()
}

#[test]
fn append_peek_checkpoint_and_batch_read() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = open(
        tmp.path(),
        ReadConsistency::StrictlyAtOnce,
        FsyncSchedule::SyncEach,
    );
    assert_eq!(
        wal.read_next("t", true).unwrap(),
        None,
        "unknown topic reads as empty"
    );
    for i in 0..10u8 {
        wal.append_for_topic("t", &[i; 3]).unwrap();
    }
    wal.batch_append_for_topic("t", &[b"a", b"", b"ccc"])
        .unwrap();
    assert_eq!(wal.entry_count("t"), 13);
    // Peek does not move the cursor.
    assert_eq!(wal.read_next("t", false).unwrap().unwrap().data, vec![0; 3]);
    assert_eq!(wal.read_next("t", false).unwrap().unwrap().data, vec![0; 3]);
    assert_eq!(wal.read_next("t", true).unwrap().unwrap().data, vec![0; 3]);
    assert_eq!(wal.cursor("t"), 1);
    // A byte budget of 7 takes two 3-byte entries; a budget of 1 still returns one entry.
    let two = wal.batch_read_for_topic("t", 7, true).unwrap();
    assert_eq!(
        two.iter().map(|e| e.data[0]).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(wal.batch_read_for_topic("t", 1, true).unwrap().len(), 1);
    let rest = wal.batch_read_for_topic("t", 1 << 20, true).unwrap();
    assert_eq!(rest.len(), 9);
    assert_eq!(rest[7].data, b"");
    assert_eq!(rest[8].data, b"ccc");
    assert_eq!(wal.read_next("t", true).unwrap(), None);
    // Stateless reads by offset ignore the cursor.
    let mid = wal.read_from("t", 10, 2, usize::MAX).unwrap();
    assert_eq!(
        mid.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        vec![b"a".to_vec(), vec![]]
    );
    assert!(wal.read_from("t", 13, 5, usize::MAX).unwrap().is_empty());
}

/// The payloads of the first `n` entries of `topic`.
fn first_entries(wal: &Walrus, topic: &str, n: usize) -> Vec<Vec<u8>> {
    wal.read_from(topic, 0, n, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.data)
        .collect()
}

#[test]
fn a_begun_append_has_its_offsets_at_once_and_is_readable_after_wait() {
    for fsync in [FsyncSchedule::SyncEach, FsyncSchedule::NoFsync] {
        let tmp = tempfile::tempdir().unwrap();
        let wal = open(tmp.path(), ReadConsistency::StrictlyAtOnce, fsync);
        wal.append_for_topic("t", b"zero").unwrap();
        let a = wal.batch_append_begin("t", &[b"a1", b"a2"]).unwrap();
        let b = wal.batch_append_begin("t", &[b"b1"]).unwrap();
        assert_eq!((a.first(), b.first()), (1, 3), "offsets in call order");
        assert_eq!(a.is_pending(), fsync == FsyncSchedule::SyncEach);
        // Waiting on the later one first is fine: the group commit keeps queue order.
        assert_eq!(b.wait().unwrap(), 3);
        assert_eq!(a.wait().unwrap(), 1);
        let all = first_entries(&wal, "t", 10);
        assert_eq!(all, [&b"zero"[..], b"a1", b"a2", b"b1"].map(|b| b.to_vec()));
        drop(wal);
        let wal = open(tmp.path(), ReadConsistency::StrictlyAtOnce, fsync);
        assert_eq!(wal.entry_count("t"), 4);
    }
}

#[test]
fn a_begun_append_can_be_awaited_from_another_thread_than_the_commit() {
    for fsync in [FsyncSchedule::SyncEach, FsyncSchedule::NoFsync] {
        let tmp = tempfile::tempdir().unwrap();
        let wal = open(tmp.path(), ReadConsistency::StrictlyAtOnce, fsync);
        let a = wal.batch_append_begin("t", &[b"a1", b"a2"]).unwrap();
        let b = wal.batch_append_begin("t", &[b"b1"]).unwrap();
        // Awaited (not blocked on): the group commit wakes this task when it is done.
        assert_eq!(pollster::block_on(b.done()).unwrap(), 2);
        assert_eq!(pollster::block_on(a.done()).unwrap(), 0);
        assert_eq!(wal.entry_count("t"), 3);
        let all = first_entries(&wal, "t", 10);
        assert_eq!(all, [&b"a1"[..], b"a2", b"b1"].map(|b| b.to_vec()));
    }
}

#[test]
fn a_positioned_append_lands_only_at_the_next_offset_counting_pending_ones() {
    for fsync in [FsyncSchedule::SyncEach, FsyncSchedule::NoFsync] {
        let tmp = tempfile::tempdir().unwrap();
        let wal = open(tmp.path(), ReadConsistency::StrictlyAtOnce, fsync);
        assert_eq!(wal.next_offset("t"), 0);
        let a = wal.batch_append_begin_at("t", 0, &[b"a1", b"a2"]).unwrap();
        // Still in its group commit (under SyncEach), yet counted.
        assert_eq!(wal.next_offset("t"), 2);
        for wrong in [0, 1, 3, u64::MAX] {
            let Err(e) = wal.batch_append_begin_at("t", wrong, &[b"x"]) else {
                panic!("an append at {wrong} was taken");
            };
            let why = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<walrus::NotAtOffset>())
                .copied();
            assert_eq!(
                why,
                Some(walrus::NotAtOffset {
                    wanted: wrong,
                    next: 2
                }),
                "{e}"
            );
        }
        let b = wal.batch_append_begin_at("t", 2, &[b"b1"]).unwrap();
        assert_eq!((a.wait().unwrap(), b.wait().unwrap()), (0, 2));
        let all = first_entries(&wal, "t", 10);
        assert_eq!(all, [&b"a1"[..], b"a2", b"b1"].map(|b| b.to_vec()));
    }
}

#[test]
fn invalid_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = open(
        tmp.path(),
        ReadConsistency::StrictlyAtOnce,
        FsyncSchedule::NoFsync,
    );
    for bad in ["", "..", "a/b", "with space", &"x".repeat(256)] {
        let e = wal.append_for_topic(bad, b"x").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    let e = wal.batch_append_for_topic("t", &[]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let many: Vec<&[u8]> = vec![b"x"; 2001];
    assert!(wal.batch_append_for_topic("t", &many).is_err());
    assert_eq!(
        wal.entry_count("t"),
        0,
        "refused batches leave nothing behind"
    );
}

#[test]
fn huge_entries_and_segment_rollover_survive_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..(16u32 << 20) + 13).map(|i| (i % 251) as u8).collect();
    {
        let wal = Walrus::builder()
            .data_dir(tmp.path())
            .fsync_schedule(FsyncSchedule::SyncEach)
            .segment_bytes(64 << 10)
            .build()
            .unwrap();
        wal.append_for_topic("big", b"before").unwrap();
        wal.append_for_topic("big", &big).unwrap();
        for i in 0..2000u32 {
            wal.append_for_topic("big", &i.to_le_bytes().repeat(10))
                .unwrap();
        }
    }
    let wal = open(
        tmp.path(),
        ReadConsistency::StrictlyAtOnce,
        FsyncSchedule::SyncEach,
    );
    assert_eq!(wal.entry_count("big"), 2002);
    let segs = std::fs::read_dir(tmp.path().join("big")).unwrap().count();
    assert!(segs >= 3, "small segments must have rolled ({segs} files)");
    assert_eq!(wal.read_from("big", 1, 1, 0).unwrap()[0].data, big);
    for i in [0u32, 1, 999, 1999] {
        let e = &wal.read_from("big", 2 + i as u64, 1, usize::MAX).unwrap()[0];
        assert_eq!(e.data, i.to_le_bytes().repeat(10));
    }
    let mut n = 0;
    while let Some(e) = wal.read_next("big", true).unwrap() {
        if n == 1 {
            assert_eq!(e.data.len(), big.len());
        }
        n += 1;
        if n > 3000 {
            break;
        }
    }
    assert_eq!(n, 2002);
}

#[test]
fn ten_thousand_topics() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let wal = open(
            tmp.path(),
            ReadConsistency::StrictlyAtOnce,
            FsyncSchedule::NoFsync,
        );
        for i in 0..10_000u32 {
            wal.append_for_topic(&format!("topic-{i}"), &i.to_le_bytes())
                .unwrap();
        }
        assert_eq!(wal.topics().len(), 10_000);
    }
    let wal = open(
        tmp.path(),
        ReadConsistency::StrictlyAtOnce,
        FsyncSchedule::NoFsync,
    );
    let topics = wal.topics();
    assert_eq!(topics.len(), 10_000);
    for i in [0u32, 4321, 9999] {
        let e = wal
            .read_next(&format!("topic-{i}"), false)
            .unwrap()
            .unwrap();
        assert_eq!(e.data, i.to_le_bytes());
    }
}

#[test]
fn cursors_survive_reopen_per_consistency_mode() {
    let tmp = tempfile::tempdir().unwrap();
    // StrictlyAtOnce: every checkpointed read is persisted.
    {
        let wal = open(
            tmp.path(),
            ReadConsistency::StrictlyAtOnce,
            FsyncSchedule::SyncEach,
        );
        for i in 0..20u8 {
            wal.append_for_topic("s", &[i]).unwrap();
        }
        for _ in 0..7 {
            wal.read_next("s", true).unwrap().unwrap();
        }
    }
    {
        let wal = open(
            tmp.path(),
            ReadConsistency::AtLeastOnce { persist_every: 5 },
            FsyncSchedule::SyncEach,
        );
        assert_eq!(wal.read_next("s", true).unwrap().unwrap().data, vec![7]);
        // Seven more reads: persisted at 5 (offset 12), not at 13..14.
        for _ in 0..6 {
            wal.read_next("s", true).unwrap().unwrap();
        }
        assert_eq!(wal.cursor("s"), 14);
    }
    let wal = open(
        tmp.path(),
        ReadConsistency::AtLeastOnce { persist_every: 5 },
        FsyncSchedule::SyncEach,
    );
    // Redelivers fewer than persist_every entries, skips none. (Drop of a Walrus is not a
    // crash, but the cursor is only persisted on schedule.)
    let c = wal.cursor("s");
    assert!((10..=14).contains(&c), "cursor {c}");
    assert_eq!(
        wal.read_next("s", true).unwrap().unwrap().data,
        vec![c as u8]
    );
}

#[test]
fn consumed_segments_are_reclaimed_and_offsets_stay_right() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let wal = Walrus::builder()
            .data_dir(tmp.path())
            .fsync_schedule(FsyncSchedule::SyncEach)
            .segment_bytes(8 << 10)
            .build()
            .unwrap();
        for i in 0..1000u32 {
            wal.append_for_topic("r", &i.to_le_bytes().repeat(8))
                .unwrap();
        }
        for _ in 0..700 {
            wal.read_next("r", true).unwrap().unwrap();
        }
        assert!(wal.first_offset("r") > 0, "some segments must be reclaimed");
        assert!(wal.first_offset("r") <= 700);
        let e = wal.read_from("r", 0, 1, 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
    let wal = Walrus::builder()
        .data_dir(tmp.path())
        .segment_bytes(8 << 10)
        .build()
        .unwrap();
    assert_eq!(wal.cursor("r"), 700);
    assert_eq!(wal.entry_count("r"), 1000);
    assert_eq!(
        wal.read_next("r", true).unwrap().unwrap().data,
        700u32.to_le_bytes().repeat(8)
    );
}

#[test]
fn two_instances_with_different_settings_do_not_interfere() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Walrus::builder()
        .data_dir(tmp.path())
        .key("tenant/a")
        .fsync_schedule(FsyncSchedule::SyncEach)
        .backend(Backend::Pwrite)
        .build()
        .unwrap();
    let b = Walrus::builder()
        .data_dir(tmp.path())
        .key("tenant-b")
        .fsync_schedule(FsyncSchedule::NoFsync)
        .consistency(ReadConsistency::AtLeastOnce { persist_every: 100 })
        .build()
        .unwrap();
    a.append_for_topic("x", b"from a").unwrap();
    b.append_for_topic("x", b"from b").unwrap();
    assert_eq!(a.read_next("x", true).unwrap().unwrap().data, b"from a");
    assert_eq!(b.read_next("x", true).unwrap().unwrap().data, b"from b");
    assert!(tmp.path().join("tenant_a").is_dir());
    assert!(tmp.path().join("tenant-b").is_dir());
}

#[test]
fn concurrent_appenders_share_a_topic_without_gaps() {
    for backend in [Backend::IoUring, Backend::Pwrite] {
        let tmp = tempfile::tempdir().unwrap();
        let wal = Arc::new(
            Walrus::builder()
                .data_dir(tmp.path())
                .fsync_schedule(FsyncSchedule::SyncEach)
                .backend(backend)
                .segment_bytes(32 << 10)
                .build()
                .unwrap(),
        );
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let wal = wal.clone();
                s.spawn(move || {
                    for i in 0..300u16 {
                        let mut v = vec![t];
                        v.extend_from_slice(&i.to_le_bytes());
                        wal.append_for_topic("shared", &v).unwrap();
                    }
                });
            }
        });
        assert_eq!(wal.entry_count("shared"), 1200);
        let all = wal.read_from("shared", 0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(all.len(), 1200);
        // Each writer's entries appear in its own order.
        let mut last = [None::<u16>; 4];
        for e in all {
            let i = u16::from_le_bytes([e.data[1], e.data[2]]);
            let slot = &mut last[e.data[0] as usize];
            assert!(
                slot.is_none_or(|p| p + 1 == i),
                "{backend:?}: writer order broken"
            );
            *slot = Some(i);
        }
    }
}

#[test]
fn milliseconds_schedule_syncs_in_the_background() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = open(
        tmp.path(),
        ReadConsistency::StrictlyAtOnce,
        FsyncSchedule::Milliseconds(5),
    );
    wal.append_for_topic("m", b"x").unwrap();
    wal.sync().unwrap();
    assert_eq!(wal.read_next("m", true).unwrap().unwrap().data, b"x");
}
