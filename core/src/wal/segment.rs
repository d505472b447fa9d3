//! Segment files and the recovery scan.
//!
//! A topic is a chain of segment files named by their base offset. Each file starts with a
//! [`SEGMENT_HEADER_LEN`]-byte header (magic, version, base offset, CRC32C) followed by records
//! with offsets `base, base + 1, …`. Files are preallocated with zeros, so the written part ends
//! at the first zeroed header.
//!
//! [`scan_segment`] is recovery: a pure function over the bytes of one file that returns the
//! valid prefix (complete batches only), where to truncate, how far stale bytes reach past that
//! point (so the shell can zero them), and a sparse offset index. It never panics and never
//! accepts a record whose checksum or offset is wrong.

use super::record::{decode_record, RecordError, FLAG_BATCH_CONTINUES};
use crate::limits::INDEX_INTERVAL_BYTES;

/// Bytes of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: usize = 64;

const MAGIC: &[u8; 8] = b"WALRUSSG";
const VERSION: u32 = 1;

/// Why a segment header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentHeaderError {
    /// Shorter than [`SEGMENT_HEADER_LEN`].
    #[error("segment header truncated")]
    Truncated,
    /// The magic bytes are wrong: not a walrus segment (or never written).
    #[error("not a walrus segment (bad magic)")]
    BadMagic,
    /// The header checksum does not match.
    #[error("segment header checksum mismatch")]
    BadChecksum,
    /// A format version this build does not read.
    #[error("unsupported segment version {0}")]
    UnsupportedVersion(u32),
}

/// Encodes the header of a segment whose first entry has offset `base_offset`.
pub fn encode_segment_header(base_offset: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&base_offset.to_le_bytes());
    let crc = crc32c::crc32c(&h[..SEGMENT_HEADER_LEN - 4]);
    h[SEGMENT_HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a segment header and returns the base offset it names.
pub fn decode_segment_header(buf: &[u8]) -> Result<u64, SegmentHeaderError> {
    if buf.len() < SEGMENT_HEADER_LEN {
        return Err(SegmentHeaderError::Truncated);
    }
    let h = &buf[..SEGMENT_HEADER_LEN];
    if &h[0..8] != MAGIC {
        return Err(SegmentHeaderError::BadMagic);
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&h[SEGMENT_HEADER_LEN - 4..]);
    if crc32c::crc32c(&h[..SEGMENT_HEADER_LEN - 4]) != u32::from_le_bytes(crc) {
        return Err(SegmentHeaderError::BadChecksum);
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&h[8..12]);
    let version = u32::from_le_bytes(version);
    if version != VERSION {
        return Err(SegmentHeaderError::UnsupportedVersion(version));
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&h[16..24]);
    Ok(u64::from_le_bytes(base))
}

/// File name of the segment whose base offset is `base_offset`.
pub fn segment_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.seg")
}

/// The base offset named by a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Why the scan of a segment stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// Ran into zeroed bytes or the end of the buffer exactly at a record boundary: a clean end.
    Clean,
    /// The header is unreadable; the segment holds nothing usable.
    BadHeader(SegmentHeaderError),
    /// The header names another base offset than the file name.
    BaseMismatch {
        /// Base offset in the header.
        found: u64,
    },
    /// A record failed to decode at `pos`.
    BadRecord {
        /// Byte position of the bad record.
        pos: u64,
        /// What was wrong.
        error: RecordError,
    },
    /// A record at `pos` holds another offset than the next expected one.
    OffsetMismatch {
        /// Byte position of the record.
        pos: u64,
        /// The offset the chain needed.
        expected: u64,
        /// The offset the record holds.
        found: u64,
    },
}

/// The outcome of scanning one segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// Entries in the valid prefix (complete batches only).
    pub entries: u64,
    /// Byte length of the valid prefix; appends continue here. At least the header length when
    /// the header is valid, 0 when it is not.
    pub valid_len: u64,
    /// One past the last non-zero byte of the input. Bytes in `valid_len..dirty_end` are stale
    /// (a torn or unacknowledged tail) and must be zeroed before appending over them, so that no
    /// stale record can line up behind a new one.
    pub dirty_end: u64,
    /// Sparse index: `(offset, byte position)` of the first record and then of a record about
    /// every [`INDEX_INTERVAL_BYTES`]. Only points inside the valid prefix.
    pub index: Vec<(u64, u64)>,
    /// Why the scan stopped.
    pub stop: ScanStop,
}

impl SegmentScan {
    /// Whether the valid prefix ends where the written data ends (nothing torn or corrupt).
    pub fn is_clean(&self) -> bool {
        self.stop == ScanStop::Clean && self.dirty_end <= self.valid_len
    }
}

/// Scans the bytes of one segment file whose name says its first entry is `expected_base`.
pub fn scan_segment(bytes: &[u8], expected_base: u64) -> SegmentScan {
    let dirty_end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |p| p as u64 + 1);
    let mut scan = SegmentScan {
        entries: 0,
        valid_len: 0,
        dirty_end,
        index: Vec::new(),
        stop: ScanStop::Clean,
    };
    match decode_segment_header(bytes) {
        Err(e) => {
            scan.stop = ScanStop::BadHeader(e);
            return scan;
        }
        Ok(base) if base != expected_base => {
            scan.stop = ScanStop::BaseMismatch { found: base };
            return scan;
        }
        Ok(_) => {}
    }
    scan.valid_len = SEGMENT_HEADER_LEN as u64;
    let mut pos = SEGMENT_HEADER_LEN;
    let mut count: u64 = 0;
    let mut last_index_pos: Option<usize> = None;
    loop {
        if pos == bytes.len() {
            break;
        }
        let record = match decode_record(&bytes[pos..]) {
            Ok(r) => r,
            Err(RecordError::Zeroed) => break,
            Err(error) => {
                scan.stop = ScanStop::BadRecord {
                    pos: pos as u64,
                    error,
                };
                break;
            }
        };
        let expected = expected_base.saturating_add(count);
        if record.offset != expected {
            scan.stop = ScanStop::OffsetMismatch {
                pos: pos as u64,
                expected,
                found: record.offset,
            };
            break;
        }
        if last_index_pos.is_none_or(|p| (pos - p) as u64 >= INDEX_INTERVAL_BYTES) {
            scan.index.push((record.offset, pos as u64));
            last_index_pos = Some(pos);
        }
        pos += record.encoded_len();
        count += 1;
        if record.flags & FLAG_BATCH_CONTINUES == 0 {
            scan.entries = count;
            scan.valid_len = pos as u64;
        }
    }
    // A batch cut short keeps none of its records: drop its index points too.
    let end = expected_base.saturating_add(scan.entries);
    scan.index.retain(|&(offset, _)| offset < end);
    scan
}

#[cfg(test)]
mod tests {
    use super::super::record::{encode_record, RECORD_HEADER_LEN};
    use super::*;
    use proptest::prelude::*;

    fn segment(base: u64, batches: &[&[&[u8]]], prealloc: usize) -> Vec<u8> {
        let mut buf = encode_segment_header(base).to_vec();
        let mut offset = base;
        for batch in batches {
            for (i, payload) in batch.iter().enumerate() {
                let flags = if i + 1 < batch.len() {
                    FLAG_BATCH_CONTINUES
                } else {
                    0
                };
                encode_record(&mut buf, offset, flags, payload);
                offset += 1;
            }
        }
        if buf.len() < prealloc {
            buf.resize(prealloc, 0);
        }
        buf
    }

    #[test]
    fn a_clean_preallocated_segment_recovers_everything() {
        let bytes = segment(10, &[&[b"a"], &[b"bb", b"ccc"], &[b""]], 4096);
        let scan = scan_segment(&bytes, 10);
        assert_eq!(scan.entries, 4);
        assert_eq!(scan.stop, ScanStop::Clean);
        assert!(scan.is_clean());
        assert_eq!(
            scan.valid_len,
            (SEGMENT_HEADER_LEN + 4 * RECORD_HEADER_LEN + 6) as u64
        );
        assert_eq!(scan.index, vec![(10, SEGMENT_HEADER_LEN as u64)]);
    }

    #[test]
    fn a_torn_batch_is_dropped_whole() {
        let full = segment(0, &[&[b"one"], &[b"two", b"three", b"four"]], 0);
        // Cut inside the last record of the batch.
        let cut = &full[..full.len() - 2];
        let scan = scan_segment(cut, 0);
        assert_eq!(scan.entries, 1);
        assert_eq!(
            scan.valid_len,
            (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 3) as u64
        );
        assert!(matches!(scan.stop, ScanStop::BadRecord { .. }));
        assert!(!scan.is_clean());
        // Cut exactly at a record boundary inside the batch: still dropped.
        let boundary = SEGMENT_HEADER_LEN + 2 * RECORD_HEADER_LEN + 3 + 3;
        let scan = scan_segment(&full[..boundary], 0);
        assert_eq!(scan.entries, 1);
    }

    #[test]
    fn a_stale_record_with_the_wrong_offset_is_not_taken() {
        let mut bytes = segment(0, &[&[b"x"]], 0);
        encode_record(&mut bytes, 5, 0, b"stale");
        let scan = scan_segment(&bytes, 0);
        assert_eq!(scan.entries, 1);
        assert!(matches!(
            scan.stop,
            ScanStop::OffsetMismatch {
                expected: 1,
                found: 5,
                ..
            }
        ));
        assert_eq!(scan.dirty_end, bytes.len() as u64);
    }

    #[test]
    fn an_entry_larger_than_the_preallocation_recovers() {
        let big = vec![7u8; 3 << 20];
        let bytes = segment(0, &[&[&big], &[b"after"]], 1 << 20);
        let scan = scan_segment(&bytes, 0);
        assert_eq!(scan.entries, 2);
        assert!(scan.is_clean());
    }

    #[test]
    fn header_problems_are_named() {
        assert_eq!(
            scan_segment(&[0u8; 10], 0).stop,
            ScanStop::BadHeader(SegmentHeaderError::Truncated)
        );
        assert_eq!(
            scan_segment(&[0u8; 100], 0).stop,
            ScanStop::BadHeader(SegmentHeaderError::BadMagic)
        );
        let bytes = segment(3, &[], 0);
        assert_eq!(
            scan_segment(&bytes, 4).stop,
            ScanStop::BaseMismatch { found: 3 }
        );
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert_eq!(
            scan_segment(&flipped, 3).stop,
            ScanStop::BadHeader(SegmentHeaderError::BadChecksum)
        );
    }

    #[test]
    fn the_sparse_index_points_at_real_records() {
        let payload = vec![1u8; 1000];
        let one: [&[u8]; 1] = [&payload];
        let batches: Vec<&[&[u8]]> = (0..300).map(|_| &one[..]).collect();
        let bytes = segment(100, &batches, 0);
        let scan = scan_segment(&bytes, 100);
        assert_eq!(scan.entries, 300);
        assert!(scan.index.len() >= 4);
        for &(offset, pos) in &scan.index {
            let r = decode_record(&bytes[pos as usize..]).unwrap();
            assert_eq!(r.offset, offset);
        }
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_segment_file_name(&segment_file_name(123)), Some(123));
        assert_eq!(parse_segment_file_name("123.seg"), None);
        assert_eq!(parse_segment_file_name("cursor"), None);
    }

    proptest! {
        #[test]
        fn scan_never_panics_and_only_keeps_checked_records(bytes in proptest::collection::vec(any::<u8>(), 0..600), base in 0u64..4) {
            let scan = scan_segment(&bytes, base);
            prop_assert!(scan.valid_len <= bytes.len() as u64);
            prop_assert!(scan.entries == 0 || scan.valid_len > SEGMENT_HEADER_LEN as u64);
        }

        #[test]
        fn corrupting_a_valid_segment_keeps_a_true_prefix(
            sizes in proptest::collection::vec(0usize..300, 1..12),
            flip_at in any::<prop::sample::Index>(),
            flip_bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let payloads: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect();
            let batches: Vec<Vec<&[u8]>> = payloads.iter().map(|p| vec![&p[..]]).collect();
            let batch_refs: Vec<&[&[u8]]> = batches.iter().map(|b| &b[..]).collect();
            let mut bytes = segment(0, &batch_refs, 0);
            let at = flip_at.index(bytes.len());
            bytes[at] ^= 1 << flip_bit;
            let cut = cut.index(bytes.len() + 1);
            let scan = scan_segment(&bytes[..cut], 0);
            // Every entry the scan keeps is one of the written ones, byte-exact.
            let mut pos = SEGMENT_HEADER_LEN;
            for (i, want) in payloads.iter().take(scan.entries as usize).enumerate() {
                let r = decode_record(&bytes[pos..]).unwrap();
                prop_assert_eq!(r.offset, i as u64);
                prop_assert_eq!(r.payload, &want[..]);
                pos += r.encoded_len();
            }
            prop_assert_eq!(pos as u64, scan.valid_len.max(SEGMENT_HEADER_LEN as u64));
        }
    }
}
