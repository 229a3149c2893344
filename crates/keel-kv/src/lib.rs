//! keel-kv: Keel's replicated key-value service on the native protocol,
//! with etcd v3.4's semantics so an etcd gRPC front end is a thin
//! translation layer. Keys and values are bytes with MVCC metadata (store
//! revision; per key create revision, mod revision, version, lease); every
//! revision is kept until compacted. Commands (put, delete, txn, compact,
//! lease grant / revoke / keep-alive, auth changes) go through the log;
//! queries (ranges at any retained revision, read-only txns, event
//! history, lease TTLs, hashes, status) are read-only. Leases expire
//! through log timers; every applied change is published on a watch feed.
//!
//! # etcd compatibility notes
//!
//! - Revisions: a fresh store is at revision 1; each write (put, delete
//!   that deleted something, txn that changed something, lease revocation
//!   that deleted keys) moves it by one, and all its changes share it
//!   (ordered by sub-revision). Compaction and lease operations do not.
//! - Errors carry etcd's gRPC message (`KvError` display) and an
//!   `ErrorCode` whose `grpc_code` is etcd's status code: Compacted and
//!   FutureRevision -> OutOfRange, LeaseNotFound -> NotFound, LeaseExists ->
//!   FailedPrecondition, LeaseTtlTooLarge -> OutOfRange, DuplicateKey /
//!   KeyNotFound / ValueProvided / LeaseProvided / TooManyOps / EmptyKey /
//!   KeyTooLarge / ValueTooLarge -> InvalidArgument (use `etcd_message` for
//!   the last three, whose Keel messages are more detailed).
//! - Reads: `revision < compaction point` is compacted (a read *at* the
//!   point works, as in etcd's `rangeKeys`); compaction keeps, per key, the
//!   latest entry at or below the point only if it is a put (a delete at the
//!   point is dropped, as etcd does), and everything after it. `count` ignores limit and the
//!   min/max filters, as etcd computes it; sorting is stable (ties stay in
//!   key order, which is what etcd's sort gives small results).
//! - Txns follow etcd's `applierV3backend.Txn`: every compare of the taken
//!   path (nested ones included) is evaluated against the state before the
//!   txn; puts and ranges of the path are checked before anything runs (so
//!   an error changes nothing); operations then run in order and reads see
//!   earlier writes. Duplicate keys follow `checkIntervals` literally,
//!   including its quirks (a "from key" delete with range end `"\0"` does
//!   not conflict with puts; a nested txn's puts are only checked against
//!   deletes before it). Nested txn responses have revision 0, as etcd
//!   leaves their headers empty.
//! - Leases: expiry is leader-stamped log time; each new leader's term
//!   start gives every lease its whole TTL again (etcd's `Promote`; its
//!   extra election timeout is added by the etcd API, `keel-etcd`, which
//!   renews every lease an election timeout into a new leader's term, so
//!   that term-start entries keep their meaning). The lease list is soonest expiry first,
//!   as etcd 3.4's. TTLs below the minimum (default 2 s,
//!   etcd's `ceil(1.5 * election timeout)` with a 1 s election timeout) are
//!   raised; ids granted without one count up from 1. A lease past its
//!   expiry is "not found" to keep-alive and time-to-live queries even
//!   before its timer entry revokes it (etcd waits for the revocation and
//!   then answers not found).
//! - Auth (`auth`): etcd 3.4's users, roles, permissions, enabled flag,
//!   auth revision and token secret are replicated state (in snapshots)
//!   changed by `Command::Auth`. Once auth is in use (a user or role was
//!   ever added) the etcd API sends each request as `Command::As` or
//!   `Query::As`, with the user its token names and that user's
//!   generation; while auth is enabled it runs only if the user still has
//!   that generation and `AuthStore::check_command` / `check_query` allow
//!   it (etcd's `authApplierV3`), checked against the state the write
//!   applies to or the read answers from. Unwrapped commands and queries
//!   are never checked (they come from trusted in-process callers and the
//!   native client port). Until auth is in use the API sends plain
//!   commands and snapshots stay `KKV2`, so a cluster upgraded node by
//!   node from a binary without auth keeps agreeing.
//! - HashKv is a CRC-32C over the retained history up to a revision (none
//!   for a negative one, as etcd 3.4), with etcd's revision rules;
//!   deterministic across replicas, not equal to etcd's value (except
//!   over no entries). `db_size` is an estimate of the in-memory state.

pub mod auth;
mod chunked;
mod codec;
mod crc;
pub mod error;
pub mod etcd;
mod keymap;
pub mod lease;
pub mod proto;
pub mod quota;
pub mod service;
pub mod store;

pub use auth::{
    Access, AuthCommand, AuthShared, AuthStore, PermKind, Permission, Role, User, ROOT,
};
pub use error::{ErrorCode, KvError};
pub use etcd::{
    CompareResult, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, EventType, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseOp, SortOrder, SortTarget,
    TxnCompare, TxnRequest, TxnResponse, WatchEvent, MAX_TXN_DEPTH, MAX_TXN_OPS,
};
pub use lease::{Lease, Leases, DEFAULT_MIN_LEASE_TTL, MAX_LEASE_TTL};
pub use proto::{
    check_key, check_value, prefix_end, Command, Compare, KeyValue, Query, Response, MAX_KEY_LEN,
    MAX_VALUE_LEN,
};
pub use quota::{SpaceQuota, DEFAULT_QUOTA_BYTES, NO_SPACE};
pub use service::{KvService, NoTimers, TimerSink, MAX_PENDING_EVENTS};
pub use store::{Store, Write};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_auth;
#[cfg(test)]
mod tests_etcd;
#[cfg(test)]
mod tests_props;
