//! One record of a segment file.
//!
//! ```text
//! [len u32 LE][crc u32 LE][offset u64 LE][flags u8][reserved 3 bytes = 0][payload: len bytes]
//! ```
//! `crc` is CRC32C over `len`, `offset`, `flags`, `reserved` and the payload: every byte recovery
//! trusts is covered. `offset` is the entry's topic-wide offset; recovery checks that it is the
//! next one expected, so a stale record left behind by an earlier, longer write is never taken
//! for a new one. Flag [`FLAG_BATCH_CONTINUES`] marks every record of a batch but the last, so a
//! batch whose tail was lost in a crash is dropped as a whole.

use crate::limits::ENTRY_PAYLOAD_MAX;

/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 20;

/// Set on every record of a batch except its last: recovery keeps a batch only once the record
/// without this flag is present.
pub const FLAG_BATCH_CONTINUES: u8 = 0x01;

const FLAGS_KNOWN: u8 = FLAG_BATCH_CONTINUES;

/// Why bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The header is all zeros: the end of the written part of a preallocated file.
    #[error("zeroed header (end of written data)")]
    Zeroed,
    /// Fewer bytes than the header or the stated length need.
    #[error("record truncated: needs {needed} bytes, {available} available")]
    Truncated {
        /// Bytes the record needs.
        needed: u64,
        /// Bytes there are.
        available: u64,
    },
    /// The stated payload length is over [`ENTRY_PAYLOAD_MAX`].
    #[error("record length {0} is over the limit")]
    TooLarge(u64),
    /// The checksum does not match the bytes.
    #[error("record checksum mismatch")]
    BadChecksum,
    /// The checksum matches but the flags or reserved bytes hold values this version never
    /// writes.
    #[error("record has unknown flags {0:#x}")]
    UnknownFlags(u8),
}

/// A decoded record borrowing its payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Topic-wide entry offset.
    pub offset: u64,
    /// Flag bits.
    pub flags: u8,
    /// The entry's bytes.
    pub payload: &'a [u8],
}

impl Record<'_> {
    /// Bytes this record occupies on disk.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.payload.len()
    }
}

/// Bytes a record with a payload of `payload_len` bytes occupies.
pub fn encoded_len(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + payload_len
}

/// Appends one encoded record to `out`.
///
/// The caller bounds `payload.len()` by [`ENTRY_PAYLOAD_MAX`]; a longer payload is a bug in the
/// caller (the engine refuses it with an error before getting here).
pub fn encode_record(out: &mut Vec<u8>, offset: u64, flags: u8, payload: &[u8]) {
    encode_record_parts(out, offset, flags, &[payload]);
}

/// [`encode_record`] of the payload `parts` concatenated, without building it first.
///
/// # Panics
/// If the parts together exceed [`ENTRY_PAYLOAD_MAX`].
pub fn encode_record_parts(out: &mut Vec<u8>, offset: u64, flags: u8, parts: &[&[u8]]) {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    assert!(total <= ENTRY_PAYLOAD_MAX, "payload over ENTRY_PAYLOAD_MAX");
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&(total as u32).to_le_bytes());
    header[8..16].copy_from_slice(&offset.to_le_bytes());
    header[16] = flags;
    let crc = crc32c::crc32c(&header[0..4]);
    let mut crc = crc32c::crc32c_append(crc, &header[8..RECORD_HEADER_LEN]);
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    out.reserve(RECORD_HEADER_LEN + total);
    out.extend_from_slice(&header);
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Decodes the record at the start of `buf`. Never panics, never allocates, and returns a
/// record only if its checksum matches.
pub fn decode_record(buf: &[u8]) -> Result<Record<'_>, RecordError> {
    if buf.len() < RECORD_HEADER_LEN {
        if buf.iter().all(|&b| b == 0) {
            return Err(RecordError::Zeroed);
        }
        return Err(RecordError::Truncated {
            needed: RECORD_HEADER_LEN as u64,
            available: buf.len() as u64,
        });
    }
    let header = &buf[..RECORD_HEADER_LEN];
    if header.iter().all(|&b| b == 0) {
        return Err(RecordError::Zeroed);
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
    if len > ENTRY_PAYLOAD_MAX as u64 {
        return Err(RecordError::TooLarge(len));
    }
    let needed = RECORD_HEADER_LEN as u64 + len;
    if (buf.len() as u64) < needed {
        return Err(RecordError::Truncated {
            needed,
            available: buf.len() as u64,
        });
    }
    let payload = &buf[RECORD_HEADER_LEN..needed as usize];
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if checksum(header, payload) != stored {
        return Err(RecordError::BadChecksum);
    }
    let flags = header[16];
    if flags & !FLAGS_KNOWN != 0 || header[17..20] != [0, 0, 0] {
        return Err(RecordError::UnknownFlags(flags));
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&header[8..16]);
    Ok(Record {
        offset: u64::from_le_bytes(offset),
        flags,
        payload,
    })
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[0..4]);
    let crc = crc32c::crc32c_append(crc, &header[8..RECORD_HEADER_LEN]);
    crc32c::crc32c_append(crc, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_record_encoded_in_parts_is_the_record_of_their_concatenation(
            parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..5),
            offset in any::<u64>(),
            flags in any::<u8>(),
        ) {
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let mut split = Vec::new();
            encode_record_parts(&mut split, offset, flags, &refs);
            let mut whole = Vec::new();
            encode_record(&mut whole, offset, flags, &parts.concat());
            prop_assert_eq!(split, whole);
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 42, FLAG_BATCH_CONTINUES, b"hello");
        encode_record(&mut buf, 43, 0, b"");
        let a = decode_record(&buf).unwrap();
        assert_eq!(
            (a.offset, a.flags, a.payload),
            (42, FLAG_BATCH_CONTINUES, &b"hello"[..])
        );
        let b = decode_record(&buf[a.encoded_len()..]).unwrap();
        assert_eq!((b.offset, b.flags, b.payload), (43, 0, &b""[..]));
    }

    #[test]
    fn zeros_are_the_end_not_a_record() {
        assert_eq!(decode_record(&[0u8; 64]), Err(RecordError::Zeroed));
        assert_eq!(decode_record(&[0u8; 3]), Err(RecordError::Zeroed));
    }

    #[test]
    fn a_huge_length_is_refused_before_anything_else() {
        let mut buf = vec![0u8; 64];
        buf[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_record(&buf),
            Err(RecordError::TooLarge(u32::MAX as u64))
        );
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 7, 0, b"payload bytes");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut copy = buf.clone();
                copy[byte] ^= 1 << bit;
                assert!(
                    decode_record(&copy).is_err(),
                    "flip at {byte}:{bit} went unnoticed"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(r) = decode_record(&bytes) {
                // Whatever it accepts must re-encode to the same bytes.
                let mut again = Vec::new();
                encode_record(&mut again, r.offset, r.flags, r.payload);
                prop_assert_eq!(&again[..], &bytes[..r.encoded_len()]);
            }
        }

        #[test]
        fn round_trip_any_payload(offset in any::<u64>(), last in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let flags = if last { 0 } else { FLAG_BATCH_CONTINUES };
            let mut buf = Vec::new();
            encode_record(&mut buf, offset, flags, &payload);
            let r = decode_record(&buf).unwrap();
            prop_assert_eq!(r.offset, offset);
            prop_assert_eq!(r.flags, flags);
            prop_assert_eq!(r.payload, &payload[..]);
        }
    }
}
