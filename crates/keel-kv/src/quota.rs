//! The space quota (etcd's `--quota-backend-bytes`): writes that would grow
//! the retained history past it are refused before they are proposed.
//!
//! The store keeps its whole MVCC history in memory until a client
//! compacts it, and every replica holds the same history, so without a
//! bound a stream of writes would run every node out of memory at about
//! the same moment. The quota turns that into refused writes with etcd's
//! "database space exceeded" error while reads, deletes and compactions
//! go on, so an operator (or `auto_compaction_retention`) can make room.
//!
//! The check is admission, not part of the replicated state machine: the
//! service publishes its history's size estimate (`KvService::db_size`)
//! after each change, and the node refuses a write whose command stores a
//! value (a put, a txn with a put in either branch, a lease grant; the
//! same run as a user; never an auth command) when the estimate plus the
//! request's size would pass the quota. Refusing
//! before the log is always safe, so nodes configured with different
//! quotas cannot diverge. The estimate lags the writes in flight, so the
//! history can pass the quota by about one batch of them.

use crate::proto::Command;
use crate::RequestOp;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The refusal's message (the node's client error). The etcd API answers
/// it as etcd does: `ResourceExhausted`, "etcdserver: " and this text.
pub const NO_SPACE: &str = "mvcc: database space exceeded";

/// etcd's default quota, 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

/// What a request is charged beyond its encoded size (one history entry's
/// bookkeeping, as `Store` estimates it).
const REQUEST_OVERHEAD: u64 = 64;

/// A node's quota and the service's last published size estimate, shared
/// between the service thread (which publishes) and the threads that admit
/// writes and answer alarm queries.
#[derive(Debug)]
pub struct SpaceQuota {
    limit: u64,
    used: AtomicU64,
    /// A write was refused, and no write has been admitted since with the
    /// history under the quota (etcd's NOSPACE alarm).
    alarm: AtomicBool,
}

impl SpaceQuota {
    /// A quota of `limit` bytes of history; 0 = no limit.
    pub fn new(limit: u64) -> Arc<SpaceQuota> {
        Arc::new(SpaceQuota {
            limit,
            used: AtomicU64::new(0),
            alarm: AtomicBool::new(false),
        })
    }

    /// The quota in bytes (0 = no limit).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The history's size estimate as last published by the service.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn publish(&self, used: u64) {
        self.used.store(used, Ordering::Relaxed);
    }

    /// Is the NOSPACE alarm raised: was a write refused, with none
    /// admitted since, or is the history at or past the quota?
    pub fn alarm(&self) -> bool {
        self.limit > 0 && (self.alarm.load(Ordering::Relaxed) || self.used() >= self.limit)
    }

    /// Lowers the alarm (`etcdctl alarm disarm`). It is raised again by the
    /// next refused write, and stays listed while the history is at or past
    /// the quota.
    pub fn disarm(&self) {
        self.alarm.store(false, Ordering::Relaxed);
    }

    /// Admits or refuses an encoded `Command` (see the module docs).
    /// Commands that do not decode are admitted: the service rejects them
    /// with the reason.
    pub fn admit(&self, data: &[u8]) -> Result<(), String> {
        if self.limit == 0 {
            return Ok(());
        }
        let cost = (data.len() as u64).saturating_add(REQUEST_OVERHEAD);
        if self.used().saturating_add(cost) <= self.limit {
            // Room again: the alarm (if any) is over.
            if self.alarm.load(Ordering::Relaxed) {
                self.alarm.store(false, Ordering::Relaxed);
            }
            return Ok(());
        }
        match Command::decode(data) {
            Ok(c) if c.adds_history() => {
                self.alarm.store(true, Ordering::Relaxed);
                Err(NO_SPACE.to_string())
            }
            _ => Ok(()),
        }
    }
}

impl Command {
    /// Is this a command the quota refuses: one that stores a value (or
    /// a lease)? A txn is if either of its branches (or a nested txn's)
    /// has a put. Deletes, compactions and lease revocations are what make
    /// room, so they are always admitted, as in etcd (a delete's tombstone
    /// is small, and compacting removes it with what it deleted).
    pub fn adds_history(&self) -> bool {
        fn op_puts(op: &RequestOp) -> bool {
            match op {
                RequestOp::Put(_) => true,
                RequestOp::Txn(t) => t.success.iter().chain(&t.failure).any(op_puts),
                RequestOp::Range(_) | RequestOp::DeleteRange(_) => false,
            }
        }
        match self {
            Command::Put { .. }
            | Command::Cas { .. }
            | Command::PutReq(_)
            | Command::LeaseGrant { .. } => true,
            Command::Txn(t) => t.success.iter().chain(&t.failure).any(op_puts),
            Command::Delete { .. }
            | Command::DeleteRange { .. }
            | Command::DeleteRangeReq(_)
            | Command::Compact { .. }
            | Command::LeaseRevoke { .. }
            | Command::LeaseKeepAlive { .. }
            | Command::Auth(_) => false,
            Command::As { command, .. } => command.adds_history(),
        }
    }
}
