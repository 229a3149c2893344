//! etcd's Lease service: grant, revoke (deleting the attached keys), the
//! keep-alive stream, time-to-live (with keys) and the lease list. Grants,
//! revocations and renewals are log entries; expiry is driven by
//! leader-stamped log time (a timer entry), so every replica agrees.
//!
//! As in etcd, the leader answers every time-to-live (a follower passes the
//! request on, over one connection it keeps): log time is the leader's
//! clock, and a follower's own clock may be anywhere. The leader answers
//! from its log clock (`NodeHandle::log_time`), which its lease timers fire on, not
//! from its wall clock, which may have been stepped since it started. A renewal or time-to-live that finds no leader (an
//! election, a leadership transfer) is retried until the request timeout,
//! as etcd's `LeaseRenew` and `LeaseTimeToLive` do, so a keep-alive stream
//! lives through a leader change instead of failing.

use crate::auth::Who;
use crate::{forwarded, is_forwarded, unexpected, Api};
use keel_etcd_proto::etcdserverpb::lease_client::LeaseClient;
use keel_etcd_proto::etcdserverpb::lease_server::Lease;
use keel_etcd_proto::etcdserverpb::*;
use keel_kv::AuthStore;
use keel_kv::{Command, Query, Response as KvResponse};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

pub struct LeaseApi(pub Arc<Api>);

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

/// The pause between tries of a call that found no leader (etcd's
/// throttle in its renewal loop).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Runs `attempt` until it succeeds or fails with something other than
/// Unavailable (no leader, leader changed, busy with a transfer...), or
/// until `timeout` has passed since the first try: then its last error.
async fn retry_unavailable<T, F, Fut>(timeout: Duration, mut attempt: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Err(s) if s.code() == Code::Unavailable && start.elapsed() + RETRY_PAUSE < timeout => {
                tracing::debug!("lease call retried: {s}");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Renews one lease: its TTL, or TTL 0 if it does not exist (as etcd).
async fn renew(api: &Api, who: &Who, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
    let write = || api.write_as(who, Command::LeaseKeepAlive { id });
    match retry_unavailable(api.config.request_timeout, write).await {
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

/// Who answers a time-to-live at this member.
enum TtlBy {
    /// This member: it leads (or the leader has no etcd address here).
    Here,
    /// The leader, through its etcd API.
    Leader(u64),
}

impl LeaseApi {
    fn ttl_by(&self, passed_on: bool) -> Result<TtlBy, Status> {
        let st = self.0.node.status();
        if st.role == "leader" {
            return Ok(TtlBy::Here);
        }
        if passed_on {
            // Sent here as to the leader, which this member no longer is:
            // the sender asks again.
            return Err(Status::unavailable("etcdserver: leader changed"));
        }
        let Some(leader) = st.leader else {
            return Err(Status::unavailable("etcdserver: no leader"));
        };
        let reachable = self
            .0
            .config
            .members
            .iter()
            .any(|m| m.id == leader && !m.client_urls.is_empty());
        // Without the leader's etcd address, this member's clock is the
        // best estimate of the leader's there is.
        Ok(if reachable {
            TtlBy::Leader(leader)
        } else {
            TtlBy::Here
        })
    }

    /// One try at a time-to-live: by the leader, or here if this member
    /// leads.
    async fn time_to_live_once(
        &self,
        who: &Who,
        r: &LeaseTimeToLiveRequest,
        passed_on: bool,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        match self.ttl_by(passed_on)? {
            TtlBy::Leader(leader) => {
                let channel = self.0.member_channel(leader, "the leader").await?;
                let mut req = forwarded(*r);
                who.pass_on(&mut req);
                let mut resp = LeaseClient::new(channel)
                    .lease_time_to_live(req)
                    .await
                    .inspect_err(|e| self.0.forget_channel(leader, e))?
                    .into_inner();
                // This member's header, as etcd fills it in; the leader's
                // revision is no older than this member's.
                let revision = resp.header.map_or(0, |h| h.revision);
                resp.header = self.0.header(revision);
                Ok(resp)
            }
            TtlBy::Here => self.time_to_live_here(who, r).await,
        }
    }

    async fn time_to_live_here(
        &self,
        who: &Who,
        r: &LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        let leads = self.0.node.status().role == "leader";
        let q = Query::LeaseTimeToLive {
            id: r.id,
            keys: r.keys,
            // The leader answers from the clock its log time and lease
            // timers follow, not its wall clock, which may have been
            // stepped since start (an hour ahead: every lease "expired"
            // while it lives on). Log time is that clock clamped never to
            // go back; the clamp holds it only at the last entry's time,
            // and every lease expires later than that (each term-start
            // entry gives every lease its TTL again from its time).
            now: if leads {
                self.0.node.log_time()
            } else {
                // A member that cannot ask the leader: its wall clock is
                // the best estimate of the leader's log clock it has.
                keel_node::runtime::wall_clock_ns()
            },
        };
        // Its keys' names only to a caller who may read them all.
        match self.0.read_as(who, q, false).await {
            Ok(KvResponse::LeaseTimeToLive {
                revision,
                id,
                ttl,
                granted_ttl,
                keys,
            }) => Ok(LeaseTimeToLiveResponse {
                header: self.0.header(revision as i64),
                id,
                ttl,
                granted_ttl,
                keys,
            }),
            Ok(other) => Err(unexpected(&other)),
            // etcd answers a missing lease with TTL -1, not an error.
            Err(s) if s.code() == Code::NotFound => Ok(LeaseTimeToLiveResponse {
                header: self
                    .0
                    .header(crate::kv::current_revision(&self.0).await.unwrap_or(0)),
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            }),
            Err(s) => Err(s),
        }
    }
}

#[tonic::async_trait]
impl Lease for LeaseApi {
    async fn lease_grant(
        &self,
        r: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let who = self.0.who(&r).await?;
        let r = r.into_inner();
        match self
            .0
            .write_as(
                &who,
                Command::LeaseGrant {
                    id: r.id,
                    ttl: r.ttl,
                },
            )
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
        let who = self.0.who(&r).await?;
        let id = r.into_inner().id;
        match self.0.write_as(&who, Command::LeaseRevoke { id }).await? {
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
        let who = self.0.who(&r).await?;
        Ok(Response::new(keep_alive(
            self.0.clone(),
            who,
            Box::pin(r.into_inner()),
        )))
    }

    async fn lease_time_to_live(
        &self,
        r: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let who = self.0.who(&r).await?;
        self.0.check(&who, AuthStore::check_user)?;
        let passed_on = is_forwarded(&r);
        let r = r.into_inner();
        if passed_on {
            // The member that passed it on retries.
            return self
                .time_to_live_once(&who, &r, true)
                .await
                .map(Response::new);
        }
        let attempt = || self.time_to_live_once(&who, &r, false);
        retry_unavailable(self.0.config.request_timeout, attempt)
            .await
            .map(Response::new)
    }

    async fn lease_leases(
        &self,
        r: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let who = self.0.who(&r).await?;
        match self.0.read_as(&who, Query::Leases, false).await? {
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
pub(crate) fn keep_alive(
    api: Arc<Api>,
    who: Who,
    mut requests: KeepAliveRequests,
) -> KeepAliveStream {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(req) = requests.next().await {
            let answer = match req {
                Ok(req) => renew(&api, &who, req.id).await,
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
