//! etcd's server-side lock and election recipes (the `v3lockpb.Lock` and
//! `v3electionpb.Election` services), built the way etcd builds them: from
//! KV and Lease requests through this node, like any client's, with this
//! node's apply feed to wait on.
//!
//! A contender under lease L for name N owns the key `N/<L in hex>`,
//! created under L (the same lease contending twice is one contender). The
//! contender whose key has the lowest create revision holds the lock or
//! leads the election; the others wait, each for the keys created before
//! its own to be deleted (released, resigned, or gone with their lease).
//! A contender given no lease gets one of etcd's default session TTL, 60
//! s, which nobody renews. A call abandoned while it waits (the client
//! cancelled it or went away) deletes its key again, as etcd's does,
//! unless another call through this node shares the key (see `Contender`).

use crate::auth::{internal, Who};
use crate::kv::KvApi;
use crate::lease::LeaseApi;
use crate::Api;
use bytes::Bytes;
use keel_etcd_proto::etcdserverpb::kv_server::Kv;
use keel_etcd_proto::etcdserverpb::lease_server::Lease;
use keel_etcd_proto::etcdserverpb::*;
use keel_etcd_proto::mvccpb::KeyValue;
use keel_kv::{EventType, WatchEvent};
use keel_node::Notification;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast::{error::RecvError, Receiver};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Code, Status};

/// etcd's default session TTL, for a contender that names no lease.
const DEFAULT_SESSION_TTL: i64 = 60;

/// What `claim` found or made.
pub(crate) struct Claim {
    /// The contender's key's create revision.
    pub rev: i64,
    /// The key was there already (the same lease contended before).
    pub existing: Option<KeyValue>,
    /// A key under the prefix was created before it (it did not hold the
    /// lock or lead when claimed).
    pub behind: bool,
}

/// The end of the range of every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end.into();
        }
    }
    // Every byte was 0xff: every key from `prefix` on.
    Bytes::from_static(&[0])
}

/// `name/`, the prefix of every contender's key.
pub(crate) fn prefix_of(name: &[u8]) -> Bytes {
    let mut p = name.to_vec();
    p.push(b'/');
    p.into()
}

/// The contender's key under `lease`: `name/<lease in hex>`, written as
/// Go's `%x` writes an int64 (a minus sign, not two's complement), so the
/// key is the one etcd's client-side recipes use for the same lease.
pub(crate) fn key_of(name: &[u8], lease: i64) -> Bytes {
    let mut k = prefix_of(name).to_vec();
    let hex = if lease < 0 {
        format!("-{:x}", lease.unsigned_abs())
    } else {
        format!("{lease:x}")
    };
    k.extend_from_slice(hex.as_bytes());
    k.into()
}

fn compare_create_revision(key: &Bytes, rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.clone(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

fn put_op(key: &Bytes, value: Bytes, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.clone(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// The key under `prefix` with the lowest create revision.
fn first_op(prefix: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: prefix.clone(),
            range_end: prefix_end(prefix),
            limit: 1,
            sort_order: range_request::SortOrder::Ascend as i32,
            sort_target: range_request::SortTarget::Create as i32,
            ..Default::default()
        })),
    }
}

fn range_op(key: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.clone(),
            ..Default::default()
        })),
    }
}

fn delete_op(key: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            },
        )),
    }
}

/// The KV and Lease requests the recipes are made of, made for a caller
/// (`Who`): they are checked as the caller's own, when applied.
#[derive(Clone)]
pub(crate) struct Recipes(pub Arc<Api>, pub Who);

impl Recipes {
    /// The recipes for `who`.
    pub fn as_caller(&self, who: &Who) -> Recipes {
        Recipes(self.0.clone(), who.clone())
    }

    /// `msg` as a request of the caller's (`auth::internal`).
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        internal(msg, &self.1)
    }

    fn kv(&self) -> KvApi {
        KvApi(self.0.clone())
    }

    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        self.0.header(revision)
    }

    /// `lease`, or (for 0) a new lease of the default session TTL.
    pub async fn lease_or_grant(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let granted = LeaseApi(self.0.clone())
            .lease_grant(self.request(LeaseGrantRequest {
                ttl: DEFAULT_SESSION_TTL,
                id: 0,
            }))
            .await?
            .into_inner();
        if !granted.error.is_empty() {
            return Err(Status::unknown(granted.error));
        }
        Ok(granted.id)
    }

    /// Creates `key` (under `prefix`) with `value` under `lease` unless it
    /// exists (then the caller adopts it), and reads the first contender's
    /// key in the same txn, as etcd's mutex does.
    pub async fn claim(
        &self,
        prefix: &Bytes,
        key: &Bytes,
        value: Bytes,
        lease: i64,
    ) -> Result<Claim, Status> {
        let t = self
            .kv()
            .txn(self.request(TxnRequest {
                compare: vec![compare_create_revision(key, 0)],
                success: vec![put_op(key, value, lease), first_op(prefix)],
                failure: vec![range_op(key), first_op(prefix)],
            }))
            .await?
            .into_inner();
        let mut ranges = t.responses.into_iter().filter_map(|r| match r.response {
            Some(response_op::Response::ResponseRange(r)) => Some(r.kvs.into_iter().next()),
            _ => None,
        });
        if t.succeeded {
            let rev = t.header.map_or(0, |h| h.revision);
            let first = ranges.next().flatten();
            return Ok(Claim {
                rev,
                existing: None,
                behind: first.is_some_and(|f| f.create_revision < rev),
            });
        }
        let existing = ranges.next().flatten();
        let first = ranges.next().flatten();
        match existing {
            Some(kv) => Ok(Claim {
                rev: kv.create_revision,
                behind: first.is_some_and(|f| f.create_revision < kv.create_revision),
                existing: Some(kv),
            }),
            // Gone between the compare and the read of one txn: cannot be.
            None => Err(Status::internal(format!(
                "key {:?} neither created nor found",
                String::from_utf8_lossy(key)
            ))),
        }
    }

    /// Puts `value` on `key` if its create revision is still `rev` (the
    /// caller still owns it); false if not.
    pub async fn put_if_owner(
        &self,
        key: &Bytes,
        rev: i64,
        value: Bytes,
        lease: i64,
    ) -> Result<(bool, Option<ResponseHeader>), Status> {
        let t = self
            .kv()
            .txn(self.request(TxnRequest {
                compare: vec![compare_create_revision(key, rev)],
                success: vec![put_op(key, value, lease)],
                failure: vec![],
            }))
            .await?
            .into_inner();
        Ok((t.succeeded, t.header))
    }

    /// Deletes `key` if its create revision is still `rev`.
    pub async fn delete_if_owner(
        &self,
        key: &Bytes,
        rev: i64,
    ) -> Result<Option<ResponseHeader>, Status> {
        let t = self
            .kv()
            .txn(self.request(TxnRequest {
                compare: vec![compare_create_revision(key, rev)],
                success: vec![delete_op(key)],
                failure: vec![],
            }))
            .await?
            .into_inner();
        Ok(t.header)
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: Bytes) -> Result<Option<ResponseHeader>, Status> {
        Ok(self
            .kv()
            .delete_range(self.request(DeleteRangeRequest {
                key,
                ..Default::default()
            }))
            .await?
            .into_inner()
            .header)
    }

    /// After a wait: is `key` still the one created at `rev` (the caller's
    /// lease may have ended meanwhile)? The read's header if so, else the
    /// error `expired`.
    pub async fn still_owned(
        &self,
        key: &Bytes,
        rev: i64,
        expired: &'static str,
    ) -> Result<Option<ResponseHeader>, Status> {
        let (kv, header) = self.get(key).await?;
        if kv.is_none_or(|kv| kv.create_revision != rev) {
            return Err(Status::unknown(expired));
        }
        Ok(header)
    }

    /// `key`'s lease and create revision, if it exists, read by a write
    /// through the log (a txn that only reads, submitted as a write), so
    /// that everything before it in the log has committed or never will.
    pub async fn read_through_log(&self, key: &Bytes) -> Result<Option<(i64, i64)>, Status> {
        let txn = crate::convert::txn_in(TxnRequest {
            success: vec![range_op(key)],
            ..Default::default()
        })?;
        match self.0.write_as(&self.1, keel_kv::Command::Txn(txn)).await? {
            keel_kv::Response::Txn(t) => Ok(t.responses.into_iter().find_map(|r| match r {
                keel_kv::ResponseOp::Range(r) => r
                    .kvs
                    .into_iter()
                    .next()
                    .map(|kv| (kv.lease, kv.create_revision as i64)),
                _ => None,
            })),
            other => Err(crate::unexpected(&other)),
        }
    }

    /// A linearizable read of `key`.
    pub async fn get(
        &self,
        key: &Bytes,
    ) -> Result<(Option<KeyValue>, Option<ResponseHeader>), Status> {
        let r = self
            .kv()
            .range(self.request(RangeRequest {
                key: key.clone(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        Ok((r.kvs.into_iter().next(), r.header))
    }

    /// The key under `prefix` with the lowest create revision (the holder
    /// or leader), if any; linearizable.
    pub async fn first(
        &self,
        prefix: &Bytes,
    ) -> Result<(Option<KeyValue>, Option<ResponseHeader>), Status> {
        self.edge(prefix, range_request::SortOrder::Ascend, 0).await
    }

    /// The key under `prefix` with the highest create revision at or below
    /// `max_create` (0: any), if any; linearizable.
    async fn edge(
        &self,
        prefix: &Bytes,
        order: range_request::SortOrder,
        max_create: i64,
    ) -> Result<(Option<KeyValue>, Option<ResponseHeader>), Status> {
        let r = self
            .kv()
            .range(self.request(RangeRequest {
                key: prefix.clone(),
                range_end: prefix_end(prefix),
                limit: 1,
                sort_order: order as i32,
                sort_target: range_request::SortTarget::Create as i32,
                max_create_revision: max_create,
                ..Default::default()
            }))
            .await?
            .into_inner();
        Ok((r.kvs.into_iter().next(), r.header))
    }

    /// Waits until no key under `prefix` was created at or below
    /// `max_create` (every contender ahead is gone). Waits for the deletion
    /// of the latest of them, then looks again, as etcd does.
    pub async fn wait_deletes(
        &self,
        prefix: &Bytes,
        max_create: i64,
    ) -> Result<Option<ResponseHeader>, Status> {
        // Subscribed before the first read, so nothing applied after it is
        // missed.
        let mut feed = self.feed();
        loop {
            let (ahead, header) = self
                .edge(prefix, range_request::SortOrder::Descend, max_create)
                .await?;
            let Some(ahead) = ahead else {
                return Ok(header);
            };
            let after = header.as_ref().map_or(0, |h| h.revision.max(0) as u64);
            feed.wait(after, |e| {
                e.kind == EventType::Delete && e.kv.key == ahead.key
            })
            .await?;
        }
    }

    /// This node's apply feed, from now on.
    pub fn feed(&self) -> Feed {
        Feed {
            rx: self.0.node.subscribe(),
            pending: VecDeque::new(),
            last: 0,
        }
    }
}

/// This node's apply feed (the KV service's events, in apply order), read
/// one event at a time: events of a notification not yet handed out wait
/// for the next call.
pub(crate) struct Feed {
    rx: Receiver<Arc<Notification>>,
    pending: VecDeque<WatchEvent>,
    /// The highest revision read from the feed so far.
    last: u64,
}

impl Feed {
    /// The first event after revision `after` (what the caller read the
    /// state at) that `wanted` accepts; `None` if the feed cannot tell what
    /// happened since (it fell behind, skipped revisions, or the state was
    /// replaced by a snapshot), after which the caller must read again.
    pub async fn wait(
        &mut self,
        after: u64,
        mut wanted: impl FnMut(&WatchEvent) -> bool,
    ) -> Result<Option<WatchEvent>, Status> {
        loop {
            while let Some(e) = self.pending.pop_front() {
                let rev = e.revision();
                let known = self.last.max(after);
                self.last = self.last.max(rev);
                if rev <= after {
                    continue;
                }
                if rev > known + 1 {
                    self.pending.clear();
                    return Ok(None);
                }
                if wanted(&e) {
                    return Ok(Some(e));
                }
            }
            match self.rx.recv().await {
                Ok(n) if n.reset => return Ok(None),
                Ok(n) => {
                    for item in &n.items {
                        match WatchEvent::decode(item) {
                            Ok(e) => self.pending.push_back(e),
                            Err(e) => {
                                tracing::error!("undecodable watch event from the KV service: {e}");
                                self.pending.clear();
                                return Ok(None);
                            }
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => return Ok(None),
                Err(RecvError::Closed) => {
                    return Err(Status::unavailable("etcdserver: server stopped"))
                }
            }
        }
    }
}

/// How a recipe's call answers an error of a request it is made of, as
/// etcd's does: etcd's recipes call its KV and Lease services through an
/// in-process client whose errors reach the caller as plain errors (gRPC
/// code Unknown, the same message). Keel keeps the codes that make clients
/// retry (the node has no leader, is busy, timed out), which etcd's turn
/// into Unknown too.
pub(crate) fn as_recipe_error(s: Status) -> Status {
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => s,
        _ => Status::unknown(s.message().to_string()),
    }
}

/// A Lock or Campaign call through this node, contending with its key.
/// If every call contending with one key through this node gives up on it
/// (its client cancelled or went away, or a Lock failed), and none kept
/// it, the key one of them made (or found behind another's; see
/// `Contender::claim`) is deleted again, as etcd's recipes delete theirs. Calls of one lease for one name share the key, so a
/// call that gives up while another still contends with it, or after
/// another came back holding it, leaves it alone; and a call that comes
/// while the key is being deleted waits for that before it claims (else it
/// could adopt the key just before it goes, and hold a lock it lost). The
/// deletion retries while the cluster cannot take it (no leader) for up to
/// `ABANDONED_DELETE_RETRY_FOR`.
pub(crate) struct Contender {
    recipes: Recipes,
    key: Bytes,
}

impl Recipes {
    /// Enters the contest for `key` (once a deletion of it is over).
    pub async fn contend(&self, key: &Bytes) -> Contender {
        loop {
            match self.0.contests.join(key) {
                Ok(()) => {
                    return Contender {
                        recipes: self.clone(),
                        key: key.clone(),
                    }
                }
                Err(mut deleting) => {
                    // Err once the deleting task is over (or gone).
                    while deleting.changed().await.is_ok() {}
                    self.0.contests.finish(key, &deleting);
                }
            }
        }
    }
}

impl Contender {
    /// Claims the key (`Recipes::claim`; `prefix` is the name's) on a task
    /// of its own, which holds a place in the contest of its own until the
    /// claim is answered: a call abandoned while its claim is in flight
    /// leaves, and the key the claim makes is deleted after all (else it
    /// stayed until its lease ended, ahead of every later contender).
    ///
    /// A key the claim finds there (made by an earlier call of the lease:
    /// through a member that went away, or one that failed) counts as made
    /// here if a key was created before it: then no call holds the lock or
    /// leads with it, and a call abandoned while it waits deletes it, as
    /// etcd's does (else it stayed, to hold the lock or lead for nobody,
    /// for as long as its lease lived, and every later contender waited
    /// for it). A found key with none before it is left alone: a call
    /// before may hold the lock with it.
    pub async fn claim(&self, prefix: &Bytes, value: Bytes, lease: i64) -> Result<Claim, Status> {
        self.recipes.0.contests.share(&self.key);
        let share = Contender {
            recipes: self.recipes.clone(),
            key: self.key.clone(),
        };
        let runtime = self.recipes.0.node.runtime().clone();
        let prefix = prefix.clone();
        let task = self.recipes.0.node.runtime().spawn(async move {
            let claim = share.recipes.claim(&prefix, &share.key, value, lease).await;
            match &claim {
                Ok(c) if c.existing.is_none() || c.behind => {
                    share.recipes.0.contests.made(&share.key, c.rev)
                }
                // The txn may be in the log and commit later (its request
                // timed out, or its leader stepped down): find out on a
                // task that keeps this place in the contest meanwhile, so
                // that a key it made is deleted if every call gives up.
                Err(e) if e.code() == Code::Unavailable => {
                    runtime.spawn(async move {
                        share.settle(lease).await;
                        drop(share);
                    });
                }
                _ => {}
            }
            claim
        });
        task.await.unwrap_or_else(|e| {
            Err(Status::unavailable(format!(
                "etcdserver: server stopped ({e})"
            )))
        })
    }

    /// After a claim whose outcome is unknown: a write through the log
    /// after it (a txn that reads the key) decides it, since once that
    /// commits the claim's txn has committed or never will. If the key is
    /// then there under `lease`, a call here may have made it: it counts as
    /// made (a key kept since is not deleted; see `Contests::leave`).
    /// Retries while the cluster cannot take the write, as the deletion of
    /// an abandoned key does.
    async fn settle(&self, lease: i64) {
        let give_up = Instant::now() + ABANDONED_DELETE_RETRY_FOR;
        let mut pause = Duration::from_millis(10);
        loop {
            let e = match self.recipes.read_through_log(&self.key).await {
                Ok(Some((key_lease, created))) if key_lease == lease => {
                    self.recipes.0.contests.made(&self.key, created);
                    return;
                }
                Ok(_) => return,
                Err(e) => e,
            };
            let retry = e.code() == Code::Unavailable
                && !self.recipes.0.node.is_stopped()
                && Instant::now() + pause < give_up;
            if !retry {
                tracing::warn!(
                    "a lock or campaign claim of {:?} failed with its outcome unknown, and \
                     finding it out failed too ({}): if it made the key, the key stays until \
                     its lease ends",
                    String::from_utf8_lossy(&self.key),
                    e.message()
                );
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(ABANDONED_DELETE_MAX_PAUSE);
        }
    }

    /// The call ends with the key its claim answered (created at `rev`)
    /// kept: it holds the lock, leads, or stays a candidate.
    pub fn keep(self, rev: i64) {
        self.recipes.0.contests.keep(&self.key, rev);
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        let Some((rev, done)) = self.recipes.0.contests.leave(&self.key) else {
            return;
        };
        let (recipes, key) = (self.recipes.clone(), self.key.clone());
        self.recipes.0.node.runtime().spawn(async move {
            recipes.delete_abandoned(&key, rev).await;
            recipes.0.contests.finish(&key, &done.subscribe());
        });
    }
}

/// How long the deletion of an abandoned call's key retries while the
/// cluster cannot take it (no leader, too busy, timed out). Calls for the
/// same key through this node wait for it meanwhile; a key it could not
/// delete stays until its lease ends (with a session that keeps its lease
/// alive, for as long as the client lives).
const ABANDONED_DELETE_RETRY_FOR: Duration = Duration::from_secs(30);
/// The longest pause between its attempts. Short, because the deletion is
/// unconditional on who else uses the key, as etcd's: a client that moved
/// on to another member with the same lease can adopt the key there once
/// a leader is back, and lose it to a retry here; the sooner the retry
/// after a leader is back, the smaller that window.
const ABANDONED_DELETE_MAX_PAUSE: Duration = Duration::from_millis(100);

impl Recipes {
    /// Deletes the key an abandoned call made, created at `rev`.
    async fn delete_abandoned(&self, key: &Bytes, rev: i64) {
        let give_up = Instant::now() + ABANDONED_DELETE_RETRY_FOR;
        let mut pause = Duration::from_millis(10);
        let mut attempts = 0u32;
        loop {
            let Err(e) = self.delete_if_owner(key, rev).await else {
                if attempts > 0 {
                    tracing::info!(
                        "removed the key {:?} of an abandoned lock or campaign after {} failed \
                         attempts",
                        String::from_utf8_lossy(key),
                        attempts
                    );
                }
                return;
            };
            attempts += 1;
            let retry = e.code() == Code::Unavailable
                && !self.0.node.is_stopped()
                && Instant::now() + pause < give_up;
            if attempts == 1 || !retry {
                tracing::warn!(
                    "removing the key {:?} of an abandoned lock or campaign: {}; {}",
                    String::from_utf8_lossy(key),
                    e.message(),
                    if retry {
                        "retrying"
                    } else {
                        "it stays until its lease ends"
                    }
                );
            }
            if !retry {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(ABANDONED_DELETE_MAX_PAUSE);
        }
    }
}

/// This node's Lock and Campaign calls by key (see `Contender`).
#[derive(Default)]
pub(crate) struct Contests(Mutex<HashMap<Bytes, Contest>>);

#[derive(Default)]
pub(crate) struct Contest {
    /// Calls contending with the key now.
    active: usize,
    /// The create revision of the key one of them made (none: they found
    /// it there).
    made: Option<i64>,
    /// The create revision of the key one of them came back with, kept.
    /// A key made later is nobody's: it replaced that one after it went.
    /// (Revisions, not a flag: a cancelled call's claim may report the key
    /// it made after a retry already adopted and kept that same key.)
    kept: Option<i64>,
    /// The deletion after they all gave up, while it runs.
    deleting: Option<watch::Receiver<()>>,
}

impl Contests {
    /// Joins the contest for `key`; or, while the key is being deleted,
    /// what to wait on before trying again.
    fn join(&self, key: &Bytes) -> Result<(), watch::Receiver<()>> {
        let mut map = self.lock();
        let c = map.entry(key.clone()).or_default();
        match &c.deleting {
            Some(rx) => Err(rx.clone()),
            None => {
                c.active += 1;
                Ok(())
            }
        }
    }

    /// One more place in the contest for `key`, taken by a call already
    /// in it (its claim in flight), so it is not being deleted.
    fn share(&self, key: &Bytes) {
        self.lock().entry(key.clone()).or_default().active += 1;
    }

    /// A call made the key, at create revision `rev`, or found it behind
    /// another's (`Contender::claim`). (A key is made only where none was:
    /// one a call kept before is gone, and this one is nobody's until a
    /// call keeps it; nor is a key found behind another anybody's.)
    fn made(&self, key: &Bytes, rev: i64) {
        if let Some(c) = self.lock().get_mut(key) {
            c.made = c.made.max(Some(rev));
        }
    }

    /// A call leaves with the key created at `rev` kept.
    fn keep(&self, key: &Bytes, rev: i64) {
        if let Some(c) = self.lock().get_mut(key) {
            c.kept = c.kept.max(Some(rev));
        }
    }

    /// A call leaves. If it was the last one, none kept the key and one
    /// made it: the create revision to delete it at, and the deletion's
    /// handle (drop it, after `finish`, when the deletion is over).
    fn leave(&self, key: &Bytes) -> Option<(i64, watch::Sender<()>)> {
        let mut map = self.lock();
        let c = map.get_mut(key)?;
        c.active = c.active.saturating_sub(1);
        if c.active > 0 {
            return None;
        }
        let Some(rev) = c.made.filter(|&m| Some(m) > c.kept) else {
            map.remove(key);
            return None;
        };
        let (done, rx) = watch::channel(());
        c.deleting = Some(rx);
        Some((rev, done))
    }

    /// The deletion `deleting` is over: forget the contest it ended.
    fn finish(&self, key: &Bytes, deleting: &watch::Receiver<()>) {
        let mut map = self.lock();
        let ended = map
            .get(key)
            .and_then(|c| c.deleting.as_ref())
            .is_some_and(|rx| rx.same_channel(deleting));
        if ended {
            map.remove(key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Bytes, Contest>> {
        // Every update leaves the map consistent, whatever panicked.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_call_to_give_up_deletes_the_key_one_of_them_made() {
        let c = Contests::default();
        let k = Bytes::from_static(b"n/1");
        // Alone: made it, gave up, deleted.
        c.join(&k).expect("join");
        c.made(&k, 5);
        let (rev, done) = c.leave(&k).expect("a deletion");
        assert_eq!(rev, 5);
        // A call that comes meanwhile waits for it.
        let deleting = c.join(&k).expect_err("wait for the deletion");
        c.finish(&k, &done.subscribe());
        drop(done);
        assert!(deleting.has_changed().is_err(), "the waiter is woken");
        c.join(&k).expect("a new contest");
        assert!(c.leave(&k).is_none(), "this one made nothing");
        assert!(c.lock().is_empty());

        // The maker gives up while an adopter still waits: kept for it.
        c.join(&k).expect("maker");
        c.made(&k, 7);
        c.join(&k).expect("adopter");
        assert!(c.leave(&k).is_none(), "the adopter still contends");
        // ... and then the adopter gives up too: deleted.
        let (rev, done) = c.leave(&k).expect("a deletion");
        assert_eq!(rev, 7);
        c.finish(&k, &done.subscribe());
        assert!(c.lock().is_empty());

        // One came back holding it: the other giving up leaves it.
        c.join(&k).expect("maker");
        c.made(&k, 9);
        c.join(&k).expect("adopter");
        c.keep(&k, 9);
        assert!(c.leave(&k).is_none());
        assert!(c.leave(&k).is_none(), "kept by the other call");
        assert!(c.lock().is_empty());

        // Kept, then released by its client while another call of the
        // contest still ran; a later call makes a new key and gives up,
        // and so does the other: the new key is nobody's, deleted.
        c.join(&k).expect("a call the server has not dropped yet");
        c.join(&k).expect("holder");
        c.made(&k, 11);
        c.keep(&k, 11);
        assert!(c.leave(&k).is_none());
        c.join(&k).expect("retry");
        c.made(&k, 20);
        assert!(c.leave(&k).is_none(), "the first call still contends");
        assert_eq!(c.leave(&k).map(|(rev, _)| rev), Some(20));

        let c = Contests::default();
        // Found there, given up: not ours to delete.
        c.join(&k).expect("adopter");
        assert!(c.leave(&k).is_none());
        assert!(c.lock().is_empty());
    }

    #[test]
    fn a_claim_in_flight_keeps_its_place_after_its_call_is_abandoned() {
        let c = Contests::default();
        let k = Bytes::from_static(b"n/3");
        c.join(&k).expect("the call");
        c.share(&k);
        assert!(c.leave(&k).is_none(), "the claim is still in flight");
        // The claim is answered: it made the key, and leaves last.
        c.made(&k, 30);
        assert_eq!(c.leave(&k).map(|(rev, _)| rev), Some(30));
        // The cancelled call's claim made the key, but reports it only
        // after a retry found, kept and left with it: still kept.
        let c = Contests::default();
        c.join(&k).expect("the cancelled call");
        c.share(&k);
        assert!(c.leave(&k).is_none());
        c.join(&k).expect("the retry");
        c.keep(&k, 40);
        assert!(c.leave(&k).is_none());
        c.made(&k, 40);
        assert!(c.leave(&k).is_none(), "the key the retry holds stays");
        assert!(c.lock().is_empty());
        // A claim answered with the key found there leaves nothing to do.
        let c = Contests::default();
        c.join(&k).expect("the call");
        c.share(&k);
        assert!(c.leave(&k).is_none());
        assert!(c.leave(&k).is_none());
        assert!(c.lock().is_empty());
    }

    #[test]
    fn a_deletion_whose_task_vanished_ends_its_contest() {
        let c = Contests::default();
        let k = Bytes::from_static(b"n/2");
        c.join(&k).expect("join");
        c.made(&k, 3);
        let (_, done) = c.leave(&k).expect("a deletion");
        let deleting = c.join(&k).expect_err("wait");
        drop(done);
        c.finish(&k, &deleting);
        c.join(&k).expect("a new contest");
    }
    use crate::test_events::event;

    use tokio::sync::broadcast;

    fn notification(events: &[WatchEvent], reset: bool) -> Arc<Notification> {
        Arc::new(Notification {
            applied: 0,
            items: events.iter().map(WatchEvent::encode).collect(),
            reset,
        })
    }

    /// Events of one notification are handed out one call at a time (a
    /// leader's proclaim and resign applied in one batch are both seen);
    /// a skipped revision, a replaced state or a lag means "read again".
    #[tokio::test]
    async fn the_feed_hands_out_every_event_and_says_when_it_cannot_tell() {
        let (tx, rx) = broadcast::channel(4);
        let mut feed = Feed {
            rx,
            pending: VecDeque::new(),
            last: 0,
        };
        let (put, del) = (EventType::Put, EventType::Delete);
        let n = |evs: &[WatchEvent]| notification(evs, false);
        tx.send(n(&[
            event(put, "x", 4),
            event(put, "e/1", 5),
            event(del, "e/1", 6),
        ]))
        .expect("send");
        let on = |e: &WatchEvent| e.kv.key == "e/1";
        let got = feed.wait(4, on).await.expect("feed").expect("the put");
        assert_eq!((got.kind, got.revision()), (put, 5));
        let got = feed.wait(5, on).await.expect("feed").expect("the delete");
        assert_eq!((got.kind, got.revision()), (del, 6));
        // Revision 7 never came: the feed cannot tell what it was.
        tx.send(n(&[event(put, "e/1", 8)])).expect("send");
        assert!(feed.wait(6, on).await.expect("feed").is_none());
        // Read again at 8: what follows is handed out again.
        tx.send(n(&[event(del, "e/1", 9)])).expect("send");
        assert_eq!(
            feed.wait(8, on).await.expect("feed").map(|e| e.revision()),
            Some(9)
        );
        // Events at or before the caller's read are skipped, not gaps.
        tx.send(n(&[event(put, "e/1", 9), event(put, "e/1", 10)]))
            .expect("send");
        assert_eq!(
            feed.wait(9, on).await.expect("feed").map(|e| e.revision()),
            Some(10)
        );
        tx.send(notification(&[], true)).expect("send");
        assert!(
            feed.wait(10, on).await.expect("feed").is_none(),
            "a snapshot replaced the state"
        );
        for i in 0..6 {
            tx.send(n(&[event(put, "e/1", 11 + i)])).expect("send");
        }
        assert!(
            feed.wait(10, on).await.expect("feed").is_none(),
            "the feed lagged"
        );
        drop(tx);
        assert!(feed.wait(20, on).await.is_err(), "the node stopped");
    }

    #[test]
    fn keys_and_prefixes_are_etcds() {
        assert_eq!(
            &key_of(b"my-lock", 0x694d_77f3_1d2c_9a01)[..],
            b"my-lock/694d77f31d2c9a01"
        );
        assert_eq!(&key_of(b"l", -5)[..], b"l/-5", "as Go's %x writes an int64");
        assert_eq!(&prefix_of(b"e")[..], b"e/");
        assert_eq!(&prefix_end(b"e/")[..], b"e0");
        assert_eq!(&prefix_end(b"a\xff")[..], b"b");
        assert_eq!(&prefix_end(b"\xff\xff")[..], b"\0");
    }
}
