//! The on-disk format of the storage engine and its recovery, as pure functions over bytes.
//!
//! - [`record`]: one entry on disk (`len`, CRC32C, offset, flags, payload) and its decoder.
//! - [`segment`]: the segment file header and the recovery scan that finds the valid prefix.
//! - [`cursor`]: the two-slot checkpoint file that stores a reader's next entry offset.
//!
//! Nothing here touches a file: the shells read bytes, call these, and act on the result.

pub mod cursor;
pub mod record;
pub mod segment;
