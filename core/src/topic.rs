//! Topic and namespace names: what is a valid name, and how a key becomes a directory name.

use crate::limits::TOPIC_NAME_LEN_MAX;

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    /// The name is empty.
    #[error("topic name is empty")]
    Empty,
    /// The name is longer than [`TOPIC_NAME_LEN_MAX`] bytes.
    #[error("topic name is {0} bytes long; the limit is {TOPIC_NAME_LEN_MAX}")]
    TooLong(usize),
    /// The name holds a byte outside `[A-Za-z0-9._-]`.
    #[error("topic name holds {0:?}; only A-Z a-z 0-9 . _ - are allowed")]
    BadChar(char),
    /// The name is `.` or `..`, which cannot be a directory name.
    #[error("topic name {0:?} is reserved")]
    Reserved(String),
}

/// Checks a topic name: 1 to 255 bytes of `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() {
        return Err(TopicNameError::Empty);
    }
    if name.len() > TOPIC_NAME_LEN_MAX {
        return Err(TopicNameError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(TopicNameError::BadChar(c));
    }
    if name == "." || name == ".." {
        return Err(TopicNameError::Reserved(name.to_string()));
    }
    Ok(())
}

/// Turns an instance key into a directory name the way upstream walrus does: characters outside
/// `[A-Za-z0-9._-]` become `_`, and a key that is left with nothing but `_` (or is `.`/`..`)
/// becomes `ns_<hex of a checksum>`.
pub fn sanitize_namespace(key: &str) -> String {
    let sanitized: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = sanitized.trim_matches('_');
    if trimmed.is_empty() || sanitized == "." || sanitized == ".." {
        format!("ns_{:08x}", crc32c::crc32c(key.as_bytes()))
    } else {
        sanitized
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_protocol_rules() {
        assert_eq!(validate_topic_name("logs"), Ok(()));
        assert_eq!(validate_topic_name("a.b_c-D9"), Ok(()));
        assert_eq!(validate_topic_name(""), Err(TopicNameError::Empty));
        assert_eq!(
            validate_topic_name(".."),
            Err(TopicNameError::Reserved("..".into()))
        );
        assert_eq!(
            validate_topic_name("a/b"),
            Err(TopicNameError::BadChar('/'))
        );
        assert_eq!(
            validate_topic_name("a b"),
            Err(TopicNameError::BadChar(' '))
        );
        let long = "x".repeat(256);
        assert_eq!(
            validate_topic_name(&long),
            Err(TopicNameError::TooLong(256))
        );
        assert_eq!(validate_topic_name(&long[..255]), Ok(()));
    }

    #[test]
    fn namespaces_become_safe_directory_names() {
        assert_eq!(sanitize_namespace("tenant-123"), "tenant-123");
        assert_eq!(sanitize_namespace("a/b c"), "a_b_c");
        assert!(sanitize_namespace("///").starts_with("ns_"));
        assert!(sanitize_namespace("..").starts_with("ns_"));
    }
}
