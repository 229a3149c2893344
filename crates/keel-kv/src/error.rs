//! Errors of the KV service: malformed encodings, violated limits, bad
//! snapshots; and the stable numeric codes an error reply carries.

use thiserror::Error;

/// Everything that can go wrong decoding, validating or restoring.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum KvError {
    #[error("truncated {what}: needed {needed} bytes, found {available}")]
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("unknown {what} tag {found}, expected one of {expected}")]
    UnknownTag {
        what: &'static str,
        found: u8,
        expected: &'static str,
    },
    #[error("{what} has {extra} trailing bytes after its last field")]
    Trailing { what: &'static str, extra: usize },
    #[error("invalid boolean byte {0}, expected 0 or 1")]
    InvalidBool(u8),
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    #[error("empty message, expected at least a 1-byte tag")]
    Empty,
    #[error("key is empty, expected 1 to {max} bytes")]
    EmptyKey { max: usize },
    #[error("key of {len} bytes is too large, expected at most {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes is too large, expected at most {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("snapshot has bad magic {found:?}, expected {expected:?}")]
    BadMagic { found: [u8; 4], expected: [u8; 4] },
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    /// An error reply from the service, as decoded by a client.
    #[error("service error {code:?}: {message}")]
    Remote { code: ErrorCode, message: String },
}

/// The class of an error reply, stable on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The command or query could not be decoded.
    Malformed = 1,
    /// A key or range bound is empty where one is required.
    EmptyKey = 2,
    /// A key or range bound exceeds `MAX_KEY_LEN`.
    KeyTooLarge = 3,
    /// A value exceeds `MAX_VALUE_LEN`.
    ValueTooLarge = 4,
    /// Anything else.
    Internal = 5,
}

impl ErrorCode {
    pub fn from_u8(b: u8) -> Result<ErrorCode, KvError> {
        Ok(match b {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::EmptyKey,
            3 => ErrorCode::KeyTooLarge,
            4 => ErrorCode::ValueTooLarge,
            5 => ErrorCode::Internal,
            found => {
                return Err(KvError::UnknownTag {
                    what: "error code",
                    found,
                    expected: "1..=5",
                })
            }
        })
    }
}

impl KvError {
    /// The code an error reply for this error carries.
    pub fn code(&self) -> ErrorCode {
        match self {
            KvError::Truncated { .. }
            | KvError::UnknownTag { .. }
            | KvError::Trailing { .. }
            | KvError::InvalidBool(_)
            | KvError::InvalidUtf8(_)
            | KvError::Empty => ErrorCode::Malformed,
            KvError::EmptyKey { .. } => ErrorCode::EmptyKey,
            KvError::KeyTooLarge { .. } => ErrorCode::KeyTooLarge,
            KvError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
            KvError::BadMagic { .. } | KvError::InvalidSnapshot(_) => ErrorCode::Internal,
            KvError::Remote { code, .. } => *code,
        }
    }
}
