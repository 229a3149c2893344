//! etcd gRPC services Keel does not serve, registered so that their calls
//! are refused with a reason. (An unregistered service gets `Unimplemented`
//! with an empty message, which leaves an etcdctl user guessing.)

use tonic::codegen::{http, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::Status;

/// Why calls of etcd's Auth service (`etcdctl user`, `role`, `auth`) are
/// refused.
pub const AUTH_NOT_SERVED: &str = "etcdserver: authentication is not served by Keel \
(no users, roles or permissions: whoever reaches the etcd API address may use it)";

/// etcd's `etcdserverpb.Auth`: every method answers `Unimplemented` with
/// `AUTH_NOT_SERVED`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthNotServed;

impl NamedService for AuthNotServed {
    const NAME: &'static str = "etcdserverpb.Auth";
}

impl Service<http::Request<tonic::body::Body>> for AuthNotServed {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(Status::unimplemented(AUTH_NOT_SERVED).into_http()))
    }
}
