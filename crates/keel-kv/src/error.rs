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
    /// A `Command::As` whose command is itself a `Command::As`.
    #[error("a command run as a user must not itself be run as a user")]
    NestedAs,
    /// etcd `auth.ErrRootUserNotExist`.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// etcd `auth.ErrRootRoleNotExist`.
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    /// etcd `auth.ErrUserAlreadyExist`.
    #[error("etcdserver: user name already exists")]
    UserAlreadyExists,
    /// etcd `auth.ErrUserEmpty`.
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// etcd `auth.ErrUserNotFound`.
    #[error("etcdserver: user name not found")]
    UserNotFound,
    /// etcd `auth.ErrRoleAlreadyExist`.
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExists,
    /// etcd `auth.ErrRoleNotFound`.
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    /// etcd `auth.ErrRoleEmpty`.
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// etcd `auth.ErrAuthFailed`.
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// etcd `auth.ErrPermissionDenied`.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// etcd `auth.ErrRoleNotGranted`.
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    /// etcd `auth.ErrPermissionNotGranted`.
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    /// etcd `auth.ErrAuthNotEnabled`.
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// etcd `auth.ErrInvalidAuthToken`.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// etcd `auth.ErrInvalidAuthMgmt`.
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
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
    /// Enabling auth without a root user.
    RootUserNotExist = 17,
    /// Enabling auth while the root user lacks the root role.
    RootRoleNotExist = 18,
    /// Adding a user that exists.
    UserAlreadyExists = 19,
    /// No user name (or none authenticated where one is needed).
    UserEmpty = 20,
    /// The user does not exist.
    UserNotFound = 21,
    /// Adding a role that exists.
    RoleAlreadyExists = 22,
    /// The role does not exist.
    RoleNotFound = 23,
    /// Adding a role with an empty name.
    RoleEmpty = 24,
    /// Wrong user name or password.
    AuthFailed = 25,
    /// The user lacks a permission the request needs.
    PermissionDenied = 26,
    /// Revoking a role the user does not have.
    RoleNotGranted = 27,
    /// Revoking a permission the role does not have.
    PermissionNotGranted = 28,
    /// An auth request that needs auth enabled.
    AuthNotEnabled = 29,
    /// A token that is not (or no longer) valid.
    InvalidAuthToken = 30,
    /// Removing what keeps auth administrable (the root user, its root
    /// role, the root role) while auth is enabled.
    InvalidAuthMgmt = 31,
}

/// gRPC status codes (numbers as in `google.rpc.Code` / `tonic::Code`).
pub mod grpc {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const INTERNAL: i32 = 13;
    pub const UNAUTHENTICATED: i32 = 16;
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
            17 => ErrorCode::RootUserNotExist,
            18 => ErrorCode::RootRoleNotExist,
            19 => ErrorCode::UserAlreadyExists,
            20 => ErrorCode::UserEmpty,
            21 => ErrorCode::UserNotFound,
            22 => ErrorCode::RoleAlreadyExists,
            23 => ErrorCode::RoleNotFound,
            24 => ErrorCode::RoleEmpty,
            25 => ErrorCode::AuthFailed,
            26 => ErrorCode::PermissionDenied,
            27 => ErrorCode::RoleNotGranted,
            28 => ErrorCode::PermissionNotGranted,
            29 => ErrorCode::AuthNotEnabled,
            30 => ErrorCode::InvalidAuthToken,
            31 => ErrorCode::InvalidAuthMgmt,
            found => {
                return Err(KvError::UnknownTag {
                    what: "error code",
                    found,
                    expected: "1..=31",
                })
            }
        })
    }

    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 31] = [
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
        ErrorCode::RootUserNotExist,
        ErrorCode::RootRoleNotExist,
        ErrorCode::UserAlreadyExists,
        ErrorCode::UserEmpty,
        ErrorCode::UserNotFound,
        ErrorCode::RoleAlreadyExists,
        ErrorCode::RoleNotFound,
        ErrorCode::RoleEmpty,
        ErrorCode::AuthFailed,
        ErrorCode::PermissionDenied,
        ErrorCode::RoleNotGranted,
        ErrorCode::PermissionNotGranted,
        ErrorCode::AuthNotEnabled,
        ErrorCode::InvalidAuthToken,
        ErrorCode::InvalidAuthMgmt,
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
            | ErrorCode::NotReadOnly
            | ErrorCode::UserEmpty
            | ErrorCode::RoleEmpty
            | ErrorCode::AuthFailed
            | ErrorCode::InvalidAuthMgmt => grpc::INVALID_ARGUMENT,
            ErrorCode::Internal => grpc::INTERNAL,
            ErrorCode::FutureRevision | ErrorCode::Compacted | ErrorCode::LeaseTtlTooLarge => {
                grpc::OUT_OF_RANGE
            }
            ErrorCode::LeaseNotFound => grpc::NOT_FOUND,
            ErrorCode::LeaseExists
            | ErrorCode::RootUserNotExist
            | ErrorCode::RootRoleNotExist
            | ErrorCode::UserAlreadyExists
            | ErrorCode::UserNotFound
            | ErrorCode::RoleAlreadyExists
            | ErrorCode::RoleNotFound
            | ErrorCode::RoleNotGranted
            | ErrorCode::PermissionNotGranted
            | ErrorCode::AuthNotEnabled => grpc::FAILED_PRECONDITION,
            ErrorCode::PermissionDenied => grpc::PERMISSION_DENIED,
            ErrorCode::InvalidAuthToken => grpc::UNAUTHENTICATED,
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
            ErrorCode::RootUserNotExist => "etcdserver: root user does not exist",
            ErrorCode::RootRoleNotExist => "etcdserver: root user does not have root role",
            ErrorCode::UserAlreadyExists => "etcdserver: user name already exists",
            ErrorCode::UserEmpty => "etcdserver: user name is empty",
            ErrorCode::UserNotFound => "etcdserver: user name not found",
            ErrorCode::RoleAlreadyExists => "etcdserver: role name already exists",
            ErrorCode::RoleNotFound => "etcdserver: role name not found",
            ErrorCode::RoleEmpty => "etcdserver: role name is empty",
            ErrorCode::AuthFailed => {
                "etcdserver: authentication failed, invalid user ID or password"
            }
            ErrorCode::PermissionDenied => "etcdserver: permission denied",
            ErrorCode::RoleNotGranted => "etcdserver: role is not granted to the user",
            ErrorCode::PermissionNotGranted => "etcdserver: permission is not granted to the role",
            ErrorCode::AuthNotEnabled => "etcdserver: authentication is not enabled",
            ErrorCode::InvalidAuthToken => "etcdserver: invalid auth token",
            ErrorCode::InvalidAuthMgmt => "etcdserver: invalid auth management",
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
            | KvError::NestedAs
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
            KvError::RootUserNotExist => ErrorCode::RootUserNotExist,
            KvError::RootRoleNotExist => ErrorCode::RootRoleNotExist,
            KvError::UserAlreadyExists => ErrorCode::UserAlreadyExists,
            KvError::UserEmpty => ErrorCode::UserEmpty,
            KvError::UserNotFound => ErrorCode::UserNotFound,
            KvError::RoleAlreadyExists => ErrorCode::RoleAlreadyExists,
            KvError::RoleNotFound => ErrorCode::RoleNotFound,
            KvError::RoleEmpty => ErrorCode::RoleEmpty,
            KvError::AuthFailed => ErrorCode::AuthFailed,
            KvError::PermissionDenied => ErrorCode::PermissionDenied,
            KvError::RoleNotGranted => ErrorCode::RoleNotGranted,
            KvError::PermissionNotGranted => ErrorCode::PermissionNotGranted,
            KvError::AuthNotEnabled => ErrorCode::AuthNotEnabled,
            KvError::InvalidAuthToken => ErrorCode::InvalidAuthToken,
            KvError::InvalidAuthMgmt => ErrorCode::InvalidAuthMgmt,
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
            r#"snapshot has bad magic "ECH1", expected "KKV3""#
        );
    }
}
