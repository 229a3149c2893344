//! etcd's Election service (`v3electionpb.Election`): Campaign waits until
//! the caller leads the named election and answers its leader key (name,
//! key, create revision, lease); Proclaim replaces the leader's value while
//! the caller still leads; Leader answers the current leader's key and
//! value; Observe streams them as they change, leader after leader; Resign
//! deletes the leader key. See `recipes` for how candidates queue.

use crate::convert::kv_out;
use crate::recipes::{as_recipe_error, key_of, prefix_of, Recipes};
use bytes::Bytes;
use keel_etcd_proto::mvccpb::KeyValue;
use keel_etcd_proto::v3electionpb::election_server::Election;
use keel_etcd_proto::v3electionpb::*;
use keel_kv::EventType;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

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
async fn observe(r: Recipes, prefix: Bytes, out: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let gone = out.clone();
    tokio::select! {
        _ = gone.closed() => {}
        () = follow(r, prefix, out) => {}
    }
}

async fn follow(r: Recipes, prefix: Bytes, out: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let mut sent: Option<KeyValue> = None;
    // Subscribed before the first read, so nothing applied after it is
    // missed.
    let mut feed = r.feed();
    let result: Result<(), Status> = async {
        loop {
            let (leader, header) = r.first(&prefix).await?;
            let mut after = header.as_ref().map_or(0, |h| h.revision.max(0) as u64);
            let Some(mut leader) = leader else {
                // No leader: wait for a candidate, then look again.
                feed.wait(after, |e| {
                    e.kind == EventType::Put && e.kv.key.starts_with(&prefix)
                })
                .await?;
                continue;
            };
            // Follow this leader's key until it is deleted (or the feed
            // cannot tell), sending each new value.
            loop {
                if sent.as_ref() != Some(&leader) {
                    let resp = LeaderResponse {
                        header: r.header(leader.mod_revision.max(after as i64)),
                        kv: Some(leader.clone()),
                    };
                    if out.send(Ok(resp)).await.is_err() {
                        return Ok(());
                    }
                    sent = Some(leader.clone());
                }
                let key = leader.key.clone();
                match feed.wait(after, |e| e.kv.key == key).await? {
                    Some(e) if e.kind == EventType::Put => {
                        after = e.revision();
                        leader = kv_out(e.kv);
                    }
                    // Deleted, or the feed cannot tell: find the leader again.
                    _ => break,
                }
            }
        }
    }
    .await;
    if let Err(status) = result {
        let _ = out.send(Err(as_recipe_error(status))).await;
    }
}

#[tonic::async_trait]
impl Election for ElectionApi {
    async fn campaign(
        &self,
        r: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        async {
            let r = r.into_inner();
            let lease = self.0.lease_or_grant(r.lease).await?;
            let key = key_of(&r.name, lease);
            let prefix = prefix_of(&r.name);
            let contender = self.0.contend(&key).await;
            let claim = contender.claim(&prefix, r.value.clone(), lease).await?;
            if claim
                .existing
                .as_ref()
                .is_some_and(|kv| kv.value != r.value)
            {
                // Campaigning again under the same lease proclaims the value.
                let (owner, _) = self
                    .0
                    .put_if_owner(&key, claim.rev, r.value.clone(), lease)
                    .await?;
                if !owner {
                    return Err(Status::unknown(NOT_LEADER));
                }
            }
            // A call that fails while it waits stays a candidate (as
            // etcd's does); only one abandoned by its client resigns.
            let waited = self.0.wait_deletes(&prefix, claim.rev - 1).await;
            if let Err(e) = waited {
                contender.keep(claim.rev);
                return Err(e);
            }
            // Won: the key is kept from here on, so a failure of the read
            // below (no leader for a moment) leaves a candidate too.
            contender.keep(claim.rev);
            let header = self.0.still_owned(&key, claim.rev, SESSION_EXPIRED).await?;
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
        async {
            let r = r.into_inner();
            let l = leader_key(r.leader)?;
            // A leader key without a lease gets a new one, as etcd's
            // session does (never none: the key would outlive its leader).
            let lease = self.0.lease_or_grant(l.lease).await?;
            let (owner, header) = self.0.put_if_owner(&l.key, l.rev, r.value, lease).await?;
            if !owner {
                return Err(Status::unknown(NOT_LEADER));
            }
            Ok(Response::new(ProclaimResponse { header }))
        }
        .await
        .map_err(as_recipe_error)
    }

    async fn leader(&self, r: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        async {
            let prefix = prefix_of(&r.into_inner().name);
            match self.0.first(&prefix).await? {
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
        let prefix = prefix_of(&r.into_inner().name);
        let (tx, rx) = mpsc::channel(16);
        self.0
             .0
            .node
            .runtime()
            .spawn(observe(self.0.clone(), prefix, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(&self, r: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        async {
            let l = leader_key(r.into_inner().leader)?;
            let header = self.0.delete_if_owner(&l.key, l.rev).await?;
            Ok(Response::new(ResignResponse { header }))
        }
        .await
        .map_err(as_recipe_error)
    }
}
