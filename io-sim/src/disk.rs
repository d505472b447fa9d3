//! The simulated disk (see the crate docs for the model).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use walrus_core::disk::{Disk, DiskFile};

/// Sector size at which crashes tear writes.
pub const SECTOR_BYTES: u64 = 512;

/// Fault rates, each a probability in `0.0..=1.0`, and an optional capacity.
#[derive(Debug, Clone, Default)]
pub struct SimFaults {
    /// Chance that a `sync_data` fails with EIO (and drops the file's pending writes).
    pub sync_error: f64,
    /// Chance that a read returns one flipped bit (the stored bytes stay intact).
    pub read_bit_flip: f64,
    /// Total bytes all files may occupy; writes past it fail with ENOSPC.
    pub capacity_bytes: Option<u64>,
}

/// Counters of what the disk did, for test coverage reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Successful syncs.
    pub syncs: u64,
    /// Syncs failed by fault injection.
    pub sync_errors: u64,
    /// Writes refused for lack of space.
    pub disk_full: u64,
    /// Reads returned with a flipped bit.
    pub bit_flips: u64,
    /// Crashes.
    pub crashes: u64,
    /// Writes torn or dropped by crashes.
    pub writes_lost: u64,
}

/// A deterministic in-memory disk with crash and fault injection.
pub struct SimDisk {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    next_id: AtomicU64,
}

struct State {
    rng: ChaCha8Rng,
    faults: SimFaults,
    stats: SimStats,
    /// The namespace as the running process sees it.
    names: BTreeMap<PathBuf, Arc<SimFile>>,
    /// The namespace as of the last `sync_dir` of each parent.
    durable_names: BTreeMap<PathBuf, Arc<SimFile>>,
    dirs: BTreeSet<PathBuf>,
    down: bool,
}

/// A file of a [`SimDisk`].
pub struct SimFile {
    id: u64,
    shared: Arc<Shared>,
    data: Mutex<FileData>,
}

#[derive(Clone, Default)]
struct FileData {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
}

#[derive(Clone)]
enum Pending {
    Write { pos: u64, data: Vec<u8> },
    SetLen(u64),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn down_error() -> io::Error {
    io::Error::other("simulated disk is down (crashed)")
}

impl SimDisk {
    /// A new empty disk whose every random choice derives from `seed`.
    pub fn new(seed: u64, faults: SimFaults) -> SimDisk {
        SimDisk {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rng: ChaCha8Rng::seed_from_u64(seed),
                    faults,
                    stats: SimStats::default(),
                    names: BTreeMap::new(),
                    durable_names: BTreeMap::new(),
                    dirs: BTreeSet::new(),
                    down: false,
                }),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Replaces the fault rates (e.g. to heal the disk for a liveness phase).
    pub fn set_faults(&self, faults: SimFaults) {
        lock(&self.shared.state).faults = faults;
    }

    /// What the disk did so far.
    pub fn stats(&self) -> SimStats {
        lock(&self.shared.state).stats.clone()
    }

    /// Power failure: from now on every operation fails until [`SimDisk::restart`]; unsynced
    /// writes and directory entries are kept or lost as the seed decides.
    pub fn crash(&self) {
        let mut st = lock(&self.shared.state);
        st.down = true;
        st.stats.crashes += 1;
        // Directory entries: each entry that differs from its durable state survives or not.
        let mut paths: BTreeSet<PathBuf> = st.names.keys().cloned().collect();
        paths.extend(st.durable_names.keys().cloned());
        let mut names = BTreeMap::new();
        for p in paths {
            let cur = st.names.get(&p).cloned();
            let dur = st.durable_names.get(&p).cloned();
            let same = match (&cur, &dur) {
                (Some(a), Some(b)) => a.id == b.id,
                (None, None) => true,
                _ => false,
            };
            let keep = if same || st.rng.gen_bool(0.5) {
                cur
            } else {
                dur
            };
            if let Some(f) = keep {
                names.insert(p, f);
            }
        }
        st.durable_names = names.clone();
        // File contents: pending writes survive partly.
        let files: Vec<Arc<SimFile>> = names.values().cloned().collect();
        let subset_mode = st.rng.gen_bool(0.5);
        for f in files {
            let mut d = lock(&f.data);
            let pending = std::mem::take(&mut d.pending);
            let mut durable = std::mem::take(&mut d.durable);
            let mut lost = 0u64;
            if subset_mode {
                let keep_p: f64 = st.rng.gen_range(0.0..1.0);
                for op in pending {
                    match op {
                        Pending::SetLen(len) => durable.resize(len as usize, 0),
                        Pending::Write { pos, data } => {
                            let end = pos + data.len() as u64;
                            let mut s = pos;
                            let mut all = true;
                            while s < end {
                                let e = ((s / SECTOR_BYTES + 1) * SECTOR_BYTES).min(end);
                                if st.rng.gen_bool(keep_p) {
                                    apply_write(
                                        &mut durable,
                                        s,
                                        &data[(s - pos) as usize..(e - pos) as usize],
                                    );
                                } else {
                                    all = false;
                                }
                                s = e;
                            }
                            lost += u64::from(!all);
                        }
                    }
                }
            } else {
                let keep = st.rng.gen_range(0..=pending.len());
                for (i, op) in pending.into_iter().enumerate() {
                    match op {
                        Pending::SetLen(len) if i < keep => durable.resize(len as usize, 0),
                        Pending::Write { pos, data } if i < keep => {
                            apply_write(&mut durable, pos, &data)
                        }
                        Pending::Write { pos, data } if i == keep => {
                            // Torn: keep whole sectors up to a random boundary.
                            let end = pos + data.len() as u64;
                            let first_boundary = (pos / SECTOR_BYTES + 1) * SECTOR_BYTES;
                            if first_boundary < end {
                                let sectors = (end - first_boundary) / SECTOR_BYTES;
                                let cut =
                                    first_boundary + SECTOR_BYTES * st.rng.gen_range(0..=sectors);
                                let cut = cut.min(end);
                                apply_write(&mut durable, pos, &data[..(cut - pos) as usize]);
                            }
                            lost += 1;
                        }
                        Pending::Write { .. } => lost += 1,
                        Pending::SetLen(_) => {}
                    }
                }
            }
            st.stats.writes_lost += lost;
            d.current = durable.clone();
            d.durable = durable;
        }
        st.names = names;
    }

    /// The disk is lost (replaced by an empty one): every file and directory is gone. Only
    /// while crashed, so that no running process holds its files.
    pub fn wipe(&self) {
        let mut st = lock(&self.shared.state);
        assert!(st.down, "wipe a crashed disk only");
        st.names.clear();
        st.durable_names.clear();
        st.dirs.clear();
    }

    /// Brings a crashed disk back, with whatever survived the crash.
    pub fn restart(&self) {
        lock(&self.shared.state).down = false;
    }

    /// Flips one stored (durable and current) bit of a file: persistent corruption.
    pub fn corrupt(&self, path: &Path, byte: u64, bit: u8) -> bool {
        let st = lock(&self.shared.state);
        let Some(f) = st.names.get(path).cloned() else {
            return false;
        };
        drop(st);
        let mut d = lock(&f.data);
        let b = byte as usize;
        if b >= d.current.len() {
            return false;
        }
        d.current[b] ^= 1 << (bit % 8);
        if b < d.durable.len() {
            d.durable[b] ^= 1 << (bit % 8);
        }
        true
    }

    /// Paths of all files, sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        lock(&self.shared.state).names.keys().cloned().collect()
    }

    /// Bytes currently used by all files.
    pub fn used_bytes(&self) -> u64 {
        used_bytes(&lock(&self.shared.state))
    }
}

fn used_bytes(st: &State) -> u64 {
    st.names
        .values()
        .map(|f| lock(&f.data).current.len() as u64)
        .sum()
}

fn apply_write(buf: &mut Vec<u8>, pos: u64, data: &[u8]) {
    let end = pos as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[pos as usize..end].copy_from_slice(data);
}

impl SimFile {
    fn check_up(&self) -> io::Result<MutexGuard<'_, State>> {
        let st = lock(&self.shared.state);
        if st.down {
            return Err(down_error());
        }
        Ok(st)
    }
}

impl DiskFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        drop(self.check_up()?);
        Ok(lock(&self.data).current.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let mut st = self.check_up()?;
        let d = lock(&self.data);
        let end = pos
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= d.current.len() as u64)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the file",
                )
            })?;
        buf.copy_from_slice(&d.current[pos as usize..end as usize]);
        let p = st.faults.read_bit_flip;
        if !buf.is_empty() && p > 0.0 && st.rng.gen_bool(p) {
            let i = st.rng.gen_range(0..buf.len());
            buf[i] ^= 1 << st.rng.gen_range(0..8);
            st.stats.bit_flips += 1;
        }
        Ok(())
    }

    fn write_all_at(&self, data: &[u8], pos: u64) -> io::Result<()> {
        let mut st = self.check_up()?;
        let mut d = lock(&self.data);
        let end = pos + data.len() as u64;
        let grow = end.saturating_sub(d.current.len() as u64);
        if grow > 0 {
            if let Some(cap) = st.faults.capacity_bytes {
                drop(d);
                let used = used_bytes(&st);
                if used + grow > cap {
                    st.stats.disk_full += 1;
                    return Err(io::Error::from_raw_os_error(libc_enospc()));
                }
                d = lock(&self.data);
            }
        }
        apply_write(&mut d.current, pos, data);
        d.pending.push(Pending::Write {
            pos,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.check_up()?;
        let mut d = lock(&self.data);
        let p = st.faults.sync_error;
        if p > 0.0 && !d.pending.is_empty() && st.rng.gen_bool(p) {
            // As Linux after a failed fsync: the pending writes will never reach the disk.
            d.pending.clear();
            st.stats.sync_errors += 1;
            return Err(io::Error::from_raw_os_error(5));
        }
        let pending = std::mem::take(&mut d.pending);
        let mut durable = std::mem::take(&mut d.durable);
        for op in pending {
            match op {
                Pending::Write { pos, data } => apply_write(&mut durable, pos, &data),
                Pending::SetLen(len) => durable.resize(len as usize, 0),
            }
        }
        d.durable = durable;
        st.stats.syncs += 1;
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.check_up()?;
        let mut d = lock(&self.data);
        let grow = len.saturating_sub(d.current.len() as u64);
        if grow > 0 {
            if let Some(cap) = st.faults.capacity_bytes {
                drop(d);
                if used_bytes(&st) + grow > cap {
                    st.stats.disk_full += 1;
                    return Err(io::Error::from_raw_os_error(libc_enospc()));
                }
                d = lock(&self.data);
            }
        }
        d.current.resize(len as usize, 0);
        d.pending.push(Pending::SetLen(len));
        Ok(())
    }
}

const fn libc_enospc() -> i32 {
    28
}

impl Disk for SimDisk {
    type File = SimFile;

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<SimFile>> {
        let mut st = lock(&self.shared.state);
        if st.down {
            return Err(down_error());
        }
        if let Some(f) = st.names.get(path) {
            return Ok(f.clone());
        }
        if !create {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found", path.display()),
            ));
        }
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        if !st.dirs.contains(&parent) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory {}", parent.display()),
            ));
        }
        let f = Arc::new(SimFile {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            shared: self.shared.clone(),
            data: Mutex::new(FileData::default()),
        });
        st.names.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = lock(&self.shared.state);
        if st.down {
            return Err(down_error());
        }
        // Directories are modelled as always durable: the engine syncs its parents anyway.
        for a in path.ancestors() {
            st.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let st = lock(&self.shared.state);
        if st.down {
            return Err(down_error());
        }
        if !st.dirs.contains(path) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory {}", path.display()),
            ));
        }
        let mut out = BTreeSet::new();
        for p in st.names.keys().chain(st.dirs.iter()) {
            if p.parent() == Some(path) {
                if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    out.insert(n.to_string());
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    fn is_dir(&self, path: &Path) -> bool {
        lock(&self.shared.state).dirs.contains(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = lock(&self.shared.state);
        if st.down {
            return Err(down_error());
        }
        st.names.remove(path).map(|_| ()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found", path.display()),
            )
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = lock(&self.shared.state);
        if st.down {
            return Err(down_error());
        }
        let f = st.names.remove(from).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found", from.display()),
            )
        })?;
        st.names.insert(to.to_path_buf(), f);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut st = lock(&self.shared.state);
        if st.down {
            return Err(down_error());
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(path);
        let current: Vec<(PathBuf, Arc<SimFile>)> = st
            .names
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect();
        st.durable_names.retain(|p, _| !in_dir(p));
        st.durable_names.extend(current);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_writes_survive_a_crash_and_unsynced_ones_may_not() {
        for seed in 0..50 {
            let disk = SimDisk::new(seed, SimFaults::default());
            disk.create_dir_all(Path::new("/d")).unwrap();
            let f = disk.open(Path::new("/d/f"), true).unwrap();
            f.write_all_at(&[1u8; 1000], 0).unwrap();
            f.sync_data().unwrap();
            disk.sync_dir(Path::new("/d")).unwrap();
            f.write_all_at(&[2u8; 2000], 1000).unwrap();
            disk.crash();
            disk.restart();
            let f = disk.open(Path::new("/d/f"), false).unwrap();
            let all = f.read_all().unwrap();
            assert!(all.len() >= 1000);
            assert!(
                all[..1000].iter().all(|&b| b == 1),
                "seed {seed}: synced data changed"
            );
            assert!(
                all[1000..].iter().all(|&b| b == 2 || b == 0),
                "seed {seed}: invented bytes"
            );
        }
    }

    #[test]
    fn a_failed_sync_drops_pending_writes_at_the_next_crash() {
        let disk = SimDisk::new(
            1,
            SimFaults {
                sync_error: 1.0,
                ..Default::default()
            },
        );
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = disk.open(Path::new("/d/f"), true).unwrap();
        disk.sync_dir(Path::new("/d")).unwrap();
        f.write_all_at(b"abc", 0).unwrap();
        assert!(f.sync_data().is_err());
        assert_eq!(
            f.read_all().unwrap(),
            b"abc",
            "still visible before the crash"
        );
        disk.crash();
        disk.restart();
        assert!(disk
            .open(Path::new("/d/f"), false)
            .unwrap()
            .read_all()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn unsynced_directory_entries_may_vanish_and_a_down_disk_refuses_work() {
        let mut vanished = 0;
        for seed in 0..40 {
            let disk = SimDisk::new(seed, SimFaults::default());
            disk.create_dir_all(Path::new("/d")).unwrap();
            let f = disk.open(Path::new("/d/new"), true).unwrap();
            f.write_all_at(b"x", 0).unwrap();
            f.sync_data().unwrap();
            disk.crash();
            assert!(disk.open(Path::new("/d/new"), false).is_err());
            disk.restart();
            vanished += usize::from(disk.open(Path::new("/d/new"), false).is_err());
        }
        assert!(vanished > 5 && vanished < 35, "vanished {vanished} of 40");
    }

    #[test]
    fn capacity_is_enforced() {
        let disk = SimDisk::new(
            1,
            SimFaults {
                capacity_bytes: Some(100),
                ..Default::default()
            },
        );
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = disk.open(Path::new("/d/f"), true).unwrap();
        f.write_all_at(&[1; 100], 0).unwrap();
        let e = f.write_all_at(&[1; 1], 100).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        f.write_all_at(&[2; 50], 0).unwrap();
    }
}
