//! The checkpoint file of a topic's read cursor.
//!
//! A cursor is stored as the *entry offset* of the next entry to deliver, never as a byte
//! position, so it stays right when old segment files are reclaimed. The file has two
//! [`CURSOR_SLOT_LEN`]-byte slots written alternately, each with a sequence number and a CRC32C:
//! a write torn by a crash damages at most the slot being written, and recovery takes the valid
//! slot with the highest sequence number.

/// Bytes of one slot.
pub const CURSOR_SLOT_LEN: usize = 32;
/// Bytes of the whole cursor file.
pub const CURSOR_FILE_LEN: usize = 2 * CURSOR_SLOT_LEN;

const MAGIC: &[u8; 4] = b"WCUR";

/// A persisted cursor position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorSlot {
    /// Increases by one with every write; picks the newest slot.
    pub seq: u64,
    /// Offset of the next entry to deliver.
    pub next_offset: u64,
}

impl CursorSlot {
    /// Byte position of this slot in the cursor file.
    pub fn file_pos(&self) -> u64 {
        (self.seq % 2) * CURSOR_SLOT_LEN as u64
    }

    /// Encodes the slot.
    pub fn encode(&self) -> [u8; CURSOR_SLOT_LEN] {
        let mut b = [0u8; CURSOR_SLOT_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.next_offset.to_le_bytes());
        let crc = crc32c::crc32c(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes one slot; `None` if it is empty, torn or corrupt.
    pub fn decode(b: &[u8]) -> Option<CursorSlot> {
        if b.len() < CURSOR_SLOT_LEN || &b[0..4] != MAGIC {
            return None;
        }
        let word = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 8];
            a[..r.len()].copy_from_slice(&b[r]);
            u64::from_le_bytes(a)
        };
        if crc32c::crc32c(&b[..24]) as u64 != word(24..28) {
            return None;
        }
        Some(CursorSlot {
            seq: word(8..16),
            next_offset: word(16..24),
        })
    }
}

/// Recovers the newest valid slot from the bytes of a cursor file (any length).
pub fn recover_cursor(file: &[u8]) -> Option<CursorSlot> {
    let a = file.get(..CURSOR_SLOT_LEN).and_then(CursorSlot::decode);
    let b = file
        .get(CURSOR_SLOT_LEN..CURSOR_FILE_LEN)
        .and_then(CursorSlot::decode);
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.seq >= b.seq { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newest_valid_slot_wins_and_a_torn_slot_falls_back() {
        let mut file = vec![0u8; CURSOR_FILE_LEN];
        assert_eq!(recover_cursor(&file), None);
        for (seq, next_offset) in [(1u64, 10u64), (2, 20), (3, 30)] {
            let s = CursorSlot { seq, next_offset };
            let p = s.file_pos() as usize;
            file[p..p + CURSOR_SLOT_LEN].copy_from_slice(&s.encode());
        }
        assert_eq!(
            recover_cursor(&file),
            Some(CursorSlot {
                seq: 3,
                next_offset: 30
            })
        );
        // Tear the newest slot (seq 3 lives in slot 1).
        file[CURSOR_SLOT_LEN + 17] ^= 0xff;
        assert_eq!(
            recover_cursor(&file),
            Some(CursorSlot {
                seq: 2,
                next_offset: 20
            })
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = recover_cursor(&bytes);
        }

        #[test]
        fn slots_round_trip(seq in any::<u64>(), next_offset in any::<u64>()) {
            let s = CursorSlot { seq, next_offset };
            prop_assert_eq!(CursorSlot::decode(&s.encode()), Some(s));
        }
    }
}
