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
//!   reconnects, typically to another member. The checks run on a task of
//!   their own, not when the stream is polled: a client that has stopped
//!   reading (its flow-control window full, so the stream is not polled)
//!   still has its call ended, and the call's work (a watch and what it
//!   buffers) dropped, at the third check; the status follows the data
//!   already sent, once the client reads, as etcd's does.
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
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll, Waker};
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

/// What a `LeaderMonitored` body shares with its checks' task.
struct Monitored {
    /// The call's body; dropped (ending the call's work, which sees its
    /// output gone) once the member has known no leader for long enough.
    inner: Option<Body>,
    /// The member has known no leader at `MAX_NO_LEADER_CHECKS` checks in
    /// a row: the body ends with `no_leader()`.
    no_leader: bool,
    /// Who polled the body last and is waiting for a frame.
    waker: Option<Waker>,
}

/// A response body that ends with `no_leader()` once the member has known
/// no leader at `MAX_NO_LEADER_CHECKS` checks in a row, made by a task of
/// its own (`monitor`), whether or not the body is being polled.
struct LeaderMonitored {
    shared: Arc<Mutex<Monitored>>,
    /// The no-leader trailers went out (or the inner body ended).
    done: bool,
}

fn lock(m: &Mutex<Monitored>) -> std::sync::MutexGuard<'_, Monitored> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LeaderMonitored {
    fn new(inner: Body, api: Arc<Api>, every: Duration) -> LeaderMonitored {
        let shared = Arc::new(Mutex::new(Monitored {
            inner: Some(inner),
            no_leader: false,
            waker: None,
        }));
        tokio::spawn(monitor(Arc::downgrade(&shared), api, every));
        LeaderMonitored {
            shared,
            done: false,
        }
    }
}

/// Checks for a leader every `every` while the body `shared` lives; at the
/// `MAX_NO_LEADER_CHECKS`th check in a row without one, drops the call's
/// body and marks it ended, waking whoever waits on it. (A hyper server
/// polls a response body only while the client's flow-control window has
/// room: checks made when the body is polled are never made for a client
/// that stopped reading.)
async fn monitor(shared: Weak<Mutex<Monitored>>, api: Arc<Api>, every: Duration) {
    let every = every.max(Duration::from_millis(1));
    let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut without_leader = 0;
    loop {
        checks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return; // the call ended
        };
        if api.node.status().leader.is_some() {
            without_leader = 0;
            continue;
        }
        without_leader += 1;
        if without_leader >= MAX_NO_LEADER_CHECKS {
            let (inner, waker) = {
                let mut m = lock(&shared);
                m.no_leader = true;
                (m.inner.take(), m.waker.take())
            };
            // (Dropped outside the lock: the call's work may run drops.)
            drop(inner);
            if let Some(w) = waker {
                w.wake();
            }
            return;
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
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut m = lock(&this.shared);
        let ended = m.no_leader;
        let Some(inner) = m.inner.as_mut().filter(|_| !ended) else {
            this.done = true;
            let mut trailers = axum::http::HeaderMap::new();
            return Poll::Ready(Some(
                no_leader()
                    .add_header(&mut trailers)
                    .map(|()| Frame::trailers(trailers)),
            ));
        };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // The checks' task wakes it if it ends the call first.
                if !m.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    m.waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
        };
        drop(m);
        // After the inner body's end or trailers nothing more may follow.
        if !matches!(&frame, Some(Ok(f)) if f.is_data()) {
            this.done = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let m = lock(&self.shared);
        self.done || (!m.no_leader && m.inner.as_ref().is_some_and(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        // Trailers may yet come: no exact size.
        let mut hint = SizeHint::new();
        if let Some(inner) = &lock(&self.shared).inner {
            hint.set_lower(inner.size_hint().lower());
        }
        hint
    }
}
