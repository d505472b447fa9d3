//! The client wire protocol (byte-compatible with upstream walrus): frames and commands.
//!
//! A frame is `[u32 little-endian length][body]`. Request bodies are `REGISTER <topic>`,
//! `PUT <topic> <payload>`, `GET <topic>`, `STATE <topic>` and `METRICS` (upstream's), plus
//! `PUTD <durability> <topic> <payload>` (a PUT acknowledged at the named level, answered
//! `OK <offset> <durability>`); reply bodies are
//! `OK`, `OK <payload>`, `EMPTY` and `ERR <reason>`. Payloads are arbitrary bytes: the frame
//! gives their length, and they are never trimmed or re-encoded. Pure functions over bytes; the
//! shells own the sockets.

use crate::topic::{validate_topic_name, TopicNameError};

/// Default largest frame body accepted: 1 MiB.
pub const FRAME_LEN_MAX_DEFAULT: usize = 1 << 20;
/// Bytes of the frame length prefix.
pub const FRAME_PREFIX_LEN: usize = 4;

/// Why a frame could not be taken from a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces a body over the limit; the connection must be closed, since
    /// the rest of the stream cannot be trusted as frames.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Announced body length.
        len: u64,
        /// The limit.
        max: usize,
    },
}

/// Takes one frame from the front of `buf`: `Ok(Some((body, consumed)))` when a whole frame is
/// there, `Ok(None)` when more bytes are needed. The length is checked against `max` before
/// anything else, so a hostile prefix never makes the caller buffer more than `max` bytes.
pub fn take_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < FRAME_PREFIX_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64;
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    let end = FRAME_PREFIX_LEN + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((&buf[FRAME_PREFIX_LEN..end], end)))
}

/// Appends `body` as one frame to `out`. Bodies over `u32::MAX` bytes cannot be framed; the
/// callers' limits are far below that.
pub fn put_frame(out: &mut Vec<u8>, body: &[u8]) {
    let len = u32::try_from(body.len()).expect("frame bodies are bounded far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
}

/// When a PUT is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Durability {
    /// Once a majority of the segment's replicas have fsynced it.
    QuorumFsync,
    /// Once a majority of the segment's replicas have written it (page cache, no fsync).
    QuorumMemory,
    /// Once the segment leader has fsynced it.
    LeaderFsync,
    /// Once the segment leader has written it (page cache).
    None,
}

impl Durability {
    /// Every level, strongest first.
    pub const ALL: [Durability; 4] = [
        Durability::QuorumFsync,
        Durability::QuorumMemory,
        Durability::LeaderFsync,
        Durability::None,
    ];

    /// The level's name on the wire and in flags.
    pub fn name(self) -> &'static str {
        match self {
            Durability::QuorumFsync => "quorum-fsync",
            Durability::QuorumMemory => "quorum-memory",
            Durability::LeaderFsync => "leader-fsync",
            Durability::None => "none",
        }
    }

    /// Parses a level name (exact, lower case).
    pub fn parse(name: &[u8]) -> Option<Durability> {
        Durability::ALL
            .into_iter()
            .find(|d| d.name().as_bytes() == name)
    }

    /// Whether the acknowledgement waits for a majority of the replicas.
    pub fn needs_quorum(self) -> bool {
        matches!(self, Durability::QuorumFsync | Durability::QuorumMemory)
    }

    /// Whether the acknowledgement waits for fsync.
    pub fn needs_fsync(self) -> bool {
        matches!(self, Durability::QuorumFsync | Durability::LeaderFsync)
    }
}

/// A client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `REGISTER <topic>`: create the topic if needed.
    Register(&'a str),
    /// `PUT <topic> <payload>`: append one entry.
    Put(&'a str, &'a [u8]),
    /// `PUTD <durability> <topic> <payload>`: append one entry, acknowledged at that level.
    PutWith(Durability, &'a str, &'a [u8]),
    /// `GET <topic>`: the next entry at the topic's shared cursor.
    Get(&'a str),
    /// `STATE <topic>`: the topic's segments as JSON.
    State(&'a str),
    /// `METRICS`: node and Raft metrics as JSON.
    Metrics,
}

/// Why a request body is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The body is empty.
    #[error("empty command")]
    Empty,
    /// The verb is not one of the five.
    #[error("unknown command {0:?}")]
    Unknown(String),
    /// A required argument is missing.
    #[error("{0} needs {1}")]
    Missing(&'static str, &'static str),
    /// Extra arguments after a command that takes none (or only a topic).
    #[error("{0} takes no further arguments")]
    Extra(&'static str),
    /// The topic name is not valid.
    #[error("invalid topic: {0}")]
    Topic(#[from] TopicNameError),
    /// Not one of the durability levels.
    #[error("unknown durability {0:?} (quorum-fsync, quorum-memory, leader-fsync or none)")]
    Durability(String),
}

/// Parses a request body. Verbs are case-insensitive, as upstream; the topic ends at the first
/// space; a `PUT` payload is every byte after the space that follows the topic.
pub fn parse_command(body: &[u8]) -> Result<Command<'_>, CommandError> {
    if body.is_empty() {
        return Err(CommandError::Empty);
    }
    let (verb, rest) = split_word(body);
    let verb_str = String::from_utf8_lossy(verb).to_ascii_uppercase();
    match verb_str.as_str() {
        "REGISTER" | "GET" | "STATE" => {
            let name: &'static str = match verb_str.as_str() {
                "REGISTER" => "REGISTER",
                "GET" => "GET",
                _ => "STATE",
            };
            let (topic, tail) = topic_word(name, rest)?;
            if !tail.is_empty() {
                return Err(CommandError::Extra(name));
            }
            Ok(match name {
                "REGISTER" => Command::Register(topic),
                "GET" => Command::Get(topic),
                _ => Command::State(topic),
            })
        }
        "PUT" => {
            let (topic, payload) = put_args("PUT", rest)?;
            Ok(Command::Put(topic, payload))
        }
        "PUTD" => {
            let (level, rest) = split_word(rest);
            if level.is_empty() {
                return Err(CommandError::Missing("PUTD", "a durability"));
            }
            let level = Durability::parse(level).ok_or_else(|| {
                CommandError::Durability(String::from_utf8_lossy(level).into_owned())
            })?;
            let (topic, payload) = put_args("PUTD", rest)?;
            Ok(Command::PutWith(level, topic, payload))
        }
        "METRICS" => {
            if rest.is_empty() {
                Ok(Command::Metrics)
            } else {
                Err(CommandError::Extra("METRICS"))
            }
        }
        _ => Err(CommandError::Unknown(
            String::from_utf8_lossy(verb).into_owned(),
        )),
    }
}

/// `<topic> <payload>`: after the topic comes exactly one space; everything after it is the
/// payload.
fn put_args<'a>(verb: &'static str, rest: &'a [u8]) -> Result<(&'a str, &'a [u8]), CommandError> {
    let (topic, _) = topic_word(verb, rest)?;
    match rest[topic.len()..].split_first() {
        Some((b' ', payload)) => Ok((topic, payload)),
        _ => Err(CommandError::Missing(verb, "a payload")),
    }
}

/// Encodes a request body.
pub fn encode_command(cmd: &Command<'_>) -> Vec<u8> {
    match cmd {
        Command::Register(t) => format!("REGISTER {t}").into_bytes(),
        Command::Get(t) => format!("GET {t}").into_bytes(),
        Command::State(t) => format!("STATE {t}").into_bytes(),
        Command::Metrics => b"METRICS".to_vec(),
        Command::Put(t, p) => {
            let mut b = format!("PUT {t} ").into_bytes();
            b.extend_from_slice(p);
            b
        }
        Command::PutWith(d, t, p) => {
            let mut b = format!("PUTD {} {t} ", d.name()).into_bytes();
            b.extend_from_slice(p);
            b
        }
    }
}

/// A server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK` or `OK <payload>`.
    Ok(Option<Vec<u8>>),
    /// `EMPTY`: nothing to read.
    Empty,
    /// `ERR <reason>`.
    Err(String),
}

/// Encodes a reply body.
pub fn encode_reply(r: &Reply) -> Vec<u8> {
    match r {
        Reply::Ok(None) => b"OK".to_vec(),
        Reply::Ok(Some(p)) => {
            let mut b = b"OK ".to_vec();
            b.extend_from_slice(p);
            b
        }
        Reply::Empty => b"EMPTY".to_vec(),
        Reply::Err(reason) => format!("ERR {reason}").into_bytes(),
    }
}

/// Appends the frame of `Reply::Ok(Some(offset))` (an acknowledged PUT), as `put_frame` of
/// `encode_reply` would, without allocating.
pub fn put_offset_reply(out: &mut Vec<u8>, offset: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut v = offset;
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let body = 3 + digits.len() - at;
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.extend_from_slice(b"OK ");
    out.extend_from_slice(&digits[at..]);
}

/// Parses a reply body; anything unrecognised is an error reply describing it.
pub fn parse_reply(body: &[u8]) -> Reply {
    if body == b"OK" {
        Reply::Ok(None)
    } else if let Some(p) = body.strip_prefix(b"OK ") {
        Reply::Ok(Some(p.to_vec()))
    } else if body == b"EMPTY" {
        Reply::Empty
    } else if let Some(r) = body.strip_prefix(b"ERR") {
        Reply::Err(String::from_utf8_lossy(r.strip_prefix(b" ").unwrap_or(r)).into_owned())
    } else {
        Reply::Err(format!(
            "malformed reply {:?}",
            String::from_utf8_lossy(&body[..body.len().min(64)])
        ))
    }
}

/// The topic word at the start of `rest` (validated) and what follows its space.
fn topic_word<'a>(verb: &'static str, rest: &'a [u8]) -> Result<(&'a str, &'a [u8]), CommandError> {
    let (topic, tail) = split_word(rest);
    if topic.is_empty() {
        return Err(CommandError::Missing(verb, "a topic"));
    }
    let topic = std::str::from_utf8(topic).map_err(|_| TopicNameError::BadChar('\u{fffd}'))?;
    validate_topic_name(topic)?;
    Ok((topic, tail))
}

fn split_word(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == b' ') {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn putd_rejects_bad_levels_and_missing_parts() {
        assert_eq!(
            parse_command(b"PUTD quorum-fsync t x"),
            Ok(Command::PutWith(Durability::QuorumFsync, "t", b"x"))
        );
        assert_eq!(
            parse_command(b"putd none t "),
            Ok(Command::PutWith(Durability::None, "t", b""))
        );
        assert_eq!(
            parse_command(b"PUTD fast t x"),
            Err(CommandError::Durability("fast".into()))
        );
        assert_eq!(
            parse_command(b"PUTD"),
            Err(CommandError::Missing("PUTD", "a durability"))
        );
        assert_eq!(
            parse_command(b"PUTD leader-fsync t"),
            Err(CommandError::Missing("PUTD", "a payload"))
        );
    }

    #[test]
    fn commands_parse_as_upstream_sends_them() {
        assert_eq!(
            parse_command(b"REGISTER logs"),
            Ok(Command::Register("logs"))
        );
        assert_eq!(
            parse_command(b"put logs hello world"),
            Ok(Command::Put("logs", b"hello world"))
        );
        assert_eq!(parse_command(b"PUT logs "), Ok(Command::Put("logs", b"")));
        assert_eq!(
            parse_command(b"PUT logs  two"),
            Ok(Command::Put("logs", b" two"))
        );
        assert_eq!(parse_command(b"GET logs"), Ok(Command::Get("logs")));
        assert_eq!(parse_command(b"STATE logs"), Ok(Command::State("logs")));
        assert_eq!(parse_command(b"METRICS"), Ok(Command::Metrics));
        assert_eq!(parse_command(b""), Err(CommandError::Empty));
        assert_eq!(
            parse_command(b"PUT logs"),
            Err(CommandError::Missing("PUT", "a payload"))
        );
        assert_eq!(
            parse_command(b"GET"),
            Err(CommandError::Missing("GET", "a topic"))
        );
        assert_eq!(parse_command(b"GET a b"), Err(CommandError::Extra("GET")));
        assert_eq!(
            parse_command(b"METRICS x"),
            Err(CommandError::Extra("METRICS"))
        );
        assert!(matches!(
            parse_command(b"GET a/b"),
            Err(CommandError::Topic(_))
        ));
        assert!(matches!(
            parse_command(b"FROB x"),
            Err(CommandError::Unknown(_))
        ));
    }

    #[test]
    fn frames_are_bounded_before_buffering() {
        let mut buf = Vec::new();
        put_frame(&mut buf, b"GET t");
        assert_eq!(take_frame(&buf, 16), Ok(Some((&b"GET t"[..], 9))));
        assert_eq!(take_frame(&buf[..6], 16), Ok(None));
        let huge = u32::MAX.to_le_bytes();
        assert_eq!(
            take_frame(&huge, 16),
            Err(FrameError::TooLarge {
                len: u32::MAX as u64,
                max: 16
            })
        );
    }

    proptest! {
        #[test]
        fn offset_replies_are_the_frames_encode_reply_gives(offset in any::<u64>()) {
            let mut fast = Vec::new();
            put_offset_reply(&mut fast, offset);
            let mut slow = Vec::new();
            let reply = Reply::Ok(Some(offset.to_string().into_bytes()));
            put_frame(&mut slow, &encode_reply(&reply));
            prop_assert_eq!(fast, slow);
        }
    }

    #[test]
    fn offset_replies_at_the_edges() {
        for offset in [0, 9, 10, u64::MAX] {
            let mut fast = Vec::new();
            put_offset_reply(&mut fast, offset);
            assert_eq!(&fast[4..], format!("OK {offset}").as_bytes());
        }
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(cmd) = parse_command(&body) {
                let again = encode_command(&cmd);
                prop_assert_eq!(parse_command(&again), Ok(cmd));
            }
            let _ = parse_reply(&body);
            let _ = take_frame(&body, 32);
        }

        #[test]
        fn put_payloads_round_trip_byte_exact(topic in "[A-Za-z0-9._-]{1,20}", payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assume!(topic != "." && topic != "..");
            let body = encode_command(&Command::Put(&topic, &payload));
            prop_assert_eq!(parse_command(&body), Ok(Command::Put(&topic, &payload)));
            let reply = Reply::Ok(Some(payload.clone()));
            prop_assert_eq!(parse_reply(&encode_reply(&reply)), reply);
        }

        #[test]
        fn putd_round_trips_every_level(topic in "[A-Za-z0-9._-]{1,20}", payload in proptest::collection::vec(any::<u8>(), 0..200), level in 0usize..4) {
            prop_assume!(topic != "." && topic != "..");
            let d = Durability::ALL[level];
            let body = encode_command(&Command::PutWith(d, &topic, &payload));
            prop_assert_eq!(parse_command(&body), Ok(Command::PutWith(d, &topic, &payload)));
        }
    }
}
