//! Errors of the KV service: malformed encodings, violated limits, bad
//! snapshots, the etcd-style request errors; and the stable numeric codes an
//! error reply carries, with the gRPC status an etcd front end should map
//! each one to.
//!
//! The etcd-style errors display etcd v3.4's exact gRPC messages (see
//! etcd's `etcdserver/api/v3rpc/rpctypes/error.go`), so a front end can pass
//! `Response::Error::message` through unchanged.

use thiserror::Error;

/// Everything that can go wrong decoding, validating, applying or restoring.
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
    #[error("txn nested {depth} levels deep, expected at most {max}")]
    TxnTooDeep { depth: usize, max: usize },
    #[error("a txn sent as a query must only read, found a {0} operation; send it as a command")]
    TxnNotReadOnly(&'static str),
    #[error("key is empty, expected 1 to {max} bytes")]
    EmptyKey { max: usize },
    #[error("key of {len} bytes is too large, expected at most {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes is too large, expected at most {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error(
        "snapshot has bad magic {}, expected {}",
        keel_core::MagicText(found),
        keel_core::MagicText(expected)
    )]
    BadMagic { found: [u8; 4], expected: [u8; 4] },
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    /// etcd `mvcc.ErrFutureRev`.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// etcd `mvcc.ErrCompacted`.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// etcd `lease.ErrLeaseNotFound`.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// etcd `lease.ErrLeaseExists`.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// etcd `lease.ErrLeaseTTLTooLarge`.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// etcd `rpctypes.ErrGRPCDuplicateKey`.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// etcd `etcdserver.ErrKeyNotFound` (ignore_value / ignore_lease on a
    /// missing key).
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// etcd `rpctypes.ErrGRPCValueProvided`.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// etcd `rpctypes.ErrGRPCLeaseProvided`.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// etcd `rpctypes.ErrGRPCTooManyOps`.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
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
    /// A read or hash at a revision after the current one.
    FutureRevision = 6,
    /// A read, watch, hash or compaction at a compacted revision.
    Compacted = 7,
    /// The lease does not exist (or has expired).
    LeaseNotFound = 8,
    /// A lease grant with an id already in use.
    LeaseExists = 9,
    /// A lease grant with a TTL above `MAX_LEASE_TTL`.
    LeaseTtlTooLarge = 10,
    /// A txn writes the same key twice (etcd's interval rules).
    DuplicateKey = 11,
    /// A put with ignore_value or ignore_lease on a missing key.
    KeyNotFound = 12,
    /// A put with ignore_value and a value.
    ValueProvided = 13,
    /// A put with ignore_lease and a lease.
    LeaseProvided = 14,
    /// A txn with more than `MAX_TXN_OPS` compares or operations per branch.
    TooManyOps = 15,
    /// A txn with writes sent as a query.
    NotReadOnly = 16,
}

/// gRPC status codes (numbers as in `google.rpc.Code` / `tonic::Code`).
pub mod grpc {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const INTERNAL: i32 = 13;
}

impl ErrorCode {
    pub fn from_u8(b: u8) -> Result<ErrorCode, KvError> {
        Ok(match b {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::EmptyKey,
            3 => ErrorCode::KeyTooLarge,
            4 => ErrorCode::ValueTooLarge,
            5 => ErrorCode::Internal,
            6 => ErrorCode::FutureRevision,
            7 => ErrorCode::Compacted,
            8 => ErrorCode::LeaseNotFound,
            9 => ErrorCode::LeaseExists,
            10 => ErrorCode::LeaseTtlTooLarge,
            11 => ErrorCode::DuplicateKey,
            12 => ErrorCode::KeyNotFound,
            13 => ErrorCode::ValueProvided,
            14 => ErrorCode::LeaseProvided,
            15 => ErrorCode::TooManyOps,
            16 => ErrorCode::NotReadOnly,
            found => {
                return Err(KvError::UnknownTag {
                    what: "error code",
                    found,
                    expected: "1..=16",
                })
            }
        })
    }

    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::Malformed,
        ErrorCode::EmptyKey,
        ErrorCode::KeyTooLarge,
        ErrorCode::ValueTooLarge,
        ErrorCode::Internal,
        ErrorCode::FutureRevision,
        ErrorCode::Compacted,
        ErrorCode::LeaseNotFound,
        ErrorCode::LeaseExists,
        ErrorCode::LeaseTtlTooLarge,
        ErrorCode::DuplicateKey,
        ErrorCode::KeyNotFound,
        ErrorCode::ValueProvided,
        ErrorCode::LeaseProvided,
        ErrorCode::TooManyOps,
        ErrorCode::NotReadOnly,
    ];

    /// The gRPC status code etcd v3.4 answers this error with (see
    /// `rpctypes/error.go`); numbers are in `grpc`.
    pub fn grpc_code(self) -> i32 {
        match self {
            ErrorCode::Malformed
            | ErrorCode::EmptyKey
            | ErrorCode::KeyTooLarge
            | ErrorCode::ValueTooLarge
            | ErrorCode::DuplicateKey
            | ErrorCode::KeyNotFound
            | ErrorCode::ValueProvided
            | ErrorCode::LeaseProvided
            | ErrorCode::TooManyOps
            | ErrorCode::NotReadOnly => grpc::INVALID_ARGUMENT,
            ErrorCode::Internal => grpc::INTERNAL,
            ErrorCode::FutureRevision | ErrorCode::Compacted | ErrorCode::LeaseTtlTooLarge => {
                grpc::OUT_OF_RANGE
            }
            ErrorCode::LeaseNotFound => grpc::NOT_FOUND,
            ErrorCode::LeaseExists => grpc::FAILED_PRECONDITION,
        }
    }

    /// etcd's own gRPC message for this error, where etcd has one. For the
    /// codes whose Keel message is more detailed than etcd's (empty or too
    /// large keys and values), this is the string etcd clients expect.
    pub fn etcd_message(self) -> Option<&'static str> {
        Some(match self {
            ErrorCode::EmptyKey => "etcdserver: key is not provided",
            ErrorCode::KeyTooLarge | ErrorCode::ValueTooLarge => "etcdserver: request is too large",
            ErrorCode::FutureRevision => "etcdserver: mvcc: required revision is a future revision",
            ErrorCode::Compacted => "etcdserver: mvcc: required revision has been compacted",
            ErrorCode::LeaseNotFound => "etcdserver: requested lease not found",
            ErrorCode::LeaseExists => "etcdserver: lease already exists",
            ErrorCode::LeaseTtlTooLarge => "etcdserver: too large lease TTL",
            ErrorCode::DuplicateKey => "etcdserver: duplicate key given in txn request",
            ErrorCode::KeyNotFound => "etcdserver: key not found",
            ErrorCode::ValueProvided => "etcdserver: value is provided",
            ErrorCode::LeaseProvided => "etcdserver: lease is provided",
            ErrorCode::TooManyOps => "etcdserver: too many operations in txn request",
            ErrorCode::Malformed | ErrorCode::Internal | ErrorCode::NotReadOnly => return None,
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
            | KvError::TxnTooDeep { .. }
            | KvError::Empty => ErrorCode::Malformed,
            KvError::TxnNotReadOnly(_) => ErrorCode::NotReadOnly,
            KvError::EmptyKey { .. } => ErrorCode::EmptyKey,
            KvError::KeyTooLarge { .. } => ErrorCode::KeyTooLarge,
            KvError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
            KvError::BadMagic { .. } | KvError::InvalidSnapshot(_) => ErrorCode::Internal,
            KvError::FutureRevision => ErrorCode::FutureRevision,
            KvError::Compacted => ErrorCode::Compacted,
            KvError::LeaseNotFound => ErrorCode::LeaseNotFound,
            KvError::LeaseExists => ErrorCode::LeaseExists,
            KvError::LeaseTtlTooLarge => ErrorCode::LeaseTtlTooLarge,
            KvError::DuplicateKey => ErrorCode::DuplicateKey,
            KvError::KeyNotFound => ErrorCode::KeyNotFound,
            KvError::ValueProvided => ErrorCode::ValueProvided,
            KvError::LeaseProvided => ErrorCode::LeaseProvided,
            KvError::TooManyOps => ErrorCode::TooManyOps,
            KvError::Remote { code, .. } => *code,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::KvService;

    /// Another service's snapshot is named by its magic as text, not as
    /// a list of decimal bytes.
    #[test]
    fn bad_magic_names_both_formats_as_text() {
        let Err(e) = KvService::decode_snapshot(b"ECH1 and an echo service's state") else {
            panic!("an echo snapshot is not a KV snapshot");
        };
        assert_eq!(
            e.to_string(),
            r#"snapshot has bad magic "ECH1", expected "KKV2""#
        );
    }
}
