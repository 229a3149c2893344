//! etcd's grpc-gateway: the v3 API as JSON over HTTP, on the etcd API port,
//! for clients without gRPC (`curl -X POST -d '{"key":"Zm9v"}'
//! http://127.0.0.1:2379/v3/kv/range`). Every call is `POST
//! /v3/<service>/<method>` (also under `/v3beta/`, as etcd 3.4 serves it)
//! with the request message as JSON in the body and the response message
//! as JSON in the answer, both in etcd's gateway JSON (the protos' field
//! names, 64-bit integers as strings, bytes as base64: see
//! `keel_etcd_proto`). An empty body is the empty request, and a field
//! that is `null` has its default value. A request larger than the gRPC
//! message limit (`max_request_bytes` + 512 KiB, as etcd's) is refused with
//! `ResourceExhausted`, as gRPC refuses it.
//!
//! The calls go to the same service code as gRPC calls. Errors answer
//! `{"error": msg, "message": msg, "code": <gRPC code>}` with the HTTP
//! status the gateway gives that code (InvalidArgument 400, NotFound 404,
//! Unavailable 503, …).
//!
//! Streams: `/v3/watch` and `/v3/lease/keepalive` take one or more request
//! objects, one after another, in the body; the answer is a chunked stream
//! of `{"result": <response>}` lines. A watch stream stays open until the
//! client closes it; a keep-alive stream ends after the last request's
//! answer. `/v3/election/observe` and `/v3/maintenance/snapshot` stream the
//! same way. An error in a stream is a last line `{"error": {"grpc_code",
//! "http_code", "message", "http_status"}}`.

use crate::{cluster, election, kv, lease, lock, maintenance, recipes, watch, Api};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use keel_etcd_proto::etcdserverpb::cluster_server::Cluster;
use keel_etcd_proto::etcdserverpb::kv_server::Kv;
use keel_etcd_proto::etcdserverpb::lease_server::Lease;
use keel_etcd_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_etcd_proto::etcdserverpb::{LeaseKeepAliveRequest, WatchRequest};
use keel_etcd_proto::v3electionpb::election_server::Election;
use keel_etcd_proto::v3lockpb::lock_server::Lock;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Status};

/// The path prefixes the gateway answers under.
pub const PREFIXES: [&str; 2] = ["/v3", "/v3beta"];

/// The HTTP status etcd's gateway answers a gRPC code with.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `text` as a JSON string.
fn quoted(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// A unary call's error answer (fields in the gateway's order).
pub fn error(status: &Status) -> Response {
    let message = quoted(status.message());
    let body = format!(
        r#"{{"error":{message},"message":{message},"code":{}}}"#,
        status.code() as i32
    );
    json(http_status(status.code()), body)
}

fn json(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A request message from a body (empty: the empty request).
pub fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    message(serde_json::from_slice(body).map_err(|e| bad_body(&e))?)
}

/// The request messages of a streaming call's body, one after another.
pub fn parse_many<T: DeserializeOwned>(body: &[u8]) -> Result<Vec<T>, Status> {
    serde_json::Deserializer::from_slice(body)
        .into_iter::<serde_json::Value>()
        .map(|v| message(v.map_err(|e| bad_body(&e))?))
        .collect()
}

/// A message from its JSON, where a field that is `null` has its default
/// value (proto3's JSON mapping, as etcd's gateway reads it).
fn message<T: DeserializeOwned>(mut json: serde_json::Value) -> Result<T, Status> {
    drop_nulls(&mut json);
    serde_json::from_value(json).map_err(|e| bad_body(&e))
}

/// Removes the object members that are `null`, at every depth. (The
/// parser's nesting limit bounds the recursion.)
fn drop_nulls(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Object(members) => {
            members.retain(|_, v| !v.is_null());
            members.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// A request's body, or the error a body that could not be read gets: one
/// over the size limit is `ResourceExhausted`, as gRPC refuses a message
/// over its limit.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Status> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Status::resource_exhausted(format!("the request body is too large: {}", e.body_text()))
        } else {
            Status::invalid_argument(format!(
                "the request body could not be read: {}",
                e.body_text()
            ))
        }
    })
}

/// `req` if its protobuf is within the gRPC message limit `max`; otherwise
/// the `ResourceExhausted` gRPC answers a larger message with.
fn within_limit<T: prost::Message>(req: T, max: usize) -> Result<T, Status> {
    let len = req.encoded_len();
    if len > max {
        return Err(Status::resource_exhausted(format!(
            "grpc: received message larger than max ({len} vs. {max})"
        )));
    }
    Ok(req)
}

/// A request of a call from its body: read, parsed, and within the limit.
fn request<T: DeserializeOwned + Default + prost::Message>(
    api: &Api,
    raw: Result<Bytes, BytesRejection>,
) -> Result<T, Status> {
    within_limit(parse(&body(raw)?)?, api.config.max_message_bytes())
}

/// The requests of a streaming call from its body.
fn requests<T: DeserializeOwned + prost::Message>(
    api: &Api,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Vec<T>, Status> {
    let max = api.config.max_message_bytes();
    parse_many(&body(raw)?)?
        .into_iter()
        .map(|r| within_limit(r, max))
        .collect()
}

fn bad_body(e: &serde_json::Error) -> Status {
    Status::invalid_argument(format!("the request body is not a valid request: {e}"))
}

/// One line of a streamed answer.
pub fn stream_line<T: Serialize>(item: Result<T, Status>) -> Bytes {
    let result = item.and_then(|v| {
        serde_json::to_string(&v).map_err(|e| Status::internal(format!("response to JSON: {e}")))
    });
    let line = match result {
        Ok(v) => format!("{{\"result\":{v}}}\n"),
        Err(s) => {
            let http = http_status(s.code());
            format!(
                r#"{{"error":{{"grpc_code":{},"http_code":{},"message":{},"http_status":{}}}}}"#,
                s.code() as i32,
                http.as_u16(),
                quoted(s.message()),
                quoted(http.canonical_reason().unwrap_or("")),
            ) + "\n"
        }
    };
    Bytes::from(line)
}

/// A streamed answer: one line per response, sent as it comes.
fn streamed<T, S>(responses: S) -> Response
where
    T: Serialize,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    let lines = responses.map(|item| Ok::<_, std::convert::Infallible>(stream_line(item)));
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// Runs a unary call on a body.
async fn unary<Req, Resp, Fut>(
    api: &Api,
    body: Result<Bytes, BytesRejection>,
    call: impl FnOnce(Req) -> Fut,
) -> Response
where
    Req: DeserializeOwned + Default + prost::Message,
    Resp: Serialize,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let answer = match request(api, body) {
        Ok(req) => call(req).await,
        Err(e) => return error(&e),
    };
    match answer {
        Ok(resp) => match serde_json::to_string(resp.get_ref()) {
            Ok(text) => json(StatusCode::OK, text),
            Err(e) => error(&Status::internal(format!("response to JSON: {e}"))),
        },
        Err(e) => error(&e),
    }
}

/// Runs a call with one request and a stream of responses on a body.
async fn server_streaming<Req, Resp, S, Fut>(
    api: &Api,
    body: Result<Bytes, BytesRejection>,
    call: impl FnOnce(Req) -> Fut,
) -> Response
where
    Req: DeserializeOwned + Default + prost::Message,
    Resp: Serialize,
    S: Stream<Item = Result<Resp, Status>> + Send + 'static,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    let answer = match request(api, body) {
        Ok(req) => call(req).await,
        Err(e) => return error(&e),
    };
    match answer {
        Ok(resp) => streamed(resp.into_inner()),
        Err(e) => error(&e),
    }
}

type Route = MethodRouter<Arc<Api>>;

/// `POST` of a unary method `$method` of the service `$svc(api)`.
macro_rules! unary {
    ($svc:expr, $method:ident) => {
        post(
            move |State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>| async move {
                let svc = ($svc)(api.clone());
                unary(
                    &api,
                    body,
                    |r| async move { svc.$method(Request::new(r)).await },
                )
                .await
            },
        )
    };
}

/// `POST` of a method `$method` with a stream of responses.
macro_rules! server_streaming {
    ($svc:expr, $method:ident) => {
        post(
            move |State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>| async move {
                let svc = ($svc)(api.clone());
                server_streaming(
                    &api,
                    body,
                    |r| async move { svc.$method(Request::new(r)).await },
                )
                .await
            },
        )
    };
}

async fn watch(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    match requests::<WatchRequest>(&api, body) {
        // The body's requests; the watches run until the client closes
        // the connection.
        Ok(reqs) => streamed(watch::serve(
            api,
            Box::pin(tokio_stream::iter(reqs.into_iter().map(Ok))),
        )),
        Err(e) => error(&e),
    }
}

async fn keep_alive(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    match requests::<LeaseKeepAliveRequest>(&api, body) {
        Ok(reqs) => streamed(lease::keep_alive(
            api,
            Box::pin(tokio_stream::iter(reqs.into_iter().map(Ok))),
        )),
        Err(e) => error(&e),
    }
}

/// Every gateway route, as (path below the prefix, handler).
fn routes() -> Vec<(&'static str, Route)> {
    let kv = kv::KvApi;
    let lease = lease::LeaseApi;
    let cluster = cluster::ClusterApi;
    let maintenance = maintenance::MaintenanceApi;
    let lock = |api| lock::LockApi(recipes::Recipes(api));
    let election = |api| election::ElectionApi(recipes::Recipes(api));
    vec![
        ("/kv/range", unary!(kv, range)),
        ("/kv/put", unary!(kv, put)),
        ("/kv/deleterange", unary!(kv, delete_range)),
        ("/kv/txn", unary!(kv, txn)),
        ("/kv/compaction", unary!(kv, compact)),
        ("/watch", post(watch)),
        ("/lease/grant", unary!(lease, lease_grant)),
        ("/lease/revoke", unary!(lease, lease_revoke)),
        ("/kv/lease/revoke", unary!(lease, lease_revoke)),
        ("/lease/keepalive", post(keep_alive)),
        ("/lease/timetolive", unary!(lease, lease_time_to_live)),
        ("/kv/lease/timetolive", unary!(lease, lease_time_to_live)),
        ("/lease/leases", unary!(lease, lease_leases)),
        ("/kv/lease/leases", unary!(lease, lease_leases)),
        ("/cluster/member/add", unary!(cluster, member_add)),
        ("/cluster/member/remove", unary!(cluster, member_remove)),
        ("/cluster/member/update", unary!(cluster, member_update)),
        ("/cluster/member/list", unary!(cluster, member_list)),
        ("/cluster/member/promote", unary!(cluster, member_promote)),
        ("/maintenance/alarm", unary!(maintenance, alarm)),
        ("/maintenance/status", unary!(maintenance, status)),
        ("/maintenance/defragment", unary!(maintenance, defragment)),
        ("/maintenance/hash", unary!(maintenance, hash)),
        ("/maintenance/hashkv", unary!(maintenance, hash_kv)),
        (
            "/maintenance/snapshot",
            server_streaming!(maintenance, snapshot),
        ),
        (
            "/maintenance/transfer-leadership",
            unary!(maintenance, move_leader),
        ),
        ("/lock/lock", unary!(lock, lock)),
        ("/lock/unlock", unary!(lock, unlock)),
        ("/election/campaign", unary!(election, campaign)),
        ("/election/proclaim", unary!(election, proclaim)),
        ("/election/leader", unary!(election, leader)),
        ("/election/observe", server_streaming!(election, observe)),
        ("/election/resign", unary!(election, resign)),
    ]
}

/// The gateway's routes under every prefix, reading bodies of up to
/// `max_body` bytes (a bound on memory: a request's JSON is about 4/3 of
/// its protobuf, whose own limit each call checks).
pub fn router(max_body: usize) -> axum::Router<Arc<Api>> {
    let mut router = axum::Router::new();
    for prefix in PREFIXES {
        for (path, route) in routes() {
            router = router.route(&format!("{prefix}{path}"), route);
        }
    }
    router.layer(DefaultBodyLimit::max(max_body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_etcd_proto::etcdserverpb::*;
    use keel_etcd_proto::mvccpb::KeyValue;

    #[test]
    fn messages_are_etcds_gateway_json() {
        let resp = RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: 13455796455940752355,
                member_id: 1,
                revision: 2,
                raft_term: 2,
            }),
            kvs: vec![KeyValue {
                key: "foo".into(),
                value: "bar".into(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        // As etcd 3.4.23's gateway answered the same range.
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"header":{"cluster_id":"13455796455940752355","member_id":"1","revision":"2","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#
        );
        let grant = LeaseGrantResponse {
            id: 7,
            ttl: 30,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&grant).unwrap(),
            r#"{"ID":"7","TTL":"30"}"#
        );
    }

    #[test]
    fn requests_take_names_numbers_strings_and_ignore_unknown_fields() {
        let t: TxnRequest = parse(
            br#"{"compare":[{"target":"MOD","key":"Zm9v","mod_revision":"2"}],
                 "success":[{"request_put":{"key":"Zm9v","value":"YmF6"}}],"bogus":1}"#,
        )
        .unwrap();
        assert_eq!(t.compare[0].target, compare::CompareTarget::Mod as i32);
        assert_eq!(
            t.compare[0].target_union,
            Some(compare::TargetUnion::ModRevision(2))
        );
        let r: RangeRequest = parse(br#"{"key":"Zm9v","limit":5,"sort_target":3}"#).unwrap();
        assert_eq!((r.limit, r.sort_target, &r.key[..]), (5, 3, &b"foo"[..]));
        let empty: RangeRequest = parse(b"  ").unwrap();
        assert_eq!(empty, RangeRequest::default());
        let many: Vec<WatchRequest> =
            parse_many(br#"{"create_request":{"key":"YQ=="}} {"cancel_request":{"watch_id":"1"}}"#)
                .unwrap();
        assert_eq!(many.len(), 2);
    }

    #[test]
    fn null_fields_have_their_default_values() {
        let t: TxnRequest = parse(
            br#"{"compare":[{"target":"VALUE","key":"Zm9v","value":null,"range_end":null}],
                 "success":null,"failure":[{"request_range":{"key":"Zm9v","limit":null}}]}"#,
        )
        .unwrap();
        assert_eq!(t.compare[0].key, &b"foo"[..]);
        assert!(t.success.is_empty());
        assert_eq!(t.failure.len(), 1);
        let many: Vec<LeaseKeepAliveRequest> = parse_many(br#"{"ID":null} {"ID":"5"}"#).unwrap();
        assert_eq!((many[0].id, many[1].id), (0, 5));
        // A null where a message belongs in a list is not a message.
        assert!(parse::<TxnRequest>(br#"{"success":[null]}"#).is_err());
    }

    #[test]
    fn requests_over_the_grpc_limit_are_resource_exhausted() {
        let put = PutRequest {
            key: "k".into(),
            value: vec![0u8; 100].into(),
            ..Default::default()
        };
        assert!(within_limit(put.clone(), 200).is_ok());
        let e = within_limit(put, 100).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert_eq!(http_status(e.code()), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn bad_bodies_are_invalid_argument() {
        for body in [
            &b"garbage"[..],
            br#"{"key":"not base64!"}"#,
            br#"{"limit":"x"}"#,
        ] {
            let e = parse::<RangeRequest>(body).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{body:?}");
        }
        assert!(parse_many::<WatchRequest>(b"{} {").is_err());
        assert_eq!(http_status(Code::OutOfRange), StatusCode::BAD_REQUEST);
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn stream_lines_are_results_or_errors() {
        let ok = stream_line(Ok(LeaseKeepAliveResponse {
            id: 1,
            ..Default::default()
        }));
        assert_eq!(&ok[..], b"{\"result\":{\"ID\":\"1\"}}\n");
        let err = stream_line::<LeaseKeepAliveResponse>(Err(Status::not_found("gone")));
        let v: serde_json::Value = serde_json::from_slice(&err).unwrap();
        assert_eq!(v["error"]["grpc_code"], 5);
        assert_eq!(v["error"]["http_code"], 404);
        assert_eq!(v["error"]["message"], "gone");
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse::<TxnRequest>(&body);
            let _ = parse_many::<WatchRequest>(&body);
        }

        #[test]
        fn parsing_json_like_bodies_never_panics(
            body in r#"[{}\[\]":,0-9a-z_A-Z=+/ -]{0,120}"#,
            key in "(key|range_end|limit|revision|compare|success|create_request|TTL|ID|target|result)",
        ) {
            let body = format!(r#"{{"{key}":{body}}}"#);
            let _ = parse::<RangeRequest>(body.as_bytes());
            let _ = parse::<TxnRequest>(body.as_bytes());
            let _ = parse_many::<WatchRequest>(body.as_bytes());
            let _ = parse::<LeaseGrantRequest>(body.as_bytes());
        }
    }
}
