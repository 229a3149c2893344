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
//! cancelled it or went away) deletes its key again, as etcd's does.

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
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::broadcast::{error::RecvError, Receiver};
use tonic::{Code, Request, Status};

/// etcd's default session TTL, for a contender that names no lease.
const DEFAULT_SESSION_TTL: i64 = 60;

/// What `claim` found or made.
pub(crate) struct Claim {
    /// The contender's key's create revision.
    pub rev: i64,
    /// The key was there already (the same lease contended before).
    pub existing: Option<KeyValue>,
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

/// The KV and Lease requests the recipes are made of.
#[derive(Clone)]
pub(crate) struct Recipes(pub Arc<Api>);

impl Recipes {
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
            .lease_grant(Request::new(LeaseGrantRequest {
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

    /// Creates `key` with `value` under `lease` unless it exists.
    pub async fn claim(&self, key: &Bytes, value: Bytes, lease: i64) -> Result<Claim, Status> {
        let t = self
            .kv()
            .txn(Request::new(TxnRequest {
                compare: vec![compare_create_revision(key, 0)],
                success: vec![put_op(key, value, lease)],
                failure: vec![range_op(key)],
            }))
            .await?
            .into_inner();
        if t.succeeded {
            return Ok(Claim {
                rev: t.header.map_or(0, |h| h.revision),
                existing: None,
            });
        }
        let existing = t.responses.into_iter().find_map(|r| match r.response {
            Some(response_op::Response::ResponseRange(r)) => r.kvs.into_iter().next(),
            _ => None,
        });
        match existing {
            Some(kv) => Ok(Claim {
                rev: kv.create_revision,
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
            .txn(Request::new(TxnRequest {
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
            .txn(Request::new(TxnRequest {
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
            .delete_range(Request::new(DeleteRangeRequest {
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

    /// A linearizable read of `key`.
    pub async fn get(
        &self,
        key: &Bytes,
    ) -> Result<(Option<KeyValue>, Option<ResponseHeader>), Status> {
        let r = self
            .kv()
            .range(Request::new(RangeRequest {
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
            .range(Request::new(RangeRequest {
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

/// Deletes a contender's key if the call that made it is dropped before
/// `disarm` (the client cancelled it or went away while it waited).
pub(crate) struct Abandon {
    recipes: Recipes,
    key: Bytes,
    rev: i64,
    armed: bool,
}

impl Abandon {
    pub fn new(recipes: &Recipes, key: &Bytes, rev: i64) -> Abandon {
        Abandon {
            recipes: recipes.clone(),
            key: key.clone(),
            rev,
            armed: true,
        }
    }

    pub fn disarm(mut self) {
        self.armed = false;
    }

    /// Guards the key a claim made; a key that was there already (the same
    /// lease contending again) belongs to the call that made it, and is
    /// left alone.
    pub fn claimed(recipes: &Recipes, key: &Bytes, claim: &Claim) -> Abandon {
        let mut a = Abandon::new(recipes, key, claim.rev);
        a.armed = claim.existing.is_none();
        a
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (recipes, key, rev) = (self.recipes.clone(), self.key.clone(), self.rev);
        self.recipes.0.node.runtime().spawn(async move {
            if let Err(e) = recipes.delete_if_owner(&key, rev).await {
                tracing::warn!(
                    "removing the key {:?} of an abandoned lock or campaign: {e}",
                    String::from_utf8_lossy(&key)
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
