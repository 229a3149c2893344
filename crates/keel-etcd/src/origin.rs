//! etcd's CORS handling (`http::Cors`, the `etcd_cors` setting) for every
//! request to the etcd port, gRPC calls included, as a layer around the
//! whole port's service:
//!
//! - a request from an allowed web origin gets etcd's CORS headers on its
//!   answer, and its preflight `OPTIONS` is answered 200 at once;
//! - unlike etcd, a request from any other web origin (one with an
//!   `Origin` header: browsers send it on every cross-origin call and on
//!   every POST) is refused before it runs: PermissionDenied, as a gRPC
//!   status to a gRPC call and a 403 to anything else. CORS headers only
//!   keep a page from reading an answer: without this a page could still
//!   write and delete keys with a "simple" POST, to the JSON gateway or
//!   (tonic takes a gRPC call over HTTP/1.1 whatever its content type) to
//!   a gRPC method;
//! - a request without `Origin` (programs: etcdctl, gRPC clients, curl,
//!   probes) goes straight through, at no cost but a header lookup; with
//!   a list of origins its answer says `Vary: origin`, and with `*` it
//!   gets the CORS headers, as etcd's answers do.

use crate::http::Cors;
use crate::{gateway, Api};
use axum::http::{header, HeaderValue, Method, Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tonic::body::Body;

/// Puts `OriginCheck` around a service (`tonic::transport::Server::layer`).
#[derive(Clone)]
pub struct OriginCheckLayer(pub Arc<Api>);

impl<S> tower_layer::Layer<S> for OriginCheckLayer {
    type Service = OriginCheck<S>;
    fn layer(&self, inner: S) -> OriginCheck<S> {
        OriginCheck {
            inner,
            api: self.0.clone(),
        }
    }
}

/// The service `inner` behind the CORS check (see the module docs).
#[derive(Clone)]
pub struct OriginCheck<S> {
    inner: S,
    api: Arc<Api>,
}

impl<S, B> tower_service::Service<Request<B>> for OriginCheck<S>
where
    S: tower_service::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Checked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let cors = &self.api.config.cors;
        let asked = req.headers().get(header::ORIGIN);
        let vary = matches!(cors, Cors::Origins(_));
        let allowed = match (asked, cors.allow(asked)) {
            // The answer depends on the asking origin: caches must know.
            (None, None) if vary => {
                return Checked::WithHeaders {
                    inner: self.inner.call(req),
                    allowed: None,
                    vary,
                }
            }
            (None, None) => {
                return Checked::Through {
                    inner: self.inner.call(req),
                }
            }
            (Some(asked), None) => {
                let grpc = req
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
                return Checked::Answered {
                    answer: Some(with_cors(refusal(asked, grpc), None, vary)),
                };
            }
            (_, Some(allowed)) => allowed,
        };
        if req.method() == Method::OPTIONS {
            let ok = Response::new(Body::empty());
            return Checked::Answered {
                answer: Some(with_cors(ok, Some(allowed), vary)),
            };
        }
        Checked::WithHeaders {
            inner: self.inner.call(req),
            allowed: Some(allowed),
            vary,
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of an `OriginCheck`.
    #[project = CheckedProj]
    pub enum Checked<F> {
        /// The inner service's, as it is.
        Through { #[pin] inner: F },
        /// The inner service's, with CORS headers (`Vary` alone if no
        /// origin is `allowed`).
        WithHeaders { #[pin] inner: F, allowed: Option<HeaderValue>, vary: bool },
        /// Answered by the check itself.
        Answered { answer: Option<Response<Body>> },
    }
}

impl<F> Future for Checked<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CheckedProj::Through { inner } => inner.poll(cx),
            CheckedProj::WithHeaders {
                inner,
                allowed,
                vary,
            } => {
                let Ok(resp) = ready!(inner.poll(cx));
                Poll::Ready(Ok(with_cors(resp, allowed.take(), *vary)))
            }
            CheckedProj::Answered { answer } => Poll::Ready(Ok(answer
                .take()
                .expect("an answer is polled to its end once"))),
        }
    }
}

/// The refusal of a request from `asked`: PermissionDenied, as a gRPC
/// status to a gRPC call (`grpc`), else as the gateway's JSON with 403.
fn refusal(asked: &HeaderValue, grpc: bool) -> Response<Body> {
    let asked = String::from_utf8_lossy(asked.as_bytes());
    let status = tonic::Status::permission_denied(format!(
        "a request from the web origin {asked} is refused: etcd_cors (--etcd-cors) does not \
         allow it"
    ));
    if grpc {
        status.into_http()
    } else {
        gateway::error(&status).map(Body::new)
    }
}

/// `resp` with etcd's CORS headers, for an answer to origin `allowed`
/// (none: no origin is allowed this answer), and `Vary: origin` if `vary`.
fn with_cors(mut resp: Response<Body>, allowed: Option<HeaderValue>, vary: bool) -> Response<Body> {
    let h = resp.headers_mut();
    if vary {
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    let Some(allowed) = allowed else {
        return resp;
    };
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    resp
}
