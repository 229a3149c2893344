//! The KV service's native wire protocol: commands (writes through the log),
//! queries (reads), responses, and their binary encoding and validation.
//! The etcd-style request and response bodies live in `etcd`.
//!
//! # Encoding
//!
//! Every message is one tag byte followed by its fields in order, all
//! little-endian: `u64`/`i64` are 8 bytes, `u32` 4, `bool` one byte (0 or
//! 1), a byte string is a `u32` length then the bytes, an `Option<T>` is a
//! bool then `T` if present, a list is a `u32` count then the elements. No
//! trailing bytes. Bodies named after etcd messages are encoded as in the
//! `etcd` module docs.
//!
//! ```text
//! Command
//!   1 Put              key, value
//!   2 Delete           key
//!   3 DeleteRange      start, end            (end as in Range)
//!   4 Cas              key, compare, value
//!  16 PutReq           PutRequest
//!  17 DeleteRangeReq   DeleteRangeRequest
//!  18 Txn              TxnRequest
//!  19 Compact          revision:i64
//!  20 LeaseGrant       id:i64 (0 = choose), ttl:i64 (seconds)
//!  21 LeaseRevoke      id:i64
//!  22 LeaseKeepAlive   id:i64
//!  23 Auth             AuthCommand
//!  24 As               user:Option<string>, Command (not itself an As)
//! AuthCommand
//!   1 Enable               secret
//!   2 Disable
//!   3 UserAdd              name, password:Option<bytes>
//!   4 UserDelete           name
//!   5 UserChangePassword   name, password
//!   6 UserGrantRole        user, role
//!   7 UserRevokeRole       name, role
//!   8 RoleAdd              name
//!   9 RoleDelete           name
//!  10 RoleGrantPermission  role, kind:u8 (READ 0, WRITE 1, READWRITE 2), key, range_end
//!  11 RoleRevokePermission role, key, range_end
//! Compare
//!   1 ValueEquals        value
//!   2 VersionEquals      u64             (0 = key absent)
//!   3 ModRevisionEquals  u64             (0 = key absent)
//! Query
//!   1 Get              key
//!   2 Range            start, end, limit:u64 (limit 0 = unlimited)
//!   3 Status
//!  16 RangeReq         RangeRequest
//!  17 Txn              TxnRequest        (reads only)
//!  18 Events           start, end, from_revision:u64, limit:u64
//!  19 LeaseTimeToLive  id:i64, keys:bool, now:u64 (log time, ns)
//!  20 Leases
//!  21 HashKv           revision:i64      (0 = current, < 0 = none)
//! Response
//!   1 Put              revision, prev:Option<KeyValue>
//!   2 Delete           revision, deleted:u64, prev:Option<KeyValue>
//!   3 DeleteRange      revision, deleted:u64, prev:List<KeyValue>
//!   4 Cas              succeeded:bool, revision, current:Option<KeyValue>
//!   5 Get              revision, kv:Option<KeyValue>
//!   6 Range            revision, kvs:List<KeyValue>, more:bool, count:u64
//!   7 Status           revision, keys:u64, applied:u64, compact_revision:i64,
//!                      db_size:u64, leases:u64
//!  16 RangeResp        RangeResponse
//!  17 PutResp          PutResponse
//!  18 DeleteRangeResp  DeleteRangeResponse
//!  19 Txn              TxnResponse
//!  20 Compact          revision
//!  21 LeaseGrant       revision, id:i64, ttl:i64
//!  22 LeaseRevoke      revision
//!  23 LeaseKeepAlive   revision, id:i64, ttl:i64
//!  24 LeaseTimeToLive  revision, id:i64, ttl:i64, granted_ttl:i64, keys:List<bytes>
//!  25 Leases           revision, ids:List<i64>
//!  26 Events           revision, compact_revision:i64, events:List<WatchEvent>, more:Option<u64>
//!  27 HashKv           revision, compact_revision:i64, hash:u32
//!  28 Auth             revision
//!   255 Error          code:u8, message (UTF-8)
//! KeyValue             key, value, create_revision, mod_revision, version, lease:i64
//! ```
//!
//! Names (`string`) are byte strings holding UTF-8.
//!
//! Range bounds follow etcd: an empty `end` means the single key `start`;
//! `end == [0]` means every key `>= start`; otherwise `[start, end)`.
//! `prefix_end` computes the `end` that selects every key with a prefix.

use crate::auth::{PermKind, Permission};
use crate::codec::{Reader, Writer};
use crate::error::{ErrorCode, KvError};
use crate::etcd::{
    decode_list, decode_opt, encode_list, encode_opt, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse, WatchEvent,
    MIN_EVENT_LEN,
};
use bytes::Bytes;

/// Largest key (and range bound) accepted, in bytes: etcd limits keys only
/// by its request limit (`--max-request-bytes`, 1.5 MiB by default), so
/// clients may rely on keys far longer than a few KiB.
pub const MAX_KEY_LEN: usize = 1536 * 1024;
/// Largest value accepted, in bytes (etcd's default request limit).
pub const MAX_VALUE_LEN: usize = 1536 * 1024;

/// A key with its value and MVCC metadata, as etcd reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
    /// Store revision of the put that created the key (since its last delete).
    pub create_revision: u64,
    /// Store revision of the last put to the key.
    pub mod_revision: u64,
    /// Puts since creation: 1 on create.
    pub version: u64,
    /// The lease the key is attached to; 0 = none.
    pub lease: i64,
}

/// Condition of a compare-and-swap, checked against the key's current state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Compare {
    /// The key exists and its value equals this.
    ValueEquals(Bytes),
    /// The key's version equals this; 0 means the key is absent.
    VersionEquals(u64),
    /// The key's mod revision equals this; 0 means the key is absent.
    ModRevisionEquals(u64),
}

impl Compare {
    /// Does the key's current state (None = absent) satisfy the condition?
    pub fn matches(&self, current: Option<&KeyValue>) -> bool {
        match (self, current) {
            (Compare::ValueEquals(v), Some(kv)) => kv.value == *v,
            (Compare::ValueEquals(_), None) => false,
            (Compare::VersionEquals(v), kv) => kv.map_or(0, |kv| kv.version) == *v,
            (Compare::ModRevisionEquals(r), kv) => kv.map_or(0, |kv| kv.mod_revision) == *r,
        }
    }
}

/// A write, applied through the log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Put {
        key: Bytes,
        value: Bytes,
    },
    Delete {
        key: Bytes,
    },
    /// Delete every key in a range (bounds as in `Query::Range`).
    DeleteRange {
        start: Bytes,
        end: Bytes,
    },
    /// Put `value` at `key` if `expected` holds, atomically.
    Cas {
        key: Bytes,
        expected: Compare,
        value: Bytes,
    },
    /// etcd Put (lease, prev_kv, ignore_value, ignore_lease).
    PutReq(PutRequest),
    /// etcd DeleteRange (prev_kv).
    DeleteRangeReq(DeleteRangeRequest),
    /// etcd Txn: compares, then the success or failure operations, as one
    /// write at one revision.
    Txn(TxnRequest),
    /// Drop history before `revision` (etcd Compact).
    Compact {
        revision: i64,
    },
    /// Grant a lease of `ttl` seconds (raised to the service's minimum);
    /// `id` 0 lets the service choose one.
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    /// Revoke a lease, deleting every key attached to it.
    LeaseRevoke {
        id: i64,
    },
    /// Renew a lease: it now expires `ttl` after this entry's log time.
    LeaseKeepAlive {
        id: i64,
    },
    /// Change the authentication state (see `auth`).
    Auth(AuthCommand),
    /// Run `command` as `user`, as the etcd API authenticated it (None =
    /// the request carried no token): while auth is enabled the command
    /// runs only if `AuthStore::check_command` permits it. `command` must
    /// not itself be an `As`.
    As {
        user: Option<String>,
        /// The user's generation the caller's token names: a token issued
        /// under an older password (or to a deleted user of that name) is
        /// refused when applied, even if the member that checked it had
        /// not yet applied the change. 0 = not checked (callers other than
        /// the etcd API).
        generation: u64,
        command: Box<Command>,
    },
}

/// A change to the authentication state (etcd's auth requests), with the
/// errors each refuses with. Every one needs the root role when run as a
/// user while auth is enabled.
/// (`Debug` leaves out the secret and password hashes.)
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum AuthCommand {
    /// Turn auth on. `secret` (32 random bytes chosen by the member that
    /// proposed it) becomes the token secret. No user "root" ->
    /// RootUserNotExist; the root user lacks role "root" ->
    /// RootRoleNotExist. Already enabled: Ok, nothing changes.
    Enable { secret: Bytes },
    /// Turn auth off. Already disabled: Ok, nothing changes.
    Disable,
    /// Empty name -> UserEmpty; exists -> UserAlreadyExists. `password`
    /// None: the user cannot authenticate (etcd's no_password).
    UserAdd {
        name: String,
        password: Option<Bytes>,
    },
    /// Unknown -> UserNotFound; "root" while enabled -> InvalidAuthMgmt.
    UserDelete { name: String },
    /// Unknown -> UserNotFound.
    UserChangePassword { name: String, password: Bytes },
    /// Unknown user -> UserNotFound; a role other than "root" that does
    /// not exist -> RoleNotFound. Already granted: Ok, nothing changes.
    UserGrantRole { user: String, role: String },
    /// Unknown user -> UserNotFound; not granted -> RoleNotGranted; root's
    /// root role while enabled -> InvalidAuthMgmt.
    UserRevokeRole { name: String, role: String },
    /// Empty -> RoleEmpty; exists -> RoleAlreadyExists.
    RoleAdd { name: String },
    /// Unknown -> RoleNotFound; "root" while enabled -> InvalidAuthMgmt.
    /// Revokes the role from every user.
    RoleDelete { name: String },
    /// Unknown role -> RoleNotFound. A permission on the same (key,
    /// range_end) gets the new kind.
    RoleGrantPermission { role: String, perm: Permission },
    /// Unknown role -> RoleNotFound; no permission on exactly (key,
    /// range_end) -> PermissionNotGranted.
    RoleRevokePermission {
        role: String,
        key: Bytes,
        range_end: Bytes,
    },
}

/// A read-only request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Query {
    Get {
        key: Bytes,
    },
    /// Keys in `[start, end)` in key order (see the module docs for the
    /// meaning of an empty `end` and of `end == [0]`), at most `limit` of
    /// them (0 = no limit).
    Range {
        start: Bytes,
        end: Bytes,
        limit: u64,
    },
    /// Store revision, key count, applied commands, compaction point, size.
    Status,
    /// etcd Range with every option (past revisions, sort, filters...).
    RangeReq(RangeRequest),
    /// An etcd Txn whose branches only read (at any depth).
    Txn(TxnRequest),
    /// The history of changes to keys in `[start, end)` from revision
    /// `from_revision` on (0 counts as 1), in revision order: at least
    /// `limit` events when there are that many (0 = no limit), but never
    /// part of a revision, and for a range only as far as one read of the
    /// history goes (`store::EVENTS_SCAN_BUDGET` changes looked at): the
    /// response's `more` says where to go on from. For watches catching up
    /// from a past revision.
    Events {
        start: Bytes,
        end: Bytes,
        from_revision: u64,
        limit: u64,
    },
    /// A lease's remaining TTL at log time `now` (nanoseconds; a query has
    /// no log time of its own, so the caller passes the leader's clock,
    /// which is what stamps log time: ask the leader, as etcd does), its
    /// granted TTL, and optionally its keys.
    LeaseTimeToLive {
        id: i64,
        keys: bool,
        now: u64,
    },
    /// The ids of all leases.
    Leases,
    /// A hash of the KV history up to `revision` (0: the current one;
    /// negative: no revision, as etcd 3.4).
    HashKv {
        revision: i64,
    },
    /// Answer `query` for `user` (as `Command::As`): while auth is enabled
    /// it is answered only if `AuthStore::check_query` permits it, checked
    /// against the state the answer comes from. `query` must not itself be
    /// an `As`.
    As {
        user: Option<String>,
        /// As in `Command::As` (0 = not checked).
        generation: u64,
        query: Box<Query>,
    },
}

impl Query {
    /// A range over every key starting with `prefix` (every key if empty).
    pub fn prefix(prefix: impl Into<Bytes>, limit: u64) -> Query {
        let start: Bytes = prefix.into();
        let end = prefix_end(&start);
        Query::Range { start, end, limit }
    }
}

/// The service's answer to a command or a query.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Response {
    Put {
        revision: u64,
        prev: Option<KeyValue>,
    },
    Delete {
        revision: u64,
        deleted: u64,
        prev: Option<KeyValue>,
    },
    DeleteRange {
        revision: u64,
        deleted: u64,
        prev: Vec<KeyValue>,
    },
    /// `current`: on success the key as written, on failure the key as it
    /// is (None if absent). `revision` is the store revision afterwards.
    Cas {
        succeeded: bool,
        revision: u64,
        current: Option<KeyValue>,
    },
    Get {
        revision: u64,
        kv: Option<KeyValue>,
    },
    /// `count`: keys in the range regardless of `limit`; `more`: some were
    /// left out because of the limit.
    Range {
        revision: u64,
        kvs: Vec<KeyValue>,
        more: bool,
        count: u64,
    },
    /// `compact_revision`: -1 before the first compaction (as etcd);
    /// `db_size`: an estimate of the state's size in bytes.
    Status {
        revision: u64,
        keys: u64,
        applied: u64,
        compact_revision: i64,
        db_size: u64,
        leases: u64,
    },
    RangeResp(RangeResponse),
    PutResp(PutResponse),
    DeleteRangeResp(DeleteRangeResponse),
    Txn(TxnResponse),
    /// `revision`: the store revision (compaction does not change it).
    Compact {
        revision: u64,
    },
    /// `ttl`: the granted TTL in seconds, after raising it to the minimum.
    LeaseGrant {
        revision: u64,
        id: i64,
        ttl: i64,
    },
    LeaseRevoke {
        revision: u64,
    },
    LeaseKeepAlive {
        revision: u64,
        id: i64,
        ttl: i64,
    },
    /// `ttl`: whole seconds left (truncated, as etcd); `keys` in key order
    /// (empty unless asked for).
    LeaseTimeToLive {
        revision: u64,
        id: i64,
        ttl: i64,
        granted_ttl: i64,
        keys: Vec<Bytes>,
    },
    Leases {
        revision: u64,
        ids: Vec<i64>,
    },
    /// `more`: `Some(rev)` if the read stopped before the current
    /// revision (at the request's limit, or at the store's bound on the
    /// history one read examines): every change in the range below `rev`
    /// has been returned; ask again from `rev`. `None`: all up to
    /// `revision` were.
    Events {
        revision: u64,
        compact_revision: i64,
        events: Vec<WatchEvent>,
        more: Option<u64>,
    },
    /// `revision`: the current store revision (the header revision).
    HashKv {
        revision: u64,
        compact_revision: i64,
        hash: u32,
    },
    /// An auth command succeeded; `revision`: the store revision (auth
    /// commands do not change it), for etcd's response header.
    Auth {
        revision: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// The `end` of the range holding every key that starts with `prefix`: the
/// prefix with trailing 0xff bytes dropped and its last byte incremented.
/// When there is no such key (empty prefix or all 0xff) it returns `[0]`,
/// which as a range end means "to the end of the key space".
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            Bytes::from(end)
        }
        None => Bytes::from_static(&[0]),
    }
}

/// Checks a key that must name one key.
pub fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::EmptyKey { max: MAX_KEY_LEN });
    }
    check_bound(key)
}

pub(crate) fn check_bound(key: &[u8]) -> Result<(), KvError> {
    if key.len() > MAX_KEY_LEN {
        return Err(KvError::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

/// Checks a value.
pub fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(KvError::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// Checks range bounds: `start` may be empty only if `end` is not.
pub(crate) fn check_range(start: &[u8], end: &[u8]) -> Result<(), KvError> {
    if end.is_empty() {
        check_key(start)
    } else {
        check_bound(start)?;
        check_bound(end)
    }
}

impl Compare {
    fn encode_into(&self, w: &mut Writer) {
        match self {
            Compare::ValueEquals(v) => w.u8(1).bytes(v),
            Compare::VersionEquals(v) => w.u8(2).u64(*v),
            Compare::ModRevisionEquals(r) => w.u8(3).u64(*r),
        };
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Compare, KvError> {
        Ok(match r.u8()? {
            1 => Compare::ValueEquals(r.bytes()?),
            2 => Compare::VersionEquals(r.u64()?),
            3 => Compare::ModRevisionEquals(r.u64()?),
            found => {
                return Err(KvError::UnknownTag {
                    what: "compare",
                    found,
                    expected: "1..=3",
                })
            }
        })
    }
}

impl Command {
    pub fn encode(&self) -> Bytes {
        match self {
            Command::Put { key, value } => {
                let mut w = Writer::new(1);
                w.bytes(key).bytes(value);
                w.finish()
            }
            Command::Delete { key } => {
                let mut w = Writer::new(2);
                w.bytes(key);
                w.finish()
            }
            Command::DeleteRange { start, end } => {
                let mut w = Writer::new(3);
                w.bytes(start).bytes(end);
                w.finish()
            }
            Command::Cas {
                key,
                expected,
                value,
            } => {
                let mut w = Writer::new(4);
                w.bytes(key);
                expected.encode_into(&mut w);
                w.bytes(value);
                w.finish()
            }
            Command::PutReq(p) => {
                let mut w = Writer::new(16);
                p.encode_into(&mut w);
                w.finish()
            }
            Command::DeleteRangeReq(d) => {
                let mut w = Writer::new(17);
                d.encode_into(&mut w);
                w.finish()
            }
            Command::Txn(t) => {
                let mut w = Writer::new(18);
                t.encode_into(&mut w);
                w.finish()
            }
            Command::Compact { revision } => {
                let mut w = Writer::new(19);
                w.i64(*revision);
                w.finish()
            }
            Command::LeaseGrant { id, ttl } => {
                let mut w = Writer::new(20);
                w.i64(*id).i64(*ttl);
                w.finish()
            }
            Command::LeaseRevoke { id } => {
                let mut w = Writer::new(21);
                w.i64(*id);
                w.finish()
            }
            Command::LeaseKeepAlive { id } => {
                let mut w = Writer::new(22);
                w.i64(*id);
                w.finish()
            }
            Command::Auth(a) => {
                let mut w = Writer::new(23);
                a.encode_into(&mut w);
                w.finish()
            }
            Command::As {
                user,
                generation,
                command,
            } => {
                let mut w = Writer::new(24);
                encode_caller(&mut w, user.as_deref(), *generation);
                w.raw_bytes(&command.encode());
                w.finish()
            }
        }
    }

    /// Decodes a command; does not check limits (see `validate`).
    pub fn decode(data: &[u8]) -> Result<Command, KvError> {
        let mut r = Reader::new(data, "command");
        let tag = r.u8().map_err(|_| KvError::Empty)?;
        let cmd = match tag {
            24 => {
                let (user, generation, tag) = decode_caller(&mut r, 24)?;
                Command::As {
                    user,
                    generation,
                    command: Box::new(Command::decode_body(tag, &mut r)?),
                }
            }
            tag => Command::decode_body(tag, &mut r)?,
        };
        r.finish()?;
        Ok(cmd)
    }

    /// Decodes the fields of a command other than `As` after its tag.
    fn decode_body(tag: u8, r: &mut Reader<'_>) -> Result<Command, KvError> {
        Ok(match tag {
            1 => Command::Put {
                key: r.bytes()?,
                value: r.bytes()?,
            },
            2 => Command::Delete { key: r.bytes()? },
            3 => Command::DeleteRange {
                start: r.bytes()?,
                end: r.bytes()?,
            },
            4 => Command::Cas {
                key: r.bytes()?,
                expected: Compare::decode_from(r)?,
                value: r.bytes()?,
            },
            16 => Command::PutReq(PutRequest::decode_from(r)?),
            17 => Command::DeleteRangeReq(DeleteRangeRequest::decode_from(r)?),
            18 => Command::Txn(TxnRequest::decode_from(r)?),
            19 => Command::Compact { revision: r.i64()? },
            20 => Command::LeaseGrant {
                id: r.i64()?,
                ttl: r.i64()?,
            },
            21 => Command::LeaseRevoke { id: r.i64()? },
            22 => Command::LeaseKeepAlive { id: r.i64()? },
            23 => Command::Auth(AuthCommand::decode_from(r)?),
            found => {
                return Err(KvError::UnknownTag {
                    what: "command",
                    found,
                    expected: "1..=4 or 16..=24",
                })
            }
        })
    }

    /// Checks key and value limits and etcd's request rules.
    pub fn validate(&self) -> Result<(), KvError> {
        match self {
            Command::Put { key, value } => {
                check_key(key)?;
                check_value(value)
            }
            Command::Delete { key } => check_key(key),
            Command::DeleteRange { start, end } => check_range(start, end),
            Command::Cas {
                key,
                expected,
                value,
            } => {
                check_key(key)?;
                if let Compare::ValueEquals(v) = expected {
                    check_value(v)?;
                }
                check_value(value)
            }
            Command::PutReq(p) => p.validate(),
            Command::DeleteRangeReq(d) => d.validate(),
            Command::Txn(t) => t.validate(),
            Command::Compact { .. }
            | Command::LeaseGrant { .. }
            | Command::LeaseRevoke { .. }
            | Command::LeaseKeepAlive { .. } => Ok(()),
            Command::Auth(a) => a.validate(),
            Command::As { user, command, .. } => {
                if let Some(u) = user {
                    check_bound(u.as_bytes())?;
                }
                match **command {
                    Command::As { .. } => Err(KvError::NestedAs),
                    ref c => c.validate(),
                }
            }
        }
    }
}

/// Shown as `<hidden>` by `Debug`: a token secret or a password hash.
const HIDDEN: &str = "<hidden>";

impl std::fmt::Debug for AuthCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthCommand::Enable { .. } => {
                f.debug_struct("Enable").field("secret", &HIDDEN).finish()
            }
            AuthCommand::Disable => f.write_str("Disable"),
            AuthCommand::UserAdd { name, password } => f
                .debug_struct("UserAdd")
                .field("name", name)
                .field("password", &password.as_ref().map(|_| HIDDEN))
                .finish(),
            AuthCommand::UserDelete { name } => {
                f.debug_struct("UserDelete").field("name", name).finish()
            }
            AuthCommand::UserChangePassword { name, .. } => f
                .debug_struct("UserChangePassword")
                .field("name", name)
                .field("password", &HIDDEN)
                .finish(),
            AuthCommand::UserGrantRole { user, role } => f
                .debug_struct("UserGrantRole")
                .field("user", user)
                .field("role", role)
                .finish(),
            AuthCommand::UserRevokeRole { name, role } => f
                .debug_struct("UserRevokeRole")
                .field("name", name)
                .field("role", role)
                .finish(),
            AuthCommand::RoleAdd { name } => f.debug_struct("RoleAdd").field("name", name).finish(),
            AuthCommand::RoleDelete { name } => {
                f.debug_struct("RoleDelete").field("name", name).finish()
            }
            AuthCommand::RoleGrantPermission { role, perm } => f
                .debug_struct("RoleGrantPermission")
                .field("role", role)
                .field("perm", perm)
                .finish(),
            AuthCommand::RoleRevokePermission {
                role,
                key,
                range_end,
            } => f
                .debug_struct("RoleRevokePermission")
                .field("role", role)
                .field("key", key)
                .field("range_end", range_end)
                .finish(),
        }
    }
}

impl AuthCommand {
    fn encode_into(&self, w: &mut Writer) {
        match self {
            AuthCommand::Enable { secret } => w.u8(1).bytes(secret),
            AuthCommand::Disable => w.u8(2),
            AuthCommand::UserAdd { name, password } => {
                w.u8(3).bytes(name.as_bytes()).bool(password.is_some());
                if let Some(p) = password {
                    w.bytes(p);
                }
                w
            }
            AuthCommand::UserDelete { name } => w.u8(4).bytes(name.as_bytes()),
            AuthCommand::UserChangePassword { name, password } => {
                w.u8(5).bytes(name.as_bytes()).bytes(password)
            }
            AuthCommand::UserGrantRole { user, role } => {
                w.u8(6).bytes(user.as_bytes()).bytes(role.as_bytes())
            }
            AuthCommand::UserRevokeRole { name, role } => {
                w.u8(7).bytes(name.as_bytes()).bytes(role.as_bytes())
            }
            AuthCommand::RoleAdd { name } => w.u8(8).bytes(name.as_bytes()),
            AuthCommand::RoleDelete { name } => w.u8(9).bytes(name.as_bytes()),
            AuthCommand::RoleGrantPermission { role, perm } => w
                .u8(10)
                .bytes(role.as_bytes())
                .u8(perm.kind as u8)
                .bytes(&perm.key)
                .bytes(&perm.range_end),
            AuthCommand::RoleRevokePermission {
                role,
                key,
                range_end,
            } => w.u8(11).bytes(role.as_bytes()).bytes(key).bytes(range_end),
        };
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<AuthCommand, KvError> {
        const USER: &str = "user name";
        const ROLE: &str = "role name";
        Ok(match r.u8()? {
            1 => AuthCommand::Enable { secret: r.bytes()? },
            2 => AuthCommand::Disable,
            3 => AuthCommand::UserAdd {
                name: r.string(USER)?,
                password: if r.bool()? { Some(r.bytes()?) } else { None },
            },
            4 => AuthCommand::UserDelete {
                name: r.string(USER)?,
            },
            5 => AuthCommand::UserChangePassword {
                name: r.string(USER)?,
                password: r.bytes()?,
            },
            6 => AuthCommand::UserGrantRole {
                user: r.string(USER)?,
                role: r.string(ROLE)?,
            },
            7 => AuthCommand::UserRevokeRole {
                name: r.string(USER)?,
                role: r.string(ROLE)?,
            },
            8 => AuthCommand::RoleAdd {
                name: r.string(ROLE)?,
            },
            9 => AuthCommand::RoleDelete {
                name: r.string(ROLE)?,
            },
            10 => AuthCommand::RoleGrantPermission {
                role: r.string(ROLE)?,
                perm: Permission {
                    kind: PermKind::decode_from(r)?,
                    key: r.bytes()?,
                    range_end: r.bytes()?,
                },
            },
            11 => AuthCommand::RoleRevokePermission {
                role: r.string(ROLE)?,
                key: r.bytes()?,
                range_end: r.bytes()?,
            },
            found => {
                return Err(KvError::UnknownTag {
                    what: "auth command",
                    found,
                    expected: "1..=11",
                })
            }
        })
    }

    /// Checks sizes: names and permission bounds within the key limit
    /// (a permission's key must not be empty), passwords and the secret
    /// within the value limit. Empty user and role names are refused when
    /// applied, with etcd's errors.
    pub fn validate(&self) -> Result<(), KvError> {
        let name = |n: &String| check_bound(n.as_bytes());
        match self {
            AuthCommand::Enable { secret } => check_value(secret),
            AuthCommand::Disable => Ok(()),
            AuthCommand::UserAdd { name: n, password } => {
                name(n)?;
                password.as_ref().map_or(Ok(()), |p| check_value(p))
            }
            AuthCommand::UserDelete { name: n }
            | AuthCommand::RoleAdd { name: n }
            | AuthCommand::RoleDelete { name: n } => name(n),
            AuthCommand::UserChangePassword { name: n, password } => {
                name(n)?;
                check_value(password)
            }
            AuthCommand::UserGrantRole { user: n, role }
            | AuthCommand::UserRevokeRole { name: n, role } => {
                name(n)?;
                name(role)
            }
            AuthCommand::RoleGrantPermission { role, perm } => {
                name(role)?;
                perm.validate()
            }
            AuthCommand::RoleRevokePermission {
                role,
                key,
                range_end,
            } => {
                name(role)?;
                check_key(key)?;
                check_bound(range_end)
            }
        }
    }
}

impl Query {
    pub fn encode(&self) -> Bytes {
        match self {
            Query::Get { key } => {
                let mut w = Writer::new(1);
                w.bytes(key);
                w.finish()
            }
            Query::Range { start, end, limit } => {
                let mut w = Writer::new(2);
                w.bytes(start).bytes(end).u64(*limit);
                w.finish()
            }
            Query::Status => Writer::new(3).finish(),
            Query::RangeReq(r) => {
                let mut w = Writer::new(16);
                r.encode_into(&mut w);
                w.finish()
            }
            Query::Txn(t) => {
                let mut w = Writer::new(17);
                t.encode_into(&mut w);
                w.finish()
            }
            Query::Events {
                start,
                end,
                from_revision,
                limit,
            } => {
                let mut w = Writer::new(18);
                w.bytes(start).bytes(end).u64(*from_revision).u64(*limit);
                w.finish()
            }
            Query::LeaseTimeToLive { id, keys, now } => {
                let mut w = Writer::new(19);
                w.i64(*id).bool(*keys).u64(*now);
                w.finish()
            }
            Query::Leases => Writer::new(20).finish(),
            Query::HashKv { revision } => {
                let mut w = Writer::new(21);
                w.i64(*revision);
                w.finish()
            }
            Query::As {
                user,
                generation,
                query,
            } => {
                let mut w = Writer::new(22);
                encode_caller(&mut w, user.as_deref(), *generation);
                w.raw_bytes(&query.encode());
                w.finish()
            }
        }
    }

    /// Decodes a query; does not check limits (see `validate`).
    pub fn decode(data: &[u8]) -> Result<Query, KvError> {
        let mut r = Reader::new(data, "query");
        let q = match r.u8().map_err(|_| KvError::Empty)? {
            22 => {
                let (user, generation, tag) = decode_caller(&mut r, 22)?;
                Query::As {
                    user,
                    generation,
                    query: Box::new(Query::decode_body(tag, &mut r)?),
                }
            }
            tag => Query::decode_body(tag, &mut r)?,
        };
        r.finish()?;
        Ok(q)
    }

    /// Decodes the fields of a query other than `As` after its tag.
    fn decode_body(tag: u8, r: &mut Reader<'_>) -> Result<Query, KvError> {
        Ok(match tag {
            1 => Query::Get { key: r.bytes()? },
            2 => Query::Range {
                start: r.bytes()?,
                end: r.bytes()?,
                limit: r.u64()?,
            },
            3 => Query::Status,
            16 => Query::RangeReq(RangeRequest::decode_from(r)?),
            17 => Query::Txn(TxnRequest::decode_from(r)?),
            18 => Query::Events {
                start: r.bytes()?,
                end: r.bytes()?,
                from_revision: r.u64()?,
                limit: r.u64()?,
            },
            19 => Query::LeaseTimeToLive {
                id: r.i64()?,
                keys: r.bool()?,
                now: r.u64()?,
            },
            20 => Query::Leases,
            21 => Query::HashKv { revision: r.i64()? },
            found => {
                return Err(KvError::UnknownTag {
                    what: "query",
                    found,
                    expected: "1..=3 or 16..=22",
                })
            }
        })
    }

    /// Checks key limits (and that a txn query only reads).
    pub fn validate(&self) -> Result<(), KvError> {
        match self {
            Query::Get { key } => check_key(key),
            Query::Range { start, end, .. } => check_range(start, end),
            Query::RangeReq(r) => r.validate(),
            Query::Txn(t) => {
                t.validate()?;
                t.check_reads_only()
            }
            Query::Events { start, end, .. } => check_range(start, end),
            Query::Status
            | Query::LeaseTimeToLive { .. }
            | Query::Leases
            | Query::HashKv { .. } => Ok(()),
            Query::As { user, query, .. } => {
                if let Some(u) = user {
                    check_bound(u.as_bytes())?;
                }
                match **query {
                    Query::As { .. } => Err(KvError::NestedAs),
                    ref q => q.validate(),
                }
            }
        }
    }
}

/// Smallest encoding of a `KeyValue`: two empty strings, three u64s, an i64.
pub(crate) const MIN_KV_LEN: usize = 4 + 4 + 4 * 8;

impl KeyValue {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .bytes(&self.value)
            .u64(self.create_revision)
            .u64(self.mod_revision)
            .u64(self.version)
            .i64(self.lease);
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<KeyValue, KvError> {
        Ok(KeyValue {
            key: r.bytes()?,
            value: r.bytes()?,
            create_revision: r.u64()?,
            mod_revision: r.u64()?,
            version: r.u64()?,
            lease: r.i64()?,
        })
    }
}

impl Response {
    /// The error reply for `err`.
    pub fn error(err: &KvError) -> Response {
        Response::Error {
            code: err.code(),
            message: err.to_string(),
        }
    }

    /// The error carried by an error reply, as a `KvError::Remote`.
    pub fn into_result(self) -> Result<Response, KvError> {
        match self {
            Response::Error { code, message } => Err(KvError::Remote { code, message }),
            r => Ok(r),
        }
    }

    pub fn encode(&self) -> Bytes {
        match self {
            Response::Put { revision, prev } => {
                let mut w = Writer::new(1);
                w.u64(*revision);
                encode_opt(&mut w, prev);
                w.finish()
            }
            Response::Delete {
                revision,
                deleted,
                prev,
            } => {
                let mut w = Writer::new(2);
                w.u64(*revision).u64(*deleted);
                encode_opt(&mut w, prev);
                w.finish()
            }
            Response::DeleteRange {
                revision,
                deleted,
                prev,
            } => {
                let mut w = Writer::new(3);
                w.u64(*revision).u64(*deleted);
                encode_list(&mut w, prev);
                w.finish()
            }
            Response::Cas {
                succeeded,
                revision,
                current,
            } => {
                let mut w = Writer::new(4);
                w.bool(*succeeded).u64(*revision);
                encode_opt(&mut w, current);
                w.finish()
            }
            Response::Get { revision, kv } => {
                let mut w = Writer::new(5);
                w.u64(*revision);
                encode_opt(&mut w, kv);
                w.finish()
            }
            Response::Range {
                revision,
                kvs,
                more,
                count,
            } => {
                let mut w = Writer::new(6);
                w.u64(*revision);
                encode_list(&mut w, kvs);
                w.bool(*more).u64(*count);
                w.finish()
            }
            Response::Status {
                revision,
                keys,
                applied,
                compact_revision,
                db_size,
                leases,
            } => {
                let mut w = Writer::new(7);
                w.u64(*revision)
                    .u64(*keys)
                    .u64(*applied)
                    .i64(*compact_revision)
                    .u64(*db_size)
                    .u64(*leases);
                w.finish()
            }
            Response::RangeResp(r) => {
                let mut w = Writer::new(16);
                r.encode_into(&mut w);
                w.finish()
            }
            Response::PutResp(p) => {
                let mut w = Writer::new(17);
                p.encode_into(&mut w);
                w.finish()
            }
            Response::DeleteRangeResp(d) => {
                let mut w = Writer::new(18);
                d.encode_into(&mut w);
                w.finish()
            }
            Response::Txn(t) => {
                let mut w = Writer::new(19);
                t.encode_into(&mut w);
                w.finish()
            }
            Response::Compact { revision } => {
                let mut w = Writer::new(20);
                w.u64(*revision);
                w.finish()
            }
            Response::LeaseGrant { revision, id, ttl } => {
                let mut w = Writer::new(21);
                w.u64(*revision).i64(*id).i64(*ttl);
                w.finish()
            }
            Response::LeaseRevoke { revision } => {
                let mut w = Writer::new(22);
                w.u64(*revision);
                w.finish()
            }
            Response::LeaseKeepAlive { revision, id, ttl } => {
                let mut w = Writer::new(23);
                w.u64(*revision).i64(*id).i64(*ttl);
                w.finish()
            }
            Response::LeaseTimeToLive {
                revision,
                id,
                ttl,
                granted_ttl,
                keys,
            } => {
                let mut w = Writer::new(24);
                w.u64(*revision).i64(*id).i64(*ttl).i64(*granted_ttl);
                w.count(keys.len());
                for k in keys {
                    w.bytes(k);
                }
                w.finish()
            }
            Response::Leases { revision, ids } => {
                let mut w = Writer::new(25);
                w.u64(*revision).count(ids.len());
                for id in ids {
                    w.i64(*id);
                }
                w.finish()
            }
            Response::Events {
                revision,
                compact_revision,
                events,
                more,
            } => {
                let mut w = Writer::new(26);
                w.u64(*revision).i64(*compact_revision).count(events.len());
                for e in events {
                    e.encode_into(&mut w);
                }
                w.bool(more.is_some());
                if let Some(rev) = more {
                    w.u64(*rev);
                }
                w.finish()
            }
            Response::HashKv {
                revision,
                compact_revision,
                hash,
            } => {
                let mut w = Writer::new(27);
                w.u64(*revision).i64(*compact_revision).u32(*hash);
                w.finish()
            }
            Response::Auth { revision } => {
                let mut w = Writer::new(28);
                w.u64(*revision);
                w.finish()
            }
            Response::Error { code, message } => {
                let mut w = Writer::new(255);
                w.u8(*code as u8).bytes(message.as_bytes());
                w.finish()
            }
        }
    }

    pub fn decode(data: &[u8]) -> Result<Response, KvError> {
        let mut r = Reader::new(data, "response");
        let resp = match r.u8().map_err(|_| KvError::Empty)? {
            1 => Response::Put {
                revision: r.u64()?,
                prev: decode_opt(&mut r)?,
            },
            2 => Response::Delete {
                revision: r.u64()?,
                deleted: r.u64()?,
                prev: decode_opt(&mut r)?,
            },
            3 => Response::DeleteRange {
                revision: r.u64()?,
                deleted: r.u64()?,
                prev: decode_list(&mut r)?,
            },
            4 => Response::Cas {
                succeeded: r.bool()?,
                revision: r.u64()?,
                current: decode_opt(&mut r)?,
            },
            5 => Response::Get {
                revision: r.u64()?,
                kv: decode_opt(&mut r)?,
            },
            6 => Response::Range {
                revision: r.u64()?,
                kvs: decode_list(&mut r)?,
                more: r.bool()?,
                count: r.u64()?,
            },
            7 => Response::Status {
                revision: r.u64()?,
                keys: r.u64()?,
                applied: r.u64()?,
                compact_revision: r.i64()?,
                db_size: r.u64()?,
                leases: r.u64()?,
            },
            16 => Response::RangeResp(RangeResponse::decode_from(&mut r)?),
            17 => Response::PutResp(PutResponse::decode_from(&mut r)?),
            18 => Response::DeleteRangeResp(DeleteRangeResponse::decode_from(&mut r)?),
            19 => Response::Txn(TxnResponse::decode_from(&mut r)?),
            20 => Response::Compact { revision: r.u64()? },
            21 => Response::LeaseGrant {
                revision: r.u64()?,
                id: r.i64()?,
                ttl: r.i64()?,
            },
            22 => Response::LeaseRevoke { revision: r.u64()? },
            23 => Response::LeaseKeepAlive {
                revision: r.u64()?,
                id: r.i64()?,
                ttl: r.i64()?,
            },
            24 => {
                let revision = r.u64()?;
                let id = r.i64()?;
                let ttl = r.i64()?;
                let granted_ttl = r.i64()?;
                let n = r.count(4)?;
                let mut keys = Vec::with_capacity(n);
                for _ in 0..n {
                    keys.push(r.bytes()?);
                }
                Response::LeaseTimeToLive {
                    revision,
                    id,
                    ttl,
                    granted_ttl,
                    keys,
                }
            }
            25 => {
                let revision = r.u64()?;
                let n = r.count(8)?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(r.i64()?);
                }
                Response::Leases { revision, ids }
            }
            26 => {
                let revision = r.u64()?;
                let compact_revision = r.i64()?;
                let n = r.count(MIN_EVENT_LEN)?;
                let mut events = Vec::with_capacity(n);
                for _ in 0..n {
                    events.push(WatchEvent::decode_from(&mut r)?);
                }
                Response::Events {
                    revision,
                    compact_revision,
                    events,
                    more: if r.bool()? { Some(r.u64()?) } else { None },
                }
            }
            27 => Response::HashKv {
                revision: r.u64()?,
                compact_revision: r.i64()?,
                hash: r.u32()?,
            },
            28 => Response::Auth { revision: r.u64()? },
            255 => {
                let code = ErrorCode::from_u8(r.u8()?)?;
                let message = String::from_utf8(r.bytes()?.to_vec())
                    .map_err(|_| KvError::InvalidUtf8("error message"))?;
                Response::Error { code, message }
            }
            found => {
                return Err(KvError::UnknownTag {
                    what: "response",
                    found,
                    expected: "1..=7, 16..=28 or 255",
                })
            }
        };
        r.finish()?;
        Ok(resp)
    }
}

/// Writes the caller of a `Command::As` or `Query::As`: whether there is
/// a user, its name, the generation.
fn encode_caller(w: &mut Writer, user: Option<&str>, generation: u64) {
    w.bool(user.is_some());
    if let Some(u) = user {
        w.bytes(u.as_bytes());
    }
    w.u64(generation);
}

/// Reads what `encode_caller` wrote, then the tag of the wrapped command or
/// query, which must not be `as_tag` again (an `As` in an `As`).
fn decode_caller(r: &mut Reader<'_>, as_tag: u8) -> Result<(Option<String>, u64, u8), KvError> {
    let user = if r.bool()? {
        Some(r.string("user name")?)
    } else {
        None
    };
    let generation = r.u64()?;
    let tag = r.u8()?;
    if tag == as_tag {
        return Err(KvError::NestedAs);
    }
    Ok((user, generation, tag))
}
