//! A program written against `walrus-rust` 0.2 compiles against `walrus` with only the crate
//! name changed, and the upstream environment variables work. (One test in this binary: it sets
//! process environment variables.)

use walrus::{Entry, FsyncSchedule, ReadConsistency, Walrus};

fn upstream_style_program() -> std::io::Result<Vec<Entry>> {
    let wal = Walrus::new()?;
    wal.append_for_topic("my-topic", b"Hello, Walrus!")?;
    let batch = vec![
        b"entry 1".as_slice(),
        b"entry 2".as_slice(),
        b"entry 3".as_slice(),
    ];
    wal.batch_append_for_topic("events", &batch)?;
    let mut got = Vec::new();
    if let Some(entry) = wal.read_next("my-topic", true)? {
        got.push(entry);
    }
    assert!(wal.read_next("my-topic", false)?.is_none());
    got.extend(wal.batch_read_for_topic("events", 1024 * 1024, true)?);

    let _strict = Walrus::with_consistency(ReadConsistency::StrictlyAtOnce)?;
    let _relaxed = Walrus::with_consistency(ReadConsistency::AtLeastOnce {
        persist_every: 1000,
    })?;
    let _scheduled = Walrus::with_consistency_and_schedule(
        ReadConsistency::StrictlyAtOnce,
        FsyncSchedule::Milliseconds(500),
    )?;
    let _each = Walrus::with_consistency_and_schedule(
        ReadConsistency::StrictlyAtOnce,
        FsyncSchedule::SyncEach,
    )?;
    let _none = Walrus::with_consistency_and_schedule(
        ReadConsistency::StrictlyAtOnce,
        FsyncSchedule::NoFsync,
    )?;
    let t1 = Walrus::new_for_key("tenant-123")?;
    let _t2 = Walrus::with_consistency_for_key(
        "my-app",
        ReadConsistency::AtLeastOnce { persist_every: 100 },
    )?;
    let _t3 = Walrus::with_consistency_and_schedule_for_key(
        "my-app2",
        ReadConsistency::AtLeastOnce {
            persist_every: 1000,
        },
        FsyncSchedule::Milliseconds(500),
    )?;
    t1.append_for_topic("tenant-topic", b"namespaced")?;
    let entry: Entry = t1
        .read_next("tenant-topic", true)?
        .expect("namespaced entry");
    got.push(Entry {
        data: entry.data.clone(),
    });
    Ok(got)
}

#[test]
fn upstream_api_and_environment() {
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("WALRUS_DATA_DIR", tmp.path());
    let got = upstream_style_program().unwrap();
    let data: Vec<&[u8]> = got.iter().map(|e| e.data.as_slice()).collect();
    assert_eq!(
        data,
        vec![
            &b"Hello, Walrus!"[..],
            b"entry 1",
            b"entry 2",
            b"entry 3",
            b"namespaced"
        ]
    );
    assert!(
        tmp.path().join("my-topic").is_dir(),
        "default instance lives in WALRUS_DATA_DIR"
    );
    assert!(
        tmp.path().join("tenant-123").join("tenant-topic").is_dir(),
        "keys are subdirectories"
    );

    std::env::set_var("WALRUS_INSTANCE_KEY", "from env");
    let wal = Walrus::new().unwrap();
    wal.append_for_topic("x", b"y").unwrap();
    assert!(
        tmp.path().join("from_env").join("x").is_dir(),
        "WALRUS_INSTANCE_KEY picks the namespace"
    );
}
