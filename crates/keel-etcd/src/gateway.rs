//! etcd's grpc-gateway: the v3 API as JSON over HTTP, on the etcd API port,
//! for clients without gRPC (`curl -X POST -d '{"key":"Zm9v"}'
//! http://127.0.0.1:2379/v3/kv/range`). Every call is `POST
//! /v3/<service>/<method>` (also under `/v3beta/`, as etcd 3.4 serves it)
//! with the request message as JSON in the body and the response message
//! as JSON in the answer, both in etcd's gateway JSON (the protos' field
//! names, 64-bit integers as strings, bytes as base64: see
//! `keel_etcd_proto`). An empty body or `null` is the empty request, and
//! a field that is `null` has its default value. (JSON nested deeper than
//! 128 levels is refused, where etcd's reader allows 10,000.) A request larger than the gRPC
//! message limit (`max_request_bytes` + 512 KiB, as etcd's) is refused with
//! `ResourceExhausted`, as gRPC refuses it.
//!
//! The calls go to the same service code as gRPC calls. Errors answer
//! `{"error": msg, "message": msg, "code": <gRPC code>}` with the HTTP
//! status the gateway gives that code (InvalidArgument 400, NotFound 404,
//! Unavailable 503, …).
//!
//! Calls run as the user whose token (from `/v3/auth/authenticate`) is in
//! the `Authorization` header, as etcd's gateway takes it.
//!
//! Streams: `/v3/watch` and `/v3/lease/keepalive` take one or more request
//! objects, one after another, in the body; the answer is a chunked stream
//! of `{"result": <response>}` lines. The requests are read as the body
//! arrives, so a client sending a chunked body gets each one answered
//! before it sends the next (etcd 3.4 answers only once the body has
//! ended). A watch stream stays open until the client closes it; a
//! keep-alive stream ends after the last request's answer. `/v3/election/observe` and `/v3/maintenance/snapshot` stream the
//! same way. An error in a stream is a last line `{"error": {"grpc_code",
//! "http_code", "message", "http_status"}}`.

use crate::json_objects::{Objects, Piece};
use crate::{auth, cluster, election, kv, lease, lock, maintenance, recipes, watch, Api};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use keel_etcd_proto::etcdserverpb::auth_server::Auth;
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
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Status};

/// The path prefixes the gateway answers under.
pub const PREFIXES: [&str; 2] = ["/v3", "/v3beta"];

/// The HTTP status etcd's gateway answers a gRPC code with.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
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

/// A request message from a body (empty or `null`: the empty request).
/// Only the body's first JSON value is read: what follows it is ignored,
/// as etcd's gateway (one `Decode` of the body) ignores it.
pub fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Status> {
    // A body that starts with `null` is the empty request, whatever
    // follows (etcd's gateway: `null5` too, where serde sees one token).
    if body.trim_ascii_start().starts_with(b"null") {
        return Ok(T::default());
    }
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    match values.next() {
        None => Ok(T::default()),
        Some(v) => message(v.map_err(|e| bad_body(&e))?),
    }
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

/// The requests of a streaming call (watch, keep-alive), read from its
/// body as they arrive, so a client can send more requests later on the
/// same call (a chunked body), as etcd's gateway allows.
///
/// As etcd's gateway does: a body whose first request cannot be read is
/// an error (`Unknown`, 500: the gateway's answer to a JSON error); an
/// empty body is a call without requests; after the first request, bad
/// JSON or a body cut short just ends the requests (the call's responses
/// go on: a watch keeps watching).
async fn incoming<T>(api: &Api, body: Body) -> Result<RequestStream<T>, Status>
where
    T: DeserializeOwned + Default + prost::Message + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(read_requests(
        body,
        api.config.max_message_bytes(),
        api.config.max_body_bytes(),
        tx,
    ));
    let first = match rx.recv().await {
        Some(Err(e)) => return Err(e),
        first => first,
    };
    Ok(Box::pin(
        tokio_stream::iter(first).chain(ReceiverStream::new(rx)),
    ))
}

/// The requests of a streaming call, as `incoming` hands them over.
type RequestStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Parses the requests of `body` as its bytes arrive and sends them to
/// `tx`: each within `max_message` as a protobuf, at most `max_buffer`
/// bytes of an unfinished request held. Only a failure before the first
/// request is sent on (see `incoming`). Each byte is scanned once and
/// each request parsed once, however finely the body is cut. Reading
/// stops as soon as the call is over (`tx` closed), even while the client
/// sends nothing.
async fn read_requests<T: DeserializeOwned + Default + prost::Message>(
    body: Body,
    max_message: usize,
    max_buffer: usize,
    tx: mpsc::Sender<Result<T, Status>>,
) {
    // A request that is not valid is the error etcd's gateway answers it
    // with: JSON errors are `Unknown` to it; one too large keeps its code.
    let unknown = |e: Status| match e.code() {
        Code::InvalidArgument => Status::unknown(e.message()),
        _ => e,
    };
    let mut data = body.into_data_stream();
    let mut objects = Objects::default();
    let mut sent = false;
    let failure = 'read: loop {
        let chunk = tokio::select! {
            chunk = data.next() => chunk,
            () = tx.closed() => return,
        };
        match chunk {
            Some(Ok(chunk)) => objects.push(&chunk),
            Some(Err(e)) => {
                tracing::debug!("gateway stream: reading the body: {e}");
                return;
            }
            None if objects.rest().is_empty() => return,
            None => break unknown(not_a_request(objects.rest())),
        }
        loop {
            let req = match objects.next_piece() {
                Piece::Object(r) => parse::<T>(objects.bytes(r))
                    .and_then(|r| within_limit(r, max_message))
                    .map_err(unknown),
                Piece::Null => Ok(T::default()),
                Piece::More => break,
                Piece::NotObject => Err(unknown(not_a_request(objects.rest()))),
            };
            match req {
                Ok(req) => {
                    if tx.send(Ok(req)).await.is_err() {
                        return; // the call is over
                    }
                    sent = true;
                }
                Err(e) => break 'read e,
            }
        }
        if objects.rest().len() > max_buffer {
            break Status::resource_exhausted(format!(
                "a request in the body is over {max_buffer} bytes"
            ));
        }
    };
    if sent {
        tracing::debug!(
            "gateway stream: no more requests read: {}",
            failure.message()
        );
    } else {
        let _ = tx.send(Err(failure)).await;
    }
}

/// The error for `rest`, the end of a stream's body that is no whole
/// request: the JSON parser's, or what a request has to be.
fn not_a_request(rest: &[u8]) -> Status {
    let first = serde_json::Deserializer::from_slice(rest)
        .into_iter::<serde_json::Value>()
        .next();
    let what = match first {
        Some(Err(e)) => return bad_body(&e),
        None => return Status::invalid_argument("the body ends inside a request"),
        Some(Ok(serde_json::Value::Array(_))) => "an array",
        Some(Ok(serde_json::Value::String(_))) => "a string",
        Some(Ok(serde_json::Value::Number(_))) => "a number",
        Some(Ok(_)) => "not an object",
    };
    Status::invalid_argument(format!(
        "the request body is not a valid request: a request is a JSON object, this is {what}"
    ))
}

fn bad_body(e: &serde_json::Error) -> Status {
    Status::invalid_argument(format!("the request body is not a valid request: {e}"))
}

/// One line of a streamed answer: a result and a newline, or an error,
/// which ends the stream, without one (as etcd's gateway writes them).
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
            )
        }
    };
    Bytes::from(line)
}

/// A streamed answer: one line per response, sent as it comes. The HTTP
/// status goes out with the first response: 200, or, if that is already an
/// error, the error's (as etcd's gateway answers a call that fails at once).
async fn streamed<T, S>(responses: S) -> Response
where
    T: Serialize + Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    let mut responses = Box::pin(responses);
    let first = responses.next().await;
    let status = match &first {
        Some(Err(e)) => http_status(e.code()),
        _ => StatusCode::OK,
    };
    let lines = tokio_stream::iter(first)
        .chain(responses)
        .map(|item| Ok::<_, std::convert::Infallible>(stream_line(item)));
    (
        status,
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
    Resp: Serialize + Send + 'static,
    S: Stream<Item = Result<Resp, Status>> + Send + 'static,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    let answer = match request(api, body) {
        Ok(req) => call(req).await,
        Err(e) => return error(&e),
    };
    match answer {
        Ok(resp) => streamed(resp.into_inner()).await,
        Err(e) => error(&e),
    }
}

type Route = MethodRouter<Arc<Api>>;

/// `POST` of a unary method `$method` of the service `$svc(api)`.
macro_rules! unary {
    ($svc:expr, $method:ident) => {
        post(
            move |State(api): State<Arc<Api>>,
                  headers: HeaderMap,
                  body: Result<Bytes, BytesRejection>| async move {
                let svc = ($svc)(api.clone());
                unary(&api, body, |r| async move {
                    svc.$method(with_token(Request::new(r), headers)).await
                })
                .await
            },
        )
    };
}

/// `POST` of a method `$method` with a stream of responses.
macro_rules! server_streaming {
    ($svc:expr, $method:ident) => {
        post(
            move |State(api): State<Arc<Api>>,
                  headers: HeaderMap,
                  body: Result<Bytes, BytesRejection>| async move {
                let svc = ($svc)(api.clone());
                server_streaming(&api, body, |r| async move {
                    svc.$method(with_token(Request::new(r), headers)).await
                })
                .await
            },
        )
    };
}

/// A gateway call's request with the caller's token (the `Authorization`
/// header, or etcd clients' `token`) in its metadata, as a gRPC call
/// carries it (`auth`).
fn with_token<T>(mut r: Request<T>, headers: HeaderMap) -> Request<T> {
    if let Some(token) = auth::token_in(&MetadataMap::from_headers(headers)) {
        if let Ok(value) = MetadataValue::try_from(token.as_str()) {
            r.metadata_mut().insert("token", value);
        }
    }
    r
}

/// Who a gateway stream runs as (`auth`).
async fn who(api: &Api, headers: HeaderMap) -> Result<auth::Who, Status> {
    api.who_in(&MetadataMap::from_headers(headers)).await
}

/// The watches run until the client closes the connection.
async fn watch(State(api): State<Arc<Api>>, headers: HeaderMap, body: Body) -> Response {
    let who = match who(&api, headers).await {
        Ok(who) => who,
        Err(e) => return error(&e),
    };
    match incoming::<WatchRequest>(&api, body).await {
        Ok(reqs) => streamed(watch::serve(api, who, reqs)).await,
        Err(e) => error(&e),
    }
}

/// One answer per request; the call ends after the last one's.
async fn keep_alive(State(api): State<Arc<Api>>, headers: HeaderMap, body: Body) -> Response {
    let who = match who(&api, headers).await {
        Ok(who) => who,
        Err(e) => return error(&e),
    };
    match incoming::<LeaseKeepAliveRequest>(&api, body).await {
        Ok(reqs) => streamed(lease::keep_alive(api, who, reqs)).await,
        Err(e) => error(&e),
    }
}

/// Every gateway route, as (path below the prefix, handler).
fn routes() -> Vec<(&'static str, Route)> {
    let kv = kv::KvApi;
    let lease = lease::LeaseApi;
    let cluster = cluster::ClusterApi;
    let maintenance = maintenance::MaintenanceApi;
    let lock = |api| lock::LockApi(recipes::Recipes(api, Default::default()));
    let election = |api| election::ElectionApi(recipes::Recipes(api, Default::default()));
    let auth = auth::AuthApi;
    vec![
        ("/auth/enable", unary!(auth, auth_enable)),
        ("/auth/disable", unary!(auth, auth_disable)),
        ("/auth/status", unary!(auth, auth_status)),
        ("/auth/authenticate", unary!(auth, authenticate)),
        ("/auth/user/add", unary!(auth, user_add)),
        ("/auth/user/get", unary!(auth, user_get)),
        ("/auth/user/list", unary!(auth, user_list)),
        ("/auth/user/delete", unary!(auth, user_delete)),
        ("/auth/user/changepw", unary!(auth, user_change_password)),
        ("/auth/user/grant", unary!(auth, user_grant_role)),
        ("/auth/user/revoke", unary!(auth, user_revoke_role)),
        ("/auth/role/add", unary!(auth, role_add)),
        ("/auth/role/get", unary!(auth, role_get)),
        ("/auth/role/list", unary!(auth, role_list)),
        ("/auth/role/delete", unary!(auth, role_delete)),
        ("/auth/role/grant", unary!(auth, role_grant_permission)),
        ("/auth/role/revoke", unary!(auth, role_revoke_permission)),
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
        let first: RangeRequest = parse(br#" {"key":"Zm9v"} trailing {"#).unwrap();
        assert_eq!(&first.key[..], b"foo");
        for null in [&b" null "[..], b"null5", b"nullx"] {
            let r: RangeRequest = parse(null).unwrap();
            assert_eq!(r, RangeRequest::default());
        }
    }

    /// What `read_requests` makes of a body arriving in `chunks`.
    fn stream<T>(chunks: &[&[u8]], max_buffer: usize) -> Vec<Result<T, Status>>
    where
        T: DeserializeOwned + Default + prost::Message + Send + 'static,
    {
        let chunks: Vec<Result<Bytes, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let body = Body::from_stream(tokio_stream::iter(chunks));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx, rx) = mpsc::channel(16);
            let read = read_requests(body, 1 << 20, max_buffer, tx);
            let collect = ReceiverStream::new(rx).collect::<Vec<_>>();
            tokio::join!(read, collect).1
        })
    }

    #[test]
    fn stream_bodies_are_read_as_their_requests_arrive() {
        // Requests split anywhere across chunks.
        let got = stream::<LeaseKeepAliveRequest>(
            &[
                br#"{"ID":"#,
                br#""5"} {"I"#,
                br#"D":6}"#,
                b"\n {\"ID\":\"7\"}\n",
            ],
            100,
        );
        let ids: Vec<i64> = got.into_iter().map(|r| r.unwrap().id).collect();
        assert_eq!(ids, [5, 6, 7]);
        // Many more requests than the channel holds.
        let many = br#"{"ID":"1"}"#.repeat(100);
        assert_eq!(stream::<LeaseKeepAliveRequest>(&[&many], 100).len(), 100);
        // Nothing: no requests, no error.
        assert!(stream::<WatchRequest>(&[b" \n"], 100).is_empty());
        assert!(stream::<WatchRequest>(&[], 100).is_empty());
        // A first request that is not one: Unknown, as etcd's gateway.
        for bad in [&b"garbage"[..], b"{\"ID\":\"x\"}", b"{\"ID\":"] {
            let got = stream::<LeaseKeepAliveRequest>(&[bad], 100);
            assert_eq!(got.len(), 1, "{bad:?}");
            assert_eq!(
                got[0].as_ref().unwrap_err().code(),
                Code::Unknown,
                "{bad:?}"
            );
        }
        // After a good one, bad data ends the requests quietly.
        let got = stream::<LeaseKeepAliveRequest>(&[br#"{"ID":"1"} garbage {"ID":"2"}"#], 100);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_ok());
        // An unfinished request over the buffer's bound.
        let got = stream::<LeaseKeepAliveRequest>(&[b"{\"ID\":", &[b' '; 200]], 100);
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::ResourceExhausted);
        // `null` is the empty request; what is no object is not a request.
        let got = stream::<LeaseKeepAliveRequest>(&[br#"null {"ID":"5"}"#], 100);
        let ids: Vec<i64> = got.into_iter().map(|r| r.unwrap().id).collect();
        assert_eq!(ids, [0, 5]);
        for bad in [&b"5"[..], b"[]", b"\"x\"", b"true"] {
            let got = stream::<LeaseKeepAliveRequest>(&[bad], 100);
            assert_eq!(got[0].as_ref().unwrap_err().code(), Code::Unknown);
        }
    }

    #[test]
    fn stream_bodies_in_tiny_pieces_are_read_whole() {
        // Braces and escaped quotes inside strings do not end a request.
        let one = br#"{"ID":"7","note":"}{\"}\\","more":[{"x":"]"}]} "#;
        let body = one.repeat(50);
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let got = stream::<LeaseKeepAliveRequest>(&bytes, one.len());
        assert_eq!(got.len(), 50);
        assert!(got.iter().all(|r| r.as_ref().unwrap().id == 7));
        // A large request a byte at a time: the bound holds, and the cost
        // is linear (this took minutes when each piece re-parsed the rest).
        let big = format!(r#"{{"ID":"1","note":"{}"}}"#, "}".repeat(200_000));
        let bytes: Vec<&[u8]> = big.as_bytes().chunks(1).collect();
        let got = stream::<LeaseKeepAliveRequest>(&bytes, big.len());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap().id, 1);
        let got = stream::<LeaseKeepAliveRequest>(&bytes, 1000);
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::ResourceExhausted);
    }

    #[test]
    fn reading_stops_when_the_call_ends() {
        // A client that sends one request and then nothing: once the call
        // is over, its body is no longer read.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let first = Bytes::from_static(br#"{"ID":"1"}"#);
            let chunks = tokio_stream::iter([Ok::<_, std::convert::Infallible>(first)])
                .chain(tokio_stream::pending());
            let (tx, mut rx) = mpsc::channel(16);
            let read = tokio::spawn(read_requests::<LeaseKeepAliveRequest>(
                Body::from_stream(chunks),
                1 << 20,
                100,
                tx,
            ));
            assert_eq!(rx.recv().await.unwrap().unwrap().id, 1);
            drop(rx);
            tokio::time::timeout(std::time::Duration::from_secs(30), read)
                .await
                .expect("the reader stops")
                .expect("the reader does not panic");
        });
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
        let many = stream::<LeaseKeepAliveRequest>(&[br#"{"ID":null} {"ID":"5"}"#], 100);
        let ids: Vec<i64> = many.into_iter().map(|r| r.unwrap().id).collect();
        assert_eq!(ids, [0, 5]);
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
        assert!(
            !err.ends_with(b"\n"),
            "etcd ends the stream on an error, no newline"
        );
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse::<TxnRequest>(&body);
            let _ = stream::<WatchRequest>(&[&body], 1000);
        }

        #[test]
        fn parsing_json_like_bodies_never_panics(
            body in r#"[{}\[\]":,0-9a-z_A-Z=+/ -]{0,120}"#,
            key in "(key|range_end|limit|revision|compare|success|create_request|TTL|ID|target|result)",
        ) {
            let body = format!(r#"{{"{key}":{body}}}"#);
            let _ = parse::<RangeRequest>(body.as_bytes());
            let _ = parse::<TxnRequest>(body.as_bytes());
            let (a, b) = body.as_bytes().split_at(body.len() / 2);
            let _ = stream::<WatchRequest>(&[a, b], 1000);
            let _ = parse::<LeaseGrantRequest>(body.as_bytes());
        }
    }
}
