//! Named limits shared by the engine and the shells. Every length read from disk or from the
//! network is checked against one of these before anything is allocated.

/// Largest payload of one entry: 256 MiB. Entries larger than a segment are fine (the segment
/// grows to hold them); this bound only exists so that a corrupt length can never make a reader
/// allocate gigabytes.
pub const ENTRY_PAYLOAD_MAX: usize = 256 << 20;

/// Largest number of entries in one `batch_append_for_topic` call (upstream allows 2,000).
pub const BATCH_ENTRIES_MAX: usize = 2_000;

/// Largest total payload of one batch: 1 GiB.
pub const BATCH_BYTES_MAX: usize = 1 << 30;

/// Longest topic name, in bytes.
pub const TOPIC_NAME_LEN_MAX: usize = 255;

/// Default size a segment file may reach before the next append rolls to a new segment.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;

/// The sparse offset index keeps one `(offset, position)` point per this many bytes of segment.
pub const INDEX_INTERVAL_BYTES: u64 = 64 << 10;
