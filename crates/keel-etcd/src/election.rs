//! etcd's Election service (`v3electionpb.Election`): Campaign waits until
//! the caller leads the named election and answers its leader key (name,
//! key, create revision, lease); Proclaim replaces the leader's value while
//! the caller still leads; Leader answers the current leader's key and
//! value; Observe streams them as they change, leader after leader; Resign
//! deletes the leader key. See `recipes` for how candidates queue.

use crate::auth::{check_recipe, prefix_end, Who};
use crate::convert::kv_out;
use crate::recipes::{as_recipe_error, key_of, prefix_of, Recipes};
use bytes::Bytes;
use keel_etcd_proto::mvccpb::KeyValue;
use keel_etcd_proto::v3electionpb::election_server::Election;
use keel_etcd_proto::v3electionpb::*;
use keel_kv::Access;
use keel_kv::{EventType, Query, Response as KvResponse, WatchEvent};
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

pub struct ElectionApi(pub(crate) Recipes);

/// etcd's answers (plain errors, so gRPC code Unknown, as etcd's are).
pub const NOT_LEADER: &str = "election: not leader";
pub const NO_LEADER: &str = "election: no leader";
pub const SESSION_EXPIRED: &str = "election: session expired";
pub const MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

fn leader_key(l: Option<LeaderKey>) -> Result<LeaderKey, Status> {
    l.ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))
}

/// Sends the leader's key and value each time it changes, leader after
/// leader, until the client goes away.
///
/// As etcd's (`concurrency.Election.Observe`, a watch on the leader's key
/// from the revision it was read at): every value the leader's key takes
/// is sent, in order, however slowly the client reads; when that key is
/// deleted the leader is looked up again (so leaders that came and went
/// meanwhile are not seen, as in etcd). An observer that fell so far
/// behind that this node's feed dropped events for it reads the key's
/// values from the retained history instead; if that history was compacted
/// away, the stream ends (etcd's watch is canceled then, and its Observe
/// ends without an error).
async fn observe(r: Recipes, prefix: Bytes, out: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let gone = out.clone();
    tokio::select! {
        _ = gone.closed() => {}
        () = follow(r, prefix, out) => {}
    }
}

/// How many of the leader key's past events one history read takes.
const HISTORY_BATCH: u64 = 1000;

/// What happened to `key` after revision `after`, from this node's retained
/// history: its events in order, up to and including a deletion if there
/// was one, and the revision the history was read up to; `None` if it was
/// compacted away.
async fn history(
    r: &Recipes,
    key: &Bytes,
    after: u64,
) -> Result<Option<(Vec<WatchEvent>, u64)>, Status> {
    let mut found = Vec::new();
    let mut from = after + 1;
    loop {
        let q = Query::Events {
            start: key.clone(),
            end: Bytes::new(),
            from_revision: from,
            limit: HISTORY_BATCH,
        };
        let (revision, events, more) = match r.0.read(&q, true).await {
            Ok(KvResponse::Events {
                revision,
                events,
                more,
                ..
            }) => (revision, events, more),
            Ok(other) => return Err(crate::unexpected(&other)),
            Err(s) if s.code() == Code::OutOfRange => return Ok(None),
            Err(s) => return Err(s),
        };
        for e in events {
            let deleted = e.kind == EventType::Delete;
            found.push(e);
            if deleted {
                let upto = found.last().map_or(revision, WatchEvent::revision);
                return Ok(Some((found, upto)));
            }
        }
        match more {
            Some(next) => from = from.max(next),
            None => return Ok(Some((found, revision.max(after)))),
        }
    }
}

async fn follow(r: Recipes, prefix: Bytes, out: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let mut sent: Option<KeyValue> = None;
    // Subscribed before the first read, so nothing applied after it is
    // missed.
    let mut feed = r.feed();
    // Sends `kv` (read at revision `at`) unless it was the last sent;
    // false once the client is gone.
    let send = |kv: &KeyValue, at: u64, sent: &mut Option<KeyValue>| {
        let fresh = sent.as_ref() != Some(kv);
        let resp = LeaderResponse {
            header: r.header(kv.mod_revision.max(at as i64)),
            kv: Some(kv.clone()),
        };
        if fresh {
            *sent = Some(kv.clone());
        }
        let out = out.clone();
        async move { !fresh || out.send(Ok(resp)).await.is_ok() }
    };
    let result: Result<(), Status> = async {
        loop {
            let (leader, header) = r.first(&prefix).await?;
            let mut after = header.as_ref().map_or(0, |h| h.revision.max(0) as u64);
            let Some(leader) = leader else {
                // No leader: wait for a candidate, then look again.
                feed.wait(after, |e| {
                    e.kind == EventType::Put && e.kv.key.starts_with(&prefix)
                })
                .await?;
                continue;
            };
            if !send(&leader, after, &mut sent).await {
                return Ok(());
            }
            // Follow this leader's key until it is deleted, sending each
            // new value.
            let key = leader.key.clone();
            loop {
                match feed.wait(after, |e| e.kv.key == key).await? {
                    Some(e) if e.kind == EventType::Put => {
                        after = e.revision();
                        if !send(&kv_out(e.kv), after, &mut sent).await {
                            return Ok(());
                        }
                    }
                    // Deleted: find the leader again.
                    Some(_) => break,
                    // The feed cannot tell (it fell behind, or the state
                    // was replaced by a snapshot): the key's history can.
                    None => {
                        let Some((events, upto)) = history(&r, &key, after).await? else {
                            tracing::debug!(
                                "election observer ends: the history of {key:?} after \
                                 revision {after} was compacted"
                            );
                            return Ok(());
                        };
                        let mut deleted = false;
                        for e in events {
                            if e.kind != EventType::Put {
                                deleted = true;
                                break;
                            }
                            let at = e.revision();
                            if !send(&kv_out(e.kv), at, &mut sent).await {
                                return Ok(());
                            }
                        }
                        if deleted {
                            break;
                        }
                        after = upto;
                    }
                }
            }
        }
    }
    .await;
    if let Err(status) = result {
        let _ = out.send(Err(as_recipe_error(status))).await;
    }
}

impl ElectionApi {
    /// `who` may read every key under `prefix` (`auth`).
    fn read_prefix(&self, who: &Who, prefix: &[u8]) -> Result<(), Status> {
        let end = prefix_end(prefix);
        self.0 .0.check(who, |v, user| {
            v.check_range(user, Access::Read, prefix, &end)
        })
    }

    /// `who` may write `key`, a leader's key (`auth`).
    fn write_key(&self, who: &Who, key: &[u8]) -> Result<(), Status> {
        self.0
             .0
            .check(who, |v, user| v.check_range(user, Access::Write, key, &[]))
    }
}

#[tonic::async_trait]
impl Election for ElectionApi {
    async fn campaign(
        &self,
        r: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let who = self.0 .0.who(&r).await?;
        let rec = self.0.as_caller(&who);
        check_recipe(&self.0 .0, &who, &prefix_of(&r.get_ref().name))?;
        async {
            let r = r.into_inner();
            let lease = rec.lease_or_grant(r.lease).await?;
            let key = key_of(&r.name, lease);
            let prefix = prefix_of(&r.name);
            let contender = rec.contend(&key).await;
            let claim = contender.claim(&prefix, r.value.clone(), lease).await?;
            if claim
                .existing
                .as_ref()
                .is_some_and(|kv| kv.value != r.value)
            {
                // Campaigning again under the same lease proclaims the value.
                let (owner, _) = rec
                    .put_if_owner(&key, claim.rev, r.value.clone(), lease)
                    .await?;
                if !owner {
                    return Err(Status::unknown(NOT_LEADER));
                }
            }
            // A call that fails while it waits stays a candidate (as
            // etcd's does); only one abandoned by its client resigns.
            let waited = rec.wait_deletes(&prefix, claim.rev - 1).await;
            if let Err(e) = waited {
                contender.keep(claim.rev);
                return Err(e);
            }
            // Won: the key is kept from here on, so a failure of the read
            // below (no leader for a moment) leaves a candidate too.
            contender.keep(claim.rev);
            let header = rec.still_owned(&key, claim.rev, SESSION_EXPIRED).await?;
            Ok(Response::new(CampaignResponse {
                header,
                leader: Some(LeaderKey {
                    name: r.name,
                    key,
                    rev: claim.rev,
                    lease,
                }),
            }))
        }
        .await
        .map_err(as_recipe_error)
    }

    async fn proclaim(
        &self,
        r: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let who = self.0 .0.who(&r).await?;
        let rec = self.0.as_caller(&who);
        async {
            let r = r.into_inner();
            let l = leader_key(r.leader)?;
            self.write_key(&who, &l.key)?;
            // A leader key without a lease gets a new one, as etcd's
            // session does (never none: the key would outlive its leader).
            let lease = rec.lease_or_grant(l.lease).await?;
            let (owner, header) = rec.put_if_owner(&l.key, l.rev, r.value, lease).await?;
            if !owner {
                return Err(Status::unknown(NOT_LEADER));
            }
            Ok(Response::new(ProclaimResponse { header }))
        }
        .await
        .map_err(as_recipe_error)
    }

    async fn leader(&self, r: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let who = self.0 .0.who(&r).await?;
        let rec = self.0.as_caller(&who);
        async {
            let prefix = prefix_of(&r.into_inner().name);
            self.read_prefix(&who, &prefix)?;
            match rec.first(&prefix).await? {
                (Some(kv), header) => Ok(Response::new(LeaderResponse {
                    header,
                    kv: Some(kv),
                })),
                (None, _) => Err(Status::unknown(NO_LEADER)),
            }
        }
        .await
        .map_err(as_recipe_error)
    }

    async fn observe(&self, r: Request<LeaderRequest>) -> Result<Response<ObserveStream>, Status> {
        let who = self.0 .0.who(&r).await?;
        let rec = self.0.as_caller(&who);
        let prefix = prefix_of(&r.into_inner().name);
        self.read_prefix(&who, &prefix)?;
        let (tx, rx) = mpsc::channel(16);
        self.0 .0.node.runtime().spawn(observe(rec, prefix, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(&self, r: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let who = self.0 .0.who(&r).await?;
        let rec = self.0.as_caller(&who);
        async {
            let l = leader_key(r.into_inner().leader)?;
            self.write_key(&who, &l.key)?;
            let header = rec.delete_if_owner(&l.key, l.rev).await?;
            Ok(Response::new(ResignResponse { header }))
        }
        .await
        .map_err(as_recipe_error)
    }
}
