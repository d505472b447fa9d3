//! The disk trait every storage backend implements: real files on Linux (`walrus::disk`) and the
//! fault-injecting simulated disk (`walrus-io-sim`). Defining a trait does no I/O, so it lives
//! here where both shells can reach it without depending on each other.
//!
//! Contract: a write is durable only after a `sync_data` (or a `write_batch` with `sync = true`)
//! that started after it returned; until then a crash may drop it or tear it at a 512-byte
//! boundary. A created file's directory entry is durable only after `sync_dir` on its parent.

use std::io;
use std::path::Path;
use std::sync::Arc;

/// One file of a [`Disk`].
pub trait DiskFile: Send + Sync + 'static {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Fills `buf` from `pos`; reading past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()>;
    /// Writes all of `data` at `pos`, growing the file if needed.
    fn write_all_at(&self, data: &[u8], pos: u64) -> io::Result<()>;
    /// Makes every completed write to this file durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `from..to` part of the file with its space reserved, reading as zeros (`from` is
    /// at or past the last byte written), so that later writes there need no new space. This
    /// default writes the zeros; a backend may reserve the space without writing anything.
    fn allocate(&self, from: u64, to: u64) -> io::Result<()> {
        write_zeros(self, from, to)
    }
    /// Calls `f` with the bytes `pos..pos + len` (an error if they are not all in the file).
    /// Backends that can lend the bytes without a copy (an mmap) do so.
    fn read_with<R>(&self, pos: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, pos)?;
        Ok(f(&buf))
    }
    /// Reads the whole file.
    fn read_all(&self) -> io::Result<Vec<u8>> {
        let len = usize::try_from(self.len()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
    /// A hint that nobody will read this file soon: a backend may drop cached mappings.
    fn release_cache(&self) {}
}

static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

/// Writes zeros over `from..to` of a file.
pub fn write_zeros<F: DiskFile + ?Sized>(file: &F, from: u64, to: u64) -> io::Result<()> {
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(ZEROS.len());
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// One write of a group commit: `data` at `pos` in `file`.
pub struct WriteOp<'a, F> {
    /// The file written.
    pub file: &'a Arc<F>,
    /// Byte position in the file.
    pub pos: u64,
    /// The bytes.
    pub data: &'a [u8],
}

/// A directory tree of files. Paths are absolute or relative to the process; the simulated disk
/// treats them as plain keys.
pub trait Disk: Send + Sync + 'static {
    /// The file handle type.
    type File: DiskFile;

    /// Opens `path`, creating an empty file when `create` is set and it does not exist.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<Self::File>>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (files and directories), in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Whether `path` is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file within one directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the entries of a directory (created and removed files) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;

    /// Group commit: performs every write, then, when `sync` is set, makes every written file
    /// durable. Returns one result per op; an op is `Ok` only if its write and (when asked) the
    /// sync of its file both succeeded. The default does the writes one by one and syncs each
    /// distinct file once; backends with a better primitive (io_uring's linked fsync) override it.
    fn write_batch(&self, ops: &[WriteOp<'_, Self::File>], sync: bool) -> Vec<io::Result<()>> {
        write_batch_sequential(ops, sync)
    }
}

/// A copy of an I/O error that keeps its OS error code (so `ENOSPC` stays recognisable) when
/// one failure has to be reported to several callers.
pub fn clone_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// The plain group commit: every write in order, then one `sync_data` per distinct file. An op
/// fails if its write failed or its file's sync failed.
pub fn write_batch_sequential<F: DiskFile>(
    ops: &[WriteOp<'_, F>],
    sync: bool,
) -> Vec<io::Result<()>> {
    let mut results: Vec<io::Result<()>> = ops
        .iter()
        .map(|op| op.file.write_all_at(op.data, op.pos))
        .collect();
    if sync {
        let mut synced: Vec<(*const F, Option<io::Error>)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let key = Arc::as_ptr(op.file);
            let failure = match synced.iter().find(|(k, _)| *k == key) {
                Some((_, failure)) => failure.as_ref().map(clone_io_error),
                None => {
                    let failure = op.file.sync_data().err();
                    let copy = failure.as_ref().map(clone_io_error);
                    synced.push((key, failure));
                    copy
                }
            };
            if let (Some(e), Ok(())) = (failure, &results[i]) {
                results[i] = Err(e);
            }
        }
    }
    results
}
