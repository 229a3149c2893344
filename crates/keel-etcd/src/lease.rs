//! etcd's Lease service: grant, revoke (deleting the attached keys), the
//! keep-alive stream, time-to-live (with keys) and the lease list. Grants,
//! revocations and renewals are log entries; expiry is driven by
//! leader-stamped log time (a timer entry), so every replica agrees.

use crate::{unexpected, Api};
use keel_etcd_proto::etcdserverpb::lease_server::Lease;
use keel_etcd_proto::etcdserverpb::*;
use keel_kv::{Command, Query, Response as KvResponse};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

pub struct LeaseApi(pub Arc<Api>);

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

/// Renews one lease; `Ok(None)` if it does not exist (etcd answers TTL 0).
async fn renew(api: &Api, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
    match api.write(&Command::LeaseKeepAlive { id }).await {
        Ok(KvResponse::LeaseKeepAlive { revision, id, ttl }) => Ok(LeaseKeepAliveResponse {
            header: api.header(revision as i64),
            id,
            ttl,
        }),
        Ok(other) => Err(unexpected(&other)),
        Err(s) if s.code() == Code::NotFound => Ok(LeaseKeepAliveResponse {
            header: api.header(crate::kv::current_revision(api).await.unwrap_or(0)),
            id,
            ttl: 0,
        }),
        Err(s) => Err(s),
    }
}

#[tonic::async_trait]
impl Lease for LeaseApi {
    async fn lease_grant(
        &self,
        r: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let r = r.into_inner();
        match self
            .0
            .write(&Command::LeaseGrant {
                id: r.id,
                ttl: r.ttl,
            })
            .await?
        {
            KvResponse::LeaseGrant { revision, id, ttl } => Ok(Response::new(LeaseGrantResponse {
                header: self.0.header(revision as i64),
                id,
                ttl,
                error: String::new(),
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn lease_revoke(
        &self,
        r: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let id = r.into_inner().id;
        match self.0.write(&Command::LeaseRevoke { id }).await? {
            KvResponse::LeaseRevoke { revision } => Ok(Response::new(LeaseRevokeResponse {
                header: self.0.header(revision as i64),
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn lease_keep_alive(
        &self,
        r: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        Ok(Response::new(keep_alive(
            self.0.clone(),
            Box::pin(r.into_inner()),
        )))
    }

    async fn lease_time_to_live(
        &self,
        r: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let r = r.into_inner();
        let q = Query::LeaseTimeToLive {
            id: r.id,
            keys: r.keys,
            // Log time is the leader's wall clock (clamped to never go
            // back), so this node's wall clock approximates it.
            now: keel_node::runtime::wall_clock_ns(),
        };
        match self.0.read(&q, false).await {
            Ok(KvResponse::LeaseTimeToLive {
                revision,
                id,
                ttl,
                granted_ttl,
                keys,
            }) => Ok(Response::new(LeaseTimeToLiveResponse {
                header: self.0.header(revision as i64),
                id,
                ttl,
                granted_ttl,
                keys,
            })),
            Ok(other) => Err(unexpected(&other)),
            // etcd answers a missing lease with TTL -1, not an error.
            Err(s) if s.code() == Code::NotFound => Ok(Response::new(LeaseTimeToLiveResponse {
                header: self
                    .0
                    .header(crate::kv::current_revision(&self.0).await.unwrap_or(0)),
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            })),
            Err(s) => Err(s),
        }
    }

    async fn lease_leases(
        &self,
        _r: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        match self.0.read(&Query::Leases, false).await? {
            KvResponse::Leases { revision, ids } => Ok(Response::new(LeaseLeasesResponse {
                header: self.0.header(revision as i64),
                leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
            })),
            other => Err(unexpected(&other)),
        }
    }
}

/// A keep-alive stream's requests: a gRPC stream, or the gateway's body.
pub(crate) type KeepAliveRequests =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send>>;

/// Renews each requested lease in turn, answering each; ends at the first
/// failure or when the requests end.
pub(crate) fn keep_alive(api: Arc<Api>, mut requests: KeepAliveRequests) -> KeepAliveStream {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(req) = requests.next().await {
            let answer = match req {
                Ok(req) => renew(&api, req.id).await,
                Err(e) => {
                    tracing::debug!("lease keep-alive stream closed: {e}");
                    return;
                }
            };
            let stop = answer.is_err();
            if tx.send(answer).await.is_err() || stop {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
