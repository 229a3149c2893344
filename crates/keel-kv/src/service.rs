//! `KvService`: the KV store as a Keel `Service`. Decodes and validates
//! commands and queries; applies them to the MVCC `Store` and the
//! `Leases` with etcd v3.4's semantics (put, delete range, txn, compact,
//! lease grant / revoke / keep-alive / expiry through log timers) and
//! to the `AuthStore` (auth commands; commands run as a user are checked
//! against it first); answers reads; collects the watch feed; owns the
//! snapshot format (`KKV3`).
//!
//! Snapshot: magic `KKV3`, applied-commands `u64`, then the store (store
//! revision `u64`, compaction point `i64`, key count `u64`, per key in
//! increasing key order: key, entry count `u32`, entries in revision order
//! as main revision `u64`, sub-revision `u32`, is-put `bool` and for puts
//! value, create revision `u64`, version `u64`, lease `i64`), then the
//! leases (id counter `i64`, count `u64`, per lease in increasing id order:
//! id `i64`, TTL `i64`, expiry `u64` log time in ns), then the auth state
//! (enabled `bool`, auth revision `u64`, secret; user count `u32`, per
//! user in name order: name, password `Option<bytes>`, generation `u64`,
//! role count `u32` and role names in order; role count `u32`, per role
//! in name order: name, permission count `u32`, per permission in (key,
//! range end) order: kind `u8`, key, range end). Key attachments of
//! leases are rebuilt from the keys. Restore checks every invariant.
//! Until auth is first used (`AuthStore::in_use`) snapshots are written
//! as `KKV2`, the same without the auth state, which binaries from before
//! auth read too; `KKV2` snapshots decode with a fresh auth state.
//!
//! Timers: a lease's timer id is its id as `u64`; the service schedules it
//! at the lease's expiry on grant and renewal and cancels it on revoke.

use crate::auth::{Access, AuthShared, AuthStore};
use crate::codec::{Reader, Writer};
use crate::error::KvError;
use crate::etcd::{
    CompareResult, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseOp, SortOrder, SortTarget, TxnCompare,
    TxnRequest, TxnResponse, WatchEvent,
};
use crate::lease::{Leases, DEFAULT_MIN_LEASE_TTL, MAX_LEASE_TTL};
use crate::proto::{Command, KeyValue, Query, Response};
use crate::quota::SpaceQuota;
use crate::store::{Store, Write};
use bytes::Bytes;
use keel_core::{ClientId, Context, Service};
use std::cmp::Ordering;
use std::sync::Arc;

const SNAPSHOT_MAGIC: [u8; 4] = *b"KKV3";
/// The format before the auth state was added; decodes with a fresh one.
const SNAPSHOT_MAGIC_V2: [u8; 4] = *b"KKV2";

/// Pending watch events kept when nobody drains them; beyond this the
/// oldest whole revisions are dropped (a consumer sees a revision gap and
/// catches up with `Query::Events`).
pub const MAX_PENDING_EVENTS: usize = 1 << 20;

/// Where the service schedules and cancels its (lease) timers: the entry's
/// `Context` when applied by a `ServiceHost`.
pub trait TimerSink {
    fn schedule(&mut self, id: u64, deadline: u64);
    fn cancel(&mut self, id: u64);
}

impl TimerSink for Context<'_> {
    fn schedule(&mut self, id: u64, deadline: u64) {
        self.schedule_timer(id, deadline);
    }
    fn cancel(&mut self, id: u64) {
        self.cancel_timer(id);
    }
}

/// Drops timer requests (for applying commands outside a host).
pub struct NoTimers;

impl TimerSink for NoTimers {
    fn schedule(&mut self, _id: u64, _deadline: u64) {}
    fn cancel(&mut self, _id: u64) {}
}

/// The replicated key-value service.
#[derive(Clone, Debug)]
pub struct KvService {
    store: Store,
    leases: Leases,
    applied: u64,
    min_lease_ttl: i64,
    /// The watch feed since the last `take_events`; not replicated state.
    pending: Vec<WatchEvent>,
    /// Build the watch feed at all (see `Service::notifications_wanted`);
    /// not replicated state.
    feed: bool,
    /// Where the history's size is published for admission (see
    /// `quota`); not replicated state.
    quota: Option<Arc<SpaceQuota>>,
    /// Users, roles, permissions (replicated state).
    auth: AuthStore,
    /// Where the auth state is published for the etcd API; not replicated
    /// state.
    auth_shared: Arc<AuthShared>,
}

impl Default for KvService {
    fn default() -> KvService {
        KvService {
            store: Store::new(),
            leases: Leases::default(),
            applied: 0,
            min_lease_ttl: DEFAULT_MIN_LEASE_TTL,
            pending: Vec::new(),
            feed: true,
            quota: None,
            auth: AuthStore::default(),
            auth_shared: Arc::new(AuthShared::default()),
        }
    }
}

/// Equality of the replicated state (the undrained watch feed is not part
/// of it).
impl PartialEq for KvService {
    fn eq(&self, other: &KvService) -> bool {
        self.store == other.store
            && self.leases == other.leases
            && self.applied == other.applied
            && self.min_lease_ttl == other.min_lease_ttl
            && self.auth == other.auth
    }
}

impl Eq for KvService {}

/// A write batch together with the leases, so attachments follow the keys.
struct Tx<'a> {
    w: Write<'a>,
    leases: &'a mut Leases,
}

impl Tx<'_> {
    /// Ends the batch: the store revision afterwards and the events made.
    fn commit(self) -> (u64, Vec<WatchEvent>) {
        self.w.commit()
    }

    /// Puts `key`: its state before and after.
    fn put(&mut self, key: Bytes, value: Bytes, lease: i64) -> (Option<KeyValue>, KeyValue) {
        self.put_answering(key, value, lease, true)
            .unwrap_or_default()
    }

    /// `Write::put_answering`, with the key moved to its new lease.
    fn put_answering(
        &mut self,
        key: Bytes,
        value: Bytes,
        lease: i64,
        answer: bool,
    ) -> Option<(Option<KeyValue>, KeyValue)> {
        // Callers check the lease exists; never attach a key to a missing one.
        let lease = if self.leases.contains(lease) {
            lease
        } else {
            0
        };
        let (prev_lease, states) = self.w.put_answering(key.clone(), value, lease, answer);
        if let Some(prev) = prev_lease.filter(|&l| l != 0) {
            self.leases.detach(prev, &key);
        }
        if lease != 0 {
            self.leases.attach(lease, key);
        }
        states
    }

    fn delete(&mut self, key: &[u8]) -> Option<KeyValue> {
        let prev = self.w.delete(key)?;
        self.leases.detach(prev.lease, key);
        Some(prev)
    }

    fn delete_range(&mut self, start: &[u8], end: &[u8]) -> Vec<KeyValue> {
        let (live, _) = self.w.store().range_at(start, end, u64::MAX, usize::MAX);
        for kv in &live {
            self.delete(&kv.key);
        }
        live
    }

    /// etcd `applierV3backend.Put` inside a write txn. `begin` is the
    /// revision the txn started from: if an ignore_value / ignore_lease put
    /// finds its key deleted earlier in the same txn (possible only through
    /// etcd's "from key" interval quirk, where etcd itself panics), the
    /// key's state at the start of the txn is used instead.
    fn put_req(&mut self, p: &PutRequest, begin: Option<u64>) -> Result<PutResponse, KvError> {
        let ignore = p.ignore_value || p.ignore_lease;
        let mut cur = if ignore || p.prev_kv {
            self.w.get(&p.key)
        } else {
            None
        };
        let base = match (&cur, begin) {
            (None, Some(b)) if ignore => self.w.store().get_at(&p.key, b),
            _ => cur.clone(),
        };
        if ignore && base.is_none() {
            return Err(KvError::KeyNotFound);
        }
        let value = match (&base, p.ignore_value) {
            (Some(kv), true) => kv.value.clone(),
            _ => p.value.clone(),
        };
        let lease = match (&base, p.ignore_lease) {
            (Some(kv), true) => kv.lease,
            _ => p.lease,
        };
        self.put_answering(p.key.clone(), value, lease, false);
        if !p.prev_kv {
            cur = None;
        }
        Ok(PutResponse {
            revision: self.w.revision(),
            prev_kv: cur,
        })
    }

    /// etcd `applierV3backend.DeleteRange`.
    fn delete_req(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let deleted = self.delete_range(&d.key, &d.range_end);
        let revision = if self.w.changed() {
            self.w.revision()
        } else {
            self.w.begin_revision()
        };
        DeleteRangeResponse {
            revision,
            deleted: deleted.len() as u64,
            prev_kvs: if d.prev_kv { deleted } else { Vec::new() },
        }
    }
}

/// etcd `applierV3backend.Range` on a store whose reads are at `current`.
pub(crate) fn range(
    store: &Store,
    current: u64,
    r: &RangeRequest,
) -> Result<RangeResponse, KvError> {
    let rev = store.read_revision(r.revision, current)?;
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    // etcd fetches everything when it sorts or filters, else limit + 1.
    let fetch = if r.count_only {
        0
    } else if r.sort_order != SortOrder::None || filtered || r.limit <= 0 {
        usize::MAX
    } else {
        usize::try_from(r.limit).map_or(usize::MAX, |l| l.saturating_add(1))
    };
    let (mut kvs, count) = store.range_at(&r.key, &r.range_end, rev, fetch);
    let keep = |kv: &KeyValue| {
        let m = kv.mod_revision as i64;
        let c = kv.create_revision as i64;
        !(r.max_mod_revision != 0 && m > r.max_mod_revision
            || r.min_mod_revision != 0 && m < r.min_mod_revision
            || r.max_create_revision != 0 && c > r.max_create_revision
            || r.min_create_revision != 0 && c < r.min_create_revision)
    };
    kvs.retain(keep);
    let order = if r.sort_target != SortTarget::Key && r.sort_order == SortOrder::None {
        SortOrder::Ascend
    } else {
        r.sort_order
    };
    if order != SortOrder::None {
        let by = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match r.sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        // Stable, so ties stay in key order (as Go's insertion sort leaves
        // etcd's small results).
        match order {
            SortOrder::Descend => kvs.sort_by(|a, b| by(b, a)),
            _ => kvs.sort_by(by),
        }
    }
    let mut more = false;
    if r.limit > 0 {
        let limit = usize::try_from(r.limit).unwrap_or(usize::MAX);
        if kvs.len() > limit {
            kvs.truncate(limit);
            more = true;
        }
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value = Bytes::new();
        }
    }
    Ok(RangeResponse {
        revision: current,
        kvs,
        more,
        count,
    })
}

/// etcd `applyCompare`: against the state at `rev`.
fn compare_holds(store: &Store, rev: u64, c: &TxnCompare) -> bool {
    let (kvs, _) = store.range_at(&c.key, &c.range_end, rev, usize::MAX);
    if kvs.is_empty() {
        if matches!(c.target, CompareTarget::Value(_)) {
            return false;
        }
        return compare_kv(c, &KeyValue::default());
    }
    kvs.iter().all(|kv| compare_kv(c, kv))
}

fn compare_kv(c: &TxnCompare, kv: &KeyValue) -> bool {
    let ord = match &c.target {
        CompareTarget::Value(v) => kv.value[..].cmp(&v[..]),
        CompareTarget::Version(v) => (kv.version as i64).cmp(v),
        CompareTarget::Create(v) => (kv.create_revision as i64).cmp(v),
        CompareTarget::Mod(v) => (kv.mod_revision as i64).cmp(v),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// etcd `compareToPath`: the outcome of every compare block on the taken
/// path, in pre-order, all against the state at the start of the txn.
fn compare_path(store: &Store, rev: u64, t: &TxnRequest, path: &mut Vec<bool>) {
    let ok = t.compare.iter().all(|c| compare_holds(store, rev, c));
    path.push(ok);
    for op in if ok { &t.success } else { &t.failure } {
        if let RequestOp::Txn(n) = op {
            compare_path(store, rev, n, path);
        }
    }
}

/// The branch a txn takes, following `path` from `*at`.
fn branch<'t>(t: &'t TxnRequest, path: &[bool], at: &mut usize) -> &'t [RequestOp] {
    let ok = path.get(*at).copied().unwrap_or(false);
    *at += 1;
    if ok {
        &t.success
    } else {
        &t.failure
    }
}

/// Where a txn's operations run: a read view, or a write batch.
enum Exec<'a, 'b> {
    Read(&'a Store),
    Write(&'a mut Tx<'b>),
}

impl Exec<'_, '_> {
    fn store(&self) -> &Store {
        match self {
            Exec::Read(s) => s,
            Exec::Write(tx) => tx.w.store(),
        }
    }
    fn read_revision(&self) -> u64 {
        match self {
            Exec::Read(s) => s.revision(),
            Exec::Write(tx) => tx.w.read_revision(),
        }
    }
}

impl KvService {
    pub fn new() -> KvService {
        KvService::default()
    }

    /// Sets the minimum lease TTL in seconds (at least 1). etcd uses
    /// `ceil(1.5 * election timeout)`; the default is 2 (etcd's default).
    /// Like every parameter of the state machine it must be the same on
    /// every replica; it is not part of the snapshot.
    pub fn with_min_lease_ttl(mut self, secs: i64) -> KvService {
        self.min_lease_ttl = secs.clamp(1, MAX_LEASE_TTL);
        self
    }

    /// Refuse writes that store values while the history's size estimate
    /// (`db_size`) would pass `limit` bytes (0 = no limit): see `quota`.
    /// A node setting, not part of the replicated state.
    pub fn with_quota(mut self, limit: u64) -> KvService {
        let quota = SpaceQuota::new(limit);
        quota.publish(self.db_size());
        self.quota = Some(quota);
        self
    }

    /// The quota set by `with_quota`, shared with whoever admits writes or
    /// reports alarms.
    pub fn quota(&self) -> Option<Arc<SpaceQuota>> {
        self.quota.clone()
    }

    /// Publishes the history's size to the quota, if there is one.
    fn publish_size(&self) {
        if let Some(q) = &self.quota {
            q.publish(self.db_size());
        }
    }

    pub fn min_lease_ttl(&self) -> i64 {
        self.min_lease_ttl
    }

    /// Store revision: 1 before any write, then one more per write that
    /// changed something.
    pub fn revision(&self) -> u64 {
        self.store.revision()
    }

    /// The compaction point (-1 before any compaction).
    pub fn compact_revision(&self) -> i64 {
        self.store.compact_revision()
    }

    /// Commands applied (valid ones, whether or not they changed anything;
    /// malformed or invalid commands are rejected and not counted).
    pub fn applied_commands(&self) -> u64 {
        self.applied
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.store.get(key)
    }

    /// See `Store::range`.
    pub fn range(&self, start: &[u8], end: &[u8], limit: u64) -> (Vec<KeyValue>, bool, u64) {
        self.store.range(start, end, limit)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// The authentication state.
    pub fn auth(&self) -> &AuthStore {
        &self.auth
    }

    /// Where the authentication state is published after every change
    /// (and restore), for the etcd API to read. Kept across restores.
    pub fn auth_shared(&self) -> Arc<AuthShared> {
        self.auth_shared.clone()
    }

    /// The watch feed: every change applied since the last call (or
    /// `take_notifications`, which drains the same feed), in revision and
    /// sub-revision order. Revisions in the feed are contiguous; a gap means
    /// events were dropped (more than `MAX_PENDING_EVENTS` undrained) or a
    /// snapshot was installed, and a watcher must catch up with
    /// `Query::Events`.
    pub fn take_events(&mut self) -> Vec<WatchEvent> {
        std::mem::take(&mut self.pending)
    }

    fn publish(&mut self, events: Vec<WatchEvent>) {
        self.pending.extend(events);
        if self.pending.len() > MAX_PENDING_EVENTS {
            let over = self.pending.len() - MAX_PENDING_EVENTS;
            let cut_rev = self.pending[over].revision();
            let cut = self
                .pending
                .partition_point(|e| e.revision() <= cut_rev)
                .min(self.pending.len());
            self.pending.drain(..cut);
        }
    }

    fn tx(&mut self) -> Tx<'_> {
        Tx {
            w: self.store.write_with_events(self.feed),
            leases: &mut self.leases,
        }
    }

    /// Validates and applies one command at log time 0 without timers
    /// (leases granted this way never expire by themselves). The `Service`
    /// implementation uses `apply_at` with the entry's context.
    pub fn apply(&mut self, cmd: Command) -> Response {
        self.apply_at(0, &mut NoTimers, cmd)
    }

    /// Validates and applies one command at log time `now` (ns). An
    /// invalid command changes nothing and yields an error reply; a valid
    /// one that fails (etcd's errors) changes nothing either.
    pub fn apply_at(&mut self, now: u64, timers: &mut dyn TimerSink, cmd: Command) -> Response {
        if let Err(e) = cmd.validate() {
            return Response::error(&e);
        }
        self.applied = self.applied.wrapping_add(1);
        if self.auth.enabled() && cmd.needs_a_caller() {
            // Sent as no one by a member that did not know auth was on
            // (etcd refuses such a request when it applies it, too).
            return Response::error(&KvError::UserEmpty);
        }
        match self.apply_valid(now, timers, cmd) {
            Ok(r) => r,
            Err(e) => Response::error(&e),
        }
    }

    fn apply_valid(
        &mut self,
        now: u64,
        timers: &mut dyn TimerSink,
        cmd: Command,
    ) -> Result<Response, KvError> {
        Ok(match cmd {
            Command::Put { key, value } => {
                let mut tx = self.tx();
                let (prev, _) = tx.put(key, value, 0);
                let (revision, events) = tx.commit();
                self.publish(events);
                Response::Put { revision, prev }
            }
            Command::Delete { key } => {
                let mut tx = self.tx();
                let prev = tx.delete(&key);
                let (revision, events) = tx.commit();
                self.publish(events);
                Response::Delete {
                    revision,
                    deleted: u64::from(prev.is_some()),
                    prev,
                }
            }
            Command::DeleteRange { start, end } => {
                let mut tx = self.tx();
                let prev = tx.delete_range(&start, &end);
                let (revision, events) = tx.commit();
                self.publish(events);
                Response::DeleteRange {
                    revision,
                    deleted: prev.len() as u64,
                    prev,
                }
            }
            Command::Cas {
                key,
                expected,
                value,
            } => {
                let mut tx = self.tx();
                let current = tx.w.get(&key);
                let (succeeded, current) = if expected.matches(current.as_ref()) {
                    let (_, kv) = tx.put(key, value, 0);
                    (true, Some(kv))
                } else {
                    (false, current)
                };
                let (revision, events) = tx.commit();
                self.publish(events);
                Response::Cas {
                    succeeded,
                    revision,
                    current,
                }
            }
            Command::PutReq(p) => {
                if p.lease != 0 && !self.leases.contains(p.lease) {
                    return Err(KvError::LeaseNotFound);
                }
                let mut tx = self.tx();
                let r = tx.put_req(&p, None);
                let (_, events) = tx.commit();
                self.publish(events);
                Response::PutResp(r?)
            }
            Command::DeleteRangeReq(d) => {
                let mut tx = self.tx();
                let r = tx.delete_req(&d);
                let (_, events) = tx.commit();
                self.publish(events);
                Response::DeleteRangeResp(r)
            }
            Command::Txn(t) => Response::Txn(self.txn(&t)?),
            Command::Compact { revision } => {
                self.store.compact(revision)?;
                Response::Compact {
                    revision: self.store.revision(),
                }
            }
            Command::LeaseGrant { id, ttl } => {
                let l = self.leases.grant(id, ttl, now, self.min_lease_ttl)?;
                let (id, ttl, expiry) = (l.id, l.ttl, l.expiry);
                timers.schedule(id as u64, expiry);
                Response::LeaseGrant {
                    revision: self.store.revision(),
                    id,
                    ttl,
                }
            }
            Command::LeaseRevoke { id } => {
                if !self.revoke(id) {
                    return Err(KvError::LeaseNotFound);
                }
                timers.cancel(id as u64);
                Response::LeaseRevoke {
                    revision: self.store.revision(),
                }
            }
            Command::LeaseKeepAlive { id } => {
                let l = self.leases.renew(id, now)?;
                let (ttl, expiry) = (l.ttl, l.expiry);
                timers.schedule(id as u64, expiry);
                Response::LeaseKeepAlive {
                    revision: self.store.revision(),
                    id,
                    ttl,
                }
            }
            Command::Auth(a) => {
                let before = self.auth.revision();
                self.auth.apply(&a)?;
                if self.auth.revision() != before {
                    self.auth_shared.publish(&self.auth);
                }
                Response::Auth {
                    revision: self.store.revision(),
                }
            }
            Command::As {
                user,
                generation,
                command,
            } => {
                if self.auth.enabled() {
                    self.auth.check_caller(user.as_deref(), generation)?;
                    self.auth
                        .check_command(user.as_deref(), &command, &self.leases)?;
                }
                return self.apply_valid(now, timers, *command);
            }
        })
    }

    /// Revokes a lease: deletes its keys in key order as one write, then
    /// forgets it. False if there is no such lease.
    fn revoke(&mut self, id: i64) -> bool {
        let Some(lease) = self.leases.remove(id) else {
            return false;
        };
        let mut tx = self.tx();
        for key in &lease.keys {
            tx.delete(key);
        }
        let (_, events) = tx.commit();
        self.publish(events);
        true
    }

    /// A leader's term started at log time `now`: every lease gets its
    /// whole TTL again from `now` (etcd's `Promote`), so that the time the
    /// cluster spent without a leader (an election; a restore from a
    /// backup taken long ago) does not expire them; a lease whose holder is
    /// gone expires a TTL later.
    pub fn refresh_leases(&mut self, now: u64, timers: &mut dyn TimerSink) {
        for (id, expiry) in self.leases.refresh_all(now) {
            timers.schedule(id as u64, expiry);
        }
    }

    /// A lease timer fired at log time `now`: revoke the lease if it has
    /// expired by then, else (a stale timer) schedule it again.
    pub fn expire_lease(&mut self, now: u64, id: i64, timers: &mut dyn TimerSink) {
        let Some(expiry) = self.leases.get(id).map(|l| l.expiry) else {
            return;
        };
        if expiry <= now {
            self.revoke(id);
        } else {
            timers.schedule(id as u64, expiry);
        }
    }

    /// etcd `applierV3backend.Txn`.
    fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse, KvError> {
        let begin = self.store.revision();
        let mut path = Vec::new();
        compare_path(&self.store, begin, t, &mut path);
        if !t.is_read_only() {
            self.check_puts(t, &path, &mut 0, begin)?;
        }
        self.check_ranges(t, &path, &mut 0, begin)?;
        if t.is_read_only() {
            let mut exec = Exec::Read(&self.store);
            let mut resp = exec_txn(&mut exec, t, &path, &mut 0, begin);
            resp.revision = begin;
            return Ok(resp);
        }
        let mut tx = self.tx();
        let mut resp = exec_txn(&mut Exec::Write(&mut tx), t, &path, &mut 0, begin);
        let (revision, events) = tx.commit();
        self.publish(events);
        resp.revision = revision;
        Ok(resp)
    }

    /// etcd `checkRequestPut` over the taken path, against the start state.
    fn check_puts(
        &self,
        t: &TxnRequest,
        path: &[bool],
        at: &mut usize,
        begin: u64,
    ) -> Result<(), KvError> {
        for op in branch(t, path, at) {
            match op {
                RequestOp::Txn(n) => self.check_puts(n, path, at, begin)?,
                RequestOp::Put(p) => {
                    if (p.ignore_value || p.ignore_lease)
                        && self.store.get_at(&p.key, begin).is_none()
                    {
                        return Err(KvError::KeyNotFound);
                    }
                    if p.lease != 0 && !self.leases.contains(p.lease) {
                        return Err(KvError::LeaseNotFound);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// etcd `checkRequestRange` over the taken path.
    fn check_ranges(
        &self,
        t: &TxnRequest,
        path: &[bool],
        at: &mut usize,
        begin: u64,
    ) -> Result<(), KvError> {
        for op in branch(t, path, at) {
            match op {
                RequestOp::Txn(n) => self.check_ranges(n, path, at, begin)?,
                RequestOp::Range(r) if r.revision != 0 => {
                    if r.revision > 0 && r.revision as u64 > begin {
                        return Err(KvError::FutureRevision);
                    }
                    if r.revision < self.store.compact_revision() {
                        return Err(KvError::Compacted);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Answers a read-only txn (`Query::Txn`).
    fn read_txn(&self, t: &TxnRequest) -> Result<TxnResponse, KvError> {
        let begin = self.store.revision();
        let mut path = Vec::new();
        compare_path(&self.store, begin, t, &mut path);
        self.check_ranges(t, &path, &mut 0, begin)?;
        let mut exec = Exec::Read(&self.store);
        let mut resp = exec_txn(&mut exec, t, &path, &mut 0, begin);
        resp.revision = begin;
        Ok(resp)
    }

    /// Validates and answers one query.
    pub fn read(&self, q: &Query) -> Response {
        if let Err(e) = q.validate() {
            return Response::error(&e);
        }
        if self.auth.enabled() && q.needs_a_caller() {
            return Response::error(&KvError::UserEmpty);
        }
        match self.answer(q) {
            Ok(r) => r,
            Err(e) => Response::error(&e),
        }
    }

    fn answer(&self, q: &Query) -> Result<Response, KvError> {
        let revision = self.store.revision();
        Ok(match q {
            Query::As {
                user,
                generation,
                query,
            } => {
                if self.auth.enabled() {
                    let user = user.as_deref();
                    self.auth.check_caller(user, *generation)?;
                    self.auth.check_query(user, query)?;
                    if let Query::LeaseTimeToLive { id, keys: true, .. } = **query {
                        // Its keys' names only to a user who may read them
                        // all (etcd's fix of CVE-2023-32082).
                        for key in self.leases.get(id).iter().flat_map(|l| &l.keys) {
                            self.auth.check_range(user, Access::Read, key, &[])?;
                        }
                    }
                }
                return self.answer(query);
            }
            Query::Get { key } => Response::Get {
                revision,
                kv: self.store.get(key),
            },
            Query::Range { start, end, limit } => {
                let (kvs, more, count) = self.store.range(start, end, *limit);
                Response::Range {
                    revision,
                    kvs,
                    more,
                    count,
                }
            }
            Query::Status => Response::Status {
                revision,
                keys: self.store.len() as u64,
                applied: self.applied,
                compact_revision: self.store.compact_revision(),
                db_size: self.db_size(),
                leases: self.leases.len() as u64,
            },
            Query::RangeReq(r) => Response::RangeResp(range(&self.store, revision, r)?),
            Query::Txn(t) => Response::Txn(self.read_txn(t)?),
            Query::Events {
                start,
                end,
                from_revision,
                limit,
            } => {
                let (events, more) = self.store.events(start, end, *from_revision, *limit)?;
                Response::Events {
                    revision,
                    compact_revision: self.store.compact_revision(),
                    events,
                    more,
                }
            }
            Query::LeaseTimeToLive { id, keys, now } => {
                let lease = self
                    .leases
                    .get(*id)
                    .filter(|l| l.expiry > *now)
                    .ok_or(KvError::LeaseNotFound)?;
                let left = lease.expiry - now;
                Response::LeaseTimeToLive {
                    revision,
                    id: *id,
                    ttl: i64::try_from(left / 1_000_000_000).unwrap_or(i64::MAX),
                    granted_ttl: lease.ttl,
                    keys: if *keys {
                        lease.keys.iter().cloned().collect()
                    } else {
                        Vec::new()
                    },
                }
            }
            Query::Leases => Response::Leases {
                revision,
                ids: self.leases.ids(),
            },
            Query::HashKv { revision: at } => Response::HashKv {
                revision,
                compact_revision: self.store.compact_revision(),
                hash: self.store.hash_kv(*at)?,
            },
        })
    }

    /// Estimated size of the state in bytes: the retained history, 64
    /// bytes per lease and the auth state's users, roles and secret (etcd
    /// reports its bolt file size; this is a model).
    pub fn db_size(&self) -> u64 {
        self.store
            .db_size()
            .saturating_add(64 * self.leases.len() as u64)
            .saturating_add(self.auth.contents_len())
    }

    /// Decodes a snapshot made by `Service::snapshot`.
    pub fn decode_snapshot(data: &[u8]) -> Result<KvService, KvError> {
        let mut r = Reader::new(data, "snapshot");
        let magic: [u8; 4] = r.array()?;
        if magic != SNAPSHOT_MAGIC && magic != SNAPSHOT_MAGIC_V2 {
            return Err(KvError::BadMagic {
                found: magic,
                expected: SNAPSHOT_MAGIC,
            });
        }
        let applied = r.u64()?;
        let store = Store::decode_from(&mut r)?;
        let mut leases = Leases::decode_from(&mut r)?;
        let auth = if magic == SNAPSHOT_MAGIC {
            AuthStore::decode_from(&mut r)?
        } else {
            AuthStore::default()
        };
        r.finish()?;
        for (key, lease) in store.leased_keys() {
            if !leases.contains(lease) {
                return Err(KvError::InvalidSnapshot(format!(
                    "key {key:?} is attached to lease {lease}, which does not exist"
                )));
            }
            leases.attach(lease, key.clone());
        }
        let svc = KvService {
            store,
            leases,
            applied,
            auth,
            ..KvService::default()
        };
        svc.auth_shared.publish(&svc.auth);
        Ok(svc)
    }
}

/// etcd `applyTxn`: runs the taken branch's operations in order. Reads in
/// a write batch see the batch's earlier writes.
fn exec_txn(
    exec: &mut Exec<'_, '_>,
    t: &TxnRequest,
    path: &[bool],
    at: &mut usize,
    begin: u64,
) -> TxnResponse {
    let succeeded = path.get(*at).copied().unwrap_or(false);
    let ops = branch(t, path, at);
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        responses.push(match op {
            RequestOp::Range(r) => {
                // Checked before the txn ran: this cannot fail.
                let current = exec.read_revision();
                ResponseOp::Range(range(exec.store(), current, r).unwrap_or_default())
            }
            RequestOp::Put(p) => ResponseOp::Put(match exec {
                // Checked before the txn ran: `put_req` cannot fail here.
                Exec::Write(tx) => tx.put_req(p, Some(begin)).unwrap_or_default(),
                Exec::Read(_) => PutResponse::default(),
            }),
            RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(match exec {
                Exec::Write(tx) => tx.delete_req(d),
                Exec::Read(_) => DeleteRangeResponse::default(),
            }),
            RequestOp::Txn(n) => ResponseOp::Txn(exec_txn(exec, n, path, at, begin)),
        });
    }
    TxnResponse {
        revision: 0,
        succeeded,
        responses,
    }
}

/// How much of a snapshot `prepare_snapshot`'s task writes at a time.
const SNAPSHOT_PIECE: usize = 1 << 20;

/// What a snapshot may take beyond `db_size`: the magic, the applied
/// position and the fixed parts of the store, lease and auth sections.
pub(crate) const SNAPSHOT_SLACK: u64 = 128;

/// Appends a KV snapshot to `out`: the magic, the applied position, the
/// store (written by `store`), the leases and the auth state (`rest`).
/// `db_size + SNAPSHOT_SLACK` is at least the encoded size (each history
/// entry's estimate covers its key, value and fields), so the buffer grows
/// once and the state is never copied into a bigger one; reserved but
/// unwritten memory is never touched.
fn write_snapshot(
    out: &mut Vec<u8>,
    magic: [u8; 4],
    applied: u64,
    db_size: u64,
    store: impl FnOnce(&mut Writer),
    rest: impl FnOnce(&mut Writer),
) {
    out.reserve(
        usize::try_from(db_size)
            .unwrap_or(usize::MAX)
            .saturating_add(SNAPSHOT_SLACK as usize),
    );
    let mut w = Writer::onto(std::mem::take(out));
    w.raw_bytes(&magic).u64(applied);
    store(&mut w);
    rest(&mut w);
    *out = w.into_vec();
}

impl KvService {
    /// `KKV2` while auth has never been used: the snapshot a binary from
    /// before auth reads too, so a cluster being upgraded node by node
    /// keeps working until someone adds a user or a role.
    fn snapshot_magic(&self) -> [u8; 4] {
        if self.auth.in_use() {
            SNAPSHOT_MAGIC
        } else {
            SNAPSHOT_MAGIC_V2
        }
    }

    /// What follows the store in a snapshot: the leases, and the auth
    /// state unless the format is `KKV2` (`snapshot_magic`).
    fn encode_rest(&self, w: &mut Writer) {
        self.leases.encode_into(w);
        if self.auth.in_use() {
            self.auth.encode_into(w);
        }
    }
}

impl Service for KvService {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        // Decoded whole before this state is replaced: a snapshot that does
        // not decode leaves the service (and its quota) as it was.
        let restored = match snapshot {
            None => KvService::new(),
            Some(data) => KvService::decode_snapshot(data).map_err(|e| e.to_string())?,
        };
        let (min_lease_ttl, quota) = (self.min_lease_ttl, self.quota.take());
        let auth_shared = self.auth_shared.clone();
        *self = restored.with_min_lease_ttl(min_lease_ttl);
        self.quota = quota;
        self.auth_shared = auth_shared;
        self.auth_shared.publish(&self.auth);
        self.publish_size();
        Ok(())
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        let store = |w: &mut Writer| self.store.encode_into(w);
        let rest = |w: &mut Writer| self.encode_rest(w);
        let magic = self.snapshot_magic();
        write_snapshot(out, magic, self.applied, self.db_size(), store, rest);
    }

    /// A consistent copy of the replicated state, serialized later on the
    /// runtime's snapshot thread. Keys and values are reference-counted
    /// `Bytes`, so the copy is of the history's structure, not its data.
    /// Written out in pieces of about `SNAPSHOT_PIECE` bytes: the runtime
    /// passes them on to the snapshot file, so the encoded state (about the
    /// size of the history) is never in memory whole.
    fn prepare_snapshot(&self) -> keel_core::SnapshotTask {
        let image = self.store.image();
        // Encoded now: a few dozen bytes per lease, where a clone would
        // copy each lease's set of keys; and the auth state, which is small.
        let mut rest = Writer::raw();
        self.encode_rest(&mut rest);
        let rest = rest.into_vec();
        let (magic, applied) = (self.snapshot_magic(), self.applied);
        Box::new(move |out| {
            let mut w = Writer::raw();
            w.raw_bytes(&magic).u64(applied);
            let mut failed = Ok(());
            image.encode_streaming(&mut w, &mut |w| {
                if w.len() >= SNAPSHOT_PIECE {
                    if failed.is_ok() {
                        failed = out.write_all(w.as_slice());
                    }
                    w.clear();
                }
            });
            failed?;
            w.raw_bytes(&rest);
            out.write_all(w.as_slice())
        })
    }

    fn on_message(&mut self, ctx: &mut Context<'_>, _client: ClientId, data: &[u8]) -> Bytes {
        match Command::decode(data) {
            Ok(cmd) => {
                let now = ctx.time();
                let reply = self.apply_at(now, ctx, cmd).encode();
                self.publish_size();
                reply
            }
            Err(e) => Response::error(&e).encode(),
        }
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, id: u64) {
        let now = ctx.time();
        self.expire_lease(now, id as i64, ctx);
        self.publish_size();
    }

    fn on_term_start(&mut self, ctx: &mut Context<'_>) {
        let now = ctx.time();
        self.refresh_leases(now, ctx);
    }

    fn query(&self, data: &[u8]) -> Bytes {
        match Query::decode(data) {
            Ok(q) => self.read(&q).encode(),
            Err(e) => Response::error(&e).encode(),
        }
    }

    /// The watch feed, one encoded `WatchEvent` per item (drains the same
    /// feed as `take_events`).
    fn take_notifications(&mut self) -> Vec<Bytes> {
        self.take_events().iter().map(WatchEvent::encode).collect()
    }

    fn discard_notifications(&mut self) {
        self.pending.clear();
    }

    /// The quota's check (`with_quota`), when there is one.
    fn admission(&self) -> Option<keel_core::Admission> {
        let quota = self.quota.clone()?;
        Some(Arc::new(move |data: &[u8]| quota.admit(data)))
    }

    fn notifications_wanted(&mut self, wanted: bool) {
        self.feed = wanted;
    }
}
