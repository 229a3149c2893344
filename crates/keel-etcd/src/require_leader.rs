//! etcd's "require leader" calls: a gRPC call whose metadata says
//! `hasleader: true` (clientv3's `WithRequireLeader`, which etcdctl's
//! `watch` and Kubernetes' watches use) must not be served by a member
//! that knows no leader, because what it would serve may be stale: a member
//! cut off from the rest keeps its watches open but sees no more writes.
//!
//! As in etcd, a layer around the port:
//!
//! - refuses such a call at once when this member knows no leader:
//!   Unavailable, "etcdserver: no leader";
//! - ends such a call's stream with that status once the member has known
//!   no leader at three checks in a row, one per election timeout (etcd's
//!   `monitorLeader`: streams are dearer to reopen than calls are to
//!   refuse, so a short election does not end them). The client then
//!   reconnects, typically to another member.
//!
//! Calls without the flag go straight through, at the cost of a header
//! lookup.

use crate::Api;
use axum::http::{header, Request, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::Status;

/// The metadata key and value of a call that requires a leader (etcd's
/// `rpctypes.MetadataRequireLeaderKey` and `MetadataHasLeader`).
const REQUIRE_LEADER_KEY: &str = "hasleader";
const HAS_LEADER: &[u8] = b"true";

/// Checks without a leader after which a stream is ended (etcd's
/// `maxNoLeaderCnt`).
const MAX_NO_LEADER_CHECKS: u32 = 3;

/// etcd's `ErrGRPCNoLeader`.
fn no_leader() -> Status {
    Status::unavailable("etcdserver: no leader")
}

/// Puts `RequireLeader` around a service (`tonic::transport::Server::layer`).
#[derive(Clone)]
pub struct RequireLeaderLayer(pub Arc<Api>);

impl<S> tower_layer::Layer<S> for RequireLeaderLayer {
    type Service = RequireLeader<S>;
    fn layer(&self, inner: S) -> RequireLeader<S> {
        RequireLeader {
            inner,
            api: self.0.clone(),
        }
    }
}

/// The service `inner` behind the leader requirement (see the module docs).
#[derive(Clone)]
pub struct RequireLeader<S> {
    inner: S,
    api: Arc<Api>,
}

/// Does this request ask to be served only while there is a leader? Only
/// gRPC calls can: the flag is gRPC metadata.
fn requires_leader<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    headers
        .get(REQUIRE_LEADER_KEY)
        .is_some_and(|v| v.as_bytes() == HAS_LEADER)
        && headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"))
}

impl<S, B> tower_service::Service<Request<B>> for RequireLeader<S>
where
    S: tower_service::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Watched<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !requires_leader(&req) {
            return Watched::Through {
                inner: self.inner.call(req),
            };
        }
        if self.api.node.status().leader.is_none() {
            return Watched::Answered {
                answer: Some(no_leader().into_http()),
            };
        }
        Watched::Monitored {
            inner: self.inner.call(req),
            api: Some(self.api.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a `RequireLeader`.
    #[project = WatchedProj]
    pub enum Watched<F> {
        /// The inner service's, as it is.
        Through { #[pin] inner: F },
        /// The inner service's, its body ended if the leader is gone for
        /// long.
        Monitored { #[pin] inner: F, api: Option<Arc<Api>> },
        /// Refused: no leader.
        Answered { answer: Option<Response<Body>> },
    }
}

impl<F> Future for Watched<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            WatchedProj::Through { inner } => inner.poll(cx),
            WatchedProj::Monitored { inner, api } => {
                let Ok(resp) = ready!(inner.poll(cx));
                let api = api.take().expect("an answer is polled to its end once");
                let every = api.config.election_timeout;
                Poll::Ready(Ok(
                    resp.map(|body| Body::new(LeaderMonitored::new(body, api, every)))
                ))
            }
            WatchedProj::Answered { answer } => Poll::Ready(Ok(answer
                .take()
                .expect("an answer is polled to its end once"))),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends with `no_leader()` once the member has
    /// known no leader at `MAX_NO_LEADER_CHECKS` checks in a row.
    struct LeaderMonitored {
        #[pin]
        inner: Body,
        api: Arc<Api>,
        checks: tokio::time::Interval,
        without_leader: u32,
        // The no-leader trailers went out (or the inner body ended).
        done: bool,
    }
}

impl LeaderMonitored {
    fn new(inner: Body, api: Arc<Api>, every: Duration) -> LeaderMonitored {
        let every = every.max(Duration::from_millis(1));
        let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        LeaderMonitored {
            inner,
            api,
            checks,
            without_leader: 0,
            done: false,
        }
    }
}

impl HttpBody for LeaderMonitored {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        while this.checks.poll_tick(cx).is_ready() {
            if this.api.node.status().leader.is_some() {
                *this.without_leader = 0;
                continue;
            }
            *this.without_leader += 1;
            if *this.without_leader >= MAX_NO_LEADER_CHECKS {
                *this.done = true;
                // The inner body (and with it the call's work, which sees
                // its output dropped) ends when this body is dropped.
                let mut trailers = axum::http::HeaderMap::new();
                return Poll::Ready(Some(
                    no_leader()
                        .add_header(&mut trailers)
                        .map(|()| Frame::trailers(trailers)),
                ));
            }
        }
        let frame = ready!(this.inner.poll_frame(cx));
        // After the inner body's end or trailers nothing more may follow.
        if !matches!(&frame, Some(Ok(f)) if f.is_data()) {
            *this.done = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Trailers may yet come: no exact size.
        let mut hint = SizeHint::new();
        hint.set_lower(self.inner.size_hint().lower());
        hint
    }
}
